//! Sluice's integration tests: one binary, one module per area (linking DataFusion per
//! test file would cost minutes).

mod aggregate;
mod certs;
mod checkpoint;
mod cli;
mod config_errors;
mod examples;
mod executor;
mod failures;
mod golden;
mod graph;
mod hostile;
mod https;
mod kafka;
mod kinesis;
mod lookups;
mod nexmark;
mod observe;
mod pipelines;
mod secrets;
mod services;
mod sources;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sluice::config::{self, PipelineConfig};

/// The repository root (tests run with it as the working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `sluice` binary built with this test binary.
pub fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run sluice")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses pipeline text with the given variables as its whole environment.
pub fn parse(yaml: &str, vars: &[(&str, &str)]) -> Result<PipelineConfig, String> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config::parse("x.yaml", yaml, &env).map_err(|p| p.to_string())
}

/// Every whole line of every file in `dir`, files in name order.
pub fn read_lines(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            // A file being written may end inside a line (a test polling a running sink):
            // only whole lines count.
            let whole = match text.rfind('\n') {
                Some(end) => &text[..=end],
                None => "",
            };
            whole.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

/// Every line of every file in `dir` as JSON; none when `dir` was never made.
pub fn json_lines(dir: &Path) -> Vec<serde_json::Value> {
    if !dir.exists() {
        return Vec::new();
    }
    read_lines(dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Parses and runs pipeline text in-process; the error is the message `sluice run` prints.
pub async fn run_yaml(
    yaml: &str,
    vars: &[(&str, &str)],
) -> Result<
    (
        std::sync::Arc<sluice_engine::stats::RunStats>,
        sluice_engine::executor::RunReport,
    ),
    String,
> {
    let config = parse(yaml, vars)?;
    sluice::run_config(
        &config,
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .map_err(|e| e.to_string())
}

/// A remote function on loopback (the `http` stage's protocol) that is deliberately slow:
/// every request waits `delay`, and all of them wait while the function is held. Answers
/// `{"ok": true}` per row.
pub struct SlowFunction {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Requests waiting at the hold.
    pub waiting: std::sync::Arc<std::sync::atomic::AtomicU64>,
    held: tokio::sync::watch::Sender<bool>,
    _runtime: tokio::runtime::Runtime,
}

impl SlowFunction {
    pub fn start(delay: std::time::Duration) -> SlowFunction {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/f", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU64::new(0));
        let waiting = Arc::new(AtomicU64::new(0));
        let (held, hold) = tokio::sync::watch::channel(false);
        let (r, w) = (requests.clone(), waiting.clone());
        let handler = move |axum::Json(body): axum::Json<serde_json::Value>| {
            let (r, w, mut hold) = (r.clone(), w.clone(), hold.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                if *hold.borrow_and_update() {
                    w.fetch_add(1, Ordering::SeqCst);
                    let _ = hold.wait_for(|held| !held).await;
                    w.fetch_sub(1, Ordering::SeqCst);
                }
                tokio::time::sleep(delay).await;
                let n = body["rows"].as_array().map_or(0, Vec::len);
                let results = vec![serde_json::json!({ "ok": true }); n];
                axum::Json(serde_json::json!({ "results": results }))
            }
        };
        let app = axum::Router::new().route("/f", axum::routing::post(handler));
        runtime.spawn(async move { axum::serve(listener, app).await });
        SlowFunction {
            url,
            requests,
            waiting,
            held,
            _runtime: runtime,
        }
    }

    /// Requests from now on wait until [`SlowFunction::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// The stage calling it, in a pipeline's `stages:` list.
    pub fn stage_yaml(&self, columns: &str) -> String {
        format!(
            "  - name: slow\n    type: function\n    function: http\n    params:\n      url: {}\n      columns: [{columns}]\n      outputs:\n        - {{ name: ok, type: boolean }}\n      max_batch_rows: 100000\n      concurrency: 64\n      timeout: 120s\n",
            self.url
        )
    }
}

/// Prometheus samples: (name, labels, value).
pub type Samples = Vec<(String, HashMap<String, String>, f64)>;

/// Prometheus text: every sample as (name, labels, value).
pub fn parse_prometheus(text: &str) -> Samples {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{e}: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("labels end with }");
                let labels = rest
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), HashMap::new()),
        };
        samples.push((name, labels, value));
    }
    samples
}

/// Scrapes `http://addr/metrics`; `None` while nothing answers.
pub fn scrape(addr: &str) -> Option<Samples> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some(parse_prometheus(&body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
