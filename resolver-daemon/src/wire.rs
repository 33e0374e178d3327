//! Wire-format view of DNS queries for the hot path (owned by the cache/hot-path work).
//!
//! SEAM CONTRACT (agreed between the cache/wire work and the server/forwarder work;
//! signatures may gain methods but these must keep their meaning):
//! - `parse_query(buf)` validates a client datagram/TCP message without allocating.
//! - `write_error_response(..)` builds FORMERR/NOTIMP/BADVERS/SERVFAIL/REFUSED replies.
//! - `udp_limit(&Query)` is the answer size a UDP client accepts (512 without EDNS, else its
//!   EDNS size clamped to [512, 1232]).
//!
//! Everything here reads the message in place: a query is validated by one forward walk over
//! header, question and additional section, and nothing is copied until a reply is written.

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

/// DO bit inside the OPT record's TTL field (RFC 3225).
const EDNS_DO: u32 = 0x8000;

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
            id: be16(buf, 0),
            flags: be16(buf, 2),
            qdcount: be16(buf, 4),
            ancount: be16(buf, 6),
            nscount: be16(buf, 8),
            arcount: be16(buf, 10),
        })
    }
}

/// Validates a client query in place. Checks run in the order that decides the reply:
/// drop (short, QR=1), NOTIMP (opcode), FORMERR (structure), BADVERS (EDNS version).
pub fn parse_query(buf: &[u8]) -> Result<Query<'_>, WireError> {
    let header = Header::read(buf).ok_or(WireError::TooShort)?;
    if header.flags & flag::QR != 0 {
        return Err(WireError::IsResponse);
    }
    let opcode = ((header.flags & flag::OPCODE_MASK) >> 11) as u8;
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
        None => 512,
        Some(e) => (e.udp_size as usize).clamp(512, 1232),
    }
}

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
    let id = if query.len() >= 2 { be16(query, 0) } else { 0 };
    let query_flags = if query.len() >= 4 { be16(query, 2) } else { 0 };
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
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    m.extend_from_slice(q.qname);
    m.extend_from_slice(&q.qtype.to_be_bytes());
    m.extend_from_slice(&q.qclass.to_be_bytes());
    write_opt_record(&mut m, 0, q.dnssec_ok());
    m
}

/// Best-effort read of the question bytes and EDNS of a query that `parse_query` refused.
fn scan_question_and_edns(query: &[u8]) -> (Option<&[u8]>, Option<Edns>) {
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
