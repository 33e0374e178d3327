//! The resolver daemon started as its DaemonSet starts it: hostNetwork (the node's network
//! namespace), the node's filesystem (so it sees the plugin's stats under /run), the env the
//! manifest sets (the kube-dns ClusterIP, NODE_IP from status.hostIP).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::cmd::{kill_child, signal_pid};
use crate::dns::query_udp;
use crate::metrics::{Metrics, http_get, scrape};
use crate::netns::in_netns;
use crate::runtime::NodeFs;

pub const DAEMON_BIN: &str = "node-local-dns-resolver";

/// Per-instance settings (two instances overlap during a rolling update, so their metrics
/// and health ports must differ).
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub cluster_dns: Vec<IpAddr>,
    pub node_ip: IpAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub sync_interval_secs: u32,
    pub extra_args: Vec<String>,
}

impl DaemonOptions {
    pub fn new(cluster_dns: Vec<IpAddr>, node_ip: IpAddr) -> Self {
        Self {
            cluster_dns,
            node_ip,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9355)),
            health: SocketAddr::from(([127, 0, 0, 1], 8080)),
            sync_interval_secs: 2,
            extra_args: Vec::new(),
        }
    }
}

/// A running daemon; killed (SIGKILL, by PID) on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub opts: DaemonOptions,
    netns: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub fn start(
        fs_: &NodeFs,
        netns: PathBuf,
        opts: DaemonOptions,
        log: PathBuf,
    ) -> Result<Self, HarnessError> {
        let bin = crate::bin_path(DAEMON_BIN);
        if !bin.exists() {
            return Err(HarnessError::MissingBinary(bin));
        }
        let logf = fs::File::create(&log).map_err(|e| HarnessError::Io(format!("{log:?}"), e))?;
        let cluster_dns: Vec<String> = opts.cluster_dns.iter().map(ToString::to_string).collect();
        // The env of install/daemonset.yaml + config.env; ports differ per instance so two
        // can overlap, and the sync interval is shortened to keep the tests quick. The
        // ConfigMap leaves KUBE_DNS_SVC_IP unset (the binaries fall back to the service link
        // KUBE_DNS_SERVICE_HOST); it is set here so the cluster DNS is explicit either way.
        let mut cmd = fs_.command(&bin.to_string_lossy());
        cmd.env("KUBE_DNS_SVC_IP", cluster_dns.join(","))
            .env("NO_COLOR", "1")
            .env("NODE_IP", opts.node_ip.to_string())
            .env("NODE_LOCAL_DNS_LOCAL_IP", crate::node::LOCAL_IP)
            .env("NODE_LOCAL_DNS_CLUSTER_DOMAIN", "cluster.local")
            .env("NODE_LOCAL_DNS_IPTABLES_BACKEND", "auto")
            .env("NODE_LOCAL_DNS_SOCKET_MATCH", "safe")
            .env("NODE_LOCAL_DNS_THREADS", "auto")
            .env("NODE_LOCAL_DNS_METRICS_LISTEN", opts.metrics.to_string())
            .env("NODE_LOCAL_DNS_HEALTH_LISTEN", opts.health.to_string())
            .env(
                "NODE_LOCAL_DNS_SYNC_INTERVAL",
                format!("{}s", opts.sync_interval_secs),
            )
            .env("RUST_LOG", "info")
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(
                logf.try_clone()
                    .map_err(|e| HarnessError::Io("log".into(), e))?,
            )
            .stderr(logf);
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            command: DAEMON_BIN.into(),
            source,
        })?;
        let mut d = Self {
            child,
            opts,
            netns,
            log,
        };
        d.wait_ready()?;
        Ok(d)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until this instance reports ready on its own health port and a query to the
    /// link-local address is answered (the node's own traffic to the ClusterIP goes through
    /// kube-proxy's OUTPUT DNAT, not the cache). The health port is per instance, so an older
    /// instance still answering DNS cannot make a failed start look ready.
    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let local: IpAddr = crate::node::LOCAL_IP
            .parse()
            .map_err(|_| HarnessError::Other("bad LOCAL_IP".into()))?;
        let server = SocketAddr::new(local, 53);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(HarnessError::Other(format!(
                    "daemon exited {status}: {}",
                    self.log_text()
                )));
            }
            let ready = matches!(
                http_get(&self.netns, self.opts.health, "/ready"),
                Ok((200, _))
            );
            let answered = in_netns(&self.netns, move || {
                query_udp(
                    server,
                    "kube-dns.kube-system.svc.cluster.local",
                    1,
                    Duration::from_millis(300),
                )
            })?;
            if ready && matches!(answered, Ok(ref a) if a.rcode == 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Other(format!(
                    "daemon not ready (/ready 200: {ready}, {server}: {answered:?})\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> Result<Metrics, HarnessError> {
        scrape(&self.netns, self.opts.metrics)
    }

    /// SIGKILL, as a crash or OOM kill would end it.
    pub fn kill9(&mut self) {
        kill_child(&mut self.child);
    }

    /// SIGTERM and wait for it to exit (what the kubelet does on a rolling update).
    pub fn terminate(&mut self, grace: Duration) -> Result<Option<i32>, HarnessError> {
        signal_pid(self.pid(), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(HarnessError::Other(
                    "daemon ignored SIGTERM past its grace period".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
