//! Each window kind against hand-computed results: disorder, lateness, several partitions,
//! event times out of range, idleness, and every aggregate function.

use super::*;

#[tokio::test]
async fn tumbling_windows_with_disorder_lateness_and_two_partitions() {
    let mut h = Harness::new(TUMBLING);
    // Partition 0 runs ahead; out of order within the allowed 2s.
    h.feed(
        0,
        &[
            ("a", 1, 1_000),
            ("b", 2, 9_500),
            ("a", 3, 8_000),
            ("a", 4, 12_000),
        ],
    )
    .await;
    // Partition 1 has not been seen (nor assigned): partition 0 alone decides; its
    // watermark is 12s - 2s = 10s, so [0,10) closes.
    assert_eq!(h.take(), ["a [0,10) c=2 s=4", "b [0,10) c=1 s=2"]);
    // Partition 1 arrives, as a partition moved here from another process does: it is
    // judged by its own progress, not by what partition 0 emitted, so its rows of [0,10)
    // count (with keys that live in one partition, as across processes, its part of a
    // window is the whole window for its keys).
    h.feed(1, &[("a", 10, 9_000), ("b", 20, 11_000), ("a", 30, 10_500)])
        .await;
    assert!(h.late.is_empty());
    assert!(
        h.take().is_empty(),
        "partition 1's watermark is 9s: nothing more closes"
    );
    // Row 8.5s of partition 0 is behind its own watermark (10s) for [0,10): late.
    h.feed(0, &[("b", 5, 8_500), ("b", 6, 25_000)]).await;
    assert_eq!(h.late, [(0, 0)]);
    assert!(h.take().is_empty(), "the stage waits for partition 1 (9s)");
    h.feed(1, &[("a", 40, 23_000)]).await;
    // Stage watermark = min(23, 21) = 21s: partition 1's [0,10), and [10,20) merged across
    // partitions.
    assert_eq!(
        h.take(),
        [
            "a [0,10) c=1 s=10",
            "a [10,20) c=2 s=34",
            "b [10,20) c=1 s=20"
        ]
    );
    h.end(0).await;
    assert!(h.take().is_empty());
    h.end(1).await;
    assert_eq!(h.take(), ["a [20,30) c=1 s=40", "b [20,30) c=1 s=6"]);
}

/// Count and sum per user in sliding windows of `size`, every `slide`.
fn sliding(size: &str, slide: &str) -> String {
    format!(
        "
group_by: [user]
event_time: t
window: {{ sliding: {{ size: {size}, slide: {slide} }} }}
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
"
    )
}

#[tokio::test]
async fn sliding_windows_count_a_row_in_every_window_it_falls_in() {
    let mut h = Harness::new(&sliding("10s", "5s"));
    h.feed(
        0,
        &[
            ("a", 1, 3_000),
            ("a", 2, 7_000),
            ("b", 4, 6_000),
            ("a", 8, 12_000),
        ],
    )
    .await;
    // Watermark 12s: windows ending at 5s and 10s close.
    assert_eq!(
        h.take(),
        ["a [-5,5) c=1 s=1", "a [0,10) c=2 s=3", "b [0,10) c=1 s=4"]
    );
    // 4s: [-5,5) and [0,10) closed → late; 9s: [0,10) closed but [5,15) open → counted.
    h.feed(0, &[("a", 100, 4_000), ("b", 200, 9_000)]).await;
    assert_eq!(h.late, [(0, 0)]);
    h.end(0).await;
    assert_eq!(
        h.take(),
        [
            "a [5,15) c=2 s=10",
            "b [5,15) c=2 s=204",
            "a [10,20) c=1 s=8"
        ]
    );
}

/// A window's rows are merged from every partition's panes (here 3 partitions × 3 panes):
/// keys of every length, also longer than the 16 bytes the merge compares as one integer
/// and sharing them, and keys that are another's start, come out once per window, in key
/// order, with every partition's rows counted.
#[tokio::test]
async fn a_window_s_keys_of_any_length_merge_across_partitions_and_panes_in_order() {
    let long = "k".repeat(15);
    let keys: Vec<String> = ["", "a", "a\0", "ab", "b", "\u{ff}"]
        .iter()
        .map(|k| k.to_string())
        .chain((14..=19).map(|n| long.clone() + &"x".repeat(n - 14)))
        .chain((0..4).map(|i| format!("{long}xxxxxxxxxxxxx{i}")))
        .collect();
    let keys: Vec<&'static str> = keys.into_iter().map(|k| &*k.leak()).collect();
    let mut h = Harness::new(&sliding("6s", "2s"));
    // (end, key) -> (count, sum), from every row of its windows.
    let mut want: std::collections::BTreeMap<(i64, &str), (i64, i64)> = Default::default();
    let mut add = |key: &'static str, n: i64, t: i64| {
        let first_end = t.div_euclid(2_000) * 2_000 + 2_000;
        for end in (first_end..first_end + 6_000).step_by(2_000) {
            let e = want.entry((end, key)).or_default();
            *e = (e.0 + 1, e.1 + n);
        }
    };
    // Each partition's rows in time order, fed a second of event time at a time, every
    // partition known from the start: none is late.
    let mut next = 7u64;
    let mut rows: Vec<Vec<In>> = (0..3)
        .map(|_| {
            let mut rows: Vec<In> = (0..400)
                .map(|i| {
                    next = next
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let key = keys[(next >> 33) as usize % keys.len()];
                    (key, i, (next >> 20) as i64 % 10_000)
                })
                .collect();
            rows.sort_by_key(|r| r.2);
            rows
        })
        .collect();
    for r in rows.iter().flatten() {
        add(r.0, r.1, r.2);
    }
    for second in 0..10 {
        for (p, rows) in rows.iter_mut().enumerate() {
            let n = rows.partition_point(|r| r.2 < (second + 1) * 1_000);
            let now: Vec<In> = rows.drain(..n).collect();
            h.feed(p as u32, &now).await;
        }
    }
    for p in 0..3 {
        h.end(p).await;
    }
    let want: Vec<String> = want
        .iter()
        .map(|((end, key), (c, s))| {
            let (start, end) = ((end - 6_000) as f64 / 1000.0, *end as f64 / 1000.0);
            format!("{key} [{start},{end}) c={c} s={s}")
        })
        .collect();
    assert!(h.late.is_empty());
    assert_eq!(h.take(), want);
}

/// A pane later windows still need is shared with the emission reading it: a row added
/// to it meanwhile (by another worker, while that emission is between chunks) counts in
/// the later windows only, and the emission reads the pane as it was.
#[tokio::test]
async fn a_pane_changed_while_an_emission_reads_it_is_read_as_it_was() {
    let factory = factory(&sliding("4s", "2s"));
    let (mut a, mut b) = (factory.create().unwrap(), factory.create().unwrap());
    let ctx = Harness::ctx(0);
    // More keys in pane [0,2) than an emission's chunk (65,536 rows), and a row at 2.5s:
    // the window ending at 2s closes, the one ending at 4s (holding the pane) stays open.
    let keys: Vec<&'static str> = (0..70_000).map(|i| &*format!("k{i:05}").leak()).collect();
    let mut rows: Vec<In> = keys.iter().map(|&k| (k, 1, 1_000)).collect();
    rows.push(("zz", 1, 2_500));
    a.process_batch(batch(&rows), &ctx).await.unwrap();
    let first = a.pending(&ctx).await.unwrap().expect("a first chunk");
    // Another worker adds to the pane while the emission has more to read.
    let out = b
        .process_batch(batch(&[("k00001", 10, 1_500)]), &ctx)
        .await
        .unwrap();
    assert!(out.failed.is_empty(), "counted in the window ending at 4s");
    let mut closed = rows_of(&first);
    while let Some(more) = a.pending(&ctx).await.unwrap() {
        closed.extend(rows_of(&more));
    }
    let want: Vec<String> = keys.iter().map(|k| format!("{k} [-2,2) c=1 s=1")).collect();
    assert_eq!(closed, want);
    b.end_of_partition(&ctx).await.unwrap();
    let mut rest = Vec::new();
    while let Some(more) = b.pending(&ctx).await.unwrap() {
        rest.extend(rows_of(&more));
    }
    let mut want: Vec<String> = keys
        .iter()
        .map(|&k| match k {
            "k00001" => format!("{k} [0,4) c=2 s=11"),
            _ => format!("{k} [0,4) c=1 s=1"),
        })
        .collect();
    want.push("zz [0,4) c=1 s=1".into());
    want.push("zz [2,6) c=1 s=1".into());
    assert_eq!(rest, want);
}

/// A pane is in `size / slide` emissions and its key order is kept for the next ones: a
/// key it gains after its first window closed (on time for the later ones) is in them,
/// in key order.
#[tokio::test]
async fn a_key_a_pane_gains_after_its_first_window_is_in_the_later_ones() {
    let mut h = Harness::new(&sliding("6s", "2s"));
    h.feed(0, &[("c", 1, 1_000), ("x", 1, 2_500)]).await;
    assert_eq!(h.take(), ["c [-4,2) c=1 s=1"]);
    // Pane [0,2) gains `a` and `b` while its windows ending at 4s and 6s are open.
    h.feed(0, &[("b", 2, 1_500), ("x", 1, 4_500)]).await;
    assert_eq!(
        h.take(),
        ["b [-2,4) c=1 s=2", "c [-2,4) c=1 s=1", "x [-2,4) c=1 s=1"]
    );
    h.feed(0, &[("a", 4, 1_200), ("x", 1, 6_500)]).await;
    assert_eq!(
        h.take(),
        [
            "a [0,6) c=1 s=4",
            "b [0,6) c=1 s=2",
            "c [0,6) c=1 s=1",
            "x [0,6) c=2 s=2"
        ]
    );
    assert!(h.late.is_empty());
}

/// A pane two partitions hold is merged once for the windows holding it; a row either
/// partition adds to it after its first window (a new key, or a key's value) is in the
/// later windows: the merge is not reused once a part changed.
#[tokio::test]
async fn a_pane_merged_across_partitions_is_merged_again_when_a_part_changes() {
    let mut h = Harness::new(&sliding("6s", "2s"));
    // Both partitions known before a window closes.
    h.feed(0, &[("c", 1, 1_000)]).await;
    h.feed(1, &[("c", 10, 1_500), ("x", 1, 2_500)]).await;
    h.feed(0, &[("x", 1, 2_500)]).await;
    assert_eq!(h.take(), ["c [-4,2) c=2 s=11"]);
    // Partition 1's part of pane [0,2) changes a key's value while later windows are open.
    h.feed(1, &[("c", 100, 1_800)]).await;
    h.feed(0, &[("x", 1, 4_500)]).await;
    h.feed(1, &[("x", 1, 4_500)]).await;
    assert_eq!(h.take(), ["c [-2,4) c=3 s=111", "x [-2,4) c=2 s=2"]);
    // Partition 0's part gains a key; partition 1's pane [2,4) keeps its merge.
    h.feed(0, &[("a", 4, 1_200), ("x", 1, 6_500)]).await;
    h.feed(1, &[("x", 1, 6_500)]).await;
    assert_eq!(
        h.take(),
        ["a [0,6) c=1 s=4", "c [0,6) c=3 s=111", "x [0,6) c=4 s=4"]
    );
    assert!(h.late.is_empty());
}

#[tokio::test]
async fn sessions_merge_across_rows_and_partitions() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { session: { gap: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    );
    // a: 0s, 3s in partition 0 and 6s in partition 1 are one session (gaps < 5s); 20s starts another.
    h.feed(0, &[("a", 1, 0), ("b", 5, 1_000), ("a", 2, 3_000)])
        .await;
    h.feed(1, &[("a", 4, 6_000), ("b", 7, 30_000)]).await;
    // Watermarks: p0 3s, p1 30s → stage 3s: nothing has ended (b's ends at 6s).
    assert!(h.take().is_empty());
    h.feed(0, &[("a", 8, 20_000), ("a", 16, 40_000)]).await;
    // Stage watermark min(40, 30) = 30s: a [0,11) (merged across partitions), b [1,6) and
    // a [20,25) end before it.
    assert_eq!(
        h.take(),
        ["b [1,6) c=1 s=5", "a [0,11) c=3 s=7", "a [20,25) c=1 s=8"]
    );
    // A row that would start a session ended long ago is late; one that joins b's open
    // session (30s) is not.
    h.feed(1, &[("a", 100, 2_000), ("b", 32, 33_000)]).await;
    assert_eq!(h.late, [(1, 0)]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["b [30,38) c=2 s=39", "a [40,45) c=1 s=16"]);
}

/// Rows exactly `gap` apart are one session, as in Flink and Kafka Streams (sessions that
/// touch merge), across partitions too; a session stays open while the watermark is at its
/// end, since a row there still joins it.
#[tokio::test]
async fn sessions_that_touch_are_one_session() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { session: { gap: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    );
    h.feed(0, &[("a", 1, 0), ("a", 2, 5_000)]).await;
    h.feed(1, &[("a", 4, 10_000)]).await;
    // Both partitions at 15s, the end of a's session [0,15): it stays open.
    h.feed(0, &[("b", 5, 15_000)]).await;
    h.feed(1, &[("b", 6, 15_000)]).await;
    assert!(h.take().is_empty());
    h.feed(1, &[("a", 8, 15_000)]).await;
    assert!(h.late.is_empty());
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["a [0,20) c=4 s=15", "b [15,20) c=2 s=11"]);
}

/// An event time far ahead of the clock (microseconds read as milliseconds) is a dead
/// letter naming the value, and does not move its partition's watermark: the rows after it
/// are not late. Times at the ends of the 64-bit range are refused too, without overflow.
#[tokio::test]
async fn event_times_out_of_range_are_dead_letters_naming_the_value() {
    let mut stage = factory(
        "
group_by: [user]
event_time: t
window: { sliding: { size: 10s, slide: 5s } }
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
",
    )
    .create()
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let micros = now * 1000;
    let ctx = Harness::ctx(0);
    let out = stage
        .process_batch(
            batch(&[
                ("a", 1, 1_000),
                ("a", 2, micros),
                ("a", 3, i64::MAX),
                ("a", 4, i64::MIN),
                ("a", 5, 2_000),
            ]),
            &ctx,
        )
        .await
        .unwrap();
    let failed: Vec<(usize, &str)> = out
        .failed
        .iter()
        .map(|f| (f.row, f.reason.as_str()))
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert_eq!(failed[0].0, 1);
    assert!(
        failed[0]
            .1
            .starts_with(&format!("event time {micros} ms (")),
        "{}",
        failed[0].1
    );
    assert!(
        failed[0]
            .1
            .contains("more than max_event_time_skew (1day) ahead of the clock")
    );
    assert!(
        failed[1].1.contains(&i64::MAX.to_string()),
        "{}",
        failed[1].1
    );
    assert_eq!(failed[2].0, 3);
    assert!(failed[2].1.contains("before the year 0"), "{}", failed[2].1);
    // The watermark is 2s, not the far future: a row at 3s is on time.
    let out = stage
        .process_batch(batch(&[("a", 6, 3_000)]), &ctx)
        .await
        .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed[0].reason);
    stage.end_of_partition(&ctx).await.unwrap();
    let mut rows = Vec::new();
    while let Some(b) = stage.pending(&ctx).await.unwrap() {
        rows.extend(rows_of(&b));
    }
    assert_eq!(rows, ["a [-5,5) c=3 s=12", "a [0,10) c=3 s=12"]);
}

/// Windows, slides, gaps and lateness longer than 100 years are refused where written.
#[test]
fn spans_beyond_a_century_are_refused() {
    let mut problems = Problems::new("test.yaml");
    let env: HashMap<String, String> = HashMap::new();
    let yaml = "
event_time: t
window: { tumbling: 1000000d }
allowed_lateness: 50000d
aggregates: { c: count() }
";
    let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).unwrap();
    AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
    let text = format!("{problems:?}");
    assert!(
        text.contains("window") && text.contains("longer than 100 years"),
        "{text}"
    );
    assert!(text.contains("allowed_lateness"), "{text}");
}

#[tokio::test]
async fn an_idle_partition_stops_holding_the_watermark_back() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("a", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 15_000)]).await;
    assert!(
        h.take().is_empty(),
        "partition 1 (watermark -1s) holds [0,10) open"
    );
    std::thread::sleep(std::time::Duration::from_millis(120));
    // Partition 1 has been idle for longer than 50ms: partition 0 alone decides.
    h.feed(0, &[("a", 4, 16_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=3"]);
    // The idle partition comes back: its rows of the emitted window are late.
    h.feed(1, &[("a", 5, 9_000), ("a", 6, 11_000)]).await;
    assert_eq!(h.late, [(1, 0)]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["a [10,20) c=3 s=13"]);
}

/// Windows close with time too: asked without a batch (as the executor does every second),
/// the stage hands out what idleness made due. When every partition has gone idle, the
/// watermark goes to the largest of theirs (as Flink flushes when its last input goes idle),
/// so the last partition to stop does not keep the windows of the others for ever.
#[tokio::test]
async fn windows_come_out_without_a_batch_once_every_partition_is_idle() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("b", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 25_000)]).await;
    assert!(h.take().is_empty(), "partition 1 holds [0,10) open");
    std::thread::sleep(std::time::Duration::from_millis(120));
    h.drain(&Harness::ctx(0)).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=2", "b [0,10) c=1 s=1"]);
    // [20,30) is open still: partition 0's watermark is 25s.
    h.drain(&Harness::ctx(1)).await;
    assert!(h.take().is_empty());
}

/// A tumbling stage with a 50 ms idle timeout whose partition 1, with `lag`, had one row
/// at 1 s and then nothing for longer than the timeout, while partition 0 went on to 15 s.
async fn partition_1_silent(lag: &Arc<sluice_engine::stats::PartitionLag>) -> Harness {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.factory.state().unwrap().watch(&info(1), lag);
    h.feed(1, &[("a", 1, 1_000)]).await;
    h.feed(0, &[("a", 2, 2_000), ("a", 3, 15_000)]).await;
    std::thread::sleep(std::time::Duration::from_millis(120));
    h
}

/// Silence is not idleness while the partition has records not done yet (in retries,
/// behind a slow stage, not fetched yet): its lag keeps its windows open, and only once it
/// is caught up does its silence let the others close them.
#[tokio::test]
async fn a_silent_partition_with_a_backlog_is_not_idle() {
    use sluice_engine::source::LogEnd;
    use sluice_engine::stats::PartitionLag;
    struct End(i64);
    impl LogEnd for End {
        fn log_end(&self) -> Option<i64> {
            Some(self.0)
        }
    }
    let behind = Arc::new(PartitionLag::new(Some(Arc::new(End(100)))));
    behind.start_at(10);
    let mut h = partition_1_silent(&behind).await;
    // Partition 1 is silent for longer than 50ms, but 90 of its records are not done.
    h.feed(0, &[("a", 4, 16_000)]).await;
    let out = h.take();
    assert!(out.is_empty(), "{out:?}");
    // Caught up (everything up to its end is done): now its silence is idleness.
    behind.advance_to(100);
    h.feed(0, &[("a", 5, 17_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=3"]);
    assert!(h.late.is_empty());
}

/// A partition whose source can say where it ends, before it has said so and before the
/// partition's start is known (the broker has not answered since the assignment), is not
/// idle: nothing says it is caught up. Once its end is read, its start still unknown,
/// silence decides.
#[tokio::test]
async fn a_silent_partition_whose_end_and_start_are_unknown_is_not_idle() {
    use sluice_engine::source::LogEnd;
    use sluice_engine::stats::PartitionLag;
    use std::sync::atomic::{AtomicI64, Ordering};
    struct End(AtomicI64);
    impl LogEnd for End {
        fn log_end(&self) -> Option<i64> {
            let end = self.0.load(Ordering::Relaxed);
            (end >= 0).then_some(end)
        }
    }
    let end = Arc::new(End(AtomicI64::new(-1)));
    let lag = Arc::new(PartitionLag::new(Some(end.clone())));
    let mut h = partition_1_silent(&lag).await;
    h.feed(0, &[("a", 4, 16_000)]).await;
    let out = h.take();
    assert!(out.is_empty(), "{out:?}");
    end.0.store(100, Ordering::Relaxed);
    h.feed(0, &[("a", 5, 17_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=3"]);
    assert!(h.late.is_empty());
}

/// Batches read and not done (behind a slow stage, in retries, before the checkpoint that
/// takes them) and pages a source fetched ahead of its reader keep a silent partition from
/// idling, also where the source cannot say where the partition ends.
#[tokio::test]
async fn a_silent_partition_with_batches_in_flight_is_not_idle() {
    use sluice_engine::source::LogEnd;
    use sluice_engine::stats::PartitionLag;
    /// A Kinesis shard's: at the tip as of its last call, with records fetched to 40.
    struct Fetched;
    impl LogEnd for Fetched {
        fn log_end(&self) -> Option<i64> {
            None
        }
        fn millis_behind(&self) -> Option<u64> {
            Some(0)
        }
        fn fetched_end(&self) -> Option<i64> {
            Some(40)
        }
    }
    for end in [None, Some(Arc::new(Fetched) as Arc<dyn LogEnd>)] {
        let fetching = end.is_some();
        let lag = Arc::new(PartitionLag::new(end));
        lag.start_at(10);
        lag.read_to(30);
        let mut h = partition_1_silent(&lag).await;
        // Records 10..30 of partition 1 are in the stages, and its silence is not idleness.
        h.feed(0, &[("a", 4, 16_000)]).await;
        assert!(h.take().is_empty(), "fetching: {fetching}");
        lag.advance_to(30);
        if fetching {
            // Done with what was read, but records 30..40 were fetched and not read.
            h.feed(0, &[("a", 5, 17_000)]).await;
            assert!(h.take().is_empty());
            lag.advance_to(40);
        }
        h.feed(0, &[("a", 6, 18_000)]).await;
        assert_eq!(h.take(), ["a [0,10) c=2 s=3"], "fetching: {fetching}");
        assert!(h.late.is_empty());
    }
}

#[tokio::test]
async fn every_aggregate_over_one_window() {
    let mut h = Harness::new(
        "
group_by: [user]
event_time: t
window: { tumbling: 1m }
aggregates:
  c: count()
  s: sum(n)
  non_null: count(n)
  lo: min(n)
  hi: max(n)
  mean: avg(n)
  distinct: count_distinct(n)
  approx: approx_count_distinct(n)
  first_n: first(n)
  last_n: last(n)
",
    );
    let rows: Vec<In> = vec![
        ("a", 5, 3_000),
        ("a", 1, 1_000),
        ("a", 9, 2_000),
        ("a", 5, 4_000),
    ];
    h.feed(0, &rows).await;
    let ctx = Harness::ctx(0);
    h.stage.end_of_partition(&ctx).await.unwrap();
    let b = h.stage.pending(&ctx).await.unwrap().unwrap();
    let int = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    assert_eq!(
        [
            int("c"),
            int("s"),
            int("non_null"),
            int("lo"),
            int("hi"),
            int("distinct"),
            int("approx"),
            int("first_n"),
            int("last_n")
        ],
        [4, 20, 4, 1, 9, 3, 3, 1, 5]
    );
    let mean = b.column_by_name("mean").unwrap();
    let mean = mean
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap();
    assert_eq!(mean.value(0), 5.0);
}

#[tokio::test]
async fn a_partition_that_continues_keeps_its_windows_open_for_its_successor() {
    let mut h = Harness::new(TUMBLING);
    // Partition 0 ends in the middle of [0,10); its records go on in partition 1 (a
    // Kinesis shard and its child).
    h.feed(0, &[("a", 1, 1_000), ("a", 2, 5_000)]).await;
    let ctx = Harness::ctx(0);
    h.stage.partition_continues(&ctx).await.unwrap();
    h.drain(&ctx).await;
    assert!(h.take().is_empty(), "its end closes nothing");
    // Another partition far ahead: the ended one still holds the watermark (3s) until a
    // successor is here.
    h.feed(2, &[("b", 1, 30_000)]).await;
    assert!(h.take().is_empty());
    let state = h.factory.state().unwrap();
    state.assign(&info(1));
    state.follows(&info(1), &["topic/0".into()]);
    // The successor starts at its parent's watermark (3s): its rows of [0,10) count there,
    // and the window comes out once, merged, when the successor's watermark passes it.
    h.feed(1, &[("a", 10, 8_000)]).await;
    assert!(h.take().is_empty());
    h.feed(1, &[("a", 20, 14_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=3 s=13"]);
    assert!(h.late.is_empty());
}
