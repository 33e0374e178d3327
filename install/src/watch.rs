//! The long-running install: reconcile, then again on every change of the conf dir
//! (debounced) and on a timer, until told to stop. Stopping leaves everything installed.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::InstallError;
use crate::atomic;
use crate::confdir::{self, ConfChange, EnsureOutcome};
use crate::conflist::PluginEntry;
use crate::plugin_binary::{self, BinaryOutcome};

/// Desired state of one node's CNI dirs.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub plugin_binary: PathBuf,
    pub entry: PluginEntry,
    /// Full re-check even without events (catches missed events and a deleted binary).
    pub resync: Duration,
    /// Quiet time after the last event before reconciling: a primary CNI often writes a file in
    /// several steps.
    pub debounce: Duration,
    /// Next attempt after a failed reconcile.
    pub retry: Duration,
}

/// What wakes the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    ConfDirChanged,
    Stop,
}

#[derive(Debug)]
pub struct Reconciled {
    pub binary: BinaryOutcome,
    pub conf: EnsureOutcome,
}

/// Binary first (a conflist naming a missing plugin fails every pod ADD), then the conflist.
pub fn reconcile(cfg: &InstallConfig) -> Result<Reconciled, InstallError> {
    let binary = plugin_binary::ensure_binary(&cfg.plugin_binary, &cfg.bin_dir)?;
    let conf = confdir::ensure_conf_dir(&cfg.conf_dir, &cfg.entry, &binary.supported_versions)?;
    Ok(Reconciled { binary, conf })
}

/// What an install round would still have to do, without doing it: empty when the node is
/// fully installed (the installer container's readiness).
pub fn check(cfg: &InstallConfig) -> Vec<String> {
    let binary = plugin_binary::check_binary(&cfg.plugin_binary, &cfg.bin_dir);
    let conf = confdir::check_conf_dir(&cfg.conf_dir, &cfg.entry);
    [binary, conf]
        .into_iter()
        .filter_map(|r| r.unwrap_or_else(|e| Some(e.to_string())))
        .collect()
}

/// Reconciles and logs the result; returns whether it succeeded.
pub fn reconcile_and_log(cfg: &InstallConfig) -> bool {
    match reconcile(cfg) {
        Ok(done) => {
            log_reconciled(&done);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "install not complete; retrying");
            false
        }
    }
}

/// One log line per change made, a warning per skipped file, nothing else at info level.
pub fn log_reconciled(done: &Reconciled) {
    if done.binary.replaced {
        tracing::info!(path = %done.binary.path.display(), versions = ?done.binary.supported_versions, "plugin binary installed");
    }
    for skipped in &done.conf.skipped {
        tracing::warn!(error = %skipped, "skipped a config file the runtime may also read");
    }
    match &done.conf.change {
        ConfChange::Unchanged(path) => {
            tracing::debug!(path = %path.display(), "conflist already has our entry")
        }
        ConfChange::Written(path) => {
            tracing::info!(path = %path.display(), "conflist entry written")
        }
        ConfChange::Converted { from, to } => {
            tracing::info!(from = %from.display(), to = %to.display(), "converted .conf to .conflist with our entry")
        }
    }
}

/// Runs until `Wake::Stop` (or all senders are gone). Never uninstalls anything.
pub fn run(cfg: &InstallConfig, wake: &Receiver<Wake>) {
    loop {
        let next = if reconcile_and_log(cfg) {
            cfg.resync
        } else {
            cfg.retry.min(cfg.resync)
        };
        if wait_for_next_round(wake, next, cfg.debounce) == Wake::Stop {
            tracing::info!("stopping; node-local-dns stays installed");
            return;
        }
    }
}

/// A busy conf dir (events without pause) delays a round by at most this many debounce periods.
const MAX_DEBOUNCE_PERIODS: u32 = 10;

/// Waits up to `timeout` for a change; after a change, waits until `debounce` passes without
/// another one (or `MAX_DEBOUNCE_PERIODS` of them in all). A stop request wins at any point.
fn wait_for_next_round(wake: &Receiver<Wake>, timeout: Duration, debounce: Duration) -> Wake {
    match wake.recv_timeout(timeout) {
        Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
        Ok(Wake::ConfDirChanged) => {}
        Err(RecvTimeoutError::Timeout) => return Wake::ConfDirChanged,
    }
    let give_up = Instant::now() + debounce * MAX_DEBOUNCE_PERIODS;
    let mut quiet_until = Instant::now() + debounce;
    loop {
        match wake.recv_timeout(quiet_until.saturating_duration_since(Instant::now())) {
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
            Ok(Wake::ConfDirChanged) => quiet_until = (Instant::now() + debounce).min(give_up),
            Err(RecvTimeoutError::Timeout) => return Wake::ConfDirChanged,
        }
    }
}

/// Starts an inotify watch on `dir` that sends `Wake::ConfDirChanged` for every event except
/// those on our own temp files. Keep the returned watcher alive for as long as it should run.
pub fn watch_conf_dir(dir: &Path, wake: Sender<Wake>) -> Result<RecommendedWatcher, InstallError> {
    let fail = |e: notify::Error| InstallError::Watch {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(ev) => !ev.paths.iter().all(|p| atomic::is_temp_file(p)) || ev.paths.is_empty(),
            // A watch error (e.g. queue overflow) means events may be lost: re-check.
            Err(_) => true,
        };
        if relevant {
            let _ = wake.send(Wake::ConfDirChanged);
        }
    })
    .map_err(fail)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(fail)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn burst_of_changes_is_one_round() {
        let (tx, rx) = channel();
        for _ in 0..5 {
            tx.send(Wake::ConfDirChanged).unwrap();
        }
        assert_eq!(
            wait_for_next_round(&rx, Duration::from_secs(60), Duration::from_millis(10)),
            Wake::ConfDirChanged
        );
        assert!(
            rx.try_recv().is_err(),
            "the burst must be consumed by one round"
        );
    }

    #[test]
    fn stop_wins_during_debounce_and_when_senders_are_gone() {
        let (tx, rx) = channel();
        tx.send(Wake::ConfDirChanged).unwrap();
        tx.send(Wake::Stop).unwrap();
        assert_eq!(
            wait_for_next_round(&rx, Duration::from_secs(60), Duration::from_secs(60)),
            Wake::Stop
        );
        drop(tx);
        assert_eq!(
            wait_for_next_round(&rx, Duration::from_secs(60), Duration::from_secs(60)),
            Wake::Stop
        );
    }

    #[test]
    fn endless_events_still_lead_to_a_round() {
        let (tx, rx) = channel();
        tx.send(Wake::ConfDirChanged).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let noisy = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = tx.send(Wake::ConfDirChanged);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Without the cap this would never return: events come faster than the debounce.
        let round = wait_for_next_round(&rx, Duration::from_secs(60), Duration::from_millis(20));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        noisy.join().unwrap();
        assert_eq!(round, Wake::ConfDirChanged);
    }

    #[test]
    fn timer_expiry_is_a_resync_round() {
        let (_tx, rx) = channel::<Wake>();
        assert_eq!(
            wait_for_next_round(&rx, Duration::from_millis(1), Duration::from_secs(60)),
            Wake::ConfDirChanged
        );
    }
}
