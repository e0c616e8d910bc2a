//! Sluice: a streaming pipeline engine. YAML pipelines read partitioned streams, run
//! function stages on Arrow batches, and write to sinks.
//!
//! This crate is the `sluice` command and the glue between the configuration and the
//! engine: [`config`] reads pipeline files, [`plan`] builds them, [`testing`] runs their
//! `tests:` cases, [`status`] reports on runs, [`bench`] measures workloads.

pub mod bench;
pub mod config;
pub mod dlq;
pub mod metrics;
pub mod plan;
pub mod status;
pub mod supervise;
pub mod tap;
pub mod testing;
pub mod top;
mod top_ui;

use std::sync::Arc;

use sluice_engine::executor::{self, RunOptions, RunReport};
use sluice_engine::stats::RunStats;
use tokio_util::sync::CancellationToken;

/// Builds and runs a pipeline to its end: the path `sluice run` takes, without a process,
/// for tests and benches.
pub async fn run_config(
    config: &config::PipelineConfig,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<RunStats>, RunReport)> {
    let pipeline = plan::build(config).await?;
    let stats = RunStats::new(pipeline.stages.iter().map(|s| &s.name));
    let mut options = options;
    if options.workers.is_none() && options.scaling.is_none() {
        options.scaling = config.scaling.as_ref().map(|s| s.policy.clone());
    }
    let report = executor::run(pipeline, options, stats.clone(), shutdown, None).await?;
    Ok((stats, report))
}

/// `--workers` and `--processes`: a fixed number, or as many as the lag asks for (`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Fixed(usize),
    Auto,
}

impl std::str::FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Count::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("`{n}`: a number (1 or more) or `auto`")),
                Ok(n) => Ok(Count::Fixed(n)),
            },
        }
    }
}
