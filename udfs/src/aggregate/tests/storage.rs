//! State beyond the memory budget in RocksDB, snapshots restored, and partitions that leave
//! and come back: the same windows as in memory.

use super::*;

/// Events of 200 users over 5 minutes in two partitions, slightly out of order.
fn workload() -> Vec<(u32, Vec<In>)> {
    const USERS: [&str; 8] = ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    let mut batches = Vec::new();
    for b in 0..60 {
        for p in 0..2u32 {
            let rows: Vec<In> = (0..50)
                .map(|i| {
                    let k = b * 50 + i;
                    let t = k * 100 + p as i64 * 37 - (k % 5) * 40;
                    (USERS[((k * 7 + p as i64) % 8) as usize], k % 13, t)
                })
                .collect();
            batches.push((p, rows));
        }
    }
    batches
}

const SPILLING: &str = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
allowed_lateness: 1s
idle_timeout: 1h
aggregates:
  c: count()
  s: sum(n)
state: { memory: 1KiB }
";

async fn run_workload(h: &mut Harness, batches: &[(u32, Vec<In>)]) {
    for (p, rows) in batches {
        h.feed(*p, rows).await;
    }
}

/// Runs the workload through `yaml` with its 1 KiB budget and with 1 GiB: the same rows
/// (in the same order, unless `any_order`) and late rows, and entries did leave memory.
/// Returns the windows and the store.
async fn spilling_matches_memory(yaml: &str, any_order: bool) -> (Vec<String>, RocksStore) {
    let batches = workload();
    let mut reference = Harness::new(&yaml.replace("1KiB", "1GiB"));
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let store = RocksStore::scratch().unwrap();
    let spilling = Arc::new(concrete(yaml));
    let mut h = Harness::with(spilling.clone());
    h.factory
        .state()
        .unwrap()
        .restore(store.db().unwrap())
        .unwrap();
    run_workload(&mut h, &batches).await;
    let evicted = spilling
        .shared
        .evicted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(evicted > 100, "only {evicted} entries left memory");
    h.end(0).await;
    h.end(1).await;
    let mut got = h.take();
    let mut expected = expected;
    if any_order {
        got.sort();
        expected.sort();
    }
    assert_eq!(got, expected);
    assert_eq!(h.late, reference.late);
    (expected, store)
}

#[tokio::test]
async fn state_beyond_the_budget_is_kept_in_rocksdb_with_the_same_results() {
    let (windows, _) = spilling_matches_memory(SPILLING, false).await;
    assert_eq!(windows.len(), 30 * 8);
}

/// Sliding windows keep one pane per slide: a pane that spilled is read whole for the
/// windows that close while it still changes, and lazily (then deleted) for its last one.
/// Same windows as in memory, and nothing left in the database.
#[tokio::test]
async fn sliding_panes_beyond_the_budget_give_the_same_windows() {
    let sliding = SPILLING.replace("{ tumbling: 10s }", "{ sliding: { size: 10s, slide: 2s } }");
    let (windows, store) = spilling_matches_memory(&sliding, false).await;
    assert!(windows.len() > 5 * 30 * 7, "{}", windows.len());
    assert_eq!(keys_left(&store, b"/w/"), 0);
}

/// Panes that snapshots wrote to the database and that stay in memory (none evicted) are
/// merged across the partitions from memory: the same windows as without a database, and
/// their entries leave the database with their last window.
#[tokio::test]
async fn checkpointed_panes_merged_across_partitions_leave_the_database_with_their_last_window() {
    let sliding = SPILLING
        .replace("{ tumbling: 10s }", "{ sliding: { size: 10s, slide: 2s } }")
        .replace("1KiB", "1GiB");
    let batches = workload();
    let mut reference = Harness::new(&sliding);
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;

    let store = RocksStore::scratch().unwrap();
    let mut h = Harness::new(&sliding);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    for some in batches.chunks(7) {
        run_workload(&mut h, some).await;
        state.snapshot().unwrap();
        assert!(
            keys_left(&store, b"/w/") > 0,
            "open panes are in the database"
        );
    }
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), reference.take());
    assert_eq!(h.late, reference.late);
    assert_eq!(keys_left(&store, b"/w/"), 0);
}

/// Keys of the store whose name has `space` (`/w/`: panes, `/s/`: sessions, `/e/`: session
/// end markers).
fn keys_left(store: &RocksStore, space: &[u8]) -> usize {
    let db = store.db().unwrap();
    db.iterator(rocksdb::IteratorMode::Start)
        .map(|kv| kv.unwrap().0)
        .filter(|k| k.windows(3).any(|w| w == space))
        .count()
}

fn sessions(gap: &str) -> String {
    SPILLING.replace(
        "{ tumbling: 10s }",
        &format!("{{ session: {{ gap: {gap} }} }}"),
    )
}

/// Sessions beyond the budget leave memory for the database (with a marker at their
/// earliest end) and come back when a row of their key comes or their end is due: with a
/// 500 ms gap sessions close all along; with 1 s every user's rows are closer than the gap,
/// so every session is open until the end of the input, and they are read back in key
/// order, a chunk at a time. The same sessions as in memory, and nothing left in the
/// database.
#[tokio::test]
async fn sessions_beyond_the_budget_give_the_same_sessions() {
    for (gap, closing_all_along) in [("500ms", true), ("1s", false)] {
        let (rows, store) = spilling_matches_memory(&sessions(gap), true).await;
        if closing_all_along {
            assert!(rows.len() > 1000, "{gap}: {}", rows.len());
        } else {
            assert_eq!(rows.len(), 8, "{gap}: one session per user: {rows:?}");
        }
        assert_eq!(keys_left(&store, b"/s/"), 0, "{gap}");
        assert_eq!(keys_left(&store, b"/e/"), 0, "{gap}");
    }
}

#[tokio::test]
async fn a_restored_snapshot_goes_on_as_if_nothing_happened() {
    assert!(
        restored_snapshot_goes_on(SPILLING).await > 0,
        "work was lost"
    );
}

/// A key's session that closed on its own while another partition's session of the key
/// held their group open is looked at again at the group's end: when that partition has
/// left meanwhile (taken over elsewhere), the session comes out as a row of its own while
/// the input goes on, not only at its end; in memory and written out of it alike.
#[tokio::test]
async fn a_session_held_open_by_a_partition_that_leaves_still_comes_out() {
    for budget in ["1GiB", "1KiB"] {
        let mut h = Harness::new(&sessions("10s").replace("1KiB", budget));
        let state = h.factory.state().unwrap();
        let store = RocksStore::scratch().unwrap();
        state.restore(store.db().unwrap()).unwrap();
        state.assign(&info(0));
        state.assign(&info(1));
        // k: [0,10) in partition 0 and [8,18) in partition 1, one group.
        h.feed(0, &[("k", 1, 0)]).await;
        h.feed(1, &[("k", 2, 8_000)]).await;
        // Both at 12.5s: partition 0's session is closed, its group is not.
        h.feed(0, &[("a", 1, 13_500)]).await;
        h.feed(1, &[("b", 1, 13_500)]).await;
        assert!(h.take().is_empty(), "{budget}");
        // Partition 1 leaves (its part is the next owner's); partition 0 goes on.
        state.revoke(&info(1));
        state.release(&info(1));
        h.feed(0, &[("a", 1, 40_000)]).await;
        let rows = h.take();
        assert!(
            rows.iter().any(|r| r == "k [0,10) c=1 s=1"),
            "{budget}: {rows:?}"
        );
    }
}

/// Sessions in the database at a checkpoint are read lazily after the restart: the keys
/// into a filter, the sessions when a row or their end marker needs them.
#[tokio::test]
async fn restored_sessions_beyond_the_budget_go_on_as_if_nothing_happened() {
    for gap in ["500ms", "1s"] {
        restored_snapshot_goes_on(&sessions(gap)).await;
    }
}

/// Runs the workload through `yaml`, checkpointing after 50 batches, "crashing" 20 batches
/// later and going on from the checkpoint: every row of the uninterrupted run, and only
/// the rows emitted after the checkpoint twice. Returns how many those were.
async fn restored_snapshot_goes_on(yaml: &str) -> usize {
    let batches = workload();
    let mut reference = Harness::new(yaml);
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let lost;
    {
        let store = RocksStore::open(dir.path()).unwrap();
        let mut h = Harness::new(yaml);
        let state = h.factory.state().unwrap();
        state.restore(store.db().unwrap()).unwrap();
        run_workload(&mut h, &batches[..50]).await;
        checkpoint(&state, &store);
        out.extend(h.take());
        // Work after the checkpoint that a crash loses (its output was emitted, so it
        // will be emitted again: duplicates, never different rows).
        run_workload(&mut h, &batches[50..70]).await;
        let rows = h.take();
        lost = rows.len();
        out.extend(rows);
    }
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(yaml);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    // Both assigned before data, as a source assigns them: a partition restored and not
    // assigned is not this process's, and is left out of emissions.
    state.assign(&info(0));
    state.assign(&info(1));
    run_workload(&mut h, &batches[50..]).await;
    h.end(0).await;
    h.end(1).await;
    out.extend(h.take());
    let mut distinct = out.clone();
    distinct.sort();
    distinct.dedup();
    let mut want = expected.clone();
    want.sort();
    let missing: Vec<_> = want.iter().filter(|w| !distinct.contains(w)).collect();
    let wrong: Vec<_> = distinct.iter().filter(|w| !want.contains(w)).collect();
    assert!(
        missing.is_empty() && wrong.is_empty(),
        "every window once, with the uninterrupted result: missing {missing:?}, wrong {wrong:?}"
    );
    assert_eq!(
        out.len(),
        expected.len() + lost,
        "what the lost work emitted was emitted again, nothing else twice"
    );
    lost
}

/// A partition that leaves (revoked, its state checkpointed and released) while the others
/// emit, and comes back, is judged by its own progress: its rows of windows only the others
/// closed count, and its windows come out complete (keys live in one partition).
#[tokio::test]
async fn a_partition_that_comes_back_is_judged_by_its_own_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    state.assign(&info(1));
    h.feed(1, &[("b", 1, 1_000), ("b", 2, 3_000)]).await;
    h.feed(0, &[("a", 1, 2_000)]).await;
    assert!(h.take().is_empty());
    checkpoint(&state, &store);
    state.revoke(&info(1));
    state.release(&info(1));
    // Partition 0 alone: [0,10) and [10,20) close.
    h.feed(0, &[("a", 2, 25_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1"]);
    // Partition 1 is back, at its checkpointed progress (watermark 1s).
    state.assign(&info(1));
    h.feed(1, &[("b", 4, 5_000), ("b", 8, 12_000)]).await;
    assert!(h.late.is_empty(), "its rows of [0,10) count");
    assert_eq!(h.take(), ["b [0,10) c=3 s=7"]);
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), ["b [10,20) c=1 s=8", "a [20,30) c=1 s=2"]);
}

/// A checkpoint in `dir` of a tumbling aggregate that has `a` at 1s in partition 0 and `b`
/// at 2s in partition 1.
async fn checkpoint_two_partitions(dir: &std::path::Path) {
    let store = RocksStore::open(dir).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    h.feed(0, &[("a", 1, 1_000)]).await;
    h.feed(1, &[("b", 2, 2_000)]).await;
    checkpoint(&state, &store);
}

/// After a restart, the partitions in the checkpoint that this process is not assigned
/// (another process owns them now) are neither emitted nor read: only the assigned ones.
#[tokio::test]
async fn restored_partitions_not_assigned_here_are_not_emitted() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_two_partitions(dir.path()).await;
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    h.feed(0, &[("a", 3, 3_000)]).await;
    // Partition 1 (restored, owned elsewhere) holds the watermark back until idle...
    assert!(h.take().is_empty());
    std::thread::sleep(std::time::Duration::from_millis(120));
    // ...and then its partial window is not emitted beside partition 0's.
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=4"]);
}

/// At the end of a bounded input, a partition that has not ended (silent, held up behind
/// retries) is closed only through its own progress, not to the end of time: its later
/// rows still count.
#[tokio::test]
async fn the_end_of_the_input_does_not_close_a_partition_that_has_not_ended() {
    let mut h = Harness::new(&TUMBLING.replace("idle_timeout: 1h", "idle_timeout: 50ms"));
    h.feed(1, &[("a", 1, 1_000), ("a", 2, 15_000)]).await;
    h.feed(0, &[("b", 5, 2_000)]).await;
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1", "b [0,10) c=1 s=5"]);
    std::thread::sleep(std::time::Duration::from_millis(120));
    // Partition 1 is idle and partition 0 has ended: [10,20) stays open for partition 1.
    h.end(0).await;
    assert!(h.take().is_empty());
    h.feed(1, &[("a", 3, 16_000)]).await;
    assert!(h.late.is_empty());
    h.end(1).await;
    assert_eq!(h.take(), ["a [10,20) c=2 s=5"]);
}

/// A revoked partition's windows are the next owner's to emit: emissions here leave them.
#[tokio::test]
async fn a_revoked_partition_is_not_emitted_here() {
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.assign(&info(0));
    state.assign(&info(1));
    h.feed(1, &[("b", 1, 1_000), ("b", 2, 30_000)]).await;
    h.feed(0, &[("a", 1, 2_000)]).await;
    state.revoke(&info(1));
    h.feed(0, &[("a", 2, 25_000)]).await;
    assert_eq!(h.take(), ["a [0,10) c=1 s=1"]);
}

/// Once a bounded source has assigned all it will, restored partitions it did not assign
/// are not this process's: they stop holding the watermark back.
#[tokio::test]
async fn restored_partitions_never_assigned_stop_holding_the_watermark_back() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_two_partitions(dir.path()).await;
    let store = RocksStore::open(dir.path()).unwrap();
    let mut h = Harness::new(TUMBLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    state.assign(&info(0));
    state.assignments_done();
    h.feed(0, &[("a", 3, 3_000)]).await;
    h.end(0).await;
    assert_eq!(h.take(), ["a [0,10) c=2 s=4"]);
}

#[test]
fn mistakes_are_named() {
    let parse = |yaml: &str| {
        let mut problems = Problems::new("test.yaml");
        let env: HashMap<String, String> = HashMap::new();
        let node = sluice_engine::config::yaml::parse(yaml, &env, &mut problems).unwrap();
        let config = AggregateConfig::parse(&node, &Location::root(), &[], &mut problems);
        match config {
            Some(c) => c
                .plan("agg", &schema())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            None => problems
                .iter()
                .map(|p| p.message.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    };
    let base = "event_time: t\nwindow: { tumbling: 1m }\naggregates: { c: count() }\n";
    assert!(
        parse(&base.replace("count()", "median(n)"))
            .contains("unknown aggregate function `median`")
    );
    assert!(parse(&base.replace("count()", "sum()")).contains("`sum` needs a column"));
    assert!(parse(&base.replace("count()", "sum(user)")).contains("sum and avg need numbers"));
    assert!(parse(&base.replace("count()", "max(nope)")).contains("`nope` is not a column"));
    assert!(
        parse(&base.replace("event_time: t", "event_time: user")).contains("must be a timestamp")
    );
    assert!(
        parse(&base.replace("{ tumbling: 1m }", "{ sliding: { size: 5m, slide: 2m } }"))
            .contains("multiple of the slide")
    );
    assert!(parse(&format!("{base}group_by: [c]\n")).contains("`c` is not a column"));
    assert!(
        parse(&base.replace("c: count()", "window_end: count()")).contains("choose another name")
    );
    assert!(parse(&base.replace("count()", "max_by(n)")).contains("`max_by` needs two columns"));
    assert!(parse(&base.replace("count()", "'sum(n, t)'")).contains("`sum` takes one column"));
    assert!(
        parse(&format!("{base}top: {{ by: nope }}\n")).contains("must name one of the aggregates")
    );
    assert!(parse(&format!("{base}top: {{ by: c, n: 0 }}\n")).contains("at least 1"));
    assert!(
        parse(
            &format!("{base}top: {{ by: c }}\n")
                .replace("{ tumbling: 1m }", "{ session: { gap: 1m } }")
        )
        .contains("session windows are per key")
    );
    assert_eq!(parse(base), "");
}

/// `max_by`/`min_by` keep the value of the row with the largest/smallest `by`; of tied
/// rows, the earliest in event time, whichever partition it came from.
#[tokio::test]
async fn max_by_and_min_by_pick_a_row_and_ties_go_to_the_earliest() {
    let mut h = Harness::new(
        "
event_time: t
window: { tumbling: 1m }
aggregates:
  top_user: max_by(user, n)
  low_user: min_by(user, n)
  top_n: max(n)
",
    );
    h.feed(0, &[("late-tie", 9, 5_000), ("small", 1, 2_000)])
        .await;
    h.feed(
        1,
        &[
            ("early-tie", 9, 3_000),
            ("also-small", 1, 1_000),
            ("mid", 4, 4_000),
        ],
    )
    .await;
    let (c0, c1) = (Harness::ctx(0), Harness::ctx(1));
    h.stage.end_of_partition(&c0).await.unwrap();
    h.stage.end_of_partition(&c1).await.unwrap();
    let b = h.stage.pending(&c1).await.unwrap().unwrap();
    let text = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0)
            .to_string()
    };
    assert_eq!(b.num_rows(), 1);
    assert_eq!(text("top_user"), "early-tie");
    assert_eq!(text("low_user"), "also-small");
}

/// `top` keeps the rows of each window ranked 1..=n by an aggregate, ties included (as
/// RANK() does), and drops the rest — also when a window has more rows than the
/// candidates it keeps while emitting.
#[tokio::test]
async fn top_keeps_the_highest_ranked_rows_of_each_window_with_ties() {
    let yaml = "
group_by: [user]
event_time: t
window: { tumbling: 10s }
aggregates:
  c: count()
top: { by: c, n: 2 }
";
    let mut h = Harness::new(yaml);
    // Window [0,10s): a=3, b=3, c=2, d=1 -> ranks 1,1,3,4: a and b only.
    // Window [10s,20s): e=1, f=2, g=1 -> ranks 2,1,2: all three (g and e tie for 2nd).
    let rows: Vec<In> = vec![
        ("a", 0, 1_000),
        ("b", 0, 1_000),
        ("a", 0, 2_000),
        ("c", 0, 2_000),
        ("b", 0, 3_000),
        ("a", 0, 3_000),
        ("b", 0, 4_000),
        ("c", 0, 4_000),
        ("d", 0, 5_000),
        ("e", 0, 11_000),
        ("f", 0, 12_000),
        ("f", 0, 13_000),
        ("g", 0, 14_000),
    ];
    h.feed(0, &rows).await;
    h.end(0).await;
    let users: Vec<String> = h
        .take()
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(users, ["a", "b", "e", "f", "g"]);

    // 10,000 keys in one window (more than the candidates kept while emitting): the two
    // keys with the most rows.
    let mut h = Harness::new(yaml);
    let names: Vec<&'static str> = (0..10_000)
        .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
        .collect();
    let mut rows: Vec<In> = names.iter().map(|n| (*n, 0, 1_000)).collect();
    rows.extend([
        (names[7], 0, 2_000),
        (names[9_999], 0, 2_000),
        (names[9_999], 0, 3_000),
    ]);
    h.feed(0, &rows).await;
    h.end(0).await;
    let users: Vec<String> = h
        .take()
        .iter()
        .map(|r| r.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(users, ["k7", "k9999"]);
}

#[tokio::test]
async fn a_partition_released_and_assigned_again_continues_from_its_stored_state() {
    let batches = workload();
    let mut reference = Harness::new(SPILLING);
    run_workload(&mut reference, &batches).await;
    reference.end(0).await;
    reference.end(1).await;
    let expected = reference.take();

    let store = RocksStore::scratch().unwrap();
    let mut h = Harness::new(SPILLING);
    let state = h.factory.state().unwrap();
    state.restore(store.db().unwrap()).unwrap();
    run_workload(&mut h, &batches[..40]).await;
    // A rebalance: the partition is drained, checkpointed and let go, then comes back.
    state.snapshot().unwrap();
    let p1 = PartitionInfo {
        id: 1,
        name: "topic/1".into(),
    };
    // Assigned again before the release of its drain arrives: the release keeps it.
    state.revoke(&p1);
    state.assign(&p1);
    state.release(&p1);
    run_workload(&mut h, &batches[40..44]).await;
    // Revoked, drained and released; then assigned again: it comes back from the store.
    state.snapshot().unwrap();
    state.revoke(&p1);
    state.release(&p1);
    state.assign(&p1);
    run_workload(&mut h, &batches[44..]).await;
    h.end(0).await;
    h.end(1).await;
    assert_eq!(h.take(), expected);
}
