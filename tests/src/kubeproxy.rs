//! The node's kube-proxy: the mode it runs in, and the rules it writes for the kube-dns Service
//! in that mode (iptables nat through either iptables backend, or its own nftables tables).

use std::net::IpAddr;

use crate::HarnessError;
use crate::iptables::{self, Backend, Endpoint};
use crate::kubeproxy_nft;
use crate::netns::Netns;

/// How the node's kube-proxy programs Services. Each test run picks one; everything else on
/// the node (our setup, the harness's own iptables counters) follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeProxyMode {
    /// `--proxy-mode iptables` through `iptables-legacy`.
    IptablesLegacy,
    /// `--proxy-mode iptables` through `iptables-nft` (the xtables compat layer).
    IptablesNft,
    /// `--proxy-mode nftables`: tables `ip kube-proxy` / `ip6 kube-proxy`, no `KUBE-` chains.
    Nftables,
}

impl KubeProxyMode {
    pub const ALL: [KubeProxyMode; 3] = [
        KubeProxyMode::IptablesLegacy,
        KubeProxyMode::IptablesNft,
        KubeProxyMode::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KubeProxyMode::IptablesLegacy => "iptables-legacy",
            KubeProxyMode::IptablesNft => "iptables-nft",
            KubeProxyMode::Nftables => "nftables",
        }
    }

    /// A short tag for namespace and directory names (podman refuses a runroot path longer
    /// than 50 characters, and the node's temp dir holds it).
    pub fn tag(self) -> &'static str {
        match self {
            KubeProxyMode::IptablesLegacy => "legacy",
            KubeProxyMode::IptablesNft => "nft",
            KubeProxyMode::Nftables => "nfts",
        }
    }

    /// kube-proxy's iptables mode through `backend`.
    pub fn iptables(backend: Backend) -> Self {
        match backend {
            Backend::Legacy => KubeProxyMode::IptablesLegacy,
            Backend::Nft => KubeProxyMode::IptablesNft,
        }
    }

    /// The iptables backend our node setup ends up using beside this kube-proxy (backend
    /// `auto`): kube-proxy's own in the iptables modes; in nftables mode neither backend has a
    /// `KUBE-` chain, the count ties and the tie goes to nft.
    pub fn backend(self) -> Backend {
        match self {
            KubeProxyMode::IptablesLegacy => Backend::Legacy,
            KubeProxyMode::IptablesNft | KubeProxyMode::Nftables => Backend::Nft,
        }
    }
}

/// What kube-proxy knows about Service `kube-system/kube-dns` (ports dns udp/53 and dns-tcp
/// tcp/53) in one address family.
#[derive(Debug, Clone)]
pub struct KubeDnsService {
    pub cluster_ip: IpAddr,
    /// The Service CIDR the ClusterIP was allocated from.
    pub service_cidr: &'static str,
    /// Traffic from outside it is masqueraded (kube-proxy's `--cluster-cidr` detector).
    pub pod_cidr: &'static str,
    pub endpoints: Vec<Endpoint>,
}

impl KubeDnsService {
    pub fn is_ipv6(&self) -> bool {
        self.cluster_ip.is_ipv6()
    }
}

/// Writes what kube-proxy in `mode` writes for `svc` into `ns`.
pub fn install(ns: &Netns, mode: KubeProxyMode, svc: &KubeDnsService) -> Result<(), HarnessError> {
    match mode {
        KubeProxyMode::IptablesLegacy | KubeProxyMode::IptablesNft => {
            let rules = iptables::kube_proxy_nat(svc.cluster_ip, svc.pod_cidr, &svc.endpoints);
            iptables::restore(ns, mode.backend(), svc.is_ipv6(), &rules)
        }
        KubeProxyMode::Nftables => kubeproxy_nft::load(ns, &kubeproxy_nft::ruleset(svc)),
    }
}
