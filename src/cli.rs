//! The `sluice` command line as clap reads it: commands, their options and their help.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice::Count;

/// Streaming pipelines of Arrow function stages, declared in YAML.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Start each log line with the member's name (the supervisor's members share its
        /// standard error).
        #[arg(long, hide = true)]
        log_member: bool,
        /// Keep this file holding the partitions this process reads (for the supervisor).
        #[arg(long, hide = true, value_name = "FILE")]
        report_partitions: Option<PathBuf>,
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
pub(crate) enum DlqCommand {
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
pub(crate) struct DlqFilter {
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
    pub(crate) fn resolve(&self) -> Result<sluice::dlq::Filter, String> {
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

/// `--metrics-addr`: a port alone is on the loopback address, so that serving metrics to
/// other machines is always said in full.
fn metrics_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is not a port (9898) or an address (127.0.0.1:9898)"))
}
