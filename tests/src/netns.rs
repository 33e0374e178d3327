//! Network namespaces the tests own: created with `ip netns add`, removed on drop, entered
//! from a thread with setns so the rest of the test process stays where it is.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

use crate::HarnessError;
use crate::cmd::run;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `nlde-<tag>-<pid>-<n>`, so tests (and test
/// binaries) can run side by side.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("nlde-{tag}-{}-{n}", std::process::id())
}

/// A named network namespace, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up.
    pub fn create(name: &str) -> Result<Self, HarnessError> {
        run("ip", ["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `setns`/`nsenter --net=` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", all)
    }

    /// `ip netns exec <ns> program args…`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, HarnessError> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", all)
    }

    /// Sets a sysctl inside the namespace (e.g. `net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, setting: &str) -> Result<(), HarnessError> {
        self.exec("sysctl", &["-q", "-w", setting]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", ["netns", "del", self.name.as_str()]);
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at `path`, so sockets
/// it opens live there. The calling thread's namespace is untouched.
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, HarnessError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = File::open(path).map_err(|e| HarnessError::Io(format!("open {path:?}"), e))?;
    let handle = std::thread::spawn(move || -> Result<T, HarnessError> {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| HarnessError::Other(format!("setns: {e}")))?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| HarnessError::Other("thread in netns panicked".into()))?
}
