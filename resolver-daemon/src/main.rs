use anyhow::Context;
use clap::Parser;
use resolver::config::{Args, Config, LogFormat, ProcessEnv};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::from_args(args, &ProcessEnv).context("invalid configuration")?;
    init_logging(cfg.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers)
        .on_thread_start(resolver::sched::lower_priority_of_this_thread)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime
        .block_on(resolver::server::run(cfg))
        .context("node-local-dns-resolver")?;
    // Do not wait for detached tasks (idle TCP connections, health checks) after the drain.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
