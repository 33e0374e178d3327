//! Log setup of the long-running programs (resolver, installer): one format flag, logs on
//! stderr, colours only for a terminal, and the last line of a failed start in that format.

use std::io::IsTerminal;

/// `--log-format` / `NODE_LOCAL_DNS_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

/// The level filter: `RUST_LOG` when it parses, else `info`.
pub fn env_filter(variable: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env(variable)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// ANSI colours only when a person reads the stream: a file or a container log collector
/// would keep the escape codes.
pub fn use_ansi(format: LogFormat, stream_is_terminal: bool) -> bool {
    format == LogFormat::Text && stream_is_terminal
}

/// Logs to stderr in `format`. A second call keeps the first subscriber.
pub fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter("RUST_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(use_ansi(format, std::io::stderr().is_terminal()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Reports the error a program exits with as one log event at level ERROR, in the format
/// chosen by [`init_logging`], so a JSON log pipeline sees why the program stopped. Before any
/// subscriber exists it is one plain line on stderr.
pub fn log_fatal(error: &dyn std::fmt::Display) {
    if tracing::dispatcher::has_been_set() {
        tracing::error!(target: "exit", "{error}");
    } else {
        eprintln!("error: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_for_text_on_a_terminal() {
        assert!(use_ansi(LogFormat::Text, true));
        assert!(!use_ansi(LogFormat::Text, false));
        assert!(!use_ansi(LogFormat::Json, true));
    }
}
