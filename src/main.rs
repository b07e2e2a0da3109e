//! The binary: parse the command line, load the config, set up logging and
//! the runtime, run. All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use token_sidecar::{app, check, config, demo, lifecycle, logging};

/// Holds an OAuth2 bearer token and injects it into a legacy app's calls to a backoffice API.
#[derive(Parser)]
#[command(name = "token-sidecar", version, about)]
struct Cli {
    /// Config file [default: $TOKEN_SIDECAR_CONFIG, else config.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and exit: 0 valid, 2 config error, 3 live check failed.
    Check {
        /// Also perform one real password grant against the token endpoint.
        #[arg(long)]
        live: bool,
    },
    /// Run against built-in stand-ins of the token endpoint and backoffice API on loopback.
    Demo {
        #[arg(long, default_value_t = 7080)]
        port: u16,
        #[arg(long, default_value_t = 7081)]
        admin_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Demo { port, admin_port }) => {
            logging::init(&config::LogConfig {
                format: config::LogFormat::Text,
                level: "info".into(),
            });
            exit(runtime(0).and_then(|rt| {
                rt.block_on(demo::run(port, admin_port))
                    .context("demo failed")
            }))
        }
        Some(Command::Check { live }) => {
            let path = config::resolve_path(cli.config);
            let loaded = match load(&path) {
                Ok(l) => l,
                Err(code) => return code,
            };
            println!("{}: configuration is valid", path.display());
            if !live {
                return ExitCode::from(check::EXIT_OK as u8);
            }
            let (line, code) = match current_thread_runtime() {
                Ok(rt) => rt.block_on(check::live(&loaded.config)),
                Err(e) => (format!("live check failed: {e:#}"), check::EXIT_LIVE_FAILED),
            };
            println!("{line}");
            ExitCode::from(code as u8)
        }
        None => {
            let path = config::resolve_path(cli.config);
            let loaded = match load(&path) {
                Ok(l) => l,
                Err(code) => return code,
            };
            logging::init(&loaded.config.log);
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            raise_fd_limit();
            // One worker: the current-thread scheduler (see runtime.rs).
            let (workers, source) = app::worker_threads(loaded.config.runtime.worker_threads);
            tracing::info!(worker_threads = workers, source, "starting the runtime");
            exit(
                token_sidecar::runtime::block_on(
                    workers,
                    app::WORKER_THREAD_NAME,
                    run(loaded.config),
                )
                .context("cannot build the tokio runtime")
                .and_then(|r| r),
            )
        }
    }
}

/// Loads the config, printing every problem and warning to stderr.
fn load(path: &std::path::Path) -> Result<config::Loaded, ExitCode> {
    match config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                eprintln!("warning: {w}");
            }
            Ok(l)
        }
        Err(e) => {
            // A misnamed variable often explains a missing key.
            for w in &e.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!("{}: {e}", path.display());
            Err(ExitCode::from(check::EXIT_CONFIG as u8))
        }
    }
}

async fn run(config: config::Config) -> anyhow::Result<()> {
    // Handlers first: a signal during start-up then drains rather than kills.
    let lifecycle = std::sync::Arc::new(lifecycle::Lifecycle::new());
    app::install_signal_handlers(lifecycle.clone()).context("cannot install signal handlers")?;
    let running = app::start_in(&config, lifecycle)
        .await
        .context("cannot start")?;
    running.run_until_shutdown().await;
    Ok(())
}

/// The runtime of the demo: [`app::worker_threads`] workers, named
/// [`app::WORKER_THREAD_NAME`] so `top -H` and `/proc/PID/task/*/comm` show
/// which threads are ours.
fn runtime(configured: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let (workers, source) = app::worker_threads(configured);
    tracing::info!(worker_threads = workers, source, "starting the runtime");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(app::WORKER_THREAD_NAME)
        .enable_all()
        .build()
        .context("cannot build the tokio runtime")
}

/// `check --live` makes one request: one thread is plenty.
fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the tokio runtime")
}

/// A proxy holds two descriptors per request: raise the soft limit to the hard one.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("token-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
