//! The real daemon in front of a real knotd: answers, caching, negative caching, stale,
//! size limits and TCP.
mod common;
use common::*;
use std::time::Duration;

const A: u16 = 1;
const AAAA: u16 = 28;
const TXT: u16 = 16;

#[test]
fn answers_match_the_upstream_and_survive_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut knot = knot(dir.path(), sa(11, UP_PORT));
    let d = Daemon::start(10, &[sa(11, UP_PORT)], &[]);

    for (name, qtype) in [
        ("www.example.test", A),
        ("www.example.test", AAAA),
        ("alias.example.test", A),
    ] {
        let direct = ask(sa(11, UP_PORT), name, qtype);
        let via = ask(d.dns, name, qtype);
        assert_eq!(answers(&via), answers(&direct), "{name}/{qtype}");
        assert_eq!(rcode(&via), rcode(&direct));
        let (m, up) = (parse(&via).metadata, parse(&direct).metadata);
        assert_eq!(
            (m.authoritative, m.recursion_available),
            (up.authoritative, up.recursion_available),
            "AA/RA passed through"
        );
    }
    assert_eq!(
        answers(&ask(d.dns, "www.example.test", A)),
        vec!["192.0.2.10", "192.0.2.11"]
    );
    // Letter case of the question is the client's.
    let mixed = ask(d.dns, "WwW.ExAmple.TEST", A);
    assert_eq!(
        parse(&mixed).queries[0].name().to_ascii(),
        "WwW.ExAmple.TEST."
    );

    knot.kill();
    let cached = ask(d.dns, "www.example.test", A);
    assert_eq!(
        answers(&cached),
        vec!["192.0.2.10", "192.0.2.11"],
        "served from cache with the upstream stopped"
    );
    assert!(
        answer_ttls(&cached).iter().all(|t| *t <= 30),
        "TTL clamped to 30 s: {:?}",
        answer_ttls(&cached)
    );
    assert!(d.metric_sum_hits() >= 1.0);
}

trait HitSum {
    fn metric_sum_hits(&self) -> f64;
}
impl HitSum for Daemon {
    fn metric_sum_hits(&self) -> f64 {
        metric_sum(
            &self.metrics(),
            "coredns_cache_hits_total",
            &["type=\"success\""],
        )
    }
}

#[test]
fn nxdomain_is_cached_with_the_soa() {
    let dir = tempfile::tempdir().unwrap();
    let mut knot = knot(dir.path(), sa(13, UP_PORT));
    let d = Daemon::start(12, &[sa(13, UP_PORT)], &[]);
    let first = ask(d.dns, "nope.example.test", A);
    assert_eq!(rcode(&first), 3, "NXDOMAIN");
    assert_eq!(parse(&first).authorities.len(), 1, "SOA in authority");
    knot.kill();
    let second = ask(d.dns, "nope.example.test", A);
    assert_eq!(rcode(&second), 3, "NXDOMAIN from the cache");
    let m = parse(&second);
    assert_eq!(m.authorities.len(), 1);
    assert!(m.authorities[0].ttl <= 5, "denial TTL clamped to 5 s");
    assert!(
        metric_sum(
            &d.metrics(),
            "coredns_cache_hits_total",
            &["type=\"denial\""]
        ) >= 1.0
    );
}

#[test]
fn expired_entries_are_served_stale_when_the_upstream_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut knot = knot(dir.path(), sa(15, UP_PORT));
    let d = Daemon::start(
        14,
        &[sa(15, UP_PORT)],
        &[
            "--cache-success-min-ttl",
            "1s",
            "--cache-success-max-ttl",
            "1s",
            "--upstream-timeout",
            "300ms",
        ],
    );
    assert_eq!(
        answers(&ask(d.dns, "short.example.test", A)),
        vec!["192.0.2.20"]
    );
    knot.kill();
    std::thread::sleep(Duration::from_millis(1500)); // let the 1 s entry expire
    let stale = ask(d.dns, "short.example.test", A);
    assert_eq!(rcode(&stale), 0);
    assert_eq!(answers(&stale), vec!["192.0.2.20"]);
    assert_eq!(answer_ttls(&stale), vec![30], "stale TTL");
    assert!(metric_sum(&d.metrics(), "coredns_cache_served_stale_total", &[]) >= 1.0);
    // Never cached at all: SERVFAIL, not a hang.
    let never = ask(d.dns, "www.example.test", A);
    assert_eq!(rcode(&never), 2);
}

#[test]
fn udp_answers_respect_the_client_size_and_tcp_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    let _knot = knot(dir.path(), sa(17, UP_PORT));
    let d = Daemon::start(16, &[sa(17, UP_PORT)], &[]);

    // Over TCP first: the full 12-record answer (the daemon fetched it upstream over TCP
    // after knot's UDP reply came back truncated).
    let full = tcp_ask(d.dns, &query(7, "big.example.test", TXT, EDNS));
    assert!(!is_tc(&full));
    assert_eq!(parse(&full).answers.len(), 12);

    // No EDNS: 512 bytes max → TC=1, question only.
    let small = udp_exchange(
        d.dns,
        &query(8, "big.example.test", TXT, None),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(is_tc(&small));
    assert!(small.len() <= 512);
    assert!(
        parse(&small).edns.is_none(),
        "no OPT for a client without EDNS"
    );

    // EDNS 4096 is capped at 1232 → still TC.
    let big = Some(Edns {
        size: 4096,
        dnssec_ok: false,
        version: 0,
    });
    let capped = udp_exchange(
        d.dns,
        &query(9, "big.example.test", TXT, big),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(is_tc(&capped));
    assert!(capped.len() <= 1232);
    assert!(parse(&capped).edns.is_some());
}

#[test]
fn tcp_pipelines_queries_and_closes_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let _knot = knot(dir.path(), sa(19, UP_PORT));
    let d = Daemon::start(18, &[sa(19, UP_PORT)], &["--tcp-idle-timeout", "1s"]);
    let mut s = std::net::TcpStream::connect(d.dns).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ids = [101u16, 102, 103];
    let names = [
        "www.example.test",
        "nope.example.test",
        "alias.example.test",
    ];
    for (id, name) in ids.iter().zip(names) {
        tcp_write(&mut s, &query(*id, name, A, None));
    }
    let mut got: Vec<u16> = (0..3)
        .map(|_| id_of(&tcp_read(&mut s).expect("pipelined answer")))
        .collect();
    got.sort();
    assert_eq!(got, ids);
    // Idle: the server closes (EOF) well within the client's read timeout.
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    assert!(tcp_read(&mut s).is_none(), "idle connection closed");
}
