//! Node setup shared by the CNI plugin, the resolver daemon and the installer: the
//! `nodelocaldns` interface with the kube-dns ClusterIP(s) and local IPs, and the raw-table
//! rules that send pod DNS to the cache while its socket is open (docs/design-facts.md §1).
//!
//! The contract the plugin, daemon and installer code against:
//! - `NodeConfig` is the desired state as data; `ensure_node` applies it idempotently in the
//!   calling thread's network namespace (blocking; serialised by a lock file; "already exists"
//!   is success), `check_node` lists what is missing without changing anything,
//!   `teardown_node` removes everything (uninstall only, never on pod DEL or daemon exit).
//! - `SetupError::kind()` is the `errortype` label of `coredns_nodecache_setup_errors_total`.
//! - `stats` is the small state file the plugin appends its ADD/CHECK counts, durations and
//!   setup errors to, and the daemon reads to export them as metrics.
//! - `atomic` is the workspace's one way to replace a file (temp file, fsync, rename).
//!
//! Modules: `config` and `setting` (what the callers ask for), `desired` (that as rules and
//! addresses), `reconcile` (observe → diff → lock → observe → repair, and teardown) over
//! `links` (netlink) and `rules` (iptables, with `backend` choosing which one), `verified` and
//! `state` (what the fast path remembers under /run), `lock`, `error`; `legacy`, `nftgen` and
//! `sockopt` read kernel state cheaply.

#![deny(unsafe_code)]

pub mod atomic;
pub mod backend;
mod config;
pub mod desired;
mod error;
pub mod legacy;
pub mod links;
mod lock;
mod nftgen;
mod reconcile;
pub mod rules;
mod setting;
// The one getsockopt call without a safe wrapper.
#[allow(unsafe_code)]
mod sockopt;
mod state;
pub mod stats;
mod verified;

pub use config::{
    DEFAULT_INTERFACE, DEFAULT_LOCAL_IP, DEFAULT_LOCK_PATH, DEFAULT_STATS_DIR, NodeConfig,
};
pub use error::{Missing, SetupError};
pub use reconcile::SetupReport;
#[cfg(feature = "clap")]
pub use setting::clap_parser;
pub use setting::{IptablesBackend, Setting, SocketMatch, UnknownSetting};

/// Makes the node state match `cfg` in the calling thread's network namespace.
pub fn ensure_node(cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
    reconcile::ensure(cfg)
}

/// Lists what is missing; changes nothing.
pub fn check_node(cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
    reconcile::check(cfg)
}

/// Removes the interface and our rules (uninstall with --teardown-node only).
pub fn teardown_node(cfg: &NodeConfig) -> Result<(), SetupError> {
    reconcile::teardown(cfg)
}

/// The backend `Auto` resolves to on this node right now.
pub fn detect_backend(requested: IptablesBackend) -> Result<&'static str, SetupError> {
    backend::resolve_backend(requested, None).map(backend::Backend::name)
}
