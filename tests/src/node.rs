//! The simulated node: a "node" network namespace with a default route (to a "world"
//! namespace), kube-proxy's rules for the kube-dns Service (iptables or nftables mode), and two
//! cluster DNS pods behind them on a bridge of their own.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::HarnessError;
use crate::clusterdns::ClusterDns;
use crate::iptables::{self, Backend, Endpoint};
use crate::kubeproxy::{self, KubeDnsService, KubeProxyMode};
use crate::netns::{Netns, unique_name};

/// The kube-dns ClusterIPs and the rest of the node's addressing plan.
pub const CLUSTER_IP: &str = "10.96.0.10";
pub const CLUSTER_IP6: &str = "fd00::a";
pub const LOCAL_IP: &str = "169.254.20.10";
pub const NODE_IP: &str = "192.168.200.2";
pub const NODE_IP6: &str = "fd00:200::2";
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const POD_CIDR6: &str = "fd00:244::/48";
/// Service CIDRs the ClusterIPs come from.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SERVICE_CIDR6: &str = "fd00::/108";
/// Subnet the CNI bridge hands out on this node.
pub const NODE_POD_SUBNET: &str = "10.244.0.0/24";
pub const NODE_POD_SUBNET6: &str = "fd00:244::/64";
const DNS_POD_IPS: [&str; 2] = ["10.244.1.10", "10.244.1.11"];
const DNS_POD_IPS6: [&str; 2] = ["fd00:244:1::10", "fd00:244:1::11"];

/// How to build the node.
#[derive(Debug, Clone, Copy)]
pub struct NodeOptions {
    pub mode: KubeProxyMode,
    /// Also an IPv6 ClusterIP, IPv6 cluster DNS pods and IPv6 kube-proxy rules.
    pub dual_stack: bool,
}

/// A whole node; dropping it removes every namespace and process it created.
#[derive(Debug)]
pub struct Node {
    pub opts: NodeOptions,
    /// Cluster DNS pods (dropped before the namespaces).
    pub dns: Vec<ClusterDns>,
    pub ns: Netns,
    world: Netns,
    pub dir: tempfile::TempDir,
}

fn ip(s: &str) -> IpAddr {
    // The constants above are valid literals; a typo there is a programming error.
    s.parse()
        .unwrap_or_else(|_| panic!("bad address literal {s}"))
}

impl Node {
    pub fn new(opts: NodeOptions) -> Result<Self, HarnessError> {
        let tag = unique_name(opts.mode.tag());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir()
            .map_err(|e| HarnessError::Io("tempdir".into(), e))?;
        let ns = Netns::create(&format!("{tag}-node"))?;
        let world = Netns::create(&format!("{tag}-world"))?;
        let mut node = Self {
            opts,
            dns: Vec::new(),
            ns,
            world,
            dir,
        };
        node.wire_uplink()?;
        node.wire_dns_bridge()?;
        for i in 0..DNS_POD_IPS.len() {
            node.add_dns_pod(&tag, i)?;
        }
        node.install_kube_proxy()?;
        Ok(node)
    }

    pub fn mode(&self) -> KubeProxyMode {
        self.opts.mode
    }

    /// The iptables backend our rules and the harness's counters live in on this node.
    pub fn backend(&self) -> Backend {
        self.opts.mode.backend()
    }

    pub fn cluster_ip(&self) -> IpAddr {
        ip(CLUSTER_IP)
    }

    pub fn cluster_ip6(&self) -> IpAddr {
        ip(CLUSTER_IP6)
    }

    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// eth0 to the "world" namespace and the default route through it (without one the
    /// node's own queries to the ClusterIP fail before DNAT, docs/design-facts.md §1).
    fn wire_uplink(&self) -> Result<(), HarnessError> {
        self.ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            self.world.name(),
        ])?;
        self.ns
            .ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        self.ns.ip(&["link", "set", "eth0", "up"])?;
        self.world
            .ip(&["addr", "add", "192.168.200.1/24", "dev", "uplink"])?;
        self.world
            .ip(&["addr", "add", "fd00:200::1/64", "dev", "uplink", "nodad"])?;
        self.world.ip(&["link", "set", "uplink", "up"])?;
        self.ns
            .ip(&["route", "add", "default", "via", "192.168.200.1"])?;
        self.ns
            .ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;
        self.ns.sysctl("net.ipv4.ip_forward=1")?;
        self.ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
        Ok(())
    }

    /// The bridge the cluster DNS pods hang off (routed from the pods' bridge, so DNAT and
    /// its reverse always go through the node's conntrack).
    fn wire_dns_bridge(&self) -> Result<(), HarnessError> {
        self.ns.ip(&["link", "add", "dnsbr", "type", "bridge"])?;
        self.ns
            .ip(&["addr", "add", "10.244.1.1/24", "dev", "dnsbr"])?;
        self.ns
            .ip(&["addr", "add", "fd00:244:1::1/64", "dev", "dnsbr", "nodad"])?;
        self.ns.ip(&["link", "set", "dnsbr", "up"])?;
        Ok(())
    }

    fn add_dns_pod(&mut self, tag: &str, i: usize) -> Result<(), HarnessError> {
        let pod = Netns::create(&format!("{tag}-dns{i}"))?;
        let host_side = format!("vdns{i}");
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &host_side,
            "netns",
            self.ns.name(),
        ])?;
        pod.ip(&[
            "addr",
            "add",
            &format!("{}/24", DNS_POD_IPS[i]),
            "dev",
            "eth0",
        ])?;
        pod.ip(&[
            "addr",
            "add",
            &format!("{}/64", DNS_POD_IPS6[i]),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:244:1::1"])?;
        self.ns
            .ip(&["link", "set", &host_side, "master", "dnsbr", "up"])?;
        let mut ips = vec![ip(DNS_POD_IPS[i])];
        if self.opts.dual_stack {
            ips.push(ip(DNS_POD_IPS6[i]));
        }
        let dir = self.dir.path().join(format!("dns{i}"));
        self.dns
            .push(ClusterDns::start(pod, ips, dir, self.backend())?);
        Ok(())
    }

    fn install_kube_proxy(&self) -> Result<(), HarnessError> {
        let service = |cluster_ip, service_cidr, pod_cidr, ips: &[&str]| KubeDnsService {
            cluster_ip,
            service_cidr,
            pod_cidr,
            endpoints: ips
                .iter()
                .map(|a| Endpoint {
                    ip: ip(a),
                    port: 53,
                })
                .collect(),
        };
        let v4 = service(self.cluster_ip(), SERVICE_CIDR, POD_CIDR, &DNS_POD_IPS);
        kubeproxy::install(&self.ns, self.opts.mode, &v4)?;
        if self.opts.dual_stack {
            let v6 = service(self.cluster_ip6(), SERVICE_CIDR6, POD_CIDR6, &DNS_POD_IPS6);
            kubeproxy::install(&self.ns, self.opts.mode, &v6)?;
        }
        Ok(())
    }

    /// Queries the cluster DNS pods have received so far.
    pub fn upstream_queries(&self) -> Result<u64, HarnessError> {
        crate::clusterdns::total_queries(&self.dns)
    }

    /// Starts counting queries for `name` at every cluster DNS pod.
    pub fn count_name(&self, name: &str) -> Result<(), HarnessError> {
        self.dns.iter().try_for_each(|pod| pod.count_name(name))
    }

    /// Queries for `name` the cluster DNS pods received since `count_name(name)`.
    pub fn upstream_queries_for(&self, name: &str) -> Result<u64, HarnessError> {
        self.dns.iter().map(|pod| pod.queries_for(name)).sum()
    }

    /// Stops (`false`) or restarts (`true`) every cluster DNS pod's server.
    pub fn set_cluster_dns_running(&mut self, running: bool) -> Result<(), HarnessError> {
        for pod in &mut self.dns {
            if running {
                pod.start_server()?;
            } else {
                pod.stop_server();
            }
        }
        Ok(())
    }

    /// Blackholes (`true`) or restores every cluster DNS pod (see `ClusterDns::set_blackhole`).
    pub fn set_cluster_dns_blackhole(&self, on: bool) -> Result<(), HarnessError> {
        self.dns.iter().try_for_each(|pod| pod.set_blackhole(on))
    }

    /// `iptables-save -t raw` lines with our comment (the node-local-dns rules).
    pub fn our_raw_rules(&self, v6: bool) -> Result<Vec<String>, HarnessError> {
        iptables::rules_matching(&self.ns, self.backend(), v6, "raw", "node-local-dns")
    }

    /// Flushes the raw table, as a careless script or a kube-proxy bug would.
    pub fn flush_raw(&self, v6: bool) -> Result<(), HarnessError> {
        iptables::iptables(&self.ns, self.backend(), v6, &["-t", "raw", "-F"]).map(|_| ())
    }

    /// Conntrack entries in the node namespace for UDP from `src` to `dst`:53 (`conntrack -L`).
    pub fn conntrack_dns(&self, src: IpAddr, dst: IpAddr) -> Result<Vec<String>, HarnessError> {
        let (src, dst) = (src.to_string(), dst.to_string());
        let args = [
            "-L",
            "-p",
            "udp",
            "--orig-src",
            &src,
            "--orig-dst",
            &dst,
            "--orig-port-dst",
            "53",
        ];
        let out = self.ns.exec("conntrack", &args)?;
        Ok(out
            .lines()
            .filter(|l| l.contains("udp"))
            .map(str::to_string)
            .collect())
    }
}
