//! The simulated node itself, before any node-local-dns part is involved: pods started by a
//! real runtime resolve through kube-proxy's DNAT to the knotd cluster DNS pods.

use simnode::dns::{TYPE_A, query_tcp};
use simnode::{Backend, Runtime, SimNode, SimOptions};
use std::net::SocketAddr;
use std::time::Duration;

fn pods_resolve_through_kube_proxy(backend: Backend, runtime: Runtime) {
    let mut opts = SimOptions::new(backend);
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
    pods_resolve_through_kube_proxy(Backend::Legacy, Runtime::Podman);
}

#[test]
fn containerd_pods_resolve_through_kube_proxy_nft() {
    pods_resolve_through_kube_proxy(Backend::Nft, Runtime::Containerd);
}
