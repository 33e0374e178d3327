//! Command line / environment configuration, parsed once at start into a validated `Config`.
//!
//! Every flag has an env equivalent `NODE_LOCAL_DNS_*`. The kube-dns ClusterIP comes from
//! `--cluster-dns`, else `KUBE_DNS_SVC_IP`, else `KUBE_DNS_SERVICE_HOST` (the settings crate
//! owns that order and every grammar: durations, sizes, addresses); the upstream source
//! address from `NODE_IP` (downward API `status.hostIP`). Environment strings are read through
//! the `Env` trait so tests drive them with a map.
//!
//! Every default is written once, in the flag's attribute below (`--cache-max-bytes`: in
//! [`default_cache_max_bytes`]); `cache::CacheConfig` is built from the flags here. Values
//! that contradict each other or exceed what the daemon honours are refused at start, naming
//! the flag and the bound, never clamped silently.

use crate::cache::CacheConfig;
use clap::{Parser, ValueEnum};
use settings::SettingsError;
use settings::addr::{parse_host_port, parse_ip};
use settings::cluster_dns::Source;
use settings::duration::format_duration;
use settings::error::GrammarError;
use settings::node::NodeArgs;
use settings::{parse_duration, parse_size};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use settings::env::{Env, ProcessEnv};
pub use settings::logging::LogFormat;

/// Idle TCP connections are closed after at most this long.
pub const MAX_TCP_IDLE: Duration = Duration::from_secs(10);
/// Longest pause between UDP batches (`--udp-coalesce`): the latency it may add.
pub const MAX_UDP_COALESCE: Duration = Duration::from_millis(1);
/// A client's resolver gives up on a server after this long (resolv.conf `timeout:` default):
/// every upstream attempt must be over by then, so the client gets an answer or SERVFAIL.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `--cache-max-bytes` default: the one place it is decided (from the memory limit).
pub fn default_cache_max_bytes() -> usize {
    crate::memlimit::default_cache_max_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamProto {
    /// UDP only; a truncated upstream answer is passed on truncated.
    Udp,
    /// TCP only.
    Tcp,
    /// UDP, retried over TCP when the upstream answer has TC=1.
    PreferUdp,
}

/// How many UDP receive threads serve each listen address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpThreads {
    /// This many, unpinned; the kernel spreads queries over them by a hash of the source.
    Fixed(usize),
    /// One per CPU in the process's affinity mask, pinned; a query goes to the thread on
    /// the CPU that sent it.
    PerCpu,
}

/// At most this many UDP threads per listen address (also the cap for `auto`).
pub const MAX_UDP_THREADS: usize = 64;

fn parse_threads(s: &str) -> Result<UdpThreads, GrammarError> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(UdpThreads::PerCpu);
    }
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_UDP_THREADS).contains(&n) => Ok(UdpThreads::Fixed(n)),
        _ => Err(GrammarError(format!(
            "expected a thread count (1..={MAX_UDP_THREADS} or auto)"
        ))),
    }
}

/// A DNS address, `IP[:PORT]`, port 53 by default.
fn dns_addr(s: &str) -> Result<SocketAddr, GrammarError> {
    parse_host_port(s, 53)
}

/// Node-local caching DNS forwarder that holds the kube-dns ClusterIP socket.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "node-local-dns-resolver",
    version,
    about,
    args_override_self = true
)]
pub struct Args {
    /// Address to serve DNS on (UDP and TCP), IP[:PORT], repeatable or comma-separated.
    /// Bound to that exact address with IP_FREEBIND. Default: the kube-dns ClusterIP(s) and
    /// --local-ip, port 53.
    #[arg(long, env = "NODE_LOCAL_DNS_LISTEN", value_delimiter = ',', value_parser = dns_addr)]
    pub listen: Vec<SocketAddr>,

    /// The node settings, shared with the installer (which writes them into the plugin's
    /// conflist entry): --cluster-dns, --local-ip, --interface, --iptables-backend,
    /// --socket-match.
    #[command(flatten)]
    pub node: NodeArgs,

    /// Upstream server for cache misses, IP[:PORT], repeatable. Default: the kube-dns
    /// ClusterIP(s) port 53 (kube-proxy DNATs them to the cluster DNS pods).
    #[arg(long, env = "NODE_LOCAL_DNS_UPSTREAM", value_delimiter = ',', value_parser = dns_addr)]
    pub upstream: Vec<SocketAddr>,

    /// Source address for upstream sockets whenever the kernel would pick a listen address.
    /// Default: NODE_IP (downward API status.hostIP), else the default route's source.
    #[arg(long, env = "NODE_LOCAL_DNS_UPSTREAM_SOURCE")]
    pub upstream_source: Option<IpAddr>,

    /// Transport to the upstreams.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_UPSTREAM_PROTO",
        value_enum,
        default_value = "prefer-udp"
    )]
    pub upstream_proto: UpstreamProto,

    /// Timeout of one upstream attempt (e.g. 800ms, 1s).
    #[arg(long, env = "NODE_LOCAL_DNS_UPSTREAM_TIMEOUT", value_parser = parse_duration, default_value = "1s")]
    pub upstream_timeout: Duration,

    /// Attempts per client query (each on the next healthy upstream); attempts × timeout
    /// must stay under the client's 5 s.
    #[arg(long, env = "NODE_LOCAL_DNS_UPSTREAM_ATTEMPTS", default_value_t = 2)]
    pub upstream_attempts: u32,

    /// Cap on concurrent upstream queries; past it: stale answer if any, else SERVFAIL.
    #[arg(long, env = "NODE_LOCAL_DNS_MAX_CONCURRENT", default_value_t = 1000)]
    pub max_concurrent: usize,

    /// Interval of the active upstream health check ('. IN NS').
    #[arg(long, env = "NODE_LOCAL_DNS_HEALTH_CHECK_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub health_check_interval: Duration,

    /// The cluster's DNS domain (see --external-to-resolv-conf).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,

    /// Send names outside --cluster-domain (and its reverse zones) to the nameservers of
    /// --resolv-conf instead of the upstreams.
    #[arg(long, env = "NODE_LOCAL_DNS_EXTERNAL_TO_RESOLV_CONF")]
    pub external_to_resolv_conf: bool,

    /// resolv.conf read for --external-to-resolv-conf.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: PathBuf,

    /// UDP receive threads per listen address (SO_REUSEPORT), or `auto`: one per CPU the
    /// daemon may run on, each pinned to its CPU and taking the queries sent from that CPU
    /// (SO_INCOMING_CPU, Linux >= 6.2), so a pod's query and its answer never wake another
    /// CPU.
    #[arg(long, env = "NODE_LOCAL_DNS_THREADS", default_value = "1", value_parser = parse_threads)]
    pub threads: UdpThreads,

    /// Under steady load, pause this long between small back-to-back UDP batches so one
    /// wake-up handles several queries (less CPU per answer, at most this much added
    /// latency; never applied when idle). 0 (default) answers at once: latency is what a
    /// node-local cache is for; 200us saves ~15 % CPU per answer at ~0.2 ms added p50.
    #[arg(long, env = "NODE_LOCAL_DNS_UDP_COALESCE", value_parser = parse_duration, default_value = "0s")]
    pub udp_coalesce: Duration,

    /// EEVDF time slice the UDP threads ask for (Linux ≥ 6.12; 100us-100ms, 0 keeps the
    /// kernel's default). A short slice lets a woken UDP thread preempt a busy CPU's current
    /// task at once instead of queueing behind its slice (1.4 ms by default on 2 CPUs). It
    /// changes when the threads run, not their CPU share.
    #[arg(long, env = "NODE_LOCAL_DNS_UDP_SLICE", value_parser = parse_duration, default_value = "100us")]
    pub udp_slice: Duration,

    /// Tokio worker threads for misses, TCP, metrics.
    #[arg(long, env = "NODE_LOCAL_DNS_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Maximum concurrent TCP connections (all listeners); past it new ones are closed.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_TCP_MAX_CONNECTIONS",
        default_value_t = 1000
    )]
    pub tcp_max_connections: usize,

    /// Idle timeout of client TCP connections (at most 10s).
    #[arg(long, env = "NODE_LOCAL_DNS_TCP_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub tcp_idle_timeout: Duration,

    /// Success cache capacity in entries.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_CACHE_SUCCESS_CAPACITY",
        default_value_t = 120_000
    )]
    pub cache_success_capacity: usize,
    /// Minimum TTL of cached answers.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_SUCCESS_MIN_TTL", value_parser = parse_duration, default_value = "5s")]
    pub cache_success_min_ttl: Duration,
    /// Maximum TTL of cached answers.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_SUCCESS_MAX_TTL", value_parser = parse_duration, default_value = "30s")]
    pub cache_success_max_ttl: Duration,
    /// Denial (NXDOMAIN/NODATA) cache capacity in entries.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_CACHE_DENIAL_CAPACITY",
        default_value_t = 65_536
    )]
    pub cache_denial_capacity: usize,
    /// Minimum TTL of cached denials.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_DENIAL_MIN_TTL", value_parser = parse_duration, default_value = "1s")]
    pub cache_denial_min_ttl: Duration,
    /// Maximum TTL of cached denials.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_DENIAL_MAX_TTL", value_parser = parse_duration, default_value = "5s")]
    pub cache_denial_max_ttl: Duration,
    /// Overall cache memory budget (LRU eviction past it): bytes or a size such as 64MiB,
    /// 1GiB, 256M. Default: from the container's memory limit (what it leaves after the rest
    /// of the process), 256MiB without a limit.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_MAX_BYTES", value_parser = parse_size)]
    pub cache_max_bytes: Option<usize>,
    /// How long expired entries may still be served when upstreams fail (RFC 8767).
    #[arg(long, env = "NODE_LOCAL_DNS_STALE_WINDOW", value_parser = parse_duration, default_value = "1h")]
    pub stale_window: Duration,
    /// TTL given to stale answers.
    #[arg(long, env = "NODE_LOCAL_DNS_STALE_TTL", default_value_t = 30)]
    pub stale_ttl: u32,
    /// Hits within --prefetch-window that make an entry eligible for prefetch.
    #[arg(long, env = "NODE_LOCAL_DNS_PREFETCH_HITS", default_value_t = 10)]
    pub prefetch_hits: u32,
    /// Window for --prefetch-hits.
    #[arg(long, env = "NODE_LOCAL_DNS_PREFETCH_WINDOW", value_parser = parse_duration, default_value = "1m")]
    pub prefetch_window: Duration,
    /// Prefetch when less than this percentage of the TTL is left.
    #[arg(long, env = "NODE_LOCAL_DNS_PREFETCH_PERCENT", default_value_t = 25)]
    pub prefetch_percent: u8,
    /// Refreshes a popular entry (see --prefetch-hits) may get in a row while nobody asks for
    /// it, when its prefetch point passes without a hit: a name asked in bursts with pauses
    /// of up to about this many TTLs never waits for a miss; a name no longer asked costs at
    /// most this many upstream queries. 0: refresh only on a hit.
    #[arg(long, env = "NODE_LOCAL_DNS_PREFETCH_UNASKED", default_value_t = 1)]
    pub prefetch_unasked: u8,
    /// Background refreshes (prefetch, idle sweep, stale) started per second at most; the
    /// others wait up to a second in a queue, else are dropped (node_local_dns_prefetch_dropped_total)
    /// and fetched on demand when next asked. Keeps a cohort of entries expiring together
    /// from taking the CPU the cache hits need (under a CPU limit: the whole CFS quota).
    /// The default, at 20–60 us of CPU per refresh, is at most 4–12 % of a core and keeps
    /// ~8 000 popular names with the 5 s denial clamp fresh. 0: no limit.
    #[arg(long, env = "NODE_LOCAL_DNS_PREFETCH_RATE", default_value_t = 2000)]
    pub prefetch_rate: u32,

    /// Prometheus metrics address (/metrics). Not the NodeLocal DNSCache addon's 9253 (its
    /// CoreDNS) or 9353 (its node-cache), so both can run on one node.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_METRICS_LISTEN",
        default_value = "127.0.0.1:9355"
    )]
    pub metrics_listen: SocketAddr,
    /// Health address (/health alive, /ready listening and an upstream healthy now). Not the
    /// addon's 8080.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_HEALTH_LISTEN",
        default_value = "127.0.0.1:9354"
    )]
    pub health_listen: SocketAddr,

    /// Do not touch the node (interface, addresses, iptables): for running on loopback.
    #[arg(long, env = "NODE_LOCAL_DNS_NO_NODE_SETUP")]
    pub no_node_setup: bool,
    /// How often node setup is re-ensured.
    #[arg(long, env = "NODE_LOCAL_DNS_SYNC_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    pub sync_interval: Duration,
    /// Lock file serialising node setup with the CNI plugin.
    #[arg(long, env = "NODE_LOCAL_DNS_SETUP_LOCK", default_value = node_setup::DEFAULT_LOCK_PATH)]
    pub setup_lock: PathBuf,
    /// Directory of the CNI plugin's stats file (exported as node_local_dns_cni_*).
    #[arg(long, env = "NODE_LOCAL_DNS_STATS_DIR", default_value = node_setup::DEFAULT_STATS_DIR)]
    pub stats_dir: PathBuf,

    /// Exit non-zero when the self-probe of the listeners fails this long (0s disables).
    #[arg(long, env = "NODE_LOCAL_DNS_WATCHDOG_TIMEOUT", value_parser = parse_duration, default_value = "3s")]
    pub watchdog_timeout: Duration,
    /// On SIGTERM: listeners close at once, in-flight queries get this long to finish.
    #[arg(long, env = "NODE_LOCAL_DNS_GRACE_PERIOD", value_parser = parse_duration, default_value = "5s")]
    pub grace_period: Duration,

    /// Log format on stderr (text has colours only on a terminal).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log every query (client, name, type, rcode).
    #[arg(long, env = "NODE_LOCAL_DNS_LOG_QUERIES")]
    pub log_queries: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "no listen address: give --listen, or the kube-dns ClusterIP by --cluster-dns, KUBE_DNS_SVC_IP or KUBE_DNS_SERVICE_HOST"
    )]
    NoListen,
    #[error(
        "no upstream: give --upstream, or the kube-dns ClusterIP by --cluster-dns, KUBE_DNS_SVC_IP or KUBE_DNS_SERVICE_HOST"
    )]
    NoUpstream,
    #[error(transparent)]
    Setting(#[from] SettingsError),
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub cluster_dns: Vec<IpAddr>,
    /// Which setting the ClusterIP(s) came from (`None`: none given).
    pub cluster_dns_source: Option<Source>,
    pub local_ips: Vec<IpAddr>,
    pub upstreams: Vec<SocketAddr>,
    /// Explicit or NODE_IP source; `None` means "default route's source when needed".
    pub upstream_source: Option<IpAddr>,
    pub upstream_proto: UpstreamProto,
    pub upstream_timeout: Duration,
    pub upstream_attempts: u32,
    pub max_concurrent: usize,
    pub health_check_interval: Duration,
    pub cluster_domain: String,
    pub external_to_resolv_conf: bool,
    pub resolv_conf: PathBuf,
    pub threads: UdpThreads,
    pub udp_coalesce: Duration,
    pub udp_slice: Duration,
    pub workers: usize,
    pub tcp_max_connections: usize,
    pub tcp_idle_timeout: Duration,
    pub cache: CacheConfig,
    pub prefetch_rate: u32,
    pub metrics_listen: SocketAddr,
    pub health_listen: SocketAddr,
    pub node_setup: Option<node_setup::NodeConfig>,
    pub sync_interval: Duration,
    pub stats_dir: PathBuf,
    pub watchdog_timeout: Option<Duration>,
    pub grace_period: Duration,
    pub log_format: LogFormat,
    pub log_queries: bool,
}

impl Config {
    pub fn from_args(args: Args, env: &dyn Env) -> Result<Self, ConfigError> {
        let found = args.node.cluster_dns(env)?;
        let cluster_dns = found.as_ref().map(|f| f.ips.clone()).unwrap_or_default();
        let listen = listen_addrs(&args, &cluster_dns)?;
        let upstreams = upstream_addrs(&args, &cluster_dns)?;
        let upstream_source = upstream_source(&args, env)?;
        check_bounds(&args)?;
        let node_setup = node_config(&args, &cluster_dns)?;
        Ok(Self {
            listen,
            cluster_dns,
            cluster_dns_source: found.map(|f| f.source),
            local_ips: args.node.local_ip.clone(),
            upstreams,
            upstream_source,
            upstream_proto: args.upstream_proto,
            upstream_timeout: args.upstream_timeout,
            upstream_attempts: args.upstream_attempts,
            max_concurrent: args.max_concurrent,
            health_check_interval: args.health_check_interval,
            cluster_domain: args
                .cluster_domain
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            external_to_resolv_conf: args.external_to_resolv_conf,
            resolv_conf: args.resolv_conf.clone(),
            threads: args.threads,
            udp_coalesce: args.udp_coalesce,
            udp_slice: args.udp_slice,
            workers: args.workers,
            tcp_max_connections: args.tcp_max_connections,
            tcp_idle_timeout: args.tcp_idle_timeout,
            cache: cache_config(&args),
            prefetch_rate: args.prefetch_rate,
            metrics_listen: args.metrics_listen,
            health_listen: args.health_listen,
            node_setup,
            sync_interval: args.sync_interval,
            stats_dir: args.stats_dir.clone(),
            watchdog_timeout: (!args.watchdog_timeout.is_zero()).then_some(args.watchdog_timeout),
            grace_period: args.grace_period,
            log_format: args.log_format,
            log_queries: args.log_queries,
        })
    }
}

/// `--listen`, else the ClusterIP(s) and `--local-ip` on port 53; never a wildcard.
fn listen_addrs(args: &Args, cluster_dns: &[IpAddr]) -> Result<Vec<SocketAddr>, ConfigError> {
    let listen: Vec<SocketAddr> = if args.listen.is_empty() {
        if cluster_dns.is_empty() {
            return Err(ConfigError::NoListen);
        }
        cluster_dns
            .iter()
            .chain(args.node.local_ip.iter())
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.listen.clone()
    };
    if let Some(w) = listen.iter().find(|a| a.ip().is_unspecified()) {
        return Err(SettingsError::bound(
            "--listen",
            w,
            "a specific address, not a wildcard: each address is bound exactly",
        )
        .into());
    }
    Ok(dedup(listen))
}

/// `--upstream`, else the ClusterIP(s) on port 53.
fn upstream_addrs(args: &Args, cluster_dns: &[IpAddr]) -> Result<Vec<SocketAddr>, ConfigError> {
    let ups: Vec<SocketAddr> = if args.upstream.is_empty() {
        cluster_dns
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.upstream.clone()
    };
    if ups.is_empty() {
        return Err(ConfigError::NoUpstream);
    }
    Ok(dedup(ups))
}

/// `--upstream-source`, else `NODE_IP`.
fn upstream_source(args: &Args, env: &dyn Env) -> Result<Option<IpAddr>, ConfigError> {
    if args.upstream_source.is_some() {
        return Ok(args.upstream_source);
    }
    match env.var("NODE_IP") {
        Some(v) => parse_ip(&v)
            .map(Some)
            .map_err(|e| SettingsError::invalid("NODE_IP", &v, e).into()),
        None => Ok(None),
    }
}

fn dedup(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = Vec::with_capacity(v.len());
    v.retain(|a| {
        let new = !seen.contains(a);
        seen.push(*a);
        new
    });
    v
}

/// The first flag outside what the daemon honours, or contradicting another flag.
fn check_bounds(args: &Args) -> Result<(), SettingsError> {
    let (min_slice, max_slice) = crate::sched::SLICE_RANGE;
    let d = |d: Duration| format_duration(d);
    let upstream_budget = args.upstream_timeout.saturating_mul(args.upstream_attempts);
    let checks: [(bool, &'static str, String, String); 14] = [
        (
            (1..=64).contains(&args.workers),
            "--workers",
            args.workers.to_string(),
            "1..=64".into(),
        ),
        (
            args.upstream_attempts >= 1,
            "--upstream-attempts",
            args.upstream_attempts.to_string(),
            "at least 1".into(),
        ),
        (
            args.max_concurrent >= 1,
            "--max-concurrent",
            args.max_concurrent.to_string(),
            "at least 1".into(),
        ),
        (
            !args.upstream_timeout.is_zero(),
            "--upstream-timeout",
            d(args.upstream_timeout),
            "above 0".into(),
        ),
        (
            upstream_budget < CLIENT_TIMEOUT,
            "--upstream-timeout × --upstream-attempts",
            format!(
                "{} × {} = {}",
                d(args.upstream_timeout),
                args.upstream_attempts,
                d(upstream_budget)
            ),
            format!(
                "under {}, a client's resolv.conf timeout: past it the client has given up on the answer",
                d(CLIENT_TIMEOUT)
            ),
        ),
        (
            !args.health_check_interval.is_zero(),
            "--health-check-interval",
            d(args.health_check_interval),
            "above 0".into(),
        ),
        (
            args.tcp_idle_timeout <= MAX_TCP_IDLE,
            "--tcp-idle-timeout",
            d(args.tcp_idle_timeout),
            format!("at most {}", d(MAX_TCP_IDLE)),
        ),
        (
            args.udp_coalesce <= MAX_UDP_COALESCE,
            "--udp-coalesce",
            d(args.udp_coalesce),
            format!(
                "at most {} (the latency it may add to an answer)",
                d(MAX_UDP_COALESCE)
            ),
        ),
        (
            args.udp_slice.is_zero() || (min_slice..=max_slice).contains(&args.udp_slice),
            "--udp-slice",
            d(args.udp_slice),
            format!("0 or {}..={}", d(min_slice), d(max_slice)),
        ),
        (
            args.cache_success_min_ttl <= args.cache_success_max_ttl,
            "--cache-success-min-ttl",
            d(args.cache_success_min_ttl),
            format!(
                "at most --cache-success-max-ttl ({})",
                d(args.cache_success_max_ttl)
            ),
        ),
        (
            args.cache_denial_min_ttl <= args.cache_denial_max_ttl,
            "--cache-denial-min-ttl",
            d(args.cache_denial_min_ttl),
            format!(
                "at most --cache-denial-max-ttl ({})",
                d(args.cache_denial_max_ttl)
            ),
        ),
        (
            args.prefetch_percent <= 100,
            "--prefetch-percent",
            args.prefetch_percent.to_string(),
            "0..=100".into(),
        ),
        (
            !args.prefetch_window.is_zero(),
            "--prefetch-window",
            d(args.prefetch_window),
            "above 0".into(),
        ),
        (
            !args.sync_interval.is_zero(),
            "--sync-interval",
            d(args.sync_interval),
            "above 0".into(),
        ),
    ];
    match checks.into_iter().find(|(ok, ..)| !ok) {
        Some((_, name, value, bound)) => Err(SettingsError::bound(name, value, bound)),
        None => Ok(()),
    }
}

fn cache_config(args: &Args) -> CacheConfig {
    CacheConfig {
        success_capacity: args.cache_success_capacity,
        success_min_ttl: args.cache_success_min_ttl,
        success_max_ttl: args.cache_success_max_ttl,
        denial_capacity: args.cache_denial_capacity,
        denial_min_ttl: args.cache_denial_min_ttl,
        denial_max_ttl: args.cache_denial_max_ttl,
        max_bytes: args.cache_max_bytes.unwrap_or_else(default_cache_max_bytes),
        stale_window: args.stale_window,
        stale_ttl: args.stale_ttl,
        prefetch_hits: args.prefetch_hits,
        prefetch_window: args.prefetch_window,
        prefetch_percent: args.prefetch_percent,
        prefetch_unasked: args.prefetch_unasked,
    }
}

/// The node state to keep in place, unless `--no-node-setup`; it needs the ClusterIP.
fn node_config(
    args: &Args,
    cluster_dns: &[IpAddr],
) -> Result<Option<node_setup::NodeConfig>, ConfigError> {
    if args.no_node_setup {
        return Ok(None);
    }
    if cluster_dns.is_empty() {
        return Err(SettingsError::NoClusterIp {
            needed_for: "node setup (or give --no-node-setup)",
        }
        .into());
    }
    let mut cfg = args.node.node_config(cluster_dns);
    cfg.lock_path = args.setup_lock.clone();
    cfg.validate()
        .map_err(|e| SettingsError::invalid("--interface", &cfg.interface, e))?;
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use settings::MapEnv;

    /// Flags that make a config valid on loopback without any ClusterIP.
    const LOOPBACK: [&str; 5] = [
        "--no-node-setup",
        "--listen",
        "127.0.30.1",
        "--upstream",
        "127.0.30.2",
    ];

    fn args(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("node-local-dns-resolver").chain(argv.iter().copied()))
    }

    fn parse(argv: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let args = args(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        Config::from_args(args, &MapEnv::new(env.iter().copied()))
    }

    fn loopback_with(extra: &[&str]) -> Result<Config, ConfigError> {
        let argv: Vec<&str> = LOOPBACK.iter().chain(extra).copied().collect();
        parse(&argv, &[])
    }

    /// The refusal's flag and its text.
    fn refusal(result: Result<Config, ConfigError>) -> (Option<&'static str>, String) {
        match result {
            Err(ConfigError::Setting(e)) => (e.name(), e.to_string()),
            Err(other) => panic!("not a settings error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn defaults_come_from_kube_dns_svc_ip() {
        let c = parse(
            &[],
            &[
                ("KUBE_DNS_SVC_IP", "10.96.0.10"),
                ("NODE_IP", "192.168.1.5"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "169.254.20.10:53".parse().unwrap()
            ]
        );
        assert_eq!(c.upstreams, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(c.upstream_source, Some("192.168.1.5".parse().unwrap()));
        assert_eq!(c.cluster_dns_source, Some(Source::KubeDnsSvcIp));
        let node = c.node_setup.expect("node setup");
        assert_eq!(node.cluster_dns, c.cluster_dns);
        assert_eq!(node.lock_path, PathBuf::from(node_setup::DEFAULT_LOCK_PATH));
        assert_eq!(c.cache.success_capacity, 120_000);
    }

    #[test]
    fn the_service_link_gives_the_clusterip_when_nothing_else_does() {
        let c = parse(&[], &[("KUBE_DNS_SERVICE_HOST", "10.96.0.10")]).unwrap();
        assert_eq!(c.cluster_dns, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.cluster_dns_source, Some(Source::KubeDnsServiceHost));
        assert_eq!(c.upstreams, vec!["10.96.0.10:53".parse().unwrap()]);
        let c = parse(
            &["--cluster-dns", "10.96.0.11"],
            &[("KUBE_DNS_SERVICE_HOST", "10.96.0.10")],
        )
        .unwrap();
        assert_eq!(c.cluster_dns_source, Some(Source::Flag));
        assert_eq!(c.upstreams, vec!["10.96.0.11:53".parse().unwrap()]);
    }

    #[test]
    fn defaults_are_written_once_and_match_the_caches_own() {
        let c = loopback_with(&[]).unwrap();
        // CacheConfig::default (cache/mod.rs, used by the cache's tests and benches) repeats
        // the flags' defaults; this keeps the two equal.
        // The byte budget follows the memory limit of wherever the test runs; without one it
        // is the cache's own default.
        assert_eq!(
            format!("{:?}", c.cache),
            format!(
                "{:?}",
                CacheConfig {
                    max_bytes: c.cache.max_bytes,
                    ..CacheConfig::default()
                }
            )
        );
        assert_eq!(c.cache.max_bytes, default_cache_max_bytes());
        assert_eq!(
            CacheConfig::default().max_bytes,
            crate::memlimit::DEFAULT_BUDGET
        );
    }

    #[test]
    fn cache_max_bytes_takes_sizes() {
        for (v, bytes) in [
            ("64MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("256M", 256_000_000),
            ("4096", 4096),
        ] {
            let c = loopback_with(&["--cache-max-bytes", v]).unwrap();
            assert_eq!(c.cache.max_bytes, bytes, "{v}");
        }
        let err = args(&["--cache-max-bytes", "64 mb"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--cache-max-bytes") && err.contains("64MiB"),
            "{err}"
        );
    }

    #[test]
    fn durations_take_the_shared_grammar() {
        let c = loopback_with(&["--stale-window", "1.5h", "--prefetch-window", "1m30s"]).unwrap();
        assert_eq!(c.cache.stale_window, Duration::from_secs(5400));
        assert_eq!(c.cache.prefetch_window, Duration::from_secs(90));
        let err = args(&["--upstream-timeout", "3parsecs"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--upstream-timeout") && err.contains("1m30s"),
            "{err}"
        );
    }

    #[test]
    fn udp_slice_is_zero_or_a_slice_the_kernel_accepts() {
        assert_eq!(
            loopback_with(&[]).unwrap().udp_slice,
            Duration::from_micros(100)
        );
        assert_eq!(
            loopback_with(&["--udp-slice", "0"]).unwrap().udp_slice,
            Duration::ZERO
        );
        assert_eq!(
            loopback_with(&["--udp-slice", "2ms"]).unwrap().udp_slice,
            Duration::from_millis(2)
        );
        for bad in ["50us", "101ms"] {
            let (name, text) = refusal(loopback_with(&["--udp-slice", bad]));
            assert_eq!(name, Some("--udp-slice"), "{bad}");
            assert!(
                text.contains(bad) && text.contains("0 or 100us..=100ms"),
                "{text}"
            );
        }
    }

    #[test]
    fn threads_are_a_count_or_one_per_cpu() {
        let threads = |v: &str| args(&["--threads", v]).map(|a| a.threads);
        assert_eq!(args(&[]).unwrap().threads, UdpThreads::Fixed(1));
        assert_eq!(threads("4").unwrap(), UdpThreads::Fixed(4));
        assert_eq!(threads("auto").unwrap(), UdpThreads::PerCpu);
        assert_eq!(threads("AUTO").unwrap(), UdpThreads::PerCpu);
        for bad in ["0", "65", "many", ""] {
            let err = threads(bad).expect_err(bad).to_string();
            assert!(err.contains("1..=64 or auto"), "{bad}: {err}");
        }
    }

    #[test]
    fn explicit_flags_and_ipv6() {
        let c = parse(
            &[
                "--listen",
                "[fd00::a]:5353,127.0.30.1",
                "--upstream",
                "127.0.30.2:1053",
                "--no-node-setup",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                "[fd00::a]:5353".parse().unwrap(),
                "127.0.30.1:53".parse().unwrap()
            ]
        );
        assert_eq!(c.upstreams, vec!["127.0.30.2:1053".parse().unwrap()]);
        assert!(c.node_setup.is_none());
        assert_eq!(c.cluster_dns_source, None);
    }

    #[test]
    fn bad_addresses_name_their_flag() {
        for (argv, flag, value) in [
            (["--listen", "notanip"], "--listen", "notanip"),
            (["--upstream", "1.2.3.4:99999"], "--upstream", "99999"),
            (
                ["--cluster-dns", "10.96.0.300"],
                "--cluster-dns",
                "10.96.0.300",
            ),
        ] {
            let err = args(&argv).unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains(value), "{argv:?}: {err}");
        }
        // An explicit --upstream is checked even when --listen is what is missing.
        let err = args(&["--upstream", "1.2.3.4:99999"])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("no listen address"), "{err}");
    }

    #[test]
    fn missing_addresses_name_every_source() {
        let no_listen = parse(&[], &[]).unwrap_err();
        assert_eq!(no_listen, ConfigError::NoListen);
        let no_upstream = parse(&["--listen", "127.0.30.1"], &[]).unwrap_err();
        assert_eq!(no_upstream, ConfigError::NoUpstream);
        for text in [no_listen.to_string(), no_upstream.to_string()] {
            for source in ["--cluster-dns", "KUBE_DNS_SVC_IP", "KUBE_DNS_SERVICE_HOST"] {
                assert!(text.contains(source), "{text}");
            }
        }
        let err = parse(&["--listen", "127.0.30.1", "--upstream", "127.0.30.2"], &[]).unwrap_err();
        assert!(
            matches!(err, ConfigError::Setting(SettingsError::NoClusterIp { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("--no-node-setup"), "{err}");
    }

    #[test]
    fn bad_environment_names_the_variable() {
        for (var, value) in [
            ("KUBE_DNS_SVC_IP", "x"),
            ("KUBE_DNS_SVC_IP", "10.96.0.10,10.96.0.11"),
            ("KUBE_DNS_SERVICE_HOST", "kube-dns"),
        ] {
            let (name, text) = refusal(parse(&[], &[(var, value)]));
            assert_eq!(name, Some(var), "{text}");
            assert!(text.contains(value), "{text}");
        }
        let (name, text) = refusal(parse(&LOOPBACK, &[("NODE_IP", "node-1")]));
        assert_eq!(name, Some("NODE_IP"));
        assert!(text.contains("\"node-1\""), "{text}");
    }

    #[test]
    fn contradictions_are_refused_naming_the_flag_value_and_bound() {
        for (extra, flag, says) in [
            (&["--listen", "0.0.0.0"][..], "--listen", "wildcard"),
            (
                &["--cluster-dns", "10.96.0.10,10.96.0.11"],
                "--cluster-dns",
                "two IPv4 addresses",
            ),
            (
                &["--tcp-idle-timeout", "60s"],
                "--tcp-idle-timeout",
                "60s: must be at most 10s",
            ),
            (
                &["--udp-coalesce", "2ms"],
                "--udp-coalesce",
                "2ms: must be at most 1ms",
            ),
            (
                &["--upstream-timeout", "5s"],
                "--upstream-timeout × --upstream-attempts",
                "5s × 2 = 10s: must be under 5s",
            ),
            (
                &["--upstream-timeout", "2s", "--upstream-attempts", "3"],
                "--upstream-timeout × --upstream-attempts",
                "2s × 3 = 6s",
            ),
            (
                &["--upstream-timeout", "0"],
                "--upstream-timeout",
                "0s: must be above 0",
            ),
            (
                &["--upstream-attempts", "0"],
                "--upstream-attempts",
                "0: must be at least 1",
            ),
            (&["--max-concurrent", "0"], "--max-concurrent", "at least 1"),
            (&["--workers", "0"], "--workers", "1..=64"),
            (
                &["--health-check-interval", "0s"],
                "--health-check-interval",
                "above 0",
            ),
            (&["--sync-interval", "0s"], "--sync-interval", "above 0"),
            (&["--prefetch-window", "0s"], "--prefetch-window", "above 0"),
            (
                &["--cache-success-min-ttl", "60s"],
                "--cache-success-min-ttl",
                "60s: must be at most --cache-success-max-ttl (30s)",
            ),
            (
                &["--cache-denial-max-ttl", "500ms"],
                "--cache-denial-min-ttl",
                "1s: must be at most --cache-denial-max-ttl (500ms)",
            ),
            (
                &["--prefetch-percent", "101"],
                "--prefetch-percent",
                "101: must be 0..=100",
            ),
        ] {
            let (name, text) = refusal(loopback_with(extra));
            assert_eq!(name, Some(flag), "{extra:?}: {text}");
            assert!(
                text.starts_with(flag) && text.contains(says),
                "{extra:?}: {text}"
            );
        }
    }

    #[test]
    fn values_at_the_bounds_are_accepted() {
        let c = loopback_with(&[
            "--tcp-idle-timeout",
            "10s",
            "--udp-coalesce",
            "1ms",
            "--upstream-timeout",
            "2.4s",
            "--cache-success-min-ttl",
            "30s",
            "--prefetch-percent",
            "100",
            "--cluster-dns",
            "10.96.0.10,fd00::a",
        ])
        .unwrap();
        assert_eq!(c.tcp_idle_timeout, MAX_TCP_IDLE);
        assert_eq!(c.udp_coalesce, MAX_UDP_COALESCE);
        assert_eq!(c.cluster_dns.len(), 2);
    }

    #[test]
    fn node_setup_carries_the_node_flags_and_checks_them() {
        let c = parse(
            &[
                "--cluster-dns",
                "10.96.0.10",
                "--interface",
                "nld0",
                "--socket-match",
                "nowildcard",
                "--setup-lock",
                "/tmp/x.lock",
            ],
            &[],
        )
        .unwrap();
        let node = c.node_setup.unwrap();
        assert_eq!(node.interface, "nld0");
        assert_eq!(node.socket_match, node_setup::SocketMatch::NoWildcard);
        assert_eq!(node.lock_path, PathBuf::from("/tmp/x.lock"));
        let (name, text) = refusal(parse(
            &[
                "--cluster-dns",
                "10.96.0.10",
                "--interface",
                "a-name-longer-than-15",
            ],
            &[],
        ));
        assert_eq!(name, Some("--interface"));
        assert!(text.contains("a-name-longer-than-15"), "{text}");
    }
}
