//! No secret leaves a run. A pipeline holding credentials for every kind of service it can
//! reach — a Redis password and a PostgreSQL password in their URLs, an http function's
//! basic-auth URL and bearer header, all from `${VAR}`s — runs as `sluice run` at debug
//! level against real servers that check the passwords, with one Redis that is not there
//! (its "not reachable yet" warning once wrote the URL in full) and an http endpoint that
//! is not there (every row a dead letter whose error names the endpoint). Everything the run
//! and `sluice validate` print, the log, the dead letters, the output rows and the metrics
//! are searched for the secrets. (Kafka's SASL passwords and tokens are searched for in the
//! logs of the Kafka tests, `kafka::secure`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::services::{PostgresServer, RedisServer};

const REDIS_SECRET: &str = "redis-pass-7f3a";
const PG_SECRET: &str = "pg-pass-91c2";
const SPARE_SECRET: &str = "spare-pass-0b9e";
const HTTP_SECRET: &str = "http-pass-5d21";
const TOKEN_SECRET: &str = "bearer-token-44de";

const YAML: &str = r#"name: secrets
source:
  type: generator
  partitions: 2
  count: 3000
  rate: 1000
  users: 50
  seed: 5
  batch_size: 200
  batch_window: 20ms
stages:
  - name: profile
    type: function
    function: enrich
    params:
      key: user_id
      redis: { url: "${REDIS_URL}", key_prefix: "profile:", format: hash }
      columns: [{ name: plan, type: utf8 }]
      prefix: profile_
      on_missing: default
      defaults: { plan: free }
  - name: account
    type: function
    function: enrich
    params:
      key: user_id
      postgres: { url: "${PG_URL}", table: accounts, pool_size: 1 }
      columns: [{ name: tier, type: utf8 }]
      prefix: account_
      on_missing: default
      defaults: { tier: none }
  - name: score
    type: function
    function: http
    retry: { max_attempts: 2, initial_backoff: 10ms, max_backoff: 20ms }
    params:
      url: "${HTTP_URL}"
      headers: { authorization: "Bearer ${HTTP_TOKEN}" }
      columns: [user_id]
      outputs: [{ name: score, type: int64 }]
      timeout: 2s
  - name: spare
    type: function
    function: enrich
    params:
      key: user_id
      redis: { url: "${SPARE_URL}", key_prefix: "x:", format: hash }
      columns: [{ name: x, type: utf8 }]
      on_missing: default
      defaults: { x: none }
sink: { type: file, path: OUT/rows, format: jsonl }
dead_letter: { type: file, path: OUT/dead, format: jsonl }
"#;

#[test]
fn no_output_of_a_run_with_credentials_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    let redis = RedisServer::start();
    let mut c = redis.connection();
    for user in 1..=25 {
        let () = redis::cmd("HSET")
            .arg(format!("profile:{user}"))
            .arg("plan")
            .arg("premium")
            .query(&mut c)
            .unwrap();
    }
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_SECRET)
        .query(&mut c)
        .unwrap();
    let pg = PostgresServer::start_with_passwords();
    pg.sql(&format!(
        "CREATE TABLE accounts (user_id bigint PRIMARY KEY, tier text);
         INSERT INTO accounts SELECT u, 'gold' FROM generate_series(1, 25) u;
         CREATE ROLE reader LOGIN PASSWORD '{PG_SECRET}';
         GRANT SELECT ON accounts TO reader;"
    ));
    let pg_port = pg.port;
    let nobody = crate::free_port();
    let env = [
        (
            "REDIS_URL",
            format!("redis://:{REDIS_SECRET}@127.0.0.1:{}", redis.port),
        ),
        (
            "PG_URL",
            format!("postgres://reader:{PG_SECRET}@127.0.0.1:{pg_port}/postgres"),
        ),
        (
            "SPARE_URL",
            format!("redis://:{SPARE_SECRET}@127.0.0.1:{nobody}"),
        ),
        (
            "HTTP_URL",
            format!("http://scorer:{HTTP_SECRET}@127.0.0.1:{nobody}/score"),
        ),
        ("HTTP_TOKEN", TOKEN_SECRET.to_string()),
        (
            "RUST_LOG",
            "info,sluice=debug,sluice_engine=debug,sluice_connectors=debug,sluice_udfs=debug"
                .to_string(),
        ),
    ];
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, YAML.replace("OUT", out.to_str().unwrap())).unwrap();
    let sluice = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        command
    };

    let validate = sluice(&["validate", file.to_str().unwrap()])
        .output()
        .unwrap();
    let validate = format!(
        "{}{}",
        crate::text(&validate.stdout),
        crate::text(&validate.stderr)
    );

    let port = crate::free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = sluice(&[
        "run",
        "--metrics-addr",
        &port.to_string(),
        file.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The last metrics page served while the run goes on.
    let mut metrics = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = child.id();
    while Instant::now() < deadline && std::path::Path::new(&format!("/proc/{pid}/stat")).exists() {
        if let Some(page) = crate::scrape(&addr) {
            let page: Vec<String> = page
                .iter()
                .map(|(name, labels, value)| format!("{name} {labels:?} {value}"))
                .collect();
            if page
                .iter()
                .any(|l| l.contains("sluice_stage_rows_in_total"))
            {
                metrics = page.join("\n");
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        if read(&out.join("dead")).lines().count() >= 3000 {
            break;
        }
    }
    let run = child.wait_with_output().unwrap();
    let log = format!("{}{}", crate::text(&run.stdout), crate::text(&run.stderr));
    assert!(run.status.success(), "{log}");
    assert!(!metrics.is_empty(), "metrics were served: {log}");

    // The run did use the credentials: rows were enriched from the password-protected
    // servers before the http stage failed them, so their dead letters hold the values.
    let dead = read(&out.join("dead"));
    assert_eq!(
        dead.lines().count(),
        3000,
        "every row a dead letter at `score`"
    );
    assert!(
        dead.contains("premium") && dead.contains("gold"),
        "{}",
        &dead[..500]
    );
    assert!(dead.contains("127.0.0.1"), "the error names the endpoint");
    // The warning of the Redis that is not there, the one that once showed its password.
    assert!(log.contains("not reachable yet"), "{log}");

    let rows = read(&out.join("rows"));
    for (what, text) in [
        ("sluice validate", &validate),
        ("the run's output and log", &log),
        ("the dead letters", &dead),
        ("the rows", &rows),
        ("the metrics", &metrics),
    ] {
        for secret in [
            REDIS_SECRET,
            PG_SECRET,
            SPARE_SECRET,
            HTTP_SECRET,
            TOKEN_SECRET,
        ] {
            let shown: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                shown.is_empty(),
                "{what} show the secret `{secret}` ({} lines), first: {}",
                shown.len(),
                shown[0]
            );
        }
    }
}

/// Every file under `path`, one after the other.
fn read(path: &std::path::Path) -> String {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::read_to_string(path).unwrap_or_default();
    };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.iter().map(|p| read(p)).collect()
}
