//! The raw-table rules: which iptables backend to program, and the small trait the rest of the
//! crate uses to read and edit rules (a real one over the iptables crate, fakes in tests).

use std::path::Path;
use std::process::Command;

use crate::desired::{self, DesiredState, Family, Rule, RuleDiff, SavedRule, TABLE, diff_rules};
use crate::{IptablesBackend, SetupError};

/// A concrete backend (never `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// The iptables command for this backend and family.
    pub fn command(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Legacy, Family::V4) => "iptables-legacy",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy",
            (Backend::Nft, Family::V4) => "iptables-nft",
            (Backend::Nft, Family::V6) => "ip6tables-nft",
        }
    }

    fn save_command(self, family: Family) -> String {
        format!("{}-save", self.command(family))
    }
}

/// The upstream iptables-wrapper heuristic (DESIGN.md §1): the backend showing more `KUBE-`
/// chains is the one kube-proxy and kubelet use; nft when tied.
pub fn pick_backend(legacy_kube_chains: usize, nft_kube_chains: usize) -> Backend {
    if legacy_kube_chains > nft_kube_chains {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Counts `:KUBE-…` chain declarations in `iptables-save` output.
pub fn count_kube_chains(save_output: &str) -> usize {
    save_output
        .lines()
        .filter(|l| l.starts_with(":KUBE-"))
        .count()
}

/// Reading and editing the raw table of one backend. Specs are in `iptables-save` form.
pub trait RuleTable {
    /// `iptables-save -t raw` for one family.
    fn save_raw(&self, family: Family) -> Result<String, SetupError>;
    fn insert_first(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError>;
    /// Deletes one copy; a rule that is already gone is not an error.
    fn delete(&self, family: Family, chain: &str, spec: &str) -> Result<(), SetupError>;
    /// A stamp that changes whenever any rule of this backend in this namespace changes, if
    /// the backend has one (nft does; legacy does not).
    fn generation(&self) -> Option<String> {
        None
    }
}

/// Resolves `Auto` by looking at the tables kube-proxy and kubelet write. `cache` (beside the
/// lock) remembers the last answer with a stamp of what it was based on.
pub fn resolve_backend(
    requested: IptablesBackend,
    cache: Option<&Path>,
) -> Result<Backend, SetupError> {
    match requested {
        IptablesBackend::Legacy => Ok(Backend::Legacy),
        IptablesBackend::Nft => Ok(Backend::Nft),
        IptablesBackend::Auto => detect_backend(cache),
    }
}

/// kubelet's KUBE-IPTABLES-HINT/KUBE-KUBELET-CANARY and kube-proxy's KUBE-PROXY-CANARY live in
/// the small mangle table, so it is read first; the (large) nat table only breaks a 0:0 tie.
///
/// Fast paths, so that a pod ADD does not start two `-save` processes to answer this:
/// - no legacy mangle or nat table loaded in this namespace (the kernel lists loaded legacy
///   tables per namespace): legacy cannot have more KUBE- chains than nft, so nft;
/// - otherwise, when the loaded legacy tables' entry counts and sizes and the nftables
///   generation are what they were at the last detection, its answer still holds.
fn detect_backend(cache: Option<&Path>) -> Result<Backend, SetupError> {
    // thread-self: the namespace of this thread, which may differ from the process's.
    let loaded =
        std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").unwrap_or_default();
    if !legacy_may_have_kube_chains(&loaded) {
        return Ok(Backend::Nft);
    }
    let stamp = cache.and_then(|_| detection_stamp(&loaded));
    if let (Some(path), Some(stamp)) = (cache, &stamp)
        && let Some(backend) = cached_backend(path, stamp)
    {
        return Ok(backend);
    }
    let backend = count_and_pick()?;
    if let (Some(path), Some(stamp)) = (cache, &stamp) {
        remember_backend(path, stamp, backend);
    }
    Ok(backend)
}

fn count_and_pick() -> Result<Backend, SetupError> {
    for table in ["mangle", "nat"] {
        let legacy = count_kube_chains(&run_save(Backend::Legacy, Family::V4, table)?);
        let nft = count_kube_chains(&run_save(Backend::Nft, Family::V4, table)?);
        if legacy + nft > 0 {
            return Ok(pick_backend(legacy, nft));
        }
    }
    Ok(Backend::Nft)
}

/// What the detection depends on, read before detecting (a change in between shows up as a
/// different stamp next time). None when a part cannot be read: then detect every time.
fn detection_stamp(loaded: &str) -> Option<String> {
    let mut stamp = format!("nft={}", crate::nftgen::stamp().ok()?);
    for table in loaded
        .lines()
        .map(str::trim)
        .filter(|t| matches!(*t, "mangle" | "nat"))
    {
        stamp.push_str(&format!(
            " {table}={}",
            crate::legacy::table_info(table).ok()?
        ));
    }
    Some(stamp)
}

fn cached_backend(path: &Path, stamp: &str) -> Option<Backend> {
    let text = std::fs::read_to_string(path).ok()?;
    let (saved, backend) = text.rsplit_once('\n')?;
    if saved != stamp {
        return None;
    }
    match backend {
        "legacy" => Some(Backend::Legacy),
        "nft" => Some(Backend::Nft),
        _ => None,
    }
}

/// Best effort: without the file the next call detects again.
fn remember_backend(path: &Path, stamp: &str, backend: Backend) {
    let tmp = path.with_extension(format!(
        "tmp.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, format!("{stamp}\n{}", backend.name())))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Whether the legacy tables kube-proxy and kubelet write to are loaded, from the contents
/// of /proc/net/ip_tables_names.
pub fn legacy_may_have_kube_chains(loaded_tables: &str) -> bool {
    loaded_tables
        .lines()
        .any(|t| matches!(t.trim(), "mangle" | "nat"))
}

fn run_save(backend: Backend, family: Family, table: &str) -> Result<String, SetupError> {
    let cmd = backend.save_command(family);
    let out = Command::new(&cmd)
        .args(["-t", table])
        .output()
        .map_err(|e| SetupError::Iptables {
            cmd: cmd.clone(),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SetupError::Iptables {
            cmd,
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
        SetupError::Iptables {
            cmd: format!("{} {what}", self.backend.command(family)),
            msg: e.to_string().trim().to_string(),
        }
    }
}

impl RuleTable for Iptables {
    fn save_raw(&self, family: Family) -> Result<String, SetupError> {
        run_save(self.backend, family, TABLE)
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
        let stamp = match self.backend {
            Backend::Nft => crate::nftgen::stamp(),
            Backend::Legacy => legacy_raw_stamp(),
        };
        stamp
            .inspect_err(|e| tracing::debug!(error = %e, "no rules generation; full check"))
            .ok()
    }
}

/// Content stamps of the loaded legacy raw tables (IPv4 required, IPv6 when loaded).
fn legacy_raw_stamp() -> Result<String, String> {
    let loaded = |file: &str| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "raw"))
    };
    if !loaded("ip_tables_names") {
        return Err("legacy raw table not loaded".into());
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
    Ok((diff_rules(&wanted, &saved), saved))
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
