//! The answer cache: wire-format entries, TTLs that count down, serve-stale, prefetch hints.
//!
//! SEAM CONTRACT (agreed between the cache/wire work and the server/forwarder work):
//! - `Cache` is `Send + Sync`; every method takes `&self` and an explicit `now` (tests inject
//!   time). Keys: (qname case-insensitively, qtype, qclass, DO, CD) taken from the `Query`.
//! - `answer` writes a complete reply for *this* client into `out`: its ID, its question bytes
//!   (case preserved), TTLs decremented by the entry's age, the OPT record only if the client
//!   sent EDNS, and TC=1 with no records past the question when longer than `limit`.
//! - `insert` takes the upstream's reply (already matched to the query by the forwarder) and
//!   decides cacheability (RFC 2308; SERVFAIL and TC never cached; negative without SOA never).
//! - `answer_stale` serves an expired entry (≤ stale window old) with TTL `stale_ttl`.
//! - Prefetch: `Answer::Fresh { prefetch: true }` is returned once per refresh cycle when an
//!   entry was asked ≥ `prefetch_hits` times within `prefetch_window` and less than
//!   `prefetch_percent` of its TTL is left; the caller refreshes it in the background.

use crate::wire::Query;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub success_capacity: usize,
    pub success_min_ttl: Duration,
    pub success_max_ttl: Duration,
    pub denial_capacity: usize,
    pub denial_min_ttl: Duration,
    pub denial_max_ttl: Duration,
    /// Overall budget for entry bytes (keys + wire answers + bookkeeping); LRU eviction past it.
    pub max_bytes: usize,
    pub stale_window: Duration,
    pub stale_ttl: u32,
    pub prefetch_hits: u32,
    pub prefetch_window: Duration,
    pub prefetch_percent: u8,
}

impl Default for CacheConfig {
    /// The seed's (Deckhouse node-local-dns / CoreDNS cache plugin) values.
    fn default() -> Self {
        Self {
            success_capacity: 120_000,
            success_min_ttl: Duration::from_secs(5),
            success_max_ttl: Duration::from_secs(30),
            denial_capacity: 65_536,
            denial_min_ttl: Duration::from_secs(1),
            denial_max_ttl: Duration::from_secs(5),
            max_bytes: 256 << 20,
            stale_window: Duration::from_secs(3600),
            stale_ttl: 30,
            prefetch_hits: 10,
            prefetch_window: Duration::from_secs(60),
            prefetch_percent: 25,
        }
    }
}

/// Which of the two caches an entry lives in (the `type` label of coredns_cache_* metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Success,
    Denial,
}

impl EntryKind {
    pub fn as_label(self) -> &'static str {
        match self {
            EntryKind::Success => "success",
            EntryKind::Denial => "denial",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `out` holds the reply.
    Fresh { kind: EntryKind, prefetch: bool },
    /// Nothing fresh; `out` untouched.
    Miss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Cached(EntryKind),
    /// Not cacheable (SERVFAIL, TC, negative without SOA, malformed, ...).
    NotCached(&'static str),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub success_entries: usize,
    pub denial_entries: usize,
    pub bytes: usize,
    pub success_evictions: u64,
    pub denial_evictions: u64,
}

pub struct Cache {
    _cfg: CacheConfig,
}

impl Cache {
    pub fn new(cfg: CacheConfig) -> Self {
        Self { _cfg: cfg }
    }

    pub fn answer(
        &self,
        _q: &Query<'_>,
        _now: Instant,
        _out: &mut Vec<u8>,
        _limit: usize,
    ) -> Answer {
        todo!("cache/wire work")
    }

    /// Serves an expired entry (within the stale window) with TTL `stale_ttl`; false if none.
    pub fn answer_stale(
        &self,
        _q: &Query<'_>,
        _now: Instant,
        _out: &mut Vec<u8>,
        _limit: usize,
    ) -> bool {
        todo!("cache/wire work")
    }

    pub fn insert(&self, _q: &Query<'_>, _response: &[u8], _now: Instant) -> Inserted {
        todo!("cache/wire work")
    }

    pub fn stats(&self) -> CacheStats {
        todo!("cache/wire work")
    }
}
