//! Root test: the docs/design-facts.md §1 topology in private network namespaces, beside each
//! kube-proxy mode (iptables through iptables-legacy or iptables-nft, and nftables). A "pod"
//! namespace queries the kube-dns ClusterIP; in the "node" namespace the daemon holds
//! ClusterIP:53 on a node-local interface behind the raw NOTRACK rules, and forwards misses to
//! that same ClusterIP, which kube-proxy-style DNAT sends to a stand-in cluster DNS (knotd). Answers must come from knotd through the DNAT — no loop —
//! an answer in flight at SIGTERM still reaches the pod from ClusterIP:53 (raw socket), and,
//! once the daemon is gone, straight through the DNAT (the closed socket is the fallback).
mod common;
use common::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

const CLUSTER_IP: &str = "10.96.0.10";
const LOCAL_IP: &str = "169.254.20.10";
const CLUSTER_DNS_POD: &str = "10.244.0.5";
const NODE_IP: &str = "192.168.30.1";

/// How the node's kube-proxy programs the ClusterIP, and so where our rules go beside it.
#[derive(Debug, Clone, Copy)]
enum KubeProxyMode {
    /// iptables mode through this backend (`legacy` or `nft`).
    Iptables(&'static str),
    /// nftables mode: an `ip kube-proxy` table, no iptables rules at all.
    Nftables,
}

impl KubeProxyMode {
    /// The iptables binary our raw rules live in: kube-proxy's own backend, or nft beside an
    /// nftables kube-proxy (what `auto` picks when neither backend has `KUBE-` chains).
    fn iptables_bin(self) -> String {
        match self {
            KubeProxyMode::Iptables(backend) => format!("iptables-{backend}"),
            KubeProxyMode::Nftables => "iptables-nft".to_string(),
        }
    }

    /// `--iptables-backend` for the daemon: the backend named, or detection beside nftables.
    fn setup_backend(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables(backend) => backend,
            KubeProxyMode::Nftables => "auto",
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both namespaces; deleted (with every rule and interface in them) on drop.
struct Topology {
    node: String,
    pod: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.node, &self.pod] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Topology {
    fn new(tag: &str) -> Topology {
        let id = std::process::id();
        let t = Topology {
            node: format!("nldd-node-{tag}-{id}"),
            pod: format!("nldd-pod-{tag}-{id}"),
        };
        run(&["ip", "netns", "add", &t.node]);
        run(&["ip", "netns", "add", &t.pod]);
        let (n, p) = (t.node.as_str(), t.pod.as_str());
        for ns in [n, p] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // pod <-> node veth (created inside the node namespace, one end moved to the pod).
        run(&[
            "ip", "-n", n, "link", "add", "nldd-pod", "type", "veth", "peer", "name", "eth0",
            "netns", p,
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "10.244.1.1/24",
            "dev",
            "nldd-pod",
        ]);
        run(&["ip", "-n", n, "link", "set", "nldd-pod", "up"]);
        run(&["ip", "-n", p, "addr", "add", "10.244.1.2/24", "dev", "eth0"]);
        run(&["ip", "-n", p, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            p,
            "route",
            "add",
            "default",
            "via",
            "10.244.1.1",
        ]);
        // The node's uplink and default route (the node IP is its source).
        run(&[
            "ip", "-n", n, "link", "add", "nldd-up0", "type", "veth", "peer", "name", "nldd-up1",
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "nldd-up0",
        ]);
        run(&["ip", "-n", n, "link", "set", "nldd-up0", "up"]);
        run(&["ip", "-n", n, "link", "set", "nldd-up1", "up"]);
        run(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            "192.168.30.254",
            "dev",
            "nldd-up0",
        ]);
        // The stand-in cluster DNS pod's address.
        run(&["ip", "-n", n, "link", "add", "nldd-cdns", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{CLUSTER_DNS_POD}/32"),
            "dev",
            "nldd-cdns",
        ]);
        run(&["ip", "-n", n, "link", "set", "nldd-cdns", "up"]);
        t
    }

    fn iptables(&self, bin: &str, rule: &str) {
        let mut args = vec!["ip", "netns", "exec", &self.node, bin, "-w", "5"];
        args.extend(rule.split_whitespace());
        run(&args);
    }

    /// kube-proxy's part: DNAT of the ClusterIP to the cluster DNS pod, in its mode.
    fn kube_proxy(&self, mode: KubeProxyMode, dir: &std::path::Path) {
        let bin = match mode {
            KubeProxyMode::Iptables(_) => mode.iptables_bin(),
            KubeProxyMode::Nftables => return self.kube_proxy_nftables(dir),
        };
        for proto in ["udp", "tcp"] {
            for chain in ["PREROUTING", "OUTPUT"] {
                self.iptables(
                    &bin,
                    &format!("-t nat -A {chain} -d {CLUSTER_IP}/32 -p {proto} --dport 53 -j DNAT --to-destination {CLUSTER_DNS_POD}:53"),
                );
            }
        }
    }

    /// kube-proxy's nftables mode in the shape it writes: nat-prerouting and nat-output at
    /// dstnat (-100) jump to `services`, the `service-ips` verdict map picks the service chain,
    /// `numgen random` its endpoint chain, which DNATs.
    fn kube_proxy_nftables(&self, dir: &std::path::Path) {
        let mut rules = vec![
            "table ip kube-proxy {".to_string(),
            "  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }".into(),
            "  chain nat-prerouting { type nat hook prerouting priority -100; jump services; }"
                .into(),
            "  chain nat-output { type nat hook output priority -100; jump services; }".into(),
            "  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }".into(),
        ];
        for proto in ["udp", "tcp"] {
            rules.push(format!(
                "  chain endpoint-{proto} {{ meta l4proto {proto} dnat to {CLUSTER_DNS_POD}:53; }}"
            ));
            rules.push(format!(
                "  chain service-{proto} {{ numgen random mod 1 vmap {{ 0 : goto endpoint-{proto} }}; }}"
            ));
        }
        rules.push("}".into());
        for proto in ["udp", "tcp"] {
            rules.push(format!(
                "add element ip kube-proxy service-ips {{ {CLUSTER_IP} . {proto} . 53 : goto service-{proto} }}"
            ));
        }
        let file = dir.join("kube-proxy.nft");
        std::fs::write(&file, rules.join("\n") + "\n").unwrap();
        run(&[
            "ip",
            "netns",
            "exec",
            &self.node,
            "nft",
            "-f",
            file.to_str().unwrap(),
        ]);
    }

    /// The node-local interface and docs/design-facts.md §1 raw rules, as node setup would make them.
    fn cache_rules(&self, bin: &str) {
        let n = self.node.as_str();
        run(&[
            "ip",
            "-n",
            n,
            "link",
            "add",
            "nodelocaldns",
            "type",
            "bridge",
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{CLUSTER_IP}/32"),
            "dev",
            "nodelocaldns",
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{LOCAL_IP}/32"),
            "dev",
            "nodelocaldns",
        ]);
        run(&["ip", "-n", n, "link", "set", "nodelocaldns", "up"]);
        for proto in ["udp", "tcp"] {
            self.iptables(bin, &format!("-t raw -I PREROUTING 1 -d {CLUSTER_IP}/32 -p {proto} --dport 53 -m socket -j NOTRACK"));
            self.iptables(
                bin,
                &format!("-t raw -A OUTPUT -s {CLUSTER_IP}/32 -p {proto} --sport 53 -j NOTRACK"),
            );
        }
    }

    fn spawn_in_node(&self, cmd: &[&str]) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .args(cmd)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Proc { child }
    }

    /// `dig` from the pod: the A records (or empty on failure).
    fn dig_from_pod(&self, server: &str, name: &str) -> Vec<String> {
        dig_in(&self.pod, server, name)
    }

    /// Runs `f` on a thread inside the node namespace (HTTP to the daemon's loopback).
    fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.node);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

/// `dig` in namespace `ns`: the A records (or empty on failure).
fn dig_in(ns: &str, server: &str, name: &str) -> Vec<String> {
    let out = output(&[
        "ip",
        "netns",
        "exec",
        ns,
        "dig",
        "+short",
        "+time=3",
        "+tries=1",
        &format!("@{server}"),
        name,
        "A",
    ]);
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn knot_in_node(t: &Topology, dir: &std::path::Path) -> Proc {
    // Reuse the common zone/config writer, then start knotd inside the node namespace.
    let addr: SocketAddr = format!("{CLUSTER_DNS_POD}:53").parse().unwrap();
    let conf = write_knot_config(dir, addr);
    t.spawn_in_node(&["knotd", "-c", conf.to_str().unwrap()])
}

const WWW: [&str; 2] = ["192.0.2.10", "192.0.2.11"];

fn scenario(mode: KubeProxyMode, tag: &str, daemon_does_setup: bool) {
    let bin = mode.iptables_bin();
    let dir = tempfile::tempdir().unwrap();
    let t = Topology::new(tag);
    t.kube_proxy(mode, dir.path());
    if !daemon_does_setup {
        t.cache_rules(&bin);
    }
    let mut knot = knot_in_node(&t, dir.path());
    // Before the cache exists, pods reach the cluster DNS through kube-proxy's DNAT.
    wait_until("knotd through DNAT", Duration::from_secs(20), || {
        t.dig_from_pod(CLUSTER_IP, "www.example.test") == WWW
    });

    let lock = dir.path().join("setup.lock");
    let stats = dir.path().join("stats");
    let mut args = vec![
        BIN.to_string(),
        "--cluster-dns".into(),
        CLUSTER_IP.into(),
        "--metrics-listen".into(),
        "127.0.0.1:9253".into(),
        "--health-listen".into(),
        "127.0.0.1:8080".into(),
        "--setup-lock".into(),
        lock.display().to_string(),
        "--stats-dir".into(),
        stats.display().to_string(),
    ];
    if daemon_does_setup {
        // As the DaemonSet runs it (install/configmap.yaml).
        args.extend(["--iptables-backend".into(), mode.setup_backend().into()]);
        args.extend(["--threads".into(), "auto".into()]);
    } else {
        args.push("--no-node-setup".into());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = t.spawn_in_node(&argv);
    wait_until("daemon ready", Duration::from_secs(20), || {
        assert!(daemon.child.try_wait().unwrap().is_none(), "daemon exited");
        t.in_node(|| {
            try_http_get("127.0.0.1:8080".parse().unwrap(), "/ready").is_ok_and(|r| r.0 == 200)
        })
    });

    // Through the cache: the pod asks the ClusterIP and the link-local address.
    assert_eq!(t.dig_from_pod(CLUSTER_IP, "www.example.test"), WWW);
    assert_eq!(
        t.dig_from_pod(LOCAL_IP, "alias.example.test"),
        ["192.0.2.10", "192.0.2.11", "www.example.test."],
        "CNAME and its target via the link-local address"
    );
    let metrics = t.in_node(|| http_get("127.0.0.1:9253".parse().unwrap(), "/metrics").1);
    let server = format!("server=\"dns://{CLUSTER_IP}:53\"");
    let to = format!("to=\"{CLUSTER_IP}:53\"");
    // The daemon saw exactly the pod's one query on the ClusterIP: its own upstream query to
    // the ClusterIP went through the DNAT to knotd instead of looping back into it.
    assert_eq!(
        metric_sum(&metrics, "coredns_dns_requests_total", &[&server]),
        1.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "coredns_forward_responses_total",
            &[&to, "rcode=\"NOERROR\""]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "coredns_dns_responses_total",
            &[&server, "plugin=\"forward\""]
        ) >= 1.0
    );

    // The daemon's upstream query left from the node IP, never from the ClusterIP it listens
    // on (docs/design-facts.md §1: that source is dropped as martian across nodes).
    let flows = output(&[
        "ip",
        "netns",
        "exec",
        &t.node,
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--orig-dst",
        CLUSTER_IP,
    ]);
    assert!(
        flows.contains(&format!("src={NODE_IP} dst={CLUSTER_IP}")),
        "upstream flow from the node IP:\n{flows}"
    );
    assert!(
        !flows.contains(&format!("src={CLUSTER_IP} dst={CLUSTER_IP}")),
        "{flows}"
    );

    if daemon_does_setup {
        let save = output(&[
            "ip",
            "netns",
            "exec",
            &t.node,
            &format!("{bin}-save"),
            "-t",
            "raw",
        ]);
        assert!(
            save.contains("NOTRACK") && save.contains("node-local-dns"),
            "raw rules made by the daemon:\n{save}"
        );
        let addrs = output(&["ip", "-n", &t.node, "addr", "show", "nodelocaldns"]);
        assert!(
            addrs.contains(CLUSTER_IP) && addrs.contains(LOCAL_IP),
            "{addrs}"
        );
    }

    if daemon_does_setup {
        // A pod's query through its veth and the NOTRACK rule is answered by the thread on
        // the CPU the pod sent from.
        let pod = PinnedClient {
            netns: Some(t.pod.clone()),
            bind: "0.0.0.0:0".parse().unwrap(),
            name: "www.example.test",
        };
        let dns: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();
        let prefix = format!("udp-{CLUSTER_IP}");
        assert_each_cpu_answered_by_its_own_thread(daemon.pid(), &prefix, dns, &pod);
    }

    // The cache answers with the cluster DNS gone...
    knot.kill();
    assert_eq!(t.dig_from_pod(CLUSTER_IP, "www.example.test"), WWW);
    // ...and once the cache is gone, pods fall back through the DNAT at once.
    let mut knot = knot_in_node(&t, dir.path());
    wait_until("knotd back", Duration::from_secs(20), || {
        t.dig_from_pod(CLUSTER_DNS_POD, "www.example.test") == WWW
    });
    answers_in_flight_at_sigterm(&t, &knot, &mut daemon);
    assert_eq!(
        t.dig_from_pod(CLUSTER_IP, "www.example.test"),
        WWW,
        "fallback through kube-proxy"
    );
    knot.kill();
}

/// SIGTERM while a pod's query waits for the (paused) cluster DNS: the listener closes at
/// once, and the answer still reaches the pod from ClusterIP:53, sent through the raw socket
/// and kept out of conntrack by the raw OUTPUT rule; the daemon exits 0.
fn answers_in_flight_at_sigterm(t: &Topology, knot: &Proc, daemon: &mut Proc) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let signal = |p: &Proc, s| kill(Pid::from_raw(p.pid()), s).unwrap();
    signal(knot, Signal::SIGSTOP);
    let pod = t.pod.clone();
    let in_flight = std::thread::spawn(move || dig_in(&pod, CLUSTER_IP, "short.example.test"));
    std::thread::sleep(Duration::from_millis(300));
    signal(daemon, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    signal(knot, Signal::SIGCONT);
    assert_eq!(in_flight.join().unwrap(), ["192.0.2.20"]);
    let status = daemon.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn clusterip_cache_forwards_through_dnat_without_loop_iptables_legacy() {
    scenario(KubeProxyMode::Iptables("legacy"), "l", false);
}

#[test]
fn clusterip_cache_forwards_through_dnat_without_loop_iptables_nft() {
    scenario(KubeProxyMode::Iptables("nft"), "n", false);
}

#[test]
fn clusterip_cache_forwards_through_dnat_without_loop_nftables() {
    scenario(KubeProxyMode::Nftables, "k", false);
}

#[test]
fn daemon_node_setup_makes_the_clusterip_path_work_iptables_nft() {
    scenario(KubeProxyMode::Iptables("nft"), "sn", true);
}

#[test]
fn daemon_node_setup_makes_the_clusterip_path_work_iptables_legacy() {
    scenario(KubeProxyMode::Iptables("legacy"), "sl", true);
}

#[test]
fn daemon_node_setup_makes_the_clusterip_path_work_nftables() {
    scenario(KubeProxyMode::Nftables, "sk", true);
}
