//! The miss path on tokio (`Resolver`): request coalescing, forwarding through an
//! `Upstream`, caching, serve-stale, prefetch and the idle sweep.

use crate::answer::Answered;
use crate::cache::{Answer, Cache, CacheKey, Inserted};
use crate::fast::{Fast, answer_fast, stale_or_servfail};
use crate::metrics::{Plugin, Proto, ServerMetrics};
use crate::pace::TokenBucket;
use crate::request::Request;
use crate::upstream::{Forwarder, Upstream};
use crate::wire::{self, Query, rcode, reply_rcode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The idle sweep visits every cache entry once per pass of 250 ms: inside the second half
/// of the prefetch window of a 5 s TTL (the last 6.25–12.5 %, ≥ 312 ms), where the sweep
/// claims entries, so popular entries of the Deckhouse module's shortest default clamps are claimed
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

/// The time as the resolver sees it; tests move it by hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Upstream queries in flight, each with the misses waiting for it.
type Waiters = Mutex<HashMap<CacheKey, Vec<oneshot::Sender<Outcome>>>>;

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

impl Reply {
    fn written(bytes: Vec<u8>, a: Answered) -> Self {
        Self {
            bytes,
            plugin: a.plugin,
            rcode: a.rcode,
        }
    }
}

/// Where background refreshes wait for `Resolver::pace_refreshes`, and the counter of those
/// dropped because it was full.
pub struct RefreshQueue {
    pub tx: mpsc::Sender<Vec<u8>>,
    pub dropped: prometheus::IntCounter,
}

/// Client queries being answered on the tokio side while this lives (drained on shutdown).
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Resolver<U = Forwarder> {
    cache: Arc<Cache>,
    upstream: Arc<U>,
    clock: Box<dyn Clock>,
    inflight: Waiters,
    coalesced: prometheus::IntCounter,
    refreshes: RefreshQueue,
    busy: Arc<AtomicUsize>,
}

impl<U: Upstream> Resolver<U> {
    pub fn new(
        cache: Arc<Cache>,
        upstream: Arc<U>,
        coalesced: prometheus::IntCounter,
        refreshes: RefreshQueue,
    ) -> Self {
        Self {
            cache,
            upstream,
            clock: Box::new(SystemClock),
            inflight: Mutex::new(HashMap::new()),
            coalesced,
            refreshes,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The same resolver reading time from `clock`.
    pub fn with_clock(self, clock: Box<dyn Clock>) -> Self {
        Self { clock, ..self }
    }

    /// `answer_fast` against this resolver's cache.
    pub fn answer_fast(
        &self,
        pkt: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
        transport: Proto,
        m: &ServerMetrics,
    ) -> Fast {
        answer_fast(&self.cache, pkt, now, out, transport, m)
    }

    /// Readiness as far as upstreams go (see `Upstream::ready`).
    pub fn upstream_ready(&self) -> bool {
        self.upstream.ready()
    }

    /// Counts a client query as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.busy.fetch_add(1, Ordering::SeqCst);
        InFlight(self.busy.clone())
    }

    /// Client queries in flight on the tokio side.
    pub fn queries_in_flight(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Answers a query the cache could not: upstream (coalesced), else stale, else SERVFAIL.
    pub async fn resolve(&self, req: &Request, m: &ServerMetrics) -> Reply {
        let q = req.query();
        let limit = req.limit();
        let mut out = Vec::with_capacity(512);
        // Every upstream known dead: do not make the client wait for a timeout when an
        // expired answer exists (RFC 8767); refresh in the background instead.
        if !self.upstream.any_healthy(&q)
            && self
                .cache
                .answer_stale(&q, self.clock.now(), &mut out, limit)
        {
            m.stale.inc();
            self.refresh_in_background(req.bytes().to_vec());
            let rcode = reply_rcode(&out);
            return Reply::written(out, Answered::new(Plugin::Cache, rcode, q.qtype));
        }
        match self.forward_coalesced(&q).await {
            Outcome::Reply(resp) => self.reply_from_upstream(&q, req.bytes(), &resp, limit, m),
            Outcome::Failed => {
                let now = self.clock.now();
                let a = stale_or_servfail(&self.cache, &q, req.bytes(), now, limit, m, &mut out);
                Reply::written(out, a)
            }
        }
    }

    fn reply_from_upstream(
        &self,
        q: &Query<'_>,
        msg: &[u8],
        resp: &[u8],
        limit: usize,
        m: &ServerMetrics,
    ) -> Reply {
        let rcode = reply_rcode(resp);
        let mut out = Vec::with_capacity(resp.len());
        if (rcode == rcode::SERVFAIL || rcode == rcode::REFUSED)
            && self
                .cache
                .answer_stale(q, self.clock.now(), &mut out, limit)
        {
            m.stale.inc();
            let stale_rcode = reply_rcode(&out);
            return Reply::written(out, Answered::new(Plugin::Cache, stale_rcode, q.qtype));
        }
        out.clear();
        if let Answer::Fresh { .. } = self.cache.answer(q, self.clock.now(), &mut out, limit) {
            let cached_rcode = reply_rcode(&out);
            return Reply::written(out, Answered::new(Plugin::Forward, cached_rcode, q.qtype));
        }
        match wire::rewrite_for_client(resp, q, limit) {
            Some(bytes) => Reply::written(bytes, Answered::new(Plugin::Forward, rcode, q.qtype)),
            None => {
                let mut out = Vec::with_capacity(msg.len() + 11);
                wire::write_error_response(msg, Some(q), rcode::SERVFAIL, &mut out);
                Reply::written(out, Answered::new(Plugin::None, rcode::SERVFAIL, q.qtype))
            }
        }
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
        let sweep = self.cache.idle_refreshes(self.clock.now(), slice, max);
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
        let mut bucket = TokenBucket::new(rate, self.clock.now());
        while let Some(pkt) = queue.recv().await {
            if rate > 0 {
                let wait = bucket.take_in_groups(self.clock.now());
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
        let key = self.cache.key(q);
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
            inflight: &self.inflight,
            key: Some(key),
        };
        let outcome = match self.upstream.forward(q).await {
            Ok(resp) => {
                if let Inserted::NotCached(why) = self.cache.insert(q, &resp, self.clock.now()) {
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
    inflight: &'a Waiters,
    key: Option<CacheKey>,
}

impl Leader<'_> {
    fn finish(&mut self, outcome: Outcome) {
        let Some(key) = self.key.take() else { return };
        let waiters = match self.inflight.lock() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::metrics::Metrics;
    use crate::metrics::qtype_index;
    use crate::upstream::ForwardError;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::future::Future;
    use std::net::Ipv4Addr;
    use tokio::sync::Semaphore;

    #[test]
    fn small_caches_are_swept_in_one_step_and_big_ones_in_slices_of_bounded_size() {
        assert_eq!(sweep_parts(0), 1);
        assert_eq!(sweep_parts(IDLE_SWEEP_STEP_ENTRIES), 1);
        assert_eq!(sweep_parts(IDLE_SWEEP_STEP_ENTRIES + 1), 2);
        // The default capacities (120 000 + 65 536 entries): the most steps, a tenth each.
        assert_eq!(sweep_parts(120_000 + 65_536), IDLE_SWEEP_MAX_PARTS);
        assert_eq!(sweep_parts(10_000_000), IDLE_SWEEP_MAX_PARTS);
    }

    /// What the fake upstream does with the next queries.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Behaviour {
        Answer,
        ServFail,
        Timeout,
        Overloaded,
    }

    /// Answers `A 192.0.2.7` (TTL 30) or fails as told; waits for `gate` permits when gated.
    struct FakeUpstream {
        behaviour: Mutex<Behaviour>,
        calls: AtomicUsize,
        gate: Option<Semaphore>,
        healthy: std::sync::atomic::AtomicBool,
    }

    impl FakeUpstream {
        fn new(gated: bool) -> Arc<Self> {
            Arc::new(Self {
                behaviour: Mutex::new(Behaviour::Answer),
                calls: AtomicUsize::new(0),
                gate: gated.then(|| Semaphore::new(0)),
                healthy: std::sync::atomic::AtomicBool::new(true),
            })
        }

        fn set(&self, b: Behaviour) {
            *self.behaviour.lock().unwrap() = b;
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn reply(&self, q: &Query<'_>) -> Result<Vec<u8>, ForwardError> {
            let addr = "192.0.2.53:53".parse().unwrap();
            let rcode = match *self.behaviour.lock().unwrap() {
                Behaviour::Answer => ResponseCode::NoError,
                Behaviour::ServFail => ResponseCode::ServFail,
                Behaviour::Timeout => return Err(ForwardError::Timeout(addr)),
                Behaviour::Overloaded => return Err(ForwardError::Overloaded),
            };
            let name = Name::from_ascii(wire::dotted_lowercase(q.qname) + ".").unwrap();
            let mut m = Message::new(0x4242, MessageType::Response, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.metadata.recursion_available = true;
            m.metadata.response_code = rcode;
            m.add_query(HQuery::query(name.clone(), RecordType::A));
            if rcode == ResponseCode::NoError {
                let a = RData::A(A(Ipv4Addr::new(192, 0, 2, 7)));
                m.add_answer(Record::from_rdata(name, 30, a));
            }
            Ok(m.to_vec().unwrap())
        }
    }

    impl Upstream for FakeUpstream {
        fn forward(
            &self,
            q: &Query<'_>,
        ) -> impl Future<Output = Result<Vec<u8>, ForwardError>> + Send {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let reply = self.reply(q);
            async move {
                if let Some(gate) = &self.gate {
                    gate.acquire().await.unwrap().forget();
                }
                reply
            }
        }
        fn any_healthy(&self, _q: &Query<'_>) -> bool {
            self.healthy.load(Ordering::SeqCst)
        }
        fn ready(&self) -> bool {
            true
        }
    }

    /// A clock the test moves.
    struct ManualClock(Arc<Mutex<Instant>>);

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    struct Fixture {
        resolver: Arc<Resolver<FakeUpstream>>,
        upstream: Arc<FakeUpstream>,
        time: Arc<Mutex<Instant>>,
        metrics: ServerMetrics,
        coalesced: prometheus::IntCounter,
        _refreshes: mpsc::Receiver<Vec<u8>>,
    }

    impl Fixture {
        fn new(gated: bool) -> Self {
            let cache = Arc::new(Cache::new(CacheConfig::default()));
            let all = Metrics::new(std::env::temp_dir(), cache.clone(), "test".into()).unwrap();
            let metrics = all.server("127.0.0.1:53".parse().unwrap(), Proto::Udp);
            let upstream = FakeUpstream::new(gated);
            let coalesced = prometheus::IntCounter::new("coalesced", "test").unwrap();
            let dropped = prometheus::IntCounter::new("dropped", "test").unwrap();
            let (tx, rx) = mpsc::channel(16);
            let time = Arc::new(Mutex::new(Instant::now()));
            let resolver = Resolver::new(
                cache,
                upstream.clone(),
                coalesced.clone(),
                RefreshQueue { tx, dropped },
            )
            .with_clock(Box::new(ManualClock(time.clone())));
            Self {
                resolver: Arc::new(resolver),
                upstream,
                time,
                metrics,
                coalesced,
                _refreshes: rx,
            }
        }

        fn request(&self, name: &str) -> Request {
            let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(HQuery::query(
                Name::from_ascii(name).unwrap(),
                RecordType::A,
            ));
            let bytes = m.to_vec().unwrap();
            let parsed = wire::parse_query(&bytes).unwrap().detach();
            let peer = "192.0.2.1:5353".parse().unwrap();
            Request::new(bytes, parsed, peer, Proto::Udp, self.now())
        }

        fn now(&self) -> Instant {
            *self.time.lock().unwrap()
        }

        fn advance(&self, by: Duration) {
            *self.time.lock().unwrap() += by;
        }

        async fn resolve(&self, name: &str) -> Reply {
            self.resolver
                .resolve(&self.request(name), &self.metrics)
                .await
        }

        /// Caches `name` from the upstream, then lets the entry expire (stale, not dead).
        async fn cached_then_expired(&self, name: &str) {
            let first = self.resolve(name).await;
            assert_eq!(
                (first.plugin, first.rcode),
                (Plugin::Forward, rcode::NOERROR)
            );
            self.advance(Duration::from_secs(120));
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn has_answer(reply: &Reply) -> bool {
        let m = Message::from_vec(&reply.bytes).unwrap();
        m.metadata.id == 0x1234 && m.answers.len() == 1
    }

    #[test]
    fn identical_concurrent_misses_share_one_upstream_query() {
        runtime().block_on(async {
            let f = Fixture::new(true);
            let open_gate = async {
                tokio::task::yield_now().await;
                f.upstream.gate.as_ref().unwrap().add_permits(1);
            };
            let (a, b, ()) = tokio::join!(
                f.resolve("svc.example."),
                f.resolve("SVC.example."),
                open_gate
            );
            assert_eq!(f.upstream.calls(), 1, "one upstream query for both");
            assert_eq!(f.coalesced.get(), 1);
            assert!(has_answer(&a) && has_answer(&b));
            assert_eq!((b.plugin, b.rcode), (Plugin::Forward, rcode::NOERROR));
        });
    }

    #[test]
    fn different_questions_are_not_coalesced() {
        runtime().block_on(async {
            let f = Fixture::new(false);
            let (a, b) = tokio::join!(f.resolve("a.example."), f.resolve("b.example."));
            assert_eq!(f.upstream.calls(), 2);
            assert_eq!(f.coalesced.get(), 0);
            assert!(has_answer(&a) && has_answer(&b));
        });
    }

    #[test]
    fn upstream_servfail_or_timeout_serves_the_stale_answer() {
        runtime().block_on(async {
            for failure in [Behaviour::ServFail, Behaviour::Timeout] {
                let f = Fixture::new(false);
                f.cached_then_expired("stale.example.").await;
                f.upstream.set(failure);
                let r = f.resolve("stale.example.").await;
                assert_eq!(
                    (r.plugin, r.rcode),
                    (Plugin::Cache, rcode::NOERROR),
                    "{failure:?}"
                );
                assert!(has_answer(&r), "{failure:?}");
                assert_eq!(
                    f.upstream.calls(),
                    2,
                    "{failure:?}: the upstream was asked first"
                );
            }
        });
    }

    #[test]
    fn failure_without_a_stale_answer_is_servfail_or_the_upstreams_rcode() {
        runtime().block_on(async {
            let f = Fixture::new(false);
            f.upstream.set(Behaviour::Timeout);
            let r = f.resolve("never.example.").await;
            assert_eq!((r.plugin, r.rcode), (Plugin::None, rcode::SERVFAIL));
            assert_eq!(wire::message_id(&r.bytes), Some(0x1234));
            f.upstream.set(Behaviour::ServFail);
            let r = f.resolve("never.example.").await;
            assert_eq!((r.plugin, r.rcode), (Plugin::Forward, rcode::SERVFAIL));
        });
    }

    #[test]
    fn past_the_concurrency_cap_stale_else_servfail() {
        runtime().block_on(async {
            let f = Fixture::new(false);
            f.cached_then_expired("known.example.").await;
            f.upstream.set(Behaviour::Overloaded);
            let stale = f.resolve("known.example.").await;
            assert_eq!((stale.plugin, stale.rcode), (Plugin::Cache, rcode::NOERROR));
            let none = f.resolve("unknown.example.").await;
            assert_eq!((none.plugin, none.rcode), (Plugin::None, rcode::SERVFAIL));
        });
    }

    #[test]
    fn all_upstreams_down_serves_stale_without_waiting_for_them() {
        runtime().block_on(async {
            let f = Fixture::new(false);
            f.cached_then_expired("down.example.").await;
            f.upstream.healthy.store(false, Ordering::SeqCst);
            let r = f.resolve("down.example.").await;
            assert_eq!((r.plugin, r.rcode), (Plugin::Cache, rcode::NOERROR));
            assert_eq!(f.upstream.calls(), 1, "not asked again for the client");
        });
    }

    #[test]
    fn the_overload_rule_writes_stale_else_servfail_into_the_buffer() {
        let f = Fixture::new(false);
        let req = f.request("overload.example.");
        let mut out = Vec::new();
        let cache = &f.resolver.cache;
        let a = stale_or_servfail(
            cache,
            &req.query(),
            req.bytes(),
            f.now(),
            512,
            &f.metrics,
            &mut out,
        );
        assert_eq!((a.plugin, a.rcode), (Plugin::None, rcode::SERVFAIL));
        assert_eq!(wire::reply_rcode(&out), rcode::SERVFAIL);
    }

    #[test]
    fn the_fast_path_hands_a_miss_on_parsed_and_answers_errors_itself() {
        let f = Fixture::new(false);
        let req = f.request("fast.example.");
        let mut out = Vec::new();
        let fast = f
            .resolver
            .answer_fast(req.bytes(), f.now(), &mut out, Proto::Udp, &f.metrics);
        match fast {
            Fast::Miss(parsed) => {
                let q = parsed.attach(req.bytes());
                assert_eq!((q.qname, q.qtype), (&b"\x04fast\x07example\x00"[..], 1));
            }
            other => panic!("expected a miss, got {other:?}"),
        }
        assert!(out.is_empty(), "nothing written for a miss");
        let mut notify = req.bytes().to_vec();
        notify[2] |= 4 << 3; // opcode NOTIFY
        match f
            .resolver
            .answer_fast(&notify, f.now(), &mut out, Proto::Tcp, &f.metrics)
        {
            Fast::Reply { answered, prefetch } => {
                assert_eq!(
                    (answered.plugin, answered.rcode),
                    (Plugin::None, rcode::NOTIMP)
                );
                assert!(!prefetch);
                assert_eq!(wire::reply_rcode(&out), rcode::NOTIMP);
            }
            other => panic!("expected NOTIMP, got {other:?}"),
        }
        let short = &req.bytes()[..5];
        assert!(matches!(
            f.resolver
                .answer_fast(short, f.now(), &mut out, Proto::Udp, &f.metrics),
            Fast::Drop
        ));
    }

    #[test]
    fn a_miss_answered_upstream_is_then_a_hit() {
        runtime().block_on(async {
            let f = Fixture::new(false);
            f.resolve("hit.example.").await;
            let req = f.request("hit.example.");
            let mut out = Vec::new();
            let fast =
                f.resolver
                    .answer_fast(req.bytes(), f.now(), &mut out, Proto::Udp, &f.metrics);
            match fast {
                Fast::Reply { answered, .. } => {
                    assert_eq!(
                        (answered.plugin, answered.rcode),
                        (Plugin::Cache, rcode::NOERROR)
                    );
                    assert_eq!(answered.type_idx, qtype_index(1));
                }
                other => panic!("expected a hit, got {other:?}"),
            }
            assert_eq!(wire::message_id(&out), Some(0x1234));
        });
    }

    #[test]
    fn in_flight_guards_count_until_dropped() {
        let f = Fixture::new(false);
        let a = f.resolver.in_flight();
        let b = f.resolver.in_flight();
        assert_eq!(f.resolver.queries_in_flight(), 2);
        drop(a);
        assert_eq!(f.resolver.queries_in_flight(), 1);
        drop(b);
        assert_eq!(f.resolver.queries_in_flight(), 0);
    }
}
