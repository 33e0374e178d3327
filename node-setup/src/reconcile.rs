//! The node state flow: observe → diff → (lock → observe again) → repair, and teardown, over
//! the `Links` and `RuleTable` traits so the decisions are tested without root.

use std::collections::BTreeSet;

use crate::backend::{self, Backend};
use crate::desired::{self, DesiredState, Family, RuleDiff, SavedRule};
use crate::links::{self, Links, NetState, Netlink};
use crate::lock::LockSpec;
use crate::rules::{self, Iptables, RuleTable};
use crate::{Missing, NodeConfig, SetupError, state, verified};

/// What `ensure_node` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupReport {
    /// Link kind in use: "dummy", or the fallback used when the kernel has no dummy.
    pub link_kind: String,
    /// Human-readable list of changes made (empty on the fast path).
    pub changes: Vec<String>,
    /// iptables backend programmed: "legacy" or "nft".
    pub iptables_backend: String,
    /// Another product's rules deleted because they defeat the fallback (the NodeLocal
    /// DNSCache addon's NOTRACK for DNS to the ClusterIP); each is also in `changes`.
    pub foreign_rules_removed: usize,
}

/// What the ensure flow did, before the backend is added to it.
#[derive(Debug, Default)]
struct Applied {
    link_kind: String,
    changes: Vec<String>,
    foreign_rules_removed: usize,
}

/// `ensure_node` against the real kernel.
pub fn ensure(cfg: &NodeConfig) -> Result<SetupReport, SetupError> {
    cfg.validate()?;
    let desired = DesiredState::from_config(cfg);
    let backend = remembered_backend(cfg)?;
    let links = Netlink::open()?;
    let applied = ensure_with(&desired, &links, &Iptables::new(backend), &lock_of(cfg))?;
    Ok(SetupReport {
        link_kind: applied.link_kind,
        changes: applied.changes,
        iptables_backend: backend.name().to_string(),
        foreign_rules_removed: applied.foreign_rules_removed,
    })
}

/// `check_node` against the real kernel.
pub fn check(cfg: &NodeConfig) -> Result<Vec<Missing>, SetupError> {
    cfg.validate()?;
    let desired = DesiredState::from_config(cfg);
    let table = Iptables::new(remembered_backend(cfg)?);
    let links = Netlink::open()?;
    let (_, rules_known_clean) = verified::rules_generation(&desired, &table, &cfg.lock_path);
    Ok(observe(&desired, &links, &table, rules_known_clean)?.missing(&desired))
}

/// `teardown_node` against the real kernel.
pub fn teardown(cfg: &NodeConfig) -> Result<(), SetupError> {
    cfg.validate()?;
    // Uninstall is rare: detect afresh rather than trust a remembered answer.
    let backend = backend::resolve_backend(cfg.backend, None)?;
    let links = Netlink::open()?;
    let _guard = lock_of(cfg).acquire()?;
    teardown_with(cfg, &links, &Iptables::new(backend))?;
    // Rules left in the other backend (the node switched backends since they were added)
    // would keep steering DNS after uninstall. Best effort: that backend may not exist.
    let other = backend.other();
    for family in families_of(cfg) {
        if let Err(e) = rules::remove_ours(&Iptables::new(other), family) {
            tracing::debug!(error = %e, backend = other.name(), "no rules removed from the other backend");
        }
    }
    Ok(())
}

/// The backend to program; an `auto` answer is remembered beside the lock.
fn remembered_backend(cfg: &NodeConfig) -> Result<Backend, SetupError> {
    backend::resolve_backend(cfg.backend, Some(&state::backend_path(&cfg.lock_path)))
}

fn lock_of(cfg: &NodeConfig) -> LockSpec<'_> {
    LockSpec {
        path: &cfg.lock_path,
        timeout: cfg.lock_timeout,
    }
}

/// What one look at the namespace found (one netlink dump, one raw `-save` per family).
struct Observed {
    net: NetState,
    rules: Vec<(Family, RuleDiff, Vec<SavedRule>)>,
}

impl Observed {
    fn missing(&self, desired: &DesiredState) -> Vec<Missing> {
        let mut out = Vec::new();
        if self.net.link(&desired.interface).is_none() {
            out.push(Missing::Interface(desired.interface.clone()));
        }
        out.extend(
            links::absent_addresses(desired, &self.net)
                .into_iter()
                .map(|a| Missing::Address(a.ip)),
        );
        for (family, diff, _) in &self.rules {
            let wanted: Vec<&desired::Rule> = desired.rules_of(*family).collect();
            out.extend(desired::rule_diff_to_missing(diff, &wanted));
        }
        out
    }
}

fn link_kind(net: &NetState, desired: &DesiredState) -> String {
    net.link(&desired.interface)
        .map(|l| l.kind.clone())
        .unwrap_or_default()
}

/// Looks at the links and, unless they are known clean, the rules of every family.
fn observe(
    desired: &DesiredState,
    links: &dyn Links,
    table: &dyn RuleTable,
    rules_known_clean: bool,
) -> Result<Observed, SetupError> {
    let net = links.dump(&desired.interface)?;
    let mut rules = Vec::new();
    if rules_known_clean {
        return Ok(Observed { net, rules });
    }
    for family in desired.rule_families() {
        let (diff, saved) = rules::observe_family(table, desired, family)?;
        rules.push((family, diff, saved));
    }
    Ok(Observed { net, rules })
}

/// The whole ensure flow over the two traits: look without the lock (fast path: everything in
/// place, nothing written), otherwise take the lock, look again (another ADD may have fixed it
/// meanwhile) and repair what is still missing.
fn ensure_with(
    desired: &DesiredState,
    links: &dyn Links,
    table: &dyn RuleTable,
    lock: &LockSpec<'_>,
) -> Result<Applied, SetupError> {
    // The generation is read before the rules are, so a change in between shows up as a
    // different generation next time.
    let (key, rules_known_clean) = verified::rules_generation(desired, table, lock.path);
    let first = observe(desired, links, table, rules_known_clean)?;
    if first.missing(desired).is_empty() {
        if let (Some(key), false) = (&key, rules_known_clean) {
            verified::remember_verified(key, lock.path);
        }
        return Ok(Applied {
            link_kind: link_kind(&first.net, desired),
            ..Applied::default()
        });
    }
    let _guard = lock.acquire()?;
    let now = observe(desired, links, table, false)?;
    let mut applied = Applied::default();
    let net = repair_links(desired, links, &now.net, &mut applied.changes)?;
    for (family, diff, saved) in &now.rules {
        if !diff.is_clean() {
            let changes = rules::repair_family(table, desired, *family, diff, saved)?;
            applied.changes.extend(changes);
            applied.foreign_rules_removed += diff.foreign.len();
        }
    }
    applied.link_kind = link_kind(&net, desired);
    Ok(applied)
}

/// Creates the interface if needed and adds the addresses no interface carries yet.
fn repair_links(
    desired: &DesiredState,
    links: &dyn Links,
    net: &NetState,
    changes: &mut Vec<String>,
) -> Result<NetState, SetupError> {
    let mut net = net.clone();
    if net.link(&desired.interface).is_none() {
        if let Some(kind) = links::create_link(links, &desired.interface)? {
            changes.push(format!("created interface {} ({kind})", desired.interface));
        }
        net = links.dump(&desired.interface)?;
    }
    let index = net
        .link(&desired.interface)
        .map(|l| l.index)
        .ok_or_else(|| SetupError::AddInterface {
            name: desired.interface.clone(),
            msg: "not found right after it was created".into(),
        })?;
    let absent = links::absent_addresses(desired, &net);
    for addr in &absent {
        links.add_address(index, *addr)?;
        changes.push(format!(
            "added {}/{} to {}",
            addr.ip, addr.prefix, desired.interface
        ));
    }
    if !absent.is_empty() {
        net = links.dump(&desired.interface)?;
    }
    Ok(net)
}

fn families_of(cfg: &NodeConfig) -> BTreeSet<Family> {
    cfg.cluster_dns.iter().map(Family::of).collect()
}

/// Removes our rules of every configured family, then the interface.
fn teardown_with(
    cfg: &NodeConfig,
    links: &dyn Links,
    table: &dyn RuleTable,
) -> Result<(), SetupError> {
    for family in families_of(cfg) {
        rules::remove_ours(table, family)?;
    }
    if let Some(link) = links.dump(&cfg.interface)?.link(&cfg.interface) {
        links.delete_link(link.index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
