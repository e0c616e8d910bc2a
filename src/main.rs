//! The `sluice` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::Count;
use sluice::{config, plan, status, testing};
use sluice_engine::autoscale::ScalingPolicy;
use sluice_engine::executor::{self, RunOptions};
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streaming pipelines of Arrow function stages, declared in YAML.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until its source ends or Ctrl-C.
    Run {
        /// The pipeline file.
        file: PathBuf,
        /// Worker tasks: a number, or `auto` to follow the partitions' lag (the pipeline's
        /// `scaling:` section, or its defaults). Default: `scaling:` when the pipeline has
        /// one, else one per partition, at most one per core.
        #[arg(long, value_name = "N|auto")]
        workers: Option<Count>,
        /// No status line and no summary.
        #[arg(long, short)]
        quiet: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics: a port alone (9898) serves this
        /// machine only (127.0.0.1); serving others takes an address (0.0.0.0:9898).
        #[arg(long, value_name = "PORT|ADDR", value_parser = metrics_addr)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Run the pipeline as N worker processes (`sluice worker`): members of a Kafka
        /// source's consumer group, or sharing a Kinesis stream's shards by leases; or as
        /// many as the lag asks for (`auto`, by the `scaling:` section).
        /// Partitions move between them with their state, through the checkpoint directory.
        #[arg(long, value_name = "N|auto", conflicts_with = "workers")]
        processes: Option<Count>,
        /// Serve taps at http://ADDR/tap on the metrics address: `sluice tap` prints the
        /// rows of a stage as they go by (off by default).
        #[arg(long, requires = "metrics_addr")]
        tap: bool,
    },
    /// Run the pipeline as one worker process (a member of its Kafka consumer group, or
    /// sharing its Kinesis stream's shards by leases in the checkpoint directory), started
    /// by something else (`sluice run --processes`, Kubernetes, `docker compose --scale`).
    Worker {
        /// The pipeline file.
        file: PathBuf,
        /// This member's name: its checkpoint store is DIR/members/NAME in the pipeline's
        /// checkpoint directory (default: $SLUICE_MEMBER, else $HOSTNAME — a pod's name).
        #[arg(long)]
        member: Option<String>,
        /// Worker tasks in this process (default as for `run`).
        #[arg(long, value_name = "N|auto")]
        workers: Option<Count>,
        /// Serve Prometheus metrics at http://ADDR/metrics (a port alone: 127.0.0.1 only).
        #[arg(long, value_name = "PORT|ADDR", value_parser = metrics_addr)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Ignore the `scaling:` section (the supervisor scales processes by it).
        #[arg(long, hide = true)]
        no_scaling: bool,
        /// Serve taps at http://ADDR/tap on the metrics address (off by default).
        #[arg(long, requires = "metrics_addr")]
        tap: bool,
        /// Run without metrics when the metrics address is taken (the supervisor gives
        /// its members theirs; a member still draining may hold the port a while).
        #[arg(long, hide = true)]
        metrics_optional: bool,
    },
    /// Watch running pipelines: stages, partitions and workers, refreshed every second,
    /// from their metrics addresses (`--metrics-addr`). Keys: q quits, s sorts the
    /// stages, tab switches between pipelines. Not on a terminal (or with --once), prints
    /// one plain-text snapshot.
    Top {
        /// Metrics addresses (HOST:PORT or a port on this machine) of `sluice run` or
        /// `sluice worker` processes, or of a `--processes` supervisor (its members are
        /// found from it). Default: 127.0.0.1:9898.
        addrs: Vec<String>,
        /// Print one snapshot (two scrapes a second apart) as plain text and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print the rows leaving a stage of a running pipeline (run with --metrics-addr and
    /// --tap) as JSON lines: `sink` for the rows reaching the sink, `dead_letters` for
    /// failed records. A tap never slows the pipeline: rows it cannot keep up with are
    /// skipped and counted.
    Tap {
        /// The pipeline's metrics address (HOST:PORT, or a port on this machine).
        addr: String,
        /// The stage (or `sink`, `sink.NAME`, `dead_letters`).
        #[arg(long)]
        stage: String,
        /// Only rows for which this SQL predicate holds (`country = 'fr' AND n > 3`).
        #[arg(long = "where", value_name = "SQL")]
        filter: Option<String>,
        /// Stop after this many rows.
        #[arg(long)]
        limit: Option<u64>,
        /// At most this many rows a second (the rest skipped and counted): `--rate 100/s`.
        #[arg(long, value_name = "N/s", value_parser = per_second)]
        rate: Option<f64>,
    },
    /// Check pipeline files and print every problem.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the `tests:` cases of pipeline files.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run workloads for a fixed number of events and report throughput, CPU, batch
    /// latency and memory; writes a JSON report and an SVG chart.
    Bench {
        /// `nexmark` (every query and both baselines), built-in workloads (generate, null,
        /// q0, q1, q2, q5, q7, q8, q11, q14, q21, q22) or pipeline files.
        #[arg(default_value = "nexmark")]
        workloads: Vec<String>,
        /// Events per workload.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Worker tasks per pipeline (default: one per partition, at most one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Source partitions (default for the built-in workloads: one per core).
        #[arg(long)]
        partitions: Option<u32>,
        /// Where report.json and throughput.svg are written.
        #[arg(long, default_value = "out/bench")]
        out: PathBuf,
        /// Run the one workload named here and print its figures as JSON (each workload
        /// of a bench runs so, in a process of its own).
        #[arg(long, hide = true)]
        one: bool,
    },
    /// List the functions usable in `function` stages.
    Functions,
    /// Read a pipeline's dead letters back, and re-drive them.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Counts by stage and error class, and sample records.
    Inspect {
        /// The pipeline file (its `dead_letter` sink is read).
        file: PathBuf,
        /// Sample records to show.
        #[arg(long, default_value_t = 5)]
        samples: usize,
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Re-drive dead letters into the pipeline (from the stage where each failed) or, with
    /// --to-topic, into a Kafka topic.
    Replay {
        file: PathBuf,
        #[command(flatten)]
        filter: DlqFilter,
        /// Send the original bytes and keys to this Kafka topic instead.
        #[arg(long)]
        to_topic: Option<String>,
        /// Brokers for --to-topic (default: the pipeline's Kafka source or dead-letter sink).
        #[arg(long)]
        bootstrap: Option<String>,
    },
}

#[derive(clap::Args)]
struct DlqFilter {
    /// Only letters of this stage (`source` for records that did not decode).
    #[arg(long)]
    stage: Option<String>,
    /// Only letters of this error class: decode, permanent, transient.
    #[arg(long)]
    class: Option<String>,
    /// Only letters that last failed at or after this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
}

impl DlqFilter {
    fn resolve(&self) -> Result<sluice::dlq::Filter, String> {
        let since = match &self.since {
            Some(t) => Some(
                arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(t)
                    .map_err(|_| format!("--since `{t}` is not an RFC 3339 time"))?
                    / 1_000_000,
            ),
            None => None,
        };
        Ok(sluice::dlq::Filter {
            stage: self.stage.clone(),
            class: self.class.clone(),
            since,
        })
    }
}

/// `--rate 100/s` (or `100`): rows a second.
fn per_second(text: &str) -> Result<f64, String> {
    let n = text.strip_suffix("/s").unwrap_or(text);
    match n.trim().parse::<f64>() {
        Ok(n) if n > 0.0 => Ok(n),
        _ => Err(format!("`{text}` is not a rate such as 100/s")),
    }
}

/// Exit codes: 0 success, 1 the pipeline failed or a test failed, 2 the file has problems.
const FAILED: u8 = 1;
const INVALID: u8 = 2;

/// `--metrics-addr`: a port alone is on the loopback address, so that serving metrics to
/// other machines is always said in full.
fn metrics_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is not a port (9898) or an address (127.0.0.1:9898)"))
}

fn main() -> ExitCode {
    // RocksDB (C++) allocates through glibc, which gives every thread that allocates an arena
    // of its own (up to 8 per core): stage state spilled by several workers and compactions
    // left a few hundred MiB resident in mostly empty arenas. Two arenas keep RocksDB's
    // memory close to what it uses; Rust's allocations go to mimalloc either way.
    //
    // glibc also raises its mmap threshold each time a large block it mapped is freed (up to
    // 32 MiB) and keeps up to twice that free at the top of its heap: RocksDB's memtables,
    // compaction buffers and table readers then come from the heap and their memory stays
    // resident after they go. A fixed trim threshold (128 KiB, glibc's starting value)
    // turns that adjustment off: 10 million keys spilled at a 32 MiB state budget peaked at
    // 210-228 MiB instead of 250-281 (docs/aggregation.md, Measured).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; mallopt only sets tuning parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
    // mimalloc asks for transparent huge pages on its arenas (MADV_HUGEPAGE): a fault then
    // makes 2 MiB resident at once, and memory it gives back in 64 KiB pieces stays resident
    // around what is still used. With stage state freed and reused all the time that cost
    // 80-200 MiB of resident memory at a 256 MiB state budget and 10-20% of the CPU in
    // zeroing huge pages (docs/aggregation.md, Measured). The flag is inherited by the worker
    // processes of `--processes`.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for people: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run {
                file,
                metrics_addr,
                processes: Some(count),
                tap,
                ..
            } => supervise(file, count, (metrics_addr, tap)).await,
            Command::Run {
                file,
                workers,
                quiet,
                metrics_addr,
                processes: None,
                tap,
            } => run(file, workers, quiet, (metrics_addr, tap, false), None).await,
            Command::Worker {
                file,
                member,
                workers,
                metrics_addr,
                no_scaling,
                tap,
                metrics_optional,
            } => {
                let member = member
                    .or_else(|| std::env::var("SLUICE_MEMBER").ok())
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| format!("worker-{}", std::process::id()));
                let member = Member {
                    name: member,
                    scaled: !no_scaling,
                };
                let metrics = (metrics_addr, tap, metrics_optional);
                run(file, workers, true, metrics, Some(member)).await
            }
            Command::Validate { files } => validate(files).await,
            Command::Top { addrs, once } => match sluice::top::run(&addrs, once).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    FAILED
                }
            },
            Command::Tap {
                addr,
                stage,
                filter,
                limit,
                rate,
            } => {
                let addr = sluice::top::address(&addr);
                match sluice::tap::client(&addr, &stage, filter.as_deref(), limit, rate).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        FAILED
                    }
                }
            }
            Command::Test { files } => test(files).await,
            Command::Dlq { command } => dlq(command).await,
            Command::Bench {
                workloads,
                events,
                workers,
                partitions,
                out,
                one,
            } => {
                let options = sluice::bench::Options {
                    workers,
                    partitions,
                    out,
                };
                bench(workloads, events, options, one).await
            }
            Command::Functions => {
                for f in sluice_udfs::functions::REGISTRY {
                    println!("{:12} {}", f.name, f.summary);
                }
                0
            }
        }
    });
    ExitCode::from(code)
}

async fn bench(names: Vec<String>, events: u64, options: sluice::bench::Options, one: bool) -> u8 {
    if one {
        let [name] = names.as_slice() else {
            eprintln!("error: --one runs one workload");
            return INVALID;
        };
        return match sluice::bench::run_here(name, events, &options).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                FAILED
            }
        };
    }
    let workloads = match sluice::bench::resolve(&names, events, options.partitions) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e:#}");
            return INVALID;
        }
    };
    println!("{}", sluice::bench::header());
    match sluice::bench::run(workloads, events, &options).await {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            FAILED
        }
    }
}

async fn dlq(command: DlqCommand) -> u8 {
    let (file, filter) = match &command {
        DlqCommand::Inspect { file, filter, .. } | DlqCommand::Replay { file, filter, .. } => {
            (file, filter)
        }
    };
    let config = match config::load(file) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("{problems}");
            return INVALID;
        }
    };
    let filter = match filter.resolve() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return INVALID;
        }
    };
    let letters = match tokio::task::block_in_place(|| sluice::dlq::read(&config)) {
        Ok(all) => all
            .into_iter()
            .filter(|l| filter.keeps(l))
            .collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("error: {e:#}");
            return FAILED;
        }
    };
    match command {
        DlqCommand::Inspect { samples, .. } => {
            print!("{}", sluice::dlq::inspect(&letters, samples));
            0
        }
        DlqCommand::Replay {
            to_topic: Some(topic),
            bootstrap,
            ..
        } => {
            let Some(bootstrap) = bootstrap.or_else(|| sluice::dlq::bootstrap_of(&config)) else {
                eprintln!("error: give --bootstrap: the pipeline names no Kafka brokers");
                return INVALID;
            };
            match tokio::task::block_in_place(|| {
                let options = sluice::dlq::client_options_of(&config);
                sluice::dlq::replay_to_topic(&letters, &bootstrap, &topic, &options)
            }) {
                Ok(n) => {
                    println!("replayed {n} dead letters to topic `{topic}`");
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    FAILED
                }
            }
        }
        DlqCommand::Replay { .. } => {
            match sluice::dlq::replay_into_pipeline(&config, &letters).await {
                Ok(r) => {
                    println!(
                        "replayed {} dead letters: {} rows out, {} failed again (in the dead letters again)",
                        r.letters, r.out, r.failed_again
                    );
                    for u in &r.unreadable {
                        println!("  not replayed (still does not fit): {u}");
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    FAILED
                }
            }
        }
    }
}

/// How the pipeline's workers are set: `--workers` over the `scaling:` section. A fixed
/// count keeps the section's parallelization factor.
fn run_options(
    workers: Option<Count>,
    scaling: Option<&ScalingPolicy>,
    lag_in_time: bool,
) -> RunOptions {
    let scaling = match (workers, scaling) {
        (Some(Count::Fixed(n)), Some(policy)) => Some(ScalingPolicy {
            min_workers: n,
            max_workers: n,
            ..policy.clone()
        }),
        (Some(Count::Fixed(_)), None) => None,
        (Some(Count::Auto), policy) => Some(
            policy
                .cloned()
                .unwrap_or_else(|| ScalingPolicy::for_lag(lag_in_time)),
        ),
        (None, policy) => policy.cloned(),
    };
    RunOptions {
        workers: match workers {
            Some(Count::Fixed(n)) => Some(n),
            _ => None,
        },
        scaling,
        ..RunOptions::default()
    }
}

async fn supervise(
    file: PathBuf,
    count: Count,
    metrics: (Option<std::net::SocketAddr>, bool),
) -> u8 {
    let config = match load(&file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Every worker would report the same problems: check once, here.
    if let Err(problems) = plan::check(&config).await {
        eprintln!("{problems}");
        return INVALID;
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match sluice::supervise::supervise(&file, &config, count, metrics, shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            FAILED
        }
    }
}

/// The pipeline file, read; its problems printed.
fn load(file: &std::path::Path) -> Result<config::PipelineConfig, u8> {
    config::load(file).map_err(|problems| {
        eprintln!("{problems}");
        INVALID
    })
}

/// `sluice worker`: the process's member name, and whether `scaling:` sizes its tasks (not
/// when a supervisor sizes the processes by it).
struct Member {
    name: String,
    scaled: bool,
}

/// `sluice run` (no member), or `sluice worker`.
async fn run(
    file: PathBuf,
    workers: Option<Count>,
    quiet: bool,
    (metrics_addr, tap, optional): (Option<std::net::SocketAddr>, bool, bool),
    member: Option<Member>,
) -> u8 {
    let config = match load(&file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(refused) = member
        .as_ref()
        .and_then(|_| sluice::supervise::worker_refusal(&config))
    {
        eprintln!("error: `sluice worker`: {refused}");
        return INVALID;
    }
    let built = match &member {
        Some(m) => plan::build_member(&config, &m.name).await,
        None => plan::build(&config).await,
    };
    let pipeline = match built {
        Ok(p) => p,
        Err(problems) => {
            eprintln!("{problems}");
            return INVALID;
        }
    };
    let stats = RunStats::new(pipeline.stages.iter().map(|s| &s.name));
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let status_done = CancellationToken::new();
    if let Some(addr) = metrics_addr {
        let breakers = pipeline
            .stages
            .iter()
            .map(|s| s.policy.breaker.clone())
            .collect();
        if let Err(e) = sluice::metrics::serve(
            addr,
            &config.name,
            stats.clone(),
            breakers,
            tap,
            status_done.clone(),
        ) {
            if !optional {
                eprintln!("error: {e}");
                return FAILED;
            }
            tracing::warn!("running without metrics: {e}");
        }
    }
    let status_line = if quiet {
        None
    } else {
        status::spawn_status_line(config.name.clone(), stats.clone(), status_done.clone())
    };
    let scaled = member.as_ref().is_none_or(|m| m.scaled);
    let scaling = config.scaling.as_ref().filter(|_| scaled);
    let options = run_options(
        workers,
        scaling.map(|s| &s.policy),
        config.source.spec.lag_in_time().is_some(),
    );
    let result = executor::run(pipeline, options, stats.clone(), shutdown, None).await;
    status_done.cancel();
    if let Some(taps) = stats.taps.get() {
        // Taps end with the pipeline: their readers' streams finish cleanly.
        taps.close();
        if tap {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    if let Some(line) = status_line {
        let _ = line.await;
    }
    match result {
        Ok(report) => {
            if !quiet {
                eprintln!("{}", status::summary(&config.name, &stats, &report));
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "{}: stopped after {} records in, {} out",
                config.name,
                status::count(RunStats::get(&stats.records_in)),
                status::count(RunStats::get(&stats.records_out))
            );
            FAILED
        }
    }
}

/// First SIGINT or SIGTERM: stop reading and finish what is in flight. Second: exit now.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        for round in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                eprintln!("\nstopping: finishing the batches in flight (signal again to abort)");
                shutdown.cancel();
            } else {
                eprintln!("aborted");
                std::process::exit(130);
            }
        }
    });
}

async fn validate(files: Vec<PathBuf>) -> u8 {
    let mut code = 0;
    for file in files {
        let result = match config::load(&file) {
            Ok(c) => match plan::check(&c).await {
                Ok(()) => {
                    // What only the outside systems can say: each is asked once.
                    let (problems, notes) = plan::check_remote(&c).await;
                    for note in notes {
                        println!("note: {note}");
                    }
                    problems
                        .into_result(())
                        .map(|()| config::graph::describe(&c))
                }
                Err(p) => Err(p),
            },
            Err(p) => Err(p),
        };
        match result {
            Ok(graph) => {
                println!("{}: ok", file.display());
                print!("{graph}");
            }
            Err(problems) => {
                println!("{problems}");
                println!(
                    "{}: {} problem{}",
                    file.display(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                code = INVALID;
            }
        }
    }
    code
}

async fn test(files: Vec<PathBuf>) -> u8 {
    let (mut passed, mut failed) = (0, 0);
    let mut code = 0;
    for file in files {
        let config = match config::load(&file) {
            Ok(c) => c,
            Err(problems) => {
                println!("{problems}");
                code = INVALID;
                continue;
            }
        };
        if config.tests.is_empty() {
            println!("{}: no tests", file.display());
            continue;
        }
        match testing::run_tests(&config).await {
            Err(problems) => {
                println!("{problems}");
                code = INVALID;
            }
            Ok(outcomes) => {
                for o in outcomes {
                    match o.failure {
                        None => {
                            passed += 1;
                            println!("ok      {} / {}", file.display(), o.name);
                        }
                        Some(why) => {
                            failed += 1;
                            println!("FAILED  {} / {}", file.display(), o.name);
                            for line in why.lines() {
                                println!("        {line}");
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 && code == 0 {
        FAILED
    } else {
        code
    }
}
