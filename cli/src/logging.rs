//! Logging: human-readable text on stderr by default, JSON lines with `--log-json` or
//! `DEFUSE_LOG_FORMAT=json`; levels from `RUST_LOG` (default `info`).
use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let json = json || std::env::var("DEFUSE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}
