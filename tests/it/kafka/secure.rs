//! Secured Kafka: the test broker behind TLS (stunnel in front of tansu, with certificates
//! made per test by `openssl`), and with client authentication required.
//!
//! tansu keeps its users in its storage, and with the in-memory storage the tests use, a
//! broker that requires authentication cannot be given a user (creating one needs an
//! authenticated connection). So a refused SCRAM login is tested against tansu itself, and
//! logins that succeed through `sasl_proxy.py`, a SASL front between stunnel and tansu that
//! checks the login itself and then pipes the connection to tansu: PLAIN, SCRAM-SHA-256 and
//! SCRAM-SHA-512 (RFC 5802) with one user and password, and AWS MSK IAM (OAUTHBEARER with a
//! SigV4-presigned URL, which the proxy verifies against one set of made-up AWS keys; no
//! AWS is reached). Every round trip is 10,000 records Kafka → SQL → Kafka, and no password,
//! secret key or token appears in what the run wrote.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Broker, Sluice, write_pipeline};
use crate::certs::Certs;

const USER: &str = "sluice";
const PASSWORD: &str = "s3cret-for-the-test";
/// Made-up AWS keys: the proxy checks MSK IAM logins against them.
const AWS: AwsKeys = AwsKeys {
    access_key_id: "AKIDSLUICETEST",
    secret_access_key: "sluice/Test+Secret0KEY/for-the-msk-iam-test",
    region: "us-east-1",
};
/// A secret key the proxy does not know.
const WRONG_AWS_SECRET: &str = "not/The+Secret0KEY/of-AKIDSLUICETEST";
/// The start of every MSK IAM token: base64url of `https://kafka`.
const TOKEN_START: &str = "aHR0cHM6Ly9rYWZrYS";

/// The logins `sasl_proxy.py` accepts in front of tansu.
#[derive(Clone, Copy)]
struct Logins<'a> {
    /// PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 logins of this user with this password (the
    /// test's own clients log in with PLAIN).
    user: &'a str,
    password: &'a str,
    /// AWS MSK IAM logins (OAUTHBEARER) signed with these keys.
    aws: Option<AwsKeys<'a>>,
}

#[derive(Clone, Copy)]
struct AwsKeys<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    region: &'a str,
}

/// tansu on a loopback port, reached through stunnel's TLS port, which it advertises.
struct SecureBroker {
    broker: Broker,
    processes: Vec<Child>,
    /// What `sasl_proxy.py` said: one line per login attempt.
    proxy_log: Option<PathBuf>,
}

impl SecureBroker {
    fn start(dir: &Path, certs: &Certs, authentication: bool) -> SecureBroker {
        Self::start_with(dir, certs, authentication, None)
    }

    /// With `logins`: a SASL front (`sasl_proxy.py`) between stunnel and tansu checks
    /// those, as a broker with users would.
    fn start_with(
        dir: &Path,
        certs: &Certs,
        authentication: bool,
        logins: Option<Logins>,
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
        let mut proxy_log = None;
        if let Some(logins) = logins {
            behind_tls = crate::free_port();
            let log = dir.join("sasl_proxy.log");
            let mut proxy = Command::new("python3");
            proxy
                .args(["-c", include_str!("sasl_proxy.py")])
                .args([&behind_tls.to_string(), &plain.to_string()])
                .args([logins.user, logins.password]);
            if let Some(aws) = logins.aws {
                proxy.args([aws.access_key_id, aws.secret_access_key, aws.region]);
            }
            let proxy = proxy
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("python3 runs");
            processes.push(proxy);
            proxy_log = Some(log);
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
        if let Some(logins) = logins {
            broker.security = vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("ssl.ca.location".into(), certs.ca.display().to_string()),
                ("sasl.mechanisms".into(), "PLAIN".into()),
                ("sasl.username".into(), logins.user.into()),
                ("sasl.password".into(), logins.password.into()),
            ];
        }
        SecureBroker {
            broker,
            processes,
            proxy_log,
        }
    }

    /// The proxy's lines so far (empty without a proxy).
    fn proxy_log(&self) -> String {
        self.proxy_log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
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

/// How the pipeline logs in.
#[derive(Clone, Copy)]
enum Login {
    /// TLS only, no `sasl:`.
    Anonymous,
    /// `mechanism` with USER and PASSWORD, the password from the environment.
    Password(&'static str),
    /// AWS_MSK_IAM with the access key id of AWS and `secret`, from the environment only.
    AwsMskIam { secret: &'static str },
}

impl Login {
    /// The pipeline's `tls:` (trusting `ca`) and `sasl:` lines.
    fn security(self, ca: &Path) -> String {
        let tls = format!("  tls: {{ ca: {} }}", ca.display());
        match self {
            Login::Anonymous => tls,
            Login::Password(mechanism) => format!(
                "{tls}\n  sasl: {{ mechanism: {mechanism}, username: {USER}, password: \"${{KAFKA_PASSWORD}}\" }}"
            ),
            Login::AwsMskIam { .. } => format!(
                "{tls}\n  sasl: {{ mechanism: AWS_MSK_IAM, region: {} }}",
                AWS.region
            ),
        }
    }

    /// The environment Sluice runs with. For AWS, only these keys: no profile, no
    /// instance metadata, so that no real AWS account is consulted.
    fn env(self, dir: &Path) -> Vec<(String, String)> {
        let nowhere = |name: &str| dir.join(name).display().to_string();
        let vars = match self {
            Login::Anonymous => vec![],
            Login::Password(_) => vec![("KAFKA_PASSWORD", PASSWORD.to_string())],
            Login::AwsMskIam { secret } => vec![
                ("AWS_ACCESS_KEY_ID", AWS.access_key_id.to_string()),
                ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
                ("AWS_CONFIG_FILE", nowhere("no-aws-config")),
                ("AWS_SHARED_CREDENTIALS_FILE", nowhere("no-aws-credentials")),
                ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ],
        };
        vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The logins the SASL front accepts for this one (none: no front).
    fn front(self) -> Option<Logins<'static>> {
        let password = Logins {
            user: USER,
            password: PASSWORD,
            aws: None,
        };
        match self {
            Login::Anonymous => None,
            Login::Password(_) => Some(password),
            Login::AwsMskIam { .. } => Some(Logins {
                aws: Some(AWS),
                ..password
            }),
        }
    }

    /// What the proxy says of a successful login of the pipeline.
    fn accepted(self) -> Option<String> {
        match self {
            Login::Anonymous => None,
            Login::Password(mechanism) => Some(format!("{mechanism} login of {USER}: ok")),
            Login::AwsMskIam { .. } => {
                Some(format!("OAUTHBEARER login of {}: ok", AWS.access_key_id))
            }
        }
    }
}

/// Starts Sluice on `yaml` with `login`'s environment.
fn run(dir: &Path, yaml: &str, login: Login) -> Sluice {
    let env = login.env(dir);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Sluice::start_with(&write_pipeline(dir, yaml), dir.join("log"), &env)
}

/// Asserts that no password, secret key or token is in `text`.
fn shows_no_secret(text: &str) {
    for secret in [PASSWORD, AWS.secret_access_key, WRONG_AWS_SECRET] {
        assert!(!text.contains(secret), "a secret is shown:\n{text}");
    }
    for token in [TOKEN_START, "X-Amz-Signature", "Bearer "] {
        assert!(!text.contains(token), "a token is shown:\n{text}");
    }
}

/// Kafka → SQL → Kafka with the brokers reached over TLS only: 10,000 records round trip.
#[test]
fn records_round_trip_over_tls() {
    round_trip(Login::Anonymous);
}

/// The same over TLS with a SASL/PLAIN login (the password from the environment), which
/// appears in no output of the run.
#[test]
fn records_round_trip_over_tls_with_a_sasl_login() {
    round_trip(Login::Password("PLAIN"));
}

/// The same with a SCRAM-SHA-256 login: the password never crosses the wire.
#[test]
fn records_round_trip_over_tls_with_a_scram_sha_256_login() {
    round_trip(Login::Password("SCRAM-SHA-256"));
}

/// The same with a SCRAM-SHA-512 login.
#[test]
fn records_round_trip_over_tls_with_a_scram_sha_512_login() {
    round_trip(Login::Password("SCRAM-SHA-512"));
}

/// The same with an AWS MSK IAM login: keys from the environment, a SigV4-presigned token
/// that the front verifies; neither the secret key nor the token is shown.
#[test]
fn records_round_trip_with_aws_msk_iam() {
    round_trip(Login::AwsMskIam {
        secret: AWS.secret_access_key,
    });
}

fn round_trip(login: Login) {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let secure = SecureBroker::start_with(dir.path(), &certs, false, login.front());
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
    let yaml = pipeline(&broker.bootstrap, &login.security(&certs.ca), dir.path());
    let mut sluice = run(dir.path(), &yaml, login);
    // A run that stops (a refused login) fails here, not after the wait for records.
    super::wait_assigned(&mut sluice, Duration::from_secs(60));
    let out = broker.read_all("out", N, Duration::from_secs(120));
    assert_eq!(out.len(), N, "{}", sluice.log_text());
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    shows_no_secret(&log);
    let proxy = secure.proxy_log();
    shows_no_secret(&proxy);
    if let Some(accepted) = login.accepted() {
        assert!(proxy.contains(&accepted), "{accepted}:\n{proxy}");
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

/// AWS keys the broker does not accept (a secret key other than the one it knows) stop the
/// run with a sentence naming the broker and the mechanism, and neither secret key nor the
/// token appears in what the run wrote.
#[test]
fn a_refused_aws_msk_iam_login_stops_the_run_without_showing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let login = Login::AwsMskIam {
        secret: WRONG_AWS_SECRET,
    };
    let secure = SecureBroker::start_with(dir.path(), &certs, false, login.front());
    let bootstrap = &secure.broker.bootstrap;
    let yaml = pipeline(bootstrap, &login.security(&certs.ca), dir.path());
    let mut sluice = run(dir.path(), &yaml, login);
    let status = sluice.wait(Duration::from_secs(60));
    let log = sluice.log_text();
    assert!(!status.success(), "{log}");
    let refused = format!("the Kafka broker at {bootstrap} refused");
    assert!(
        log.lines()
            .any(|line| line.contains(&refused) && line.contains("AWS_MSK_IAM")),
        "{refused} … AWS_MSK_IAM:\n{log}"
    );
    shows_no_secret(&log);
    let proxy = secure.proxy_log();
    shows_no_secret(&proxy);
    let why = format!(
        "OAUTHBEARER login of {}: failed: the signature does not match",
        AWS.access_key_id
    );
    assert!(proxy.contains(&why), "{why}:\n{proxy}");
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
        "source.sasl.mechanism: `SCRAM-SHA-1` is not a SASL mechanism Sluice speaks; use one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, AWS_MSK_IAM (x.yaml:9:22)",
        "source.sasl.password: SCRAM-SHA-1 needs a `password`",
        "source.options: `security.protocol` is set by `tls:`/`sasl:`: set it in one place",
    ] {
        assert!(problems.contains(expected), "{expected}\n{problems}");
    }
}

#[test]
fn aws_msk_iam_mistakes_are_located() {
    let yaml = "name: x
source:
  type: kafka
  bootstrap_servers: localhost:9098
  topics: [in]
  group: g
  schema: [{ name: id, type: int64 }]
  tls: {}
  sasl: { mechanism: AWS_MSK_IAM, username: u, password: p }
sink:
  type: kafka
  bootstrap_servers: localhost:9096
  topic: out
  sasl: { mechanism: PLAIN, username: u, password: p, region: eu-west-1 }
";
    let problems = crate::parse(yaml, &[]).map(|_| ()).unwrap_err();
    for expected in [
        "source.sasl.username: AWS_MSK_IAM signs with the AWS credentials of the process \
         (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance or task role): remove `username` (x.yaml:9:",
        "source.sasl.password: AWS_MSK_IAM signs with",
        "sink.sasl.region: `region` is for AWS_MSK_IAM, not PLAIN (x.yaml:14:",
    ] {
        assert!(problems.contains(expected), "{expected}\n{problems}");
    }
}
