//! Wire-format view of DNS queries for the hot path (owned by the cache/hot-path work).
//!
//! SEAM CONTRACT (agreed between the cache/wire work and the server/forwarder work;
//! signatures may gain methods but these must keep their meaning):
//! - `parse_query(buf)` validates a client datagram/TCP message without allocating.
//! - `write_error_response(..)` builds FORMERR/NOTIMP/BADVERS/SERVFAIL/REFUSED replies.
//! - `udp_limit(&Query)` is the answer size a UDP client accepts (512 without EDNS, else its
//!   EDNS size clamped to [512, 1232]).

/// EDNS(0) OPT record of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub version: u8,
    pub udp_size: u16,
    pub dnssec_ok: bool,
}

/// A parsed query: borrowed from the datagram, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub id: u16,
    /// Raw header flags word (QR, opcode, AA, TC, RD, RA, Z, AD, CD, rcode).
    pub flags: u16,
    /// Question name in wire format as the client sent it (labels + root), never compressed.
    pub qname: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// Offset just past the question section.
    pub question_end: usize,
}

impl Query<'_> {
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn recursion_desired(&self) -> bool {
        self.flags & 0x0100 != 0
    }
    pub fn checking_disabled(&self) -> bool {
        self.flags & 0x0010 != 0
    }
    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }
}

/// Why a datagram is not a query we can answer from the fast path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header: drop silently (nothing to answer to).
    #[error("message shorter than a DNS header")]
    TooShort,
    /// QR=1: a response sent to us; drop silently (reflection guard).
    #[error("QR bit set")]
    IsResponse,
    /// Opcode other than QUERY: answer NOTIMP.
    #[error("opcode {0} not implemented")]
    NotImplemented(u8),
    /// EDNS version > 0: answer BADVERS.
    #[error("EDNS version {0} not supported")]
    BadVersion(u8),
    /// Anything else malformed (QDCOUNT != 1, truncated question, bad labels, bad OPT): FORMERR.
    #[error("malformed query: {0}")]
    Malformed(&'static str),
}

pub fn parse_query(_buf: &[u8]) -> Result<Query<'_>, WireError> {
    todo!("cache/wire work")
}

/// Largest UDP answer this client accepts.
pub fn udp_limit(q: &Query<'_>) -> usize {
    match q.edns {
        None => 512,
        Some(e) => (e.udp_size as usize).clamp(512, 1232),
    }
}

/// Writes an error reply (header copied from the query with QR=1 and `rcode`; the question
/// echoed when it parsed; an OPT record when the query had one — required for BADVERS,
/// whose upper rcode bits live in the OPT TTL). `rcode` is the full 12-bit extended rcode.
pub fn write_error_response(
    _query: &[u8],
    _parsed: Option<&Query<'_>>,
    _rcode: u16,
    _out: &mut Vec<u8>,
) {
    todo!("cache/wire work")
}
