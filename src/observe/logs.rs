//! The process's log output: text for a terminal, or one JSON object per line for a log
//! collector (`--log-format json`). Colour codes are written only to a terminal, and never
//! when `NO_COLOR` is set, so a file, a pipe or journald gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Logs to stderr with `filter` (tracing's `EnvFilter` syntax; a bad one falls back to
/// `info`) in `format`. Only the first call in a process takes effect.
pub(crate) fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        // Fields at the top level of each object, beside `timestamp`, `level` and `target`;
        // the call span's request id under `span`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
