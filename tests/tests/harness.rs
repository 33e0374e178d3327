//! The simulated node itself, before any node-local-dns part is involved: pods started by a
//! real runtime resolve through kube-proxy's DNAT to the knotd cluster DNS pods, in each
//! kube-proxy mode.

use simnode::dns::{TYPE_A, query_tcp};
use simnode::netns::in_netns;
use simnode::{KubeProxyMode, Node, NodeOptions, Runtime, SimNode, SimOptions};
use std::net::SocketAddr;
use std::time::Duration;

fn pods_resolve_through_kube_proxy(mode: KubeProxyMode, runtime: Runtime) {
    let mut opts = SimOptions::new(mode);
    opts.runtime = runtime;
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    let pod = sim.run_pod("default").expect("pod");
    let ips = pod.ips().expect("pod ips");
    assert!(
        ips.iter().any(|ip| ip.to_string().starts_with("10.244.0.")),
        "pod IP from the bridge subnet: {ips:?}"
    );
    let resolv = pod.resolv_conf().expect("resolv.conf");
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:5"), "{resolv}");

    let before = sim.node.upstream_queries().unwrap();
    let server = SocketAddr::from(([10, 96, 0, 10], 53));
    let udp = pod
        .query(
            server,
            "web.default.svc.cluster.local",
            TYPE_A,
            Duration::from_secs(2),
        )
        .expect("udp answer via DNAT");
    assert_eq!(
        udp.addrs,
        vec!["10.100.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    let tcp = simnode::netns::in_netns(&pod.netns(), move || {
        query_tcp(server, "www.example.com", TYPE_A, Duration::from_secs(2))
    })
    .unwrap()
    .expect("tcp answer via DNAT");
    assert_eq!(
        tcp.addrs,
        vec!["192.0.2.1".parse::<std::net::IpAddr>().unwrap()]
    );
    // glibc with the pod's resolv.conf: a short name through the search path.
    let getent = pod
        .exec_host_tool(&["getent", "ahostsv4", "db.prod"])
        .expect("getent");
    assert!(getent.contains("10.100.0.2"), "{getent}");
    let after = sim.node.upstream_queries().unwrap();
    assert!(
        after >= before + 3,
        "cluster DNS pods saw the queries: {before} → {after}"
    );
}

#[test]
fn podman_pods_resolve_through_kube_proxy_legacy() {
    pods_resolve_through_kube_proxy(KubeProxyMode::IptablesLegacy, Runtime::Podman);
}

#[test]
fn containerd_pods_resolve_through_kube_proxy_nft() {
    pods_resolve_through_kube_proxy(KubeProxyMode::IptablesNft, Runtime::Containerd);
}

#[test]
fn podman_pods_resolve_through_kube_proxy_nftables() {
    pods_resolve_through_kube_proxy(KubeProxyMode::Nftables, Runtime::Podman);
}

/// `KUBE-` chains in one iptables backend of the node (`iptables-<backend>-save`, all tables).
fn kube_chains(node: &Node, tool: &str) -> Vec<String> {
    node.ns
        .exec(tool, &[])
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
        .lines()
        .filter(|l| l.starts_with(":KUBE-"))
        .map(str::to_string)
        .collect()
}

/// In nftables mode kube-proxy leaves no `KUBE-` chain in either iptables backend, so the
/// backend detection the plugin and daemon run (`auto`: more `KUBE-` chains wins, nft on a
/// tie) picks nft; in the iptables modes it picks kube-proxy's own backend.
#[test]
fn auto_backend_detection_in_every_mode() {
    for mode in KubeProxyMode::ALL {
        let node = Node::new(NodeOptions {
            mode,
            dual_stack: true,
        })
        .expect("simulated node");
        let legacy = kube_chains(&node, "iptables-legacy-save");
        let nft = kube_chains(&node, "iptables-nft-save");
        let legacy6 = kube_chains(&node, "ip6tables-legacy-save");
        let nft6 = kube_chains(&node, "ip6tables-nft-save");
        match mode {
            KubeProxyMode::Nftables => {
                assert_eq!(
                    (&legacy, &nft, &legacy6, &nft6),
                    (&vec![], &vec![], &vec![], &vec![]),
                    "no KUBE- chain in nftables mode"
                );
                let tables = node.ns.exec("nft", &["list", "tables"]).expect("nft");
                assert!(
                    tables.contains("table ip kube-proxy")
                        && tables.contains("table ip6 kube-proxy"),
                    "{tables}"
                );
            }
            KubeProxyMode::IptablesLegacy => assert!(nft.is_empty() && !legacy.is_empty()),
            KubeProxyMode::IptablesNft => assert!(legacy.is_empty() && !nft.is_empty()),
        }
        let detected = in_netns(&node.path(), || {
            node_setup::detect_backend(node_setup::IptablesBackend::Auto)
        })
        .expect("enter node netns")
        .expect("detect_backend");
        assert_eq!(detected, mode.backend().name(), "{}", mode.name());
    }
}
