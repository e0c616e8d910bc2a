//! Worker processes of one consumer group: partitions move between processes with their
//! windows' state, `sluice run --processes auto` follows the group's lag, and processes
//! writing files into one directory never touch each other's files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::aggregate::{
    Aggregation, assert_each_window_once, by_partition, expected, wait_for_windows,
};
use super::{Broker, Sluice, events, produce_paced, wait_assigned, write_pipeline};
use crate::{SlowFunction, free_port, scrape};

/// `sluice worker` as member `name`.
fn worker(path: &std::path::Path, dir: &std::path::Path, name: &str, turn: usize) -> Sluice {
    Sluice::spawn(
        &["worker", path.to_str().unwrap(), "--member", name],
        dir.join(format!("log-{name}-{turn}")),
        &[(
            "RUST_LOG",
            "warn,sluice_connectors=info,sluice_engine::checkpoint=info",
        )],
    )
}

/// Short windows: 200s of event time make 20 of them per country, closing while
/// partitions move.
const WINDOW: i64 = 10_000;

#[test]
fn windows_continue_when_their_partition_moves_to_another_process() {
    const N: i64 = 40_000;
    // 20 seconds of input; each country on its own partition (keys live in one partition,
    // the rule across processes); 10s windows, about one closing per second per country, so
    // windows close while partitions move, and a process whose own partitions are ahead in
    // event time receives a partition that is behind: its windows must come out complete.
    let Aggregation {
        broker,
        output,
        dir,
        path,
        producer,
    } = Aggregation::start(N, by_partition, 2_000, WINDOW);

    // a alone; then b joins (partitions move a → b, drained and checkpointed first); a
    // stops (the rest move to b); a comes back (some move b → a: a's own copy of them is
    // older than b's, and must not win); b is killed (its partitions go to a from b's
    // last checkpoint).
    let mut a = worker(&path, dir.path(), "a", 0);
    wait_assigned(&mut a, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let mut b = worker(&path, dir.path(), "b", 0);
    wait_assigned(&mut b, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let (status, log) = a.interrupt();
    assert!(status.success(), "{log}");
    std::thread::sleep(Duration::from_secs(3));
    let mut a = worker(&path, dir.path(), "a", 1);
    wait_assigned(&mut a, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    assert!(b.running(), "{}", b.log_text());
    let b_log = b.log_text();
    b.kill9();
    producer.join().unwrap();

    let want = expected(N, by_partition, WINDOW);
    wait_for_windows(&broker, &output, &want);
    let (status, log) = a.interrupt();
    assert!(status.success(), "{log}");
    let logs: String = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    let takeovers = logs.matches("taking over the partition's state").count();
    let written = assert_each_window_once(
        &broker,
        &output,
        &want,
        &format!("b's log:\n{b_log}\na's last log:\n{log}"),
    );
    // The moves happened: state was taken over from another member at least three times
    // (a → b at the join, a → b at a's stop, b → a after the kill).
    assert!(takeovers >= 3, "{takeovers} take-overs:\n{logs}");
    eprintln!(
        "{} windows, each once with the reference result, after {takeovers} partition take-overs; {written} rows written",
        want.len()
    );
}

/// `sluice run --processes auto` of [`super::scaling::pipeline`] (4 partitions in and
/// out, the slow function at `delay`), with `scaling` and `args`.
struct Auto {
    input: String,
    output: String,
    sluice: Sluice,
    _dir: tempfile::TempDir,
    _function: SlowFunction,
}

impl Auto {
    fn start(broker: &Broker, delay: Duration, scaling: &str, args: &[&str]) -> Auto {
        let (input, output, group) = (broker.name("in"), broker.name("out"), broker.name("g"));
        broker.create_topic(&input, 4);
        broker.create_topic(&output, 4);
        let dir = tempfile::tempdir().unwrap();
        let function = SlowFunction::start(delay);
        let yaml = super::scaling::pipeline(
            broker,
            (&input, &output, &group),
            dir.path(),
            &function,
            250,
            scaling,
        );
        let path = write_pipeline(dir.path(), &yaml);
        let sluice = Sluice::start_args(
            &path,
            dir.path().join("log"),
            &[&["--processes", "auto"], args].concat(),
            &[("RUST_LOG", "warn,sluice=info,sluice_connectors=info")],
        );
        Auto {
            input,
            output,
            sluice,
            _dir: dir,
            _function: function,
        }
    }
}

#[test]
fn run_with_processes_auto_starts_and_stops_worker_processes_by_the_groups_lag() {
    const N: usize = 40_000;
    let broker = Broker::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let scaling = "scaling:\n  min_workers: 1\n  max_workers: 3\n  lag_threshold: 2000\n  scale_down_cooldown: 4s\n  interval: 500ms\n";
    let auto = Auto::start(
        &broker,
        Duration::from_millis(150),
        scaling,
        &["--metrics-addr", &addr],
    );
    let (input, output, mut sluice) = (&auto.input, &auto.output, auto.sluice);
    wait_assigned(&mut sluice, Duration::from_secs(60));
    let t0 = Instant::now();
    let producer = produce_paced(&broker, input, events(N, 4), 20_000);
    // (seconds, processes, lag)
    let mut timeline: Vec<(f64, f64, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut out = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "not done in time: {:?}\n{}",
            &timeline[timeline.len().saturating_sub(20)..],
            sluice.log_text()
        );
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        if let Some(s) = scrape(&addr) {
            let get = |name: &str| {
                s.iter()
                    .find(|(n, _, _)| n == name)
                    .map_or(f64::NAN, |(_, _, v)| *v)
            };
            timeline.push((
                t0.elapsed().as_secs_f64(),
                get("sluice_worker_processes"),
                get("sluice_group_lag_records"),
            ));
        }
        if out < N {
            out = broker.read_all(output, N, Duration::from_secs(1)).len();
        }
        let peak = timeline.iter().map(|r| r.1).fold(0.0, f64::max);
        if out >= N && peak == 3.0 && timeline.last().is_some_and(|r| r.1 == 1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    producer.join().unwrap();
    eprintln!("timeline (s, processes, group lag):");
    for r in timeline.iter().step_by(4) {
        eprintln!("  {:6.1} {:2} {:8}", r.0, r.1, r.2);
    }
    let log = sluice.log_text();
    assert!(log.contains("autoscaler: worker processes up"), "{log}");
    assert!(log.contains("autoscaler: worker processes down"), "{log}");

    let (written, distinct) = super::ids_written(&broker, output, N);
    assert_eq!(distinct, N, "records lost");
    // Partitions move only after a drain and a checkpoint: nothing is written twice.
    assert_eq!(written, N, "duplicates");
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
}

/// A worker process the autoscaler started is not stopped before the group has given it
/// its partitions: a scale-down waits until the rebalance the newcomer's join started is
/// over (every started worker a member, the group stable), then a whole cooldown. A
/// member leaving during the rebalance its own join started is how tansu once left two
/// partitions without an owner for good in the chaos test.
#[test]
fn a_scale_down_waits_until_the_group_has_settled() {
    const N: usize = 8_000;
    let broker = Broker::start();
    // The burst drains within about a second, so the lag asks for one worker again a
    // cooldown after it asked for two: sooner than the second can join the group.
    let scaling = "scaling:\n  min_workers: 1\n  max_workers: 2\n  lag_threshold: 1000\n  scale_down_cooldown: 1s\n  interval: 200ms\n";
    let auto = Auto::start(&broker, Duration::ZERO, scaling, &[]);
    let (input, output, mut sluice) = (&auto.input, &auto.output, auto.sluice);
    wait_assigned(&mut sluice, Duration::from_secs(60));
    let producer = produce_paced(&broker, input, events(N, 4), 50_000);
    let stopped = |log: &str| {
        log.lines()
            .any(|l| l.contains("worker process stopped") && l.contains("worker-1"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stopped(&sluice.log_text()) {
        assert!(
            Instant::now() < deadline,
            "worker-1 not started and stopped again:\n{}",
            sluice.log_text()
        );
        assert!(sluice.running(), "sluice exited:\n{}", sluice.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    producer.join().unwrap();
    let log = sluice.log_text();
    let at = |what: &dyn Fn(&str) -> bool| log.lines().position(what);
    let assigned = at(&|l| l.starts_with("worker-1 | ") && l.contains("kafka partition assigned"));
    let stopping = at(&|l| l.contains("worker process stopping") && l.contains("worker-1"));
    assert!(
        assigned.is_some_and(|a| stopping.is_some_and(|s| a < s)),
        "worker-1 was told to stop (line {stopping:?}) before the group gave it a partition (line {assigned:?}):\n{log}"
    );

    let (written, distinct) = super::ids_written(&broker, output, N);
    assert_eq!(distinct, N, "records lost");
    assert_eq!(written, N, "duplicates");
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
}

/// A complete file as first seen: it must never change or disappear afterwards.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Seen {
    len: u64,
    inode: u64,
    modified: std::time::SystemTime,
    hash: u64,
}

fn content_hash(path: &Path) -> Option<u64> {
    use std::hash::Hasher;
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::hash::DefaultHasher::new();
    h.write(&bytes);
    Some(h.finish())
}

/// Watches the complete (not hidden) files of a directory, as a reader of it would: every
/// file keeps the content it had when first seen. Writes what it saw wrong to `broken`.
struct FileWatch {
    seen: HashMap<PathBuf, Seen>,
    broken: Vec<String>,
}

impl FileWatch {
    fn scan(&mut self, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // gone between the listing and now: found missing below
            };
            present.insert(path.clone());
            let now = (meta.len(), meta.ino(), meta.modified().unwrap());
            match self.seen.get(&path) {
                Some(s) if (s.len, s.inode, s.modified) != now => self
                    .broken
                    .push(format!("{} changed: {s:?}, now {now:?}", path.display())),
                Some(_) => {}
                None => {
                    if let Some(hash) = content_hash(&path) {
                        self.seen.insert(
                            path,
                            Seen {
                                len: now.0,
                                inode: now.1,
                                modified: now.2,
                                hash,
                            },
                        );
                    }
                }
            }
        }
        for path in self.seen.keys() {
            if path.starts_with(dir) && !present.contains(path) {
                self.broken.push(format!("{} disappeared", path.display()));
            }
        }
    }
}

/// The complete files of `dir` whose names start with `prefix`, as JSON rows.
fn rows(dir: &Path, prefix: &str) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        rows.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))),
        );
    }
    rows
}

fn letter_payload(letter: &Value) -> Vec<u8> {
    match (&letter["payload"], &letter["payload_base64"]) {
        (Value::String(text), _) => text.as_bytes().to_vec(),
        (_, Value::String(b64)) => sluice_engine::dead_letter::decode_base64(b64).unwrap(),
        other => panic!("payload {other:?}"),
    }
}

#[test]
fn worker_processes_write_their_own_files_into_one_directory() {
    const GOOD: usize = 100_000;
    const BAD: usize = 500;
    const PARTITIONS: i32 = 6;
    let broker = Broker::start();
    let input = broker.name("in");
    broker.create_topic(&input, PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Output and dead letters share the directory, apart by prefix: each of the three
    // processes writes two kinds of files there.
    let yaml = format!(
        r#"name: files
source:
  type: kafka
  bootstrap_servers: {bootstrap}
  topics: [{input}]
  group: {group}
  start_from: earliest
  batch_size: 2000
  batch_window: 50ms
  schema:
    - {{ name: id, type: int64, nullable: false }}
    - {{ name: country, type: utf8 }}
  options:
    session.timeout.ms: "6000"
    heartbeat.interval.ms: "500"
stages:
  - name: shape
    type: sql
    query: SELECT id, upper(country) AS country FROM input
sink:
  type: file
  path: {out}
  max_file_size: 64KiB
  max_file_age: 300ms
dead_letter:
  type: file
  path: {out}
  prefix: dead
  max_file_age: 300ms
checkpoint:
  dir: {ckpt}
  interval: 500ms
"#,
        bootstrap = broker.bootstrap,
        group = broker.name("g"),
        out = out.display(),
        ckpt = dir.path().join("ckpt").display(),
    );
    let path = write_pipeline(dir.path(), &yaml);
    let mut messages = Vec::with_capacity(GOOD + BAD);
    let mut bad_payloads = HashSet::new();
    for i in 0..GOOD {
        let p = (i as i32) % PARTITIONS;
        messages.push((
            p,
            None,
            format!(r#"{{"id":{i},"country":"de"}}"#).into_bytes(),
        ));
        if i.is_multiple_of(GOOD / BAD) {
            let b = i / (GOOD / BAD);
            let bad = if b.is_multiple_of(2) {
                format!(r#"{{"id":"bad-{b}","country":"de"}}"#)
            } else {
                format!(r#"{{"id":{b},"country":"d"#)
            };
            bad_payloads.insert(bad.clone().into_bytes());
            messages.push((p, None, bad.into_bytes()));
        }
    }
    assert_eq!(bad_payloads.len(), BAD);

    let mut members: Vec<Sluice> = ["w1", "w2", "w3"]
        .iter()
        .map(|name| worker(&path, dir.path(), name, 0))
        .collect();
    for m in &mut members {
        wait_assigned(m, Duration::from_secs(60));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, out) = (stop.clone(), out.clone());
        std::thread::spawn(move || {
            let mut watch = FileWatch {
                seen: HashMap::new(),
                broken: Vec::new(),
            };
            while !stop.load(Ordering::Relaxed) && watch.broken.is_empty() {
                watch.scan(&out);
                std::thread::sleep(Duration::from_millis(20));
            }
            watch
        })
    };
    let producer = produce_paced(&broker, &input, messages, 10_000);
    // w2 dies in the middle of its files; the others take its partitions over from its last
    // checkpoint, and when it comes back it cleans up its own unfinished file only.
    std::thread::sleep(Duration::from_secs(4));
    assert!(members[1].running(), "{}", members[1].log_text());
    members.remove(1).kill9();
    std::thread::sleep(Duration::from_secs(3));
    members.insert(1, worker(&path, dir.path(), "w2", 1));
    producer.join().unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    let (ids, letters) = loop {
        for m in &mut members {
            assert!(m.running(), "a worker exited:\n{}", m.log_text());
        }
        assert!(
            !watcher.is_finished(),
            "{:?}",
            watcher.join().unwrap().broken
        );
        let ids: HashSet<i64> = rows(&out, "part-")
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        let letters: HashSet<Vec<u8>> = rows(&out, "dead-").iter().map(letter_payload).collect();
        if ids.len() >= GOOD && letters.len() >= BAD {
            break (ids, letters);
        }
        assert!(
            Instant::now() < deadline,
            "{} of {GOOD} ids and {} of {BAD} dead letters so far",
            ids.len(),
            letters.len()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    for m in members {
        let (status, log) = m.interrupt();
        assert!(status.success(), "{log}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut watch = watcher.join().unwrap();
    watch.scan(&out);
    for (path, seen) in &watch.seen {
        if content_hash(path) != Some(seen.hash) {
            watch
                .broken
                .push(format!("{} was rewritten", path.display()));
        }
    }
    assert!(watch.broken.is_empty(), "{:#?}", watch.broken);

    assert_eq!(ids.len(), GOOD, "every id in the output files");
    assert_eq!(
        letters, bad_payloads,
        "every malformed record in the dead letters"
    );
    // Each process wrote files of its own, and a clean stop leaves none unfinished: w2's
    // leftover of the kill went when it came back.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let member_file = |name: &str| {
        let seq = ["part-", "dead-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|r| ["w1-", "w2-", "w3-"].iter().find_map(|m| r.strip_prefix(m)))
            .and_then(|r| r.strip_suffix(".jsonl"));
        seq.is_some_and(|s| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit()))
    };
    let odd: Vec<&String> = names.iter().filter(|n| !member_file(n)).collect();
    assert!(odd.is_empty(), "{odd:?}");
    let writers: HashSet<&str> = names.iter().map(|n| &n[5..7]).collect();
    assert_eq!(writers.len(), 3, "{names:?}");
    // `sluice dlq inspect` reads every member's dead letters, and only those.
    let inspect = crate::sluice(&["dlq", "inspect", path.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", crate::text(&inspect.stderr));
    let report = crate::text(&inspect.stdout);
    let count = report
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<usize>().ok());
    assert!(count.is_some_and(|n| n >= BAD), "{report}");
    eprintln!(
        "{} files, each unchanged since first seen; {GOOD} ids and {BAD} dead letters",
        watch.seen.len()
    );
}
