//! `sluice bench`: runs workloads for a fixed number of events, one after another, each in
//! a process of its own, and reports per workload the throughput, the CPU it took, batch
//! latency and peak memory; writes a JSON report and an SVG chart of throughput over time.
//!
//! The built-in workloads are the Nexmark queries of `benches/nexmark/` (compiled into the
//! binary, so the command works from any directory) and two baselines over the same
//! events: `generate`, a plain loop that only makes the events (the generator's own cost),
//! and `null`, the Nexmark source into the null sink through the engine (its ceiling).
//! A pipeline file is a workload too; a `generator` or `nexmark` source gets `--events` as
//! its count.
//!
//! "Per core" is events per second of CPU time the process used (user + system, all
//! threads), the measure the Nexmark project reports for Flink (throughput divided by the
//! cores its task managers used).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sluice_connectors::nexmark::NexmarkSource;
use sluice_engine::config::yaml::{Env, ProcessEnv};
use sluice_engine::executor::{self, RunOptions};
use sluice_engine::stats::{LatencyHistogram, RunStats};
use tokio_util::sync::CancellationToken;

use crate::config::{self, PipelineConfig};
use crate::{plan, status};
use sluice_connectors::generator::GeneratorConfig;
use sluice_connectors::nexmark::NexmarkConfig;
use sluice_engine::connector::downcast_source;

/// A built-in workload: its name, what it measures, and its pipeline (none for the plain
/// generator loop).
struct Builtin {
    name: &'static str,
    about: &'static str,
    yaml: Option<&'static str>,
}

const NULL_YAML: &str = include_str!("../benches/nexmark/null.yaml");

/// Every built-in workload, in the order `nexmark` runs them.
const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "generate",
        about: "baseline: a plain loop that only generates the Nexmark events",
        yaml: None,
    },
    Builtin {
        name: "null",
        about: "baseline: Nexmark source → null sink through the engine, no stage",
        yaml: Some(NULL_YAML),
    },
    Builtin {
        name: "q0",
        about: "pass-through: every bid, projected",
        yaml: Some(include_str!("../benches/nexmark/q0.yaml")),
    },
    Builtin {
        name: "q1",
        about: "currency conversion: bid prices in euros",
        yaml: Some(include_str!("../benches/nexmark/q1.yaml")),
    },
    Builtin {
        name: "q2",
        about: "selection: bids on a fixed set of auctions",
        yaml: Some(include_str!("../benches/nexmark/q2.yaml")),
    },
    Builtin {
        name: "q5",
        about: "hot items: the auctions with the most bids per sliding window",
        yaml: Some(include_str!("../benches/nexmark/q5.yaml")),
    },
    Builtin {
        name: "q7",
        about: "highest bid per tumbling window",
        yaml: Some(include_str!("../benches/nexmark/q7.yaml")),
    },
    Builtin {
        name: "q8",
        about: "new users: people who opened an auction in the window they registered",
        yaml: Some(include_str!("../benches/nexmark/q8.yaml")),
    },
    Builtin {
        name: "q11",
        about: "user sessions: bids per bidder and session (10s gap)",
        yaml: Some(include_str!("../benches/nexmark/q11.yaml")),
    },
    Builtin {
        name: "q14",
        about: "calculation: bids in a price range, classified by hour, with a character count",
        yaml: Some(include_str!("../benches/nexmark/q14.yaml")),
    },
    Builtin {
        name: "q21",
        about: "channel id: from the hot channels' names or the url's channel_id",
        yaml: Some(include_str!("../benches/nexmark/q21.yaml")),
    },
    Builtin {
        name: "q22",
        about: "url directories: the first three directories of each bid's url",
        yaml: Some(include_str!("../benches/nexmark/q22.yaml")),
    },
    Builtin {
        name: "fanout",
        about: "one read, three outputs: q0, q1 and q2 as branches of one pipeline",
        yaml: Some(include_str!("../benches/nexmark/fanout.yaml")),
    },
];

/// The built-in pipelines by name, for tests that run them on small inputs.
pub fn builtin_pipeline(name: &str) -> Option<&'static str> {
    BUILTINS
        .iter()
        .find(|b| b.name == name)
        .and_then(|b| b.yaml)
}

/// One workload to run.
pub struct Workload {
    pub name: String,
    pub about: String,
    kind: Kind,
}

enum Kind {
    /// The plain generator loop over the source of this pipeline.
    Generate(Box<PipelineConfig>),
    Pipeline(Box<PipelineConfig>),
}

/// The variables the built-in pipelines read: the process environment, with `PARTITIONS`
/// one per core unless set (`--partitions` overrides either once parsed).
struct BenchEnv;

impl Env for BenchEnv {
    fn var(&self, name: &str) -> Option<String> {
        let value = ProcessEnv.var(name);
        match name {
            "PARTITIONS" => value.or_else(|| Some(cores().to_string())),
            _ => value,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Turns workload names (built-in names, `nexmark`, or pipeline files) into workloads of
/// `events` events each; `partitions` overrides the partitions of their sources (default
/// for the built-in ones: one per core).
pub fn resolve(
    names: &[String],
    events: u64,
    partitions: Option<u32>,
) -> anyhow::Result<Vec<Workload>> {
    let mut expanded: Vec<String> = Vec::new();
    for name in names {
        if name == "nexmark" {
            expanded.extend(BUILTINS.iter().map(|b| b.name.to_string()));
        } else {
            expanded.push(name.clone());
        }
    }
    let mut out = Vec::with_capacity(expanded.len());
    for name in expanded {
        let (about, mut config, generate) = match BUILTINS.iter().find(|b| b.name == name) {
            Some(b) => {
                let file = format!("benches/nexmark/{}.yaml", b.yaml.map_or("null", |_| b.name));
                let config = config::parse(&file, b.yaml.unwrap_or(NULL_YAML), &BenchEnv)
                    .map_err(|p| anyhow::anyhow!("{p}"))?;
                (b.about.to_string(), config, b.yaml.is_none())
            }
            None if Path::new(&name).is_file() => {
                let config = config::load(Path::new(&name)).map_err(|p| anyhow::anyhow!("{p}"))?;
                (format!("pipeline {}", config.name), config, false)
            }
            None => bail!(
                "unknown workload `{name}`: expected nexmark, {}, or a pipeline file",
                BUILTINS
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let spec = config.source.spec.as_ref();
        if let Some(n) = downcast_source::<NexmarkConfig>(spec) {
            let mut n = n.clone();
            n.count = Some(events);
            n.partitions = partitions.unwrap_or(n.partitions);
            config.source.spec = Arc::new(n);
        } else if let Some(g) = downcast_source::<GeneratorConfig>(spec) {
            let mut g = g.clone();
            g.count = Some(events);
            g.partitions = partitions.unwrap_or(g.partitions);
            config.source.spec = Arc::new(g);
        } else if generate {
            unreachable!("the generate baseline reads the Nexmark source");
        }
        let config = Box::new(config);
        let kind = if generate {
            Kind::Generate(config)
        } else {
            Kind::Pipeline(config)
        };
        out.push(Workload { name, about, kind });
    }
    Ok(out)
}

/// How a bench run is set up.
pub struct Options {
    /// Worker tasks per pipeline (default: the engine's, one per partition up to the cores).
    pub workers: Option<usize>,
    /// Source partitions (default for the built-in workloads: one per core).
    pub partitions: Option<u32>,
    /// Where `report.json` and `throughput.svg` go.
    pub out: PathBuf,
}

/// What one workload measured.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub workload: String,
    pub about: String,
    /// Events read from the source.
    pub events: u64,
    /// Rows the pipeline wrote to its sink.
    pub rows_out: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// CPU time of the process while the workload ran (user + system, every thread).
    pub cpu_seconds: f64,
    /// `cpu_seconds / seconds`: the cores the workload kept busy on average.
    pub cores_used: f64,
    /// Events per CPU-second.
    pub events_per_core_sec: f64,
    /// Time to run one batch through the stages (the plain loop: to generate it).
    pub batch_p50_ms: Option<f64>,
    pub batch_p99_ms: Option<f64>,
    /// Peak resident memory of the workload's process (`VmHWM`, reset after planning).
    pub peak_rss_bytes: Option<u64>,
    /// (seconds since the start, events read so far), every 50 ms.
    pub progress: Vec<(f64, u64)>,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub sluice_version: &'static str,
    /// `release` or `debug`: debug figures say little about the engine.
    pub build: &'static str,
    pub date: String,
    pub machine: Machine,
    pub events: u64,
    pub workloads: Vec<Outcome>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: Option<String>,
    pub memory_bytes: Option<u64>,
    pub os: String,
}

impl Machine {
    fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| kib_field(&m, "MemTotal:"));
        Machine {
            cores: cores(),
            cpu,
            memory_bytes,
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// The value of a `Name:   123 kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Peak RSS since the last reset; `None` off Linux.
fn peak_rss() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

/// Sets the peak RSS back to the current RSS (Linux ≥ 4.0), so each workload reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU time of the whole process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs the workloads one after another, prints a table, writes the report and the chart.
///
/// Each workload runs in a process of its own (this program, `bench --one`): its peak
/// memory is its own, and no workload inherits another's heap, caches or threads.
pub async fn run(
    workloads: Vec<Workload>,
    events: u64,
    options: &Options,
) -> anyhow::Result<Report> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; its figures say little about Sluice. Build with `cargo build --release`."
        );
    }
    let mut outcomes = Vec::with_capacity(workloads.len());
    for w in workloads {
        let outcome = run_in_child(&w.name, events, options)
            .await
            .with_context(|| format!("workload `{}`", w.name))?;
        println!("{}", row(&outcome));
        outcomes.push(outcome);
    }
    let report = Report {
        sluice_version: env!("CARGO_PKG_VERSION"),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: Machine::this(),
        events,
        workloads: outcomes,
    };
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let json = options.out.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = options.out.join("throughput.svg");
    chart(&report, &svg).with_context(|| format!("drawing {}", svg.display()))?;
    println!("report: {}  chart: {}", json.display(), svg.display());
    Ok(report)
}

/// Runs workload `name` in a child process and reads back what it measured.
async fn run_in_child(name: &str, events: u64, options: &Options) -> anyhow::Result<Outcome> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(["bench", "--one", name, "--events", &events.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    if let Some(w) = options.workers {
        command.args(["--workers", &w.to_string()]);
    }
    if let Some(p) = options.partitions {
        command.args(["--partitions", &p.to_string()]);
    }
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    if !output.status.success() {
        bail!("it failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading what the workload measured")
}

/// `bench --one NAME`: runs one workload in this process and prints what it measured as
/// JSON (what [`run`] starts for each workload).
pub async fn run_here(name: &str, events: u64, options: &Options) -> anyhow::Result<()> {
    let workload = resolve(&[name.to_string()], events, options.partitions)?
        .pop()
        .expect("one workload");
    let outcome = run_one(&workload, events, options).await?;
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// The table's header line.
pub fn header() -> String {
    format!(
        "{:10} {:>12} {:>8} {:>10} {:>6} {:>10} {:>9} {:>9} {:>9}",
        "workload",
        "events",
        "time",
        "events/s",
        "cores",
        "per core",
        "p50 batch",
        "p99 batch",
        "peak RSS"
    )
}

fn row(o: &Outcome) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    format!(
        "{:10} {:>12} {:>7.2}s {:>10} {:>6.2} {:>10} {:>9} {:>9} {:>9}",
        o.workload,
        status::count(o.events),
        o.seconds,
        status::rate(o.events_per_sec),
        o.cores_used,
        status::rate(o.events_per_core_sec),
        ms(o.batch_p50_ms),
        ms(o.batch_p99_ms),
        o.peak_rss_bytes
            .map_or("-".to_string(), |b| format!("{} MiB", b >> 20)),
    )
}

fn progress_bar(name: &str, events: u64) -> ProgressBar {
    let bar = ProgressBar::new(events);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:10} [{bar:40}] {human_pos}/{human_len} events  {per_sec}  eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar
}

const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What the sampler reads: the plain loop's counter, or the pipeline's records in.
#[derive(Clone)]
enum Counter {
    Loop(Arc<AtomicU64>),
    Pipeline(Arc<RunStats>),
}

impl Counter {
    fn get(&self) -> u64 {
        match self {
            Counter::Loop(n) => n.load(Ordering::Relaxed),
            Counter::Pipeline(stats) => RunStats::get(&stats.records_in),
        }
    }
}

/// Samples progress on a thread of its own: stages keep the runtime's threads busy, and a
/// sampler on the runtime would see the run in jumps.
fn spawn_sampler(
    counter: Counter,
    bar: ProgressBar,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(f64, u64)>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut samples = vec![(0.0, 0)];
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(SAMPLE_EVERY);
            let n = counter.get();
            samples.push((started.elapsed().as_secs_f64(), n));
            bar.set_position(n);
        }
        samples
    })
}

async fn run_one(w: &Workload, events: u64, options: &Options) -> anyhow::Result<Outcome> {
    let bar = progress_bar(&w.name, events);
    let latency = Arc::new(LatencyHistogram::default());

    // Planning (and the stages' start-up) is outside the measured time.
    type Run = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<u64>> + Send>>;
    let (run, counter): (Run, Counter) = match &w.kind {
        Kind::Generate(config) => {
            let Some(nexmark) = downcast_source::<NexmarkConfig>(config.source.spec.as_ref())
            else {
                unreachable!("resolve checked the source");
            };
            let source = NexmarkSource::new(nexmark.clone())?;
            let batch = config.source.batching.size;
            let progress = Arc::new(AtomicU64::new(0));
            let counter = Counter::Loop(progress.clone());
            let latency = latency.clone();
            let run = Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    generate_loop(&source, batch, &progress, &latency)
                })
                .await?
            });
            (run, counter)
        }
        Kind::Pipeline(config) => {
            let pipeline = plan::build(config)
                .await
                .map_err(|p| anyhow::anyhow!("{p}"))?;
            let stats = RunStats::new(pipeline.stages.iter().map(|s| &s.name));
            let run_options = RunOptions {
                workers: options.workers,
                ..RunOptions::default()
            };
            let counter = Counter::Pipeline(stats.clone());
            let latency = latency.clone();
            let run = Box::pin(async move {
                executor::run(
                    pipeline,
                    run_options,
                    stats.clone(),
                    CancellationToken::new(),
                    None,
                )
                .await?;
                latency.merge(&stats.batch_latency);
                Ok(RunStats::get(&stats.records_out))
            });
            (run, counter)
        }
    };

    reset_peak_rss();
    let cpu0 = cpu_time();
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = spawn_sampler(counter.clone(), bar.clone(), stop.clone());
    let result = run.await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = (cpu_time() - cpu0).as_secs_f64();
    let peak_rss_bytes = peak_rss();
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampler.join().expect("the sampler thread panicked");
    bar.finish_and_clear();
    let rows_out = result?;
    let events_read = counter.get();
    samples.push((seconds, events_read));
    let ms = |q: f64| latency.quantile(q).map(|d| d.as_secs_f64() * 1e3);
    Ok(Outcome {
        workload: w.name.clone(),
        about: w.about.clone(),
        events: events_read,
        rows_out,
        seconds,
        events_per_sec: events_read as f64 / seconds.max(1e-9),
        cpu_seconds,
        cores_used: cpu_seconds / seconds.max(1e-9),
        events_per_core_sec: events_read as f64 / cpu_seconds.max(1e-9),
        batch_p50_ms: ms(0.5),
        batch_p99_ms: ms(0.99),
        peak_rss_bytes,
        progress: samples,
    })
}

/// The generator's own cost: every partition's events made in batches, on as many threads
/// as the engine would run workers, and dropped.
fn generate_loop(
    source: &NexmarkSource,
    batch: usize,
    progress: &AtomicU64,
    latency: &LatencyHistogram,
) -> anyhow::Result<u64> {
    let partitions = source.partitions();
    let threads = partitions.min(cores() as u32);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for p in (t..partitions).step_by(threads as usize) {
                        let mut partition = source.partition(p);
                        loop {
                            let started = Instant::now();
                            let env = partition.generate(batch)?;
                            let n = env.batch.num_rows() as u64;
                            if n == 0 {
                                break;
                            }
                            latency.record(started.elapsed());
                            progress.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a generator thread panicked")?;
        }
        Ok(0)
    })
}

/// Throughput over time, one line per workload, as an SVG file.
fn chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    // Rates over sliding 250 ms spans: 50 ms samples alone are noisy.
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .workloads
        .iter()
        .map(|o| {
            let label = format!("{} ({})", o.workload, status::rate(o.events_per_sec));
            (label, rates(&o.progress, 0.25))
        })
        .collect();
    let max_t = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(0.1, f64::max);
    let max_rate = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.1, f64::max);
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "sluice bench: {} events per workload ({} build, {} cores)",
        status::count(report.events),
        report.build,
        report.machine.cores
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_t * 1.02, 0.0..max_rate * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the workload started")
        .y_desc("million events/s")
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// (time, million events/s) over spans of at least `span` seconds.
fn rates(progress: &[(f64, u64)], span: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(progress.len());
    let mut from = 0;
    for (i, &(t, n)) in progress.iter().enumerate().skip(1) {
        while from + 1 < i && t - progress[from + 1].0 >= span {
            from += 1;
        }
        let (t0, n0) = progress[from];
        if t > t0 {
            out.push((t, (n - n0) as f64 / (t - t0) / 1e6));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_span_at_least_the_window() {
        let p = [(0.0, 0), (0.1, 100), (0.2, 200), (0.3, 300), (0.4, 400)];
        let r = rates(&p, 0.25);
        assert_eq!(r.len(), 4);
        for (_, rate) in r {
            assert!((rate - 1000.0 / 1e6).abs() < 1e-9, "{rate}");
        }
    }

    #[test]
    fn proc_fields_read_in_bytes() {
        let text = "Name:\tsluice\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(kib_field(text, "VmHWM:"), Some(123456 * 1024));
        assert_eq!(kib_field(text, "VmPeak:"), None);
    }
}
