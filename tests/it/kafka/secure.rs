//! Secured Kafka: the test broker behind TLS (stunnel in front of tansu, with certificates
//! made per test by `openssl`), and with client authentication required.
//!
//! tansu keeps its users in its storage, and with the in-memory storage the tests use, a
//! broker that requires authentication cannot be given a user (creating one needs an
//! authenticated connection). So a refused SCRAM login is tested against tansu itself, and
//! a login that succeeds through `sasl_proxy.py`, a SASL/PLAIN front that checks one user
//! and password and then pipes the connection to tansu.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Broker, Sluice, write_pipeline};
use crate::certs::Certs;

/// tansu on a loopback port, reached through stunnel's TLS port, which it advertises.
struct SecureBroker {
    broker: Broker,
    processes: Vec<Child>,
}

impl SecureBroker {
    fn start(dir: &Path, certs: &Certs, authentication: bool) -> SecureBroker {
        Self::start_with(dir, certs, authentication, None)
    }

    /// With `plain_login` (user, password): a SASL/PLAIN front (`sasl_proxy.py`) between
    /// stunnel and tansu checks that login, as a broker with users would.
    fn start_with(
        dir: &Path,
        certs: &Certs,
        authentication: bool,
        plain_login: Option<(&str, &str)>,
    ) -> SecureBroker {
        let (plain, tls) = (crate::free_port(), crate::free_port());
        let mut tansu = Command::new(super::broker::tansu_binary());
        tansu.args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{plain}"),
            "--advertised-listener-url",
            &format!("tcp://localhost:{tls}"),
            "--storage-engine",
            "memory://tansu/",
        ]);
        if authentication {
            tansu.arg("--authentication");
        }
        let tansu = tansu
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let mut processes = vec![tansu];
        let mut behind_tls = plain;
        if let Some((user, password)) = plain_login {
            behind_tls = crate::free_port();
            let proxy = Command::new("python3")
                .args(["-c", include_str!("sasl_proxy.py")])
                .args([&behind_tls.to_string(), &plain.to_string(), user, password])
                .stdout(Stdio::null())
                .spawn()
                .expect("python3 runs");
            processes.push(proxy);
        }
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{behind_tls}\ncert = {}\nkey = {}\n",
                certs.server_cert.display(),
                certs.server_key.display()
            ),
        )
        .unwrap();
        let stunnel = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start stunnel4 (make test installs it)");
        processes.push(stunnel);
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [plain, behind_tls, tls] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "nothing listens on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut broker = Broker::with_bootstrap(&format!("localhost:{tls}"));
        broker.security = vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), certs.ca.display().to_string()),
        ];
        if let Some((user, password)) = plain_login {
            broker.security = vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("ssl.ca.location".into(), certs.ca.display().to_string()),
                ("sasl.mechanisms".into(), "PLAIN".into()),
                ("sasl.username".into(), user.into()),
                ("sasl.password".into(), password.into()),
            ];
        }
        SecureBroker { broker, processes }
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn pipeline(bootstrap: &str, security: &str, dir: &Path) -> String {
    format!(
        r#"name: secure
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [in]
  group: secure
  start_from: earliest
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: country, type: utf8 }}
{security}
stages:
  - name: shape
    type: sql
    query: SELECT id, upper(country) AS country FROM input
sink:
  type: kafka
  bootstrap_servers: {bootstrap}
  topic: out
{security}
checkpoint:
  dir: {ckpt}
  interval: 500ms
"#,
        ckpt = dir.join("ckpt").display()
    )
}

/// Kafka → SQL → Kafka with the brokers reached over TLS only: 10,000 records round trip.
#[test]
fn records_round_trip_over_tls() {
    round_trip(None);
}

/// The same over TLS with a SASL/PLAIN login (the password from the environment), which
/// appears in no output of the run.
#[test]
fn records_round_trip_over_tls_with_a_sasl_login() {
    round_trip(Some(("sluice", "s3cret-for-the-test")));
}

fn round_trip(login: Option<(&str, &str)>) {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let secure = SecureBroker::start_with(dir.path(), &certs, false, login);
    let broker = &secure.broker;
    broker.create_topic("in", 2);
    broker.create_topic("out", 2);
    let messages: Vec<_> = (0..N)
        .map(|i| {
            (
                (i % 2) as i32,
                None,
                format!(r#"{{"id":{i},"country":"fr"}}"#).into_bytes(),
            )
        })
        .collect();
    broker.produce("in", &messages);
    let mut security = format!("  tls: {{ ca: {} }}", certs.ca.display());
    if let Some((user, _)) = login {
        security.push_str(&format!(
            "\n  sasl: {{ mechanism: PLAIN, username: {user}, password: \"${{KAFKA_PASSWORD}}\" }}"
        ));
    }
    let yaml = pipeline(&broker.bootstrap, &security, dir.path());
    let password = login.map_or("", |(_, p)| p);
    let sluice = Sluice::start_with(
        &write_pipeline(dir.path(), &yaml),
        dir.path().join("log"),
        &[("KAFKA_PASSWORD", password)],
    );
    let out = broker.read_all("out", N, Duration::from_secs(120));
    assert_eq!(out.len(), N, "{}", sluice.log_text());
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    if let Some((_, password)) = login {
        assert!(!log.contains(password), "the password is not shown:\n{log}");
    }
    let ids: std::collections::HashSet<i64> = out
        .iter()
        .map(|m| serde_json::from_str::<serde_json::Value>(m).unwrap())
        .inspect(|v| assert_eq!(v["country"], "FR"))
        .map(|v| v["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), N, "every record, once");
}

/// Runs `yaml` until it stops; it must stop by itself within a minute.
fn stops(dir: &Path, yaml: &str) -> String {
    let mut sluice = Sluice::start(&write_pipeline(dir, yaml), dir.join("log"));
    let status = sluice.wait(Duration::from_secs(60));
    let log = sluice.log_text();
    assert!(!status.success(), "{log}");
    log
}

/// A broker certificate signed by an authority the pipeline does not trust stops the run
/// with a sentence that says so (librdkafka alone would retry for ever).
#[test]
fn an_untrusted_broker_certificate_stops_the_run_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let secure = SecureBroker::start(dir.path(), &certs, false);
    let security = format!("  tls: {{ ca: {} }}", certs.other_ca.display());
    let log = stops(
        dir.path(),
        &pipeline(&secure.broker.bootstrap, &security, dir.path()),
    );
    assert!(
        log.contains(&format!(
            "the certificate of the Kafka broker at {} is not trusted",
            secure.broker.bootstrap
        )),
        "{log}"
    );
    assert!(log.contains("tls.ca"), "{log}");
}

/// A broker that refuses the login stops the run with a sentence naming the broker, the
/// mechanism and the user, and the password appears nowhere in what the run wrote.
#[test]
fn a_refused_login_stops_the_run_without_showing_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let secure = SecureBroker::start(dir.path(), &certs, true);
    let security = format!(
        "  tls: {{ ca: {} }}\n  sasl: {{ mechanism: SCRAM-SHA-512, username: sluice, password: \"${{KAFKA_PASSWORD}}\" }}",
        certs.ca.display()
    );
    let yaml = pipeline(&secure.broker.bootstrap, &security, dir.path());
    let path = write_pipeline(dir.path(), &yaml);
    let mut sluice = Sluice::start_with(
        &path,
        dir.path().join("log"),
        &[("KAFKA_PASSWORD", "hunter2-not-this")],
    );
    let status = sluice.wait(Duration::from_secs(60));
    let log = sluice.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "the Kafka broker at {} refused the SASL SCRAM-SHA-512 login of `sluice`",
            secure.broker.bootstrap
        )),
        "{log}"
    );
    assert!(
        !log.contains("hunter2"),
        "the password is not shown:\n{log}"
    );
    let validated = crate::sluice(&["validate", path.to_str().unwrap()]);
    let said = crate::text(&validated.stdout) + &crate::text(&validated.stderr);
    assert!(!said.contains("hunter2"), "{said}");
}

/// Contradictions in `tls:`/`sasl:` are refused where they are written, all at once.
#[test]
fn tls_and_sasl_mistakes_are_located() {
    let yaml = "name: x
source:
  type: kafka
  bootstrap_servers: localhost:9093
  topics: [in]
  group: g
  schema: [{ name: id, type: int64 }]
  tls: { ca: /nonexistent/ca.pem, cert: /nonexistent/c.pem }
  sasl: { mechanism: SCRAM-SHA-1, username: u }
  options: { security.protocol: SSL }
sink: { type: stdout }
";
    let problems = crate::parse(yaml, &[]).map(|_| ()).unwrap_err();
    for expected in [
        "source.tls.ca: `/nonexistent/ca.pem` is not a file (a PEM file is expected) (x.yaml:8:14)",
        "source.tls.cert: give `key` with `cert`: a client certificate needs its private key (x.yaml:8:41)",
        "source.sasl.mechanism: `SCRAM-SHA-1` is not a SASL mechanism Sluice speaks; use one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (x.yaml:9:22)",
        "source.sasl.password: SCRAM-SHA-1 needs a `password`",
        "source.options: `security.protocol` is set by `tls:`/`sasl:`: set it in one place",
    ] {
        assert!(problems.contains(expected), "{expected}\n{problems}");
    }
}
