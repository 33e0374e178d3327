//! The fast path's memory: the rules generation at which our rules were last seen complete.
//! While the generation has not moved, nothing can have changed the rules, and a pod ADD skips
//! reading them (no `-save` process).

use std::path::Path;

use crate::desired::DesiredState;
use crate::rules::RuleTable;
use crate::state;

/// What the verified file holds when `desired`'s rules were complete at generation `stamp`:
/// a different desired state never matches.
fn verified_key(stamp: &str, desired: &DesiredState) -> String {
    let mut key = format!("{stamp}\n");
    for rule in &desired.rules {
        key.push_str(&format!(
            "{:?} {} {}\n",
            rule.family,
            rule.chain,
            rule.save_spec()
        ));
    }
    key
}

/// The key for the current generation, and whether our rules are known to be complete at it
/// (then no `-save` is needed: nothing changed since they were verified).
pub fn rules_generation(
    desired: &DesiredState,
    table: &dyn RuleTable,
    lock_path: &Path,
) -> (Option<String>, bool) {
    let Some(stamp) = table.generation() else {
        return (None, false);
    };
    let key = verified_key(&stamp, desired);
    let known = std::fs::read_to_string(state::verified_path(lock_path)).is_ok_and(|v| v == key);
    (Some(key), known)
}

/// Records that the rules were complete at the generation read before they were checked.
/// Best effort: without the file the next call simply checks in full.
pub fn remember_verified(key: &str, lock_path: &Path) {
    let path = state::verified_path(lock_path);
    if let Err(e) = state::write(&path, key.as_bytes()) {
        tracing::debug!(error = %e, "could not record verified rules generation");
    }
}
