//! One cache shard: a map from key to slab slot, and one intrusive LRU list per entry kind.

use super::entry::{Entry, Freshness, IdleState, PreparedEntry};
use super::key::{CacheKey, PrehashedState};
use super::{CacheConfig, CacheStats, EntryKind, IdleSweep};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const NIL: u32 = u32::MAX;
const KINDS: [EntryKind; 2] = [EntryKind::Success, EntryKind::Denial];

/// Per-shard share of the configured limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShardLimits {
    /// Entries per kind, indexed by `EntryKind::index`.
    pub capacity: [usize; 2],
    pub max_bytes: usize,
}

/// Doubly linked list through `Entry::prev/next`; head is the most recently used.
#[derive(Debug, Clone, Copy)]
struct LruList {
    head: u32,
    tail: u32,
    len: usize,
}

impl LruList {
    const EMPTY: LruList = LruList {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

pub(super) struct Shard {
    limits: ShardLimits,
    map: HashMap<Box<[u8]>, u32, PrehashedState>,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    lru: [LruList; 2],
    bytes: usize,
    evictions: [u64; 2],
    clock: u64,
}

impl Shard {
    pub(super) fn new(limits: ShardLimits) -> Self {
        Self {
            limits,
            map: HashMap::with_hasher(PrehashedState),
            slots: Vec::new(),
            free: Vec::new(),
            lru: [LruList::EMPTY; 2],
            bytes: 0,
            evictions: [0; 2],
            clock: 0,
        }
    }

    /// The entry for `key` and its freshness if it is fresh or stale, marked most recently
    /// used. Entries past the stale window are removed here.
    pub(super) fn get_mut(
        &mut self,
        key: &CacheKey,
        now: Instant,
        stale_window: Duration,
    ) -> Option<(&mut Entry, Freshness)> {
        let slot = *self.map.get(key.as_bytes())?;
        let freshness = self.entry(slot).freshness(now, stale_window);
        if freshness == Freshness::Dead {
            self.remove(slot);
            return None;
        }
        self.touch(slot);
        Some((self.entry_mut(slot), freshness))
    }

    /// Stores `prepared` under `key`, replacing an entry with the same key, then evicts
    /// least-recently-used entries until the shard is within its limits again.
    pub(super) fn insert(
        &mut self,
        key: &CacheKey,
        prepared: PreparedEntry,
        ttl: u32,
        now: Instant,
        stale_window: Duration,
    ) -> Result<(), &'static str> {
        let mut entry = Entry::new(key, prepared, ttl, now);
        if entry.footprint() > self.limits.max_bytes {
            return Err("entry larger than the cache's byte budget");
        }
        if let Some(&old) = self.map.get(key.as_bytes()) {
            entry.inherit_popularity(self.entry(old));
            self.remove(old);
        }
        let slot = self.allocate(entry);
        self.map.insert(key.as_bytes().into(), slot);
        self.enforce_limits(slot, now, stale_window);
        Ok(())
    }

    /// One slice of the idle sweep: the `part`-th of `parts` equal slices of the slab.
    /// Appends the refresh queries of entries that claim an idle refresh to `sweep`, stopping
    /// when it holds `max` (the rest are claimed on a later pass while still fresh), and
    /// counts the entries it must keep watching.
    pub(super) fn collect_idle_refreshes(
        &mut self,
        (part, parts): (usize, usize),
        now: Instant,
        cfg: &CacheConfig,
        sweep: &mut IdleSweep,
        max: usize,
    ) {
        let len = self.slots.len();
        let slice = len * part / parts..len * (part + 1) / parts;
        for entry in self.slots[slice].iter_mut().flatten() {
            if sweep.queries.len() >= max {
                return;
            }
            match entry.claim_idle_refresh(now, cfg) {
                IdleState::Ignored => {}
                IdleState::Watched => sweep.watched += 1,
                IdleState::Claimed => sweep.queries.push(entry.refresh_query()),
            }
        }
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            success_entries: self.lru[EntryKind::Success.index()].len,
            denial_entries: self.lru[EntryKind::Denial.index()].len,
            bytes: self.bytes,
            success_evictions: self.evictions[EntryKind::Success.index()],
            denial_evictions: self.evictions[EntryKind::Denial.index()],
        }
    }

    /// Asserts that map, slab, LRU lists and byte count agree (tests only).
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        let mut linked = 0;
        let mut bytes = 0;
        for kind in KINDS {
            let list = self.lru[kind.index()];
            let (mut slot, mut prev, mut len) = (list.head, NIL, 0);
            while slot != NIL {
                let entry = self.entry(slot);
                assert_eq!(entry.prev, prev);
                assert_eq!(entry.kind(), kind);
                assert_eq!(self.map.get(entry.key().as_bytes()), Some(&slot));
                bytes += entry.footprint();
                (prev, slot, len) = (slot, entry.next, len + 1);
            }
            assert_eq!(list.tail, prev);
            assert_eq!(list.len, len);
            assert!(len <= self.limits.capacity[kind.index()]);
            linked += len;
        }
        assert_eq!(self.map.len(), linked);
        assert_eq!(self.slots.len() - self.free.len(), linked);
        assert_eq!(self.bytes, bytes);
        assert!(self.bytes <= self.limits.max_bytes);
    }

    fn entry(&self, slot: u32) -> &Entry {
        match &self.slots[slot as usize] {
            Some(entry) => entry,
            None => unreachable!("slot {slot} is linked but empty"),
        }
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        match &mut self.slots[slot as usize] {
            Some(entry) => entry,
            None => unreachable!("slot {slot} is linked but empty"),
        }
    }

    fn allocate(&mut self, entry: Entry) -> u32 {
        self.bytes += entry.footprint();
        let kind = entry.kind().index();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.push_front(kind, slot);
        slot
    }

    /// Unlinks and frees `slot`, returning its kind.
    fn remove(&mut self, slot: u32) -> EntryKind {
        let kind = self.entry(slot).kind();
        self.unlink(kind.index(), slot);
        if let Some(entry) = self.slots[slot as usize].take() {
            self.bytes -= entry.footprint();
            self.map.remove(entry.key().as_bytes());
        }
        self.free.push(slot);
        kind
    }

    /// Evicts LRU entries of the over-full kind, then the older LRU tail while over the byte
    /// budget. `keep` (the entry just inserted) is never evicted. Dead entries at a tail go
    /// first and are not counted as evictions: their time was over anyway.
    fn enforce_limits(&mut self, keep: u32, now: Instant, stale_window: Duration) {
        for kind in KINDS {
            let k = kind.index();
            while self.lru[k].len > self.limits.capacity[k] && self.lru[k].tail != keep {
                self.evict(self.lru[k].tail, now, stale_window);
            }
        }
        while self.bytes > self.limits.max_bytes {
            let Some(victim) = self.oldest_tail(keep) else {
                break;
            };
            self.evict(victim, now, stale_window);
        }
    }

    fn evict(&mut self, slot: u32, now: Instant, stale_window: Duration) {
        let dead = self.entry(slot).freshness(now, stale_window) == Freshness::Dead;
        let kind = self.remove(slot);
        if !dead {
            self.evictions[kind.index()] += 1;
        }
    }

    /// The least recently used of the two list tails, other than `keep`.
    fn oldest_tail(&self, keep: u32) -> Option<u32> {
        KINDS
            .iter()
            .map(|kind| self.lru[kind.index()].tail)
            .filter(|&slot| slot != NIL && slot != keep)
            .min_by_key(|&slot| self.entry(slot).last_used)
    }

    fn touch(&mut self, slot: u32) {
        let kind = self.entry(slot).kind().index();
        if self.lru[kind].head != slot {
            self.unlink(kind, slot);
            self.push_front(kind, slot);
        } else {
            self.clock += 1;
            let clock = self.clock;
            self.entry_mut(slot).last_used = clock;
        }
    }

    fn push_front(&mut self, kind: usize, slot: u32) {
        self.clock += 1;
        let clock = self.clock;
        let old_head = self.lru[kind].head;
        let entry = self.entry_mut(slot);
        entry.prev = NIL;
        entry.next = old_head;
        entry.last_used = clock;
        if old_head == NIL {
            self.lru[kind].tail = slot;
        } else {
            self.entry_mut(old_head).prev = slot;
        }
        self.lru[kind].head = slot;
        self.lru[kind].len += 1;
    }

    fn unlink(&mut self, kind: usize, slot: u32) {
        let (prev, next) = {
            let entry = self.entry(slot);
            (entry.prev, entry.next)
        };
        if prev == NIL {
            self.lru[kind].head = next;
        } else {
            self.entry_mut(prev).next = next;
        }
        if next == NIL {
            self.lru[kind].tail = prev;
        } else {
            self.entry_mut(next).prev = prev;
        }
        self.lru[kind].len -= 1;
    }
}
