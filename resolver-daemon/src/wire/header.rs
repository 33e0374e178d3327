//! The fixed 12-byte header: reading it, and the patches replies get (ID, TC, counts, OPT).

use super::{HEADER_LEN, be16, be16_checked, flag, put16, rcode, write_opt_record};

/// Byte offsets of the header fields (RFC 1035 §4.1.1).
const ID_AT: usize = 0;
const FLAGS_AT: usize = 2;
const QDCOUNT_AT: usize = 4;
const ANCOUNT_AT: usize = 6;
const NSCOUNT_AT: usize = 8;
const ARCOUNT_AT: usize = 10;

/// Section counts and flags of a message header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub(crate) fn read(buf: &[u8]) -> Option<Header> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            id: be16(buf, ID_AT),
            flags: be16(buf, FLAGS_AT),
            qdcount: be16(buf, QDCOUNT_AT),
            ancount: be16(buf, ANCOUNT_AT),
            nscount: be16(buf, NSCOUNT_AT),
            arcount: be16(buf, ARCOUNT_AT),
        })
    }

    /// The opcode (0 is QUERY).
    pub(crate) fn opcode(&self) -> u8 {
        ((self.flags & flag::OPCODE_MASK) >> 11) as u8
    }

    pub(crate) fn is_response(&self) -> bool {
        self.flags & flag::QR != 0
    }
}

/// The message ID, if the message is long enough to have one.
pub fn message_id(msg: &[u8]) -> Option<u16> {
    be16_checked(msg, ID_AT)
}

/// The header rcode of a reply (extended bits live in the OPT record; callers that write
/// BADVERS know it already). A reply too short to carry one counts as SERVFAIL.
pub fn reply_rcode(reply: &[u8]) -> u16 {
    // The rcode is in the low byte of the flags word: one byte to read on every answer.
    reply
        .get(FLAGS_AT + 1)
        .map_or(rcode::SERVFAIL, |&low| u16::from(low) & flag::RCODE_MASK)
}

/// The flags word of a message long enough to have one.
pub(crate) fn flags_of(msg: &[u8]) -> Option<u16> {
    be16_checked(msg, FLAGS_AT)
}

/// TC=1: the answer did not fit; the full one needs TCP.
pub fn is_truncated(reply: &[u8]) -> bool {
    be16_checked(reply, FLAGS_AT).is_some_and(|f| f & flag::TC != 0)
}

/// Writes the client's ID into a reply of at least a header's length.
pub(crate) fn set_id(out: &mut [u8], id: u16) {
    put16(out, ID_AT, id);
}

/// Header flags of a message of at least a header's length.
pub(crate) fn flags(msg: &[u8]) -> u16 {
    be16(msg, FLAGS_AT)
}

pub(crate) fn set_flags(out: &mut [u8], flags: u16) {
    put16(out, FLAGS_AT, flags);
}

/// Answer, authority and additional counts of a reply being written.
pub(crate) fn set_record_counts(out: &mut [u8], answers: u16, authority: u16, additional: u16) {
    put16(out, ANCOUNT_AT, answers);
    put16(out, NSCOUNT_AT, authority);
    put16(out, ARCOUNT_AT, additional);
}

/// Turns a reply cut after its question (`out` holds header and question only) into a
/// truncated one: TC=1, no records, so the client retries over TCP.
pub(crate) fn mark_truncated(out: &mut [u8]) {
    let tc = flags(out) | flag::TC;
    set_flags(out, tc);
    set_record_counts(out, 0, 0, 0);
}

/// Appends our OPT record (rcode 0, the client's DO bit) and counts it as additional.
pub(crate) fn append_opt(out: &mut Vec<u8>, dnssec_ok: bool) {
    write_opt_record(out, 0, dnssec_ok);
    let additional = be16(out, ARCOUNT_AT).wrapping_add(1);
    put16(out, ARCOUNT_AT, additional);
}

/// Whether a message has records in its additional section.
pub(crate) fn has_additional(msg: &[u8]) -> bool {
    be16_checked(msg, ARCOUNT_AT).is_some_and(|n| n != 0)
}
