//! The Nexmark queries of `benches/nexmark/` (the pipelines `sluice bench` runs), each run
//! through the engine on a small input and compared with the query computed independently:
//! DataFusion over the same events as one table, with the windows written out in SQL the
//! way the Flink queries define them.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use sluice_connectors::nexmark::{NexmarkConfig, NexmarkSource};

/// 30 seconds of event time at 1,000 events per second over 3 partitions: three 10s
/// tumbling windows, seventeen 10s/2s sliding ones.
const VARS: &[(&str, &str)] = &[
    ("EVENTS", "30000"),
    ("EVENT_RATE", "1000"),
    ("PARTITIONS", "3"),
];

/// Runs built-in query `name` into Parquet files and returns its rows, and a DataFusion
/// context holding the same events as `events` with the Flink views `person`, `auction`,
/// `bid` over it (`ts`: event time in epoch milliseconds).
async fn run_query(name: &str) -> (Vec<RecordBatch>, SessionContext) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = sluice::bench::builtin_pipeline(name).expect("a built-in query");
    let null_sink = "sink:\n  type: null";
    assert!(yaml.contains(null_sink), "{name} writes to the null sink");
    let yaml = yaml.replace(
        null_sink,
        &format!(
            "sink:\n  type: file\n  path: {}\n  format: parquet",
            dir.path().display()
        ),
    );
    let (stats, _) = crate::run_yaml(&yaml, VARS).await.unwrap();
    assert_eq!(
        sluice_engine::stats::RunStats::get(&stats.records_in),
        30_000
    );
    let out = read_parquet(dir.path());

    let config = crate::parse(&yaml, VARS).unwrap();
    let Some(nexmark) = config.source.spec_as::<NexmarkConfig>() else {
        panic!("{name} reads the nexmark source");
    };
    let source = NexmarkSource::new(nexmark.clone()).unwrap();
    let mut events = Vec::new();
    for p in 0..source.partitions() {
        let mut partition = source.partition(p);
        loop {
            let batch = partition.generate(4096).unwrap().batch;
            if batch.num_rows() == 0 {
                break;
            }
            events.push(batch.project(&[0, 1, 2, 3, 4]).unwrap());
        }
    }
    let ctx = SessionContext::new();
    let all = arrow::compute::concat_batches(&events[0].schema(), &events).unwrap();
    ctx.register_batch("events", all).unwrap();
    for view in [
        "CREATE VIEW person AS SELECT person['id'] AS id, person['name'] AS name, \
         CAST(date_time AS BIGINT) AS ts FROM events WHERE event_type = 0",
        "CREATE VIEW auction AS SELECT auction['id'] AS id, auction['seller'] AS seller, \
         CAST(date_time AS BIGINT) AS ts FROM events WHERE event_type = 1",
        "CREATE VIEW bid AS SELECT bid['auction'] AS auction, bid['bidder'] AS bidder, \
         bid['price'] AS price, bid['extra'] AS extra, CAST(date_time AS BIGINT) AS ts, \
         CAST(bid['channel'] AS VARCHAR) AS channel, CAST(bid['url'] AS VARCHAR) AS url \
         FROM events WHERE event_type = 2",
    ] {
        ctx.sql(view).await.unwrap().collect().await.unwrap();
    }
    (out, ctx)
}

pub fn read_parquet(dir: &Path) -> Vec<RecordBatch> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&f).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        out.extend(reader.map(|b| b.unwrap()));
    }
    out
}

async fn query(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Every row as `a|b|c`, timestamps as epoch milliseconds, sorted.
fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for batch in batches {
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                DataType::Timestamp(..) => cast(c, &DataType::Int64).unwrap(),
                _ => c.clone(),
            })
            .collect();
        let options = FormatOptions::default().with_null("null");
        let formatters: Vec<_> = columns
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect();
            out.push(cells.join("|"));
        }
    }
    out.sort();
    out
}

/// Runs built-in query `name` and compares its rows with what `reference` (SQL over the
/// views of [`run_query`]) computes, sorted.
async fn matches_reference(name: &str, reference: &str) {
    let (out, ctx) = run_query(name).await;
    let reference = query(&ctx, reference).await;
    let (ours, reference) = (rows(&out), rows(&reference));
    assert!(!reference.is_empty(), "{name}: the reference has no rows");
    assert_eq!(ours.len(), reference.len(), "{name}: row counts differ");
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert_eq!(a, b, "{name}: sorted row {i} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q0_passes_every_bid_through() {
    matches_reference("q0", "SELECT auction, bidder, price, ts, extra FROM bid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q1_converts_every_price() {
    matches_reference(
        "q1",
        "SELECT auction, bidder, 0.908 * price AS price, ts, extra FROM bid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q2_selects_the_bids_on_every_123rd_auction() {
    matches_reference(
        "q2",
        "SELECT auction, price FROM bid WHERE auction % 123 = 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q5_finds_the_hottest_auctions_of_every_sliding_window() {
    // HOP(size 10s, slide 2s): a bid at t is in the five windows starting at
    // floor(t / 2s) * 2s - k * 2s, k = 0..4. Every auction tied for the most bids.
    matches_reference(
        "q5",
        "WITH windows AS (
             SELECT auction, (ts / 2000) * 2000 - k * 2000 AS window_start
             FROM bid CROSS JOIN (VALUES (0), (1), (2), (3), (4)) AS o(k)),
         counts AS (
             SELECT auction, window_start, count(*) AS num FROM windows
             GROUP BY auction, window_start),
         maxes AS (
             SELECT window_start, max(num) AS maxn FROM counts GROUP BY window_start)
         SELECT c.auction, c.window_start, c.window_start + 10000, c.num
         FROM counts c JOIN maxes m
           ON c.window_start = m.window_start AND c.num >= m.maxn",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q7_finds_the_highest_bid_of_every_tumbling_window() {
    let (out, ctx) = run_query("q7").await;
    // Every bid at its window's top price; the pipeline keeps the earliest of tied ones.
    let reference = query(
        &ctx,
        "WITH b AS (SELECT *, (ts / 10000) * 10000 AS window_start FROM bid),
         top AS (SELECT window_start, max(price) AS maxprice FROM b GROUP BY window_start)
         SELECT b.window_start, b.window_start + 10000, b.auction, b.price, b.bidder, b.ts,
                b.extra
         FROM b JOIN top ON b.window_start = top.window_start AND b.price = top.maxprice",
    )
    .await;
    let reference = rows(&reference);
    let mut by_window: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &reference {
        by_window
            .entry(r.split('|').next().unwrap().to_string())
            .or_default()
            .push(r.clone());
    }
    let ours = rows(&out);
    assert_eq!(ours.len(), by_window.len(), "q7: one row per window");
    let time = |r: &str| r.split('|').nth(5).unwrap().parse::<i64>().unwrap();
    for row in &ours {
        let window = row.split('|').next().unwrap();
        let candidates = &by_window[window];
        assert!(
            candidates.contains(row),
            "q7: {row} is not a top bid: {candidates:?}"
        );
        let earliest = candidates.iter().map(|c| time(c)).min().unwrap();
        assert_eq!(time(row), earliest, "q7: ties go to the earliest bid");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q8_finds_people_who_sold_in_the_window_they_joined() {
    matches_reference(
        "q8",
        "WITH p AS (SELECT id, name, (ts / 10000) * 10000 AS window_start FROM person),
         a AS (SELECT DISTINCT seller, (ts / 10000) * 10000 AS window_start FROM auction)
         SELECT p.id, p.name, p.window_start
         FROM p JOIN a ON p.id = a.seller AND p.window_start = a.window_start",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q11_counts_the_bids_of_each_bidders_sessions() {
    // A bid 10s or more after the bidder's previous one starts a new session.
    matches_reference(
        "q11",
        "WITH b AS (
             SELECT bidder, ts,
                    CASE WHEN ts - lag(ts) OVER (PARTITION BY bidder ORDER BY ts) < 10000
                         THEN 0 ELSE 1 END AS new
             FROM bid),
         s AS (
             SELECT bidder, ts,
                    sum(new) OVER (PARTITION BY bidder ORDER BY ts
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS session
             FROM b)
         SELECT bidder, min(ts), max(ts) + 10000, count(*) FROM s GROUP BY bidder, session",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q14_classifies_and_counts_in_a_price_range() {
    matches_reference(
        "q14",
        "SELECT auction, bidder, 0.908 * price,
                CASE WHEN (ts / 3600000) % 24 BETWEEN 8 AND 18 THEN 'dayTime'
                     WHEN (ts / 3600000) % 24 <= 6 OR (ts / 3600000) % 24 >= 20 THEN 'nightTime'
                     ELSE 'otherTime' END,
                ts, extra,
                length(extra) - length(regexp_replace(extra, 'c', '', 'g'))
         FROM bid WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q21_adds_the_channel_id() {
    matches_reference(
        "q21",
        "SELECT auction, bidder, price, channel, id FROM (
             SELECT auction, bidder, price, channel,
                    CASE WHEN channel = 'Apple' THEN '0' WHEN channel = 'Google' THEN '1'
                         WHEN channel = 'Facebook' THEN '2' WHEN channel = 'Baidu' THEN '3'
                         ELSE nullif(split_part(url, 'channel_id=', 2), '') END AS id
             FROM bid)
         WHERE id IS NOT NULL",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q22_splits_every_url_into_directories() {
    matches_reference(
        "q22",
        "SELECT auction, bidder, price, channel,
                array_element(string_to_array(url, '/'), 4),
                array_element(string_to_array(url, '/'), 5),
                array_element(string_to_array(url, '/'), 6)
         FROM bid",
    )
    .await;
}

/// The generator's events look like the benchmark's: proportions, id ranges, hot items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_have_the_benchmarks_shape() {
    let (_, ctx) = run_query("q2").await;
    let kinds = query(
        &ctx,
        "SELECT event_type, count(*) FROM events GROUP BY event_type",
    )
    .await;
    assert_eq!(rows(&kinds), vec!["0|600", "1|1800", "2|27600"]);
    // Half the bids go to hot auctions (every 100th id), most of the rest to the 100 most
    // recent auctions; 3 in 4 bidders are hot (every 100th person id, plus one).
    let hot = rows(
        &query(
            &ctx,
            "SELECT avg(CASE WHEN (auction - 1000) % 100 = 0 THEN 1.0 ELSE 0.0 END) > 0.45,
                    avg(CASE WHEN (bidder - 1001) % 100 = 0 THEN 1.0 ELSE 0.0 END) > 0.7
             FROM bid",
        )
        .await,
    );
    assert_eq!(hot, vec!["true|true"]);
    let people = rows(
        &query(
            &ctx,
            "SELECT count(DISTINCT id), min(id), max(id) FROM person",
        )
        .await,
    );
    assert_eq!(people, vec!["600|1001|1600"]);
}

/// `sluice bench` runs every Nexmark workload and writes what it promises.
#[test]
fn sluice_bench_writes_a_report_and_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bench");
    let out = crate::sluice(&[
        "bench",
        "nexmark",
        "--events",
        "20000",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = crate::text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        crate::text(&out.stderr)
    );
    assert!(stdout.starts_with("workload"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let workloads = report["workloads"].as_array().unwrap();
    let names: Vec<&str> = workloads
        .iter()
        .map(|w| w["workload"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "generate", "null", "q0", "q1", "q2", "q5", "q7", "q8", "q11", "q14", "q21", "q22",
            "fanout"
        ]
    );
    for w in workloads {
        let name = w["workload"].as_str().unwrap();
        assert!(
            stdout.contains(&format!("\n{name} ")),
            "{name} has a row: {stdout}"
        );
        assert_eq!(w["events"], 20000, "{name}");
        assert!(w["events_per_sec"].as_f64().unwrap() > 0.0, "{name}");
        assert!(w["cpu_seconds"].as_f64().unwrap() > 0.0, "{name}");
        assert!(w["batch_p99_ms"].as_f64().is_some(), "{name}");
        assert!(w["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{name}");
        assert!(!w["progress"].as_array().unwrap().is_empty(), "{name}");
    }
    // 20,000 events hold 18,400 bids: q0 writes every one.
    assert_eq!(workloads[2]["rows_out"], 18400);
    // One read, three outputs: what q0, q1 and q2 wrote on their own reads.
    let alone: u64 = (2..5)
        .map(|i| workloads[i]["rows_out"].as_u64().unwrap())
        .sum();
    assert_eq!(workloads[12]["rows_out"].as_u64().unwrap(), alone);
    assert_eq!(workloads[12]["events"], 20000);
    assert_eq!(report["machine"]["cores"].as_u64().unwrap() as usize, {
        std::thread::available_parallelism().unwrap().get()
    });
    let svg = std::fs::read_to_string(out_dir.join("throughput.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("q8"),
        "{}",
        &svg[..100]
    );

    let unknown = crate::sluice(&["bench", "q9"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(crate::text(&unknown.stderr).contains("unknown workload `q9`"));
}
