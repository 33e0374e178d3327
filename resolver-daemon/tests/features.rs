//! Prefetch, routing of external names to resolv.conf servers, IPv6 listeners, JSON logs.
mod common;
use common::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const A: u16 = 1;

fn answering(addr: SocketAddr, ip: [u8; 4]) -> FakeUpstream {
    let script: Arc<Script> =
        Arc::new(move |q: &[u8]| vec![Step::Reply(reply_to(q, 0, &[ip], 300, false))]);
    FakeUpstream::start(addr, script, None)
}

/// A daemon whose entries live 3 s and become popular after 3 hits, refreshed on the hit
/// path alone (`--prefetch-unasked 0`: the idle sweep, tested on its own, could claim them
/// first), with its prefetch point in the last `percent` of the TTL.
fn hit_path_prefetch_daemon(n: u8, up: &FakeUpstream, percent: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--cache-success-min-ttl",
        "3s",
        "--cache-success-max-ttl",
        "3s",
        "--prefetch-hits",
        "3",
        "--prefetch-percent",
        percent,
        "--prefetch-unasked",
        "0",
    ];
    args.extend_from_slice(extra);
    Daemon::start(n, &[up.addr], &args)
}

#[test]
fn popular_entries_are_prefetched_before_they_expire() {
    let up = answering(sa(61, UP_PORT), [192, 0, 2, 61]);
    let d = hit_path_prefetch_daemon(60, &up, "50", &[]);
    for _ in 0..5 {
        assert_eq!(answers(&ask(d.dns, "hot.example", A)), vec!["192.0.2.61"]);
    }
    assert_eq!(up.count("hot.example"), 1);
    // 0.6 s (20 %) of the 3 s TTL left: below every entry's prefetch point, which is random
    // within the first half of the last 50 % (25–50 % left).
    std::thread::sleep(Duration::from_millis(2400));
    // Still answered from the cache; the refresh happens in the background.
    assert_eq!(answers(&ask(d.dns, "hot.example", A)), vec!["192.0.2.61"]);
    wait_until("prefetch upstream query", Duration::from_secs(5), || {
        up.count("hot.example") == 2
    });
    assert!(metric_sum(&d.metrics(), "coredns_cache_prefetch_total", &[]) >= 1.0);
}

/// A cohort of popular entries due together: refreshes start at most --prefetch-rate per
/// second, a queue of at most 64 (one second of the rate, at least 64) holds the rest, and
/// what does not fit is dropped and counted, never lost silently.
#[test]
fn background_refreshes_start_no_faster_than_the_prefetch_rate() {
    const NAMES: usize = 100;
    const RATE: u32 = 20;
    let up = answering(sa(77, UP_PORT), [192, 0, 2, 77]);
    let rate = RATE.to_string();
    let d = hit_path_prefetch_daemon(76, &up, "80", &["--prefetch-rate", &rate]);
    let names: Vec<String> = (0..NAMES).map(|i| format!("c{i}.example")).collect();
    for n in &names {
        for _ in 0..4 {
            assert_eq!(answers(&ask(d.dns, n, A)), vec!["192.0.2.77"]);
        }
    }
    // 1 s (33 %) left: past every entry's prefetch point (40–80 % left).
    std::thread::sleep(Duration::from_millis(2000));
    let started = std::time::Instant::now();
    for n in &names {
        assert_eq!(answers(&ask(d.dns, n, A)), vec!["192.0.2.77"]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let refreshed = || names.iter().map(|n| up.count(n) - 1).sum::<usize>();
    let so_far = refreshed() as f64;
    let bound = 2.0 + f64::from(RATE) * started.elapsed().as_secs_f64();
    assert!(
        so_far <= bound,
        "{so_far} refreshes started, at most {bound} allowed"
    );
    let dropped = || d.metric("node_local_dns_prefetch_dropped_total") as usize;
    wait_until(
        "every refresh started or dropped",
        Duration::from_secs(10),
        || refreshed() + dropped() == NAMES,
    );
    assert!(dropped() >= 30, "the queue holds 64: {}", dropped());
    assert_eq!(
        metric_sum(&d.metrics(), "coredns_cache_prefetch_total", &[]) as usize,
        NAMES
    );
}

/// With the Deckhouse module's short clamps an entry lives a few seconds, so a name asked steadily gets
/// only ~10 hits per entry. Its popularity must carry over to the refreshed entry, or it
/// drops below the prefetch threshold, expires, and a client waits for the upstream.
#[test]
fn steadily_asked_names_with_short_ttls_never_expire() {
    let up = answering(sa(62, UP_PORT), [192, 0, 2, 62]);
    let d = Daemon::start(
        63,
        &[up.addr],
        &[
            "--cache-success-min-ttl",
            "2s",
            "--cache-success-max-ttl",
            "2s",
        ],
    );
    // 4 questions a second: 8 hits per 2 s entry, fewer than the default --prefetch-hits
    // (10), but 10 within a minute after 2.5 s.
    let ask_for = |secs: u64| {
        let end = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < end {
            assert_eq!(
                answers(&ask(d.dns, "steady.example", A)),
                vec!["192.0.2.62"]
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    ask_for(4);
    let misses = |m: &str| metric_sum(m, "coredns_cache_misses_total", &[]);
    let before = d.metrics();
    ask_for(5);
    let after = d.metrics();
    assert_eq!(
        misses(&after),
        misses(&before),
        "no client waited for the upstream"
    );
    // Refreshed by a hit or, when the hits fall just past the point, by the idle sweep.
    let refreshes = |m: &str| {
        metric_sum(m, "coredns_cache_prefetch_total", &[])
            + metric_sum(m, "node_local_dns_prefetch_unasked_total", &[])
    };
    let refreshed = refreshes(&after) - refreshes(&before);
    assert!(refreshed >= 2.0, "refreshed every ~2 s: {refreshed}");
}

/// A name asked steadily and then paused for longer than its entry has left (a job that
/// runs every few seconds): the idle sweep refreshes the popular entry once when it comes
/// due unasked, so the first question after the pause is a hit; a name that stays unasked
/// costs that one refresh and then expires.
#[test]
fn popular_names_stay_cached_through_a_pause_and_then_expire() {
    let up = answering(sa(73, UP_PORT), [192, 0, 2, 73]);
    // 5 s entries (the Deckhouse module's denial clamp): the sweep claims them in their last 6–12 %.
    let d = Daemon::start(
        72,
        &[up.addr],
        &[
            "--cache-success-min-ttl",
            "5s",
            "--cache-success-max-ttl",
            "5s",
            "--prefetch-hits",
            "5",
        ],
    );
    for _ in 0..6 {
        assert_eq!(
            answers(&ask(d.dns, "paused.example", A)),
            vec!["192.0.2.73"]
        );
    }
    let misses = |m: &str| metric_sum(m, "coredns_cache_misses_total", &[]);
    let before = d.metrics();
    // 6 s of silence: past the first entry's end, inside its refreshed successor's life.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        answers(&ask(d.dns, "paused.example", A)),
        vec!["192.0.2.73"]
    );
    assert_eq!(
        misses(&d.metrics()),
        misses(&before),
        "the question after the pause was a hit"
    );
    assert_eq!(up.count("paused.example"), 2, "one fetch, one idle refresh");
    assert_eq!(d.metric("node_local_dns_prefetch_unasked_total"), 1.0);

    // Asked once more (above), then never again: one more refresh, then it expires.
    wait_until(
        "the refresh after the last question",
        Duration::from_secs(6),
        || up.count("paused.example") == 3,
    );
    std::thread::sleep(Duration::from_millis(5300));
    assert_eq!(
        up.count("paused.example"),
        3,
        "no refresh for an unasked entry"
    );
    assert_eq!(
        answers(&ask(d.dns, "paused.example", A)),
        vec!["192.0.2.73"]
    );
    assert_eq!(
        misses(&d.metrics()),
        misses(&before) + 1.0,
        "then it expired"
    );
}

#[test]
fn names_outside_the_cluster_domain_can_go_to_resolv_conf_servers() {
    let cluster = answering(sa(63, UP_PORT), [10, 0, 0, 1]);
    // resolv.conf has no ports: the external server listens on 53.
    let external = answering(sa(66, 53), [192, 0, 2, 66]);
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "search svc.cluster.local\nnameserver 127.0.30.62\nnameserver 127.0.30.66\noptions ndots:5\n").unwrap();
    let d = Daemon::start(
        62,
        &[cluster.addr],
        &[
            "--external-to-resolv-conf",
            "--resolv-conf",
            resolv.to_str().unwrap(),
        ],
    );
    assert_eq!(
        answers(&ask(d.dns, "kubernetes.default.svc.cluster.local", A)),
        vec!["10.0.0.1"]
    );
    assert_eq!(
        answers(&ask(d.dns, "1.0.0.10.in-addr.arpa", A)),
        vec!["10.0.0.1"],
        "reverse zones stay in-cluster"
    );
    assert_eq!(
        answers(&ask(d.dns, "www.example.org", A)),
        vec!["192.0.2.66"]
    );
    assert_eq!(external.count("www.example.org"), 1);
    assert_eq!(cluster.count("www.example.org"), 0);
    // Our own listen address (127.0.30.62) in resolv.conf was skipped: no loop, no extra query
    // (the watchdog's NOTIFY probes count as type "other", not "A").
    assert_eq!(
        metric_sum(&d.metrics(), "coredns_dns_requests_total", &["type=\"A\""]),
        3.0
    );
}

#[test]
fn ipv6_listeners_work_like_ipv4_ones() {
    let up = answering(sa(65, UP_PORT), [192, 0, 2, 65]);
    let v6: SocketAddr = "[::1]:30053".parse().unwrap();
    let http = sa(64, HTTP_PORT);
    let child = Command::new(BIN)
        .args([
            "--listen",
            &v6.to_string(),
            "--listen",
            &sa(64, DNS_PORT).to_string(),
        ])
        .args(["--upstream", &up.addr.to_string(), "--no-node-setup"])
        .args([
            "--metrics-listen",
            &http.to_string(),
            "--health-listen",
            &http.to_string(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _p = Proc { child };
    wait_until("v6 listener", Duration::from_secs(15), || {
        resolver::watchdog::probe(v6, Duration::from_millis(300))
    });
    assert_eq!(answers(&ask(v6, "six.example", A)), vec!["192.0.2.65"]);
    let id = 6;
    assert_eq!(id_of(&tcp_ask(v6, &query(id, "six.example", A, None))), id);
    let m = http_get(http, "/metrics").1;
    assert!(
        metric_sum(
            &m,
            "coredns_dns_requests_total",
            &["server=\"dns://[::1]:30053\"", "family=\"2\""]
        ) >= 1.0,
        "{m}"
    );
}

#[test]
fn json_logs_are_json() {
    let up = answering(sa(68, UP_PORT), [192, 0, 2, 68]);
    let http = sa(67, HTTP_PORT);
    let child = Command::new(BIN)
        .args([
            "--listen",
            &sa(67, DNS_PORT).to_string(),
            "--upstream",
            &up.addr.to_string(),
            "--no-node-setup",
        ])
        .args([
            "--metrics-listen",
            &http.to_string(),
            "--health-listen",
            &http.to_string(),
        ])
        .args(["--log-format", "json", "--log-queries"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("listener", Duration::from_secs(15), || {
        resolver::watchdog::probe(sa(67, DNS_PORT), Duration::from_millis(300))
    });
    ask(sa(67, DNS_PORT), "logged.example", A);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
        assert!(v.get("level").is_some(), "{l}");
    }
    assert!(
        text.contains("query answered"),
        "query log present:\n{text}"
    );
}
