//! The node settings as one set of flags, flattened into the resolver's and the installer's
//! command lines (`#[command(flatten)]`). Both read the same `NODE_LOCAL_DNS_*` variables, so
//! the resolver and the plugin (whose conflist entry the installer writes from these) converge
//! on the same interface and rules instead of undoing each other's.

use std::net::IpAddr;

use node_setup::{IptablesBackend, NodeConfig, SocketMatch, clap_parser};

use crate::cluster_dns::{self, ClusterDns};
use crate::entry::PluginEntry;
use crate::env::Env;
use crate::error::SettingsError;

#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NodeArgs {
    /// kube-dns ClusterIP(s), at most one per family: IP[,IP6]. Default: KUBE_DNS_SVC_IP,
    /// else KUBE_DNS_SERVICE_HOST (set by Kubernetes in kube-system pods; one family).
    #[arg(long, env = "NODE_LOCAL_DNS_CLUSTER_DNS", value_delimiter = ',')]
    pub cluster_dns: Vec<IpAddr>,

    /// Link-local address(es) added to the interface beside the ClusterIP(s); the resolver
    /// serves on them too (hostNetwork pods can use them directly).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_LOCAL_IP",
        value_delimiter = ',',
        default_value = node_setup::DEFAULT_LOCAL_IP
    )]
    pub local_ip: Vec<IpAddr>,

    /// Node-local interface holding the listen addresses.
    #[arg(long, env = "NODE_LOCAL_DNS_INTERFACE", default_value = node_setup::DEFAULT_INTERFACE)]
    pub interface: String,

    /// iptables backend to program: auto = the one kube-proxy uses (more KUBE- chains; nft
    /// when tied).
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_IPTABLES_BACKEND",
        value_parser = clap_parser::<IptablesBackend>(),
        default_value = "auto"
    )]
    pub iptables_backend: IptablesBackend,

    /// How the raw PREROUTING rules match the resolver's socket: safe = `-m socket` (ignores
    /// wildcard listeners; recommended); nowildcard = the Deckhouse module's
    /// `-m socket --nowildcard` (captured by any 0.0.0.0:53 listener while the cache is down).
    /// The resolver and the plugin must agree, or each undoes the other's rules.
    #[arg(
        long,
        env = "NODE_LOCAL_DNS_SOCKET_MATCH",
        value_parser = clap_parser::<SocketMatch>(),
        default_value = "safe"
    )]
    pub socket_match: SocketMatch,
}

impl NodeArgs {
    /// The ClusterIP(s) from `--cluster-dns`, `KUBE_DNS_SVC_IP` or `KUBE_DNS_SERVICE_HOST`.
    pub fn cluster_dns(&self, env: &dyn Env) -> Result<Option<ClusterDns>, SettingsError> {
        cluster_dns::resolve(&self.cluster_dns, env)
    }

    /// The desired node state for these settings (lock path and timeout: node-setup's).
    pub fn node_config(&self, cluster_dns: &[IpAddr]) -> NodeConfig {
        let mut cfg = NodeConfig::new(cluster_dns.to_vec());
        cfg.interface = self.interface.clone();
        cfg.local_ips = self.local_ip.clone();
        cfg.backend = self.iptables_backend;
        cfg.socket_match = self.socket_match;
        cfg
    }

    /// The plugin's conflist entry for these settings.
    pub fn plugin_entry(&self, cluster_dns: &[IpAddr]) -> PluginEntry {
        PluginEntry {
            interface: self.interface.clone(),
            iptables: self.iptables_backend,
            socket_match: self.socket_match,
            ..PluginEntry::new(cluster_dns.to_vec(), self.local_ip.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn parse(argv: &[&str]) -> NodeArgs {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .unwrap()
            .node
    }

    #[test]
    fn defaults_are_node_setups() {
        let args = parse(&[]);
        let cfg = args.node_config(&["10.96.0.10".parse().unwrap()]);
        let defaults = NodeConfig::new(vec!["10.96.0.10".parse().unwrap()]);
        assert_eq!(cfg, defaults);
    }

    #[test]
    fn the_node_config_and_the_entry_carry_every_flag() {
        let args = parse(&[
            "--cluster-dns",
            "10.96.0.10,fd00::a",
            "--local-ip",
            "169.254.0.1",
            "--interface",
            "nld0",
            "--iptables-backend",
            "legacy",
            "--socket-match",
            "nowildcard",
        ]);
        let ips = args.cluster_dns.clone();
        let cfg = args.node_config(&ips);
        let entry = args.plugin_entry(&ips);
        assert_eq!(cfg.cluster_dns, ips);
        assert_eq!(
            cfg.local_ips,
            vec!["169.254.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.interface, "nld0");
        assert_eq!(cfg.backend, IptablesBackend::Legacy);
        assert_eq!(cfg.socket_match, SocketMatch::NoWildcard);
        assert_eq!(entry.node_config(), Ok(cfg));
    }

    #[test]
    fn unknown_names_are_refused_with_the_accepted_ones() {
        let err = Cli::try_parse_from(["x", "--iptables-backend", "ebpf"]).unwrap_err();
        assert!(err.to_string().contains("legacy"), "{err}");
    }
}
