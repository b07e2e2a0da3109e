//! The binary: parse the command line, load the config, set up logging and
//! the runtime, run. All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use token_sidecar::{app, check, config, demo, lifecycle, logging};

/// `--version`: the crate version, the git revision and the target.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("BUILD_GIT_REVISION"),
    ", ",
    env!("BUILD_TARGET"),
    ")"
);

/// After the options in `--help`.
const AFTER_HELP: &str = "\
Environment:
  Every setting of the config file can be set or overridden by a variable
  TOKEN_SIDECAR_<SECTION>__<KEY>, with two underscores between section and
  key: TOKEN_SIDECAR_OAUTH__PASSWORD, TOKEN_SIDECAR_OAUTH__PASSWORD_FILE,
  TOKEN_SIDECAR_PROXY__UPSTREAM. A value from a variable is taken as written.
  TOKEN_SIDECAR_CONFIG names the config file when --config is not given.
  RUST_LOG, when set, takes the place of log.level.

Exit codes:
  0    ran and stopped cleanly; check: the configuration is valid
  1    start-up failure (an address in use, TLS set-up, ...)
  2    configuration error (every problem is listed)
  3    check --live: the token request failed
  64   command-line usage error
  130  a second SIGINT during shutdown; 143 a second SIGTERM";

/// Holds an OAuth2 bearer token and injects it into a legacy app's calls to a backoffice API.
#[derive(Parser)]
#[command(name = "token-sidecar", version = VERSION, about, after_help = AFTER_HELP)]
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
    /// Run against built-in stand-ins of the token endpoint and backoffice API on loopback
    /// (with a configuration of its own: --config does not apply).
    Demo {
        #[arg(long, default_value_t = 7080)]
        port: u16,
        #[arg(long, default_value_t = 7081)]
        admin_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    match cli.command {
        Some(Command::Demo { port, admin_port }) => {
            if cli.config.is_some() {
                return usage(Cli::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "demo runs with a built-in configuration of its own; --config does not apply to it",
                ));
            }
            let json = logging::init(&config::LogConfig {
                format: config::LogFormat::Text,
                level: "info".into(),
            });
            exit(
                runtime(0).and_then(|rt| {
                    rt.block_on(demo::run(port, admin_port))
                        .context("demo failed")
                }),
                json,
            )
        }
        Some(Command::Check { live }) => {
            let path = config::resolve_path(cli.config);
            let loaded = match load(&path) {
                Ok(l) => l,
                Err(code) => return code,
            };
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
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
            // From here on every line is in the configured format: the
            // warnings too, once each.
            let json = logging::init(&loaded.config.log);
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            test_hooks();
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
                json,
            )
        }
    }
}

/// A command line clap rejected (exit 64, as sysexits' `EX_USAGE`, apart
/// from a configuration error's 2), or `--help` / `--version` (exit 0).
fn usage(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(check::EXIT_USAGE as u8)
    } else {
        ExitCode::SUCCESS
    }
}

/// Loads the config. On failure prints every problem (and the warnings,
/// which often explain one) to stderr as plain text: the log format is not
/// known yet.
fn load(path: &std::path::Path) -> Result<config::Loaded, ExitCode> {
    match config::load(path) {
        Ok(l) => Ok(l),
        Err(e) => {
            for w in &e.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!("{}: {e}", path.display());
            Err(ExitCode::from(check::EXIT_CONFIG as u8))
        }
    }
}

/// Debug builds only: `SIDECAR_TEST_PANIC=MESSAGE` panics a thread once the
/// logger is set up, so that tests can see what a panic looks like in the
/// log. Release builds have no such hook.
fn test_hooks() {
    #[cfg(debug_assertions)]
    if let Ok(message) = std::env::var("SIDECAR_TEST_PANIC") {
        let _ = std::thread::Builder::new()
            .name("test-panic".into())
            .spawn(move || panic!("{message}"))
            .map(|t| t.join());
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

/// Exit 0, or 1 with the error logged: in the log's format only when that is
/// JSON (every line JSON), else also on stderr for a person at a terminal.
fn exit(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            logging::flush();
            if !json {
                eprintln!("token-sidecar: {e:#}");
            }
            ExitCode::from(check::EXIT_START_FAILED as u8)
        }
    }
}
