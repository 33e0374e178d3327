//! A memory cgroup of the test's own with a hard limit and no swap: the container memory limit
//! of a pod, without a runtime. cgroup v2 when the unified hierarchy has the memory controller,
//! else the v1 `memory` hierarchy (this machine). Processes join it by writing their PID to
//! [`MemCgroup::procs`] before they exec; the directory is removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::HarnessError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    version: Version,
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |e| HarnessError::Io(format!("{}", what.display()), e)
}

fn write(path: &Path, value: &str) -> Result<(), HarnessError> {
    fs::write(path, value).map_err(io(path))
}

/// Where a new cgroup can go: v2 at the unified root (children of a cgroup holding
/// processes cannot get controllers), v1 under this process's own memory cgroup.
fn parent_dir() -> Result<(PathBuf, Version), HarnessError> {
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        return Ok((PathBuf::from("/sys/fs/cgroup"), Version::V2));
    }
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| HarnessError::Io("/proc/self/cgroup".into(), e))?;
    let path = own
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        })
        .ok_or_else(|| HarnessError::Other("no memory cgroup (v2 or v1) here".into()))?;
    let dir = PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
    Ok((dir, Version::V1))
}

impl MemCgroup {
    /// A new cgroup limited to `limit` bytes of memory, swap included.
    pub fn create(tag: &str, limit: u64) -> Result<Self, HarnessError> {
        let (parent, version) = parent_dir()?;
        let dir = parent.join(crate::netns::unique_name(tag));
        fs::create_dir(&dir).map_err(io(&dir))?;
        let cg = Self { dir, version };
        match version {
            Version::V2 => {
                write(&cg.dir.join("memory.max"), &limit.to_string())?;
                let _ = fs::write(cg.dir.join("memory.swap.max"), "0");
            }
            Version::V1 => {
                write(&cg.dir.join("memory.limit_in_bytes"), &limit.to_string())?;
                // Not every kernel accounts swap; without swap there is nothing to limit.
                let _ = fs::write(
                    cg.dir.join("memory.memsw.limit_in_bytes"),
                    limit.to_string(),
                );
            }
        }
        Ok(cg)
    }

    /// The file a process writes its PID to in order to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Processes the kernel's OOM killer ended in this cgroup (v2 `memory.events`, v1
    /// `memory.oom_control`).
    pub fn oom_kills(&self) -> Result<u64, HarnessError> {
        let file = match self.version {
            Version::V2 => self.dir.join("memory.events"),
            Version::V1 => self.dir.join("memory.oom_control"),
        };
        let text = fs::read_to_string(&file).map_err(io(&file))?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| HarnessError::Other(format!("no oom_kill in {}", file.display())))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The processes in it are killed by their owners first; the kernel may need a moment
        // to let go of the cgroup.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Resident set size of a process in bytes (`VmRSS`).
pub fn rss_bytes(pid: i32) -> Result<u64, HarnessError> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| HarnessError::Io(path.clone(), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| HarnessError::Other(format!("no VmRSS in {path}")))
}
