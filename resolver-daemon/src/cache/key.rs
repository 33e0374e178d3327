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

pub(super) const FLAG_DO: u8 = 1;
pub(super) const FLAG_CD: u8 = 2;

/// Also the key of in-flight upstream queries (`resolve`): a miss coalesces with exactly the
/// queries whose answer it would find in the cache.
#[derive(Clone)]
pub(crate) struct CacheKey {
    bytes: [u8; KEY_MAX],
    len: usize,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for CacheKey {}

impl std::hash::Hash for CacheKey {
    /// The key carries its own seeded hash of the rest of its bytes.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash());
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CacheKey").field(&self.as_bytes()).finish()
    }
}

impl CacheKey {
    const EMPTY: CacheKey = CacheKey {
        bytes: [0; KEY_MAX],
        len: 0,
    };

    pub(super) fn new(q: &Query<'_>, seed: u64) -> Self {
        let flags =
            (u8::from(q.dnssec_ok()) * FLAG_DO) | (u8::from(q.checking_disabled()) * FLAG_CD);
        let [t0, t1] = q.qtype.to_be_bytes();
        let [c0, c1] = q.qclass.to_be_bytes();
        let mut hasher = WordHasher::new(seed, [flags, t0, t1, c0, c1], q.qname.len());
        let mut key = Self::EMPTY;
        key.fill([flags, t0, t1, c0, c1], q.qname, |word| hasher.push(word));
        key.bytes[..HASH_LEN].copy_from_slice(&hasher.finish().to_le_bytes());
        key
    }

    /// Rebuilds the key of a stored entry from its hash, flags and wire question (name as
    /// the upstream spelled it, then qtype and qclass), so entries need not hold a copy.
    pub(super) fn from_stored(hash: u64, flags: u8, question: &[u8]) -> Self {
        let name_len = question.len().saturating_sub(4);
        let mut fixed = [flags, 0, 0, 0, 0];
        if let Some(type_class) = question.get(name_len..name_len + 4) {
            fixed[1..].copy_from_slice(type_class);
        }
        let mut key = Self::EMPTY;
        key.fill(fixed, &question[..name_len], |_| {});
        key.bytes[..HASH_LEN].copy_from_slice(&hash.to_le_bytes());
        key
    }

    /// Lays out everything but the hash, lowercasing the name eight bytes at a time and
    /// handing each lowercased word to `on_word` (the hash is computed from registers, not
    /// by reading back the bytes just stored, which would stall on store forwarding).
    /// Fills `self` in place (an `EMPTY` key): building a key in a callee and returning it
    /// would copy all of its bytes once more.
    fn fill(&mut self, fixed: [u8; 5], name: &[u8], mut on_word: impl FnMut(u64)) {
        // `parse_query` guarantees name.len() <= MAX_NAME_LEN; clamp anyway so a
        // hand-built Query cannot index out of bounds.
        let name = &name[..name.len().min(MAX_NAME_LEN)];
        let bytes = &mut self.bytes;
        bytes[HASH_LEN..FIXED_LEN].copy_from_slice(&fixed);
        let mut at = FIXED_LEN;
        let mut chunks = name.chunks_exact(8);
        for chunk in &mut chunks {
            let word = lowercase_word(le_word(chunk));
            bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
            on_word(word);
            at += 8;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Byte by byte: a variable-length copy would be a memcpy call.
            let padded = rest
                .iter()
                .enumerate()
                .fold(0u64, |word, (i, &b)| word | (u64::from(b) << (8 * i)));
            let word = lowercase_word(padded);
            bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
            on_word(word);
        }
        self.len = FIXED_LEN + name.len();
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

/// Cheap lock-free randomness for non-security uses (spreading prefetches): a Weyl sequence
/// started at a random seed, mixed by one folded multiply.
pub(super) fn next_random() -> u64 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: OnceLock<AtomicU64> = OnceLock::new();
    let state = STATE.get_or_init(|| AtomicU64::new(random_seed()));
    let n = state.fetch_add(K0, Ordering::Relaxed);
    folded_multiply(n ^ K1, K2)
}

const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xbf58_476d_1ce4_e5b9;
const K2: u64 = 0x94d0_49bb_1331_11eb;

/// 128-bit multiply folded to 64 bits: the mixing step of wyhash/foldhash.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Fast seeded hash over 8-byte words: one 128-bit multiply per two words, as foldhash
/// does, so a typical cluster name (40-60 bytes) costs three or four multiplies.
struct WordHasher {
    seed: u64,
    state: u64,
    pending: Option<u64>,
}

impl WordHasher {
    fn new(seed: u64, fixed: [u8; 5], name_len: usize) -> Self {
        let mut word = [0u8; 8];
        word[..5].copy_from_slice(&fixed);
        word[5] = name_len as u8;
        let state = folded_multiply(u64::from_le_bytes(word) ^ seed, K0);
        Self {
            seed,
            state,
            pending: None,
        }
    }

    fn push(&mut self, word: u64) {
        match self.pending.take() {
            None => self.pending = Some(word),
            Some(first) => {
                self.state = folded_multiply(first ^ self.state, word ^ K1 ^ self.seed);
            }
        }
    }

    fn finish(self) -> u64 {
        let state = match self.pending {
            Some(last) => folded_multiply(last ^ self.state, K2 ^ self.seed),
            None => self.state,
        };
        folded_multiply(state ^ self.seed.rotate_left(23), K0)
    }
}

/// Little-endian word from an 8-byte chunk.
fn le_word(chunk: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(chunk);
    u64::from_le_bytes(word)
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

    fn key(seed: u64, flags: u8, name: &[u8]) -> u64 {
        let mut hasher = WordHasher::new(seed, [flags, 0, 1, 0, 1], name.len());
        let mut key = CacheKey::EMPTY;
        key.fill([flags, 0, 1, 0, 1], name, |w| hasher.push(w));
        hasher.finish()
    }

    #[test]
    fn hash_depends_on_every_name_byte_flags_and_the_seed() {
        let name: Vec<u8> = (1..=40).collect();
        let base = key(1, 0, &name);
        assert_ne!(base, key(2, 0, &name));
        assert_ne!(base, key(1, FLAG_DO, &name));
        for i in 0..name.len() {
            let mut changed = name.clone();
            changed[i] ^= 1;
            assert_ne!(base, key(1, 0, &changed), "byte {i}");
        }
        assert_ne!(base, key(1, 0, &name[..39]));
        assert_eq!(base, key(1, 0, &name), "deterministic");
    }

    #[test]
    fn stored_key_matches_lookup_key() {
        let qname = b"\x03WwW\x07exAMple\x03com\x00";
        let q = Query {
            id: 1,
            flags: 0x0110,
            qname,
            qtype: 28,
            qclass: 1,
            edns: None,
            question_end: 12 + qname.len() + 4,
        };
        let lookup = CacheKey::new(&q, 99);
        let mut question = b"\x03www\x07example\x03COM\x00".to_vec();
        question.extend_from_slice(&[0, 28, 0, 1]);
        let stored = CacheKey::from_stored(lookup.hash(), lookup.flags(), &question);
        assert_eq!(stored.as_bytes(), lookup.as_bytes());
        assert_eq!(lookup.flags(), FLAG_CD);
    }
}
