//! Node setup shared by the CNI plugin, the resolver daemon and the installer: the
//! `nodelocaldns` interface with the kube-dns ClusterIP(s) and local IPs, and the raw-table
//! rules that send pod DNS to the cache while its socket is open (DESIGN.md §1).
//!
//! SEAM CONTRACT (the plugin, daemon and installer code against these names; the node-setup
//! work fills them in and may add to them but keeps their meaning):
//! - `NodeConfig` is the desired state as data; `ensure_node` applies it idempotently in the
//!   calling thread's network namespace (blocking; serialised by a lock file; "already exists"
//!   is success), `check_node` lists what is missing without changing anything,
//!   `teardown_node` removes everything (uninstall only, never on pod DEL or daemon exit).
//! - `SetupError::kind()` is the `errortype` label of `coredns_nodecache_setup_errors_total`.
//! - `stats` is the small state file the plugin appends its ADD/CHECK counts, durations and
//!   setup errors to, and the daemon reads to export them as metrics.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod stats;

pub const DEFAULT_INTERFACE: &str = "nodelocaldns";
pub const DEFAULT_LOCAL_IP: &str = "169.254.20.10";
pub const DEFAULT_LOCK_PATH: &str = "/run/node-local-dns/setup.lock";
pub const DEFAULT_STATS_DIR: &str = "/run/node-local-dns";

/// Which iptables implementation to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IptablesBackend {
    /// Whichever the node's kube-proxy uses (more `KUBE-` chains; nft when tied).
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// How the PREROUTING rules match the daemon's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketMatch {
    /// `-m socket`: ignores wildcard (0.0.0.0:53) listeners (DESIGN.md §1).
    #[default]
    Safe,
    /// The seed's `-m socket --nowildcard` (documented hazard).
    NoWildcard,
}

/// Desired node state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub interface: String,
    /// kube-dns ClusterIPs (one per family).
    pub cluster_dns: Vec<IpAddr>,
    /// Link-local listen addresses (default 169.254.20.10).
    pub local_ips: Vec<IpAddr>,
    pub backend: IptablesBackend,
    pub socket_match: SocketMatch,
    pub lock_path: PathBuf,
    pub lock_timeout: Duration,
}

impl NodeConfig {
    /// Defaults for everything but the ClusterIPs.
    pub fn new(cluster_dns: Vec<IpAddr>) -> Self {
        Self {
            interface: DEFAULT_INTERFACE.to_string(),
            cluster_dns,
            local_ips: vec![IpAddr::from([169, 254, 20, 10])],
            backend: IptablesBackend::Auto,
            socket_match: SocketMatch::Safe,
            lock_path: PathBuf::from(DEFAULT_LOCK_PATH),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// What `ensure_node` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupReport {
    /// Link kind in use: "dummy", or the fallback used when the kernel has no dummy.
    pub link_kind: String,
    /// Human-readable list of changes made (empty on the fast path).
    pub changes: Vec<String>,
}

/// One piece of desired state that is not in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Interface(String),
    Address(IpAddr),
    /// Rule described as its iptables arguments (table, chain, spec).
    Rule {
        table: String,
        chain: String,
        spec: String,
    },
    /// Rule present but not at the top of its chain.
    RuleNotFirst {
        table: String,
        chain: String,
        spec: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("lock {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
    #[error("interface {name}: {msg}")]
    Interface { name: String, msg: String },
    #[error("address {addr}: {msg}")]
    Address { addr: IpAddr, msg: String },
    #[error("iptables ({cmd}): {msg}")]
    Iptables { cmd: String, msg: String },
    #[error("netlink: {0}")]
    Netlink(String),
}

impl SetupError {
    /// `errortype` label for coredns_nodecache_setup_errors_total.
    pub fn kind(&self) -> &'static str {
        match self {
            SetupError::Lock { .. } => "lock",
            SetupError::Interface { .. } => "interface_add",
            SetupError::Address { .. } => "address_add",
            SetupError::Iptables { .. } => "iptables",
            SetupError::Netlink(_) => "netlink",
        }
    }
}

/// Makes the node state match `cfg` in the calling thread's network namespace.
pub fn ensure_node(_cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
    todo!("node-setup work")
}

/// Lists what is missing; changes nothing.
pub fn check_node(_cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
    todo!("node-setup work")
}

/// Removes the interface and our rules (uninstall with --teardown-node only).
pub fn teardown_node(_cfg: &NodeConfig) -> Result<(), SetupError> {
    todo!("node-setup work")
}
