//! Command line / environment configuration, parsed once at start into a validated `Config`.
//!
//! Every flag has an env equivalent `NODE_LOCAL_DNS_*`; the kube-dns ClusterIP may also come
//! from `KUBE_DNS_SVC_IP` and the upstream source address from `NODE_IP` (downward API
//! `status.hostIP`), read through the `Env` trait so tests drive it with a map.

use crate::cache::CacheConfig;
use clap::{Parser, ValueEnum};
use node_setup::{IptablesBackend, SocketMatch, clap_parser};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_LOCAL_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 20, 10));
/// Idle TCP connections are closed after at most this long (issue 2: <= 10 s).
pub const MAX_TCP_IDLE: Duration = Duration::from_secs(10);

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

fn parse_threads(s: &str) -> Result<UdpThreads, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(UdpThreads::PerCpu);
    }
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_UDP_THREADS).contains(&n) => Ok(UdpThreads::Fixed(n)),
        _ => Err(format!(
            "invalid thread count {s:?} (1..={MAX_UDP_THREADS} or auto)"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
    #[arg(long, env = "NODE_LOCAL_DNS_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,

    /// kube-dns ClusterIP(s), one per family (also read from KUBE_DNS_SVC_IP).
    #[arg(long, env = "NODE_LOCAL_DNS_CLUSTER_DNS", value_delimiter = ',')]
    pub cluster_dns: Vec<IpAddr>,

    /// Link-local address(es) the cache also serves on and node setup adds to the interface.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_LOCAL_IP",
        value_delimiter = ',',
        default_value = "169.254.20.10"
    )]
    pub local_ip: Vec<IpAddr>,

    /// Upstream server for cache misses, IP[:PORT], repeatable. Default: the kube-dns
    /// ClusterIP(s) port 53 (kube-proxy DNATs them to the cluster DNS pods).
    #[arg(long, env = "NODE_LOCAL_DNS_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,

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

    /// Attempts per client query (each on the next healthy upstream); keep
    /// attempts x timeout well under the client's 5 s.
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
    /// Overall cache memory budget in bytes (LRU eviction past it). Default: from the
    /// container's memory limit (what it leaves after the rest of the process), 256 MiB
    /// without a limit.
    #[arg(long, env = "NODE_LOCAL_DNS_CACHE_MAX_BYTES")]
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

    /// Prometheus metrics address (/metrics).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_METRICS_LISTEN",
        default_value = "127.0.0.1:9253"
    )]
    pub metrics_listen: SocketAddr,
    /// Health address (/health alive, /ready listening and an upstream answered).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_HEALTH_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub health_listen: SocketAddr,

    /// Do not touch the node (interface, addresses, iptables): for running on loopback.
    #[arg(long, env = "NODE_LOCAL_DNS_NO_NODE_SETUP")]
    pub no_node_setup: bool,
    /// How often node setup is re-ensured.
    #[arg(long, env = "NODE_LOCAL_DNS_SYNC_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    pub sync_interval: Duration,
    /// Node-local interface holding the listen addresses.
    #[arg(long, env = "NODE_LOCAL_DNS_INTERFACE", default_value = node_setup::DEFAULT_INTERFACE)]
    pub interface: String,
    /// iptables backend to program: auto = the one kube-proxy uses (more KUBE- chains; nft
    /// when tied).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_IPTABLES_BACKEND",
        value_parser = clap_parser::<IptablesBackend>(),
        default_value = "auto"
    )]
    pub iptables_backend: IptablesBackend,
    /// How the raw PREROUTING rules match the daemon's socket: safe = `-m socket` (ignores
    /// wildcard listeners; recommended); nowildcard = the seed's `-m socket --nowildcard`
    /// (captured by any 0.0.0.0:53 listener while the cache is down). The installer writes
    /// the same value into the plugin's conflist entry.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_SOCKET_MATCH",
        value_parser = clap_parser::<SocketMatch>(),
        default_value = "safe"
    )]
    pub socket_match: SocketMatch,
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

    /// Log format.
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
    #[error("invalid address {value:?}: expected IP or IP:PORT ([v6]:PORT)")]
    Address { value: String },
    #[error("no listen address: give --listen or --cluster-dns / KUBE_DNS_SVC_IP")]
    NoListen,
    #[error("no upstream: give --upstream or --cluster-dns / KUBE_DNS_SVC_IP")]
    NoUpstream,
    #[error("listen address {0} is a wildcard; bind specific addresses only")]
    Wildcard(IpAddr),
    #[error("{name} must be {rule}")]
    Range {
        name: &'static str,
        rule: &'static str,
    },
    #[error("KUBE_DNS_SVC_IP {0:?} is not an IP address")]
    KubeDnsIp(String),
    #[error("NODE_IP {0:?} is not an IP address")]
    NodeIp(String),
}

/// Source of environment strings (real process env, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;
impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub cluster_dns: Vec<IpAddr>,
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
        let cluster_dns = cluster_dns(&args, env)?;
        let listen = listen_addrs(&args, &cluster_dns)?;
        let upstreams = upstream_addrs(&args, &cluster_dns)?;
        let upstream_source = match args.upstream_source {
            Some(ip) => Some(ip),
            None => match env.var("NODE_IP") {
                Some(v) => Some(v.parse().map_err(|_| ConfigError::NodeIp(v))?),
                None => None,
            },
        };
        check_ranges(&args)?;
        let node_setup = (!args.no_node_setup).then(|| node_config(&args, &cluster_dns));
        Ok(Self {
            listen,
            cluster_dns,
            local_ips: args.local_ip.clone(),
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
            udp_coalesce: args.udp_coalesce.min(Duration::from_millis(1)),
            udp_slice: args.udp_slice,
            workers: args.workers,
            tcp_max_connections: args.tcp_max_connections,
            tcp_idle_timeout: args.tcp_idle_timeout.min(MAX_TCP_IDLE),
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

fn cluster_dns(args: &Args, env: &dyn Env) -> Result<Vec<IpAddr>, ConfigError> {
    if !args.cluster_dns.is_empty() {
        return Ok(args.cluster_dns.clone());
    }
    match env.var("KUBE_DNS_SVC_IP") {
        None => Ok(Vec::new()),
        Some(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| ConfigError::KubeDnsIp(v.clone()))
            })
            .collect(),
    }
}

fn listen_addrs(args: &Args, cluster_dns: &[IpAddr]) -> Result<Vec<SocketAddr>, ConfigError> {
    let listen: Vec<SocketAddr> = if args.listen.is_empty() {
        if cluster_dns.is_empty() {
            return Err(ConfigError::NoListen);
        }
        cluster_dns
            .iter()
            .chain(args.local_ip.iter())
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.listen
            .iter()
            .map(|s| parse_host_port(s, 53))
            .collect::<Result<_, _>>()?
    };
    if let Some(w) = listen.iter().find(|a| a.ip().is_unspecified()) {
        return Err(ConfigError::Wildcard(w.ip()));
    }
    Ok(dedup(listen))
}

fn upstream_addrs(args: &Args, cluster_dns: &[IpAddr]) -> Result<Vec<SocketAddr>, ConfigError> {
    let ups: Vec<SocketAddr> = if args.upstream.is_empty() {
        cluster_dns
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    } else {
        args.upstream
            .iter()
            .map(|s| parse_host_port(s, 53))
            .collect::<Result<_, _>>()?
    };
    if ups.is_empty() {
        return Err(ConfigError::NoUpstream);
    }
    Ok(dedup(ups))
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

fn check_ranges(args: &Args) -> Result<(), ConfigError> {
    let (min_slice, max_slice) = crate::sched::SLICE_RANGE;
    let slice = args.udp_slice;
    let checks: [(bool, &'static str, &'static str); 7] = [
        (
            args.workers >= 1 && args.workers <= 64,
            "--workers",
            "1..=64",
        ),
        (args.upstream_attempts >= 1, "--upstream-attempts", ">= 1"),
        (args.max_concurrent >= 1, "--max-concurrent", ">= 1"),
        (
            !args.upstream_timeout.is_zero(),
            "--upstream-timeout",
            "> 0",
        ),
        (
            args.prefetch_percent <= 100,
            "--prefetch-percent",
            "0..=100",
        ),
        (!args.sync_interval.is_zero(), "--sync-interval", "> 0"),
        (
            slice.is_zero() || (min_slice..=max_slice).contains(&slice),
            "--udp-slice",
            "0 or 100us..=100ms",
        ),
    ];
    match checks.iter().find(|(ok, _, _)| !ok) {
        Some((_, name, rule)) => Err(ConfigError::Range { name, rule }),
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
        max_bytes: args
            .cache_max_bytes
            .unwrap_or_else(crate::memlimit::default_cache_max_bytes),
        stale_window: args.stale_window,
        stale_ttl: args.stale_ttl,
        prefetch_hits: args.prefetch_hits,
        prefetch_window: args.prefetch_window,
        prefetch_percent: args.prefetch_percent,
        prefetch_unasked: args.prefetch_unasked,
    }
}

fn node_config(args: &Args, cluster_dns: &[IpAddr]) -> node_setup::NodeConfig {
    let mut cfg = node_setup::NodeConfig::new(cluster_dns.to_vec());
    cfg.interface = args.interface.clone();
    cfg.local_ips = args.local_ip.clone();
    cfg.backend = args.iptables_backend;
    cfg.socket_match = args.socket_match;
    cfg.lock_path = args.setup_lock.clone();
    cfg
}

/// Parses `IP`, `IP:PORT`, `[V6]` or `[V6]:PORT`.
pub fn parse_host_port(s: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    let s = s.trim();
    let err = || ConfigError::Address {
        value: s.to_string(),
    };
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(err)?;
    inner
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| err())
}

/// Parses `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" => n / 1_000_000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| s.to_string())
        }
    }

    fn parse(argv: &[&str], env: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let mut full = vec!["node-local-dns-resolver"];
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).unwrap();
        Config::from_args(args, &MapEnv(env.iter().copied().collect()))
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
        assert!(c.node_setup.is_some());
        assert_eq!(c.cache.success_capacity, 120_000);
    }

    #[test]
    fn udp_slice_is_zero_or_a_slice_the_kernel_accepts() {
        let base = [
            "--no-node-setup",
            "--listen",
            "127.0.30.1",
            "--upstream",
            "127.0.30.2",
        ];
        let slice = |v: &str| {
            let mut argv = base.to_vec();
            argv.extend(["--udp-slice", v]);
            parse(&argv, &[]).map(|c| c.udp_slice)
        };
        assert_eq!(
            parse(&base, &[]).unwrap().udp_slice,
            Duration::from_micros(100)
        );
        assert_eq!(slice("0").unwrap(), Duration::ZERO);
        assert_eq!(slice("2ms").unwrap(), Duration::from_millis(2));
        for bad in ["50us", "101ms"] {
            match slice(bad) {
                Err(ConfigError::Range { name, .. }) => assert_eq!(name, "--udp-slice"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn threads_are_a_count_or_one_per_cpu() {
        let threads = |v: &str| {
            let argv = [
                "node-local-dns-resolver",
                "--listen",
                "127.0.30.1",
                "--threads",
                v,
            ];
            Args::try_parse_from(argv).map(|a| a.threads)
        };
        let default = Args::try_parse_from(["node-local-dns-resolver"]).unwrap();
        assert_eq!(default.threads, UdpThreads::Fixed(1));
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
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert_eq!(parse(&[], &[]).unwrap_err(), ConfigError::NoListen);
        assert!(matches!(
            parse(&["--listen", "0.0.0.0", "--upstream", "1.1.1.1"], &[]),
            Err(ConfigError::Wildcard(_))
        ));
        assert!(matches!(
            parse(&["--listen", "nonsense:53", "--upstream", "1.1.1.1"], &[]),
            Err(ConfigError::Address { .. })
        ));
        assert!(matches!(
            parse(&[], &[("KUBE_DNS_SVC_IP", "x")]),
            Err(ConfigError::KubeDnsIp(_))
        ));
        assert!(Args::try_parse_from(["x", "--upstream-timeout", "3parsecs"]).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn tcp_idle_timeout_is_capped_at_ten_seconds() {
        let c = parse(
            &[
                "--listen",
                "127.0.0.1",
                "--upstream",
                "127.0.0.2",
                "--tcp-idle-timeout",
                "60s",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.tcp_idle_timeout, MAX_TCP_IDLE);
    }
}
