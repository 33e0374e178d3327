//! The DaemonSet's containers as rendered, from the image install/build-image.sh built, run
//! under podman on the simulated node: `kubectl kustomize install/` gives the pod template, and
//! each container runs with exactly its command, environment, capabilities, read-only root,
//! memory limit, hostPath mounts and probes (tests/src/podspec.rs). With them the installer
//! chains the plugin and a new pod's ADD runs it; the resolver answers the pod from its cache,
//! its probes and the PodMonitor's port answer, every port it listens on is declared; killing
//! it falls back to kube-proxy at once and its restart takes DNS back. Both iptables backends.
//!
//! Needs the image in this machine's podman store (`install/build-image.sh`), kubectl and
//! python3-yaml; runs as root.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use simnode::dns::TYPE_A;
use simnode::kubelet::Kubelet;
use simnode::metrics::{http_get, scrape};
use simnode::node::{CLUSTER_IP, NODE_IP};
use simnode::podspec::{ContainerSpec, NodeFacts, Rendered};
use simnode::{Backend, SimNode, SimOptions};

const INSTALLER: &str = "nld-installer";
const RESOLVER: &str = "nld-resolver";
const NAME: &str = "web.default.svc.cluster.local";

fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../install")
}

fn node_ip() -> IpAddr {
    NODE_IP.parse().unwrap()
}

/// What the kubelet injects and knows for a kube-system pod on this node.
fn facts() -> NodeFacts {
    NodeFacts {
        node_name: "sim-node".into(),
        host_ip: node_ip(),
        service_env: vec![
            // Service links of the kube-dns Service (enableServiceLinks).
            ("KUBE_DNS_SERVICE_HOST".into(), CLUSTER_IP.into()),
            ("KUBE_DNS_SERVICE_PORT".into(), "53".into()),
            ("KUBE_DNS_SERVICE_PORT_DNS".into(), "53".into()),
            // Stands in for KUBE_DNS_SERVICE_HOST until both binaries read it themselves;
            // lowest precedence, so the ConfigMap would override it.
            ("KUBE_DNS_SVC_IP".into(), CLUSTER_IP.into()),
        ],
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn probe_ok(sim: &SimNode, c: &ContainerSpec<'_>, probe: &str) -> bool {
    let (addr, path) = c.http_probe(probe, &facts()).unwrap();
    matches!(http_get(&sim.node.path(), addr, &path), Ok((200, _)))
}

fn last_plugin_type(sim: &SimNode) -> Option<String> {
    let conflist = sim.conflist().ok()?;
    conflist["plugins"].as_array()?.last()?["type"]
        .as_str()
        .map(str::to_string)
}

/// Ports the process `pid` listens on in the node netns (TCP LISTEN, bound UDP outside the
/// ephemeral range, which holds the upstream sockets).
fn listening_ports(sim: &SimNode, pid: i32) -> Vec<(u16, String)> {
    let range = sim
        .node
        .ns
        .exec("cat", &["/proc/sys/net/ipv4/ip_local_port_range"])
        .unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let mut ports = Vec::new();
    for (flag, proto) in [("-t", "TCP"), ("-u", "UDP")] {
        let out = sim.node.ns.exec("ss", &["-Hlnp", flag]).unwrap();
        for line in out.lines().filter(|l| l.contains(&format!("pid={pid},"))) {
            let local = line.split_whitespace().nth(3).unwrap();
            let port: u16 = local.rsplit(':').next().unwrap().parse().unwrap();
            if port < low && !ports.contains(&(port, proto.to_string())) {
                ports.push((port, proto.to_string()));
            }
        }
    }
    ports
}

fn daemonset_runs_as_rendered(backend: Backend) {
    let rendered = Rendered::kustomize(&install_dir()).unwrap();
    let ds = rendered.only("DaemonSet").unwrap();
    let installer = rendered.container(ds, "installer").unwrap();
    let resolver = rendered.container(ds, "resolver").unwrap();
    let image = resolver.image().unwrap().to_string();
    assert_eq!(installer.image().unwrap(), image);

    // A node whose primary CNI wrote its conflist; nothing of ours installed yet.
    let mut sim = SimNode::new(SimOptions {
        install: false,
        ..SimOptions::new(backend)
    })
    .unwrap();
    let mut kubelet = Kubelet::new(&sim.fs, sim.node.path()).unwrap();
    kubelet.pull_from_host(&image).unwrap();
    let facts = facts();
    let start = Instant::now();

    // The installer chains the plugin in; its exec readiness probe passes.
    kubelet.run(&installer, INSTALLER, &facts).unwrap();
    let probe = installer.exec_probe("readinessProbe").unwrap();
    wait_until("installer ready", Duration::from_secs(60), || {
        kubelet.exec_probe(INSTALLER, &probe)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", kubelet.logs(INSTALLER)));
    assert_eq!(last_plugin_type(&sim).as_deref(), Some("node-local-dns"));

    // A new pod's ADD runs the installed plugin: it sets up the node before any resolver.
    let pod = sim.run_pod("default").unwrap();
    assert!(
        !sim.nodelocaldns_addrs().is_empty(),
        "the pod's ADD did not create the nodelocaldns interface"
    );
    assert!(!sim.node.our_raw_rules(false).unwrap().is_empty());

    // The resolver: both probes answer as the kubelet asks.
    kubelet.run(&resolver, RESOLVER, &facts).unwrap();
    wait_until("resolver ready", Duration::from_secs(60), || {
        probe_ok(&sim, &resolver, "readinessProbe") && probe_ok(&sim, &resolver, "livenessProbe")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", kubelet.logs(RESOLVER)));
    eprintln!(
        "{}: DaemonSet pod start to ready under podman: {:?}",
        backend.name(),
        start.elapsed()
    );

    // The pod is answered from the cache: the second query never reaches the cluster DNS.
    let server = SocketAddr::new(CLUSTER_IP.parse().unwrap(), 53);
    let query = |what: &str| {
        let a = pod
            .query(server, NAME, TYPE_A, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a.rcode, 0, "{what}");
    };
    sim.node.count_name(NAME).unwrap();
    query("first query");
    let upstream = sim.node.upstream_queries_for(NAME).unwrap();
    query("cached query");
    assert_eq!(sim.node.upstream_queries_for(NAME).unwrap(), upstream);

    // Prometheus' target: the port the PodMonitor names, on the pod IP (= node IP).
    let pm = rendered.only("PodMonitor").unwrap();
    let port_name = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let port = resolver.port(port_name).unwrap();
    let metrics = scrape(&sim.node.path(), SocketAddr::new(node_ip(), port)).unwrap();
    assert!(metrics.sum("coredns_cache_hits_total", &[]) >= 1.0);

    // Every port the resolver listens on is declared.
    let pid = kubelet.pid(RESOLVER).unwrap();
    let declared = resolver.declared_ports();
    let listening = listening_ports(&sim, pid);
    assert!(listening.contains(&(53, "UDP".into())), "{listening:?}");
    for p in &listening {
        assert!(
            declared.contains(p),
            "{p:?} listens but is not declared in {declared:?}"
        );
    }

    // Killed: the next query goes through kube-proxy to the cluster DNS at once.
    kubelet.kill(RESOLVER).unwrap();
    let before = sim.node.upstream_queries_for(NAME).unwrap();
    query("query with the resolver killed");
    assert!(sim.node.upstream_queries_for(NAME).unwrap() > before);

    // Restarted: ready again, and the pod's DNS is the cache's again.
    kubelet.restart(RESOLVER).unwrap();
    wait_until(
        "resolver ready after restart",
        Duration::from_secs(60),
        || probe_ok(&sim, &resolver, "readinessProbe"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", kubelet.logs(RESOLVER)));
    query("first query after the restart");
    let after = sim.node.upstream_queries_for(NAME).unwrap();
    query("cached query after the restart");
    assert_eq!(sim.node.upstream_queries_for(NAME).unwrap(), after);
    drop(pod);
}

#[test]
fn daemonset_runs_as_rendered_iptables_nft() {
    daemonset_runs_as_rendered(Backend::Nft);
}

#[test]
fn daemonset_runs_as_rendered_iptables_legacy() {
    daemonset_runs_as_rendered(Backend::Legacy);
}
