//! The DaemonSet's containers as rendered, from the image install/build-image.sh built, run
//! under podman on the simulated node: `kubectl kustomize install/` gives the pod template, and
//! each container runs with exactly its command, environment, capabilities, read-only root,
//! memory limit, hostPath mounts and probes (tests/src/podspec.rs). With them the installer
//! chains the plugin and a new pod's ADD runs it; the resolver answers the pod from its cache,
//! its probes and the PodMonitor's port answer, every port it listens on is declared; killing
//! it falls back to kube-proxy at once and its restart takes DNS back. Every kube-proxy mode:
//! iptables through either backend, and nftables.
//!
//! Needs the image in this machine's podman store (`install/build-image.sh`), kubectl and
//! python3-yaml; runs as root.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use simnode::cmd::KillOnDrop;

use simnode::dns::TYPE_A;
use simnode::kubelet::Kubelet;
use simnode::metrics::http_get;
use simnode::node::{CLUSTER_IP, NODE_IP};
use simnode::podspec::{ContainerSpec, NodeFacts, Rendered};
use simnode::{KubeProxyMode, SimNode, SimOptions};

const INSTALLER: &str = "nld-installer";
const RESOLVER: &str = "nld-resolver";
const NAME: &str = "web.default.svc.cluster.local";
const NODE_NAME: &str = "sim-node";
/// Prometheus' API, on the node netns' loopback.
const PROMETHEUS: &str = "127.0.0.1:19090";

fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../install")
}

fn node_ip() -> IpAddr {
    NODE_IP.parse().unwrap()
}

/// What the kubelet injects and knows for a kube-system pod on this node.
fn facts() -> NodeFacts {
    NodeFacts {
        node_name: NODE_NAME.into(),
        host_ip: node_ip(),
        service_env: vec![
            // Service links of the kube-dns Service (enableServiceLinks).
            ("KUBE_DNS_SERVICE_HOST".into(), CLUSTER_IP.into()),
            ("KUBE_DNS_SERVICE_PORT".into(), "53".into()),
            ("KUBE_DNS_SERVICE_PORT_DNS".into(), "53".into()),
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

/// The PodMonitor's relabelings in Prometheus' own spelling (sourceLabels -> source_labels).
fn relabel_configs(endpoint: &Value) -> Vec<Value> {
    let snake = |k: &str| {
        k.chars().fold(String::new(), |mut s, c| {
            if c.is_ascii_uppercase() {
                s.push('_');
            }
            s.push(c.to_ascii_lowercase());
            s
        })
    };
    endpoint["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let fields = r.as_object().unwrap().iter();
            Value::Object(fields.map(|(k, v)| (snake(k), v.clone())).collect())
        })
        .collect()
}

/// A real Prometheus in the node netns, scraping the pod as the PodMonitor says: the port it
/// names (resolved through the container's ports), its path and relabelings, the pod IP
/// (= node IP, hostNetwork) as the target, the pod's node as Kubernetes discovery sets it.
fn start_prometheus(
    sim: &SimNode,
    dir: &Path,
    pm: &Value,
    resolver: &ContainerSpec<'_>,
) -> KillOnDrop {
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    let port = resolver
        .port(endpoint["port"].as_str().unwrap())
        .expect("the PodMonitor's port is declared by the resolver");
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": format!("podMonitor/kube-system/{}/0", pm["metadata"]["name"].as_str().unwrap()),
            "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
            "static_configs": [{
                "targets": [SocketAddr::new(node_ip(), port).to_string()],
                "labels": {"__meta_kubernetes_pod_node_name": NODE_NAME},
            }],
            "relabel_configs": relabel_configs(endpoint),
        }],
    });
    let file = dir.join("prometheus.json");
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net={}", sim.node.path().display()))
        .arg("prometheus")
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (apt install prometheus)");
    KillOnDrop(child)
}

/// The value of `query`'s first series, with its labels, from Prometheus' API.
fn prometheus_query(sim: &SimNode, query: &str) -> Option<(Value, f64)> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let path = format!("/api/v1/query?query={encoded}");
    let (status, body) = http_get(&sim.node.path(), PROMETHEUS.parse().unwrap(), &path).ok()?;
    let doc: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    let first = doc["data"]["result"].get(0)?;
    let value = first["value"][1].as_str()?.parse().ok()?;
    Some((first["metric"].clone(), value))
}

/// Capability numbers (linux/capability.h) of the ones the manifests may add.
fn cap_bit(name: &str) -> u64 {
    match name {
        "NET_BIND_SERVICE" => 1 << 10,
        "NET_ADMIN" => 1 << 12,
        "NET_RAW" => 1 << 13,
        other => panic!("capability {other}: add its number here"),
    }
}

/// What the kernel applied to the container's process, read from /proc and the cgroup fs
/// rather than trusted from podman's flags: effective capabilities, a read-only root, and the
/// memory limit.
fn assert_applied_as_rendered(pid: i32, c: &ContainerSpec<'_>) {
    let name = c.name();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let wanted = c.c["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| cap_bit(n.as_str().unwrap()))
        .fold(0, |a, b| a | b);
    assert_eq!(
        cap_eff, wanted,
        "{name}: effective capabilities {cap_eff:#x}"
    );

    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_opts = mountinfo
        .lines()
        .rev()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .map(|f| f[5].to_string())
        .unwrap();
    assert!(
        root_opts.split(',').any(|o| o == "ro"),
        "{name}: root mounted {root_opts}"
    );

    let limit = c.c["resources"]["limits"]["memory"].as_str().unwrap();
    let want = simnode::podspec::parse_quantity(limit).unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let applied = cgroups.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            return None;
        };
        std::fs::read_to_string(file)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    assert_eq!(applied, Some(want), "{name}: memory limit {limit}");
}

fn daemonset_runs_as_rendered(mode: KubeProxyMode) {
    let rendered = Rendered::kustomize(&install_dir()).unwrap();
    let ds = rendered.only("DaemonSet").unwrap();
    let installer = rendered.container(ds, "installer").unwrap();
    let resolver = rendered.container(ds, "resolver").unwrap();
    let image = resolver.image().unwrap().to_string();
    assert_eq!(installer.image().unwrap(), image);

    // A node whose primary CNI wrote its conflist; nothing of ours installed yet.
    let mut sim = SimNode::new(SimOptions {
        install: false,
        ..SimOptions::new(mode)
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
    assert_applied_as_rendered(kubelet.pid(INSTALLER).unwrap(), &installer);

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
        mode.name(),
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

    // Prometheus scrapes it as the PodMonitor says, with the labels the dashboard selects on.
    let pm = rendered.only("PodMonitor").unwrap();
    let _prometheus = start_prometheus(&sim, kubelet.scratch(), pm, &resolver);
    let hits =
        format!("sum(coredns_cache_hits_total{{job=\"node-local-dns\", node=\"{NODE_NAME}\"}})");
    wait_until(
        "Prometheus scrapes the resolver",
        Duration::from_secs(60),
        || {
            let up = prometheus_query(&sim, "up");
            let scraped = prometheus_query(&sim, &hits).is_some_and(|(_, v)| v >= 1.0);
            scraped
                && up.is_some_and(|(labels, v)| {
                    v == 1.0 && labels["job"] == "node-local-dns" && labels["node"] == NODE_NAME
                })
        },
    )
    .unwrap_or_else(|e| panic!("{e}: up = {:?}", prometheus_query(&sim, "up")));

    // Every port the resolver listens on is declared.
    let pid = kubelet.pid(RESOLVER).unwrap();
    assert_applied_as_rendered(pid, &resolver);
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
    daemonset_runs_as_rendered(KubeProxyMode::IptablesNft);
}

#[test]
fn daemonset_runs_as_rendered_iptables_legacy() {
    daemonset_runs_as_rendered(KubeProxyMode::IptablesLegacy);
}

#[test]
fn daemonset_runs_as_rendered_nftables() {
    daemonset_runs_as_rendered(KubeProxyMode::Nftables);
}
