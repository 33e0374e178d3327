//! The bridge-based conflist-examples under real runtimes: the installer turns the
//! example without our entry into the one with it, and pods started by containerd and podman
//! with that conflist get their IP from the example's range, get the node state set up by our
//! plugin, resolve through the cache, and are removed cleanly (DEL releases the IP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use simnode::dns::TYPE_A;
use simnode::{KubeProxyMode, Runtime, SimNode, SimOptions};

fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conflist-examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn example_under_runtime(name: &str, subnet_prefix: &str, runtime: Runtime, mode: KubeProxyMode) {
    let mut opts = SimOptions::new(mode);
    opts.runtime = runtime;
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    sim.write_conflist(&example(&format!("{name}.without-node-local-dns.conflist")))
        .unwrap();
    simnode::install::install(&sim.fs, &sim.cluster_dns(), &[]).expect("installer");
    let want: serde_json::Value =
        serde_json::from_str(&example(&format!("{name}.conflist"))).unwrap();
    assert_eq!(
        sim.conflist().unwrap(),
        want,
        "installer output equals the example with our entry"
    );

    let dopts = sim.daemon_options();
    sim.start_daemon(dopts).expect("daemon");
    let mut pod = sim
        .run_pod("default")
        .expect("pod starts with the example conflist");
    let ip = pod
        .ips()
        .unwrap()
        .into_iter()
        .find(|ip| ip.is_ipv4())
        .expect("pod IPv4");
    assert!(
        ip.to_string().starts_with(subnet_prefix),
        "{ip} from the example's range"
    );
    let addrs = sim.nodelocaldns_addrs();
    assert!(addrs.contains(&"10.96.0.10/32".to_string()), "{addrs:?}");
    assert_eq!(sim.node.our_raw_rules(false).unwrap().len(), 4);

    let before = sim
        .daemon()
        .unwrap()
        .metrics()
        .unwrap()
        .sum("coredns_dns_requests_total", &["dns://10.96.0.10:53"]);
    let server = SocketAddr::from(([10, 96, 0, 10], 53));
    let a = pod
        .query(
            server,
            "db.prod.svc.cluster.local",
            TYPE_A,
            Duration::from_secs(3),
        )
        .expect("answer");
    assert_eq!(
        a.addrs,
        vec!["10.100.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let after = sim
        .daemon()
        .unwrap()
        .metrics()
        .unwrap()
        .sum("coredns_dns_requests_total", &["dns://10.96.0.10:53"]);
    assert!(after > before, "answered by the cache's ClusterIP listener");

    pod.remove().expect("stop/remove runs DEL cleanly");
    assert!(
        !sim.ipam_reserved().unwrap().contains(&ip.to_string()),
        "DEL released {ip}"
    );
}

#[test]
fn containerd_bridge_example_under_containerd() {
    example_under_runtime(
        "containerd-bridge",
        "10.88.",
        Runtime::Containerd,
        KubeProxyMode::IptablesNft,
    );
}

#[test]
fn containerd_bridge_example_under_podman() {
    example_under_runtime(
        "containerd-bridge",
        "10.88.",
        Runtime::Podman,
        KubeProxyMode::IptablesLegacy,
    );
}

#[test]
fn crio_bridge_example_under_containerd() {
    example_under_runtime(
        "crio-bridge",
        "10.85.",
        Runtime::Containerd,
        KubeProxyMode::IptablesLegacy,
    );
}

#[test]
fn crio_bridge_example_under_podman() {
    example_under_runtime(
        "crio-bridge",
        "10.85.",
        Runtime::Podman,
        KubeProxyMode::IptablesNft,
    );
}
