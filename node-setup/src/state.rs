//! The small files node-setup keeps under /run (beside its lock and in the stats directory):
//! where they live and how they are written.
//!
//! They are caches and counters on tmpfs, rebuilt or restarted when lost, and written on the
//! pod ADD path: atomically (a reader never sees a torn file) but without fsync, which cost
//! milliseconds per ADD on a disk-backed /run.

use std::path::{Path, PathBuf};

use crate::atomic::{self, AtomicError, Durability, FileMode};

/// Mode of a state file written for the first time; a replaced one keeps its own.
const MODE: u32 = 0o644;

/// Beside the lock: the rules generation at which our rules were last seen complete.
pub fn verified_path(lock: &Path) -> PathBuf {
    lock.with_extension("verified")
}

/// Beside the lock: the last `auto` backend answer and what it was based on.
pub fn backend_path(lock: &Path) -> PathBuf {
    lock.with_extension("backend")
}

/// Replaces `path` with `contents` (creating its directory if needed).
pub fn write(path: &Path, contents: &[u8]) -> Result<(), AtomicError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| AtomicError {
            path: dir.to_path_buf(),
            err,
        })?;
    }
    let mode = FileMode::of_target_or(path, MODE)?;
    atomic::write_atomic(path, contents, mode, Durability::RenameOnly)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_sit_beside_the_lock_and_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("sub/setup.lock");
        let verified = verified_path(&lock);
        assert_eq!(verified, dir.path().join("sub/setup.verified"));
        assert_eq!(backend_path(&lock), dir.path().join("sub/setup.backend"));
        write(&verified, b"one").unwrap();
        write(&verified, b"two").unwrap();
        assert_eq!(std::fs::read(&verified).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("setup.verified")]);
    }
}
