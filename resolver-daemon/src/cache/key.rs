//! Cache keys built on the stack: no allocation on lookup.
//!
//! A key is `[hash: 8][flags: 1][qtype: 2][qclass: 2][lowercased qname]`. The hash of the
//! remaining bytes is stored in the key itself so the shard maps can use a pass-through
//! hasher: each lookup hashes the name exactly once.

use crate::wire::{MAX_NAME_LEN, Query, lowercase_into};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const HASH_LEN: usize = 8;
const FIXED_LEN: usize = HASH_LEN + 5;
const KEY_MAX: usize = FIXED_LEN + MAX_NAME_LEN;

const FLAG_DO: u8 = 1;
const FLAG_CD: u8 = 2;

pub(super) struct CacheKey {
    bytes: [u8; KEY_MAX],
    len: usize,
}

impl CacheKey {
    pub(super) fn new(q: &Query<'_>, seed: u64) -> Self {
        let mut bytes = [0u8; KEY_MAX];
        // `parse_query` guarantees qname.len() <= MAX_NAME_LEN; clamp anyway so a
        // hand-built Query cannot index out of bounds.
        let name_len = q.qname.len().min(MAX_NAME_LEN);
        let len = FIXED_LEN + name_len;
        bytes[HASH_LEN] =
            (u8::from(q.dnssec_ok()) * FLAG_DO) | (u8::from(q.checking_disabled()) * FLAG_CD);
        bytes[HASH_LEN + 1..HASH_LEN + 3].copy_from_slice(&q.qtype.to_be_bytes());
        bytes[HASH_LEN + 3..FIXED_LEN].copy_from_slice(&q.qclass.to_be_bytes());
        lowercase_into(&q.qname[..name_len], &mut bytes[FIXED_LEN..len]);
        let hash = hash_bytes(seed, &bytes[HASH_LEN..len]);
        bytes[..HASH_LEN].copy_from_slice(&hash.to_le_bytes());
        Self { bytes, len }
    }

    /// Rebuilds the key of a stored entry from its hash, flags and wire question (name as
    /// the upstream spelled it, then qtype and qclass), so entries need not hold a copy.
    pub(super) fn from_stored(hash: u64, flags: u8, question: &[u8]) -> Self {
        let mut bytes = [0u8; KEY_MAX];
        let name_len = question.len().saturating_sub(4).min(MAX_NAME_LEN);
        let len = FIXED_LEN + name_len;
        bytes[..HASH_LEN].copy_from_slice(&hash.to_le_bytes());
        bytes[HASH_LEN] = flags;
        if let Some(type_class) = question.get(name_len..name_len + 4) {
            bytes[HASH_LEN + 1..FIXED_LEN].copy_from_slice(type_class);
        }
        lowercase_into(&question[..name_len], &mut bytes[FIXED_LEN..len]);
        Self { bytes, len }
    }

    /// Length of the key for a wire name of `name_len` bytes.
    pub(super) fn len_for_name(name_len: usize) -> usize {
        FIXED_LEN + name_len
    }

    pub(super) fn flags(&self) -> u8 {
        self.bytes[HASH_LEN]
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub(super) fn hash(&self) -> u64 {
        stored_hash(self.as_bytes())
    }

    /// Shard from bits 32.. of the hash: hashbrown indexes buckets with the low bits and tags
    /// with the top seven, so using either here would leave each shard's table lopsided.
    pub(super) fn shard_index(&self, shard_count: usize) -> usize {
        (self.hash() >> 32) as usize & (shard_count - 1)
    }
}

fn stored_hash(key: &[u8]) -> u64 {
    let mut word = [0u8; HASH_LEN];
    let n = key.len().min(HASH_LEN);
    word[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(word)
}

/// A per-process random seed drawn from the standard library's randomly keyed hasher.
pub(super) fn random_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x6e6f_6465_6c6f_6361);
    hasher.finish()
}

const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xbf58_476d_1ce4_e5b9;
const K2: u64 = 0x94d0_49bb_1331_11eb;

/// 128-bit multiply folded to 64 bits: the mixing step of wyhash/foldhash.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Fast seeded hash of a short byte string (cache keys are 13..=268 bytes).
pub(super) fn hash_bytes(seed: u64, data: &[u8]) -> u64 {
    let mut state = seed ^ (data.len() as u64).wrapping_mul(K0);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        state = folded_multiply(state ^ u64::from_le_bytes(word), K1);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        state = folded_multiply(state ^ u64::from_le_bytes(word), K2);
    }
    folded_multiply(state ^ seed.rotate_left(23), K0)
}

/// `BuildHasher` for maps keyed by `CacheKey` bytes: the hash is already the key's prefix.
#[derive(Clone, Copy, Default)]
pub(super) struct PrehashedState;

impl BuildHasher for PrehashedState {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

pub(super) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    /// `[u8]::hash` calls `write_usize(len)` then `write(bytes)`: take the stored prefix.
    fn write(&mut self, bytes: &[u8]) {
        self.0 ^= stored_hash(bytes);
    }
    fn write_usize(&mut self, _len: usize) {}
    fn finish(&self) -> u64 {
        self.0
    }
}
