//! Shared helpers for the installer's integration tests: the real binary, real temp dirs, and
//! the real plugin binary when the workspace has built one.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const INSTALLER: &str = env!("CARGO_BIN_EXE_node-local-dns-install");

/// Cluster DNS the examples were generated with.
pub const CLUSTER_DNS: &str = "10.96.0.10";

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conflist-examples")
}

pub fn example_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(examples_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".without-node-local-dns.conflist")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// The installer with a clean environment (no NODE_LOCAL_DNS_* or KUBE_DNS_SVC_IP leaking in).
pub fn installer() -> Command {
    let mut cmd = Command::new(INSTALLER);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug");
    cmd
}

/// A node's CNI dirs plus a plugin binary to install.
pub struct Node {
    pub root: tempfile::TempDir,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub plugin: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let bin_dir = root.path().join("opt/cni/bin");
        let conf_dir = root.path().join("etc/cni/net.d");
        fs::create_dir_all(&bin_dir).unwrap();
        fs::create_dir_all(&conf_dir).unwrap();
        let plugin = plugin_binary(root.path());
        Node {
            root,
            bin_dir,
            conf_dir,
            plugin,
        }
    }

    pub fn conf(&self, name: &str) -> PathBuf {
        self.conf_dir.join(name)
    }

    pub fn installed_plugin(&self) -> PathBuf {
        self.bin_dir.join("node-local-dns")
    }

    /// `install` with this node's dirs and plugin plus `extra` args.
    pub fn install_cmd(&self, extra: &[&str]) -> Command {
        let mut cmd = installer();
        cmd.arg("install")
            .arg("--bin-dir")
            .arg(&self.bin_dir)
            .arg("--conf-dir")
            .arg(&self.conf_dir)
            .arg("--plugin-binary")
            .arg(&self.plugin)
            .args(extra);
        cmd
    }

    pub fn install_once(&self, extra: &[&str]) -> Output {
        let mut args = vec!["--once", "--cluster-dns", CLUSTER_DNS];
        args.extend_from_slice(extra);
        self.install_cmd(&args).output().unwrap()
    }

    pub fn uninstall(&self, extra: &[&str]) -> Output {
        installer()
            .arg("uninstall")
            .arg("--bin-dir")
            .arg(&self.bin_dir)
            .arg("--conf-dir")
            .arg(&self.conf_dir)
            .args(extra)
            .output()
            .unwrap()
    }

    /// Names in the conf dir, sorted (shows leftover temp files too).
    pub fn conf_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

/// The workspace's real plugin (target/debug/node-local-dns) if it has been built and answers
/// VERSION; otherwise a stand-in script that answers VERSION like the real one.
pub fn plugin_binary(dir: &Path) -> PathBuf {
    let real = Path::new(INSTALLER).with_file_name("node-local-dns");
    // NLDI_STAND_IN_PLUGIN=1 forces the stand-in (to test without the plugin crate built).
    let forced = std::env::var_os("NLDI_STAND_IN_PLUGIN").is_some();
    if !forced && real.is_file() && answers_version(&real) {
        return real;
    }
    let stand_in = dir.join("node-local-dns-stand-in");
    write_script(
        &stand_in,
        "#!/bin/sh\n[ \"$CNI_COMMAND\" = VERSION ] || exit 1\n\
         echo '{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}'\n",
    );
    stand_in
}

/// Writes an executable script from a child process: a write fd held by this (multi-threaded)
/// test process could leak into a concurrent test's fork and make exec fail with ETXTBSY.
pub fn write_script(path: &Path, content: &str) {
    use std::io::Write;
    let mut child = Command::new("sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(content.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

pub fn answers_version(path: &Path) -> bool {
    Command::new(path)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("supportedVersions")
        })
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "installer failed: {}\n{}",
        out.status,
        stderr(out)
    );
}

pub fn inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Polls `cond` until it holds; panics with `what` after a generous deadline. (Correctness
/// only: how long it took is never asserted.)
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (by its own PID) when the test ends, even on panic.
pub struct Running(pub Option<Child>);

impl Running {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything a child wrote to stderr so far, collected by a reader thread.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<String>>);

impl Logs {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self, pattern: &str) -> usize {
        self.text().matches(pattern).count()
    }
}

/// Starts `cmd` with stderr captured into `Logs`.
pub fn spawn_logged(mut cmd: Command) -> (Running, Logs) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = Logs::default();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut all = sink.0.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    (Running(Some(child)), logs)
}
