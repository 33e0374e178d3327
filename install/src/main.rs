//! `node-local-dns-install`: wires the process (flags, env, signals, logs) to the library.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use node_setup::{IptablesBackend, SocketMatch, clap_parser};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// kube-dns ClusterIP(s), one per family: IP[,IP6]. Falls back to KUBE_DNS_SVC_IP.
    #[arg(long, env = "NODE_LOCAL_DNS_CLUSTER_DNS", value_delimiter = ',')]
    cluster_dns: Vec<IpAddr>,
    #[command(flatten)]
    node: NodeArgs,
    /// How the plugin's PREROUTING rules match the resolver's socket (the resolver's
    /// --socket-match; the two must agree or each undoes the other's rules).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_SOCKET_MATCH",
        value_parser = clap_parser::<SocketMatch>(),
        default_value = "safe"
    )]
    socket_match: SocketMatch,
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

/// The node settings both subcommands share, read from the same `NODE_LOCAL_DNS_*`
/// variables as the resolver's flags of the same names: `install` writes them into the
/// plugin's entry, `uninstall --teardown-node` removes what they name.
#[derive(Debug, Args)]
struct NodeArgs {
    /// Link-local listen address(es).
    #[arg(long, env = "NODE_LOCAL_DNS_LOCAL_IP", value_delimiter = ',', default_value = node_setup::DEFAULT_LOCAL_IP)]
    local_ip: Vec<IpAddr>,
    /// Node-local interface holding the listen addresses.
    #[arg(long, env = "NODE_LOCAL_DNS_INTERFACE", default_value = node_setup::DEFAULT_INTERFACE)]
    interface: String,
    /// iptables backend: auto = the one kube-proxy uses.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_IPTABLES_BACKEND",
        value_parser = clap_parser::<IptablesBackend>(),
        default_value = "auto"
    )]
    iptables_backend: IptablesBackend,
}

#[derive(Debug, Args)]
struct UninstallArgs {
    #[command(flatten)]
    dirs: Dirs,
    /// Also remove the node state (nodelocaldns interface and iptables rules). Stop the
    /// DaemonSet first, or its resolver puts them back.
    #[arg(long, env = "NODE_LOCAL_DNS_TEARDOWN_NODE")]
    teardown_node: bool,
    /// ClusterIP(s) whose rules teardown removes; default: read from our conflist entry,
    /// then KUBE_DNS_SVC_IP.
    #[arg(long, env = "NODE_LOCAL_DNS_CLUSTER_DNS", value_delimiter = ',')]
    cluster_dns: Vec<IpAddr>,
    #[command(flatten)]
    node: NodeArgs,
    /// Lock file shared with the plugin and the resolver.
    #[arg(long, env = "NODE_LOCAL_DNS_SETUP_LOCK", default_value = node_setup::DEFAULT_LOCK_PATH)]
    setup_lock: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
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
    let cluster_dns = cluster_dns_or_env(args.cluster_dns)?;
    if cluster_dns.is_empty() {
        bail!(
            "no kube-dns ClusterIP: give --cluster-dns, NODE_LOCAL_DNS_CLUSTER_DNS or KUBE_DNS_SVC_IP"
        );
    }
    let entry = PluginEntry {
        interface: args.node.interface,
        backend: args.node.iptables_backend,
        socket_match: args.socket_match,
        ..PluginEntry::new(cluster_dns, args.node.local_ip)
    };
    entry.validate().context("plugin entry")?;
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
    let mut cluster_dns = cluster_dns_or_env(args.cluster_dns.clone())?;
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
    let mut cfg = node_setup::NodeConfig::new(cluster_dns);
    cfg.local_ips = args.node.local_ip.clone();
    cfg.interface = args.node.interface.clone();
    cfg.lock_path = args.setup_lock.clone();
    cfg.backend = args.node.iptables_backend;
    node_setup::teardown_node(&cfg).context("node teardown")?;
    tracing::info!(interface = %cfg.interface, "node state removed");
    Ok(())
}

/// `--cluster-dns` wins; else KUBE_DNS_SVC_IP ("IP" or "IP,IP6"), the name the manifests and
/// the resolver share.
fn cluster_dns_or_env(from_flag: Vec<IpAddr>) -> anyhow::Result<Vec<IpAddr>> {
    if !from_flag.is_empty() {
        return Ok(from_flag);
    }
    match std::env::var("KUBE_DNS_SVC_IP") {
        Ok(v) if !v.trim().is_empty() => parse_ip_list(&v).context("KUBE_DNS_SVC_IP"),
        _ => Ok(Vec::new()),
    }
}

fn parse_ip_list(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    s.split(',')
        .map(|part| {
            part.trim()
                .parse()
                .with_context(|| format!("{part:?} is not an IP address"))
        })
        .collect()
}

/// "60s", "500ms", "2m" or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 60s, 500ms, 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn ip_lists_parse() {
        let ips = parse_ip_list("10.96.0.10, fd00::a").unwrap();
        assert_eq!(
            ips,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
        assert!(parse_ip_list("10.96.0.300").is_err());
    }
}
