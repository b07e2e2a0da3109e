//! Log set-up: JSON or text, `log.level` or `RUST_LOG` filters.
//!
//! `reqwest` is capped at `info` whatever the filter says. Its connection
//! logger (`reqwest::connect::verbose`, trace) writes every byte of the token
//! exchange, so the Basic credentials, the password (in the URL when
//! `oauth.params_in = "query"`) and the issued tokens; it is off unless
//! `ClientBuilder::connection_verbose` is set, and the cap keeps it so
//! whatever `RUST_LOG` says. The other dependencies that log at trace are
//! safe as they stand (the leak test runs the whole sidecar at trace): the
//! hyper-util client logs hosts and ports only, h2's frame `Debug` omits
//! header fields, and hyper 1 logs nothing without its unstable `tracing`
//! feature.
//!
//! With JSON logs every line the process writes is JSON, panics included
//! ([`install_json_panic_hook`]). Timings (fields named `*_ms`, `*_s`) are
//! written rounded to the microsecond ([`fields::round_timing`]).

mod fields;
mod json;
pub mod writer;

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

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

/// The writer of the global subscriber, for [`flush`].
static STDOUT: OnceLock<writer::LogWriter<std::io::Stdout>> = OnceLock::new();

/// Writes the access-log lines that wait (see [`writer`]); called before exit.
pub fn flush() {
    if let Some(w) = STDOUT.get() {
        w.flush_pending();
    }
}

/// Whether `format` means JSON lines here and now.
pub fn is_json(format: LogFormat) -> bool {
    match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    }
}

/// Installs the global subscriber (once per process) and, for JSON, the
/// panic hook. Returns whether the lines are JSON.
pub fn init(cfg: &LogConfig) -> bool {
    let json = is_json(cfg.format);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(&cfg.level))
        // Colour codes only for a person at a terminal, never in a log file.
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(STDOUT.get_or_init(writer::LogWriter::stdout).clone());
    let _ = if json {
        install_json_panic_hook();
        // The layout of `.json().flatten_event(true)`, written by a formatter
        // that costs a tenth as much: one line per proxied request adds up.
        builder.event_format(json::JsonFormat).try_init()
    } else {
        builder.fmt_fields(fields::RoundedFields).try_init()
    };
    json
}

/// Replaces the default panic message (plain text on stderr) with one JSON
/// line on stderr, so that a log collector parsing JSON loses nothing:
/// `{"timestamp":…,"level":"ERROR","message":"panic","panic":…,"location":…,
/// "thread":…,"target":"token_sidecar::panic"}`. Written directly rather than
/// through the subscriber: a panic inside the log writer must not wait for
/// the lock it holds. The message is redacted like server-supplied text.
pub fn install_json_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "message": "panic",
            "panic": crate::secret::redact_text(&message, &[]),
            "location": info.location().map(|l| l.to_string()),
            "thread": std::thread::current().name().unwrap_or("unnamed"),
            "target": "token_sidecar::panic",
        });
        // Whatever waits in the access log first, to keep the order.
        flush();
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }));
}
