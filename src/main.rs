//! The binary's edge: parse the CLI, start logging, run, map errors to an
//! exit code.

use std::io::IsTerminal;

use anyhow::Context as _;
use clap::Parser;
use tekton_step_observer::cli::{Cli, Command, LogFormat};
use tekton_step_observer::{app, display, inspect};

// The platform's allocator unless a feature picks another (Cargo.toml);
// BENCHMARKS.md's memory section measures each.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_tracing(args.log_format);
            app::run(*args).await.context("the controller stopped")
        }
        Command::Display(args) => {
            init_tracing(LogFormat::Text);
            display::serve(app::display_settings(&args), app::shutdown_signal())
                .await
                .context("the display receiver stopped")
        }
        Command::Inspect(args) => {
            init_tracing(LogFormat::Text);
            inspect::run(args).await.context("inspect failed")
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
