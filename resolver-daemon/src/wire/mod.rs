//! The DNS codec: every rule about DNS bytes lives here, and no other module reads or writes
//! message bytes by hand.
//!
//! - `query`: `parse_query(buf)` validates a client message in place without allocating;
//!   `udp_limit` is the answer size a UDP client accepts (512 without EDNS, else its EDNS size
//!   clamped to [512, 1232]); `ParsedQuery` keeps a parse beside owned bytes.
//! - `header`: header fields, the reply rcode and TC bit, and the patches replies get.
//! - `compose`: error replies (FORMERR/NOTIMP/BADVERS/SERVFAIL/REFUSED), OPT records,
//!   upstream queries, the health-check question and the watchdog's probe.
//! - `reply`: whether an upstream reply answers our query, and the rewrite that makes an
//!   uncached one a client's.
//! - `tcp`: the two-byte length prefix of DNS over TCP.
//!
//! Everything here reads the message in place: a query is validated by one forward walk over
//! header, question and additional section, and nothing is copied until a reply is written.

mod compose;
mod header;
mod query;
mod reply;
mod tcp;

pub use compose::{PROBE_LEN, build_query, notify_probe, write_error_response, write_opt_record};
pub(crate) use header::{
    Header, append_opt, flags, mark_truncated, set_flags, set_id, set_record_counts,
};
pub use header::{is_truncated, message_id, reply_rcode};
pub use query::{
    Edns, ParsedQuery, Query, TCP_LIMIT, WireError, parse_query, root_ns_query, udp_limit,
};
pub(crate) use query::{parse_question, read_rr, skip_name};
pub use reply::{dotted_lowercase, reply_matches, rewrite_for_client};
pub use tcp::{TCP_PREFIX_LEN, tcp_framed, tcp_message_len};

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// RR type of the EDNS(0) OPT pseudo-record.
pub const TYPE_OPT: u16 = 41;
/// RR type SOA (negative answers carry one in the authority section).
pub const TYPE_SOA: u16 = 6;
/// Longest name in wire format, root label included (RFC 1035 §3.1).
pub const MAX_NAME_LEN: usize = 255;
/// UDP payload size we advertise in OPT records we write (the DNS flag day 2020 value).
pub const OUR_UDP_SIZE: u16 = 1232;

/// Response codes the daemon writes itself (12-bit extended values).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    /// Extended rcode 16: its upper bits travel in the OPT record's TTL.
    pub const BADVERS: u16 = 16;
}

/// Header flag bits (second and third byte of the message, as one big-endian word).
pub mod flag {
    pub const QR: u16 = 0x8000;
    pub const OPCODE_MASK: u16 = 0x7800;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
    pub const AD: u16 = 0x0020;
    pub const CD: u16 = 0x0010;
    pub const RCODE_MASK: u16 = 0x000f;
}

/// Big-endian u16 at `pos`; callers have checked the bounds.
pub(crate) fn be16(buf: &[u8], pos: usize) -> u16 {
    u16::from_be_bytes([buf[pos], buf[pos + 1]])
}

pub(crate) fn be16_checked(buf: &[u8], pos: usize) -> Option<u16> {
    let bytes = buf.get(pos..pos + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Big-endian u32 at `pos`; callers have checked the bounds.
pub(crate) fn be32(buf: &[u8], pos: usize) -> u32 {
    u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]])
}

pub(crate) fn put16(buf: &mut [u8], pos: usize, value: u16) {
    buf[pos..pos + 2].copy_from_slice(&value.to_be_bytes());
}

pub(crate) fn put32(buf: &mut [u8], pos: usize, value: u32) {
    buf[pos..pos + 4].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns as HEdns, Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    fn query_message(name: &str, edns: Option<(u16, bool)>) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(
            Name::from_ascii(name).unwrap(),
            RecordType::AAAA,
        ));
        if let Some((size, dnssec_ok)) = edns {
            let mut e = HEdns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m
    }

    fn query_bytes(name: &str, edns: Option<(u16, bool)>) -> Vec<u8> {
        query_message(name, edns).to_vec().unwrap()
    }

    /// Raw query: header with the given counts, then `body`.
    fn raw_query(flags: u16, counts: [u16; 4], body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0xab, 0xcd];
        buf.extend_from_slice(&flags.to_be_bytes());
        for count in counts {
            buf.extend_from_slice(&count.to_be_bytes());
        }
        buf.extend_from_slice(body);
        buf
    }

    const QUESTION: &[u8] = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";

    fn opt_rr(udp: u16, version: u8, dnssec_ok: bool, rdata: &[u8]) -> Vec<u8> {
        let mut rr = vec![0];
        rr.extend_from_slice(&TYPE_OPT.to_be_bytes());
        rr.extend_from_slice(&udp.to_be_bytes());
        rr.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0]);
        rr.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        rr.extend_from_slice(rdata);
        rr
    }

    #[test]
    fn parses_hickory_query_with_edns() {
        let buf = query_bytes("Www.Example.com.", Some((4096, true)));
        let q = parse_query(&buf).unwrap();
        assert_eq!(q.id, 0x1234);
        assert!(q.recursion_desired());
        assert!(!q.checking_disabled());
        assert_eq!(q.qname, b"\x03Www\x07Example\x03com\x00");
        assert_eq!(q.qtype, 28);
        assert_eq!(q.qclass, 1);
        assert_eq!(
            q.edns,
            Some(Edns {
                version: 0,
                udp_size: 4096,
                dnssec_ok: true
            })
        );
        assert!(q.dnssec_ok());
        assert_eq!(q.question_end, HEADER_LEN + q.qname.len() + 4);
        assert_eq!(udp_limit(&q), 1232);
    }

    #[test]
    fn parses_plain_query_and_root_name() {
        let buf = query_bytes(".", None);
        let q = parse_query(&buf).unwrap();
        assert_eq!(q.qname, b"\x00");
        assert_eq!(q.edns, None);
        assert_eq!(udp_limit(&q), 512);
        assert_eq!(q.question_end, buf.len());
    }

    #[test]
    fn udp_limit_clamps_small_edns_size_up_to_512() {
        let mut body = QUESTION.to_vec();
        body.extend(opt_rr(100, 0, false, &[]));
        let buf = raw_query(0x0100, [1, 0, 0, 1], &body);
        assert_eq!(udp_limit(&parse_query(&buf).unwrap()), 512);
    }

    #[test]
    fn skips_non_opt_additional_records() {
        // A TSIG-like record with a compressed owner name pointing at the question.
        let mut body = QUESTION.to_vec();
        body.extend_from_slice(&[0xc0, 12, 0, 250, 0, 255, 0, 0, 0, 0, 0, 2, 0xaa, 0xbb]);
        body.extend(opt_rr(1232, 0, true, &[0, 10, 0, 2, 1, 2]));
        let buf = raw_query(0x0100, [1, 0, 0, 2], &body);
        let q = parse_query(&buf).unwrap();
        assert!(q.dnssec_ok());
    }

    #[test]
    fn rejections_in_reply_deciding_order() {
        assert_eq!(parse_query(&[0; 11]).unwrap_err(), WireError::TooShort);
        let response = raw_query(0x8100, [1, 0, 0, 0], QUESTION);
        assert_eq!(parse_query(&response).unwrap_err(), WireError::IsResponse);
        let notify = raw_query(4 << 11, [1, 0, 0, 0], QUESTION);
        assert_eq!(
            parse_query(&notify).unwrap_err(),
            WireError::NotImplemented(4)
        );
        let mut body = QUESTION.to_vec();
        body.extend(opt_rr(1232, 1, false, &[]));
        let v1 = raw_query(0x0100, [1, 0, 0, 1], &body);
        assert_eq!(parse_query(&v1).unwrap_err(), WireError::BadVersion(1));
    }

    fn assert_malformed(buf: &[u8]) {
        match parse_query(buf) {
            Err(WireError::Malformed(_)) => {}
            other => panic!("expected Malformed, got {other:?} for {buf:02x?}"),
        }
    }

    #[test]
    fn malformed_queries_are_formerr() {
        assert_malformed(&raw_query(0, [0, 0, 0, 0], &[]));
        let mut two = QUESTION.to_vec();
        two.extend_from_slice(QUESTION);
        assert_malformed(&raw_query(0, [2, 0, 0, 0], &two));
        assert_malformed(&raw_query(0, [1, 1, 0, 0], QUESTION));
        assert_malformed(&raw_query(0, [1, 0, 1, 0], QUESTION));
        // compression pointer and obsolete 0x40 label type in the question
        assert_malformed(&raw_query(
            0,
            [1, 0, 0, 0],
            b"\x03www\xc0\x0c\x00\x01\x00\x01",
        ));
        assert_malformed(&raw_query(0, [1, 0, 0, 0], b"\x41www\x00\x00\x01\x00\x01"));
        // truncated name, truncated type/class
        assert_malformed(&raw_query(0, [1, 0, 0, 0], b"\x03www\x07exa"));
        assert_malformed(&raw_query(0, [1, 0, 0, 0], b"\x03www\x00\x00\x01\x00"));
        // trailing bytes, missing additional record
        let mut trailing = QUESTION.to_vec();
        trailing.push(0);
        assert_malformed(&raw_query(0, [1, 0, 0, 0], &trailing));
        assert_malformed(&raw_query(0, [1, 0, 0, 1], QUESTION));
    }

    #[test]
    fn malformed_opt_records_are_formerr() {
        let mut two = QUESTION.to_vec();
        two.extend(opt_rr(1232, 0, false, &[]));
        two.extend(opt_rr(1232, 0, false, &[]));
        assert_malformed(&raw_query(0, [1, 0, 0, 2], &two));
        let mut named = QUESTION.to_vec();
        // the owner name is `a.` instead of the root
        named.extend_from_slice(b"\x01a");
        named.extend(opt_rr(1232, 0, false, &[]));
        assert_eq!(
            parse_query(&raw_query(0, [1, 0, 0, 1], &named)).unwrap_err(),
            WireError::Malformed("OPT record name is not the root")
        );
        assert_malformed(&raw_query(0, [1, 0, 0, 1], &named));
        let mut bad_option = QUESTION.to_vec();
        bad_option.extend(opt_rr(1232, 0, false, &[0, 10, 0, 9, 1, 2]));
        assert_malformed(&raw_query(0, [1, 0, 0, 1], &bad_option));
        let mut short_option = QUESTION.to_vec();
        short_option.extend(opt_rr(1232, 0, false, &[0, 10]));
        assert_malformed(&raw_query(0, [1, 0, 0, 1], &short_option));
    }

    /// Name of `labels` labels of 63 bytes plus one of `last` bytes.
    fn long_name(labels: usize, last: usize) -> Vec<u8> {
        let mut name = Vec::new();
        for _ in 0..labels {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        if last > 0 {
            name.push(last as u8);
            name.extend(std::iter::repeat_n(b'b', last));
        }
        name.push(0);
        name
    }

    #[test]
    fn name_length_limit_is_255_bytes() {
        let mut longest = long_name(3, 61); // 3*64 + 62 + 1 = 255
        assert_eq!(longest.len(), 255);
        longest.extend_from_slice(&[0, 1, 0, 1]);
        let q = raw_query(0, [1, 0, 0, 0], &longest);
        assert_eq!(parse_query(&q).unwrap().qname.len(), 255);
        let mut too_long = long_name(3, 62);
        too_long.extend_from_slice(&[0, 1, 0, 1]);
        assert_malformed(&raw_query(0, [1, 0, 0, 0], &too_long));
    }

    fn parse_reply(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    #[test]
    fn formerr_reply_echoes_header_question_and_opt() {
        let buf = query_bytes("www.example.com.", Some((1232, true)));
        let q = parse_query(&buf).unwrap();
        let mut out = Vec::new();
        write_error_response(&buf, Some(&q), rcode::SERVFAIL, &mut out);
        let m = parse_reply(&out);
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.recursion_desired);
        assert_eq!(u16::from(m.metadata.response_code), rcode::SERVFAIL);
        assert_eq!(m.queries[0].name.to_ascii(), "www.example.com.");
        let edns = m.edns.expect("OPT echoed");
        assert!(edns.flags().dnssec_ok);
        assert_eq!(edns.version(), 0);
    }

    #[test]
    fn error_reply_without_edns_has_no_opt() {
        let buf = query_bytes("example.org.", None);
        let q = parse_query(&buf).unwrap();
        let mut out = vec![1, 2, 3];
        write_error_response(&buf, Some(&q), rcode::REFUSED, &mut out);
        let m = parse_reply(&out);
        assert_eq!(u16::from(m.metadata.response_code), rcode::REFUSED);
        assert!(m.edns.is_none());
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn badvers_reply_carries_extended_rcode_in_opt() {
        let mut body = QUESTION.to_vec();
        body.extend(opt_rr(1232, 1, true, &[]));
        let buf = raw_query(0x0100, [1, 0, 0, 1], &body);
        let err = parse_query(&buf).unwrap_err();
        let mut out = Vec::new();
        write_error_response(&buf, None, err.rcode().unwrap(), &mut out);
        let m = parse_reply(&out);
        assert_eq!(u16::from(m.metadata.response_code), 16);
        assert_eq!(out[3] & 0x0f, 0, "low rcode bits of BADVERS are zero");
        let edns = m.edns.expect("BADVERS needs an OPT");
        assert_eq!(edns.rcode_high(), 1);
        assert_eq!(edns.version(), 0);
        assert!(edns.flags().dnssec_ok);
        assert_eq!(m.queries[0].name.to_ascii(), "www.example.com.");
    }

    #[test]
    fn notimp_reply_keeps_opcode_and_question() {
        let buf = raw_query((4 << 11) | 0x0100, [1, 0, 0, 0], QUESTION);
        let err = parse_query(&buf).unwrap_err();
        assert_eq!(err.rcode(), Some(rcode::NOTIMP));
        let mut out = Vec::new();
        write_error_response(&buf, None, rcode::NOTIMP, &mut out);
        let m = parse_reply(&out);
        assert_eq!(m.metadata.op_code, OpCode::Notify);
        assert_eq!(u16::from(m.metadata.response_code), rcode::NOTIMP);
        assert_eq!(m.queries.len(), 1);
    }

    #[test]
    fn formerr_for_unreadable_question_has_empty_question() {
        let buf = raw_query(0x0100, [3, 0, 0, 0], b"\xff\xff");
        let mut out = Vec::new();
        write_error_response(&buf, None, rcode::FORMERR, &mut out);
        let m = parse_reply(&out);
        assert_eq!(u16::from(m.metadata.response_code), rcode::FORMERR);
        assert!(m.queries.is_empty());
        assert_eq!(out.len(), HEADER_LEN);
        // Even a 3-byte message gets a well-formed reply (the caller decides to drop it).
        write_error_response(&[9, 9, 9], None, rcode::FORMERR, &mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(&out[..2], &[9, 9]);
    }

    #[test]
    fn drop_cases_have_no_rcode() {
        assert_eq!(WireError::TooShort.rcode(), None);
        assert_eq!(WireError::IsResponse.rcode(), None);
        assert_eq!(WireError::Malformed("x").rcode(), Some(rcode::FORMERR));
    }

    fn check_any_input(buf: &[u8]) {
        let parsed = parse_query(buf);
        if let Ok(q) = &parsed {
            assert!(q.question_end <= buf.len());
            assert_eq!(q.qname.last(), Some(&0));
            assert!(q.qname.len() <= MAX_NAME_LEN);
        }
        let mut out = Vec::new();
        write_error_response(buf, parsed.as_ref().ok(), rcode::FORMERR, &mut out);
        assert!(out.len() >= HEADER_LEN);
        write_error_response(buf, None, rcode::BADVERS, &mut out);
        assert!(out.len() >= HEADER_LEN + 11);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_any_input(&buf);
        }

        #[test]
        fn mutated_queries_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut buf = query_bytes("www.Example.com.", Some((1232, true)));
            for (at, value) in flips {
                let len = buf.len();
                buf[at % len] = value;
            }
            buf.truncate(cut % (buf.len() + 1));
            check_any_input(&buf);
        }
    }
}
