//! The forwarder against scripted upstreams: spoofing, coalescing, TC, timeouts, caps.
mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const A: u16 = 1;

fn tamper_id(mut m: Vec<u8>) -> Vec<u8> {
    m[0] ^= 0xff;
    m
}

fn tamper_name(mut m: Vec<u8>) -> Vec<u8> {
    m[13] ^= 0x01; // first letter of the question
    m
}

#[test]
fn spoofed_and_mismatched_replies_are_ignored_and_never_cached() {
    let script: Arc<Script> = Arc::new(|q: &[u8]| {
        let evil = reply_to(q, 0, &[[6, 6, 6, 6]], 300, false);
        vec![
            Step::Reply(tamper_id(evil.clone())),
            Step::Reply(tamper_name(evil.clone())),
            Step::FromOtherPort(evil.clone()),
            Step::Sleep(Duration::from_millis(100)),
            Step::Reply(reply_to(q, 0, &[[192, 0, 2, 1]], 300, false)),
        ]
    });
    let up = FakeUpstream::start(sa(21, UP_PORT), script, None);
    let d = Daemon::start(20, &[up.addr], &[]);
    assert_eq!(answers(&ask(d.dns, "victim.example", A)), vec!["192.0.2.1"]);
    assert_eq!(
        answers(&ask(d.dns, "victim.example", A)),
        vec!["192.0.2.1"],
        "cache holds the genuine answer"
    );
}

#[test]
fn only_spoofed_replies_mean_servfail_not_poison() {
    let script: Arc<Script> = Arc::new(|q: &[u8]| {
        let evil = reply_to(q, 0, &[[6, 6, 6, 6]], 300, false);
        vec![
            Step::Reply(tamper_id(evil.clone())),
            Step::FromOtherPort(evil),
        ]
    });
    let up = FakeUpstream::start(sa(23, UP_PORT), script, None);
    let d = Daemon::start(22, &[up.addr], &["--upstream-timeout", "300ms"]);
    let r = ask(d.dns, "victim.example", A);
    assert_eq!(rcode(&r), 2, "SERVFAIL");
    assert!(answers(&r).is_empty());
}

#[test]
fn concurrent_identical_misses_make_one_upstream_query() {
    let popular = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = popular.clone();
    let script: Arc<Script> = Arc::new(move |q: &[u8]| {
        if q[12..].starts_with(b"\x07popular") {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        vec![
            Step::Sleep(Duration::from_millis(700)),
            Step::Reply(reply_to(q, 0, &[[192, 0, 2, 7]], 300, false)),
        ]
    });
    let up = FakeUpstream::start(sa(25, UP_PORT), script, None);
    let d = Daemon::start(24, &[up.addr], &["--upstream-timeout", "2s"]);
    let dns = d.dns;
    let clients: Vec<_> = (0..200)
        .map(|_| std::thread::spawn(move || answers(&ask(dns, "popular.example", A))))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), vec!["192.0.2.7"]);
    }
    assert_eq!(
        popular.load(Ordering::SeqCst),
        1,
        "exactly one upstream query"
    );
    assert!(d.metric("node_local_dns_coalesced_queries_total") >= 150.0);
}

#[test]
fn truncated_upstream_answer_is_retried_over_tcp() {
    let udp: Arc<Script> = Arc::new(|q: &[u8]| {
        let mut tc = reply_to(q, 0, &[], 300, false);
        tc[2] |= 0x02;
        vec![Step::Reply(tc)]
    });
    let tcp: Arc<Script> = Arc::new(|q: &[u8]| {
        vec![Step::Reply(reply_to(
            q,
            0,
            &[[192, 0, 2, 8], [192, 0, 2, 9]],
            300,
            false,
        ))]
    });
    let up = FakeUpstream::start(sa(27, UP_PORT), udp, Some(tcp));
    let d = Daemon::start(26, &[up.addr], &["--health-check-interval", "1h"]);
    let r = ask(d.dns, "large.example", A);
    assert!(!is_tc(&r));
    assert_eq!(answers(&r), vec!["192.0.2.8", "192.0.2.9"]);
    assert!(up.tcp_queries.load(Ordering::SeqCst) >= 1);
}

#[test]
fn upstream_proto_tcp_uses_only_tcp() {
    let udp: Arc<Script> =
        Arc::new(|q: &[u8]| vec![Step::Reply(reply_to(q, 0, &[[6, 6, 6, 6]], 300, false))]);
    let tcp: Arc<Script> =
        Arc::new(|q: &[u8]| vec![Step::Reply(reply_to(q, 0, &[[192, 0, 2, 5]], 300, false))]);
    let up = FakeUpstream::start(sa(29, UP_PORT), udp, Some(tcp));
    let d = Daemon::start(28, &[up.addr], &["--upstream-proto", "tcp"]);
    assert_eq!(answers(&ask(d.dns, "t.example", A)), vec!["192.0.2.5"]);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 0);
}

#[test]
fn silent_upstream_gets_servfail_in_bounded_time_and_is_marked_unhealthy() {
    let script: Arc<Script> = Arc::new(|_q: &[u8]| vec![]);
    let up = FakeUpstream::start(sa(31, UP_PORT), script, None);
    let d = Daemon::start(
        30,
        &[up.addr],
        &["--upstream-timeout", "400ms", "--upstream-attempts", "2"],
    );
    // The client's own timeout is 5 s (ask): the daemon must answer before it.
    let r = ask(d.dns, "slow.example", A);
    assert_eq!(rcode(&r), 2);
    let to = format!("to=\"{}\"", up.addr);
    wait_until("health metric", Duration::from_secs(10), || {
        let m = d.metrics();
        metric_sum(&m, "node_local_dns_upstream_healthy", &[&to]) == 0.0
            && metric_sum(&m, "coredns_forward_healthcheck_failures_total", &[&to]) >= 1.0
    });
    let (status, _) = http_get(d.http, "/ready");
    assert_eq!(status, 503, "not ready before any upstream answered");
}

#[test]
fn negative_answer_without_soa_is_not_cached_and_servfail_is_not_cached() {
    let script: Arc<Script> = Arc::new(|q: &[u8]| {
        let rcode = if q[12..].starts_with(b"\x04nsoa") {
            3
        } else {
            2
        };
        vec![Step::Reply(reply_to(q, rcode, &[], 300, false))]
    });
    let up = FakeUpstream::start(sa(33, UP_PORT), script, None);
    let d = Daemon::start(32, &[up.addr], &["--health-check-interval", "1h"]);
    for _ in 0..2 {
        assert_eq!(rcode(&ask(d.dns, "nsoa.example", A)), 3);
        assert_eq!(rcode(&ask(d.dns, "fail.example", A)), 2);
    }
    assert_eq!(
        up.count("nsoa.example"),
        2,
        "not cached: asked upstream each time"
    );
    assert_eq!(up.count("fail.example"), 2, "SERVFAIL not cached");
}

#[test]
fn past_the_concurrency_cap_clients_get_a_fast_servfail() {
    let first = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = first.clone();
    let script: Arc<Script> = Arc::new(move |q: &[u8]| {
        if q[12..].starts_with(b"\x05first") {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        vec![
            Step::Sleep(Duration::from_millis(1500)),
            Step::Reply(reply_to(q, 0, &[[192, 0, 2, 3]], 300, false)),
        ]
    });
    let up = FakeUpstream::start(sa(35, UP_PORT), script, None);
    let args = [
        "--max-concurrent",
        "1",
        "--upstream-timeout",
        "3s",
        "--upstream-attempts",
        "1",
    ];
    let d = Daemon::start(34, &[up.addr], &args);
    let dns = d.dns;
    let slow = std::thread::spawn(move || ask(dns, "first.example", A));
    wait_until("first query upstream", Duration::from_secs(5), || {
        first.load(Ordering::SeqCst) >= 1
    });
    let r = ask(d.dns, "second.example", A);
    assert_eq!(
        rcode(&r),
        2,
        "rejected with SERVFAIL while the slot is taken"
    );
    assert_eq!(answers(&slow.join().unwrap()), vec!["192.0.2.3"]);
    assert!(d.metric("coredns_forward_max_concurrent_rejects_total") >= 1.0);
}

#[test]
fn every_upstream_query_uses_a_fresh_random_id_and_source_port() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u16>::new()));
    let s2 = seen.clone();
    let script: Arc<Script> = Arc::new(move |q: &[u8]| {
        s2.lock().unwrap().push(id_of(q));
        vec![Step::Reply(reply_to(q, 0, &[[192, 0, 2, 4]], 300, false))]
    });
    let up = FakeUpstream::start(sa(37, UP_PORT), script, None);
    let d = Daemon::start(36, &[up.addr], &["--health-check-interval", "1h"]);
    for i in 0..20 {
        let q = query(4242, &format!("n{i}.example"), A, EDNS); // clients all use ID 4242
        let r = udp_exchange(d.dns, &q, Duration::from_secs(5)).unwrap();
        assert_eq!(id_of(&r), 4242);
    }
    let ids = seen.lock().unwrap().clone();
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert!(
        uniq.len() >= ids.len() - 1,
        "upstream IDs are random: {ids:?}"
    );
    assert!(!ids.iter().all(|i| *i == 4242));

    let sources: Vec<SocketAddr> = up
        .udp_sources
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with('n'))
        .map(|(_, from)| *from)
        .collect();
    assert_eq!(sources.len(), 20, "{sources:?}");
    let mut ports: Vec<u16> = sources.iter().map(|s| s.port()).collect();
    ports.sort();
    ports.dedup();
    // A random port from the ephemeral range may repeat once in a while; a reused socket
    // would repeat every time.
    assert!(ports.len() >= 18, "fresh source ports: {sources:?}");
    assert!(
        sources.iter().all(|s| s.ip() != d.dns.ip()),
        "never the listen address as source: {sources:?}"
    );
}

#[test]
fn readiness_follows_upstream_health_and_liveness_does_not() {
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mute = silent.clone();
    let script: Arc<Script> = Arc::new(move |q: &[u8]| {
        if mute.load(Ordering::SeqCst) {
            vec![]
        } else {
            vec![Step::Reply(reply_to(q, 0, &[], 300, false))]
        }
    });
    let up = FakeUpstream::start(sa(39, UP_PORT), script, None);
    let d = Daemon::start(
        38,
        &[up.addr],
        &["--upstream-timeout", "200ms", "--upstream-attempts", "1"],
    );
    let ready = || http_get(d.http, "/ready").0;
    wait_until(
        "ready once the upstream answered",
        Duration::from_secs(10),
        || ready() == 200,
    );
    silent.store(true, Ordering::SeqCst);
    wait_until(
        "not ready while the upstream is silent",
        Duration::from_secs(10),
        || ready() == 503,
    );
    assert_eq!(
        http_get(d.http, "/health").0,
        200,
        "liveness ignores upstreams"
    );
    silent.store(false, Ordering::SeqCst);
    wait_until(
        "ready again once it answers",
        Duration::from_secs(10),
        || ready() == 200,
    );
}
