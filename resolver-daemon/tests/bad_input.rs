//! Nothing a client sends may crash or stall the daemon; each malformed case gets the
//! specified reply (or is dropped).
mod common;
use common::*;
use std::sync::Arc;
use std::time::Duration;

fn daemon(n: u8) -> (FakeUpstream, Daemon) {
    let script: Arc<Script> =
        Arc::new(|q: &[u8]| vec![Step::Reply(reply_to(q, 0, &[[192, 0, 2, 1]], 300, false))]);
    let up = FakeUpstream::start(sa(n + 1, UP_PORT), script, None);
    let d = Daemon::start(n, &[up.addr], &[]);
    (up, d)
}

fn exchange(d: &Daemon, msg: &[u8]) -> Option<Vec<u8>> {
    udp_exchange(d.dns, msg, Duration::from_millis(700))
}

fn still_answers(d: &Daemon) {
    assert_eq!(answers(&ask(d.dns, "alive.example", 1)), vec!["192.0.2.1"]);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    let (_up, d) = daemon(40);
    // Shorter than a header: dropped.
    assert!(exchange(&d, &[1, 2, 3]).is_none());
    // QR=1 (a response sent to us): dropped, never reflected.
    let mut resp = query(5, "x.example", 1, None);
    resp[2] |= 0x80;
    assert!(exchange(&d, &resp).is_none());
    // Two questions: FORMERR.
    let mut two = query(6, "x.example", 1, None);
    two[5] = 2;
    let r = exchange(&d, &two).expect("FORMERR reply");
    assert_eq!((id_of(&r), rcode(&r)), (6, 1));
    // Question cut short: FORMERR.
    let q = query(7, "x.example", 1, None);
    let r = exchange(&d, &q[..q.len() - 3]).expect("FORMERR reply");
    assert_eq!((id_of(&r), rcode(&r)), (7, 1));
    // A label running past the end.
    let mut bad_label = query(8, "x.example", 1, None);
    bad_label[12] = 60;
    let r = exchange(&d, &bad_label).expect("FORMERR reply");
    assert_eq!(rcode(&r), 1);
    still_answers(&d);
}

#[test]
fn unknown_opcode_gets_notimp_and_edns1_gets_badvers() {
    let (_up, d) = daemon(42);
    let mut update = query(9, "x.example", 1, None);
    update[2] = 5 << 3; // opcode UPDATE
    let r = exchange(&d, &update).expect("NOTIMP reply");
    assert_eq!((id_of(&r), rcode(&r)), (9, 4));

    let v1 = query(
        10,
        "x.example",
        1,
        Some(Edns {
            size: 1232,
            dnssec_ok: false,
            version: 1,
        }),
    );
    let r = exchange(&d, &v1).expect("BADVERS reply");
    let m = parse(&r);
    assert_eq!(id_of(&r), 10);
    // BADVERS = 16: header rcode 0, upper bits 1 in the OPT record.
    assert_eq!(rcode(&r), 0);
    assert_eq!(m.edns.as_ref().map(|e| e.rcode_high()), Some(1));
    still_answers(&d);
}

#[test]
fn random_garbage_neither_crashes_nor_stalls_it() {
    let (_up, d) = daemon(44);
    let s = std::net::UdpSocket::bind("127.0.30.45:0").unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for i in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 300) as usize;
        let mut pkt: Vec<u8> = (0..len)
            .map(|k| (seed >> (k % 56)) as u8 ^ k as u8)
            .collect();
        // Half of them look like queries, so parsing goes deep.
        if i % 2 == 0 && pkt.len() > 12 {
            pkt[2] &= 0x07;
            pkt[4..6].copy_from_slice(&[0, 1]);
        }
        let _ = s.send_to(&pkt, d.dns);
    }
    // Over TCP too: a bogus length prefix, then a truncated message, then a close.
    for junk in [
        &[0xff, 0xff, 1, 2][..],
        &[0, 40, 0, 1, 2, 3][..],
        &[0, 0][..],
    ] {
        let mut c = std::net::TcpStream::connect(d.dns).unwrap();
        std::io::Write::write_all(&mut c, junk).unwrap();
    }
    still_answers(&d);
    let ok = tcp_ask(d.dns, &query(77, "alive.example", 1, None));
    assert_eq!(id_of(&ok), 77);
}

// ---------------------------------------------------------------- bad settings at start

/// The daemon started with `args` and `env` only (no inherited settings); its stderr.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} {env:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const LOOPBACK: [&str; 5] = [
    "--no-node-setup",
    "--listen",
    "127.0.30.90",
    "--upstream",
    "127.0.30.91",
];

#[test]
fn contradicting_settings_are_refused_at_start_in_one_line_naming_the_flag() {
    for (extra, says) in [
        (
            &["--tcp-idle-timeout", "60s"][..],
            "--tcp-idle-timeout 60s: must be at most 10s",
        ),
        (
            &["--upstream-timeout", "5s"],
            "--upstream-timeout × --upstream-attempts 5s × 2 = 10s",
        ),
        (
            &["--cache-success-min-ttl", "60s"],
            "--cache-success-min-ttl 60s",
        ),
        (
            &["--cluster-dns", "10.96.0.10,10.96.0.11"],
            "--cluster-dns \"10.96.0.10,10.96.0.11\"",
        ),
    ] {
        let args: Vec<&str> = LOOPBACK.iter().chain(extra).copied().collect();
        let err = refused_start(&args, &[]);
        assert!(err.contains(says), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(
            !err.contains('\x1b'),
            "colour codes off a terminal: {err:?}"
        );
    }
}

#[test]
fn bad_values_name_the_flag_or_variable_they_came_from() {
    let err = refused_start(&["--listen", "notanip"], &[]);
    assert!(err.contains("--listen") && err.contains("notanip"), "{err}");
    let err = refused_start(&["--upstream", "1.2.3.4:99999"], &[]);
    assert!(err.contains("--upstream") && err.contains("99999"), "{err}");
    assert!(!err.contains("no listen address"), "{err}");
    let err = refused_start(&LOOPBACK, &[("NODE_LOCAL_DNS_THREADS", "0")]);
    assert!(err.contains("NODE_LOCAL_DNS_THREADS \"0\""), "{err}");
    assert!(!err.contains("--threads"), "{err}");
    let err = refused_start(&[], &[("KUBE_DNS_SERVICE_HOST", "kube-dns")]);
    assert!(err.contains("KUBE_DNS_SERVICE_HOST \"kube-dns\""), "{err}");
    let err = refused_start(&[], &[]);
    for source in ["--cluster-dns", "KUBE_DNS_SVC_IP", "KUBE_DNS_SERVICE_HOST"] {
        assert!(err.contains(source), "{source}: {err}");
    }
}

#[test]
fn a_refused_start_is_logged_in_the_chosen_format() {
    let args: Vec<&str> = LOOPBACK
        .iter()
        .chain(&["--tcp-idle-timeout", "60s"])
        .copied()
        .collect();
    let err = refused_start(&args, &[("NODE_LOCAL_DNS_LOG_FORMAT", "json")]);
    let line: serde_json::Value = serde_json::from_str(err.trim_end())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {err}"));
    assert_eq!(line["level"], "ERROR");
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--tcp-idle-timeout 60s"), "{message}");

    // A value the command line parser refuses, as from a ConfigMap: JSON too.
    let err = refused_start(
        &LOOPBACK,
        &[
            ("NODE_LOCAL_DNS_LOG_FORMAT", "json"),
            ("NODE_LOCAL_DNS_THREADS", "0"),
        ],
    );
    let line: serde_json::Value = serde_json::from_str(err.trim_end())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {err}"));
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("NODE_LOCAL_DNS_THREADS \"0\""),
        "{message}"
    );
}

#[test]
fn sizes_take_units() {
    // 64MiB is accepted: the daemon starts and answers.
    let script: Arc<Script> =
        Arc::new(|q: &[u8]| vec![Step::Reply(reply_to(q, 0, &[[192, 0, 2, 1]], 300, false))]);
    let up = FakeUpstream::start(sa(93, UP_PORT), script, None);
    let d = Daemon::start(92, &[up.addr], &["--cache-max-bytes", "64MiB"]);
    still_answers(&d);
}
