//! Sluice's integration tests: one binary, one module per area (linking DataFusion per
//! test file would cost minutes).

mod aggregate;
mod checkpoint;
mod cli;
mod config_errors;
mod examples;
mod executor;
mod failures;
mod golden;
mod kafka;
mod lookups;
mod nexmark;
mod pipelines;
mod services;
mod sources;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sluice::config::{self, PipelineConfig};

/// The repository root (tests run with it as the working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `sluice` binary built with this test binary.
pub fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run sluice")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses pipeline text with the given variables as its whole environment.
pub fn parse(yaml: &str, vars: &[(&str, &str)]) -> Result<PipelineConfig, String> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config::parse("x.yaml", yaml, &env).map_err(|p| p.to_string())
}

/// Every line of every file in `dir`, in file-name order.
pub fn read_lines(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every line of every file in `dir` as JSON; none when `dir` was never made.
pub fn json_lines(dir: &Path) -> Vec<serde_json::Value> {
    if !dir.exists() {
        return Vec::new();
    }
    read_lines(dir)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Parses and runs pipeline text in-process; the error is the message `sluice run` prints.
pub async fn run_yaml(
    yaml: &str,
    vars: &[(&str, &str)],
) -> Result<
    (
        std::sync::Arc<sluice_engine::stats::RunStats>,
        sluice_engine::executor::RunReport,
    ),
    String,
> {
    let config = parse(yaml, vars)?;
    sluice::run_config(
        &config,
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .map_err(|e| e.to_string())
}
