//! Kinesis's faults, injected by a proxy in front of kinesalite (which never throttles):
//! throttled GetRecords and PutRecords calls, expired iterators, PutRecords calls that
//! fail some of their records; and records too large for Kinesis, and the lag gauge.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Kinesalite, ids, records};
use crate::kafka::{Sluice, write_pipeline};

const WAIT: Duration = Duration::from_secs(180);

/// What the proxy did.
#[derive(Default)]
struct Injected {
    get_records: AtomicU64,
    put_records: AtomicU64,
    throttled: AtomicU64,
    expired: AtomicU64,
    entries_failed: AtomicU64,
}

struct Proxy {
    upstream: String,
    http: reqwest::Client,
    injected: Injected,
    /// Injects faults (`true`), or only answers GetRecords with `behind_ms` as the
    /// shard's MillisBehindLatest (kinesalite says 0 for an open shard).
    faults: bool,
    behind_ms: AtomicU64,
}

fn fault(code: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amzn-errortype", code),
        ],
        json!({"__type": code, "message": "injected by the test"}).to_string(),
    )
        .into_response()
}

impl Proxy {
    async fn forward(&self, headers: &HeaderMap, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let mut request = self.http.post(&self.upstream).body(body);
        for (name, value) in headers {
            if name != "host" && name != "content-length" {
                request = request.header(name.as_str(), value.as_bytes());
            }
        }
        let response = request.send().await.expect("kinesalite answers");
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.bytes().await.unwrap().to_vec())
    }

    /// Forwards all but every fourth record (from an offset that moves with each call);
    /// answers those as throttled, as Kinesis does for records over a shard's limit.
    async fn put_some(&self, headers: &HeaderMap, body: &[u8], call: u64) -> Response {
        let mut request: Value = serde_json::from_slice(body).unwrap();
        let all = request["Records"].as_array().unwrap().clone();
        let failed: Vec<bool> = (0..all.len() as u64)
            .map(|i| (i + call).is_multiple_of(4))
            .collect();
        let kept: Vec<Value> = all
            .iter()
            .zip(&failed)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r.clone())
            .collect();
        let mut answers: Vec<Value> = Vec::new();
        if !kept.is_empty() {
            request["Records"] = Value::Array(kept);
            let (status, body) = self
                .forward(headers, serde_json::to_vec(&request).unwrap())
                .await;
            if status != StatusCode::OK {
                return (status, body).into_response();
            }
            let answered: Value = serde_json::from_slice(&body).unwrap();
            answers = answered["Records"].as_array().unwrap().clone();
        }
        let mut answers = answers.into_iter();
        let mut records = Vec::with_capacity(all.len());
        let mut failures = 0;
        for f in failed {
            if f {
                failures += 1;
                records.push(json!({
                    "ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": "Rate exceeded for shard (injected)"
                }));
            } else {
                let a = answers.next().unwrap();
                if a.get("ErrorCode").is_some() {
                    failures += 1;
                }
                records.push(a);
            }
        }
        self.injected
            .entries_failed
            .fetch_add(failures, Ordering::Relaxed);
        let body = json!({"FailedRecordCount": failures, "Records": records});
        (
            StatusCode::OK,
            [("content-type", "application/x-amz-json-1.1")],
            body.to_string(),
        )
            .into_response()
    }
}

async fn handle(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let injected = &proxy.injected;
    if !proxy.faults {
        let (status, body) = proxy.forward(&headers, body.to_vec()).await;
        let body = match (target.ends_with(".GetRecords"), status) {
            (true, StatusCode::OK) => {
                let mut answer: Value = serde_json::from_slice(&body).unwrap();
                answer["MillisBehindLatest"] = json!(proxy.behind_ms.load(Ordering::Relaxed));
                serde_json::to_vec(&answer).unwrap()
            }
            _ => body,
        };
        let kind = [("content-type", "application/x-amz-json-1.1")];
        return (status, kind, body).into_response();
    }
    if target.ends_with(".GetRecords") {
        let call = injected.get_records.fetch_add(1, Ordering::Relaxed);
        if call % 3 == 1 {
            injected.throttled.fetch_add(1, Ordering::Relaxed);
            return fault("ProvisionedThroughputExceededException");
        }
        if call % 7 == 5 {
            injected.expired.fetch_add(1, Ordering::Relaxed);
            return fault("ExpiredIteratorException");
        }
    }
    if target.ends_with(".PutRecords") {
        let call = injected.put_records.fetch_add(1, Ordering::Relaxed);
        if call % 5 == 2 {
            injected.throttled.fetch_add(1, Ordering::Relaxed);
            return fault("ProvisionedThroughputExceededException");
        }
        return proxy.put_some(&headers, &body, call).await;
    }
    let (status, body) = proxy.forward(&headers, body.to_vec()).await;
    (
        status,
        [("content-type", "application/x-amz-json-1.1")],
        body,
    )
        .into_response()
}

/// Starts the proxy on its own thread; returns its address and what it injected.
fn start_proxy(upstream: String) -> (SocketAddr, Arc<Proxy>) {
    serve(Proxy {
        upstream,
        http: reqwest::Client::new(),
        injected: Injected::default(),
        faults: true,
        behind_ms: AtomicU64::new(0),
    })
}

fn serve(proxy: Proxy) -> (SocketAddr, Arc<Proxy>) {
    let proxy = Arc::new(proxy);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let state = proxy.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new()
                .fallback(axum::routing::post(handle))
                .with_state(state);
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, proxy)
}

#[test]
fn throttling_expired_iterators_and_failed_entries_are_ridden_out() {
    let k = Kinesalite::with_streams(&[("plays", 2), ("shouted", 2)]);
    let n = 20_000;
    k.kinesis.put("plays", &records(0, n, 37));
    let (addr, proxy) = start_proxy(k.endpoint());
    let dir = tempfile::tempdir().unwrap();
    let yaml = super::pipeline(&k, "plays", "shouted", dir.path())
        .replace(&k.endpoint(), &format!("http://{addr}"));
    let path = write_pipeline(dir.path(), &yaml);
    let started = Instant::now();
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    let read = k.kinesis.wait_for("shouted", n as usize, WAIT);
    let i = &proxy.injected;
    // Within a shard's 5 GetRecords calls a second (2 shards).
    let per_shard_second =
        i.get_records.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64() / 2.0;
    assert!(per_shard_second <= 5.0, "{per_shard_second} calls a second");
    eprintln!(
        "read {} of {n}; calls: {} GetRecords, {} PutRecords",
        read.len(),
        i.get_records.load(Ordering::Relaxed),
        i.put_records.load(Ordering::Relaxed)
    );
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let out = ids(&read);
    let missing: Vec<i64> = (0..n).filter(|i| !out.contains_key(i)).take(10).collect();
    assert!(
        missing.is_empty(),
        "missing ids, the first: {missing:?}\n{log}"
    );
    let twice: usize = out.values().map(|(_, c)| c - 1).sum();
    assert_eq!(
        twice, 0,
        "a failed entry was not written: sending it again is no duplicate"
    );
    let i = &proxy.injected;
    let (throttled, expired, failed) = (
        i.throttled.load(Ordering::Relaxed),
        i.expired.load(Ordering::Relaxed),
        i.entries_failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "injected: {throttled} throttled calls, {expired} expired iterators, {failed} failed entries"
    );
    assert!(
        throttled > 3 && expired > 0 && failed > 100,
        "the faults happened"
    );
    assert!(
        log.contains("sent again after throttling") && !log.contains(" 0 sent again"),
        "{log}"
    );
}

#[test]
fn a_record_too_large_for_kinesis_is_a_dead_letter_and_lag_is_in_milliseconds() {
    let k = Kinesalite::with_streams(&[("plays", 2), ("shouted", 1)]);
    let n = 1_000;
    k.kinesis.put("plays", &records(0, n, 37));
    let dir = tempfile::tempdir().unwrap();
    // Every 100th row grows past Kinesis's 1 MiB.
    let yaml = super::pipeline(&k, "plays", "shouted", dir.path())
        .replace(
            "SELECT id, upper(user) AS user, _sequence AS seq FROM input",
            "SELECT id, CASE WHEN id % 100 = 0 THEN repeat(upper(user), 600000) ELSE upper(user) END AS user, _sequence AS seq FROM input",
        )
        .replace("partition_key: user", "partition_key: seq")
        + &format!(
            "dead_letter: {{ type: file, path: {}, format: jsonl }}\n",
            dir.path().join("dlq").display()
        );
    let path = write_pipeline(dir.path(), &yaml);
    let port = crate::free_port();
    let sluice = Sluice::start_args(
        &path,
        dir.path().join("run.log"),
        &["--metrics-addr", &port.to_string()],
        &[],
    );
    let read = k.kinesis.wait_for("shouted", (n - 10) as usize, WAIT);
    // Each shard's MillisBehindLatest, by partition.
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let lag: BTreeMap<String, f64> = loop {
        let lag: BTreeMap<String, f64> = crate::scrape(&addr)
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _, _)| name == "sluice_partition_lag_ms")
            .map(|(_, labels, v)| (labels["partition"].clone(), v))
            .collect();
        if lag.len() == 2 || Instant::now() > deadline {
            break lag;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(
        lag.keys().cloned().collect::<Vec<_>>(),
        ["plays/shardId-000000000000", "plays/shardId-000000000001"],
        "{log}"
    );
    assert!(
        lag.values().all(|ms| *ms >= 0.0 && *ms < 60_000.0),
        "{lag:?}"
    );
    let out = ids(&read);
    assert_eq!(out.len(), (n - 10) as usize);
    assert!(out.keys().all(|id| id % 100 != 0));
    let dead: String = std::fs::read_dir(dir.path().join("dlq"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    assert_eq!(dead.lines().count(), 10, "{dead:.2000}");
    assert!(
        dead.contains("Kinesis takes at most 1 MiB"),
        "{:.2000}",
        dead
    );
}

/// A stream of 4 shards behind a proxy that reports each 45 s behind the tip, and a
/// pipeline through it scaling up to `max` at a worker per 10 s of lag.
fn behind_45s(max: usize) -> (Kinesalite, Arc<Proxy>, tempfile::TempDir, String) {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let (addr, proxy) = serve(Proxy {
        upstream: k.endpoint(),
        http: reqwest::Client::new(),
        injected: Injected::default(),
        faults: false,
        behind_ms: AtomicU64::new(45_000),
    });
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}scaling:\n  min_workers: 1\n  max_workers: {max}\n  lag_threshold: 10s\n  scale_down_cooldown: 3s\n  interval: 500ms\n",
        super::pipeline(&k, "plays", "shouted", dir.path())
            .replace(&k.endpoint(), &format!("http://{addr}"))
    );
    (k, proxy, dir, yaml)
}

#[test]
fn workers_follow_a_kinesis_lag_in_time() {
    let (k, proxy, dir, yaml) = behind_45s(4);
    let path = write_pipeline(dir.path(), &yaml);
    let sluice = Sluice::start_args(
        &path,
        dir.path().join("run.log"),
        &[],
        &[("RUST_LOG", "info")],
    );
    let until = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sluice.log_text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no `{what}`:\n{}",
                sluice.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Four shards 45 s behind: 3 minutes of lag at 10 s a worker, capped at max_workers.
    until("autoscaler: scaling up");
    until("to=4");
    proxy.behind_ms.store(0, Ordering::Relaxed);
    until("autoscaler: scaling down");
    k.kinesis.put("plays", &records(0, 1_000, 37));
    k.kinesis.wait_for_ids("shouted", 1_000, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let up = log.lines().find(|l| l.contains("scaling up")).unwrap();
    assert!(
        up.contains("lag 180s over 1 worker(s) at lag_threshold 10s"),
        "{up}"
    );
    eprintln!("{up}");
}

#[test]
fn processes_auto_sizes_kinesis_worker_processes_by_the_lag_in_their_leases() {
    let (k, proxy, dir, yaml) = behind_45s(2);
    let yaml = yaml.replace(
        "  discover_every: 1s\n",
        "  discover_every: 1s\n  lease_duration: 3s\n",
    );
    assert!(yaml.contains("lease_duration"), "{yaml}");
    let path = write_pipeline(dir.path(), &yaml);
    let leases = dir.path().join("checkpoints/leases/plays");
    let sluice = Sluice::start_args(
        &path,
        dir.path().join("run.log"),
        &["--processes", "auto"],
        &[("RUST_LOG", "info")],
    );
    let owners = || -> BTreeMap<String, usize> {
        let mut held = BTreeMap::new();
        for entry in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(lease) = serde_json::from_slice::<Value>(&text) else {
                continue;
            };
            if let Some(owner) = lease["owner"].as_str() {
                *held.entry(owner.to_string()).or_default() += 1;
            }
        }
        held
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "no {what}: leases {:?}\n{}",
                owners(),
                sluice.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Four shards 45 s behind at 10 s a process: as many as max_workers, sharing them.
    until("second process", &|| {
        owners().len() == 2 && owners().values().all(|n| *n == 2)
    });
    proxy.behind_ms.store(0, Ordering::Relaxed);
    until("scale-down", &|| {
        owners() == BTreeMap::from([("worker-0".to_string(), 4)])
    });
    k.kinesis.put("plays", &records(0, 1_000, 37));
    k.kinesis.wait_for_ids("shouted", 1_000, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let up = log
        .lines()
        .find(|l| l.contains("worker processes up"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("{up}");
    assert!(up.contains("at lag_threshold 10s"), "{up}");
    assert!(log.contains("worker processes down"), "{log}");
}
