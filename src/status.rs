//! What `sluice run` shows a person: a live status line on a terminal, and a summary.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::busy::{self, Split};
use sluice_engine::executor::RunReport;
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `412345.0` → `412k/s`.
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.0}k/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}/s")
    }
}

/// Redraws one status line on stderr until `done` is cancelled, when stderr is a terminal.
/// Await the handle after cancelling: the task erases its line before it ends.
pub fn spawn_status_line(
    name: String,
    stats: Arc<RunStats>,
    done: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (0u64, 0u64, Instant::now());
        let mut busy_before: Vec<u64> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (rin, rout) = (
                RunStats::get(&stats.records_in),
                RunStats::get(&stats.records_out),
            );
            let dt = last.2.elapsed().as_secs_f64().max(1e-3);
            let slowest = slowest_output(&stats, &mut busy_before, dt);
            eprint!(
                "\r\x1b[2K▶ {name}  in {} ({})  out {} ({})  failed {}  {:.1}s{slowest}",
                count(rin),
                rate((rin - last.0) as f64 / dt),
                count(rout),
                rate((rout - last.1) as f64 / dt),
                count(RunStats::get(&stats.records_failed)),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            last = (rin, rout, Instant::now());
        }
        eprint!("\r\x1b[2K");
    }))
}

/// With several outputs, the one that was busy writing most of the last `seconds` (more
/// than half of them), which holds every branch back: `  slow output: kafka 97% busy`.
fn slowest_output(stats: &RunStats, before: &mut Vec<u64>, seconds: f64) -> String {
    let outputs = stats.outputs();
    let now: Vec<u64> = outputs
        .iter()
        .map(|o| RunStats::get(&o.busy_nanos))
        .collect();
    let busiest = now
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                i,
                (n - before.get(i).copied().unwrap_or(0)) as f64 / 1e9 / seconds,
            )
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    *before = now;
    match busiest {
        Some((i, busy)) if outputs.len() > 1 && busy > 0.5 => format!(
            "  slow output: {} {:.0}% busy",
            outputs[i].name,
            (busy * 100.0).min(100.0)
        ),
        _ => String::new(),
    }
}

/// CPU seconds, and per million `rows` (the self-hosted equivalent of a function's bill).
fn cpu(nanos: u64, rows: u64) -> String {
    let seconds = nanos as f64 / 1e9;
    if rows == 0 {
        return format!("{seconds:.2}s");
    }
    format!(
        "{seconds:.2}s ({:.3}s per million rows)",
        seconds * 1e6 / rows as f64
    )
}

/// The end-of-run summary: totals, per-stage counts and timings, what the sink wrote.
pub fn summary(name: &str, stats: &RunStats, report: &RunReport) -> String {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let rin = RunStats::get(&stats.records_in);
    let mut out = format!(
        "{name}: {} records in, {} out, {} failed in {:.2}s ({}, {} workers)\n",
        count(rin),
        count(RunStats::get(&stats.records_out)),
        count(RunStats::get(&stats.records_failed)),
        secs,
        rate(rin as f64 / secs),
        report.workers,
    );
    let width = stats.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let workers = stats.worker_time.nanos();
    for s in &stats.stages {
        let ms = |q: f64| s.latency.quantile(q).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        out.push_str(&format!(
            "  stage {:width$}  {:>12} in  {:>12} out  {:>6} batches  p50/p95/p99 {:.2}/{:.2}/{:.2} ms  cold start {:.1}ms\n",
            s.name,
            count(RunStats::get(&s.rows_in)),
            count(RunStats::get(&s.rows_out)),
            count(RunStats::get(&s.batches)),
            ms(0.5),
            ms(0.95),
            ms(0.99),
            s.cold_start().as_secs_f64() * 1e3,
        ));
        let rows = RunStats::get(&s.rows_in);
        let split = Split::of(
            RunStats::get(&s.busy_nanos),
            RunStats::get(&s.back_pressured_nanos),
            workers,
        );
        out.push_str(&format!(
            "  {:width$}        busy {:.0}%, back-pressured {:.0}%, idle {:.0}%; CPU {}\n",
            "",
            split.busy * 100.0,
            split.back_pressured * 100.0,
            split.idle * 100.0,
            cpu(RunStats::get(&s.cpu_nanos), rows),
        ));
        let (hits, misses) = (RunStats::get(&s.cache_hits), RunStats::get(&s.cache_misses));
        if hits + misses > 0 {
            out.push_str(&format!(
                "  {:width$}        cache: {} hits, {} misses ({:.1}% hit rate)\n",
                "",
                count(hits),
                count(misses),
                hits as f64 * 100.0 / (hits + misses) as f64,
            ));
        }
        let (retries, dead, bisections) = (
            RunStats::get(&s.retries),
            RunStats::get(&s.dead_letters),
            RunStats::get(&s.bisections),
        );
        if retries + dead + bisections > 0 {
            out.push_str(&format!(
                "  {:width$}        {} rows retried, {} dead-lettered, {} bisections\n",
                "",
                count(retries),
                count(dead),
                count(bisections),
            ));
        }
        let late = RunStats::get(&s.late_dropped);
        if late > 0 {
            out.push_str(&format!(
                "  {:width$}        {} late rows dropped (their windows had closed; no dead-letter sink)\n",
                "",
                count(late),
            ));
        }
    }
    let decode_dead = RunStats::get(&stats.records_dead_lettered).saturating_sub(
        stats
            .stages
            .iter()
            .map(|s| RunStats::get(&s.dead_letters))
            .sum(),
    );
    if decode_dead > 0 {
        out.push_str(&format!(
            "  source: {} records did not decode (dead-lettered)\n",
            count(decode_dead)
        ));
    }
    let readers = Split::of(
        RunStats::get(&stats.source_cpu_nanos),
        RunStats::get(&stats.source_blocked_nanos),
        stats.reader_time.nanos(),
    );
    out.push_str(&format!(
        "  source: back-pressured {:.0}% (waiting for a worker); CPU {}\n",
        readers.back_pressured * 100.0,
        cpu(RunStats::get(&stats.source_cpu_nanos), rin),
    ));
    let outputs = stats.outputs();
    for o in outputs {
        out.push_str(&format!(
            "  output {}: {} rows, busy {:.0}% of the run; CPU {}\n",
            o.name,
            count(RunStats::get(&o.rows)),
            RunStats::get(&o.busy_nanos) as f64 / 1e9 * 100.0 / secs,
            cpu(RunStats::get(&o.cpu_nanos), RunStats::get(&o.rows)),
        ));
    }
    let measured: u64 = stats
        .stages
        .iter()
        .map(|s| RunStats::get(&s.cpu_nanos))
        .chain(outputs.iter().map(|o| RunStats::get(&o.cpu_nanos)))
        .sum::<u64>()
        + RunStats::get(&stats.source_cpu_nanos);
    for point in stats.taps.get().iter().flat_map(|t| t.points()) {
        let (sent, skipped) = (RunStats::get(&point.rows), RunStats::get(&point.skipped));
        if sent + skipped > 0 {
            out.push_str(&format!(
                "  tap {}: {} rows to readers, {} skipped (a reader was behind)\n",
                point.name,
                count(sent),
                count(skipped)
            ));
        }
    }
    let process = busy::process_cpu_nanos();
    out.push_str(&format!(
        "  CPU: {:.2}s in the stages, source and outputs, of {:.2}s the process used\n",
        measured as f64 / 1e9,
        process as f64 / 1e9,
    ));
    out.push_str(&format!("  sink: {}", report.sink));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_an_output_busy_most_of_the_time() {
        use sluice_engine::stats::OutputStats;
        let stats = RunStats::new([]);
        let _ = stats.outputs.set(
            ["files", "topic"]
                .into_iter()
                .map(|name| OutputStats {
                    name: name.into(),
                    ..Default::default()
                })
                .collect(),
        );
        let mut before = Vec::new();
        assert_eq!(slowest_output(&stats, &mut before, 1.0), "");
        RunStats::add(&stats.outputs()[0].busy_nanos, 100_000_000);
        RunStats::add(&stats.outputs()[1].busy_nanos, 900_000_000);
        assert_eq!(
            slowest_output(&stats, &mut before, 1.0),
            "  slow output: topic 90% busy"
        );
        // Only what it was busy since the last line counts.
        assert_eq!(slowest_output(&stats, &mut before, 1.0), "");
    }

    #[test]
    fn formats_numbers_for_people() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(100), "100");
        assert_eq!(rate(412_345.0), "412k/s");
        assert_eq!(rate(12_500_000.0), "12.50M/s");
    }
}
