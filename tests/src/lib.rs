//! The simulated node: a Kubernetes node built from network namespaces, shared by the
//! end-to-end tests and the demo.
//!
//! [`SimNode`] puts together: the node netns with kube-proxy's rules and two knotd cluster
//! DNS pods ([`node`], [`clusterdns`], [`kubeproxy`]); the node's private mount namespace and a
//! real runtime, podman or containerd ([`runtime`]); `node-local-dns-install` chaining our
//! plugin into the bridge conflist ([`install`]); the resolver daemon started as its DaemonSet
//! would ([`daemon`]); and clients ([`dns`], [`metrics`]). Everything is torn down on drop.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

pub mod addon;
pub mod clusterdns;
pub mod cmd;
pub mod daemon;
pub mod dns;
pub mod install;
pub mod iptables;
pub mod kubelet;
pub mod kubeproxy;
pub mod kubeproxy_nft;
pub mod memcg;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod podspec;
pub mod runtime;

pub use daemon::{Daemon, DaemonOptions};
pub use iptables::Backend;
pub use kubeproxy::KubeProxyMode;
pub use node::{Node, NodeOptions};
pub use runtime::{NodeFs, Pod, Runtime, RuntimeHost};

/// Everything that can go wrong building or driving the simulated node.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr} {stdout}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
        stdout: String,
    },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("binary {0:?} not built: run `cargo build --workspace --bins` first")]
    MissingBinary(PathBuf),
    #[error("{0}")]
    Other(String),
}

/// Path of one of the workspace's binaries (`node-local-dns`, `node-local-dns-resolver`,
/// `node-local-dns-install`). `NLD_BIN_DIR` overrides the directory; otherwise the target
/// directory of the profile these tests were built with. The test command builds all bins
/// first (`cargo build --workspace --bins && cargo test --workspace`).
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("NLD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile).join(name)
}

/// How to build a [`SimNode`].
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// kube-proxy's mode, which also decides the iptables backend our setup ends up on.
    pub mode: KubeProxyMode,
    pub dual_stack: bool,
    pub runtime: Runtime,
    /// cniVersion of the bridge conflist the node's primary CNI wrote.
    pub cni_version: &'static str,
    /// Run `node-local-dns-install install --once` on the conflist before any pod starts.
    pub install: bool,
}

impl SimOptions {
    pub fn new(mode: KubeProxyMode) -> Self {
        Self {
            mode,
            dual_stack: false,
            runtime: Runtime::Podman,
            cni_version: "1.0.0",
            install: true,
        }
    }
}

/// A whole node: fields drop in order, so pods go before the runtime, the runtime before the
/// node's filesystem, and that before the namespaces.
#[derive(Debug)]
pub struct SimNode {
    pub daemons: Vec<Daemon>,
    pub runtime: RuntimeHost,
    pub fs: NodeFs,
    pub node: Node,
    pub opts: SimOptions,
    daemon_count: u32,
}

/// File name of the bridge conflist the primary CNI writes.
pub const BRIDGE_CONFLIST: &str = "10-bridge.conflist";

impl SimNode {
    pub fn new(opts: SimOptions) -> Result<Self, HarnessError> {
        let node = Node::new(NodeOptions {
            mode: opts.mode,
            dual_stack: opts.dual_stack,
        })?;
        let fs = NodeFs::new(node.path(), node.dir.path())?;
        let runtime = RuntimeHost::start(opts.runtime, &fs)?;
        let mut sim = Self {
            daemons: Vec::new(),
            runtime,
            fs,
            node,
            opts,
            daemon_count: 0,
        };
        sim.write_conflist(&runtime::bridge_conflist(opts.cni_version, opts.dual_stack))?;
        if opts.install {
            install::install(&sim.fs, &sim.cluster_dns(), &[])?;
        }
        Ok(sim)
    }

    /// The kube-dns ClusterIPs of this node's cluster (IPv4, and IPv6 when dual-stack).
    pub fn cluster_dns(&self) -> Vec<IpAddr> {
        let mut v = vec![self.node.cluster_ip()];
        if self.opts.dual_stack {
            v.push(self.node.cluster_ip6());
        }
        v
    }

    /// Replaces the conflist the runtime reads (the primary CNI writing its file).
    pub fn write_conflist(&mut self, text: &str) -> Result<(), HarnessError> {
        let parsed: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| HarnessError::Other(format!("conflist: {e}")))?;
        self.runtime.network = parsed["name"].as_str().unwrap_or_default().to_string();
        let conf = format!("{}/{BRIDGE_CONFLIST}", runtime::CNI_CONF_DIR);
        self.fs.write_file(&conf, text)
    }

    /// Copies the plugin binary into the node's CNI bin dir (what the installer does), for
    /// tests that chain it by hand.
    pub fn copy_plugin(&self) -> Result<(), HarnessError> {
        let plugin = bin_path(install::PLUGIN_BIN);
        if !plugin.exists() {
            return Err(HarnessError::MissingBinary(plugin));
        }
        let dest = format!("{}/{}", runtime::CNI_BIN_DIR, install::PLUGIN_BIN);
        self.fs
            .in_mount_ns(&["cp", &plugin.to_string_lossy(), &dest])
            .map(|_| ())
    }

    /// Addresses (`ip/len`) on the node's `nodelocaldns` interface; empty when it is absent.
    pub fn nodelocaldns_addrs(&self) -> Vec<String> {
        self.node
            .ns
            .ip(&["-o", "addr", "show", "dev", "nodelocaldns"])
            .map(|out| {
                out.lines()
                    .filter_map(|l| Some(l.split_whitespace().nth(3)?.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Addresses host-local IPAM still holds for the conflist's network (released on DEL).
    pub fn ipam_reserved(&self) -> Result<Vec<String>, HarnessError> {
        let dir = format!("/var/lib/cni/networks/{}", self.runtime.network);
        let out = self
            .fs
            .in_mount_ns(&["sh", "-c", &format!("ls {dir} 2>/dev/null || true")])?;
        Ok(out
            .lines()
            .filter(|l| l.parse::<IpAddr>().is_ok())
            .map(str::to_string)
            .collect())
    }

    /// The conflist the runtime reads.
    pub fn conflist(&self) -> Result<serde_json::Value, HarnessError> {
        let text = self
            .fs
            .read_file(&format!("{}/{BRIDGE_CONFLIST}", runtime::CNI_CONF_DIR))?;
        serde_json::from_str(&text).map_err(|e| HarnessError::Other(format!("conflist: {e}")))
    }

    /// Starts a pod in `namespace` whose resolv.conf points at the kube-dns ClusterIP.
    pub fn run_pod(&mut self, namespace: &str) -> Result<Pod, HarnessError> {
        let ns = self.node.cluster_ip();
        self.runtime.run_pod(namespace, ns)
    }

    /// Starts a pod whose resolv.conf names `nameserver` (e.g. the IPv6 ClusterIP, as the
    /// kubelet writes it on an IPv6-first dual-stack cluster).
    pub fn run_pod_with_nameserver(
        &mut self,
        namespace: &str,
        nameserver: IpAddr,
    ) -> Result<Pod, HarnessError> {
        self.runtime.run_pod(namespace, nameserver)
    }

    /// Options for the next daemon instance: fresh metrics/health ports, so an old and a new
    /// instance can overlap as in a rolling update.
    pub fn daemon_options(&mut self) -> DaemonOptions {
        let mut o = DaemonOptions::new(
            self.cluster_dns(),
            node::NODE_IP.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        );
        let n = self.daemon_count as u16;
        // As the DaemonSet: metrics on $(NODE_IP):9355, health on 127.0.0.1:9354.
        o.metrics = SocketAddr::new(o.node_ip, 9355 + 2 * n);
        o.health = SocketAddr::from(([127, 0, 0, 1], 9354 + 2 * n));
        o
    }

    /// Starts a daemon instance and waits until it answers; returns its index in `daemons`.
    pub fn start_daemon(&mut self, opts: DaemonOptions) -> Result<usize, HarnessError> {
        let log = self
            .node
            .dir
            .path()
            .join(format!("daemon{}.log", self.daemon_count));
        self.daemon_count += 1;
        let d = Daemon::start(&self.fs, self.node.path(), opts, log)?;
        self.daemons.push(d);
        Ok(self.daemons.len() - 1)
    }

    /// The most recently started daemon.
    pub fn daemon(&mut self) -> Result<&mut Daemon, HarnessError> {
        self.daemons
            .last_mut()
            .ok_or_else(|| HarnessError::Other("no daemon started".into()))
    }
}
