//! Our own lock file: parallel ADDs (and the daemon) serialise their edits with it. The nft
//! `iptables` ignores /run/xtables.lock, so the iptables lock alone is not enough.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::SetupError;

/// Where the lock lives and how long to wait for it.
#[derive(Debug, Clone, Copy)]
pub struct LockSpec<'a> {
    pub path: &'a Path,
    pub timeout: Duration,
}

impl LockSpec<'_> {
    pub fn acquire(&self) -> Result<LockGuard, SetupError> {
        acquire(self.path, self.timeout)
    }
}

/// Held until dropped.
pub struct LockGuard {
    _flock: Flock<File>,
}

const POLL: Duration = Duration::from_millis(5);

/// Takes an exclusive flock on `path` (created with its directory), waiting at most `timeout`.
pub fn acquire(path: &Path, timeout: Duration) -> Result<LockGuard, SetupError> {
    let err = |msg: String| SetupError::AcquireLock {
        path: path.to_path_buf(),
        msg,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create directory: {e}")))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| err(format!("open: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => return Ok(LockGuard { _flock: flock }),
            Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                if Instant::now() >= deadline {
                    return Err(err(format!(
                        "still held by another process after {timeout:?}"
                    )));
                }
                file = f;
                sleep(POLL);
            }
            Err((_, e)) => return Err(err(format!("flock: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_times_out_then_succeeds_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/setup.lock");
        let first = acquire(&path, Duration::from_millis(10)).unwrap();
        let second = acquire(&path, Duration::from_millis(20));
        assert!(
            matches!(second, Err(SetupError::AcquireLock { .. })),
            "{:?}",
            second.err()
        );
        drop(first);
        acquire(&path, Duration::from_millis(20)).unwrap();
    }
}
