//! Messages the daemon writes itself: error replies, OPT records, upstream queries and the
//! watchdog's probe.

use super::header::{flags_of, message_id};
use super::query::{EDNS_DO, scan_question_and_edns};
use super::{HEADER_LEN, OUR_UDP_SIZE, Query, TYPE_OPT, flag};

/// Writes an error reply (header copied from the query with QR=1 and `rcode`; the question
/// echoed when it parsed; an OPT record when the query had one — required for BADVERS,
/// whose upper rcode bits live in the OPT TTL). `rcode` is the full 12-bit extended rcode.
///
/// With `parsed == None` the query is scanned leniently here, so a NOTIMP or BADVERS reply
/// still echoes the question and the client's DO bit when they are readable.
pub fn write_error_response(
    query: &[u8],
    parsed: Option<&Query<'_>>,
    rcode: u16,
    out: &mut Vec<u8>,
) {
    out.clear();
    let (question, edns) = match parsed {
        Some(q) => (Some(&query[HEADER_LEN..q.question_end]), q.edns),
        None => scan_question_and_edns(query),
    };
    // The OPT record is the only place for rcode bits above 15, so BADVERS gets one even
    // when the query's OPT was unreadable.
    let write_opt = edns.is_some() || rcode > 0xf;
    let id = message_id(query).unwrap_or(0);
    let query_flags = flags_of(query).unwrap_or(0);
    let flags = flag::QR
        | flag::RA
        | (query_flags & (flag::OPCODE_MASK | flag::RD | flag::CD))
        | (rcode & flag::RCODE_MASK);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&u16::from(write_opt).to_be_bytes());
    if let Some(question) = question {
        out.extend_from_slice(question);
    }
    if write_opt {
        let dnssec_ok = edns.is_some_and(|e| e.dnssec_ok);
        write_opt_record(out, rcode, dnssec_ok);
    }
}

/// Appends an OPT record advertising EDNS version 0 and our UDP size, carrying the upper
/// eight bits of `rcode` and the DO bit (RFC 3225: copied from the query).
pub fn write_opt_record(out: &mut Vec<u8>, rcode: u16, dnssec_ok: bool) {
    let ttl = (u32::from((rcode >> 4) as u8) << 24) | if dnssec_ok { EDNS_DO } else { 0 };
    let [type_hi, type_lo] = TYPE_OPT.to_be_bytes();
    let [size_hi, size_lo] = OUR_UDP_SIZE.to_be_bytes();
    let [t0, t1, t2, t3] = ttl.to_be_bytes();
    // root name, TYPE, CLASS (= UDP size), TTL (= ext rcode, version, flags), RDLENGTH 0
    out.extend_from_slice(&[0, type_hi, type_lo, size_hi, size_lo, t0, t1, t2, t3, 0, 0]);
}

/// The query we send for `q`'s question: RD, `q`'s CD, EDNS with our UDP size and `q`'s DO bit
/// (DO and CD are part of the cache key). Used for upstream queries and, through the
/// forwarder, for the idle sweep's refreshes.
pub fn build_query(q: &Query<'_>, id: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + q.qname.len() + 4 + 11);
    let flags = flag::RD | (q.flags & flag::CD);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    // QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 1 (the OPT record)
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    m.extend_from_slice(q.qname);
    m.extend_from_slice(&q.qtype.to_be_bytes());
    m.extend_from_slice(&q.qclass.to_be_bytes());
    write_opt_record(&mut m, 0, q.dnssec_ok());
    m
}

/// Length of the watchdog's probe: header and the root question.
pub const PROBE_LEN: usize = HEADER_LEN + 1 + 4;

/// A NOTIFY (opcode 4) for `. SOA`: the fast path answers NOTIMP itself, so a probe
/// exercises a listener's socket and receive thread without touching upstreams or the cache.
pub fn notify_probe(id: u16) -> [u8; PROBE_LEN] {
    const OPCODE_NOTIFY: u16 = 4;
    const QDCOUNT_ONE: [u8; 2] = [0, 1];
    let flags = OPCODE_NOTIFY << 11;
    let mut m = [0u8; PROBE_LEN];
    m[..2].copy_from_slice(&id.to_be_bytes());
    m[2..4].copy_from_slice(&flags.to_be_bytes());
    m[4..6].copy_from_slice(&QDCOUNT_ONE);
    // root name, type SOA, class IN
    let [t0, t1] = super::TYPE_SOA.to_be_bytes();
    m[HEADER_LEN..].copy_from_slice(&[0, t0, t1, 0, 1]);
    m
}
