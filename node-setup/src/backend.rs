//! Which iptables backend to program: the one the node's kube-proxy and kubelet use.

use std::path::Path;
use std::process::Command;

use crate::desired::Family;
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

    /// The other one: rules left there after the node switched backends still steer DNS.
    pub fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Nft,
            Backend::Nft => Backend::Legacy,
        }
    }

    /// `<command>-save -t <table>`: one table of one family, as text.
    pub fn save(self, family: Family, table: &str) -> Result<String, SetupError> {
        let cmd = format!("{}-save", self.command(family));
        let out = Command::new(&cmd)
            .args(["-t", table])
            .output()
            .map_err(|e| SetupError::RunIptables {
                cmd: cmd.clone(),
                msg: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(SetupError::RunIptables {
                cmd,
                msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The upstream iptables-wrapper heuristic (docs/design-facts.md §1): the backend showing more
/// `KUBE-` chains is the one kube-proxy and kubelet use; nft when tied.
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

/// Whether the legacy tables kube-proxy and kubelet write to are loaded, from the contents
/// of /proc/net/ip_tables_names.
pub fn legacy_may_have_kube_chains(loaded_tables: &str) -> bool {
    loaded_tables
        .lines()
        .any(|t| matches!(t.trim(), "mangle" | "nat"))
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
        IptablesBackend::Auto => detect(cache),
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
fn detect(cache: Option<&Path>) -> Result<Backend, SetupError> {
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
        let legacy = count_kube_chains(&Backend::Legacy.save(Family::V4, table)?);
        let nft = count_kube_chains(&Backend::Nft.save(Family::V4, table)?);
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
    let text = format!("{stamp}\n{}", backend.name());
    if let Err(e) = crate::state::write(path, text.as_bytes()) {
        tracing::debug!(error = %e, "could not remember the detected iptables backend");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_heuristic_prefers_more_kube_chains_and_nft_on_tie() {
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        assert_eq!(count_kube_chains(save), 2);
        assert_eq!(pick_backend(2, 0), Backend::Legacy);
        assert_eq!(pick_backend(0, 2), Backend::Nft);
        assert_eq!(pick_backend(3, 3), Backend::Nft);
        assert!(!legacy_may_have_kube_chains(""));
        assert!(!legacy_may_have_kube_chains("raw\nfilter\n"));
        assert!(legacy_may_have_kube_chains("raw\nmangle\n"));
        assert!(legacy_may_have_kube_chains("nat\n"));
    }

    #[test]
    fn a_remembered_answer_holds_only_for_the_same_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("setup.backend");
        assert_eq!(cached_backend(&path, "nft=1:2"), None);
        remember_backend(&path, "nft=1:2 mangle=5/900", Backend::Legacy);
        assert_eq!(
            cached_backend(&path, "nft=1:2 mangle=5/900"),
            Some(Backend::Legacy)
        );
        assert_eq!(cached_backend(&path, "nft=1:3 mangle=5/900"), None);
    }
}
