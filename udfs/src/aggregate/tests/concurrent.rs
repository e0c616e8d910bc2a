//! Workers on threads of their own, as the executor runs them: each reads its partitions,
//! adds their batches and asks for what closed after each, while the others add and emit.
//! Every window must come out once and complete, whichever worker emitted it, also when
//! the workers end their partitions at about the same time.

use std::collections::BTreeMap;

use super::*;

const USERS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const WORKERS: u32 = 4;
const PARTITIONS_EACH: u32 = 2;
const BATCHES: i64 = 30;
const ROWS: i64 = 40;

/// Partition `p`'s rows, batch by batch: every user in every partition, times rising by
/// 25 ms a row with a pause of 3 s every 300 rows (so that sessions of a 1 s gap end, at
/// points that differ between partitions).
fn rows_of_partition(p: u32) -> Vec<Vec<In>> {
    let mut t = i64::from(p) * 7;
    (0..BATCHES)
        .map(|b| {
            (0..ROWS)
                .map(|r| {
                    let i = b * ROWS + r;
                    t += if (i + i64::from(p) * 37) % 300 == 0 {
                        3_000
                    } else {
                        25
                    };
                    (USERS[(i as usize + p as usize) % USERS.len()], i % 7, t)
                })
                .collect()
        })
        .collect()
}

/// The rows every worker emitted, each worker feeding its partitions in turn on its own
/// thread.
fn run_workers(yaml: &str) -> Vec<String> {
    let factory = factory(yaml);
    // Assigned before any reads, as the executor does: no window closes before every
    // partition holds it back.
    let state = factory.state().expect("a stateful stage");
    for p in 0..WORKERS * PARTITIONS_EACH {
        state.assign(&info(p));
    }
    let threads: Vec<_> = (0..WORKERS)
        .map(|w| {
            let factory = factory.clone();
            std::thread::spawn(move || {
                futures::executor::block_on(async move {
                    let mut h = Harness::with(factory);
                    let parts: Vec<u32> = (0..PARTITIONS_EACH)
                        .map(|i| w * PARTITIONS_EACH + i)
                        .collect();
                    let input: Vec<Vec<Vec<In>>> =
                        parts.iter().map(|&p| rows_of_partition(p)).collect();
                    // A batch of each partition in turn.
                    for b in 0..BATCHES as usize {
                        for (&p, batches) in parts.iter().zip(&input) {
                            h.feed(p, &batches[b]).await;
                        }
                    }
                    for &p in &parts {
                        h.end(p).await;
                    }
                    assert!(h.late.is_empty(), "late rows: {:?}", h.late);
                    h.take()
                })
            })
        })
        .collect();
    let mut out: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("worker thread"))
        .collect();
    out.sort();
    out
}

/// Every row of every partition.
fn all_rows() -> Vec<In> {
    (0..WORKERS * PARTITIONS_EACH)
        .flat_map(rows_of_partition)
        .flatten()
        .collect()
}

fn row(user: &str, (start, end): (i64, i64), (c, s): (i64, i64)) -> String {
    format!(
        "{user} [{},{}) c={c} s={s}",
        start as f64 / 1000.0,
        end as f64 / 1000.0
    )
}

#[test]
fn workers_emitting_beside_each_other_emit_every_tumbling_window_once() {
    let yaml = TUMBLING.replace("tumbling: 10s", "tumbling: 1s");
    let mut expected: BTreeMap<(&str, i64), (i64, i64)> = BTreeMap::new();
    for (user, n, t) in all_rows() {
        let e = expected
            .entry((user, t.div_euclid(1000) * 1000))
            .or_default();
        e.0 += 1;
        e.1 += n;
    }
    let mut expected: Vec<String> = expected
        .into_iter()
        .map(|((user, start), cs)| row(user, (start, start + 1000), cs))
        .collect();
    expected.sort();
    for _ in 0..10 {
        assert_eq!(run_workers(&yaml), expected);
    }
}

#[test]
fn workers_emitting_beside_each_other_emit_every_session_once() {
    let yaml = TUMBLING.replace("tumbling: 10s", "session: { gap: 1s }");
    let mut rows = all_rows();
    rows.sort_by_key(|r| (r.0, r.2));
    let mut expected = Vec::new();
    // (user, start, end, count, sum) of the session being built.
    let mut open: Option<(&str, i64, i64, i64, i64)> = None;
    for (user, n, t) in rows {
        match &mut open {
            Some(o) if o.0 == user && t <= o.2 => {
                o.2 = o.2.max(t + 1000);
                o.3 += 1;
                o.4 += n;
            }
            _ => {
                if let Some((u, start, end, c, s)) = open.replace((user, t, t + 1000, 1, n)) {
                    expected.push(row(u, (start, end), (c, s)));
                }
            }
        }
    }
    let (u, start, end, c, s) = open.expect("rows");
    expected.push(row(u, (start, end), (c, s)));
    expected.sort();
    for _ in 0..10 {
        assert_eq!(run_workers(&yaml), expected);
    }
}
