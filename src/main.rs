//! The `sluice` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice::Count;
use sluice::{config, plan, status, testing};
use sluice_engine::autoscale::ScalingPolicy;
use sluice_engine::executor::{self, RunOptions};
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

mod cli;

use cli::{Cli, Command, DlqCommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes: 0 success, 1 the pipeline failed or a test failed, 2 the file has problems.
const FAILED: u8 = 1;
const INVALID: u8 = 2;

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
    let cli = Cli::parse();
    let log_prefix = match &cli.command {
        Command::Worker {
            member,
            log_member: true,
            ..
        } => Some(member_name(member.clone())),
        _ => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for people: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(Prefixed {
            prefix: log_prefix,
            inner: tracing_subscriber::fmt::format(),
        })
        .init();
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
                log_member: _,
                report_partitions,
            } => {
                let member = Member {
                    name: member_name(member),
                    report: report_partitions,
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
                Ok(back) => {
                    println!("replayed {} dead letters to topic `{topic}`", back.sent);
                    if !back.left_out.is_empty() {
                        let n = back.left_out.len();
                        let s = if n == 1 { "" } else { "s" };
                        println!("{n} dead letter{s} left out (still in the dead letters):");
                    }
                    for l in &back.left_out {
                        println!("  {l}");
                    }
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

/// `sluice worker`'s name: `--member`, else $SLUICE_MEMBER, else $HOSTNAME (a pod's name).
fn member_name(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("SLUICE_MEMBER").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", std::process::id()))
}

/// Log lines, each after `prefix` and ` | ` when there is one (the supervisor's members
/// write to its standard error, as `docker compose` prefixes its services).
struct Prefixed<F> {
    prefix: Option<String>,
    inner: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prefixed<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if let Some(prefix) = &self.prefix {
            write!(writer, "{prefix} | ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// `sluice worker`: the process's member name, and whether `scaling:` sizes its tasks (not
/// when a supervisor sizes the processes by it).
struct Member {
    name: String,
    scaled: bool,
    /// Where to report the partitions it reads (`--report-partitions`).
    report: Option<PathBuf>,
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
    if let Some(path) = member.as_ref().and_then(|m| m.report.clone()) {
        sluice::supervise::owners::report(path, stats.clone(), status_done.clone());
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
