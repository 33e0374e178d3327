//! Cache entries: an upstream reply stored in wire format plus the offsets of its TTL fields.
//!
//! Insert walks the reply's records once and stores it without its OPT record (and without
//! any records after the OPT), so that a hit is a memcpy, a few in-place patches and, for
//! EDNS clients, a fresh 11-byte OPT record carrying the client's DO bit.

use super::key::{CacheKey, FLAG_CD, FLAG_DO};
use super::{CacheConfig, EntryKind};
use crate::wire::{
    self, Edns, HEADER_LEN, Header, OUR_UDP_SIZE, Query, TYPE_OPT, TYPE_SOA, be16, be32, flag,
    put32, rcode, read_rr, skip_name,
};
use std::time::{Duration, Instant};

/// Length of the OPT record written to EDNS clients (root name, fixed fields, no options).
const OPT_LEN: usize = 11;

/// An upstream reply checked for cacheability and normalised for storage.
#[derive(Debug)]
pub(super) struct PreparedEntry {
    pub kind: EntryKind,
    /// Smallest TTL the reply allows before clamping (RRs, or the SOA rule for negatives).
    pub min_ttl: u32,
    wire: Vec<u8>,
    ttl_offsets: Vec<u16>,
    question_end: usize,
}

/// Running state of the walk over a reply's records.
#[derive(Default)]
struct RecordWalk {
    ttl_offsets: Vec<u16>,
    min_ttl: Option<u32>,
    negative_ttl: Option<u32>,
    /// Where the OPT record starts and the extended rcode bits it carries.
    opt: Option<(usize, u8)>,
    end: usize,
}

impl PreparedEntry {
    /// Decides whether `response` (the upstream's reply to `q`) may be cached and how long.
    pub(super) fn from_response(q: &Query<'_>, response: &[u8]) -> Result<Self, &'static str> {
        if response.len() > usize::from(u16::MAX) {
            return Err("reply longer than 65535 bytes");
        }
        let header = Header::read(response).ok_or("reply shorter than a DNS header")?;
        check_header(&header)?;
        let question_end = check_question(q, response)?;
        let walk = walk_records(response, &header, question_end)?;
        let ext_rcode = walk.opt.map_or(0, |(_, ext)| ext);
        let full_rcode = (u16::from(ext_rcode) << 4) | (header.flags & flag::RCODE_MASK);
        let kind = classify(full_rcode, header.ancount)?;
        let min_ttl = match kind {
            EntryKind::Success => walk.min_ttl.ok_or("positive answer without records")?,
            EntryKind::Denial => {
                let soa = walk.negative_ttl.ok_or("negative answer without SOA")?;
                walk.min_ttl.map_or(soa, |ttl| ttl.min(soa))
            }
        };
        let wire = wire_without_opt(response, &walk);
        Ok(Self {
            kind,
            min_ttl,
            wire,
            ttl_offsets: walk.ttl_offsets,
            question_end,
        })
    }
}

fn check_header(header: &Header) -> Result<(), &'static str> {
    if header.flags & flag::QR == 0 {
        return Err("not a response (QR=0)");
    }
    if header.flags & flag::OPCODE_MASK != 0 {
        return Err("opcode is not QUERY");
    }
    if header.flags & flag::TC != 0 {
        return Err("truncated reply (TC=1)");
    }
    if header.qdcount != 1 {
        return Err("reply QDCOUNT is not 1");
    }
    Ok(())
}

/// The reply's question must be the query's (names compared case-insensitively).
fn check_question(q: &Query<'_>, response: &[u8]) -> Result<usize, &'static str> {
    let question = wire::parse_question(response, HEADER_LEN).map_err(|_| "bad question")?;
    let name = &response[HEADER_LEN..question.name_end];
    if !name.eq_ignore_ascii_case(q.qname)
        || question.qtype != q.qtype
        || question.qclass != q.qclass
    {
        return Err("reply question does not match the query");
    }
    Ok(question.end)
}

/// Only NOERROR and NXDOMAIN are cached; NXDOMAIN and NODATA are denials (RFC 2308).
fn classify(full_rcode: u16, ancount: u16) -> Result<EntryKind, &'static str> {
    match full_rcode {
        rcode::NOERROR if ancount > 0 => Ok(EntryKind::Success),
        rcode::NOERROR | rcode::NXDOMAIN => Ok(EntryKind::Denial),
        rcode::SERVFAIL => Err("SERVFAIL is not cached"),
        rcode::REFUSED => Err("REFUSED is not cached"),
        rcode::FORMERR => Err("FORMERR is not cached"),
        _ => Err("rcode is not cacheable"),
    }
}

/// Walks answer, authority and additional records once, noting TTL offsets, the smallest
/// TTL, the SOA-derived negative TTL and the OPT record. Records after the OPT are left out
/// (additional data is optional): nothing before the OPT can point into them.
fn walk_records(
    response: &[u8],
    header: &Header,
    question_end: usize,
) -> Result<RecordWalk, &'static str> {
    let mut walk = RecordWalk {
        end: question_end,
        ..RecordWalk::default()
    };
    let sections = [
        (header.ancount, false),
        (header.nscount, true),
        (header.arcount, false),
    ];
    for (count, is_authority) in sections {
        for _ in 0..count {
            let rr = read_rr(response, walk.end).ok_or("record runs past the reply")?;
            if rr.rtype == TYPE_OPT {
                if walk.opt.is_some() {
                    return Err("more than one OPT record");
                }
                walk.opt = Some((rr.name_start, (rr.ttl >> 24) as u8));
                return Ok(walk);
            }
            let ttl_at = u16::try_from(rr.ttl_at()).map_err(|_| "record offset too large")?;
            walk.ttl_offsets.push(ttl_at);
            walk.min_ttl = Some(walk.min_ttl.map_or(rr.ttl, |m| m.min(rr.ttl)));
            if is_authority && rr.rtype == TYPE_SOA {
                let minimum = soa_minimum(response, rr.rdata_start, rr.end)?;
                let negative = rr.ttl.min(minimum);
                walk.negative_ttl = Some(walk.negative_ttl.map_or(negative, |n| n.min(negative)));
            }
            walk.end = rr.end;
        }
    }
    Ok(walk)
}

/// MINIMUM field of SOA rdata: after MNAME, RNAME and four 32-bit fields.
fn soa_minimum(response: &[u8], rdata_start: usize, rdata_end: usize) -> Result<u32, &'static str> {
    let rdata = &response[..rdata_end];
    let after_mname = skip_name(rdata, rdata_start).ok_or("bad SOA MNAME")?;
    let after_rname = skip_name(rdata, after_mname).ok_or("bad SOA RNAME")?;
    if after_rname + 20 != rdata_end {
        return Err("bad SOA rdata length");
    }
    Ok(be32(response, after_rname + 16))
}

/// The bytes to store: the reply up to its last record before the OPT. The OPT itself is
/// per client (its DO bit, its presence), and the upstream's options (cookies, padding) were
/// meant for the forwarder, not for every client that will read this entry.
fn wire_without_opt(response: &[u8], walk: &RecordWalk) -> Vec<u8> {
    let body_end = walk.opt.map_or(walk.end, |(start, _)| start);
    let mut wire = response[..body_end].to_vec();
    let kept_records = walk.ttl_offsets.len() as u16;
    let header = Header::read(response).map_or([0; 3], |h| [h.ancount, h.nscount, h.arcount]);
    // The walk stops at the OPT, so sections past it may be partly kept: recount them.
    let answers = header[0].min(kept_records);
    let authority = header[1].min(kept_records - answers);
    wire::set_record_counts(
        &mut wire,
        answers,
        authority,
        kept_records - answers - authority,
    );
    wire
}

/// A random value in 128..=255.
fn prefetch_jitter() -> u8 {
    128 | (super::key::next_random() >> 57) as u8
}

/// The reply followed by its TTL offsets, in one allocation.
fn entry_data(mut wire: Vec<u8>, ttl_offsets: &[u16]) -> Box<[u8]> {
    wire.reserve_exact(2 * ttl_offsets.len());
    for offset in ttl_offsets {
        wire.extend_from_slice(&offset.to_ne_bytes());
    }
    wire.into_boxed_slice()
}

/// An entry's state at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freshness {
    /// Whole seconds left (≥ 1), and the entry's exact age (for the prefetch point).
    Fresh { left: u32, age: Duration },
    /// Expired, within the stale window: only `answer_stale` serves it.
    Stale,
    /// Expired for longer than the stale window: nothing can use it any more.
    Dead,
}

/// What the idle sweep found an entry to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdleState {
    /// Not popular, already being refreshed, out of unasked refreshes, or expired.
    Ignored,
    /// Popular and fresh, not due yet: the sweep must keep looking at it.
    Watched,
    /// Due: refreshed by the sweep (marked as signalled).
    Claimed,
}

/// How answer TTLs are rewritten on the way out.
#[derive(Debug, Clone, Copy)]
pub(super) enum TtlRewrite {
    /// Fresh hit: seconds left on the entry; no record is shown above its original TTL.
    CountDown(u32),
    /// Stale hit: every record gets this TTL (RFC 8767).
    Fixed(u32),
}

/// A stored entry. `prev`/`next` link it into its shard's LRU list of its kind.
#[derive(Debug)]
pub(super) struct Entry {
    /// Key hash and DO/CD flags: with the stored question they rebuild the key.
    key_hash: u64,
    key_flags: u8,
    /// The reply (`wire_len` bytes) followed by its TTL offsets (u16, native endian): one
    /// allocation per entry.
    data: Box<[u8]>,
    wire_len: u16,
    question_end: u16,
    kind: EntryKind,
    /// Clamped TTL in seconds, counted from `stored`.
    ttl: u32,
    stored: Instant,
    /// Entry age (seconds) when the current prefetch hit-counting window began; negative when
    /// the window began under an entry this one replaced (popularity belongs to the question,
    /// not to one fetch of its answer).
    window_start: i32,
    hits_in_window: u32,
    prefetch_signalled: bool,
    /// Where in the last `prefetch_percent` of the TTL this entry is refreshed, in 256ths of
    /// that share (128..=255: its first half). Random per entry, so entries stored together
    /// (a warm-up, a pod's burst) do not all come due in the same instant every TTL.
    prefetch_jitter: u8,
    /// A client was answered from this entry (background refreshes do not count).
    asked: bool,
    /// How many entries in a row before this one went unasked: bounds the refreshes the
    /// idle sweep spends on a name nobody asks for any more.
    unasked_before: u8,
    pub prev: u32,
    pub next: u32,
    /// Shard-local recency stamp, to pick the older of the two LRU tails.
    pub last_used: u64,
}

impl Entry {
    pub(super) fn new(key: &CacheKey, prepared: PreparedEntry, ttl: u32, now: Instant) -> Self {
        Self {
            key_hash: key.hash(),
            key_flags: key.flags(),
            // Fits: the reply is at most 65535 bytes (checked in from_response).
            wire_len: prepared.wire.len() as u16,
            question_end: prepared.question_end as u16,
            data: entry_data(prepared.wire, &prepared.ttl_offsets),
            kind: prepared.kind,
            ttl,
            stored: now,
            window_start: 0,
            hits_in_window: 0,
            prefetch_signalled: false,
            prefetch_jitter: prefetch_jitter(),
            asked: false,
            unasked_before: 0,
            prev: u32::MAX,
            next: u32::MAX,
            last_used: 0,
        }
    }

    fn wire(&self) -> &[u8] {
        &self.data[..usize::from(self.wire_len)]
    }

    fn ttl_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.data[usize::from(self.wire_len)..]
            .chunks_exact(2)
            .map(|pair| usize::from(u16::from_ne_bytes([pair[0], pair[1]])))
    }

    pub(super) fn kind(&self) -> EntryKind {
        self.kind
    }

    /// The key this entry is stored under in its shard's map.
    pub(super) fn key(&self) -> CacheKey {
        let question = &self.wire()[HEADER_LEN..usize::from(self.question_end)];
        CacheKey::from_stored(self.key_hash, self.key_flags, question)
    }

    /// Heap and table bytes this entry accounts for against the byte budget: the entry, its
    /// map slot and key, its reply and TTL offsets.
    pub(super) fn footprint(&self) -> usize {
        const MAP_SLOT: usize = size_of::<(Box<[u8]>, u32)>() + 1;
        let key_len = CacheKey::len_for_name(usize::from(self.question_end) - HEADER_LEN - 4);
        size_of::<Self>() + MAP_SLOT + key_len + self.data.len()
    }

    fn ttl_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl))
    }

    /// Where the entry stands at `now` (one clock subtraction for the whole hit path).
    pub(super) fn freshness(&self, now: Instant, stale_window: Duration) -> Freshness {
        let age = now.saturating_duration_since(self.stored);
        let ttl = self.ttl_duration();
        if age < ttl {
            Freshness::Fresh {
                left: self.ttl - age.as_secs() as u32,
                age,
            }
        } else if age <= ttl + stale_window {
            Freshness::Stale
        } else {
            Freshness::Dead
        }
    }

    /// Counts a fresh hit; true at most once per entry, when the question was asked often
    /// enough within the window and less than the configured share of the TTL is left.
    /// Millisecond precision: with the Deckhouse module's 5 s denial TTL, "25 % left" is the last 1.25 s.
    pub(super) fn note_hit(&mut self, age: Duration, cfg: &CacheConfig) -> bool {
        self.asked = true;
        let age_secs = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        if !self.window_covers(age_secs, cfg) {
            self.window_start = i32::try_from(age_secs).unwrap_or(i32::MAX);
            self.hits_in_window = 0;
        }
        self.hits_in_window = self.hits_in_window.saturating_add(1);
        if self.prefetch_signalled || self.hits_in_window < cfg.prefetch_hits {
            return false;
        }
        self.claim_refresh_if_due(age, cfg, self.prefetch_jitter)
    }

    /// The idle sweep's test, for entries whose prefetch point passed without a hit to
    /// trigger the refresh: a popular question (asked ≥ `prefetch_hits` times within the
    /// window) is refreshed anyway, at most `prefetch_unasked` times in a row while nobody asks.
    /// A name asked every few seconds then never waits for a miss after a pause of up to
    /// about `prefetch_unasked` TTLs, and one that stopped being asked costs at most that
    /// many upstream queries. True at most once per entry (shared with the hit path).
    pub(super) fn claim_idle_refresh(&mut self, now: Instant, cfg: &CacheConfig) -> IdleState {
        // Cheap field tests first: most entries of a full cache fail one of them, and the
        // sweep visits every entry four times a second.
        if self.prefetch_signalled
            || self.unasked_in_a_row() >= cfg.prefetch_unasked
            || self.hits_in_window < cfg.prefetch_hits
        {
            return IdleState::Ignored;
        }
        let age = now.saturating_duration_since(self.stored);
        let age_secs = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        if age >= self.ttl_duration() || !self.window_covers(age_secs, cfg) {
            return IdleState::Ignored;
        }
        // Half-way through the prefetch window: a name still being asked is usually
        // refreshed by its next hit first, spread out as hits come, instead of in the
        // sweep's batches.
        if self.claim_refresh_if_due(age, cfg, self.prefetch_jitter / 2) {
            IdleState::Claimed
        } else {
            IdleState::Watched
        }
    }

    /// Entries in a row, this one included, that no client was answered from.
    fn unasked_in_a_row(&self) -> u8 {
        if self.asked {
            0
        } else {
            self.unasked_before.saturating_add(1)
        }
    }

    /// Whether the hit-counting window that began at `window_start` still runs at `age`.
    fn window_covers(&self, age_secs: i64, cfg: &CacheConfig) -> bool {
        let window = i64::try_from(cfg.prefetch_window.as_secs()).unwrap_or(i64::MAX);
        age_secs.saturating_sub(i64::from(self.window_start)) <= window
    }

    /// Marks the entry as being refreshed once less than `share_256ths` of its prefetch
    /// share of the TTL is left.
    fn claim_refresh_if_due(&mut self, age: Duration, cfg: &CacheConfig, share_256ths: u8) -> bool {
        let ttl_ms = u128::from(self.ttl) * 1000;
        let left_ms = ttl_ms.saturating_sub(age.as_millis());
        let threshold = u128::from(cfg.prefetch_percent) * u128::from(share_256ths);
        if left_ms * 100 * 256 < ttl_ms * threshold {
            self.prefetch_signalled = true;
            return true;
        }
        false
    }

    /// Carries the hit-counting window of the entry this one replaces, so that a popular
    /// question keeps being prefetched although each entry lives only one (short) TTL.
    pub(super) fn inherit_popularity(&mut self, old: &Entry) {
        let gap = self.stored.saturating_duration_since(old.stored).as_secs();
        let start = i64::from(old.window_start) - i64::try_from(gap).unwrap_or(i64::MAX);
        self.window_start = i32::try_from(start).unwrap_or(i32::MIN);
        self.hits_in_window = old.hits_in_window;
        self.unasked_before = old.unasked_in_a_row();
    }

    /// A query for this entry's question with its DO and CD bits: what the idle sweep hands
    /// to the forwarder, so that the answer replaces this very entry.
    pub(super) fn refresh_query(&self) -> Vec<u8> {
        let question = &self.wire()[HEADER_LEN..usize::from(self.question_end)];
        let name_end = question.len().saturating_sub(4);
        let cd = if self.key_flags & FLAG_CD != 0 {
            flag::CD
        } else {
            0
        };
        let q = Query {
            id: 0,
            flags: flag::RD | cd,
            qname: &question[..name_end],
            qtype: be16(question, name_end),
            qclass: be16(question, name_end + 2),
            edns: Some(Edns {
                version: 0,
                udp_size: OUR_UDP_SIZE,
                dnssec_ok: self.key_flags & FLAG_DO != 0,
            }),
            question_end: usize::from(self.question_end),
        };
        wire::build_query(&q, 0)
    }

    /// Writes the reply for client query `q` into `out` (cleared first).
    pub(super) fn write_reply(
        &self,
        q: &Query<'_>,
        ttls: TtlRewrite,
        out: &mut Vec<u8>,
        limit: usize,
    ) {
        let opt_len = if q.edns.is_some() { OPT_LEN } else { 0 };
        out.clear();
        if self.wire().len() + opt_len <= limit {
            out.extend_from_slice(self.wire());
            self.rewrite_ttls(out, ttls);
        } else {
            self.write_truncated(out);
        }
        if q.edns.is_some() {
            // Only NOERROR and NXDOMAIN are cached: no extended rcode bits to carry.
            wire::append_opt(out, q.dnssec_ok());
        }
        self.patch_client_fields(q, out);
    }

    /// Header and question only, TC=1: the client retries over TCP.
    fn write_truncated(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.wire()[..usize::from(self.question_end)]);
        wire::mark_truncated(out);
    }

    fn rewrite_ttls(&self, out: &mut [u8], ttls: TtlRewrite) {
        for at in self.ttl_offsets() {
            let ttl = match ttls {
                TtlRewrite::CountDown(left) => be32(out, at).min(left),
                TtlRewrite::Fixed(ttl) => ttl,
            };
            put32(out, at, ttl);
        }
    }

    /// The client's ID, RD bit and question bytes (its 0x20 case pattern). AD stays set only
    /// for clients that asked with AD or DO (RFC 6840 §5.8).
    fn patch_client_fields(&self, q: &Query<'_>, out: &mut [u8]) {
        wire::set_id(out, q.id);
        let mut flags = (wire::flags(out) & !flag::RD) | (q.flags & flag::RD);
        if q.flags & flag::AD == 0 && !q.dnssec_ok() {
            flags &= !flag::AD;
        }
        wire::set_flags(out, flags);
        let name_end = HEADER_LEN + q.qname.len();
        if name_end <= usize::from(self.question_end) {
            out[HEADER_LEN..name_end].copy_from_slice(q.qname);
        }
    }
}
