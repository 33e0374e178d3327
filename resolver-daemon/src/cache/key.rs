//! Cache keys built on the stack: no allocation on lookup.
//!
//! A key is `[hash: 8][flags: 1][qtype: 2][qclass: 2][lowercased qname]`. The hash of the
//! remaining bytes is stored in the key itself so the shard maps can use a pass-through
//! hasher: each lookup hashes the name exactly once.

use crate::wire::{MAX_NAME_LEN, Query};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const HASH_LEN: usize = 8;
const FIXED_LEN: usize = HASH_LEN + 5;
/// Room for the longest key plus zero padding to a whole 8-byte word, so the name can be
/// lowercased a word at a time.
const KEY_MAX: usize = FIXED_LEN + MAX_NAME_LEN + 7;

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
        bytes[FIXED_LEN..len].copy_from_slice(&q.qname[..name_len]);
        lowercase_name(&mut bytes, name_len);
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
        bytes[FIXED_LEN..len].copy_from_slice(&question[..name_len]);
        lowercase_name(&mut bytes, name_len);
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

/// ASCII-lowercases the name part of `bytes` eight bytes at a time (DNS names compare
/// case-insensitively, RFC 4343). Bytes past the name are zero and stay zero.
fn lowercase_name(bytes: &mut [u8; KEY_MAX], name_len: usize) {
    for word in bytes[FIXED_LEN..FIXED_LEN + name_len.next_multiple_of(8)].chunks_exact_mut(8) {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        word.copy_from_slice(&lowercase_word(u64::from_le_bytes(le)).to_le_bytes());
    }
}

/// SWAR ASCII lowercase: sets bit 5 of every byte in `A..=Z`, leaves all others alone.
fn lowercase_word(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let seven_bits = x & !HIGH;
    // Per byte (no carries: each sum stays below 0x100): high bit set iff byte >= b'A',
    // and iff byte > b'Z'.
    let at_least_a = seven_bits + ONES * (0x80 - u64::from(b'A'));
    let above_z = seven_bits + ONES * (0x7f - u64::from(b'Z'));
    let upper = (at_least_a & !above_z) & !x & HIGH;
    x | (upper >> 2)
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

/// Fast seeded hash of a short byte string (cache keys are 5..=260 bytes after the hash
/// slot): one 128-bit multiply per 16 bytes, as foldhash does.
pub(super) fn hash_bytes(seed: u64, data: &[u8]) -> u64 {
    let mut state = seed ^ (data.len() as u64).wrapping_mul(K0);
    let mut chunks = data.chunks_exact(16);
    for chunk in &mut chunks {
        let (lo, hi) = split_words(chunk);
        state = folded_multiply(lo ^ state, hi ^ K1 ^ seed);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut padded = [0u8; 16];
        padded[..rest.len()].copy_from_slice(rest);
        let (lo, hi) = split_words(&padded);
        state = folded_multiply(lo ^ state, hi ^ K2 ^ seed);
    }
    folded_multiply(state ^ seed.rotate_left(23), K0)
}

/// The two little-endian words of a 16-byte chunk.
fn split_words(chunk: &[u8]) -> (u64, u64) {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&chunk[..8]);
    hi.copy_from_slice(&chunk[8..16]);
    (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_lowercase_matches_ascii_lowercase_for_every_byte() {
        for byte in 0..=255u8 {
            let word = u64::from_le_bytes([byte, 0, b'Z', byte, 0xff, b'A', b'@', byte]);
            let mut expected = word.to_le_bytes();
            expected.make_ascii_lowercase();
            assert_eq!(
                lowercase_word(word).to_le_bytes(),
                expected,
                "byte {byte:#x}"
            );
        }
    }

    #[test]
    fn hash_depends_on_every_byte_and_the_seed() {
        let data: Vec<u8> = (0..40).collect();
        let base = hash_bytes(1, &data);
        assert_ne!(base, hash_bytes(2, &data));
        for i in 0..data.len() {
            let mut changed = data.clone();
            changed[i] ^= 1;
            assert_ne!(base, hash_bytes(1, &changed), "byte {i}");
        }
        assert_ne!(base, hash_bytes(1, &data[..39]));
    }
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
