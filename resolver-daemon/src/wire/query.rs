//! Client queries: one forward walk validates a message in place and yields a `Query`
//! borrowed from it, or the `WireError` that decides the reply.

use super::header::Header;
use super::{HEADER_LEN, MAX_NAME_LEN, TYPE_OPT, be16, be16_checked, be32, flag, rcode};

/// DO bit inside the OPT record's TTL field (RFC 3225).
pub(super) const EDNS_DO: u32 = 0x8000;
/// Largest DNS message over TCP (two-byte length prefix).
pub const TCP_LIMIT: usize = 65_535;
/// Answer size every UDP client accepts (RFC 1035), and the most we send without asking.
const CLASSIC_UDP_LIMIT: usize = 512;

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
        ((self.flags & flag::OPCODE_MASK) >> 11) as u8
    }
    pub fn recursion_desired(&self) -> bool {
        self.flags & flag::RD != 0
    }
    pub fn checking_disabled(&self) -> bool {
        self.flags & flag::CD != 0
    }
    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    /// The parse result without the borrow, to keep beside the owned message bytes.
    pub fn detach(&self) -> ParsedQuery {
        ParsedQuery {
            id: self.id,
            flags: self.flags,
            qname_len: self.qname.len(),
            qtype: self.qtype,
            qclass: self.qclass,
            edns: self.edns,
            question_end: self.question_end,
        }
    }
}

/// `. IN NS` with RD, the health-check question (as CoreDNS's forward plugin asks it).
pub fn root_ns_query() -> Query<'static> {
    const ROOT: &[u8] = &[0];
    const TYPE_NS: u16 = 2;
    const CLASS_IN: u16 = 1;
    Query {
        id: 0,
        flags: flag::RD,
        qname: ROOT,
        qtype: TYPE_NS,
        qclass: CLASS_IN,
        edns: None,
        question_end: HEADER_LEN + ROOT.len() + 4,
    }
}

/// A `Query` whose message is held elsewhere: the offsets and fields `parse_query` found, so
/// an owned request is parsed exactly once.
#[derive(Debug, Clone, Copy)]
pub struct ParsedQuery {
    id: u16,
    flags: u16,
    qname_len: usize,
    qtype: u16,
    qclass: u16,
    edns: Option<Edns>,
    question_end: usize,
}

impl ParsedQuery {
    /// The query view of `msg`, the message this was parsed from.
    pub fn attach<'a>(&self, msg: &'a [u8]) -> Query<'a> {
        Query {
            id: self.id,
            flags: self.flags,
            qname: msg
                .get(HEADER_LEN..HEADER_LEN + self.qname_len)
                .unwrap_or_default(),
            qtype: self.qtype,
            qclass: self.qclass,
            edns: self.edns,
            question_end: self.question_end,
        }
    }

    pub fn qtype(&self) -> u16 {
        self.qtype
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

impl WireError {
    /// The rcode to answer with, or `None` when the datagram must be dropped silently.
    pub fn rcode(&self) -> Option<u16> {
        match self {
            WireError::TooShort | WireError::IsResponse => None,
            WireError::NotImplemented(_) => Some(rcode::NOTIMP),
            WireError::BadVersion(_) => Some(rcode::BADVERS),
            WireError::Malformed(_) => Some(rcode::FORMERR),
        }
    }
}

/// Validates a client query in place. Checks run in the order that decides the reply:
/// drop (short, QR=1), NOTIMP (opcode), FORMERR (structure), BADVERS (EDNS version).
pub fn parse_query(buf: &[u8]) -> Result<Query<'_>, WireError> {
    let header = Header::read(buf).ok_or(WireError::TooShort)?;
    if header.is_response() {
        return Err(WireError::IsResponse);
    }
    let opcode = header.opcode();
    if opcode != 0 {
        return Err(WireError::NotImplemented(opcode));
    }
    if header.qdcount != 1 {
        return Err(WireError::Malformed("QDCOUNT is not 1"));
    }
    // A query carries nothing in the answer and authority sections (unbound and knot
    // answer FORMERR here too); refusing them keeps the walk below short.
    if header.ancount != 0 || header.nscount != 0 {
        return Err(WireError::Malformed(
            "query has answer or authority records",
        ));
    }
    let question = parse_question(buf, HEADER_LEN)?;
    let edns = parse_query_additional(buf, question.end, header.arcount)?;
    if let Some(e) = edns
        && e.version > 0
    {
        return Err(WireError::BadVersion(e.version));
    }
    Ok(Query {
        id: header.id,
        flags: header.flags,
        qname: &buf[HEADER_LEN..question.name_end],
        qtype: question.qtype,
        qclass: question.qclass,
        edns,
        question_end: question.end,
    })
}

/// Largest UDP answer this client accepts.
pub fn udp_limit(q: &Query<'_>) -> usize {
    match q.edns {
        None => CLASSIC_UDP_LIMIT,
        Some(e) => (e.udp_size as usize).clamp(CLASSIC_UDP_LIMIT, usize::from(super::OUR_UDP_SIZE)),
    }
}

/// Best-effort read of the question bytes and EDNS of a query that `parse_query` refused.
pub(super) fn scan_question_and_edns(query: &[u8]) -> (Option<&[u8]>, Option<Edns>) {
    let Some(header) = Header::read(query) else {
        return (None, None);
    };
    if header.qdcount != 1 {
        return (None, None);
    }
    let Ok(question) = parse_question(query, HEADER_LEN) else {
        return (None, None);
    };
    let edns = if header.ancount == 0 && header.nscount == 0 {
        parse_query_additional(query, question.end, header.arcount)
            .ok()
            .flatten()
    } else {
        None
    };
    (Some(&query[HEADER_LEN..question.end]), edns)
}

/// Position of a parsed question section.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Question {
    pub name_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub end: usize,
}

/// Parses one question whose name must be uncompressed (RFC 1035 label rules).
pub(crate) fn parse_question(buf: &[u8], start: usize) -> Result<Question, WireError> {
    let name_end = parse_uncompressed_name(buf, start)?;
    let end = name_end + 4;
    if end > buf.len() {
        return Err(WireError::Malformed("question truncated"));
    }
    Ok(Question {
        name_end,
        qtype: be16(buf, name_end),
        qclass: be16(buf, name_end + 2),
        end,
    })
}

/// Returns the offset just past an uncompressed name: labels of 1..=63 bytes, ≤ 255 bytes.
fn parse_uncompressed_name(buf: &[u8], start: usize) -> Result<usize, WireError> {
    let mut pos = start;
    loop {
        let len = *buf
            .get(pos)
            .ok_or(WireError::Malformed("question name truncated"))? as usize;
        if len & 0xc0 != 0 {
            // 0xC0 is a compression pointer, 0x40/0x80 are obsolete label types.
            return Err(WireError::Malformed(
                "compressed or extended label in question",
            ));
        }
        pos += 1 + len;
        if pos - start > MAX_NAME_LEN {
            return Err(WireError::Malformed("question name longer than 255 bytes"));
        }
        if len == 0 {
            return Ok(pos);
        }
    }
}

/// Walks the additional section of a query, returning its OPT record if any. Other records
/// (TSIG, SIG(0)) are skipped; two OPT records or trailing bytes are FORMERR (RFC 6891 §6.1.1).
fn parse_query_additional(
    buf: &[u8],
    start: usize,
    arcount: u16,
) -> Result<Option<Edns>, WireError> {
    let mut pos = start;
    let mut edns = None;
    for _ in 0..arcount {
        let rr = read_rr(buf, pos).ok_or(WireError::Malformed("additional record truncated"))?;
        if rr.rtype == TYPE_OPT {
            if edns.is_some() {
                return Err(WireError::Malformed("more than one OPT record"));
            }
            edns = Some(parse_opt(buf, &rr)?);
        }
        pos = rr.end;
    }
    if pos != buf.len() {
        return Err(WireError::Malformed("trailing bytes after the last record"));
    }
    Ok(edns)
}

/// Reads the EDNS fields of an OPT record and checks its option framing.
fn parse_opt(buf: &[u8], rr: &Rr) -> Result<Edns, WireError> {
    if rr.name_start + 1 != rr.type_at || buf[rr.name_start] != 0 {
        return Err(WireError::Malformed("OPT record name is not the root"));
    }
    let mut pos = rr.rdata_start;
    while pos < rr.end {
        if pos + 4 > rr.end {
            return Err(WireError::Malformed("EDNS option header truncated"));
        }
        pos += 4 + be16(buf, pos + 2) as usize;
    }
    if pos != rr.end {
        return Err(WireError::Malformed("EDNS option data truncated"));
    }
    Ok(Edns {
        version: (rr.ttl >> 16) as u8,
        udp_size: rr.class,
        dnssec_ok: rr.ttl & EDNS_DO != 0,
    })
}

/// Location and fixed fields of one resource record inside a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rr {
    pub name_start: usize,
    /// Offset of the TYPE field (just past the owner name).
    pub type_at: usize,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata_start: usize,
    /// Offset just past the record.
    pub end: usize,
}

impl Rr {
    /// Offset of the 32-bit TTL field.
    pub(crate) fn ttl_at(&self) -> usize {
        self.type_at + 4
    }
}

/// Reads the record starting at `pos`; `None` if it runs past the buffer or its name is bad.
pub(crate) fn read_rr(buf: &[u8], pos: usize) -> Option<Rr> {
    let type_at = skip_name(buf, pos)?;
    let rdata_start = type_at + 10;
    if rdata_start > buf.len() {
        return None;
    }
    let end = rdata_start + be16(buf, type_at + 8) as usize;
    if end > buf.len() {
        return None;
    }
    Some(Rr {
        name_start: pos,
        type_at,
        rtype: be16(buf, type_at),
        class: be16(buf, type_at + 2),
        ttl: be32(buf, type_at + 4),
        rdata_start,
        end,
    })
}

/// Returns the offset just past a possibly compressed name. A compression pointer ends the
/// name where it stands, so pointers are never followed (no loops to guard against); the
/// pointer target must lie before the pointer, as RFC 1035 compression always does.
pub(crate) fn skip_name(buf: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    loop {
        let len = *buf.get(pos)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => {
                pos += 1 + len;
                if pos - start > MAX_NAME_LEN {
                    return None;
                }
            }
            0xc0 => {
                let target = (be16_checked(buf, pos)? & 0x3fff) as usize;
                return (target < pos).then_some(pos + 2);
            }
            _ => return None,
        }
    }
}
