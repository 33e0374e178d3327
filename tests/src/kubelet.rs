//! A kubelet stand-in for hostNetwork DaemonSet containers on the simulated node: podman (the
//! node's runtime, in the node's mount and network namespaces, with the store the node's pods
//! use) runs each rendered container ([`crate::podspec`]), creates its hostPath volumes as
//! their `type` asks, runs exec probes, and kills and restarts containers by name.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;
use crate::cmd::output_of;
use crate::podspec::{ContainerSpec, NodeFacts};
use crate::runtime::NodeFs;

/// podman for the node's DaemonSet containers; removes them (by name) on drop.
#[derive(Debug)]
pub struct Kubelet {
    holder: u32,
    netns: PathBuf,
    /// The node's podman dir (containers.conf, store) shared with its pods.
    podman_dir: PathBuf,
    /// Working directory of podman (conmon writes an `oom` file there on an OOM kill).
    scratch: tempfile::TempDir,
    started: Vec<String>,
}

impl Kubelet {
    /// For a node whose runtime is podman (`SimOptions::runtime`).
    pub fn new(fs_: &NodeFs, netns: PathBuf) -> Result<Self, HarnessError> {
        let scratch = tempfile::Builder::new()
            .prefix("nlde-kubelet-")
            .tempdir()
            .map_err(|e| HarnessError::Io("tempdir".into(), e))?;
        Ok(Self {
            holder: fs_.holder_pid(),
            netns,
            podman_dir: fs_.dir.join("podman"),
            scratch,
            started: Vec::new(),
        })
    }

    fn podman(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.to_string())
            .arg("-m")
            .arg(format!("--net={}", self.netns.display()))
            .arg("podman")
            .current_dir(self.scratch.path())
            .env("CONTAINERS_CONF", self.podman_dir.join("containers.conf"))
            .arg("--root")
            .arg(self.podman_dir.join("root"))
            .arg("--runroot")
            .arg(self.podman_dir.join("runroot"));
        cmd
    }

    /// Runs `podman ARGS` on the node; returns stdout.
    pub fn podman_out(&self, args: &[&str]) -> Result<String, HarnessError> {
        output_of(self.podman().args(args))
    }

    /// Copies `image` from this machine's podman store into the node's (the image pull).
    pub fn pull_from_host(&self, image: &str) -> Result<(), HarnessError> {
        let archive = self.scratch.path().join("image.tar");
        output_of(Command::new("podman").args(["save", "--quiet", "-o"]).arg(&archive).arg(image))
            .map_err(|e| {
                HarnessError::Other(format!(
                    "image {image} is not in this machine's podman store; build it with install/build-image.sh ({e})"
                ))
            })?;
        let archive = archive.to_string_lossy().into_owned();
        self.podman_out(&["load", "--quiet", "-i", &archive])?;
        fs::remove_file(&archive).map_err(|e| HarnessError::Io(archive, e))
    }

    /// Creates the container's hostPath volumes on the node as their `type` asks.
    fn prepare_host_paths(&self, c: &ContainerSpec<'_>) -> Result<(), HarnessError> {
        for m in c.host_mounts()? {
            let script = match m.kind.as_str() {
                "DirectoryOrCreate" => format!("mkdir -p '{}'", m.host_path),
                "FileOrCreate" => {
                    format!("mkdir -p \"$(dirname '{0}')\" && touch '{0}'", m.host_path)
                }
                _ => format!("test -e '{}'", m.host_path),
            };
            let mut cmd = Command::new("nsenter");
            cmd.arg("-t")
                .arg(self.holder.to_string())
                .arg("-m")
                .args(["sh", "-c", &script]);
            output_of(&mut cmd)?;
        }
        Ok(())
    }

    /// Starts a rendered container as `name`.
    pub fn run(
        &mut self,
        c: &ContainerSpec<'_>,
        name: &str,
        facts: &NodeFacts,
    ) -> Result<(), HarnessError> {
        self.prepare_host_paths(c)?;
        let args = c.podman_run_args(name, facts)?;
        let mut cmd = self.podman();
        cmd.arg("run").args(&args);
        output_of(&mut cmd)?;
        self.started.push(name.to_string());
        Ok(())
    }

    /// Runs an exec probe's command in the container; true when it exits 0.
    pub fn exec_probe(&self, name: &str, command: &[String]) -> bool {
        let mut cmd = self.podman();
        cmd.args(["exec", name]).args(command);
        output_of(&mut cmd).is_ok()
    }

    /// The container's main process as this machine sees it.
    pub fn pid(&self, name: &str) -> Result<i32, HarnessError> {
        let out = self.podman_out(&["inspect", "-f", "{{.State.Pid}}", name])?;
        out.trim()
            .parse()
            .map_err(|_| HarnessError::Other(format!("pid of {name}: {out}")))
    }

    /// SIGKILL, as a crash or an OOM kill ends it.
    pub fn kill(&self, name: &str) -> Result<(), HarnessError> {
        self.podman_out(&["kill", "-s", "KILL", name])?;
        self.podman_out(&["wait", name]).map(|_| ())
    }

    /// The restart the kubelet does for `restartPolicy: Always`.
    pub fn restart(&self, name: &str) -> Result<(), HarnessError> {
        self.podman_out(&["start", name]).map(|_| ())
    }

    pub fn logs(&self, name: &str) -> String {
        let mut cmd = self.podman();
        cmd.args(["logs", name]);
        match cmd.output() {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("podman logs {name}: {e}"),
        }
    }

    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.started).iter().rev() {
            let mut cmd = self.podman();
            cmd.args(["rm", "-f", "-t", "0", name]);
            let _ = cmd.output();
        }
    }
}
