//! The Kinesis source and sink against kinesalite (a Kinesis API implementation, from
//! npm), one server per test on a free loopback port. `make test` installs it into
//! `.tools/kinesalite`; `KINESALITE` names another executable. The tests read and write
//! streams with the AWS SDK directly (not Sluice's code), as an independent client.

mod faults;
mod flow;
mod formats;
mod workers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};

use crate::services::wait_for_port;

fn executable() -> PathBuf {
    match std::env::var_os("KINESALITE") {
        Some(path) => PathBuf::from(path),
        None => crate::root().join(".tools/kinesalite/node_modules/.bin/kinesalite"),
    }
}

/// A kinesalite server: streams in memory, created, split and merged at once.
pub struct Kinesalite {
    pub port: u16,
    child: Child,
    pub kinesis: Kinesis,
}

impl Kinesalite {
    pub fn start() -> Kinesalite {
        let exe = executable();
        assert!(
            exe.exists(),
            "{} is missing: `make test` installs kinesalite with npm (or set KINESALITE)",
            exe.display()
        );
        let port = crate::free_port();
        let child = Command::new(&exe)
            .args(["--port", &port.to_string()])
            .args(["--createStreamMs", "0", "--deleteStreamMs", "0"])
            .args(["--updateStreamMs", "0", "--shardLimit", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kinesalite");
        wait_for_port(port, "kinesalite");
        let kinesis = Kinesis::new(&format!("http://127.0.0.1:{port}"));
        Kinesalite {
            port,
            child,
            kinesis,
        }
    }

    /// A server with these streams (name, shards), active.
    pub fn with_streams(streams: &[(&str, i32)]) -> Kinesalite {
        let k = Kinesalite::start();
        for (name, shards) in streams {
            k.kinesis.create_stream(name, *shards);
        }
        k
    }

    /// Another client, for a thread of the test's own.
    pub fn client(&self) -> Kinesis {
        Kinesis::new(&self.endpoint())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The keys a pipeline's `kinesis` source or sink needs to reach this server.
    pub fn yaml(&self, stream: &str) -> String {
        format!(
            "stream: {stream}\n    region: us-east-1\n    endpoint: {}\n    access_key_id: test\n    secret_access_key: test",
            self.endpoint()
        )
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record as read back.
#[derive(Debug, Clone)]
pub struct Read {
    pub shard: String,
    pub key: String,
    pub data: Vec<u8>,
    /// ApproximateArrivalTimestamp, in milliseconds.
    pub arrival_ms: i64,
}

/// A shard as listed: its id, its parents, whether it is open, its hash keys.
pub type Shard = (String, Vec<String>, bool, (u128, u128));

/// The SDK on a runtime of its own, for the tests' threads.
pub struct Kinesis {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Kinesis {
    fn new(endpoint: &str) -> Kinesis {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = aws_smithy_http_client::Builder::new().build_http();
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .http_client(http)
            .credentials_provider(aws_credential_types::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .build();
        Kinesis {
            rt,
            client: Client::from_conf(config),
        }
    }

    pub fn create_stream(&self, name: &str, shards: i32) {
        self.rt.block_on(async {
            self.client
                .create_stream()
                .stream_name(name)
                .shard_count(shards)
                .send()
                .await
                .unwrap();
        });
        self.wait_active(name);
    }

    fn wait_active(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.rt.block_on(async {
                self.client
                    .describe_stream_summary()
                    .stream_name(name)
                    .send()
                    .await
                    .unwrap()
                    .stream_description_summary()
                    .map(|s| s.stream_status().clone())
            });
            if status == Some(StreamStatus::Active) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stream {name} never became active"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes the records (partition key, data) in order, 500 a call; records a call
    /// failed are sent again.
    pub fn put(&self, stream: &str, records: &[(String, Vec<u8>)]) {
        for chunk in records.chunks(500) {
            let mut left: Vec<&(String, Vec<u8>)> = chunk.iter().collect();
            while !left.is_empty() {
                let entries = left
                    .iter()
                    .map(|(k, d)| {
                        PutRecordsRequestEntry::builder()
                            .partition_key(k)
                            .data(Blob::new(d.clone()))
                            .build()
                            .unwrap()
                    })
                    .collect();
                let out = self
                    .rt
                    .block_on(
                        self.client
                            .put_records()
                            .stream_name(stream)
                            .set_records(Some(entries))
                            .send(),
                    )
                    .unwrap();
                left = left
                    .into_iter()
                    .zip(out.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(e, _)| e)
                    .collect();
            }
        }
    }

    /// The stream's shards.
    pub fn shards(&self, stream: &str) -> Vec<Shard> {
        self.rt.block_on(async {
            let out = self
                .client
                .list_shards()
                .stream_name(stream)
                .send()
                .await
                .unwrap();
            out.shards()
                .iter()
                .map(|s| {
                    let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                        .into_iter()
                        .flatten()
                        .map(String::from)
                        .collect();
                    let open = s
                        .sequence_number_range()
                        .is_none_or(|r| r.ending_sequence_number().is_none());
                    let range = s.hash_key_range().unwrap();
                    let range = (
                        range.starting_hash_key().parse().unwrap(),
                        range.ending_hash_key().parse().unwrap(),
                    );
                    (s.shard_id().to_string(), parents, open, range)
                })
                .collect()
        })
    }

    /// Splits `shard` in the middle of its hash keys.
    pub fn split(&self, stream: &str, shard: &str) {
        let (_, _, _, (lo, hi)) = self
            .shards(stream)
            .into_iter()
            .find(|s| s.0 == shard)
            .unwrap();
        self.rt
            .block_on(
                self.client
                    .split_shard()
                    .stream_name(stream)
                    .shard_to_split(shard)
                    .new_starting_hash_key(((lo + hi) / 2).to_string())
                    .send(),
            )
            .unwrap();
        self.wait_active(stream);
    }

    pub fn merge(&self, stream: &str, shard: &str, adjacent: &str) {
        self.rt
            .block_on(
                self.client
                    .merge_shards()
                    .stream_name(stream)
                    .shard_to_merge(shard)
                    .adjacent_shard_to_merge(adjacent)
                    .send(),
            )
            .unwrap();
        self.wait_active(stream);
    }

    /// Every record of every shard, each shard from its first record, in shard order.
    pub fn read_all(&self, stream: &str) -> Vec<Read> {
        let mut out = Vec::new();
        for (shard, _, _, _) in self.shards(stream) {
            self.rt.block_on(async {
                let mut iterator = self
                    .client
                    .get_shard_iterator()
                    .stream_name(stream)
                    .shard_id(&shard)
                    .shard_iterator_type(ShardIteratorType::TrimHorizon)
                    .send()
                    .await
                    .unwrap()
                    .shard_iterator()
                    .map(String::from);
                while let Some(it) = iterator {
                    let r = self
                        .client
                        .get_records()
                        .shard_iterator(it)
                        .limit(10_000)
                        .send()
                        .await
                        .unwrap();
                    for rec in r.records() {
                        out.push(Read {
                            shard: shard.clone(),
                            key: rec.partition_key().unwrap_or_default().to_string(),
                            data: rec.data().as_ref().to_vec(),
                            arrival_ms: rec
                                .approximate_arrival_timestamp()
                                .and_then(|t| t.to_millis().ok())
                                .unwrap_or(0),
                        });
                    }
                    if r.records().is_empty() && r.millis_behind_latest().unwrap_or(0) == 0 {
                        break;
                    }
                    iterator = r.next_shard_iterator().map(String::from);
                }
            });
        }
        out
    }

    /// Reads `stream` until it holds at least `want` records.
    pub fn wait_for(&self, stream: &str, want: usize, timeout: Duration) -> Vec<Read> {
        let deadline = Instant::now() + timeout;
        loop {
            let read = self.read_all(stream);
            if read.len() >= want || Instant::now() > deadline {
                return read;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Kinesis {
    /// Reads `stream` until it holds every id of `0..n` (duplicates do not count).
    pub fn wait_for_ids(&self, stream: &str, n: i64, timeout: Duration) -> Vec<Read> {
        let deadline = Instant::now() + timeout;
        loop {
            let read = self.read_all(stream);
            let out = ids(&read);
            if (0..n).all(|i| out.contains_key(&i)) || Instant::now() > deadline {
                return read;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Output rows by `id`, with how often each was written.
pub fn ids(read: &[Read]) -> BTreeMap<i64, (serde_json::Value, usize)> {
    let mut out: BTreeMap<i64, (serde_json::Value, usize)> = BTreeMap::new();
    for r in read {
        let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
        let id = v["id"].as_i64().unwrap();
        let e = out.entry(id).or_insert((v.clone(), 0));
        e.1 += 1;
    }
    out
}

/// `n` records `{"id": i, "user": "u{i % users}"}` keyed by user, from `first`.
pub fn records(first: i64, n: i64, users: i64) -> Vec<(String, Vec<u8>)> {
    (first..first + n)
        .map(|i| {
            let user = format!("u{}", i % users);
            let data = format!(r#"{{"id":{i},"user":"{user}"}}"#).into_bytes();
            (user, data)
        })
        .collect()
}

/// Writes ids `from..to` to `stream` in puts of `step`, `pause` apart, on a thread of its
/// own.
pub fn produce(
    k: &Kinesalite,
    stream: &'static str,
    (from, to): (i64, i64),
    step: i64,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let kinesis = k.client();
    std::thread::spawn(move || {
        for first in (from..to).step_by(step as usize) {
            kinesis.put(stream, &records(first, step.min(to - first), 37));
            std::thread::sleep(pause);
        }
    })
}

/// `pipeline`'s SQL stage replaced by a count per user and 2-second window of arrival.
pub fn counting(yaml: &str) -> String {
    let counted = yaml.replace(
        "  - name: shout\n    type: sql\n    query: SELECT id, upper(user) AS user, _sequence AS seq FROM input\n",
        "  - name: arrivals\n    type: sql\n    query: SELECT user, _timestamp AS t FROM input\n  \
         - name: per_user\n    type: aggregate\n    group_by: [user]\n    event_time: t\n    \
         window: { tumbling: 2s }\n    idle_timeout: 2s\n    aggregates:\n      n: count()\n",
    );
    assert!(counted.contains("per_user"), "{counted}");
    counted
}

/// Closes the windows of ids `0..n` written to `plays` (event time moves on only with
/// records: one for each user, two windows later, closes the last of the others); returns
/// the reference (records per user and 2-second window of arrival, as an independent
/// client reads the stream) and the start of the closing records' first window.
pub fn close_windows(k: &Kinesalite, n: i64) -> (BTreeMap<(String, i64), i64>, i64) {
    std::thread::sleep(Duration::from_millis(4_500));
    k.kinesis.put("plays", &records(n, 37, 37));
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut ticks = i64::MAX;
    for r in k.kinesis.read_all("plays") {
        let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
        let window = r.arrival_ms / 2000 * 2000;
        if v["id"].as_i64().unwrap() >= n {
            ticks = ticks.min(window);
            continue;
        }
        let user = v["user"].as_str().unwrap().to_string();
        *want.entry((user, window)).or_default() += 1;
    }
    assert_eq!(want.values().sum::<i64>(), n);
    assert!(want.keys().all(|(_, w)| *w < ticks));
    (want, ticks)
}

/// The counts in `counts`, by (user, window start), of windows before `ticks`, waiting
/// until `done` says they are all there (or `timeout`).
pub fn window_rows(
    k: &Kinesalite,
    ticks: i64,
    timeout: Duration,
    done: impl Fn(&BTreeMap<(String, i64), Vec<i64>>) -> bool,
) -> BTreeMap<(String, i64), Vec<i64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut got: BTreeMap<(String, i64), Vec<i64>> = BTreeMap::new();
        for r in k.kinesis.read_all("counts") {
            let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
            let start = flow::chrono_ms(v["window_start"].as_str().unwrap());
            if start < ticks {
                got.entry((v["user"].as_str().unwrap().to_string(), start))
                    .or_default()
                    .push(v["n"].as_i64().unwrap());
            }
        }
        if done(&got) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A pipeline from `input` through SQL to `output`, checkpointing into `dir`.
pub fn pipeline(k: &Kinesalite, input: &str, output: &str, dir: &std::path::Path) -> String {
    format!(
        r#"name: kinesis-test
source:
  type: kinesis
  {}
  start_from: trim_horizon
  idle_wait: 200ms
  discover_every: 1s
  schema:
    - {{name: id, type: int64}}
    - {{name: user, type: utf8}}
stages:
  - name: shout
    type: sql
    query: SELECT id, upper(user) AS user, _sequence AS seq FROM input
sink:
  type: kinesis
  {}
  partition_key: user
checkpoint:
  dir: {}
  interval: 1s
"#,
        k.yaml(input).replace("\n    ", "\n  "),
        k.yaml(output).replace("\n    ", "\n  "),
        dir.join("checkpoints").display()
    )
}
