//! The plugin's counters, kept in a small state file for the daemon to export.
//!
//! SEAM CONTRACT: the plugin calls `record` once per ADD/CHECK; the daemon calls `load` on
//! every scrape/sync and exports `node_local_dns_cni_operations_total{command}`,
//! `node_local_dns_cni_operation_duration_seconds{command}` (sum and count) and
//! `coredns_nodecache_setup_errors_total{errortype}`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::SetupError;
use crate::atomic::AtomicError;

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
    // The io::Error is part of the message, not a `source`, so it is printed once.
    #[error("stats file {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("stats file {path}: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("stats file {0}")]
    Lock(SetupError),
    #[error("stats file {0}")]
    Write(AtomicError),
}

/// The counters file inside the stats directory.
pub const STATS_FILE: &str = "cni-stats.json";
const LOCK_FILE: &str = "cni-stats.lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(2);

impl CniStats {
    /// Adds one event.
    pub fn add(&mut self, event: &Event<'_>) {
        *self
            .operations
            .entry(event.command.to_string())
            .or_default() += 1;
        *self
            .duration_seconds_sum
            .entry(event.command.to_string())
            .or_default() += event.duration.as_secs_f64();
        for kind in &event.errors {
            *self.setup_errors.entry(kind.to_string()).or_default() += 1;
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StatsError + '_ {
    move |err| StatsError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// Adds one event to the counters in `dir` (atomically; concurrent plugins are serialised).
///
/// Read-modify-write under a flock, written to a temp file and renamed, so a reader never sees
/// a half-written file and no concurrent event is lost. A corrupt file is kept aside as
/// `cni-stats.json.corrupt` (nothing is lost) and counting starts again.
pub fn record(dir: &Path, event: &Event<'_>) -> Result<(), StatsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let _lock = crate::lock::acquire(&lock_path, LOCK_TIMEOUT).map_err(StatsError::Lock)?;
    let path = dir.join(STATS_FILE);
    let mut stats = match load(dir) {
        Ok(stats) => stats,
        Err(StatsError::Corrupt { .. }) => {
            let aside = dir.join(format!("{STATS_FILE}.corrupt"));
            std::fs::rename(&path, &aside).map_err(io_err(&path))?;
            tracing::warn!(path = %aside.display(), "corrupt CNI stats file kept aside; counting restarts");
            CniStats::default()
        }
        Err(e) => return Err(e),
    };
    stats.add(event);
    write_atomically(&path, &stats)
}

/// Readers never see a torn file; see `state` for why there is no fsync.
fn write_atomically(path: &Path, stats: &CniStats) -> Result<(), StatsError> {
    let body = serde_json::to_vec(stats).map_err(|e| StatsError::Corrupt {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    crate::state::write(path, &body).map_err(StatsError::Write)
}

/// Reads the counters in `dir`; a missing file is all zeros.
pub fn load(dir: &Path) -> Result<CniStats, StatsError> {
    let path = dir.join(STATS_FILE);
    let body = match std::fs::read(&path) {
        Ok(body) => body,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CniStats::default()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_slice(&body).map_err(|e| StatsError::Corrupt {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_event(errors: Vec<&str>) -> Event<'_> {
        Event {
            command: "ADD",
            duration: Duration::from_millis(250),
            errors,
        }
    }

    #[test]
    fn missing_file_loads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), CniStats::default());
    }

    #[test]
    fn record_accumulates_counts_durations_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), &add_event(vec![])).unwrap();
        record(dir.path(), &add_event(vec!["iptables", "lock"])).unwrap();
        let check = Event {
            command: "CHECK",
            duration: Duration::from_millis(100),
            errors: vec!["iptables"],
        };
        record(dir.path(), &check).unwrap();
        let stats = load(dir.path()).unwrap();
        assert_eq!(stats.operations["ADD"], 2);
        assert_eq!(stats.operations["CHECK"], 1);
        assert!((stats.duration_seconds_sum["ADD"] - 0.5).abs() < 1e-9);
        assert_eq!(stats.setup_errors["iptables"], 2);
        assert_eq!(stats.setup_errors["lock"], 1);
    }

    #[test]
    fn concurrent_records_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        record(&dir, &add_event(vec!["netlink"])).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = load(dir.path()).unwrap();
        assert_eq!(stats.operations["ADD"], 80);
        assert_eq!(stats.setup_errors["netlink"], 80);
    }

    #[test]
    fn corrupt_file_is_reported_by_load_and_kept_aside_by_record() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATS_FILE), b"{not json").unwrap();
        assert!(matches!(load(dir.path()), Err(StatsError::Corrupt { .. })));
        record(dir.path(), &add_event(vec![])).unwrap();
        assert_eq!(load(dir.path()).unwrap().operations["ADD"], 1);
        let aside = std::fs::read(dir.path().join("cni-stats.json.corrupt")).unwrap();
        assert_eq!(aside, b"{not json");
    }
}
