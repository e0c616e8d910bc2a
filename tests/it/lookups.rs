//! `enrich` against real Redis and PostgreSQL servers: correct values, cache hits counted,
//! missing keys handled per policy, a server restart in the middle of a run survived, a key
//! of the wrong type failing its own rows, and refused credentials stopping the run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_engine::stats::RunStats;

use crate::services::{PostgresServer, RedisServer};
use crate::{json_lines, run_yaml};

/// Users 1..=1000 appear in the events; those divisible by 5 have no profile.
const USERS: i64 = 1000;

fn has_profile(user: i64) -> bool {
    user % 5 != 0
}

fn plan_of(user: i64) -> &'static str {
    ["basic", "standard", "premium"][(user % 3) as usize]
}

/// A generator pipeline with one `enrich` stage; `lookup` is the stage's lookup and policy.
fn pipeline(out: &std::path::Path, count: u64, rate: Option<u32>, lookup: &str) -> String {
    let rate = rate.map(|r| format!("rate: {r}")).unwrap_or_default();
    format!(
        "
name: lookups
source:
  type: generator
  partitions: 2
  count: {count}
  {rate}
  users: {USERS}
  titles: 100
  seed: 5
  batch_size: 500
  batch_window: 20ms
stages:
  - name: profile
    type: function
    function: enrich
    retry: {{ max_attempts: 100, initial_backoff: 50ms, max_backoff: 500ms }}
    params:
      key: user_id
{lookup}
sink:
  type: file
  path: {out}/rows
  format: jsonl
dead_letter:
  type: file
  path: {out}/dead
  format: jsonl
",
        out = out.display()
    )
}

fn load_redis(redis: &RedisServer, json: bool) {
    let mut c = redis.connection();
    let mut pipe = redis::pipe();
    for user in (1..=USERS).filter(|u| has_profile(*u)) {
        if json {
            let value = format!(
                r#"{{"plan": "{}", "age": {}}}"#,
                plan_of(user),
                20 + user % 50
            );
            pipe.cmd("SET")
                .arg(format!("profile:{user}"))
                .arg(value)
                .ignore();
        } else {
            pipe.cmd("HSET")
                .arg(format!("profile:{user}"))
                .arg("plan")
                .arg(plan_of(user))
                .arg("age")
                .arg(20 + user % 50)
                .ignore();
        }
    }
    let () = pipe.query(&mut c).unwrap();
}

/// The one user whose stored profile is broken (in the hash test).
const BROKEN: i64 = 7;

/// Every row has its user's profile, or the policy's answer for users without one.
fn check_enriched(rows: &[serde_json::Value], defaults: bool) {
    for row in rows {
        let user = row["user_id"].as_i64().unwrap();
        if has_profile(user) {
            assert_eq!(row["profile_plan"], plan_of(user), "{row}");
            assert_eq!(row["profile_age"], 20 + user % 50, "{row}");
        } else if defaults {
            assert_eq!(row["profile_plan"], "free", "{row}");
            assert!(row["profile_age"].is_null(), "{row}");
        } else {
            panic!("user {user} has no profile and should have failed: {row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hashes_enrich_every_row_and_the_cache_answers_repeats() {
    let redis = RedisServer::start();
    load_redis(&redis, false);
    let () = redis::cmd("HSET")
        .arg(format!("profile:{BROKEN}"))
        .arg("age")
        .arg("seven")
        .query(&mut redis.connection())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lookup = format!(
        "      redis: {{ url: \"{}\", key_prefix: \"profile:\" }}
      columns:
        - {{ name: plan, type: utf8 }}
        - {{ name: age, type: int64 }}
      prefix: profile_
      on_missing: default
      defaults: {{ plan: free }}",
        redis.url()
    );
    let (stats, _) = run_yaml(&pipeline(dir.path(), 20_000, None, &lookup), &[])
        .await
        .unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    let dead = json_lines(&dir.path().join("dead"));
    assert_eq!(rows.len() + dead.len(), 20_000);
    // The broken profile fails its user's rows alone, with the reason.
    assert!(!dead.is_empty());
    for letter in &dead {
        let payload: serde_json::Value =
            serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["user_id"], BROKEN, "{letter}");
        assert!(
            letter["error"]
                .as_str()
                .unwrap()
                .contains("field `age` is not Int64"),
            "{letter}"
        );
    }
    check_enriched(&rows, true);
    assert!(rows.iter().any(|r| r["profile_plan"] == "free"));
    let stage = &stats.stages[0];
    let (hits, misses) = (
        RunStats::get(&stage.cache_hits),
        RunStats::get(&stage.cache_misses),
    );
    // The broken key is asked again each time (an unreadable value is not cached).
    assert_eq!(hits + misses, 20_000);
    // Each user is fetched once (twice at most when two workers ask at the same moment).
    assert!(
        misses <= 2 * USERS as u64,
        "{misses} misses for {USERS} users"
    );
    assert!(hits >= 20_000 - 2 * USERS as u64, "{hits} hits");
}

/// The `enrich` parameters of a lookup at `url` (`format` `hash` or `json`) with defaults
/// for missing users.
fn redis_lookup(url: &str, format: &str) -> String {
    format!(
        "      redis: {{ url: \"{url}\", key_prefix: \"profile:\", format: {format} }}
      columns:
        - {{ name: plan, type: utf8 }}
        - {{ name: age, type: int64 }}
      prefix: profile_
      on_missing: default
      defaults: {{ plan: free }}"
    )
}

/// A pipeline that gives up after 3 attempts: an error wrongly taken for transient shows
/// as retries and transient dead letters, not as a test that runs for minutes.
fn few_attempts(yaml: String) -> String {
    let few = yaml.replace("max_attempts: 100", "max_attempts: 3");
    assert_ne!(few, yaml);
    few
}

/// A key of the other type than `format` reads: its rows are dead letters, for good, naming
/// the key and WRONGTYPE; every other row is enriched.
async fn wrong_type_fails_its_own_rows(format: &str) {
    let redis = RedisServer::start();
    let json = format == "json";
    load_redis(&redis, json);
    // A string where a hash is expected (HGETALL), a hash where JSON text is (GET).
    let key = format!("profile:{BROKEN}");
    let mut c = redis.connection();
    let _: redis::Value = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
    let mut wrong = redis::cmd(if json { "HSET" } else { "SET" });
    wrong.arg(&key);
    if json {
        wrong.arg("plan");
    }
    let _: redis::Value = wrong.arg("premium").query(&mut c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = few_attempts(pipeline(
        dir.path(),
        5_000,
        None,
        &redis_lookup(&redis.url(), format),
    ));
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    let dead = json_lines(&dir.path().join("dead"));
    assert_eq!(rows.len() + dead.len(), 5_000);
    assert!(!dead.is_empty());
    for letter in &dead {
        let payload: serde_json::Value =
            serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["user_id"], BROKEN, "{letter}");
        assert_eq!(letter["error_class"], "permanent", "{letter}");
        assert_eq!(letter["attempts"], 1, "{letter}");
        let error = letter["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("`profile:{BROKEN}`")) && error.contains("WRONGTYPE"),
            "{error}"
        );
    }
    // Every other user is enriched, none retried.
    check_enriched(&rows, true);
    assert_eq!(RunStats::get(&stats.stages[0].retries), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_key_of_the_wrong_type_fails_its_own_rows_for_good() {
    wrong_type_fails_its_own_rows("hash").await;
    wrong_type_fails_its_own_rows("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_the_credentials_stops_the_run_without_showing_them() {
    let redis = RedisServer::start();
    load_redis(&redis, false);
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-secret")
        .query(&mut redis.connection())
        .unwrap();
    let port = redis.port;
    // A wrong password is refused when the stage connects; no password at all is refused
    // (NOAUTH) at the first lookup.
    let cases = [
        (
            format!("redis://:wrong-secret@127.0.0.1:{port}"),
            format!("redis://:***@127.0.0.1:{port}"),
        ),
        (redis.url(), "NOAUTH".to_string()),
    ];
    for (url, said) in cases {
        let dir = tempfile::tempdir().unwrap();
        let yaml = few_attempts(pipeline(
            dir.path(),
            5_000,
            None,
            &redis_lookup(&url, "hash"),
        ));
        let started = Instant::now();
        let error = run_yaml(&yaml, &[]).await.map(|_| ()).unwrap_err();
        assert!(
            error.contains("refused") && error.contains(&said),
            "{url}: {error}"
        );
        assert!(error.contains("the run stops"), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{url}: stopped only after {:?}",
            started.elapsed()
        );
        // No row is a dead letter: none could succeed, and all are read again after the fix.
        let dead = json_lines(&dir.path().join("dead"));
        assert!(dead.is_empty(), "{url}: {} dead letters", dead.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_refusing_the_user_stops_the_run() {
    let pg = PostgresServer::start();
    pg.sql(
        "CREATE TABLE profiles (user_id bigint PRIMARY KEY, plan text);
         INSERT INTO profiles SELECT u, 'basic' FROM generate_series(1, 100) u;
         CREATE ROLE reader LOGIN;",
    );
    let port = pg.port;
    // A user without the privilege to read the table, and one that does not exist.
    let cases = [
        (
            format!("postgres://reader@127.0.0.1:{port}/postgres"),
            "42501",
        ),
        (
            format!("postgres://nobody@127.0.0.1:{port}/postgres"),
            "28000",
        ),
    ];
    for (url, code) in cases {
        let dir = tempfile::tempdir().unwrap();
        let lookup = format!(
            "      postgres: {{ url: \"{url}\", table: profiles, pool_size: 1 }}
      columns:
        - {{ name: plan, type: utf8 }}
      prefix: profile_"
        );
        let started = Instant::now();
        let error = run_yaml(
            &few_attempts(pipeline(dir.path(), 2_000, None, &lookup)),
            &[],
        )
        .await
        .map(|_| ())
        .unwrap_err();
        assert!(
            error.contains("PostgreSQL refused the lookups") && error.contains(code),
            "{url}: {error}"
        );
        assert!(error.contains("the run stops"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(20), "{url}");
        let dead = json_lines(&dir.path().join("dead"));
        assert!(dead.is_empty(), "{url}: {} dead letters", dead.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_enrich_and_missing_keys_go_to_the_dead_letters() {
    let pg = PostgresServer::start();
    pg.sql(
        "CREATE TABLE profiles (user_id bigint PRIMARY KEY, plan text, age int, features real[]);
         INSERT INTO profiles
           SELECT u, (ARRAY['basic','standard','premium'])[u % 3 + 1], 20 + u % 50, ARRAY[u, u / 2.0]::real[]
           FROM generate_series(1, 1000) u WHERE u % 5 <> 0;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lookup = format!(
        "      postgres: {{ url: \"{}\", table: profiles, pool_size: 2 }}
      columns:
        - {{ name: plan, type: utf8 }}
        - {{ name: age, type: int64 }}
        - {{ name: features, type: list, items: {{ type: float32 }} }}
      prefix: profile_
      on_missing: fail",
        pg.url()
    );
    let (stats, _) = run_yaml(&pipeline(dir.path(), 10_000, None, &lookup), &[])
        .await
        .unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    let dead = json_lines(&dir.path().join("dead"));
    assert_eq!(
        rows.len() + dead.len(),
        10_000,
        "every record out or dead-lettered"
    );
    check_enriched(&rows, false);
    for row in &rows {
        let user = row["user_id"].as_i64().unwrap() as f64;
        assert_eq!(
            row["profile_features"],
            serde_json::json!([user, user / 2.0]),
            "{row}"
        );
    }
    assert!(!dead.is_empty());
    for letter in &dead {
        let payload: serde_json::Value =
            serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        let user = payload["user_id"].as_i64().unwrap();
        assert!(!has_profile(user), "user {user} has a profile: {letter}");
        assert_eq!(letter["stage"], "profile");
        assert_eq!(letter["error_class"], "permanent");
        let error = letter["error"].as_str().unwrap();
        assert!(
            error.contains(&format!(
                "no entry for user_id = {user} in PostgreSQL table `profiles`"
            )),
            "{error}"
        );
    }
    let stage = &stats.stages[0];
    assert!(RunStats::get(&stage.cache_hits) > 5_000);
    assert_eq!(RunStats::get(&stage.dead_letters), dead.len() as u64);
}

/// Runs a rate-limited pipeline looking up in `source` (a `redis:` or `postgres:` line)
/// with the cache off, so that every batch asks the server, and restarts the server while
/// it runs: every record must come out, enriched.
async fn survives_a_restart<S: Send + 'static>(
    source: String,
    mut server: S,
    restart: fn(&mut S, Duration),
) {
    let lookup = format!(
        "      {source}
      columns:
        - {{ name: plan, type: utf8 }}
        - {{ name: age, type: int64 }}
      prefix: profile_
      cache: {{ max_entries: 0 }}
      on_missing: default
      defaults: {{ plan: free }}"
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline(dir.path(), 8_000, Some(2_000), &lookup);
    let restarter = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1_200));
        restart(&mut server, Duration::from_millis(1_500));
        server
    });
    let (stats, _) = run_yaml(&yaml, &[]).await.unwrap();
    drop(restarter.await.unwrap());
    let rows = json_lines(&dir.path().join("rows"));
    assert_eq!(rows.len(), 8_000, "no record lost");
    check_enriched(&rows, true);
    let retries = RunStats::get(&stats.stages[0].retries);
    assert!(retries > 0, "the restart should have failed some calls");
    assert_eq!(RunStats::get(&stats.records_dead_lettered), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_is_waited_out() {
    let redis = RedisServer::start();
    load_redis(&redis, true);
    let source = format!(
        "redis: {{ url: \"{}\", key_prefix: \"profile:\", format: json }}",
        redis.url()
    );
    survives_a_restart(source, redis, RedisServer::restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_is_waited_out() {
    let pg = PostgresServer::start();
    pg.sql(
        "CREATE TABLE profiles (id text PRIMARY KEY, plan text, age bigint);
         INSERT INTO profiles
           SELECT u::text, (ARRAY['basic','standard','premium'])[u % 3 + 1], 20 + u % 50
           FROM generate_series(1, 1000) u WHERE u % 5 <> 0;",
    );
    let source = format!(
        "postgres: {{ url: \"{}\", table: profiles, key: id }}",
        pg.url()
    );
    survives_a_restart(source, pg, PostgresServer::restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_table_is_joined_and_reloaded_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("profiles.csv");
    let path = table.clone();
    let write = move |plan: &str| {
        let mut csv = String::from("user_id,plan,age\n");
        for user in (1..=USERS).filter(|u| has_profile(*u)) {
            csv.push_str(&format!("{user},{plan},{}\n", 20 + user % 50));
        }
        std::fs::write(&path, csv).unwrap();
    };
    write("old");
    let lookup = format!(
        "      file: {{ path: \"{}\", reload_every: 100ms }}
      prefix: profile_",
        table.display()
    );
    let yaml = pipeline(dir.path(), 12_000, Some(4_000), &lookup);
    let rewrite = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1_000));
        // A new modification time, as a deploy of the table would give.
        std::thread::sleep(Duration::from_millis(10));
        write("new");
    });
    run_yaml(&yaml, &[]).await.unwrap();
    rewrite.await.unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    assert_eq!(rows.len(), 12_000);
    let mut plans: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let user = row["user_id"].as_i64().unwrap();
        if has_profile(user) {
            assert_eq!(row["profile_age"], 20 + user % 50, "{row}");
            *plans
                .entry(row["profile_plan"].as_str().unwrap().to_string())
                .or_default() += 1;
        } else {
            assert!(row["profile_plan"].is_null(), "{row}");
        }
    }
    assert!(plans.get("old").copied().unwrap_or(0) > 0, "{plans:?}");
    assert!(
        plans.get("new").copied().unwrap_or(0) > 0,
        "reloaded: {plans:?}"
    );
}

/// Lookups in a PostgreSQL that takes TLS connections only: `sslmode=verify-full` with the
/// authority that signed its certificate enriches every row; plaintext, and a certificate
/// signed by an authority the stage does not trust, stop the run with a sentence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = crate::certs::Certs::make(certs_dir.path());
    let pg = PostgresServer::start_tls_only(&certs.server_cert, &certs.server_key);
    pg.sql(
        "CREATE TABLE profiles (user_id bigint PRIMARY KEY, plan text);
         INSERT INTO profiles SELECT u, 'plan-' || u FROM generate_series(1, 100000) u;",
    );
    let lookup = |query: &str| {
        format!(
            "      postgres: {{ url: \"postgres://sluice@localhost:{}/postgres?{query}\", table: profiles, pool_size: 1 }}
      columns:
        - {{ name: plan, type: utf8 }}
      prefix: profile_",
            pg.port
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let full = format!("sslmode=verify-full&sslrootcert={}", certs.ca.display());
    run_yaml(&pipeline(dir.path(), 3_000, None, &lookup(&full)), &[])
        .await
        .unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    assert_eq!(rows.len(), 3_000);
    for row in &rows {
        assert_eq!(
            row["profile_plan"],
            format!("plan-{}", row["user_id"]),
            "{row}"
        );
    }
    assert!(json_lines(&dir.path().join("dead")).is_empty());

    let refused = [
        (
            "sslmode=disable".to_string(),
            "PostgreSQL refused the lookups",
        ),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                certs.other_ca.display()
            ),
            "TLS certificate of the PostgreSQL server",
        ),
    ];
    for (query, said) in refused {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let error = run_yaml(
            &few_attempts(pipeline(dir.path(), 1_000, None, &lookup(&query))),
            &[],
        )
        .await
        .map(|_| ())
        .unwrap_err();
        assert!(error.contains(said), "{query}: {error}");
        assert!(started.elapsed() < Duration::from_secs(30), "{query}");
    }
}

/// Lookups in a Redis that takes TLS connections only (`rediss://` with the authority in
/// `tls.ca`) enrich every row; an untrusted certificate stops the run; plaintext to it fails
/// saying to use rediss:// (the server only closes the connection, which a restarting server
/// does too, so it is retried first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_verifies_the_server() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = crate::certs::Certs::make(certs_dir.path());
    let redis = RedisServer::start_tls_only(&certs.server_cert, &certs.server_key, &certs.ca);
    load_redis(&redis, false);
    let lookup = |url: &str, ca: &std::path::Path| {
        redis_lookup(url, "hash").replacen(
            "key_prefix",
            &format!("tls: {{ ca: {} }}, key_prefix", ca.display()),
            1,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    run_yaml(
        &pipeline(dir.path(), 3_000, None, &lookup(&redis.url(), &certs.ca)),
        &[],
    )
    .await
    .unwrap();
    let rows = json_lines(&dir.path().join("rows"));
    assert_eq!(rows.len(), 3_000);
    for row in &rows {
        let user = row["user_id"].as_i64().unwrap();
        if has_profile(user) {
            assert_ne!(row["profile_plan"], "free", "{row}");
        }
    }
    assert!(json_lines(&dir.path().join("dead")).is_empty());

    // A certificate signed by an authority the stage does not trust stops the run at once.
    let dir = tempfile::tempdir().unwrap();
    let error = run_yaml(
        &few_attempts(pipeline(
            dir.path(),
            1_000,
            None,
            &lookup(&redis.url(), &certs.other_ca),
        )),
        &[],
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert!(error.contains("certificate verify failed"), "{error}");
    assert!(json_lines(&dir.path().join("rows")).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let plaintext = format!("redis://127.0.0.1:{}", redis.port);
    run_yaml(
        &few_attempts(pipeline(
            dir.path(),
            100,
            None,
            &redis_lookup(&plaintext, "hash"),
        )),
        &[],
    )
    .await
    .unwrap();
    assert!(json_lines(&dir.path().join("rows")).is_empty());
    let dead = json_lines(&dir.path().join("dead"));
    assert_eq!(dead.len(), 100);
    for letter in &dead {
        let error = letter["error"].as_str().unwrap();
        assert!(error.contains("use a rediss:// URL"), "{error}");
    }
}
