//! What ADD and CHECK do: node setup in the namespace the plugin runs in (the host's; never
//! the pod's), the failure policy, the passthrough of `prevResult`, and the counters.

use std::time::Instant;

use node_setup::{Missing, NodeConfig, SetupError, SetupReport, stats};
use serde_json::{Map, Value};

use crate::config::{FailurePolicy, PluginConfig};
use crate::error::{CniError, INVALID_CONFIG, TRY_AGAIN_LATER};

/// Node setup as the plugin needs it; the real one is `node_setup`, tests use fakes.
pub trait NodeOps {
    fn ensure(&self, cfg: &NodeConfig) -> Result<SetupReport, SetupError>;
    fn check(&self, cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError>;
}

pub struct RealNode;

impl NodeOps for RealNode {
    fn ensure(&self, cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
        node_setup::ensure_node(cfg)
    }
    fn check(&self, cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
        node_setup::check_node(cfg)
    }
}

/// ADD: ensure the node state, then hand `prevResult` on unchanged.
pub fn add(cfg: &PluginConfig, node: &dyn NodeOps) -> Result<String, CniError> {
    let prev = cfg.prev_result.as_deref().ok_or_else(|| {
        CniError::new(
            INVALID_CONFIG,
            "prevResult missing: node-local-dns is a chained plugin and must follow the plugin that sets up the pod's interface",
        )
        .with_version(&cfg.cni_version)
    })?;
    // Validate the passthrough before touching the node: bad input changes nothing.
    let out = passthrough(prev, &cfg.cni_version)?;
    let started = Instant::now();
    let result = node.ensure(&cfg.node);
    let errors: Vec<&str> = result
        .as_ref()
        .err()
        .map(SetupError::kind)
        .into_iter()
        .collect();
    record("ADD", cfg, started, &errors);
    match result {
        Ok(report) => {
            if !report.changes.is_empty() {
                tracing::info!(kind = %report.link_kind, backend = %report.iptables_backend, changes = ?report.changes, "node setup repaired");
            }
            Ok(out)
        }
        Err(e) => on_failure(cfg, "node setup", &e).map(|()| out),
    }
}

/// CHECK: in place → success; otherwise repair (open) or report (closed).
pub fn check(cfg: &PluginConfig, node: &dyn NodeOps) -> Result<(), CniError> {
    let started = Instant::now();
    let outcome = match node.check(&cfg.node) {
        Ok(missing) if missing.is_empty() => Ok(()),
        Ok(missing) => repair_or_report(cfg, node, &missing),
        Err(e) => Err(e),
    };
    let errors: Vec<&str> = outcome
        .as_ref()
        .err()
        .map(SetupError::kind)
        .into_iter()
        .collect();
    record("CHECK", cfg, started, &errors);
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => on_failure(cfg, "node check", &e),
    }
}

fn repair_or_report(
    cfg: &PluginConfig,
    node: &dyn NodeOps,
    missing: &[Missing],
) -> Result<(), SetupError> {
    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
    tracing::warn!(missing = ?list, "node state not in place");
    match cfg.failure_policy {
        FailurePolicy::Open => node.ensure(&cfg.node).map(|_| ()),
        FailurePolicy::Closed => Err(missing_error(
            &missing[0],
            format!("node state not in place: {}", list.join("; ")),
        )),
    }
}

/// The error kind a missing piece counts under.
fn missing_error(first: &Missing, msg: String) -> SetupError {
    match first {
        Missing::Interface(name) => SetupError::AddInterface {
            name: name.clone(),
            msg,
        },
        Missing::Address(addr) => SetupError::AddAddress { addr: *addr, msg },
        _ => SetupError::RunIptables {
            cmd: "check".into(),
            msg,
        },
    }
}

/// Open: log and succeed (the cache is an optimisation; kube-proxy's path still works).
/// Closed: code 11 so the runtime retries, naming what failed.
fn on_failure(cfg: &PluginConfig, what: &str, e: &SetupError) -> Result<(), CniError> {
    tracing::error!(error = %e, kind = e.kind(), policy = ?cfg.failure_policy, "{what} failed");
    match cfg.failure_policy {
        FailurePolicy::Open => Ok(()),
        FailurePolicy::Closed => Err(
            CniError::new(TRY_AGAIN_LATER, format!("{what} failed: {e}"))
                .with_details(format!("errortype={}", e.kind()))
                .with_version(&cfg.cni_version),
        ),
    }
}

fn record(command: &str, cfg: &PluginConfig, started: Instant, errors: &[&str]) {
    let event = stats::Event {
        command,
        duration: started.elapsed(),
        errors: errors.to_vec(),
    };
    if let Err(e) = stats::record(&cfg.stats_dir, &event) {
        tracing::warn!(error = %e, "could not record CNI stats");
    }
}

/// `prevResult` with the config's `cniVersion`: the received bytes verbatim when the version
/// already matches; otherwise the same object (order, unknown keys and all) with only
/// `cniVersion` replaced. Never re-encoded through typed structs, which would drop fields.
pub fn passthrough(prev: &str, version: &str) -> Result<String, CniError> {
    let invalid = |msg: String| CniError::new(INVALID_CONFIG, msg).with_version(version);
    let mut obj: Map<String, Value> = serde_json::from_str(prev)
        .map_err(|e| invalid(format!("prevResult is not a JSON object: {e}")))?;
    if obj.get("cniVersion").and_then(Value::as_str) == Some(version) {
        return Ok(prev.trim().to_string());
    }
    obj.insert("cniVersion".into(), Value::String(version.into()));
    serde_json::to_string(&obj).map_err(|e| invalid(format!("prevResult: {e}")))
}
