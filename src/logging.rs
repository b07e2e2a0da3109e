//! Log set-up: JSON or text, `log.level` or `RUST_LOG` filters.
//!
//! `reqwest` is capped at `info` whatever the filter says: at `debug` it logs
//! the token request URL, which holds the password when
//! `oauth.params_in = "query"`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Directives appended to every filter; see the module docs.
pub const FORCED_DIRECTIVES: &[&str] = &["reqwest=info"];

/// The filter: `RUST_LOG` when set, else `log.level`, plus [`FORCED_DIRECTIVES`].
pub fn filter(level: &str) -> EnvFilter {
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let mut filter = EnvFilter::try_new(base.as_deref().unwrap_or(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for d in FORCED_DIRECTIVES {
        filter = filter.add_directive(d.parse().expect("static directive parses"));
    }
    filter
}

/// Installs the global subscriber (once per process).
pub fn init(cfg: &LogConfig) {
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(&cfg.level))
        // Colour codes only for a person at a terminal, never in a log file.
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(std::io::stdout);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}
