//! Worker processes sharing a stream's shards through leases in the shared checkpoint
//! directory: balanced between members, handed over with their state when a member joins,
//! taken over when a member is killed, and nothing lost or counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Kinesalite, close_windows, counting, ids, pipeline, produce, records, window_rows};
use crate::kafka::{Sluice, write_pipeline};

const WAIT: Duration = Duration::from_secs(180);
const LEASE: Duration = Duration::from_secs(3);

fn worker(path: &Path, member: &str, log: PathBuf) -> Sluice {
    Sluice::spawn(
        &["worker", path.to_str().unwrap(), "--member", member],
        log,
        &[("RUST_LOG", "info")],
    )
}

/// The owner of each shard's lease, from the lease files.
fn owners(leases: &Path) -> BTreeMap<String, Option<String>> {
    let Ok(dir) = std::fs::read_dir(leases) else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let shard = name.strip_suffix(".json")?.to_string();
            let lease: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            let ended = lease["ended"].as_bool().unwrap_or(false);
            (!ended).then(|| (shard, lease["owner"].as_str().map(str::to_string)))
        })
        .collect()
}

/// How many of the `shards` leases each member holds.
fn held(leases: &Path) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for owner in owners(leases).into_values().flatten() {
        *count.entry(owner).or_default() += 1;
    }
    count
}

/// Waits until the leases are held as `want` says (member → shards); returns how long.
fn wait_for_leases(leases: &Path, want: &[(&str, usize)], logs: &[&Sluice]) -> Duration {
    let t0 = Instant::now();
    let want: BTreeMap<String, usize> = want.iter().map(|(m, n)| (m.to_string(), *n)).collect();
    loop {
        let now = held(leases);
        if now == want {
            return t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let logs: Vec<String> = logs.iter().map(|s| s.log_text()).collect();
            panic!(
                "leases held {now:?}, want {want:?}:\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pipeline of `super::pipeline`, its leases lasting `LEASE`.
fn leased(k: &Kinesalite, output: &str, dir: &Path) -> String {
    pipeline(k, "plays", output, dir).replace(
        "  discover_every: 1s\n",
        &format!(
            "  discover_every: 1s\n  lease_duration: {}s\n",
            LEASE.as_secs()
        ),
    )
}

#[test]
fn worker_processes_share_the_shards_and_take_over_a_killed_members() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let n: i64 = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let yaml = leased(&k, "shouted", dir.path());
    assert!(yaml.contains("lease_duration"), "{yaml}");
    let path = write_pipeline(dir.path(), &yaml);
    let leases = dir.path().join("checkpoints/leases/plays");
    k.kinesis.put("plays", &records(0, n / 3, 37));
    let producer = produce(&k, "plays", (n / 3, n), 500, Duration::from_millis(250));
    let a = worker(&path, "a", dir.path().join("a.log"));
    wait_for_leases(&leases, &[("a", 4)], &[&a]);
    let b = worker(&path, "b", dir.path().join("b.log"));
    let balanced = wait_for_leases(&leases, &[("a", 2), ("b", 2)], &[&a, &b]);
    eprintln!("b joined: two shards handed over in {balanced:?}");
    std::thread::sleep(Duration::from_millis(1_500));
    b.kill9();
    let failover = wait_for_leases(&leases, &[("a", 4)], &[&a]);
    eprintln!("b killed: a holds its shards {failover:?} later (lease {LEASE:?})");
    assert!(
        failover < LEASE + Duration::from_secs(5),
        "took {failover:?}"
    );
    let b = worker(&path, "b", dir.path().join("b2.log"));
    wait_for_leases(&leases, &[("a", 2), ("b", 2)], &[&a, &b]);
    producer.join().unwrap();
    let read = k.kinesis.wait_for_ids("shouted", n, WAIT);
    let (status_b, log_b) = b.interrupt();
    let (status_a, log_a) = a.interrupt();
    assert!(status_a.success() && status_b.success(), "{log_a}\n{log_b}");
    let out = ids(&read);
    let missing: Vec<i64> = (0..n).filter(|i| !out.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice = out.values().filter(|(_, c)| *c > 1).count();
    eprintln!("{twice} of {n} records written twice (b killed once)");
    assert!(twice < n as usize / 2, "{twice}");
    // A clean stop lets the leases go.
    assert!(held(&leases).is_empty(), "{:?}", owners(&leases));
}

#[test]
fn windows_move_with_their_shards_between_worker_processes() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("counts", 1)]);
    let n: i64 = 24_000;
    let dir = tempfile::tempdir().unwrap();
    let yaml = counting(&leased(&k, "counts", dir.path()));
    assert!(
        yaml.contains("per_user") && yaml.contains("lease_duration"),
        "{yaml}"
    );
    let path = write_pipeline(dir.path(), &yaml);
    let leases = dir.path().join("checkpoints/leases/plays");
    // Each user's records go to one shard (keyed by user): its windows are complete in
    // whichever member reads the shard.
    let producer = produce(&k, "plays", (0, n), 400, Duration::from_millis(200));
    let a = worker(&path, "a", dir.path().join("a.log"));
    wait_for_leases(&leases, &[("a", 4)], &[&a]);
    std::thread::sleep(Duration::from_millis(1_500));
    let b = worker(&path, "b", dir.path().join("b.log"));
    wait_for_leases(&leases, &[("a", 2), ("b", 2)], &[&a, &b]);
    std::thread::sleep(Duration::from_millis(2_500));
    b.kill9();
    wait_for_leases(&leases, &[("a", 4)], &[&a]);
    let b = worker(&path, "b", dir.path().join("b2.log"));
    wait_for_leases(&leases, &[("a", 2), ("b", 2)], &[&a, &b]);
    producer.join().unwrap();
    let (want, ticks) = close_windows(&k, n);
    // Every (user, window) once, or again with the same count (a killed member's windows
    // emitted after its last checkpoint are emitted again, the same).
    let got = window_rows(&k, ticks, WAIT, |got| got.len() >= want.len());
    let rows: usize = got.values().map(Vec::len).sum();
    let got: BTreeMap<(String, i64), BTreeSet<i64>> = got
        .into_iter()
        .map(|(key, counts)| (key, counts.into_iter().collect()))
        .collect();
    let (status_b, log_b) = b.interrupt();
    let (status_a, log_a) = a.interrupt();
    assert!(status_a.success() && status_b.success(), "{log_a}\n{log_b}");
    eprintln!(
        "{} windows of a user, {rows} rows ({} again)",
        want.len(),
        rows - got.len()
    );
    let wrong: Vec<_> = want
        .iter()
        .filter(|(key, n)| got.get(*key) != Some(&BTreeSet::from([**n])))
        .map(|(key, n)| {
            let at = arrow::array::temporal_conversions::timestamp_ms_to_datetime(key.1)
                .unwrap()
                .format("%H:%M:%S")
                .to_string();
            (key.0.clone(), at, *n, got.get(key).cloned())
        })
        .collect();
    assert!(
        wrong.is_empty() && got.len() == want.len(),
        "{} windows, {} rows; wrong (window, want, got): {wrong:?}\n{log_a}\n-----\n{log_b}",
        want.len(),
        got.len()
    );
}

#[test]
fn worker_processes_refuse_a_kinesis_source_without_a_checkpoint_directory() {
    let k = Kinesalite::with_streams(&[("plays", 1), ("shouted", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline(&k, "plays", "shouted", dir.path());
    let yaml = &yaml[..yaml.find("checkpoint:").unwrap()];
    let path = write_pipeline(dir.path(), yaml);
    let out = crate::sluice(&["worker", path.to_str().unwrap(), "--member", "a"]);
    let err = crate::text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs `checkpoint.dir`"), "{err}");
    let out = crate::sluice(&["run", path.to_str().unwrap(), "--processes", "auto"]);
    let err = crate::text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs `checkpoint.dir`"), "{err}");
}

#[test]
fn processes_n_runs_kinesis_worker_processes_that_split_the_shards() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let n: i64 = 8_000;
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), &leased(&k, "shouted", dir.path()));
    let leases = dir.path().join("checkpoints/leases/plays");
    k.kinesis.put("plays", &records(0, n / 2, 37));
    let sluice = Sluice::start_args(
        &path,
        dir.path().join("run.log"),
        &["--processes", "2"],
        &[("RUST_LOG", "info")],
    );
    let t0 = Instant::now();
    let split = loop {
        let now = held(&leases);
        if now.len() == 2 && now.values().all(|n| *n == 2) {
            break now;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "leases held {now:?}:\n{}",
            sluice.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    k.kinesis.put("plays", &records(n / 2, n / 2, 37));
    let read = k.kinesis.wait_for_ids("shouted", n, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let out = ids(&read);
    assert!((0..n).all(|i| out.contains_key(&i)), "{log}");
    eprintln!("--processes 2: leases {split:?}");
}

#[test]
fn a_shard_handed_over_before_its_first_checkpoint_goes_on_where_it_was() {
    // `latest` and checkpoints far apart: the hand-over's drain commits the first position
    // of the shard, which the next owner must resume after (not at the tip again).
    let k = Kinesalite::with_streams(&[("plays", 2), ("shouted", 2)]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = leased(&k, "shouted", dir.path())
        .replace("start_from: trim_horizon", "start_from: latest")
        .replace("interval: 1s", "interval: 15s");
    assert!(
        yaml.contains("interval: 15s") && yaml.contains("latest"),
        "{yaml}"
    );
    let path = write_pipeline(dir.path(), &yaml);
    let leases = dir.path().join("checkpoints/leases/plays");
    let a = worker(&path, "a", dir.path().join("a.log"));
    wait_for_leases(&leases, &[("a", 2)], &[&a]);
    // The readers have their LATEST iterators once a shard says it was assigned.
    std::thread::sleep(Duration::from_millis(1_500));
    let n: i64 = 6_000;
    let producer = produce(&k, "plays", (0, n), 200, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    let b = worker(&path, "b", dir.path().join("b.log"));
    wait_for_leases(&leases, &[("a", 1), ("b", 1)], &[&a, &b]);
    producer.join().unwrap();
    let read = k
        .kinesis
        .wait_for_ids("shouted", n, Duration::from_secs(40));
    let (_, log_b) = b.interrupt();
    let (_, log_a) = a.interrupt();
    let out = ids(&read);
    let missing: Vec<i64> = (0..n).filter(|i| !out.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}\n{log_a}\n-----\n{log_b}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}
