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
