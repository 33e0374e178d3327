//! Node setup from the daemon: `node_setup::ensure_node` at start and every sync interval,
//! on a blocking thread; failures are counted by `SetupError::kind()` and never fatal (the
//! cache is an optimisation, kube-proxy's path still works). Nothing is removed on exit.

use crate::metrics::Metrics;
use node_setup::NodeConfig;
use std::time::Duration;

/// One ensure round; returns whether it succeeded.
pub async fn ensure_once(cfg: &NodeConfig, metrics: &Metrics) -> bool {
    let c = cfg.clone();
    match tokio::task::spawn_blocking(move || node_setup::ensure_node(&c)).await {
        Ok(Ok(report)) => {
            if !report.changes.is_empty() {
                tracing::info!(link_kind = %report.link_kind, changes = ?report.changes, "node setup applied");
            }
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, kind = e.kind(), "node setup failed");
            metrics.count_setup_error(e.kind());
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "node setup panicked");
            metrics.count_setup_error("panic");
            false
        }
    }
}

pub async fn sync_loop(cfg: NodeConfig, interval: Duration, metrics: Metrics) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first round ran before the listeners were bound
    loop {
        tick.tick().await;
        ensure_once(&cfg, &metrics).await;
    }
}
