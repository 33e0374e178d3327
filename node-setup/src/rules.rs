//! The raw-table rules: the small trait the rest of the crate uses to read and edit them (a
//! real one over the iptables crate, fakes in tests), and the observe / repair / remove steps
//! of one family built on it.

use crate::SetupError;
use crate::backend::Backend;
use crate::desired::{self, DesiredState, Family, Rule, RuleDiff, SavedRule, TABLE, diff_rules};
use crate::legacy::LegacyTableError;

/// Reading and editing the raw table of one backend. Specs are in `iptables-save` form.
pub trait RuleTable {
    /// `iptables-save -t raw` for one family.
    fn save_raw(&self, family: Family) -> Result<String, SetupError>;
    fn insert_first(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError>;
    /// Deletes one copy; a rule that is already gone is not an error.
    fn delete(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError>;
    /// A stamp that changes whenever any rule of this backend in this namespace changes (nft:
    /// the ruleset generation; legacy: a hash of the raw table), if it can be read.
    fn generation(&self) -> Option<String> {
        None
    }
}

/// The real table, through the iptables crate with the backend's own command.
pub struct Iptables {
    backend: Backend,
}

impl Iptables {
    pub fn new(backend: Backend) -> Iptables {
        Iptables { backend }
    }

    fn ipt(&self, family: Family) -> iptables::IPTables {
        // Built directly (not iptables::new) to pick the backend's command and to skip the
        // `--version` probe: 1.8 has both -C and -w.
        iptables::IPTables {
            cmd: self.backend.command(family),
            has_check: true,
            has_wait: true,
            is_numeric: true,
        }
    }

    fn err(&self, family: Family, what: &str, e: impl std::fmt::Display) -> SetupError {
        SetupError::RunIptables {
            cmd: format!("{} {what}", self.backend.command(family)),
            msg: e.to_string().trim().to_string(),
        }
    }
}

impl RuleTable for Iptables {
    fn save_raw(&self, family: Family) -> Result<String, SetupError> {
        self.backend.save(family, TABLE)
    }

    fn insert_first(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError> {
        self.ipt(family)
            .insert(TABLE, chain, spec, 1)
            .map_err(|e| self.err(family, &format!("-t raw -I {chain} 1 {spec}"), e))
    }

    fn delete(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError> {
        let ipt = self.ipt(family);
        let what = format!("-t raw -D {chain} {spec}");
        match ipt.delete(TABLE, chain, spec) {
            Ok(()) => Ok(()),
            // Gone already (a concurrent teardown or an operator): re-check says whether it is.
            Err(e) => match ipt.exists(TABLE, chain, spec) {
                Ok(false) => Ok(()),
                _ => Err(self.err(family, &what, e)),
            },
        }
    }

    fn generation(&self) -> Option<String> {
        let no_generation = |e: &dyn std::fmt::Display| {
            tracing::debug!(error = %e, "no rules generation; full check");
        };
        match self.backend {
            Backend::Nft => crate::nftgen::stamp()
                .inspect_err(|e| no_generation(e))
                .ok(),
            Backend::Legacy => legacy_raw_stamp().inspect_err(|e| no_generation(e)).ok(),
        }
    }
}

/// Content stamps of the loaded legacy raw tables (IPv4 required, IPv6 when loaded).
fn legacy_raw_stamp() -> Result<String, LegacyTableError> {
    let loaded = |file: &str| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "raw"))
    };
    if !loaded("ip_tables_names") {
        return Err(LegacyTableError::NotLoaded("raw"));
    }
    let mut stamp = format!("legacy4={}", crate::legacy::raw_table_stamp(false)?);
    if loaded("ip6_tables_names") {
        stamp.push_str(&format!(
            " legacy6={}",
            crate::legacy::raw_table_stamp(true)?
        ));
    }
    Ok(stamp)
}

/// Reads one family's rules and compares them with the desired ones.
pub fn observe_family(
    table: &dyn RuleTable,
    desired: &DesiredState,
    family: Family,
) -> Result<(RuleDiff, Vec<SavedRule>), SetupError> {
    let saved = desired::parse_save(&table.save_raw(family)?);
    let wanted: Vec<&Rule> = desired.rules_of(family).collect();
    Ok((diff_rules(&wanted, &desired.cluster_ips, &saved), saved))
}

/// Edits one family's rules so the diff becomes clean; returns the changes made.
pub fn repair_family(
    table: &dyn RuleTable,
    desired: &DesiredState,
    family: Family,
    diff: &RuleDiff,
    saved: &[SavedRule],
) -> Result<Vec<String>, SetupError> {
    let mut changes = Vec::new();
    for s in &diff.unwanted {
        table.delete(family, &s.chain, &s.spec)?;
        changes.push(format!("deleted stale rule -A {} {}", s.chain, s.spec));
    }
    let mut foreign = Vec::new();
    for s in &diff.foreign {
        table.delete(family, &s.chain, &s.spec)?;
        foreign.push(format!("-A {} {}", s.chain, s.spec));
    }
    if !foreign.is_empty() {
        // One line per repair: the operator sees what was removed and why, once.
        tracing::warn!(
            rules = ?foreign,
            "deleted the NodeLocal DNSCache addon's NOTRACK rules for the kube-dns ClusterIP: they blackhole DNS whenever no cache listens"
        );
    }
    changes.extend(foreign.iter().map(|r| format!("deleted foreign rule {r}")));
    let wanted: Vec<&Rule> = desired.rules_of(family).collect();
    let mut to_insert: Vec<&Rule> = Vec::new();
    for rule in &wanted {
        let spec = rule.save_spec();
        let copies = saved
            .iter()
            .filter(|s| s.chain == rule.chain && s.spec == spec)
            .count();
        let rebuild = (rule.must_be_first() && diff.prerouting_misplaced)
            || diff.output_duplicated.contains(rule);
        if rebuild {
            for _ in 0..copies {
                table.delete(family, rule.chain, &spec)?;
            }
        }
        if rebuild || copies == 0 {
            to_insert.push(rule);
        }
    }
    // Inserting at 1 in reverse keeps our PREROUTING rules on top in the desired order.
    for rule in to_insert.iter().rev() {
        table.insert_first(family, rule.chain, &rule.save_spec())?;
        changes.push(format!("inserted -A {} {}", rule.chain, rule.save_spec()));
    }
    Ok(changes)
}

/// Deletes every rule carrying our comment in one family (uninstall).
pub fn remove_ours(table: &dyn RuleTable, family: Family) -> Result<usize, SetupError> {
    let saved = desired::parse_save(&table.save_raw(family)?);
    let ours: Vec<&SavedRule> = saved.iter().filter(|s| s.is_ours()).collect();
    for s in &ours {
        table.delete(family, &s.chain, &s.spec)?;
    }
    Ok(ours.len())
}
