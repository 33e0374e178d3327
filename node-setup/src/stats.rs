//! The plugin's counters, kept in a small state file for the daemon to export.
//!
//! SEAM CONTRACT: the plugin calls `record` once per ADD/CHECK; the daemon calls `load` on
//! every scrape/sync and exports `node_local_dns_cni_operations_total{command}`,
//! `node_local_dns_cni_operation_duration_seconds{command}` (sum and count) and
//! `coredns_nodecache_setup_errors_total{errortype}`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// One plugin invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// "ADD" or "CHECK".
    pub command: &'a str,
    pub duration: Duration,
    /// `SetupError::kind()` of each failure during this invocation.
    pub errors: Vec<&'a str>,
}

/// Totals since the file was created (the file lives on tmpfs: reset at node reboot).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CniStats {
    pub operations: BTreeMap<String, u64>,
    pub duration_seconds_sum: BTreeMap<String, f64>,
    pub setup_errors: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("stats file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("stats file {path}: {msg}")]
    Corrupt { path: String, msg: String },
}

/// Adds one event to the counters in `dir` (atomically; concurrent plugins are serialised).
pub fn record(_dir: &Path, _event: &Event<'_>) -> Result<(), StatsError> {
    todo!("node-setup work")
}

/// Reads the counters in `dir`; a missing file is all zeros.
pub fn load(_dir: &Path) -> Result<CniStats, StatsError> {
    todo!("node-setup work")
}
