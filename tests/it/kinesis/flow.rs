//! Records from Kinesis through SQL to Kinesis: all of them, through restarts, kills and
//! reshards.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    Kinesalite, Read, close_windows, counting, ids, pipeline, produce, records, window_rows,
};
use crate::kafka::{Sluice, write_pipeline};

const WAIT: Duration = Duration::from_secs(180);

/// Every id of `0..n` is in the output, transformed; returns how many were written twice.
fn check_all(read: &[Read], n: i64) -> usize {
    let out = ids(read);
    let missing: Vec<i64> = (0..n).filter(|i| !out.contains_key(i)).take(10).collect();
    assert!(missing.is_empty(), "missing ids, the first: {missing:?}");
    for (id, (row, _)) in &out {
        assert_eq!(row["user"], format!("U{}", id % 37), "{row}");
        assert!(row["seq"].as_str().is_some_and(|s| s.len() > 20), "{row}");
    }
    out.values().map(|(_, c)| c - 1).sum()
}

/// Within each output partition key, ids in the order the stream holds them.
fn keys_in_order(read: &[Read]) {
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for r in read {
        let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
        let id = v["id"].as_i64().unwrap();
        if let Some(before) = last.insert(&r.key, id) {
            assert!(
                before < id,
                "key {} has id {id} after {before} (shard {})",
                r.key,
                r.shard
            );
        }
    }
}

/// Writes ids `0..n` to `plays` (4 shards) in ten parts, `pause` apart, splitting shard 0
/// after the fourth part and merging shards 2 and 3 after the seventh.
fn put_while_resharding(k: &Kinesalite, n: i64, pause: Duration) {
    let step = n / 10;
    for part in 0..10 {
        k.kinesis.put("plays", &records(part * step, step, 37));
        match part {
            3 => k.kinesis.split("plays", "shardId-000000000000"),
            6 => k
                .kinesis
                .merge("plays", "shardId-000000000002", "shardId-000000000003"),
            _ => std::thread::sleep(pause),
        }
    }
}

#[test]
fn kinesis_to_sql_to_kinesis_takes_every_record_once() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let n = 100_000;
    k.kinesis.put("plays", &records(0, n, 37));
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), &pipeline(&k, "plays", "shouted", dir.path()));
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    let read = k.kinesis.wait_for("shouted", n as usize, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(
        check_all(&read, n),
        0,
        "a clean run writes each record once"
    );
    keys_in_order(&read);

    // Restarted: it goes on after the last checkpointed sequence number of each shard.
    k.kinesis.put("plays", &records(n, 1_000, 37));
    let sluice = Sluice::start(&path, dir.path().join("run2.log"));
    let read = k.kinesis.wait_for("shouted", n as usize + 1_000, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(check_all(&read, n + 1_000), 0, "{log}");
    assert!(log.contains("records in"), "{log}");
}

#[test]
fn kill_9_at_random_moments_loses_no_kinesis_record() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let n = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), &pipeline(&k, "plays", "shouted", dir.path()));
    // A backlog, so that batches are in flight at every checkpoint, and records that keep
    // coming while the pipeline is killed: 500 every 100 ms.
    k.kinesis.put("plays", &records(0, n / 2, 37));
    let producer = produce(&k, "plays", (n / 2, n), 500, Duration::from_millis(100));
    let mut rng = fastrand::Rng::with_seed(7);
    let latest = dir.path().join("checkpoints").join("LATEST");
    for round in 0..5 {
        let sluice = Sluice::start(&path, dir.path().join(format!("run{round}.log")));
        // The first run commits a checkpoint before it is killed (under a loaded machine a
        // debug build can take longer to start than a short run lives): the last run must
        // then read less than everything. The kills themselves stay at random moments.
        if round == 0 {
            let deadline = std::time::Instant::now() + WAIT;
            while !latest.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(700 + rng.u64(0..2_000)));
        sluice.kill9();
    }
    producer.join().unwrap();
    let sluice = Sluice::start(&path, dir.path().join("last.log"));
    let read = k.kinesis.wait_for_ids("shouted", n, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let twice = check_all(&read, n);
    // What the last run read: the others' checkpoints moved every shard on.
    let last_in: usize = log
        .lines()
        .find_map(|l| {
            l.split(" records in")
                .next()?
                .rsplit(' ')
                .next()?
                .replace(',', "")
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary:\n{log}"));
    eprintln!(
        "kill -9 five times: {twice} of {n} records written twice; the last run read {last_in}"
    );
    assert!(
        last_in < n as usize,
        "the killed runs' checkpoints were lost:\n{log}"
    );
    assert!(
        twice <= 5 * n as usize / 2,
        "a killed run writes again at most what it read since its last checkpoint"
    );
}

#[test]
fn a_split_and_a_merge_while_records_flow_lose_none_and_keep_each_key_in_order() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("shouted", 2)]);
    let n: i64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), &pipeline(&k, "plays", "shouted", dir.path()));
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    put_while_resharding(&k, n, Duration::ZERO);
    let read = k.kinesis.wait_for("shouted", n as usize, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(check_all(&read, n), 0, "{log}");
    keys_in_order(&read);
    // The children were read, after their parents.
    for child in [
        "shardId-000000000004",
        "shardId-000000000005",
        "shardId-000000000006",
    ] {
        let assigned = log
            .find(&format!("partition=plays/{child}"))
            .unwrap_or_else(|| panic!("{child} never assigned:\n{log}"));
        let parent_done = log
            .find("shard read to its end and checkpointed")
            .expect("a parent finished");
        assert!(parent_done < assigned, "{log}");
    }
}

#[test]
fn windows_counted_across_a_split_and_a_merge_lose_no_record() {
    let k = Kinesalite::with_streams(&[("plays", 4), ("counts", 1)]);
    let n: i64 = 100_000;
    let (want, got, log) = windows_while(&k, n, || {
        put_while_resharding(&k, n, Duration::from_millis(300));
    });
    one_row_each(&want, &got, &log);
}

#[test]
fn a_window_open_while_a_lone_shard_splits_comes_out_as_one_row() {
    // One shard: while its children wait for its end to be checkpointed, no other shard
    // holds the watermark back; the parent's open windows must wait for the children's.
    let k = Kinesalite::with_streams(&[("plays", 1), ("counts", 1)]);
    let n: i64 = 8_000;
    let (want, got, log) = windows_while(&k, n, || split_mid_window(&k, n));
    one_row_each(&want, &got, &log);
}

/// Writes ids `0..n` to `plays` (one shard) in eight parts, splitting the shard after the
/// fourth: the parent's last records and the split in the first half of a window, the
/// children's first records in its second half.
fn split_mid_window(k: &Kinesalite, n: i64) {
    let clock = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    for part in 0..8 {
        if part == 3 {
            std::thread::sleep(Duration::from_millis((2_100 - clock() % 2_000) % 2_000));
        }
        k.kinesis.put("plays", &records(part * n / 8, n / 8, 37));
        if part == 3 {
            k.kinesis.split("plays", "shardId-000000000000");
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

#[test]
fn windows_open_across_a_split_stay_exact_through_a_kill_after_it() {
    // Killed once the children have been read and checkpointed, before the window open
    // across the split has closed: the restarted run reads the parent again to its end and
    // resumes the children at once, and the window still comes out whole (again, the same,
    // if the killed run had emitted it).
    let k = Kinesalite::with_streams(&[("plays", 1), ("counts", 1)]);
    let n: i64 = 8_000;
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(
        dir.path(),
        &counting(&pipeline(&k, "plays", "counts", dir.path())),
    );
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    split_mid_window(&k, n);
    std::thread::sleep(Duration::from_millis(1_500));
    sluice.kill9();
    let sluice = Sluice::start(&path, dir.path().join("again.log"));
    let (want, ticks) = close_windows(&k, n);
    let got = window_rows(&k, ticks, WAIT, |got| got.len() >= want.len());
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let wrong: Vec<_> = want
        .iter()
        .filter(|(key, n)| {
            got.get(*key)
                .is_none_or(|rows| rows.iter().any(|r| r != *n))
        })
        .map(|(key, n)| (key, n, got.get(key)))
        .take(5)
        .collect();
    assert!(wrong.is_empty(), "(window, want, rows): {wrong:?}\n{log}");
    assert_eq!(got.len(), want.len(), "{log}");
    assert!(
        log.contains("partition=plays/shardId-000000000001"),
        "the children were resumed:\n{log}"
    );
}

/// Every (user, window) came out as one row, with the reference's count.
fn one_row_each(
    want: &BTreeMap<(String, i64), i64>,
    got: &BTreeMap<(String, i64), Vec<i64>>,
    log: &str,
) {
    let split: Vec<_> = got
        .iter()
        .filter(|(_, rows)| rows.len() > 1)
        .take(5)
        .collect();
    assert!(
        split.is_empty(),
        "windows in several rows: {split:?}\n{log}"
    );
    let counts: BTreeMap<(String, i64), i64> = got
        .iter()
        .map(|(key, rows)| (key.clone(), rows.iter().sum()))
        .collect();
    assert_eq!(&counts, want, "{log}");
}

/// Runs a count per user and 2-second window of arrival over `plays` while `produce`
/// writes ids `0..n` (and reshards); returns the reference computed from the stream, the
/// counts of every output row by (user, window start), and the run's log.
#[allow(clippy::type_complexity)]
fn windows_while(
    k: &Kinesalite,
    n: i64,
    produce: impl FnOnce(),
) -> (
    BTreeMap<(String, i64), i64>,
    BTreeMap<(String, i64), Vec<i64>>,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = counting(&pipeline(k, "plays", "counts", dir.path()));
    let path = write_pipeline(dir.path(), &yaml);
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    produce();
    let (want, ticks) = close_windows(k, n);
    let got = window_rows(k, ticks, WAIT, |got| {
        got.values().flatten().sum::<i64>() >= n
    });
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let rows: usize = got.values().map(Vec::len).sum();
    eprintln!("{rows} rows for {} windows of a user", got.len());
    (want, got, log)
}

/// Milliseconds of an RFC 3339 time as the JSON sink writes it (`2026-12-06T05:00:02Z`,
/// with optional fractions).
pub(super) fn chrono_ms(text: &str) -> i64 {
    let nanos = arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    nanos / 1_000_000
}

#[test]
fn records_the_kpl_aggregated_come_out_one_by_one() {
    let k = Kinesalite::with_streams(&[("plays", 1), ("shouted", 1)]);
    // Three KPL aggregates of 50 user records, between plain records.
    let mut put = records(0, 10, 37);
    for a in 0..3 {
        let users = records(100 + a * 50, 50, 37);
        put.push(("agg".into(), kpl_aggregate(&users)));
        put.extend(records(10 + a * 10, 10, 37));
    }
    k.kinesis.put("plays", &put);
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), &pipeline(&k, "plays", "shouted", dir.path()));
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    let read = k.kinesis.wait_for("shouted", 190, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let out = ids(&read);
    let want: Vec<i64> = (0..40).chain(100..250).collect();
    assert_eq!(out.keys().copied().collect::<Vec<_>>(), want, "{log}");
    // A user record's sequence number carries its place in the aggregate.
    assert!(
        out[&101].0["seq"].as_str().unwrap().ends_with(":1"),
        "{}",
        out[&101].0
    );
}

/// The KPL's aggregate format, written here from its definition (magic, protobuf
/// `AggregatedRecord`, MD5 of the protobuf) rather than with Sluice's code.
fn kpl_aggregate(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field(tag: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(tag << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut message = Vec::new();
    let mut bodies = Vec::new();
    for (key, data) in records {
        let index = keys.iter().position(|k| k == key).unwrap_or_else(|| {
            keys.push(key);
            keys.len() - 1
        });
        let mut record = Vec::new();
        varint(1 << 3, &mut record);
        varint(index as u64, &mut record);
        field(3, data, &mut record);
        bodies.push(record);
    }
    for key in &keys {
        field(1, key.as_bytes(), &mut message);
    }
    for body in &bodies {
        field(3, body, &mut message);
    }
    let mut out = vec![0xF3, 0x89, 0x9A, 0xC2];
    out.extend_from_slice(&message);
    out.extend_from_slice(&md5(&message));
    out
}

/// MD5 (RFC 1321), for the aggregate's checksum.
fn md5(data: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32)
        .collect();
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_le_bytes());
    let (mut a0, mut b0, mut c0, mut d0) =
        (0x67452301u32, 0xefcdab89u32, 0x98badcfeu32, 0x10325476u32);
    for chunk in msg.chunks(64) {
        let m: Vec<u32> = chunk
            .chunks(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    let mut out = [0u8; 16];
    for (i, v) in [a0, b0, c0, d0].iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

#[test]
fn the_test_md5_is_md5() {
    let hex = |b: [u8; 16]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(
        hex(md5(b"The quick brown fox jumps over the lazy dog")),
        "9e107d9d372bb6826bd81d3542a419d6"
    );
}

#[test]
fn the_kinesis_quickstart_runs_against_a_local_kinesis() {
    let k = Kinesalite::with_streams(&[("views", 4), ("views-enriched", 2)]);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = k.endpoint();
    let checkpoints = dir.path().join("checkpoints");
    let vars = [
        ("KINESIS_ENDPOINT", endpoint.as_str()),
        ("COUNT", "20000"),
        ("CHECKPOINT_DIR", checkpoints.to_str().unwrap()),
    ];
    let pipelines = crate::root().join("pipelines");
    let mut generate = Sluice::start_with(
        &pipelines.join("kinesis-generate.yaml"),
        dir.path().join("generate.log"),
        &vars,
    );
    assert!(generate.wait(WAIT).success(), "{}", generate.log_text());
    let input = k.kinesis.read_all("views");
    assert_eq!(input.len(), 20_000);
    let mut want: Vec<i64> = input
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.data).unwrap())
        .filter(|v| v["event_type"] == "play" && v["watch_seconds"].as_i64() >= Some(30))
        .map(|v| v["user_id"].as_i64().unwrap())
        .collect();
    assert!(!want.is_empty());

    let sluice = Sluice::start_with(
        &pipelines.join("kinesis-quickstart.yaml"),
        dir.path().join("run.log"),
        &vars,
    );
    let read = k.kinesis.wait_for("views-enriched", want.len(), WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    let mut got: Vec<i64> = Vec::new();
    for r in &read {
        let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
        assert!(
            ["control", "personalized"].contains(&v["variant"].as_str().unwrap()),
            "{v}"
        );
        assert_eq!(r.key, v["user_id"].to_string(), "keyed by user");
        got.push(v["user_id"].as_i64().unwrap());
    }
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "{log}");
}

#[test]
fn records_that_do_not_decode_are_dead_letters_naming_shard_and_sequence_number() {
    let k = Kinesalite::with_streams(&[("plays", 1), ("shouted", 1)]);
    let mut put = records(0, 100, 37);
    for (i, bad) in [
        &b"{\"id\": 1"[..],
        b"not json",
        b"{\"id\": \"x\", \"user\": 1}",
    ]
    .into_iter()
    .enumerate()
    {
        put.insert(20 * (i + 1), ("bad".into(), bad.to_vec()));
    }
    k.kinesis.put("plays", &put);
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline(&k, "plays", "shouted", dir.path())
        + &format!(
            "dead_letter: {{ type: file, path: {}, format: jsonl }}\n",
            dir.path().join("dlq").display()
        );
    let path = write_pipeline(dir.path(), &yaml);
    let sluice = Sluice::start(&path, dir.path().join("run.log"));
    let read = k.kinesis.wait_for_ids("shouted", 100, WAIT);
    let (status, log) = sluice.interrupt();
    assert!(status.success(), "{log}");
    assert_eq!(check_all(&read, 100), 0);
    let dead: Vec<serde_json::Value> = std::fs::read_dir(dir.path().join("dlq"))
        .unwrap()
        .flat_map(|f| {
            std::fs::read_to_string(f.unwrap().path())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for d in &dead {
        let text = d.to_string();
        assert!(text.contains("plays/shardId-000000000000"), "{text}");
        assert!(
            text.contains("stream `plays` shard shardId-000000000000 sequence number 4"),
            "{text}"
        );
        assert_eq!(d["key"], "bad", "{text}");
    }
}
