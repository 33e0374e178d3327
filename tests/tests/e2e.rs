//! The end-to-end tests on the simulated node: podman pods (bridge conflist with our entry
//! chained by node-local-dns-install), the daemon as its DaemonSet runs it, two knotd cluster
//! DNS pods behind kube-proxy's DNAT. Every test runs once per kube-proxy mode: iptables through
//! iptables-legacy (`legacy::*`), iptables through iptables-nft (`nft::*`), and nftables
//! (`nftables::*`).
//! They are serialised: the load tests need the two cores to themselves to keep ≥ 500 q/s.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simnode::dns::{
    Answer, LoadReport, LoadSpec, PortMode, QueryError, TYPE_A, TYPE_AAAA, query_udp, spawn_load,
};
use simnode::netns::in_netns;
use simnode::{KubeProxyMode, Pod, SimNode, SimOptions};

static HEAVY: Mutex<()> = Mutex::new(());

const WEB: &str = "web.default.svc.cluster.local";
const DB: &str = "db.prod.svc.cluster.local";
const API: &str = "api.prod.svc.cluster.local";
const WWW: &str = "www.example.com";

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cluster_dns() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], 53))
}

/// A node with the plugin installed, the daemon running and one pod in `default`.
fn node_with_daemon(mode: KubeProxyMode, daemon_args: &[&str]) -> (SimNode, Pod) {
    let mut sim = SimNode::new(SimOptions::new(mode)).expect("simulated node");
    let mut opts = sim.daemon_options();
    opts.extra_args = daemon_args.iter().map(|s| s.to_string()).collect();
    sim.start_daemon(opts).expect("daemon starts");
    let pod = sim.run_pod("default").expect("pod starts");
    (sim, pod)
}

fn query(
    pod: &Pod,
    server: SocketAddr,
    name: &'static str,
    qtype: u16,
) -> Result<Answer, QueryError> {
    in_netns(&pod.netns(), move || {
        query_udp(server, name, qtype, Duration::from_secs(4))
    })
    .expect("enter pod netns")
}

fn load(server: SocketAddr, name: &str, expect: &str, secs: u64, ports: PortMode) -> LoadSpec {
    LoadSpec {
        server,
        name: name.to_string(),
        expect: ip(expect),
        rate: 500,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(1),
        workers: 4,
        ports,
    }
}

fn describe(r: &LoadReport) -> String {
    format!(
        "sent {} at {:.0} q/s, answered {}, timeouts {}, refused {}, wrong {}; failures {:?}",
        r.sent,
        r.rate(),
        r.answered,
        r.timeouts,
        r.refused,
        r.wrong,
        r.failures.iter().take(10).collect::<Vec<_>>()
    )
}

/// `getent hosts web` (AAAA first, as gethostbyname does) and `getent ahostsv4 web`: the
/// short name reaches the Service through the pod's search path.
fn glibc_resolves_web(pod: &Pod) {
    let hosts = pod
        .exec_host_tool(&["getent", "hosts", "web"])
        .expect("getent hosts web");
    assert!(
        hosts.contains("fd00:100::1") && hosts.contains(WEB),
        "{hosts}"
    );
    let v4 = pod
        .exec_host_tool(&["getent", "ahostsv4", "web"])
        .expect("getent ahostsv4 web");
    assert!(v4.contains("10.100.0.1"), "{v4}");
}

/// Test 1: glibc (search path) and dig lookups are answered by the cache: the cache
/// metrics move and the cluster DNS pods see only the first miss.
fn lookups_served_by_cache(mode: KubeProxyMode) {
    let _g = lock();
    let (mut sim, pod) = node_with_daemon(mode, &[]);
    sim.node.count_name(WEB).unwrap();
    sim.node.count_name(WWW).unwrap();
    // Warm the cache: the short name goes through the search path (ndots:5) to the Service.
    glibc_resolves_web(&pod);
    let ext = pod
        .exec_host_tool(&["dig", "+short", "+tries=1", "+time=3", WWW])
        .expect("dig");
    assert_eq!(ext.trim(), "192.0.2.1");
    let misses_web = sim.node.upstream_queries_for(WEB).unwrap();
    let misses_www = sim.node.upstream_queries_for(WWW).unwrap();
    assert!(
        misses_web >= 1 && misses_www >= 1,
        "first lookups were misses forwarded upstream"
    );
    let before = sim.daemon().unwrap().metrics().expect("metrics");

    for _ in 0..10 {
        glibc_resolves_web(&pod);
        let out = pod
            .exec_host_tool(&["dig", "+short", "+tries=1", "+time=3", WWW])
            .expect("dig");
        assert_eq!(out.trim(), "192.0.2.1");
    }
    let after = sim.daemon().unwrap().metrics().expect("metrics");
    assert_eq!(
        sim.node.upstream_queries_for(WEB).unwrap(),
        misses_web,
        "cached name never reached cluster DNS again"
    );
    assert_eq!(
        sim.node.upstream_queries_for(WWW).unwrap(),
        misses_www,
        "cached external name never reached cluster DNS again"
    );
    let hits =
        after.sum("coredns_cache_hits_total", &[]) - before.sum("coredns_cache_hits_total", &[]);
    assert!(hits >= 20.0, "cache hits moved by {hits}");
    let reqs = after.sum("coredns_dns_requests_total", &["dns://10.96.0.10:53"])
        - before.sum("coredns_dns_requests_total", &["dns://10.96.0.10:53"]);
    assert!(
        reqs >= 20.0,
        "requests on the ClusterIP listener moved by {reqs}"
    );
    // The plugin's ADD (run by podman on this node) shows in the daemon's metrics: both read
    // and write the node's /run/node-local-dns.
    let adds = after.sum("node_local_dns_cni_operations_total", &["command=\"ADD\""]);
    assert!(adds >= 1.0, "the pod's CNI ADD counted: {adds}");
    // Served locally means untracked: no conntrack entry for the pod's queries to the ClusterIP.
    let pod_ip = pod
        .ips()
        .unwrap()
        .into_iter()
        .find(IpAddr::is_ipv4)
        .unwrap();
    let tracked = sim.node.conntrack_dns(pod_ip, ip("10.96.0.10")).unwrap();
    assert!(
        tracked.is_empty(),
        "pod queries were NOTRACKed: {tracked:#?}"
    );
}

/// How far from the kill a query may be sent and still be the one in flight at it.
const LOST_QUERY_SLACK: Duration = Duration::from_millis(50);

/// Tests 2 and 3: kill -9 the daemon under ≥ 500 q/s: every later query is answered through
/// kube-proxy's DNAT (only queries in flight while it died are lost); restart it: queries go
/// local again, also for clients that keep reusing one source port (no conntrack entry pins
/// them to the DNAT path).
fn kill_and_restart_under_load(mode: KubeProxyMode, ports: PortMode) {
    let _g = lock();
    let (mut sim, pod) = node_with_daemon(mode, &[]);
    sim.node.count_name(DB).unwrap();
    query(&pod, cluster_dns(), DB, TYPE_A).expect("warm");

    let started = Instant::now();
    let run = spawn_load(pod.netns(), load(cluster_dns(), DB, "10.100.0.2", 4, ports));
    std::thread::sleep(Duration::from_millis(1500));
    let before_kill = sim.node.upstream_queries_for(DB).unwrap();
    let kill_sent_at = started.elapsed();
    sim.daemon().unwrap().kill9();
    let killed_at = started.elapsed();
    let report = run.join().unwrap().expect("load ran");
    let via_dnat = sim.node.upstream_queries_for(DB).unwrap() - before_kill;
    eprintln!(
        "[{}] kill -9 under load ({ports:?}): SIGKILL at {kill_sent_at:?}, reaped at {killed_at:?}; {}; {via_dnat} queries reached cluster DNS after the kill",
        mode.name(),
        describe(&report)
    );
    assert!(
        report.sent >= 500 * 4,
        "load generator kept ≥ 500 q/s: {}",
        describe(&report)
    );
    // docs/design-facts.md §1: the query in the socket's queue at the kill can be lost (a timeout),
    // and so can one sent while the process was exiting that passed the `-m socket` rule just
    // before the socket closed (an ICMP refusal): at most one per query sent while it died,
    // plus the queued one. Only at the kill: losses later would mean conntrack entries pinning
    // clients to the dead socket.
    let dying = killed_at.saturating_sub(kill_sent_at);
    let may_lose = 1 + (dying.as_secs_f64() * report.rate()).ceil() as u64;
    assert!(
        report.timeouts + report.refused <= may_lose,
        "at most {may_lose} queries lost (the exit took {dying:?}): {}",
        describe(&report)
    );
    assert_eq!(report.wrong, 0, "{}", describe(&report));
    let kill_window = kill_sent_at.saturating_sub(LOST_QUERY_SLACK)..killed_at + LOST_QUERY_SLACK;
    assert!(
        report.failures.iter().all(|f| kill_window.contains(&f.at)),
        "the lost query was sent at the kill ({kill_window:?}): {}",
        describe(&report)
    );
    let pod_ip = pod
        .ips()
        .unwrap()
        .into_iter()
        .find(IpAddr::is_ipv4)
        .unwrap();
    let tracked = sim.node.conntrack_dns(pod_ip, ip("10.96.0.10")).unwrap();
    assert!(
        !tracked.is_empty(),
        "the fallback path is conntracked (DNAT entries exist)"
    );
    assert!(
        via_dnat >= 500,
        "after the kill the queries went through kube-proxy's DNAT: {via_dnat}"
    );

    // Restart while the load keeps the same kind of client busy on the fallback path.
    let started = Instant::now();
    let run = spawn_load(pod.netns(), load(cluster_dns(), DB, "10.100.0.2", 4, ports));
    std::thread::sleep(Duration::from_millis(1000));
    let opts = sim.daemon_options();
    sim.start_daemon(opts).expect("daemon restarts");
    let restarted_at = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let settled = sim.node.upstream_queries_for(DB).unwrap();
    let report = run.join().unwrap().expect("load ran");
    let upstream_after = sim.node.upstream_queries_for(DB).unwrap() - settled;
    eprintln!(
        "[{}] restart under load ({ports:?}): ready at {restarted_at:?}; {}; {upstream_after} queries reached cluster DNS once the daemon was back",
        mode.name(),
        describe(&report)
    );
    assert_eq!(
        report.failed(),
        0,
        "no query lost across the restart: {}",
        describe(&report)
    );
    assert!(
        upstream_after <= 2,
        "queries went local again (at most a refresh upstream), {upstream_after} went to cluster DNS"
    );
    let served = sim
        .daemon()
        .unwrap()
        .metrics()
        .unwrap()
        .sum("coredns_dns_requests_total", &[]);
    assert!(
        served >= 500.0,
        "the new daemon served the pod's queries: {served}"
    );
}

/// Test 4: a rolling restart as the DaemonSet does it (new instance started, old one sent
/// SIGTERM): lost queries at ≥ 500 q/s are counted and reported.
fn rolling_restart_under_load(mode: KubeProxyMode) {
    let _g = lock();
    let (mut sim, pod) = node_with_daemon(mode, &[]);
    query(&pod, cluster_dns(), API, TYPE_A).expect("warm");
    let run = spawn_load(
        pod.netns(),
        load(cluster_dns(), API, "10.100.0.3", 5, PortMode::Fresh),
    );
    std::thread::sleep(Duration::from_millis(1000));
    let opts = sim.daemon_options();
    sim.start_daemon(opts)
        .expect("new instance starts beside the old one");
    std::thread::sleep(Duration::from_millis(1000));
    let code = sim.daemons[0]
        .terminate(Duration::from_secs(10))
        .expect("old instance exits on SIGTERM");
    let report = run.join().unwrap().expect("load ran");
    eprintln!(
        "[{}] rolling restart: old instance exit code {code:?}; {}",
        mode.name(),
        describe(&report)
    );
    assert_eq!(code, Some(0), "SIGTERM is a clean exit");
    assert!(report.sent >= 500 * 5, "{}", describe(&report));
    assert!(
        report.failed() <= 1,
        "lost at most one query over the rolling restart: {}\nnew instance:\n{}",
        describe(&report),
        sim.daemons[1].log_text()
    );
    let logs = format!(
        "old:\n{}\nnew:\n{}",
        sim.daemons[0].log_text(),
        sim.daemons[1].log_text()
    );
    assert!(
        sim.daemons[1].is_running(),
        "the new instance keeps running\n{logs}"
    );
}

/// Test 4, the manifest's default strategy (maxUnavailable 1, no surge): the old instance
/// gets SIGTERM first, the new one starts after it exited; queries in between fall back.
fn replace_restart_under_load(mode: KubeProxyMode) {
    let _g = lock();
    let (mut sim, pod) = node_with_daemon(mode, &[]);
    query(&pod, cluster_dns(), API, TYPE_A).expect("warm");
    let run = spawn_load(
        pod.netns(),
        load(cluster_dns(), API, "10.100.0.3", 4, PortMode::Fresh),
    );
    std::thread::sleep(Duration::from_millis(1000));
    let code = sim.daemons[0]
        .terminate(Duration::from_secs(10))
        .expect("old instance exits on SIGTERM");
    let opts = sim.daemon_options();
    sim.start_daemon(opts).expect("new instance starts");
    let report = run.join().unwrap().expect("load ran");
    eprintln!(
        "[{}] stop-then-start restart: old exit {code:?}; {}",
        mode.name(),
        describe(&report)
    );
    assert_eq!(code, Some(0), "SIGTERM is a clean exit");
    assert!(report.sent >= 500 * 4, "{}", describe(&report));
    assert!(
        report.failed() <= 1,
        "lost at most one query: {}",
        describe(&report)
    );
}

/// Test 5: the raw table is flushed: the daemon's sync restores the rules within its sync
/// interval; with the daemon gone, the next pod ADD restores them.
fn raw_table_flush_restored(mode: KubeProxyMode) {
    let _g = lock();
    let (mut sim, _pod) = node_with_daemon(mode, &[]);
    assert_eq!(sim.node.our_raw_rules(false).unwrap().len(), 4);
    sim.node.flush_raw(false).unwrap();
    assert!(
        sim.node.our_raw_rules(false).unwrap().is_empty(),
        "flush removed them"
    );
    let interval = Duration::from_secs(sim.daemon().unwrap().opts.sync_interval_secs as u64);
    let deadline = Instant::now() + interval * 2 + Duration::from_secs(2);
    while sim.node.our_raw_rules(false).unwrap().len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        sim.node.our_raw_rules(false).unwrap().len(),
        4,
        "daemon's sync restored the rules"
    );

    sim.daemon().unwrap().kill9();
    sim.node.flush_raw(false).unwrap();
    let pod2 = sim.run_pod("prod").expect("pod starts");
    assert_eq!(
        sim.node.our_raw_rules(false).unwrap().len(),
        4,
        "the pod ADD restored the rules"
    );
    let a = query(&pod2, cluster_dns(), DB, TYPE_A).expect("pod resolves through DNAT");
    assert_eq!(a.addrs, vec![ip("10.100.0.2")]);
}

/// Test 6: with the daemon down, a host process on 0.0.0.0:53 (dnsmasq in its default
/// wildcard mode, answering everything with 6.6.6.6) does not capture pod DNS.
fn wildcard_listener_does_not_capture(mode: KubeProxyMode) {
    let report = pod_dns_with_wildcard_listener(mode, "safe");
    assert_eq!(
        report.failed(),
        0,
        "every pod query answered by cluster DNS, none by dnsmasq: {}",
        describe(&report)
    );
    assert!(report.answered >= 400);
}

/// The control for test 6: the Deckhouse module's `--nowildcard` rule lets the same dnsmasq
/// capture pod DNS (docs/design-facts.md §1), so the test above can tell the two apart.
fn nowildcard_rule_is_captured(mode: KubeProxyMode) {
    let report = pod_dns_with_wildcard_listener(mode, "nowildcard");
    eprintln!(
        "[{}] --nowildcard with dnsmasq on 0.0.0.0:53: {}",
        mode.name(),
        describe(&report)
    );
    assert!(
        report.failed() > 0 && report.answered == 0,
        "captured: {}",
        describe(&report)
    );
}

/// Kills the daemon, starts dnsmasq on 0.0.0.0:53 in the node netns (answering 6.6.6.6 for
/// everything) and sends one second of pod queries to the ClusterIP.
fn pod_dns_with_wildcard_listener(mode: KubeProxyMode, socket_match: &str) -> LoadReport {
    let _g = lock();
    let mut opts = SimOptions::new(mode);
    opts.install = false;
    let mut sim = SimNode::new(opts).expect("simulated node");
    // One setting for both containers, as the ConfigMap gives it: the installer writes it
    // into the plugin's entry, the resolver reads it itself.
    simnode::install::install(
        &sim.fs,
        &sim.cluster_dns(),
        &["--socket-match", socket_match],
    )
    .expect("installer");
    let mut dopts = sim.daemon_options();
    dopts.extra_args = vec!["--socket-match".into(), socket_match.into()];
    let sync = Duration::from_secs(dopts.sync_interval_secs.into());
    sim.start_daemon(dopts).expect("daemon");
    let pod = sim.run_pod("default").expect("pod");
    // Right after the plugin's ADD, and again after a resolver sync: a plugin and resolver
    // that disagreed would each replace the other's rules.
    let after_add = sim.node.our_raw_rules(false).unwrap();
    assert_eq!(
        after_add
            .iter()
            .filter(|r| r.contains("--nowildcard"))
            .count(),
        if socket_match == "nowildcard" { 2 } else { 0 },
        "{after_add:#?}"
    );
    std::thread::sleep(sync + Duration::from_millis(500));
    assert_eq!(sim.node.our_raw_rules(false).unwrap(), after_add);
    sim.daemon().unwrap().kill9();
    let dnsmasq = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            sim.node.ns.name(),
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
        ])
        .args([
            "--no-resolv",
            "--no-hosts",
            "--address=/#/6.6.6.6",
            "--pid-file=",
            "--user=root",
            "--port=53",
        ])
        .spawn()
        .map(simnode::cmd::KillOnDrop)
        .expect("dnsmasq");
    // dnsmasq answers on the node's own addresses: prove it is listening before relying on it.
    let node_ip = SocketAddr::from(([192, 168, 200, 2], 53));
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = loop {
        let r = in_netns(&sim.node.path(), move || {
            query_udp(node_ip, WEB, TYPE_A, Duration::from_millis(300))
        })
        .unwrap();
        if r.is_ok() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let report = in_netns(&pod.netns(), || {
        simnode::dns::run_load(&load(cluster_dns(), WEB, "10.100.0.1", 1, PortMode::Fresh))
    })
    .unwrap();
    drop(dnsmasq);
    assert_eq!(
        probe.map(|a| a.addrs),
        Ok(vec![ip("6.6.6.6")]),
        "dnsmasq listens on 0.0.0.0:53"
    );
    report
}

/// Test 7: cluster DNS pods stopped: cached names keep resolving (served stale once expired),
/// uncached names fail fast with SERVFAIL instead of hanging the client.
fn cluster_dns_down_serves_stale(mode: KubeProxyMode, blackhole: bool) {
    let _g = lock();
    let (mut sim, pod) = node_with_daemon(mode, &["--cache-success-max-ttl", "5s"]);
    let first = query(&pod, cluster_dns(), WEB, TYPE_A).expect("warm");
    assert_eq!(first.addrs, vec![ip("10.100.0.1")]);
    if blackhole {
        sim.node.set_cluster_dns_blackhole(true).unwrap();
    } else {
        sim.node.set_cluster_dns_running(false).unwrap();
    }
    let cached = query(&pod, cluster_dns(), WEB, TYPE_A).expect("cached answer");
    assert_eq!(cached.addrs, vec![ip("10.100.0.1")]);
    // Past the 5 s max TTL the entry is expired: it must now be served stale.
    std::thread::sleep(Duration::from_secs(6));
    let stale = query(&pod, cluster_dns(), WEB, TYPE_A).expect("stale answer");
    assert_eq!((stale.rcode, stale.addrs), (0, vec![ip("10.100.0.1")]));
    let asked = Instant::now();
    let uncached =
        query(&pod, cluster_dns(), API, TYPE_A).expect("an answer, not a client timeout");
    eprintln!(
        "[{}] cluster DNS down (blackhole {blackhole}): uncached name answered rcode {} after {:?} (client timeout 4 s)",
        mode.name(),
        uncached.rcode,
        asked.elapsed()
    );
    assert_eq!(uncached.rcode, 2, "uncached name → SERVFAIL");
    let m = sim.daemon().unwrap().metrics().unwrap();
    assert!(
        m.sum("coredns_cache_served_stale_total", &[]) >= 1.0,
        "stale answers counted"
    );
    sim.node.set_cluster_dns_running(true).unwrap();
}

/// Test 8: dual-stack: the IPv6 ClusterIP is served by the cache the same way and falls
/// back through ip6tables DNAT when the daemon dies.
fn dual_stack(mode: KubeProxyMode) {
    let _g = lock();
    let mut opts = SimOptions::new(mode);
    opts.dual_stack = true;
    let mut sim = SimNode::new(opts).expect("dual-stack node");
    let dopts = sim.daemon_options();
    sim.start_daemon(dopts).expect("daemon");
    let pod = sim.run_pod("default").expect("pod");
    assert!(
        pod.ips().unwrap().iter().any(IpAddr::is_ipv6),
        "pod has an IPv6 address"
    );
    assert_eq!(
        sim.node.our_raw_rules(true).unwrap().len(),
        4,
        "ip6tables raw rules"
    );
    assert!(
        sim.nodelocaldns_addrs()
            .contains(&"fd00::a/128".to_string())
    );
    sim.node.count_name(WEB).unwrap();
    let v6 = SocketAddr::new(ip("fd00::a"), 53);
    let a = query(&pod, v6, WEB, TYPE_AAAA).expect("AAAA over IPv6");
    assert_eq!(a.addrs, vec![ip("fd00:100::1")]);
    let misses = sim.node.upstream_queries_for(WEB).unwrap();
    for _ in 0..20 {
        assert_eq!(
            query(&pod, v6, WEB, TYPE_A).expect("A over IPv6").addrs,
            vec![ip("10.100.0.1")]
        );
    }
    assert!(
        sim.node.upstream_queries_for(WEB).unwrap() <= misses + 1,
        "IPv6 queries served from the cache"
    );
    let m = sim.daemon().unwrap().metrics().unwrap();
    assert!(
        m.sum("coredns_dns_requests_total", &["dns://[fd00::a]:53"]) >= 20.0,
        "IPv6 listener counted"
    );
    // glibc in a pod whose resolv.conf names the IPv6 ClusterIP, through the search path.
    let pod6 = sim
        .run_pod_with_nameserver("default", ip("fd00::a"))
        .expect("pod with IPv6 nameserver");
    assert!(pod6.resolv_conf().unwrap().contains("nameserver fd00::a"));
    let out = pod6
        .exec_host_tool(&["getent", "hosts", "web"])
        .expect("getent over IPv6");
    assert!(out.contains("fd00:100::1"), "{out}");
    let v6_requests = |sim: &mut SimNode| {
        let m = sim.daemon().unwrap().metrics().unwrap();
        m.sum("coredns_dns_requests_total", &["dns://[fd00::a]:53"])
    };
    let before = v6_requests(&mut sim);
    pod6.exec_host_tool(&["getent", "hosts", "web"])
        .expect("getent over IPv6");
    assert!(
        v6_requests(&mut sim) > before,
        "glibc's query reached the IPv6 listener"
    );
    sim.daemon().unwrap().kill9();
    let fallback = query(&pod, v6, DB, TYPE_A).expect("IPv6 fallback through DNAT");
    assert_eq!(fallback.addrs, vec![ip("10.100.0.2")]);
}

/// Test 9: uninstall removes our entry (then the binary); pods still start and resolve via
/// kube-proxy's DNAT.
fn uninstall_keeps_pods_working(mode: KubeProxyMode) {
    let _g = lock();
    let (mut sim, _pod) = node_with_daemon(mode, &[]);
    let types = |sim: &SimNode| -> Vec<String> {
        sim.conflist().unwrap()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(
        types(&sim).last().map(String::as_str),
        Some("node-local-dns"),
        "installed"
    );
    simnode::install::uninstall(&sim.fs).expect("uninstall");
    assert_eq!(
        types(&sim),
        vec!["bridge", "portmap"],
        "our entry removed, the rest kept in order"
    );
    let bins = sim
        .fs
        .in_mount_ns(&["ls", simnode::runtime::CNI_BIN_DIR])
        .unwrap();
    assert!(
        !bins.lines().any(|l| l == "node-local-dns"),
        "binary removed: {bins}"
    );
    sim.daemon()
        .unwrap()
        .terminate(Duration::from_secs(10))
        .expect("daemon stops");
    let pod = sim.run_pod("prod").expect("pods still start");
    let a = query(&pod, cluster_dns(), DB, TYPE_A).expect("and resolve via DNAT");
    assert_eq!(a.addrs, vec![ip("10.100.0.2")]);
    let out = pod
        .exec_host_tool(&["getent", "ahostsv4", "api"])
        .expect("getent api");
    assert!(out.contains("10.100.0.3"), "{out}");
}

macro_rules! every_mode {
    ($($name:ident => $body:expr;)*) => {
        mod legacy {
            use super::*;
            $(#[test] fn $name() { let f: fn(KubeProxyMode) = $body; f(KubeProxyMode::IptablesLegacy) })*
        }
        mod nft {
            use super::*;
            $(#[test] fn $name() { let f: fn(KubeProxyMode) = $body; f(KubeProxyMode::IptablesNft) })*
        }
        mod nftables {
            use super::*;
            $(#[test] fn $name() { let f: fn(KubeProxyMode) = $body; f(KubeProxyMode::Nftables) })*
        }
    };
}

every_mode! {
    t1_lookups_served_by_cache => lookups_served_by_cache;
    t2_t3_kill9_and_restart_fresh_ports => |b| kill_and_restart_under_load(b, PortMode::Fresh);
    t3_restart_with_reused_source_ports => |b| kill_and_restart_under_load(b, PortMode::Reused);
    t4_rolling_restart_surge => rolling_restart_under_load;
    t4_rolling_restart_stop_then_start => replace_restart_under_load;
    t5_raw_flush_restored => raw_table_flush_restored;
    t6_wildcard_listener_does_not_capture => wildcard_listener_does_not_capture;
    t6_control_nowildcard_rule_is_captured => nowildcard_rule_is_captured;
    t7_cluster_dns_stopped_serves_stale => |b| cluster_dns_down_serves_stale(b, false);
    t7_cluster_dns_blackholed_serves_stale => |b| cluster_dns_down_serves_stale(b, true);
    t8_dual_stack => dual_stack;
    t9_uninstall_keeps_pods_working => uninstall_keeps_pods_working;
}
