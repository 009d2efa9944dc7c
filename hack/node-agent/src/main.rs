//! node-agent plays the kubelet for Tekton TaskRun pods on the local cluster's kwok node:
//! it runs every container of a pod as a real, sandboxed process (bubblewrap, as an
//! unprivileged user, in the cluster's loopback-only network namespace), Tekton's own
//! entrypoint included, and reports their states in the pod's status. See README.md.

#![forbid(unsafe_code)]

mod images;
mod logs;
mod pod_task;
mod process;
mod sandbox;
mod spec;
mod status;
mod supervisor;
mod volumes;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::images::Images;
use crate::logs::{KwokLogs, LogFiles};
use crate::pod_task::Shared;

/// Log level when RUST_LOG is not set.
const DEFAULT_LOG_FILTER: &str = "info";

/// Plays the kubelet for the Tekton TaskRun pods on a kwok node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Name of the node whose pods to run.
    #[arg(long, env = "NODE_AGENT_NODE", default_value = "kwok-node")]
    node: String,
    /// Directory for the container log files that kwok serves.
    #[arg(long, env = "NODE_AGENT_LOGS_DIR")]
    logs_dir: PathBuf,
    /// Directory for the pods' volumes and termination-message files.
    #[arg(long, env = "NODE_AGENT_PODS_DIR")]
    pods_dir: PathBuf,
    /// An image this node has, as IMAGE=BINARY: the binary is the image's `/ko-app/<name>`
    /// (Tekton's entrypoint, nop, workingdirinit, …). Repeatable.
    #[arg(long = "image", value_name = "IMAGE=BINARY", value_parser = parse_image)]
    images: Vec<(String, PathBuf)>,
    /// The `SIMULATED_*` stand-in binary (`simulated-step`).
    #[arg(long, env = "NODE_AGENT_STAND_IN")]
    stand_in: PathBuf,
    /// The unprivileged user ID containers run as (distroless' `nonroot`).
    #[arg(long, env = "NODE_AGENT_UID", default_value_t = 65532)]
    uid: u32,
    /// The group ID containers run as.
    #[arg(long, env = "NODE_AGENT_GID", default_value_t = 65532)]
    gid: u32,
}

fn parse_image(text: &str) -> Result<(String, PathBuf), String> {
    let (image, binary) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not IMAGE=BINARY"))?;
    Ok((image.to_owned(), PathBuf::from(binary)))
}

/// Absolute form of a path that must exist (binaries bound into sandboxes).
fn existing(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{} does not exist", path.display()))
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
    if cli.uid == 0 || cli.gid == 0 {
        bail!("containers must not run as root (--uid/--gid 0)");
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster (KUBECONFIG)")?;
    let files = LogFiles::new(&cli.logs_dir)
        .await
        .with_context(|| format!("preparing the logs directory {}", cli.logs_dir.display()))?;
    std::fs::create_dir_all(&cli.pods_dir)
        .with_context(|| format!("creating {}", cli.pods_dir.display()))?;
    let images = cli
        .images
        .iter()
        .map(|(image, binary)| Ok((image.clone(), existing(binary)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = Arc::new(Shared {
        kwok_logs: KwokLogs::new(client.clone()),
        client,
        files,
        pods_dir: existing(&cli.pods_dir)?,
        images: Images::new(images),
        host_image: sandbox::host_image(Path::new("/")),
        stand_in: existing(&cli.stand_in)?,
        user: (cli.uid, cli.gid),
    });
    tokio::select! {
        result = supervisor::run(shared, &cli.node) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for Ctrl-C")?;
            tracing::info!("interrupted; running containers end with the agent");
            Ok(())
        }
    }
}
