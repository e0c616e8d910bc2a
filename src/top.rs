//! `sluice top`: running pipelines at a glance, from their metrics endpoints.
//!
//! Every second each address's `/metrics` is read; rates are the difference between two
//! reads. A `--processes` supervisor lists its members (`sluice_member_metrics`), which
//! are read too. Per pipeline: each stage's rows per second in and out, batch time p50 and
//! p99, busy and back-pressured time, failures, retries, breaker, CPU per million rows;
//! the source and the outputs; each partition's lag (with a sparkline on a terminal); the
//! processes, their workers and the autoscaler's last decision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::status::{count, rate};

/// A port alone is on this machine.
pub fn address(text: &str) -> String {
    if text.parse::<u16>().is_ok() {
        format!("127.0.0.1:{text}")
    } else {
        text.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string()
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, mut rest) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while let Some((key, after)) = rest.split_once("=\"") {
            let mut text = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => text.push('\n'),
                        Some((_, other)) => text.push(other),
                        None => {}
                    },
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => text.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), text);
            rest = after[end..].trim_start_matches(',');
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// One process's last two reads.
#[derive(Default)]
pub(crate) struct Process {
    reads: VecDeque<(Instant, Vec<Sample>)>,
    error: Option<String>,
}

impl Process {
    fn latest(&self) -> &[Sample] {
        self.reads.back().map_or(&[], |r| r.1.as_slice())
    }

    /// The sum of `name` where `pipeline` (and `label`, when given) match: now, and its
    /// growth per second since the read before.
    fn get(&self, name: &str, pipeline: &str, label: Option<(&str, &str)>) -> (f64, f64) {
        let sum = |samples: &[Sample]| -> f64 {
            samples
                .iter()
                .filter(|s| {
                    s.name == name && s.labels.get("pipeline").is_some_and(|p| p == pipeline)
                })
                .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|x| x == v)))
                .map(|s| s.value)
                .sum()
        };
        let now = self.reads.back().map_or(0.0, |r| sum(&r.1));
        let per_second = match (self.reads.front(), self.reads.back()) {
            (Some(a), Some(b)) if self.reads.len() > 1 => {
                (now - sum(&a.1)).max(0.0) / b.0.duration_since(a.0).as_secs_f64().max(1e-3)
            }
            _ => 0.0,
        };
        (now, per_second)
    }

    /// Batch-time buckets of a stage since the read before (cumulative when there is one
    /// read), by upper bound.
    fn buckets(&self, pipeline: &str, stage: &str) -> Vec<(f64, f64)> {
        let read = |samples: &[Sample]| -> BTreeMap<u64, f64> {
            samples
                .iter()
                .filter(|s| s.name == "sluice_stage_batch_duration_seconds_bucket")
                .filter(|s| s.labels.get("pipeline").is_some_and(|p| p == pipeline))
                .filter(|s| s.labels.get("stage").is_some_and(|x| x == stage))
                .filter_map(|s| {
                    let le = s.labels.get("le")?;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    };
                    Some((le.to_bits(), s.value))
                })
                .collect()
        };
        let now = self.reads.back().map(|r| read(&r.1)).unwrap_or_default();
        let before = match self.reads.len() {
            2 => read(&self.reads[0].1),
            _ => BTreeMap::new(),
        };
        let mut out: Vec<(f64, f64)> = now
            .iter()
            .map(|(le, n)| {
                (
                    f64::from_bits(*le),
                    n - before.get(le).copied().unwrap_or(0.0),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The `q` quantile of cumulative buckets, interpolated within its bucket (as PromQL's
/// `histogram_quantile`); `None` without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(below.0);
            }
            let inside = (n - below.1).max(1e-9);
            return Some(below.0 + (le - below.0) * (rank - below.1) / inside);
        }
        below = (le, n);
    }
    None
}

/// What `top` shows of one pipeline.
pub struct PipelineView {
    pub name: String,
    pub members: Vec<String>,
    pub stages: Vec<StageRow>,
    pub source: String,
    pub outputs: Vec<String>,
    /// Partition, lag (records or ms), where it is read.
    pub partitions: Vec<(String, f64, &'static str, String)>,
    pub decision: Option<String>,
}

/// A stage's row, as text cells.
pub struct StageRow {
    pub cells: [String; 11],
    pub busy: f64,
    pub rows_in: f64,
}

pub const STAGE_HEADER: [&str; 11] = [
    "STAGE", "IN/s", "OUT/s", "p50 ms", "p99 ms", "BUSY", "BACKPR", "FAILED", "RETRIES", "BREAKER",
    "CPU s/M",
];

fn percent(x: f64) -> String {
    format!("{:.0}%", (x * 100.0).clamp(0.0, 100.0))
}

/// The pipelines the processes run, as `top` shows them.
fn view(processes: &BTreeMap<String, Process>) -> Vec<PipelineView> {
    let mut names = BTreeSet::new();
    for p in processes.values() {
        for s in p.latest() {
            if s.name.starts_with("sluice_")
                && let Some(name) = s.labels.get("pipeline")
            {
                names.insert(name.clone());
            }
        }
    }
    names
        .into_iter()
        .map(|name| pipeline_view(&name, processes))
        .collect()
}

fn pipeline_view(name: &str, processes: &BTreeMap<String, Process>) -> PipelineView {
    let total = |metric: &str, label: Option<(&str, &str)>| -> (f64, f64) {
        processes
            .values()
            .map(|p| p.get(metric, name, label))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    // Stage names, in the pipeline's order.
    let mut stages = label_values(processes, name, "sluice_stage_position", "stage");
    stages.sort_by(|a, b| a.0.total_cmp(&b.0));
    let stages: Vec<String> = stages.into_iter().map(|s| s.1).collect();
    let workers = total("sluice_worker_seconds_total", None).1;
    let rows = stages
        .iter()
        .map(|stage| {
            let label = Some(("stage", stage.as_str()));
            let (_, rows_in) = total("sluice_stage_rows_in_total", label);
            let (_, rows_out) = total("sluice_stage_rows_out_total", label);
            let busy = total("sluice_stage_busy_seconds_total", label).1 / workers.max(1e-9);
            let bp =
                total("sluice_stage_back_pressured_seconds_total", label).1 / workers.max(1e-9);
            let (failed, _) = total("sluice_stage_failures_total", label);
            let (retries, _) = total("sluice_stage_retries_total", label);
            let (cpu_total, cpu) = total("sluice_stage_cpu_seconds_total", label);
            let (in_total, _) = total("sluice_stage_rows_in_total", label);
            let cpu_per_m = match rows_in > 0.0 {
                true => cpu / rows_in * 1e6,
                false => cpu_total / in_total.max(1.0) * 1e6,
            };
            let mut buckets: Vec<(f64, f64)> = Vec::new();
            for p in processes.values() {
                for (le, n) in p.buckets(name, stage) {
                    match buckets.iter_mut().find(|b| b.0 == le) {
                        Some(b) => b.1 += n,
                        None => buckets.push((le, n)),
                    }
                }
            }
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let ms = |q| quantile(&buckets, q).map_or("-".into(), |s| format!("{:.2}", s * 1e3));
            let breaker = processes
                .values()
                .flat_map(|p| p.latest())
                .filter(|s| {
                    s.name == "sluice_breaker_state" && s.labels.get("stage") == Some(stage)
                })
                .map(|s| s.value as u8)
                .max()
                .map_or("-", |state| match state {
                    0 => "closed",
                    1 => "open",
                    _ => "half-open",
                });
            let busy = if workers > 0.0 { busy } else { 0.0 };
            StageRow {
                cells: [
                    stage.clone(),
                    rate(rows_in),
                    rate(rows_out),
                    ms(0.5),
                    ms(0.99),
                    percent(busy),
                    percent(if workers > 0.0 { bp } else { 0.0 }),
                    count(failed as u64),
                    count(retries as u64),
                    breaker.to_string(),
                    format!("{cpu_per_m:.3}"),
                ],
                busy,
                rows_in,
            }
        })
        .collect();
    let (_, records_in) = total("sluice_records_in_total", None);
    let readers = total("sluice_reader_seconds_total", None).1;
    let (src_cpu_total, src_cpu) = total("sluice_source_cpu_seconds_total", None);
    let source = format!(
        "source: {} in, back-pressured {}, CPU {:.3} s per million records",
        rate(records_in),
        percent(total("sluice_source_back_pressured_seconds_total", None).1 / readers.max(1e-9)),
        match records_in > 0.0 {
            true => src_cpu / records_in * 1e6,
            false => src_cpu_total / total("sluice_records_in_total", None).0.max(1.0) * 1e6,
        }
    );
    let outputs: Vec<String> = label_values(processes, name, "sluice_output_rows_total", "output")
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    let outputs = outputs
        .iter()
        .map(|o| {
            let label = Some(("output", o.as_str()));
            format!(
                "output {o}: {} rows, busy {}",
                rate(total("sluice_output_rows_total", label).1),
                percent(total("sluice_output_busy_seconds_total", label).1),
            )
        })
        .collect();
    let mut partitions = Vec::new();
    let mut members = Vec::new();
    let mut decision: Option<(f64, String)> = None;
    for (addr, p) in processes {
        let mine: Vec<&Sample> = p
            .latest()
            .iter()
            .filter(|s| s.labels.get("pipeline").is_some_and(|x| x == name))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let value = |metric: &str| mine.iter().find(|s| s.name == metric).map(|s| s.value);
        members.push(
            match (value("sluice_workers"), value("sluice_worker_processes")) {
                (Some(w), _) => format!(
                    "{addr}: {w} workers ({} wanted)",
                    value("sluice_workers_desired").unwrap_or(w)
                ),
                (None, Some(n)) => format!(
                    "{addr}: supervisor of {n} worker processes ({} wanted)",
                    value("sluice_worker_processes_desired").unwrap_or(n)
                ),
                _ => addr.clone(),
            },
        );
        for s in &mine {
            let unit = match s.name.as_str() {
                "sluice_partition_lag_records" => "records",
                "sluice_partition_lag_ms" => "ms",
                _ => continue,
            };
            if let Some(partition) = s.labels.get("partition") {
                partitions.push((partition.clone(), s.value, unit, addr.clone()));
            }
        }
        for s in mine
            .iter()
            .filter(|s| s.name == "sluice_autoscaler_last_decision_seconds")
        {
            if decision.as_ref().is_none_or(|d| d.0 < s.value) {
                let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
                let now = sluice_engine::dead_letter::now_ms() as f64 / 1e3;
                let ago = (now - s.value).max(0.0);
                let text = format!(
                    "{} {} → {}, {ago:.0} s ago: {}",
                    l("direction"),
                    l("from"),
                    l("to"),
                    l("reason")
                );
                decision = Some((s.value, text));
            }
        }
    }
    partitions.sort_by(|a, b| a.0.cmp(&b.0));
    PipelineView {
        name: name.to_string(),
        members,
        stages: rows,
        source,
        outputs,
        partitions,
        decision: decision.map(|d| d.1),
    }
}

/// Each distinct value of `label` on `metric`'s samples of `pipeline`, with the sample's
/// value (the first process's that has it), in the order the processes list them.
fn label_values(
    processes: &BTreeMap<String, Process>,
    pipeline: &str,
    metric: &str,
    label: &str,
) -> Vec<(f64, String)> {
    let mut out: Vec<(f64, String)> = Vec::new();
    let samples = processes
        .values()
        .flat_map(|p| p.latest())
        .filter(|s| s.name == metric && s.labels.get("pipeline").is_some_and(|p| p == pipeline));
    for s in samples {
        if let Some(value) = s.labels.get(label)
            && !out.iter().any(|(_, x)| x == value)
        {
            out.push((s.value, value.clone()));
        }
    }
    out
}

/// The snapshot as plain text (`--once`, or stdout not a terminal).
pub fn text(pipelines: &[PipelineView], errors: &[String]) -> String {
    let mut out = String::new();
    for e in errors {
        out.push_str(&format!("unreachable: {e}\n"));
    }
    for p in pipelines {
        out.push_str(&format!("pipeline {}\n", p.name));
        for m in &p.members {
            out.push_str(&format!("  process {m}\n"));
        }
        if let Some(d) = &p.decision {
            out.push_str(&format!("  autoscaler: {d}\n"));
        }
        let mut widths: Vec<usize> = STAGE_HEADER.iter().map(|h| h.len()).collect();
        for row in &p.stages {
            for (w, c) in widths.iter_mut().zip(&row.cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut l = String::from(" ");
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                match i {
                    0 => l.push_str(&format!(" {c:<w$}")),
                    _ => l.push_str(&format!(" {c:>w$}")),
                }
            }
            l.push('\n');
            l
        };
        out.push_str(&line(STAGE_HEADER.to_vec()));
        for row in &p.stages {
            out.push_str(&line(row.cells.iter().map(String::as_str).collect()));
        }
        out.push_str(&format!("  {}\n", p.source));
        for o in &p.outputs {
            out.push_str(&format!("  {o}\n"));
        }
        if !p.partitions.is_empty() {
            out.push_str("  PARTITION  LAG  PROCESS\n");
            for (partition, lag, unit, addr) in &p.partitions {
                out.push_str(&format!(
                    "  {partition}  {} {unit}  {addr}\n",
                    count(*lag as u64)
                ));
            }
        }
    }
    out
}

/// Reads every process (and the members supervisors list) once more.
async fn refresh(
    client: &reqwest::Client,
    given: &[String],
    processes: &mut BTreeMap<String, Process>,
) {
    let mut addrs: BTreeSet<String> = given.iter().cloned().collect();
    for p in processes.values() {
        for s in p
            .latest()
            .iter()
            .filter(|s| s.name == "sluice_member_metrics")
        {
            if let Some(addr) = s.labels.get("addr") {
                addrs.insert(addr.clone());
            }
        }
    }
    processes.retain(|addr, _| addrs.contains(addr));
    let reads = futures::future::join_all(addrs.iter().map(|addr| async move {
        let url = format!("http://{addr}/metrics");
        let text = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.map_err(|e| e.to_string()),
            Ok(r) => Err(format!("{url}: {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        };
        (addr.clone(), text)
    }))
    .await;
    for (addr, text) in reads {
        let p = processes.entry(addr).or_default();
        match text {
            Ok(text) => {
                p.error = None;
                p.reads.push_back((Instant::now(), parse(&text)));
                while p.reads.len() > 2 {
                    p.reads.pop_front();
                }
            }
            Err(e) => p.error = Some(e),
        }
    }
}

fn errors(processes: &BTreeMap<String, Process>) -> Vec<String> {
    processes.values().filter_map(|p| p.error.clone()).collect()
}

/// `sluice top`.
pub async fn run(addrs: &[String], once: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let given: Vec<String> = match addrs.is_empty() {
        true => vec!["127.0.0.1:9898".into()],
        false => addrs.iter().map(|a| address(a)).collect(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut processes = BTreeMap::new();
    if once || !std::io::stdout().is_terminal() {
        refresh(&client, &given, &mut processes).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        refresh(&client, &given, &mut processes).await;
        let pipelines = view(&processes);
        let errors = errors(&processes);
        print!("{}", text(&pipelines, &errors));
        if pipelines.is_empty() {
            bail!("no pipeline answered at {}", given.join(", "));
        }
        return Ok(());
    }
    crate::top_ui::run(&client, &given, &mut processes).await
}

/// What the terminal UI needs of the model.
pub(crate) struct Model<'a> {
    pub client: &'a reqwest::Client,
    pub given: &'a [String],
}

impl Model<'_> {
    pub async fn refresh(
        &self,
        processes: &mut BTreeMap<String, Process>,
    ) -> (Vec<PipelineView>, Vec<String>) {
        refresh(self.client, self.given, processes).await;
        (view(processes), errors(processes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_with_its_labels() {
        let samples = parse(
            "# TYPE x counter\nsluice_a{pipeline=\"p\",reason=\"lag \\\"4\\\", up\"} 3\nsluice_b 2.5\n",
        );
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["reason"], "lag \"4\", up");
        assert_eq!(samples[0].labels["pipeline"], "p");
        assert_eq!(samples[1].value, 2.5);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let buckets = [
            (0.001, 0.0),
            (0.01, 50.0),
            (0.1, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p50 = quantile(&buckets, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p99 = quantile(&buckets, 0.99).unwrap();
        assert!(p99 > 0.09 && p99 <= 0.1, "{p99}");
        assert_eq!(quantile(&[(0.1, 0.0)], 0.5), None);
    }

    #[test]
    fn a_port_alone_is_on_this_machine() {
        assert_eq!(address("9898"), "127.0.0.1:9898");
        assert_eq!(address("http://h:1/metrics"), "h:1");
    }
}
