//! step-simulator plays the kubelet and Tekton's entrypoint for Tekton TaskRun pods on a
//! kwok node, so that the real Tekton controller sees the pod statuses a real cluster would
//! produce. Each step container's environment states how the step ends (see README.md).

mod entrypoint;
mod logs;
mod plan;
mod pod_task;
mod simulation;
mod supervisor;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::logs::{KwokLogs, LogFiles};
use crate::pod_task::Shared;

/// Log level when RUST_LOG is not set.
const DEFAULT_LOG_FILTER: &str = "info";

/// Plays kubelet and Tekton entrypoint for the Tekton TaskRun pods on a kwok node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Name of the node whose pods to run.
    #[arg(long, env = "STEP_SIMULATOR_NODE", default_value = "kwok-node")]
    node: String,
    /// Directory for the container log files that kwok serves.
    #[arg(long, env = "STEP_SIMULATOR_LOGS_DIR")]
    logs_dir: PathBuf,
    /// How often a waiting step's entrypoint looks whether the previous step ended, in
    /// milliseconds. Tekton's entrypoint polls every 1000; 0 starts the next step at once.
    #[arg(long, env = "STEP_SIMULATOR_ENTRYPOINT_POLL_MS", default_value_t = 0)]
    entrypoint_poll_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster (KUBECONFIG)")?;
    let files = LogFiles::new(&cli.logs_dir)
        .await
        .with_context(|| format!("preparing the logs directory {}", cli.logs_dir.display()))?;
    let shared = Arc::new(Shared {
        kwok_logs: KwokLogs::new(client.clone()),
        client,
        files,
        entrypoint_poll: Duration::from_millis(cli.entrypoint_poll_ms),
    });
    tokio::select! {
        result = supervisor::run(shared, &cli.node) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for Ctrl-C")?;
            tracing::info!("interrupted; pods in progress resume on the next start");
            Ok(())
        }
    }
}
