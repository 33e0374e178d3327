//! The CNI plugin under real runtimes: containerd (`ctr run --cni`)
//! and podman (CNI backend) × cniVersion 0.3.1, 0.4.0, 1.0.0, with the conflist
//! [bridge + host-local, node-local-dns, portmap]. The container starts and gets its IP, the
//! node state is in place (once), and stop/remove run DEL cleanly (IPAM released, node state
//! kept). Each runtime runs beside each kube-proxy mode (iptables through iptables-legacy or
//! iptables-nft, nftables) across the versions.

use std::net::SocketAddr;
use std::time::Duration;

use simnode::dns::TYPE_A;
use simnode::runtime::bridge_conflist;
use simnode::{KubeProxyMode, Runtime, SimNode, SimOptions};

/// The bridge conflist with our entry chained between bridge and portmap.
fn conflist_with_plugin(version: &str) -> String {
    let mut conf: serde_json::Value =
        serde_json::from_str(&bridge_conflist(version, false)).unwrap();
    let entry = serde_json::json!({ "type": "node-local-dns", "clusterDNS": ["10.96.0.10"] });
    conf["plugins"].as_array_mut().unwrap().insert(1, entry);
    serde_json::to_string_pretty(&conf).unwrap()
}

/// The four raw rules, each exactly once, PREROUTING ones first in their chain.
fn assert_node_state(sim: &SimNode) {
    let addrs = sim.nodelocaldns_addrs();
    assert!(
        addrs.contains(&"10.96.0.10/32".to_string()),
        "ClusterIP on nodelocaldns: {addrs:?}"
    );
    assert!(
        addrs.contains(&"169.254.20.10/32".to_string()),
        "local IP on nodelocaldns: {addrs:?}"
    );
    let rules = sim.node.our_raw_rules(false).unwrap();
    assert_eq!(rules.len(), 4, "four raw rules: {rules:#?}");
    for proto in ["udp", "tcp"] {
        let pre: Vec<_> = rules
            .iter()
            .filter(|r| r.starts_with("-A PREROUTING") && r.contains(&format!("-p {proto}")))
            .collect();
        assert_eq!(pre.len(), 1, "{proto} PREROUTING: {rules:#?}");
        assert!(
            pre[0].contains("-d 10.96.0.10/32") && pre[0].contains("--dport 53"),
            "{}",
            pre[0]
        );
        assert!(
            pre[0].contains("-m socket")
                && !pre[0].contains("--nowildcard")
                && pre[0].contains("-j NOTRACK"),
            "{}",
            pre[0]
        );
        let out: Vec<_> = rules
            .iter()
            .filter(|r| r.starts_with("-A OUTPUT") && r.contains(&format!("-p {proto}")))
            .collect();
        assert_eq!(out.len(), 1, "{proto} OUTPUT: {rules:#?}");
        assert!(
            out[0].contains("-s 10.96.0.10/32")
                && out[0].contains("--sport 53")
                && out[0].contains("-j NOTRACK"),
            "{}",
            out[0]
        );
    }
    let raw = simnode::iptables::save(&sim.node.ns, sim.node.backend(), false, "raw").unwrap();
    let first = raw
        .lines()
        .find(|l| l.starts_with("-A PREROUTING"))
        .unwrap_or_default();
    assert!(
        first.contains("node-local-dns"),
        "our rule heads raw PREROUTING:\n{raw}"
    );
}

fn plugin_under_runtime(runtime: Runtime, version: &'static str, mode: KubeProxyMode) {
    let mut opts = SimOptions::new(mode);
    opts.runtime = runtime;
    opts.cni_version = version;
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    sim.copy_plugin().expect("plugin binary");
    sim.write_conflist(&conflist_with_plugin(version)).unwrap();
    assert!(
        sim.nodelocaldns_addrs().is_empty(),
        "no node state before the first ADD"
    );

    let mut first = sim.run_pod("default").expect("first pod starts");
    let mut second = sim.run_pod("prod").expect("second pod starts");
    let ip = first
        .ips()
        .unwrap()
        .into_iter()
        .find(|ip| ip.is_ipv4())
        .expect("pod IPv4");
    assert!(
        ip.to_string().starts_with("10.244.0."),
        "IP from the bridge's range: {ip}"
    );
    assert_node_state(&sim);
    assert!(sim.ipam_reserved().unwrap().contains(&ip.to_string()));

    // With the node state in place and no daemon, pods still resolve through kube-proxy.
    let server = SocketAddr::from(([10, 96, 0, 10], 53));
    let answer = first
        .query(
            server,
            "web.default.svc.cluster.local",
            TYPE_A,
            Duration::from_secs(2),
        )
        .expect("fallback answer");
    assert_eq!(
        answer.addrs,
        vec!["10.100.0.1".parse::<std::net::IpAddr>().unwrap()]
    );

    first.remove().expect("stop/remove runs DEL cleanly");
    let reserved = sim.ipam_reserved().unwrap();
    assert!(
        !reserved.contains(&ip.to_string()),
        "DEL released {ip}: {reserved:?}"
    );
    assert_node_state(&sim);
    second.remove().expect("second pod removed");
    assert_node_state(&sim);
}

#[test]
fn containerd_cni_0_3_1_legacy() {
    plugin_under_runtime(Runtime::Containerd, "0.3.1", KubeProxyMode::IptablesLegacy);
}

#[test]
fn containerd_cni_0_4_0_nft() {
    plugin_under_runtime(Runtime::Containerd, "0.4.0", KubeProxyMode::IptablesNft);
}

#[test]
fn containerd_cni_1_0_0_nftables() {
    plugin_under_runtime(Runtime::Containerd, "1.0.0", KubeProxyMode::Nftables);
}

#[test]
fn podman_cni_0_3_1_nft() {
    plugin_under_runtime(Runtime::Podman, "0.3.1", KubeProxyMode::IptablesNft);
}

#[test]
fn podman_cni_0_4_0_legacy() {
    plugin_under_runtime(Runtime::Podman, "0.4.0", KubeProxyMode::IptablesLegacy);
}

#[test]
fn podman_cni_1_0_0_nftables() {
    plugin_under_runtime(Runtime::Podman, "1.0.0", KubeProxyMode::Nftables);
}
