//! `perf run` measures the observer side by side with Tekton's own events on
//! the local cluster (run it inside `hack/cluster exec`); `perf report`
//! renders BENCHMARKS.md and the plots from what `run` wrote. `make perf`
//! does both. See BENCHMARKS.md for what each figure means.

#![forbid(unsafe_code)]

mod env;
mod k8s;
mod latency;
mod memory;
mod procs;
mod receiver;
mod statuswriter;
mod throughput;
mod transitions;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use perf::results::{DispatchCheck, Machine, Meta, Results};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of tekton-step-observer on the local cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the scenarios against the cluster of KUBECONFIG.
    Run(Box<RunArgs>),
    /// Renders the results into Markdown and SVG plots.
    Report {
        #[arg(long, default_value = "target/perf/results.json")]
        results: PathBuf,
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: PathBuf,
        #[arg(long, default_value = "docs/perf")]
        plots: PathBuf,
    },
}

/// The dispatch check's `nice` level: well above the cluster's (0).
const DISPATCH_CHECK_NICE: i32 = -15;

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The observer build to measure (a release build).
    #[arg(long, default_value = "target/release/tekton-step-observer")]
    observer: PathBuf,
    /// What the observer build is, in words (its allocator), for the report.
    #[arg(long, default_value = "mimalloc")]
    observer_name: String,
    /// The observer built with glibc's malloc (`--no-default-features`):
    /// the memory scenario also measures it, with and without glibc's settings.
    #[arg(long)]
    glibc_build: Option<PathBuf>,
    /// Another build of the observer, `NAME=PATH` (repeatable): the memory
    /// scenario also measures it.
    #[arg(long, value_parser = parse_named_build)]
    other_build: Vec<(String, PathBuf)>,
    /// The local cluster's state directory.
    #[arg(long, env = "TSO_CLUSTER_DIR", default_value = ".cluster")]
    cluster_dir: PathBuf,
    /// Where results.json and the observers' logs go.
    #[arg(long, default_value = "target/perf")]
    out: PathBuf,
    /// Extra environment of the latency scenario's observer, `KEY=VALUE`
    /// (repeatable), for experiments (say, `RUST_LOG=warn`).
    #[arg(long, value_parser = parse_env_pair)]
    observer_env: Vec<(String, String)>,
    /// Scenarios to run, comma-separated: latency, memory, throughput.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latency,throughput,memory"
    )]
    scenarios: Vec<String>,
    /// Latency scenario: TaskRuns created per second.
    #[arg(long, default_value_t = 2.0)]
    latency_rate: f64,
    /// Latency scenario: for how long.
    #[arg(long, default_value_t = 120.0)]
    latency_seconds: f64,
    /// After the latency scenario, run it again for this long with the
    /// observer at a higher scheduling priority, to see what its dispatch
    /// tail owes to waiting for a CPU (0: don't).
    #[arg(long, default_value_t = 60.0)]
    dispatch_check_seconds: f64,
    /// Throughput scenario: offered events per second of each stage.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,200,400,800,1200,1600"
    )]
    throughput_stages: Vec<f64>,
    /// Throughput scenario: seconds per stage.
    #[arg(long, default_value_t = 20.0)]
    stage_seconds: f64,
    /// Memory scenario: the sizes of "finished TaskRuns in the cluster".
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    finished: Vec<usize>,
    /// Memory scenario: TaskRuns running at once.
    #[arg(long, default_value_t = 1000)]
    running: usize,
    /// criterion's output of `cargo bench --bench delivery`, read if present.
    #[arg(long, default_value = "target/criterion")]
    criterion: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(*args).await,
        Command::Report {
            results,
            markdown,
            plots,
        } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let results: Results = serde_json::from_str(&text)?;
            perf::report::render(&results, &markdown, &plots)
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0),
        memory_gib: kib / 1024.0 / 1024.0,
        kernel: command_output("uname", &["-r"]),
    }
}

fn revision() -> String {
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty { format!("{rev}-dirty") } else { rev }
}

async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    // A run killed while Tekton was paused leaves it paused.
    statuswriter::TektonPaused::resume_any(&args.cluster_dir);
    let repo = std::env::current_dir()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster (KUBECONFIG)")?;
    let version = client.apiserver_version().await?;
    let observer_kubeconfig = args.out.join("observer.kubeconfig");
    let observer_user = k8s::observer_kubeconfig(&repo, &observer_kubeconfig)?;
    let env = env::Env {
        client,
        cluster_dir: args.cluster_dir.clone(),
        observer_bin: std::fs::canonicalize(&args.observer)
            .with_context(|| format!("{} (make perf builds it)", args.observer.display()))?,
        observer_kubeconfig,
        observer_user,
        run_id: chrono::Utc::now().format("%H%M%S").to_string(),
        work_dir: args.out.clone(),
        tekton_version: std::env::var("TEKTON_VERSION").unwrap_or_default(),
        observer_name: args.observer_name.clone(),
        observer_env: args.observer_env.clone(),
        glibc_build: args
            .glibc_build
            .as_deref()
            .map(canonical_build)
            .transpose()?,
        other_builds: args
            .other_build
            .iter()
            .map(|(name, path)| Ok((name.clone(), canonical_build(path)?)))
            .collect::<Result<_>>()?,
    };
    let mut results = Results {
        meta: Meta {
            revision: revision(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: machine(),
            tekton_version: env.tekton_version.clone(),
            kubernetes_version: version.git_version,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ..Meta::default()
        },
        ..Results::default()
    };
    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    if wants("latency") {
        let out = latency::run(&env, args.latency_rate, args.latency_seconds, None).await?;
        results.latency = Some(out.latency);
        results.api_load = Some(out.api_load);
        results.cpu = Some(out.cpu);
        save(&args, &results)?;
        if args.dispatch_check_seconds > 0.0 {
            // The same workload, the observer alone at a higher scheduling
            // priority: if its dispatch tail shrinks, the tail above was
            // its threads waiting for a CPU, not its own work.
            let niced = latency::run(
                &env,
                args.latency_rate,
                args.dispatch_check_seconds,
                Some(DISPATCH_CHECK_NICE),
            )
            .await?;
            results.dispatch_check = Some(DispatchCheck {
                nice: DISPATCH_CHECK_NICE,
                duration_seconds: args.dispatch_check_seconds,
                dispatch_started: niced.latency.dispatch_started,
                dispatch_terminal: niced.latency.dispatch_terminal,
            });
            save(&args, &results)?;
        }
    }
    if wants("throughput") {
        let (throughput, ledger) =
            throughput::run(&env, &args.throughput_stages, args.stage_seconds).await?;
        results.throughput = Some(throughput);
        results.ledger_patch = Some(ledger);
        save(&args, &results)?;
    }
    if wants("memory") {
        results.memory = Some(memory::run(&env, &args.finished, args.running).await?);
        save(&args, &results)?;
    }
    results.delivery_engine = throughput::delivery_engine(&args.criterion);
    results.meta.duration_seconds = started.elapsed().as_secs_f64();
    save(&args, &results)?;
    info!(seconds = results.meta.duration_seconds, "perf run done");
    Ok(())
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

fn parse_named_build(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PATH"))?;
    Ok((name.to_owned(), PathBuf::from(path)))
}

fn canonical_build(path: &std::path::Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{} (make perf builds it)", path.display()))
}

fn save(args: &RunArgs, results: &Results) -> Result<()> {
    let path = args.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    info!(path = %path.display(), "results saved");
    Ok(())
}
