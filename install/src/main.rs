//! `node-local-dns-install`: wires the process (flags, env, signals, logs) to the library.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use settings::duration::format_duration;
use settings::logging::{LogFormat, init_logging, log_fatal};
use settings::node::NodeArgs;
use settings::{ProcessEnv, SettingsError, cluster_dns, parse_duration};

use node_local_dns_install::conflist::PluginEntry;
use node_local_dns_install::watch::{self, InstallConfig, Wake};
use node_local_dns_install::{atomic, confdir, plugin_binary};

/// Installs the node-local-dns CNI plugin on this node and keeps its conflist entry in place.
#[derive(Debug, Parser)]
#[command(name = "node-local-dns-install", version, about)]
struct Cli {
    /// Log format on stderr (the resolver reads the same variable).
    #[arg(
        long,
        global = true,
        env = "NODE_LOCAL_DNS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Copy the plugin binary, add our entry to the runtime's conflist, then watch and keep it
    /// there. SIGTERM/SIGINT stop the watch and leave everything installed.
    Install(InstallArgs),
    /// Exit 0 when the plugin binary and our conflist entry are in place as `install` would
    /// leave them, else 1 with the reasons on stderr. Changes nothing (readiness probe).
    Check(InstallArgs),
    /// Remove our conflist entry from every config file, then the plugin binary.
    Uninstall(UninstallArgs),
}

#[derive(Debug, Args)]
struct Dirs {
    /// CNI plugin binary dir (host's /opt/cni/bin, mounted).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_CNI_BIN_DIR",
        default_value = "/opt/cni/bin"
    )]
    bin_dir: PathBuf,
    /// CNI config dir (host's /etc/cni/net.d, mounted).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    conf_dir: PathBuf,
}

#[derive(Debug, Args)]
struct InstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// The node settings the plugin's entry carries, from the same `NODE_LOCAL_DNS_*`
    /// variables as the resolver's flags of the same names.
    #[command(flatten)]
    node: NodeArgs,
    /// The plugin binary to copy into --bin-dir.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_PLUGIN_BINARY",
        default_value = "/usr/local/lib/node-local-dns/node-local-dns"
    )]
    plugin_binary: PathBuf,
    /// Install once and exit (non-zero if not complete) instead of watching.
    #[arg(long, env = "NODE_LOCAL_DNS_INSTALL_ONCE")]
    once: bool,
    /// Full re-check interval while watching (e.g. 60s, 500ms).
    #[arg(long, env = "NODE_LOCAL_DNS_RESYNC_INTERVAL", value_parser = parse_duration, default_value = "60s")]
    resync_interval: Duration,
    /// Quiet time after a conf dir change before acting on it.
    #[arg(long, env = "NODE_LOCAL_DNS_DEBOUNCE", value_parser = parse_duration, default_value = "500ms")]
    debounce: Duration,
    /// Delay before retrying after a failed attempt (capped by --resync-interval).
    #[arg(long, env = "NODE_LOCAL_DNS_RETRY_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    retry_interval: Duration,
}

#[derive(Debug, Args)]
struct UninstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// Also remove the node state (nodelocaldns interface and iptables rules). Stop the
    /// DaemonSet first, or its resolver puts them back.
    #[arg(long, env = "NODE_LOCAL_DNS_TEARDOWN_NODE")]
    teardown_node: bool,
    /// What `--teardown-node` removes. Its ClusterIP(s), when no source gives them: the
    /// ones of the removed conflist entries.
    #[command(flatten)]
    node: NodeArgs,
    /// Lock file shared with the plugin and the resolver.
    #[arg(long, env = "NODE_LOCAL_DNS_SETUP_LOCK", default_value = node_setup::DEFAULT_LOCK_PATH)]
    setup_lock: PathBuf,
}

fn main() -> ExitCode {
    let cli: Cli = settings::cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_fatal(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Block termination signals before any thread exists so every thread inherits the mask
    // and only the dedicated signal thread receives them.
    let signals = termination_signals();
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;
    match cli.command {
        Command::Install(args) => install(args, signals),
        Command::Check(args) => check(args),
        Command::Uninstall(args) => uninstall(args),
    }
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

fn check(args: InstallArgs) -> anyhow::Result<()> {
    let problems = watch::check(&install_config(args)?);
    if problems.is_empty() {
        return Ok(());
    }
    bail!("not installed: {}", problems.join("; "))
}

fn install(args: InstallArgs, signals: SigSet) -> anyhow::Result<()> {
    let once = args.once;
    let cfg = install_config(args)?;
    for dir in [&cfg.bin_dir, &cfg.conf_dir] {
        for stale in atomic::remove_stale_temp_files(dir)? {
            tracing::info!(path = %stale.display(), "removed a temp file left by an interrupted run");
        }
    }
    if once {
        let done = watch::reconcile(&cfg)?;
        watch::log_reconciled(&done);
        return Ok(());
    }
    // The conf dir may not exist before the primary CNI starts; watching needs it.
    std::fs::create_dir_all(&cfg.conf_dir)
        .with_context(|| format!("creating {}", cfg.conf_dir.display()))?;
    let (tx, rx) = channel();
    forward_signals(signals, tx.clone());
    let _watcher = watch::watch_conf_dir(&cfg.conf_dir, tx)?;
    watch::run(&cfg, &rx);
    Ok(())
}

fn install_config(args: InstallArgs) -> anyhow::Result<InstallConfig> {
    check_intervals(&args)?;
    let found = cluster_dns::require(
        &args.node.cluster_dns,
        &ProcessEnv,
        "the plugin's conflist entry",
    )?;
    tracing::debug!(source = found.source.name(), ips = ?found.ips, "kube-dns ClusterIP");
    let entry = args.node.plugin_entry(&found.ips);
    entry.node_config().context("plugin entry")?;
    Ok(InstallConfig {
        bin_dir: args.dirs.bin_dir,
        conf_dir: args.dirs.conf_dir,
        plugin_binary: args.plugin_binary,
        entry,
        resync: args.resync_interval,
        debounce: args.debounce,
        retry: args.retry_interval,
    })
}

/// A zero interval would make the watch loop spin (a round, then at once the next); a
/// debounce longer than the resync interval would hold a change back past the next full
/// round it is meant to come before.
fn check_intervals(args: &InstallArgs) -> Result<(), SettingsError> {
    for (name, interval) in [
        ("--resync-interval", args.resync_interval),
        ("--retry-interval", args.retry_interval),
    ] {
        if interval.is_zero() {
            return Err(SettingsError::bound(name, "0s", "above 0"));
        }
    }
    if args.debounce > args.resync_interval {
        return Err(SettingsError::bound(
            "--debounce",
            format_duration(args.debounce),
            format!(
                "at most --resync-interval ({})",
                format_duration(args.resync_interval)
            ),
        ));
    }
    Ok(())
}

/// A thread that turns SIGTERM/SIGINT into `Wake::Stop`.
fn forward_signals(signals: SigSet, tx: Sender<Wake>) {
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!(signal = %sig, "termination requested");
            let _ = tx.send(Wake::Stop);
        }
    });
}

fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    // Entry first: once no conflist names the plugin, no new ADD can need the binary.
    let removed = confdir::remove_from_conf_dir(&args.dirs.conf_dir)?;
    for skipped in &removed.skipped {
        tracing::warn!(error = %skipped, "could not read this config file; left untouched");
    }
    for path in &removed.edited {
        tracing::info!(path = %path.display(), "removed our entry");
    }
    if plugin_binary::remove_binary(&args.dirs.bin_dir)? {
        tracing::info!(dir = %args.dirs.bin_dir.display(), "removed plugin binary");
    }
    if args.teardown_node {
        teardown(&args, &removed.removed_entries)?;
    }
    Ok(())
}

fn teardown(args: &UninstallArgs, removed_entries: &[serde_json::Value]) -> anyhow::Result<()> {
    let mut cluster_dns = args
        .node
        .cluster_dns(&ProcessEnv)?
        .map(|found| found.ips)
        .unwrap_or_default();
    if cluster_dns.is_empty() {
        // Several files may carry the entry: each ClusterIP once, in first-seen order.
        for ip in removed_entries.iter().flat_map(PluginEntry::cluster_dns_of) {
            if !cluster_dns.contains(&ip) {
                cluster_dns.push(ip);
            }
        }
    }
    if cluster_dns.is_empty() {
        bail!(
            "--teardown-node needs the kube-dns ClusterIP: give --cluster-dns (no conflist entry had it)"
        );
    }
    let mut cfg = args.node.node_config(&cluster_dns);
    cfg.lock_path = args.setup_lock.clone();
    node_setup::teardown_node(&cfg).context("node teardown")?;
    tracing::info!(interface = %cfg.interface, "node state removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_use_the_shared_grammar() {
        let cli = Cli::try_parse_from([
            "node-local-dns-install",
            "install",
            "--resync-interval",
            "1m30s",
            "--debounce",
            "0.5s",
        ])
        .unwrap();
        let Command::Install(args) = cli.command else {
            panic!("install");
        };
        assert_eq!(args.resync_interval, Duration::from_secs(90));
        assert_eq!(args.debounce, Duration::from_millis(500));
    }

    #[test]
    fn zero_intervals_are_refused_naming_the_flag() {
        for flag in ["--resync-interval", "--retry-interval"] {
            let cli =
                Cli::try_parse_from(["node-local-dns-install", "install", flag, "0"]).unwrap();
            let Command::Install(args) = cli.command else {
                panic!("install");
            };
            let err = check_intervals(&args).unwrap_err();
            assert_eq!(err.name(), Some(flag));
            assert_eq!(err.to_string(), format!("{flag} 0s: must be above 0"));
        }
        let cli = Cli::try_parse_from([
            "node-local-dns-install",
            "install",
            "--debounce",
            "2m",
            "--resync-interval",
            "60s",
        ])
        .unwrap();
        let Command::Install(args) = cli.command else {
            panic!("install");
        };
        let err = check_intervals(&args).unwrap_err().to_string();
        assert_eq!(
            err,
            "--debounce 120s: must be at most --resync-interval (60s)"
        );
    }
}
