//! `node-local-dns-resolver`: wires the process (flags, env, logs, exit code) to the library.

#![deny(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use resolver::config::{Args, Config, ProcessEnv};
use settings::logging::{init_logging, log_fatal};

fn main() -> ExitCode {
    let args: Args = settings::cli::parse();
    // Logging first, so that even a refused configuration is reported in --log-format.
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_fatal(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::from_args(args, &ProcessEnv).context("invalid configuration")?;
    if let Some(source) = cfg.cluster_dns_source {
        tracing::info!(ips = ?cfg.cluster_dns, source = source.name(), "kube-dns ClusterIP");
    }
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
