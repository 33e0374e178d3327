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
//!
//! Layout: `key` builds the lookup key on the stack and hashes it once; the hash picks one of
//! up to 16 mutex-guarded shards (`shard`: hash map + slab + one LRU list per kind); `entry`
//! turns an upstream reply into a stored entry at insert time (one walk over its records,
//! noting every TTL offset) and writes replies from it on a hit (memcpy + patches).

mod entry;
mod key;
mod shard;
#[cfg(test)]
#[allow(unsafe_code)] // a counting global allocator proves the hit path allocates nothing
mod tests;

use crate::wire::Query;
use entry::{Freshness, PreparedEntry, TtlRewrite};
pub(crate) use key::CacheKey;
use shard::{Shard, ShardLimits};
use std::sync::{Mutex, MutexGuard};
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
    /// Refreshes in a row the idle sweep may give a popular entry nobody asks for (0: none).
    pub prefetch_unasked: u8,
}

impl Default for CacheConfig {
    /// The Deckhouse module's (node-local-dns / CoreDNS cache plugin) values.
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
            prefetch_unasked: 1,
        }
    }
}

impl CacheConfig {
    /// TTL bounds (whole seconds) that apply to entries of `kind`.
    fn ttl_bounds(&self, kind: EntryKind) -> (u32, u32) {
        let (min, max) = match kind {
            EntryKind::Success => (self.success_min_ttl, self.success_max_ttl),
            EntryKind::Denial => (self.denial_min_ttl, self.denial_max_ttl),
        };
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        (secs(min), secs(max).max(secs(min)))
    }

    fn capacity(&self, kind: EntryKind) -> usize {
        match kind {
            EntryKind::Success => self.success_capacity,
            EntryKind::Denial => self.denial_capacity,
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

    /// Index into per-kind arrays.
    fn index(self) -> usize {
        match self {
            EntryKind::Success => 0,
            EntryKind::Denial => 1,
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

/// What one idle-sweep step found.
#[derive(Debug, Default)]
pub struct IdleSweep {
    /// Refresh queries for the entries it claimed.
    pub queries: Vec<Vec<u8>>,
    /// Popular fresh entries not due yet: zero over a whole pass means nothing to watch.
    pub watched: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub success_entries: usize,
    pub denial_entries: usize,
    pub bytes: usize,
    pub success_evictions: u64,
    pub denial_evictions: u64,
}

/// Most shards used; enough that two cores rarely contend on one lock.
const MAX_SHARDS: usize = 16;
/// Fewest entries (of the smaller kind) and bytes a shard should be able to hold, so that
/// small configured capacities still evict in true LRU order instead of per-shard order.
const MIN_ENTRIES_PER_SHARD: usize = 1024;
const MIN_BYTES_PER_SHARD: usize = 1 << 16;

pub struct Cache {
    cfg: CacheConfig,
    /// Random per-process hash seed: clients choose the names, so they must not be able to
    /// aim them all at one bucket.
    seed: u64,
    shards: Box<[Mutex<Shard>]>,
}

impl Cache {
    pub fn new(cfg: CacheConfig) -> Self {
        let count = shard_count(&cfg);
        let limits = ShardLimits {
            capacity: [
                cfg.success_capacity.div_ceil(count),
                cfg.denial_capacity.div_ceil(count),
            ],
            max_bytes: cfg.max_bytes / count,
        };
        let shards = (0..count).map(|_| Mutex::new(Shard::new(limits))).collect();
        Self {
            cfg,
            seed: key::random_seed(),
            shards,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The key `q`'s answer is cached under.
    pub(crate) fn key(&self, q: &Query<'_>) -> CacheKey {
        CacheKey::new(q, self.seed)
    }

    pub fn answer(&self, q: &Query<'_>, now: Instant, out: &mut Vec<u8>, limit: usize) -> Answer {
        let key = CacheKey::new(q, self.seed);
        let mut shard = self.shard(&key);
        let Some((entry, Freshness::Fresh { left, age })) =
            shard.get_mut(&key, now, self.cfg.stale_window)
        else {
            return Answer::Miss;
        };
        let prefetch = entry.note_hit(age, &self.cfg);
        entry.write_reply(q, TtlRewrite::CountDown(left), out, limit);
        Answer::Fresh {
            kind: entry.kind(),
            prefetch,
        }
    }

    /// Serves an expired entry (within the stale window) with TTL `stale_ttl`; false if none.
    /// An entry that is still fresh is served as `answer` would (better than failing).
    pub fn answer_stale(
        &self,
        q: &Query<'_>,
        now: Instant,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> bool {
        let key = CacheKey::new(q, self.seed);
        let mut shard = self.shard(&key);
        let Some((entry, freshness)) = shard.get_mut(&key, now, self.cfg.stale_window) else {
            return false;
        };
        let ttls = match freshness {
            Freshness::Fresh { left, .. } => TtlRewrite::CountDown(left),
            Freshness::Stale | Freshness::Dead => TtlRewrite::Fixed(self.cfg.stale_ttl),
        };
        entry.write_reply(q, ttls, out, limit);
        true
    }

    pub fn insert(&self, q: &Query<'_>, response: &[u8], now: Instant) -> Inserted {
        let prepared = match PreparedEntry::from_response(q, response) {
            Ok(prepared) => prepared,
            Err(reason) => return Inserted::NotCached(reason),
        };
        let kind = prepared.kind;
        if self.cfg.capacity(kind) == 0 {
            return Inserted::NotCached("cache capacity for this kind is zero");
        }
        let (min_ttl, max_ttl) = self.cfg.ttl_bounds(kind);
        let ttl = prepared.min_ttl.clamp(min_ttl, max_ttl);
        if ttl == 0 {
            return Inserted::NotCached("TTL is zero");
        }
        let key = CacheKey::new(q, self.seed);
        let mut shard = self.shard(&key);
        match shard.insert(&key, prepared, ttl, now, self.cfg.stale_window) {
            Ok(()) => Inserted::Cached(kind),
            Err(reason) => Inserted::NotCached(reason),
        }
    }

    /// One step of the idle sweep (see `Entry::claim_idle_refresh`): scans the `part`-th of
    /// `parts` slices of every shard, one shard lock at a time; returns the queries of
    /// popular entries that came due with nobody asking (at most `max`) and how many popular
    /// entries it saw that are not due yet.
    pub fn idle_refreshes(
        &self,
        now: Instant,
        (part, parts): (usize, usize),
        max: usize,
    ) -> IdleSweep {
        let mut sweep = IdleSweep::default();
        if self.cfg.prefetch_unasked == 0 || parts == 0 {
            return sweep;
        }
        for shard in self.shards.iter() {
            lock(shard).collect_idle_refreshes(
                (part % parts, parts),
                now,
                &self.cfg,
                &mut sweep,
                max,
            );
        }
        sweep
    }

    pub fn stats(&self) -> CacheStats {
        self.shards
            .iter()
            .fold(CacheStats::default(), |acc, shard| {
                let s = lock(shard).stats();
                CacheStats {
                    success_entries: acc.success_entries + s.success_entries,
                    denial_entries: acc.denial_entries + s.denial_entries,
                    bytes: acc.bytes + s.bytes,
                    success_evictions: acc.success_evictions + s.success_evictions,
                    denial_evictions: acc.denial_evictions + s.denial_evictions,
                }
            })
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        for shard in self.shards.iter() {
            lock(shard).check_invariants();
        }
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        lock(&self.shards[key.shard_index(self.shards.len())])
    }
}

/// A panic while holding a shard lock leaves the shard consistent (every mutation completes
/// before anything can panic), so a poisoned lock is used as is instead of failing forever.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Power of two in [1, 16]: 16 for production sizes, fewer for small test-sized caches.
fn shard_count(cfg: &CacheConfig) -> usize {
    let smallest = [cfg.success_capacity, cfg.denial_capacity]
        .into_iter()
        .filter(|&capacity| capacity > 0)
        .min()
        .unwrap_or(0);
    let by_entries = smallest / MIN_ENTRIES_PER_SHARD;
    let by_bytes = cfg.max_bytes / MIN_BYTES_PER_SHARD;
    let wanted = by_entries.min(by_bytes).clamp(1, MAX_SHARDS);
    // Round down to a power of two so the shard index is a mask of the hash.
    1 << wanted.ilog2()
}
