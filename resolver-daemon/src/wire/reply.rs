//! Upstream replies: whether one answers our query, and making an uncached one a client's.

use super::header::{Header, append_opt, has_additional, mark_truncated, set_id};
use super::{HEADER_LEN, Query};

/// ID, QR=1, opcode QUERY and exactly our question (name case-insensitively). The rest of
/// the message is validated by whoever uses it: the cache's parser before caching,
/// `rewrite_for_client` before passing an uncached reply on.
pub fn reply_matches(reply: &[u8], q: &Query<'_>, id: u16) -> bool {
    let Some(header) = Header::read(reply) else {
        return false;
    };
    if header.id != id || !header.is_response() || header.opcode() != 0 || header.qdcount != 1 {
        return false;
    }
    let name_end = HEADER_LEN + q.qname.len();
    let Some(name) = reply.get(HEADER_LEN..name_end) else {
        return false;
    };
    let Some(type_class) = reply.get(name_end..name_end + 4) else {
        return false;
    };
    name.eq_ignore_ascii_case(q.qname)
        && type_class[..2] == q.qtype.to_be_bytes()
        && type_class[2..] == q.qclass.to_be_bytes()
}

/// An upstream reply the cache did not keep (SERVFAIL, no-SOA negative, ...), made this
/// client's: its ID, its question's letter case, no OPT unless it sent EDNS, TC when too big.
/// `None` when the reply is not a well-formed message.
pub fn rewrite_for_client(resp: &[u8], q: &Query<'_>, limit: usize) -> Option<Vec<u8>> {
    // The cache did not vouch for this reply: it must at least be a well-formed message.
    let mut msg = hickory_proto::op::Message::from_vec(resp).ok()?;
    let mut out = if q.edns.is_none() && has_additional(resp) {
        msg.edns = None;
        msg.to_vec().ok()?
    } else {
        resp.to_vec()
    };
    let name_end = HEADER_LEN + q.qname.len();
    let question_end = name_end + 4;
    if out.len() < question_end {
        return None;
    }
    set_id(&mut out, q.id);
    out[HEADER_LEN..name_end].copy_from_slice(q.qname);
    if out.len() > limit {
        out.truncate(question_end);
        mark_truncated(&mut out);
        if let Some(e) = q.edns {
            append_opt(&mut out, e.dnssec_ok);
        }
    }
    Some(out)
}

/// `www.Example.com.` wire form → `www.example.com` (escaping is irrelevant for suffix tests).
pub fn dotted_lowercase(qname: &[u8]) -> String {
    let mut out = String::with_capacity(qname.len());
    let mut i = 0;
    while let Some(&len) = qname.get(i) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        let Some(label) = qname.get(i + 1..i + 1 + len as usize) else {
            break;
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
        i += 1 + len as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Edns, build_query, is_truncated, reply_rcode};

    const QNAME: &[u8] = b"\x03www\x07Example\x03com\x00";

    fn query(edns: Option<Edns>) -> Query<'static> {
        Query {
            id: 7,
            flags: 0x0110,
            qname: QNAME,
            qtype: 1,
            qclass: 1,
            edns,
            question_end: 12 + QNAME.len() + 4,
        }
    }

    fn reply_for(id: u16, qname: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&id.to_be_bytes());
        r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]);
        r.extend_from_slice(qname);
        r.extend_from_slice(&[0, 1, 0, 1]);
        r
    }

    #[test]
    fn built_query_carries_question_cd_and_edns() {
        let m = build_query(&query(None), 0xbeef);
        let parsed = hickory_proto::op::Message::from_vec(&m).unwrap();
        assert_eq!(parsed.metadata.id, 0xbeef);
        assert!(parsed.metadata.recursion_desired);
        assert!(parsed.metadata.checking_disabled);
        assert_eq!(parsed.queries.len(), 1);
        assert_eq!(parsed.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    }

    #[test]
    fn accepts_only_matching_replies() {
        let q = query(None);
        assert!(reply_matches(
            &reply_for(9, b"\x03WWW\x07example\x03COM\x00"),
            &q,
            9
        ));
        assert!(!reply_matches(&reply_for(10, QNAME), &q, 9), "wrong id");
        assert!(
            !reply_matches(&reply_for(9, b"\x03xxx\x07example\x03com\x00"), &q, 9),
            "wrong name"
        );
        let mut not_response = reply_for(9, QNAME);
        not_response[2] &= 0x7f;
        assert!(!reply_matches(&not_response, &q, 9), "QR=0");
        let mut wrong_type = reply_for(9, QNAME);
        let n = wrong_type.len();
        wrong_type[n - 3] = 28;
        assert!(!reply_matches(&wrong_type, &q, 9), "wrong type");
        assert!(
            !reply_matches(&reply_for(9, QNAME)[..14], &q, 9),
            "truncated"
        );
    }

    #[test]
    fn client_rewrite_takes_the_clients_id_and_letter_case() {
        let resp = reply_for(9, b"\x03WWW\x07example\x03COM\x00");
        let out = rewrite_for_client(&resp, &query(None), 512).unwrap();
        assert_eq!(message_id_of(&out), 7);
        assert_eq!(&out[HEADER_LEN..HEADER_LEN + QNAME.len()], QNAME);
        assert!(!is_truncated(&out));
        assert_eq!(reply_rcode(&out), 0);
    }

    #[test]
    fn malformed_is_refused_and_too_big_becomes_header_question_tc_and_opt() {
        let mut resp = reply_for(9, QNAME);
        resp[7] = 3; // three answers promised, none there: not a message to pass on
        assert!(rewrite_for_client(&resp, &query(None), 512).is_none());
        let edns = Edns {
            version: 0,
            udp_size: 512,
            dnssec_ok: true,
        };
        let big = big_reply();
        let out = rewrite_for_client(&big, &query(Some(edns)), 512).unwrap();
        let m = hickory_proto::op::Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert!(m.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
        let out = rewrite_for_client(&big, &query(None), 512).unwrap();
        assert_eq!(
            out.len(),
            HEADER_LEN + QNAME.len() + 4,
            "no OPT without EDNS"
        );
    }

    fn message_id_of(m: &[u8]) -> u16 {
        u16::from_be_bytes([m[0], m[1]])
    }

    /// A well-formed reply with 40 A records (over 512 bytes).
    fn big_reply() -> Vec<u8> {
        let mut r = reply_for(9, QNAME);
        r[7] = 40; // ANCOUNT
        for i in 0..40u8 {
            // owner: pointer to the question name; A IN, TTL 30, 4 bytes
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, i]);
        }
        r
    }

    #[test]
    fn names_are_dotted_and_lowercased() {
        assert_eq!(dotted_lowercase(QNAME), "www.example.com");
        assert_eq!(dotted_lowercase(b"\x00"), "");
        assert_eq!(
            dotted_lowercase(b"\x05ab"),
            "",
            "truncated label stops the walk"
        );
    }
}
