//! Answering: the allocation-free cache-hit decision shared by UDP and TCP (`answer_fast`),
//! and the miss path on tokio: request coalescing, forwarding, caching, serve-stale, prefetch.

use crate::cache::{Answer, Cache, Inserted};
use crate::metrics::{Plugin, ServerMetrics, qtype_index, reply_rcode};
use crate::pace::TokenBucket;
use crate::upstream::Forwarder;
use crate::wire::{self, Query, WireError};
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub const RCODE_FORMERR: u16 = 1;
pub const RCODE_SERVFAIL: u16 = 2;
pub const RCODE_NOTIMP: u16 = 4;
pub const RCODE_REFUSED: u16 = 5;
pub const RCODE_BADVERS: u16 = 16;
/// Largest TCP answer.
pub const TCP_LIMIT: usize = 65_535;

/// The idle sweep visits every cache entry once per pass of 250 ms: inside the second half
/// of the prefetch window of a 5 s TTL (the last 6.25–12.5 %, ≥ 312 ms), where the sweep
/// claims entries, so popular entries of the seed's shortest default clamps are claimed
/// before they expire. A big cache is swept in up to 10 steps spread over the pass, each
/// taking a slice of every shard, so a shard lock is held for at most ~1 200 entries at the
/// default capacities; a cache of up to `IDLE_SWEEP_STEP_ENTRIES` is swept in one step
/// (4 wake-ups a second instead of 40 on a typical node), one of up to twice that in two,
/// and so on, so a step holds a shard lock for ~300 entries at most until the cache is big.
const IDLE_SWEEP_PASS: Duration = Duration::from_millis(250);
const IDLE_SWEEP_MAX_PARTS: usize = 10;
const IDLE_SWEEP_STEP_ENTRIES: usize = 5_000;
/// Pause between whole-cache checks while nothing popular is cached.
const IDLE_SWEEP_QUIET: Duration = Duration::from_secs(1);
/// Most refreshes one pass starts; the rest are claimed a pass later.
const IDLE_SWEEP_PASS_MAX: usize = 2_560;

/// How many steps a pass over a cache of `entries` takes.
fn sweep_parts(entries: usize) -> usize {
    entries
        .div_ceil(IDLE_SWEEP_STEP_ENTRIES)
        .clamp(1, IDLE_SWEEP_MAX_PARTS)
}

/// What the fast path decided for one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// `out` holds the reply.
    Reply {
        plugin: Plugin,
        rcode: u16,
        prefetch: bool,
        type_idx: usize,
    },
    /// Nothing to send (too short, QR=1).
    Drop,
    /// Not in the cache: the tokio side must forward it.
    Miss,
}

/// Parses and answers from the cache or with an error reply; never allocates once `out`
/// has grown to its working size.
pub fn answer_fast(
    cache: &Cache,
    pkt: &[u8],
    now: Instant,
    out: &mut Vec<u8>,
    tcp: bool,
    m: &ServerMetrics,
) -> Fast {
    out.clear();
    let q = match wire::parse_query(pkt) {
        Ok(q) => q,
        Err(WireError::TooShort | WireError::IsResponse) => return Fast::Drop,
        Err(e) => {
            let rcode = error_rcode(&e);
            let type_idx = qtype_index(0);
            m.request(type_idx, pkt.len());
            wire::write_error_response(pkt, None, rcode, out);
            return Fast::Reply {
                plugin: Plugin::None,
                rcode,
                prefetch: false,
                type_idx,
            };
        }
    };
    let type_idx = qtype_index(q.qtype);
    m.request(type_idx, pkt.len());
    let limit = if tcp { TCP_LIMIT } else { wire::udp_limit(&q) };
    match cache.answer(&q, now, out, limit) {
        Answer::Fresh { kind, prefetch } => {
            m.cache_hit(kind);
            if prefetch {
                m.prefetch.inc();
            }
            Fast::Reply {
                plugin: Plugin::Cache,
                rcode: reply_rcode(out),
                prefetch,
                type_idx,
            }
        }
        Answer::Miss => {
            m.cache_miss();
            Fast::Miss
        }
    }
}

fn error_rcode(e: &WireError) -> u16 {
    match e {
        WireError::NotImplemented(_) => RCODE_NOTIMP,
        WireError::BadVersion(_) => RCODE_BADVERS,
        _ => RCODE_FORMERR,
    }
}

/// Cache key of in-flight upstream queries (the cache's own key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    qname: Vec<u8>,
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl Key {
    fn of(q: &Query<'_>) -> Self {
        Self {
            qname: q.qname.to_ascii_lowercase(),
            qtype: q.qtype,
            qclass: q.qclass,
            dnssec_ok: q.dnssec_ok(),
            checking_disabled: q.checking_disabled(),
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    Reply(Arc<Vec<u8>>),
    Failed,
}

/// A reply produced on the miss path.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub plugin: Plugin,
    pub rcode: u16,
}

/// Where background refreshes wait for `Resolver::pace_refreshes`, and the counter of those
/// dropped because it was full.
pub struct RefreshQueue {
    pub tx: mpsc::Sender<Vec<u8>>,
    pub dropped: prometheus::IntCounter,
}

pub struct Resolver {
    pub cache: Arc<Cache>,
    pub forwarder: Arc<Forwarder>,
    inflight: Mutex<HashMap<Key, Vec<oneshot::Sender<Outcome>>>>,
    coalesced: prometheus::IntCounter,
    refreshes: RefreshQueue,
    /// Client queries being answered on the tokio side (drained on shutdown).
    pub busy: AtomicUsize,
}

impl Resolver {
    pub fn new(
        cache: Arc<Cache>,
        forwarder: Arc<Forwarder>,
        coalesced: prometheus::IntCounter,
        refreshes: RefreshQueue,
    ) -> Self {
        Self {
            cache,
            forwarder,
            inflight: Mutex::new(HashMap::new()),
            coalesced,
            refreshes,
            busy: AtomicUsize::new(0),
        }
    }

    /// Answers a query the cache could not: upstream (coalesced), else stale, else SERVFAIL.
    /// `None` only for messages the fast path would drop.
    pub async fn resolve_miss(
        self: &Arc<Self>,
        pkt: &[u8],
        tcp: bool,
        m: &ServerMetrics,
    ) -> Option<Reply> {
        let q = wire::parse_query(pkt).ok()?;
        let limit = if tcp { TCP_LIMIT } else { wire::udp_limit(&q) };
        let mut out = Vec::with_capacity(512);
        // Every upstream known dead: do not make the client wait for a timeout when an
        // expired answer exists (RFC 8767); refresh in the background instead.
        if !self.forwarder.any_healthy(&q)
            && self.cache.answer_stale(&q, Instant::now(), &mut out, limit)
        {
            m.stale.inc();
            self.refresh_in_background(pkt.to_vec());
            return Some(Reply {
                rcode: reply_rcode(&out),
                bytes: out,
                plugin: Plugin::Cache,
            });
        }
        match self.forward_coalesced(&q).await {
            Outcome::Reply(resp) => Some(self.reply_from_upstream(&q, pkt, &resp, limit, m)),
            Outcome::Failed => Some(self.stale_or_servfail(&q, pkt, limit, m)),
        }
    }

    fn reply_from_upstream(
        &self,
        q: &Query<'_>,
        pkt: &[u8],
        resp: &[u8],
        limit: usize,
        m: &ServerMetrics,
    ) -> Reply {
        let rcode = reply_rcode(resp);
        if rcode == RCODE_SERVFAIL || rcode == RCODE_REFUSED {
            let mut out = Vec::new();
            if self.cache.answer_stale(q, Instant::now(), &mut out, limit) {
                m.stale.inc();
                return Reply {
                    rcode: reply_rcode(&out),
                    bytes: out,
                    plugin: Plugin::Cache,
                };
            }
        }
        let mut out = Vec::with_capacity(resp.len());
        if let Answer::Fresh { .. } = self.cache.answer(q, Instant::now(), &mut out, limit) {
            return Reply {
                rcode: reply_rcode(&out),
                bytes: out,
                plugin: Plugin::Forward,
            };
        }
        match rewrite_for_client(resp, q, limit) {
            Some(bytes) => Reply {
                rcode,
                bytes,
                plugin: Plugin::Forward,
            },
            None => servfail(pkt, q),
        }
    }

    fn stale_or_servfail(
        &self,
        q: &Query<'_>,
        pkt: &[u8],
        limit: usize,
        m: &ServerMetrics,
    ) -> Reply {
        let mut out = Vec::new();
        if self.cache.answer_stale(q, Instant::now(), &mut out, limit) {
            m.stale.inc();
            return Reply {
                rcode: reply_rcode(&out),
                bytes: out,
                plugin: Plugin::Cache,
            };
        }
        servfail(pkt, q)
    }

    /// Refreshes popular entries whose prefetch point passed with nobody asking
    /// (`Cache::idle_refreshes`), forever; counts them in `started`. While a whole pass finds
    /// no popular entry to watch (an idle node), the cache is checked once a second in one
    /// step.
    pub async fn sweep_idle_entries(self: Arc<Self>, started: prometheus::IntCounter) {
        loop {
            let stats = self.cache.stats();
            let parts = sweep_parts(stats.success_entries + stats.denial_entries);
            let mut watched = 0;
            for part in 0..parts {
                tokio::time::sleep(IDLE_SWEEP_PASS / parts as u32).await;
                watched += self.sweep_step((part, parts), IDLE_SWEEP_PASS_MAX / parts, &started);
            }
            while watched == 0 {
                tokio::time::sleep(IDLE_SWEEP_QUIET).await;
                watched = self.sweep_step((0, 1), IDLE_SWEEP_PASS_MAX, &started);
            }
        }
    }

    /// Starts the refreshes one sweep step claims; returns how many entries it watches.
    fn sweep_step(
        self: &Arc<Self>,
        slice: (usize, usize),
        max: usize,
        started: &prometheus::IntCounter,
    ) -> usize {
        let sweep = self.cache.idle_refreshes(Instant::now(), slice, max);
        started.inc_by(sweep.queries.len() as u64);
        sweep
            .queries
            .into_iter()
            .for_each(|q| self.refresh_in_background(q));
        sweep.watched
    }

    /// Prefetch, idle-sweep or stale refresh: queued for `pace_refreshes`; dropped (and
    /// counted) when the queue is full.
    pub fn refresh_in_background(&self, pkt: Vec<u8>) {
        if self.refreshes.tx.try_send(pkt).is_err() {
            self.refreshes.dropped.inc();
        }
    }

    /// Starts the queued refreshes, at most `rate` per second (0: as they come; see `pace`).
    /// Past the saved-up burst they start in groups every 5 ms (`take_in_groups`), and the
    /// replies to a group mostly arrive while it is still sending: with ~1 400 refreshes a
    /// second (search mix at 20k q/s) the tokio thread's context switches fell from 1 380 to
    /// 600-720 a second and its CPU from 70 to 42-52 ms a second.
    pub async fn pace_refreshes(self: Arc<Self>, mut queue: mpsc::Receiver<Vec<u8>>, rate: u32) {
        let mut bucket = TokenBucket::new(rate, Instant::now());
        while let Some(pkt) = queue.recv().await {
            if rate > 0 {
                let wait = bucket.take_in_groups(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            self.start_refresh(pkt);
        }
    }

    /// Forwards a refresh (joining any in-flight query) and caches the answer.
    fn start_refresh(self: &Arc<Self>, pkt: Vec<u8>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(q) = wire::parse_query(&pkt) {
                let _ = this.forward_coalesced(&q).await;
            }
        });
    }

    /// Identical concurrent misses share one upstream query: the first becomes the leader,
    /// the others wait for its outcome.
    async fn forward_coalesced(&self, q: &Query<'_>) -> Outcome {
        let key = Key::of(q);
        let waiter = {
            let Ok(mut map) = self.inflight.lock() else {
                return Outcome::Failed;
            };
            match map.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    map.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            self.coalesced.inc();
            return rx.await.unwrap_or(Outcome::Failed);
        }
        let mut leader = Leader {
            resolver: self,
            key: Some(key),
        };
        let outcome = match self.forwarder.forward(q).await {
            Ok(resp) => {
                if let Inserted::NotCached(why) = self.cache.insert(q, &resp, Instant::now()) {
                    tracing::trace!(why, "upstream answer not cached");
                }
                Outcome::Reply(Arc::new(resp))
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed");
                Outcome::Failed
            }
        };
        leader.finish(outcome.clone());
        outcome
    }
}

/// Hands the outcome to the waiters; if the leader is dropped early they get `Failed`.
struct Leader<'a> {
    resolver: &'a Resolver,
    key: Option<Key>,
}

impl Leader<'_> {
    fn finish(&mut self, outcome: Outcome) {
        let Some(key) = self.key.take() else { return };
        let waiters = match self.resolver.inflight.lock() {
            Ok(mut map) => map.remove(&key).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
    }
}

pub fn servfail(pkt: &[u8], q: &Query<'_>) -> Reply {
    let mut out = Vec::with_capacity(pkt.len() + 11);
    wire::write_error_response(pkt, Some(q), RCODE_SERVFAIL, &mut out);
    Reply {
        bytes: out,
        plugin: Plugin::None,
        rcode: RCODE_SERVFAIL,
    }
}

/// An upstream reply the cache did not keep (SERVFAIL, no-SOA negative, ...), made this
/// client's: its ID, its question's letter case, no OPT unless it sent EDNS, TC when too big.
pub fn rewrite_for_client(resp: &[u8], q: &Query<'_>, limit: usize) -> Option<Vec<u8>> {
    // The cache did not vouch for this reply: it must at least be a well-formed message.
    let mut msg = hickory_proto::op::Message::from_vec(resp).ok()?;
    let mut out = if q.edns.is_none() && has_additional(resp) {
        msg.edns = None;
        msg.to_vec().ok()?
    } else {
        resp.to_vec()
    };
    let qend = 12 + q.qname.len();
    if out.len() < qend + 4 {
        return None;
    }
    out[..2].copy_from_slice(&q.id.to_be_bytes());
    out[12..qend].copy_from_slice(q.qname);
    if out.len() > limit {
        out.truncate(qend + 4);
        out[2] |= 0x02;
        out[6..12].fill(0);
        if let Some(e) = q.edns {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&1232u16.to_be_bytes());
            out.extend_from_slice(&[0, 0, if e.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
            out[11] = 1;
        }
    }
    Some(out)
}

fn has_additional(resp: &[u8]) -> bool {
    resp.get(10..12).is_some_and(|c| c != [0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_caches_are_swept_in_one_step_and_big_ones_in_slices_of_bounded_size() {
        assert_eq!(sweep_parts(0), 1);
        assert_eq!(sweep_parts(IDLE_SWEEP_STEP_ENTRIES), 1);
        assert_eq!(sweep_parts(IDLE_SWEEP_STEP_ENTRIES + 1), 2);
        // The default capacities (120 000 + 65 536 entries): the most steps, a tenth each.
        assert_eq!(sweep_parts(120_000 + 65_536), IDLE_SWEEP_MAX_PARTS);
        assert_eq!(sweep_parts(10_000_000), IDLE_SWEEP_MAX_PARTS);
    }
}
