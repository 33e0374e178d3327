//! Real container runtimes on the simulated node: podman (CNI backend) and containerd
//! (`ctr run --cni`), both run in a private mount namespace (the node's filesystem view) so
//! their CNI config, IPAM state and our plugin's files never touch the machine's.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::cmd::{kill_child, output_of};

/// Where runtimes look for CNI config and plugins inside the node's mount namespace.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";

/// Which runtime starts pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Podman,
    Containerd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Podman => "podman",
            Runtime::Containerd => "containerd",
        }
    }
}

/// The node's private mount namespace, held open by one `sleep` process: tmpfs over /run,
/// /var/lib, /var/log, /etc/cni/net.d and /opt (with /opt/cni/bin holding Debian's plugins).
/// The host's /run/xtables.lock is bound back in so iptables-legacy users inside and outside
/// agree on one lock.
#[derive(Debug)]
pub struct NodeFs {
    holder: Child,
    netns: PathBuf,
    pub dir: PathBuf,
}

impl NodeFs {
    pub fn new(netns: PathBuf, dir: &Path) -> Result<Self, HarnessError> {
        fs::create_dir_all(dir.join("hostrun"))
            .map_err(|e| HarnessError::Io(format!("{dir:?}"), e))?;
        // iptables-legacy creates the lock file on first use anyway; make sure it exists to bind.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/run/xtables.lock")
            .map_err(|e| HarnessError::Io("/run/xtables.lock".into(), e))?;
        let holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                command: "unshare -m".into(),
                source,
            })?;
        let mut nodefs = Self {
            holder,
            netns,
            dir: dir.to_path_buf(),
        };
        nodefs.wait_unshared()?;
        let hostrun = dir.join("hostrun");
        let script = format!(
            "set -e
mount -n --bind /run {hostrun}
mount -n -t tmpfs nlde-run /run
touch /run/xtables.lock
mount -n --bind {hostrun}/xtables.lock /run/xtables.lock
mkdir -p /run/netns
mount -n -t tmpfs nlde-varlib /var/lib
mkdir -p /var/lib/cni
mount -n -t tmpfs nlde-varlog /var/log
mount -n -t tmpfs nlde-cniconf {CNI_CONF_DIR}
mount -n -t tmpfs nlde-opt /opt
mkdir -p {CNI_BIN_DIR}
for p in /usr/lib/cni/*; do ln -s $p {CNI_BIN_DIR}/; done",
            hostrun = hostrun.display()
        );
        nodefs.in_mount_ns(&["sh", "-c", &script])?;
        Ok(nodefs)
    }

    fn wait_unshared(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mine = fs::read_link("/proc/self/ns/mnt").ok();
        loop {
            let theirs = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
            let started = fs::read_link(format!("/proc/{}/exe", self.holder.id()))
                .map(|p| p.to_string_lossy().contains("sleep"))
                .unwrap_or(false);
            if started && theirs.is_some() && theirs != mine {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Other("unshare -m did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command that runs inside the node's mount namespace and the node's network
    /// namespace (hostNetwork), as the kubelet's runtime and DaemonSet pods see the node.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.id().to_string())
            .arg("-m")
            .arg(format!("--net={}", self.netns.display()))
            .arg(program);
        cmd
    }

    /// Runs `args` in the node's mount and network namespace; returns stdout.
    pub fn in_mount_ns(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        output_of(&mut cmd)
    }

    /// Writes `content` to `path` inside the node's mount namespace (e.g. the CNI conf dir).
    pub fn write_file(&self, path: &str, content: &str) -> Result<(), HarnessError> {
        let staged = self.dir.join("staged-file");
        fs::write(&staged, content).map_err(|e| HarnessError::Io(format!("{staged:?}"), e))?;
        self.in_mount_ns(&["cp", &staged.to_string_lossy(), path])
            .map(|_| ())
    }

    pub fn read_file(&self, path: &str) -> Result<String, HarnessError> {
        self.in_mount_ns(&["cat", path])
    }
}

impl Drop for NodeFs {
    fn drop(&mut self) {
        kill_child(&mut self.holder);
    }
}

/// A bridge conflist as a node's primary CNI writes it (bridge + host-local, portmap), for
/// `version`; dual-stack adds an IPv6 range.
pub fn bridge_conflist(version: &str, dual_stack: bool) -> String {
    let mut ranges = vec![serde_json::json!([{ "subnet": crate::node::NODE_POD_SUBNET }])];
    let mut routes = vec![serde_json::json!({ "dst": "0.0.0.0/0" })];
    if dual_stack {
        ranges.push(serde_json::json!([{ "subnet": crate::node::NODE_POD_SUBNET6 }]));
        routes.push(serde_json::json!({ "dst": "::/0" }));
    }
    let conf = serde_json::json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": { "type": "host-local", "ranges": ranges, "routes": routes }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    serde_json::to_string_pretty(&conf).unwrap_or_default()
}

/// The resolv.conf kubelet writes for a pod in `namespace` (dnsPolicy ClusterFirst).
pub fn kubelet_resolv_conf(namespace: &str, nameserver: IpAddr) -> String {
    format!(
        "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {nameserver}\noptions ndots:5\n"
    )
}

/// A started runtime on the node (containerd's daemon, or podman's storage dirs).
#[derive(Debug)]
pub struct RuntimeHost {
    pub runtime: Runtime,
    /// `name` of the conflist in the conf dir (podman's `--network`).
    pub network: String,
    containerd: Option<Child>,
    dir: PathBuf,
    counter: u32,
    ctl: PodCtl,
}

impl RuntimeHost {
    pub fn start(runtime: Runtime, fs_: &NodeFs) -> Result<Self, HarnessError> {
        let dir = fs_.dir.join(runtime.name());
        let rootfs = dir.join("rootfs");
        for sub in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
            fs::create_dir_all(rootfs.join(sub))
                .map_err(|e| HarnessError::Io(format!("{rootfs:?}"), e))?;
        }
        fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox"))
            .map_err(|e| HarnessError::Io("copy busybox-static".into(), e))?;
        for applet in ["sh", "sleep"] {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        let mut host = Self {
            runtime,
            network: String::new(),
            containerd: None,
            ctl: PodCtl {
                holder: fs_.holder_pid(),
                netns: fs_.netns.clone(),
                dir: dir.clone(),
            },
            dir,
            counter: 0,
        };
        match runtime {
            Runtime::Podman => host.write_podman_conf()?,
            Runtime::Containerd => host.start_containerd(fs_)?,
        }
        Ok(host)
    }

    fn write_podman_conf(&self) -> Result<(), HarnessError> {
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{CNI_BIN_DIR}\"]\nnetwork_config_dir = \"{CNI_CONF_DIR}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n"
        );
        let path = self.dir.join("containers.conf");
        fs::write(&path, conf).map_err(|e| HarnessError::Io(format!("{path:?}"), e))
    }

    fn start_containerd(&mut self, fs_: &NodeFs) -> Result<(), HarnessError> {
        let d = self.dir.display();
        let conf = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = \"{d}/ctd.sock\"\n[ttrpc]\n  address = \"{d}/ctd.sock.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n"
        );
        let path = self.dir.join("containerd.toml");
        fs::write(&path, conf).map_err(|e| HarnessError::Io(format!("{path:?}"), e))?;
        let log = fs::File::create(self.dir.join("containerd.log"))
            .map_err(|e| HarnessError::Io("containerd.log".into(), e))?;
        let child = fs_
            .command("containerd")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                command: "containerd".into(),
                source,
            })?;
        self.containerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.dir.join("ctd.sock").exists() {
            if Instant::now() > deadline {
                return Err(HarnessError::Other("containerd did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts a pod in `namespace` with the runtime's CNI (the conflist in the conf dir) and
    /// the kubelet-style resolv.conf pointing at `nameserver`.
    pub fn run_pod(&mut self, namespace: &str, nameserver: IpAddr) -> Result<Pod, HarnessError> {
        self.counter += 1;
        let id = format!("nlde-{namespace}-{}", self.counter);
        let resolv = self.dir.join(format!("{id}.resolv.conf"));
        fs::write(&resolv, kubelet_resolv_conf(namespace, nameserver))
            .map_err(|e| HarnessError::Io("resolv.conf".into(), e))?;
        let rootfs = self.dir.join("rootfs");
        let mut pod = Pod {
            id: id.clone(),
            namespace: namespace.into(),
            pid: 0,
            runtime: self.runtime,
            fg: None,
            removed: false,
            ctl: self.ctl.clone(),
        };
        match self.runtime {
            Runtime::Podman => {
                let mut cmd = self.ctl.podman();
                cmd.args(["run", "-d", "--name", &id, "--network", &self.network])
                    .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=512:512"])
                    .arg("-v")
                    .arg(format!("{}:/etc/resolv.conf:ro", resolv.display()))
                    .arg("--rootfs")
                    .arg(&rootfs)
                    .args(["/bin/sleep", "3600"]);
                output_of(&mut cmd)?;
                let mut inspect = self.ctl.podman();
                inspect.args(["inspect", "-f", "{{.State.Pid}}", &id]);
                pod.pid = parse_pid(&output_of(&mut inspect)?)?;
            }
            Runtime::Containerd => {
                // Foreground `ctr run --rm`: it calls CNI DEL when the task exits (`-d` never does).
                let log = fs::File::create(self.dir.join(format!("{id}.log")))
                    .map_err(|e| HarnessError::Io("ctr log".into(), e))?;
                let child = self
                    .ctl
                    .ctr()
                    .args(["run", "--cni", "--rm"])
                    .arg("--mount")
                    .arg(format!(
                        "type=bind,src={},dst=/etc/resolv.conf,options=rbind:ro",
                        resolv.display()
                    ))
                    // `--rootfs` is a switch: the rootfs is the first positional argument.
                    .arg("--rootfs")
                    .arg(&rootfs)
                    .args([&id, "/bin/sleep", "3600"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .map_err(|source| HarnessError::Spawn {
                        command: "ctr run".into(),
                        source,
                    })?;
                pod.fg = Some(child);
                pod.pid = self.wait_ctr_task(&id, &mut pod)?;
            }
        }
        Ok(pod)
    }

    fn wait_ctr_task(&self, id: &str, pod: &mut Pod) -> Result<i32, HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = output_of(self.ctl.ctr().args(["task", "ls"]))?;
            let running = out
                .lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .filter(|l| l.contains("RUNNING"));
            if let Some(line) = running {
                // The task runs before ctr's CNI ADD finishes: wait for eth0 to have an address.
                let pid = parse_pid(line.split_whitespace().nth(1).unwrap_or(""))?;
                if pod_has_ipv4(pid) {
                    return Ok(pid);
                }
            }
            if let Some(Ok(Some(status))) = pod.fg.as_mut().map(Child::try_wait) {
                let log =
                    fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default();
                return Err(HarnessError::Other(format!(
                    "ctr run {id} exited {status}: {log}"
                )));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Other(format!("ctr task {id} did not start")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RuntimeHost {
    /// Removes whatever containers a failed test left behind, then stops containerd, so no
    /// container process outlives the node's mount namespace.
    fn drop(&mut self) {
        match self.runtime {
            Runtime::Podman => {
                let mut rm = self.ctl.podman();
                rm.args(["rm", "-a", "-f", "-t", "0"]);
                let _ = output_of(&mut rm);
            }
            Runtime::Containerd => {
                let mut ls = self.ctl.ctr();
                ls.args(["task", "ls", "-q"]);
                for id in output_of(&mut ls).unwrap_or_default().lines() {
                    let mut kill = self.ctl.ctr();
                    kill.args(["task", "kill", "-s", "KILL", id]);
                    let _ = output_of(&mut kill);
                }
            }
        }
        if let Some(mut child) = self.containerd.take() {
            kill_child(&mut child);
        }
    }
}

fn parse_pid(s: &str) -> Result<i32, HarnessError> {
    s.trim()
        .parse()
        .map_err(|_| HarnessError::Other(format!("not a pid: {s:?}")))
}

fn pod_has_ipv4(pid: i32) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("inet "))
        .unwrap_or(false)
}

/// What a pod needs to stop itself through its runtime.
#[derive(Debug, Clone)]
struct PodCtl {
    holder: u32,
    netns: PathBuf,
    dir: PathBuf,
}

impl PodCtl {
    fn podman(&self) -> Command {
        let mut cmd = self.command("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"));
        cmd
    }

    fn ctr(&self) -> Command {
        let mut cmd = self.command("ctr");
        cmd.arg("-a")
            .arg(self.dir.join("ctd.sock"))
            .args(["-n", "nlde"]);
        cmd
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.to_string())
            .arg("-m")
            .arg(format!("--net={}", self.netns.display()))
            .arg(program);
        cmd
    }
}

/// A running pod (container) started by a real runtime.
#[derive(Debug)]
pub struct Pod {
    pub id: String,
    pub namespace: String,
    pub pid: i32,
    pub runtime: Runtime,
    fg: Option<Child>,
    removed: bool,
    ctl: PodCtl,
}

impl Pod {
    /// The pod's network namespace.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// One UDP query from inside the pod's network namespace (the pod's own DNS path).
    pub fn query(
        &self,
        server: std::net::SocketAddr,
        name: &str,
        qtype: u16,
        timeout: Duration,
    ) -> Result<crate::dns::Answer, HarnessError> {
        let name = name.to_string();
        crate::netns::in_netns(&self.netns(), move || {
            crate::dns::query_udp(server, &name, qtype, timeout)
        })?
        .map_err(|e| HarnessError::Other(format!("query from the pod: {e:?}")))
    }

    /// The pod's IPv4 / IPv6 addresses on eth0.
    pub fn ips(&self) -> Result<Vec<IpAddr>, HarnessError> {
        let out =
            self.exec_host_tool(&["ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
            .collect())
    }

    /// The resolv.conf the container actually sees.
    pub fn resolv_conf(&self) -> Result<String, HarnessError> {
        let p = format!("/proc/{}/root/etc/resolv.conf", self.pid);
        fs::read_to_string(&p).map_err(|e| HarnessError::Io(p, e))
    }

    /// Runs a host tool (dig, getent, ip) in the pod's network namespace, with the pod's own
    /// resolv.conf bind-mounted over /etc/resolv.conf in a throwaway mount namespace, so glibc
    /// and dig resolve exactly as a process in the pod would.
    pub fn exec_host_tool(&self, args: &[&str]) -> Result<String, HarnessError> {
        let resolv = format!("/proc/{}/root/etc/resolv.conf", self.pid);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.pid))
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg("mount -n -t tmpfs nlde /mnt && cp \"$0\" /mnt/resolv.conf && mount -n --bind /mnt/resolv.conf /etc/resolv.conf && exec \"$@\"")
            .arg(&resolv)
            .args(args);
        output_of(&mut cmd)
    }

    /// Runs a command inside the container (busybox).
    pub fn exec_in_container(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid.to_string())
            .args(["-m", "-n", "-u", "-i"])
            .args(args);
        output_of(&mut cmd)
    }

    /// Stops and removes the pod through its runtime, which runs CNI DEL.
    pub fn remove(&mut self) -> Result<(), HarnessError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        match self.runtime {
            Runtime::Podman => {
                // stop tears the network down (CNI DEL), rm removes the container.
                let mut stop = self.ctl.podman();
                stop.args(["stop", "-t", "0", &self.id]);
                output_of(&mut stop)?;
                let mut rm = self.ctl.podman();
                rm.args(["rm", &self.id]);
                output_of(&mut rm).map(|_| ())
            }
            Runtime::Containerd => {
                let mut kill = self.ctl.ctr();
                kill.args(["task", "kill", "-s", "KILL", &self.id]);
                let killed = output_of(&mut kill).map(|_| ());
                // ctr (foreground, --rm) now runs CNI DEL and removes the container, then exits.
                if let Some(mut child) = self.fg.take() {
                    let status = child
                        .wait()
                        .map_err(|e| HarnessError::Io("wait ctr".into(), e))?;
                    let log = fs::read_to_string(self.ctl.dir.join(format!("{}.log", self.id)))
                        .unwrap_or_default();
                    if log.contains("level=error") || log.contains("ctr: ") {
                        return Err(HarnessError::Other(format!(
                            "ctr run {} ended {status}: {log}",
                            self.id
                        )));
                    }
                }
                killed
            }
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.remove();
        if let Some(mut child) = self.fg.take() {
            kill_child(&mut child);
        }
    }
}
