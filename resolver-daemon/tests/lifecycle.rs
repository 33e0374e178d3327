//! Start-up errors, metrics and health endpoints, SIGTERM, watchdog probe.
mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

fn answering(n: u8, delay: Duration) -> FakeUpstream {
    let script: Arc<Script> = Arc::new(move |q: &[u8]| {
        vec![
            Step::Sleep(delay),
            Step::Reply(reply_to(q, 0, &[[192, 0, 2, 1]], 300, false)),
        ]
    });
    FakeUpstream::start(sa(n, UP_PORT), script, None)
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = std::process::Command::new(BIN)
        .args([
            "--listen",
            "0.0.0.0:53",
            "--upstream",
            "127.0.30.1",
            "--no-node-setup",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wildcard"), "{err}");
    let out = std::process::Command::new(BIN)
        .env_remove("KUBE_DNS_SVC_IP")
        .env_remove("NODE_LOCAL_DNS_LISTEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no listen address"));
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--upstream-source",
        "NODE_LOCAL_DNS_UPSTREAM_PROTO",
        "--watchdog-timeout",
        "--external-to-resolv-conf",
    ] {
        assert!(help.contains(flag), "help mentions {flag}");
    }
}

#[test]
fn metrics_use_the_coredns_names_and_health_endpoints_answer() {
    let up = answering(51, Duration::ZERO);
    let d = Daemon::start(50, &[up.addr], &[]);
    assert_eq!(http_get(d.http, "/health").0, 200);
    wait_until("ready", Duration::from_secs(10), || {
        http_get(d.http, "/ready").0 == 200
    });
    ask(d.dns, "m.example", 1);
    ask(d.dns, "m.example", 1);
    tcp_ask(d.dns, &query(3, "m.example", 28, None));
    let m = d.metrics();
    let server = "server=\"dns://127.0.30.50:1053\"";
    let to = "to=\"127.0.30.51:2053\"";
    let expect: &[(&str, &[&str])] = &[
        ("coredns_build_info", &[]),
        (
            "coredns_dns_requests_total",
            &[
                server,
                "zone=\".\"",
                "proto=\"udp\"",
                "family=\"1\"",
                "type=\"A\"",
            ],
        ),
        (
            "coredns_dns_requests_total",
            &[server, "proto=\"tcp\"", "type=\"AAAA\""],
        ),
        (
            "coredns_dns_request_duration_seconds_count",
            &[server, "type=\"A\""],
        ),
        (
            "coredns_dns_responses_total",
            &[server, "rcode=\"NOERROR\"", "plugin=\"cache\""],
        ),
        (
            "coredns_dns_responses_total",
            &[server, "rcode=\"NOERROR\"", "plugin=\"forward\""],
        ),
        (
            "coredns_dns_request_size_bytes_count",
            &[server, "proto=\"udp\""],
        ),
        (
            "coredns_dns_response_size_bytes_count",
            &[server, "proto=\"tcp\""],
        ),
        (
            "coredns_cache_hits_total",
            &[server, "type=\"success\"", "zones=\".\""],
        ),
        ("coredns_cache_misses_total", &[server]),
        ("coredns_cache_requests_total", &[server]),
        ("coredns_cache_entries", &["type=\"success\""]),
        ("coredns_forward_requests_total", &[to]),
        (
            "coredns_forward_responses_total",
            &[to, "rcode=\"NOERROR\""],
        ),
        ("coredns_forward_request_duration_seconds_count", &[to]),
        (
            "coredns_proxy_request_duration_seconds_count",
            &["proxy_name=\"forward\"", to, "rcode=\"NOERROR\""],
        ),
        ("node_local_dns_upstream_healthy", &[to]),
    ];
    for (name, labels) in expect {
        assert!(
            metric_sum(&m, name, labels) >= 1.0,
            "{name} {labels:?} in\n{m}"
        );
    }
    for family in [
        "coredns_panics_total",
        "coredns_cache_prefetch_total",
        "coredns_cache_served_stale_total",
        "coredns_cache_evictions_total",
        "coredns_forward_max_concurrent_rejects_total",
        "coredns_forward_healthcheck_broken_total",
        "coredns_forward_healthcheck_failures_total",
        "coredns_proxy_healthcheck_failures_total",
        "coredns_nodecache_setup_errors_total",
        "node_local_dns_coalesced_queries_total",
        "node_local_dns_prefetch_dropped_total",
        "node_local_dns_prefetch_unasked_total",
        "node_local_dns_cni_operations_total",
        "node_local_dns_cni_operation_duration_seconds",
    ] {
        assert!(
            m.contains(&format!("# TYPE {family} ")),
            "family {family} exported"
        );
    }
    // The exposition is valid for Prometheus's own checker.
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus)");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), m.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("error"), "promtool: {text}");
}

/// Cache hits are answered on the UDP threads; misses, prefetches, TCP and metrics on the
/// tokio threads, which run at a lower priority so their bursts never delay a hit.
#[test]
fn tokio_threads_run_below_the_udp_threads() {
    let up = answering(57, Duration::ZERO);
    let d = Daemon::start(58, &[up.addr], &["--workers", "2"]);
    let mut nice_of = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", d.proc.pid())).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        // comm is in parentheses and may hold spaces: fields count from the last ')'.
        let (comm, rest) = stat.rsplit_once(") ").unwrap();
        let comm = comm.split_once('(').unwrap().1;
        let kind = comm.split(['-', ':']).next().unwrap().to_string();
        let nice: i64 = rest.split(' ').nth(16).unwrap().parse().unwrap();
        nice_of.entry(kind).or_default().push(nice);
    }
    assert_eq!(nice_of.get("tokio"), Some(&vec![5, 5]), "{nice_of:?}");
    assert_eq!(nice_of.get("udp"), Some(&vec![0]), "{nice_of:?}");
}

/// A daemon (address `n`) whose upstream (`n + 1`) answers after 800 ms; 5 s grace period.
fn daemon_with_slow_upstream(n: u8) -> (FakeUpstream, Daemon) {
    let up = answering(n + 1, Duration::from_millis(800));
    let d = Daemon::start(
        n,
        &[up.addr],
        &["--grace-period", "5s", "--health-check-interval", "1h"],
    );
    (up, d)
}

/// SIGTERM once `name` reached the upstream; returns when the UDP listener is closed (we can
/// bind its port ourselves).
fn sigterm_with_query_in_flight(d: &Daemon, up: &FakeUpstream, name: &str) {
    wait_until("query upstream", Duration::from_secs(5), || {
        up.count(name) >= 1
    });
    d.sigterm();
    wait_until("udp listener closed", Duration::from_secs(3), || {
        std::net::UdpSocket::bind(d.dns).is_ok()
    });
}

fn assert_exits_zero(d: &mut Daemon) {
    let status = d.proc.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?} signal {:?}",
        status.signal()
    );
}

#[test]
fn sigterm_closes_the_listener_drains_tcp_and_exits_zero() {
    let (up, mut d) = daemon_with_slow_upstream(52);
    let dns = d.dns;
    let in_flight =
        std::thread::spawn(move || tcp_ask(dns, &query(99, "draining.example", 1, None)));
    // The UDP port is released at once, while the TCP query drains.
    sigterm_with_query_in_flight(&d, &up, "draining.example");
    let reply = in_flight.join().unwrap();
    assert_eq!(
        (id_of(&reply), answers(&reply)),
        (99, vec!["192.0.2.1".to_string()])
    );
    assert_exits_zero(&mut d);
}

/// A UDP query forwarded just before SIGTERM is still answered although the listener closed
/// meanwhile: the answer leaves through a raw socket with the listener's address and port,
/// so the client's connected socket accepts it (needs CAP_NET_RAW: root, as in CI).
#[test]
fn udp_queries_in_flight_at_sigterm_are_still_answered() {
    let (up, mut d) = daemon_with_slow_upstream(74);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(d.dns).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    client
        .send(&query(77, "in-flight.example", 1, None))
        .unwrap();
    sigterm_with_query_in_flight(&d, &up, "in-flight.example");
    let mut buf = [0u8; 512];
    let n = client
        .recv(&mut buf)
        .expect("the answer arrives after the listener closed");
    assert_eq!(
        (id_of(&buf[..n]), answers(&buf[..n])),
        (77, vec!["192.0.2.1".to_string()])
    );
    assert_exits_zero(&mut d);
}

#[test]
fn the_watchdog_probe_sees_a_live_daemon_and_a_dead_socket() {
    let up = answering(55, Duration::ZERO);
    let d = Daemon::start(54, &[up.addr], &[]);
    assert!(resolver::watchdog::probe(d.dns, Duration::from_secs(1)));
    // A bound socket nobody reads: the probe fails.
    let silent = std::net::UdpSocket::bind(sa(56, DNS_PORT)).unwrap();
    assert!(!resolver::watchdog::probe(
        silent.local_addr().unwrap(),
        Duration::from_millis(300)
    ));
}

#[test]
fn the_watchdog_exits_when_its_listener_cannot_be_reached() {
    // A private network namespace whose loopback is down: every socket binds (IP_FREEBIND)
    // but nothing can reach the listener, so every self-probe fails.
    let out = std::process::Command::new("unshare")
        .args([
            "--net",
            BIN,
            "--listen",
            "127.0.30.57:1053",
            "--upstream",
            "127.0.30.59:2053",
            "--no-node-setup",
        ])
        .args([
            "--metrics-listen",
            "127.0.30.58:18080",
            "--health-listen",
            "127.0.30.58:18080",
            "--watchdog-timeout",
            "1s",
        ])
        .output()
        .expect("unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "non-zero exit: {:?}\n{err}",
        out.status
    );
    assert!(
        err.contains("watchdog"),
        "exited because of the watchdog:\n{err}"
    );
}

#[test]
fn tcp_connections_past_the_cap_are_closed() {
    let up = answering(71, Duration::ZERO);
    let d = Daemon::start(70, &[up.addr], &["--tcp-max-connections", "1"]);
    let mut first = std::net::TcpStream::connect(d.dns).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tcp_write(&mut first, &query(1, "cap.example", 1, None));
    assert_eq!(
        id_of(&tcp_read(&mut first).unwrap()),
        1,
        "first connection served"
    );
    let mut second = std::net::TcpStream::connect(d.dns).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tcp_write(&mut second, &query(2, "cap.example", 1, None));
    assert!(
        tcp_read(&mut second).is_none(),
        "second connection closed without an answer"
    );
    drop(first);
    // The slot is free again once the first connection is gone.
    wait_until("slot freed", Duration::from_secs(5), || {
        let mut c = std::net::TcpStream::connect(d.dns).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        tcp_write(&mut c, &query(3, "cap.example", 1, None));
        tcp_read(&mut c).is_some_and(|r| id_of(&r) == 3)
    });
}

#[test]
fn idle_receive_threads_of_every_listener_keep_the_watchdog_satisfied() {
    // The second listener stands for the ClusterIP one: `--cluster-dns` keeps the self-probe
    // off it, so only its threads' loop counts vouch for it. With nothing to do, every thread
    // still goes round its loop once per receive timeout: idle must not look stuck.
    let up = answering(85, Duration::ZERO);
    let cluster_ip = sa(86, DNS_PORT);
    let listen = cluster_ip.to_string();
    let ip = cluster_ip.ip().to_string();
    let mut d = Daemon::start(
        84,
        &[up.addr],
        &[
            "--listen",
            &listen,
            "--cluster-dns",
            &ip,
            "--threads",
            "2",
            "--watchdog-timeout",
            "1s",
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        d.proc.child.try_wait().unwrap().is_none(),
        "the watchdog ended an idle daemon"
    );
    for addr in [d.dns, cluster_ip] {
        let sock = std::net::UdpSocket::bind(sa(87, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(&query(9, "idle.example", 1, None), addr)
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(id_of(&buf[..n]), 9, "{addr} answers");
    }
    d.sigterm();
    assert_exits_zero(&mut d);
}

/// `se.slice` of each thread of `pid` whose name starts with `prefix`, from /proc.
fn thread_slices(pid: i32, prefix: &str) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for (comm, dir) in threads_of(pid, prefix) {
        let sched = std::fs::read_to_string(dir.join("sched")).unwrap_or_default();
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok());
        out.push((comm, slice));
    }
    out
}

#[test]
fn udp_threads_run_with_the_slice_they_were_given() {
    let up = answering(89, Duration::ZERO);
    let d = Daemon::start(88, &[up.addr], &["--threads", "2", "--udp-slice", "250us"]);
    let main_slice = thread_slices(d.proc.pid(), "node-local-dns")
        .first()
        .and_then(|(_, s)| *s);
    let Some(main_slice) = main_slice else {
        eprintln!("no se.slice in /proc/PID/sched on this kernel; nothing to check");
        return;
    };
    let udp = thread_slices(d.proc.pid(), "udp-");
    assert_eq!(udp.len(), 2, "{udp:?}");
    for (name, slice) in &udp {
        assert_eq!(*slice, Some(250_000), "{name}");
    }
    assert_ne!(
        main_slice, 250_000,
        "only the UDP threads change their slice"
    );
    d.sigterm();
}

#[test]
fn per_cpu_threads_answer_queries_on_the_cpu_that_sent_them() {
    let up = answering(91, Duration::ZERO);
    let d = Daemon::start(90, &[up.addr], &["--threads", "auto"]);
    let client = PinnedClient {
        netns: None,
        bind: sa(92, 0),
        name: "local.example",
    };
    assert_each_cpu_answered_by_its_own_thread(d.proc.pid(), "udp-", d.dns, &client);
    d.sigterm();
}
