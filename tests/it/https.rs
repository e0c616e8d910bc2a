//! The `http` function against an https endpoint (Python's http.server behind TLS, with
//! certificates made per test): every row enriched with a private authority, and a
//! certificate for another host refused with a sentence that stops the run.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::certs::Certs;

/// Answers `{"rows": [...]}` with one `{"v": user_id}` per row, over TLS.
const SERVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"results": [{"v": r["user_id"]} for r in body["rows"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

struct Server(Child);

impl Server {
    fn start(cert: &Path, key: &Path) -> (Server, u16) {
        let port = crate::free_port();
        let child = Command::new("python3")
            .args(["-c", SERVER, &port.to_string()])
            .arg(cert)
            .arg(key)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the https server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        (Server(child), port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pipeline(dir: &Path, port: u16, ca: &Path) -> std::path::PathBuf {
    let yaml = format!(
        "name: https
source: {{ type: generator, partitions: 2, count: 5000, seed: 3 }}
stages:
  - name: remote
    type: function
    function: http
    params:
      url: https://localhost:{port}/f
      tls: {{ ca: {ca} }}
      columns: [user_id]
      outputs: [{{ name: v, type: int64 }}]
      max_batch_rows: 1000
sink: {{ type: file, path: {out} }}
",
        ca = ca.display(),
        out = dir.join("out").display()
    );
    let path = dir.join("p.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn the_http_function_calls_https_with_a_private_authority() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let (_server, port) = Server::start(&certs.server_cert, &certs.server_key);
    let run = crate::sluice(&[
        "run",
        pipeline(dir.path(), port, &certs.ca).to_str().unwrap(),
    ]);
    let said = crate::text(&run.stdout) + &crate::text(&run.stderr);
    assert!(run.status.success(), "{said}");
    let rows = crate::json_lines(&dir.path().join("out"));
    assert_eq!(rows.len(), 5000, "{said}");
    assert!(
        rows.iter()
            .all(|r| r["v"] == r["user_id"] || r["user_id"].is_null())
    );
}

#[test]
fn a_certificate_for_another_host_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let (_server, port) = Server::start(&certs.wrong_host_cert, &certs.wrong_host_key);
    let started = Instant::now();
    let run = crate::sluice(&[
        "run",
        pipeline(dir.path(), port, &certs.ca).to_str().unwrap(),
    ]);
    let said = crate::text(&run.stdout) + &crate::text(&run.stderr);
    assert!(!run.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "the TLS certificate of https://localhost:{port}/f is refused"
        )),
        "{said}"
    );
    assert!(started.elapsed() < Duration::from_secs(60), "{said}");
}
