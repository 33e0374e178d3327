//! Hot-path cost of the cache: parse a client query and answer it from a cached entry,
//! and the cost of inserting an upstream reply.
//!
//! Run: cargo bench -p node-local-dns-resolver --bench cache

use criterion::{Criterion, criterion_group, criterion_main};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use resolver::answer::Accounting;
use resolver::cache::{Answer, Cache, CacheConfig, Inserted};
use resolver::fast::{Fast, answer_fast};
use resolver::metrics::{Metrics, Proto};
use resolver::wire::{parse_query, udp_limit};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn query(name: &str, edns: bool) -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(
        Name::from_ascii(name).unwrap(),
        RecordType::A,
    ));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// A typical in-cluster answer: two A records, EDNS echoed.
fn reply(query: &[u8], rcode: ResponseCode, records: usize) -> Vec<u8> {
    let q = Message::from_vec(query).unwrap();
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    let name = q.queries[0].name.clone();
    m.add_query(q.queries[0].clone());
    if rcode == ResponseCode::NoError {
        for i in 0..records {
            let ip = Ipv4Addr::new(10, 96, 0, i as u8);
            m.add_answer(Record::from_rdata(name.clone(), 30, RData::A(A(ip))));
        }
    } else {
        let soa = SOA::new(name.clone(), name.clone(), 1, 7200, 1800, 86400, 30);
        m.add_authority(Record::from_rdata(name, 30, RData::SOA(soa)));
    }
    m.set_edns(Edns::new());
    m.to_vec().unwrap()
}

const NAME: &str = "my-svc.my-namespace.svc.cluster.local.";

fn bench_hit(c: &mut Criterion) {
    let cache = Cache::new(CacheConfig::default());
    let now = Instant::now();
    let client = query(NAME, true);
    let parsed = parse_query(&client).unwrap();
    let inserted = cache.insert(&parsed, &reply(&client, ResponseCode::NoError, 2), now);
    assert!(matches!(inserted, Inserted::Cached(_)));
    let later = now + Duration::from_secs(3);
    let mut out = Vec::with_capacity(1232);

    c.bench_function("parse_query", |b| {
        b.iter(|| parse_query(black_box(&client)).unwrap().question_end)
    });
    c.bench_function("hit/parse+answer (2 A, EDNS)", |b| {
        b.iter(|| {
            let q = parse_query(black_box(&client)).unwrap();
            let answer = cache.answer(&q, later, &mut out, udp_limit(&q));
            assert!(matches!(answer, Answer::Fresh { .. }));
        })
    });
    let plain = query(NAME, false);
    c.bench_function("hit/parse+answer (2 A, OPT stripped)", |b| {
        b.iter(|| {
            let q = parse_query(black_box(&plain)).unwrap();
            let answer = cache.answer(&q, later, &mut out, udp_limit(&q));
            assert!(matches!(answer, Answer::Fresh { .. }));
        })
    });
    let missing = query("missing.my-namespace.svc.cluster.local.", true);
    c.bench_function("miss/parse+answer", |b| {
        b.iter(|| {
            let q = parse_query(black_box(&missing)).unwrap();
            cache.answer(&q, later, &mut out, udp_limit(&q))
        })
    });
}

/// What a UDP thread does for one cached query, from the received datagram to the reply
/// bytes and the response metrics. Not inlined, so callgrind reports its instructions per
/// call, a figure free of wall-clock noise on a shared machine:
/// `cargo bench -p node-local-dns-resolver --bench cache --no-run`, then
/// `valgrind --tool=callgrind target/release/deps/cache-* --bench --profile-time 2 "hot path"`
/// and the inclusive cost of `answer_hit` divided by its calls.
#[inline(never)]
fn answer_hit(
    cache: &Cache,
    pkt: &[u8],
    now: Instant,
    received: Instant,
    out: &mut Vec<u8>,
    acct: &Accounting,
) {
    match answer_fast(cache, pkt, now, out, Proto::Udp, acct.metrics()) {
        Fast::Reply { answered, .. } => acct.answered(&answered, out.len(), received, || None),
        other => panic!("expected a cached reply, got {other:?}"),
    }
}

fn bench_hot_path(c: &mut Criterion) {
    let cache = Arc::new(Cache::new(CacheConfig::default()));
    let metrics = Metrics::new(std::env::temp_dir(), cache.clone(), "bench".into()).unwrap();
    let addr = "127.0.0.1:53".parse().unwrap();
    let acct = Accounting::new(metrics.server(addr, Proto::Udp), false, addr, Proto::Udp);
    let now = Instant::now();
    let client = query(NAME, true);
    let parsed = parse_query(&client).unwrap();
    cache.insert(&parsed, &reply(&client, ResponseCode::NoError, 2), now);
    let later = now + Duration::from_secs(3);
    // Received "in the future": elapsed() is always zero, so the duration histogram does
    // the same work on every call however long the run takes.
    let received = now + Duration::from_secs(3600);
    let mut out = Vec::with_capacity(1232);
    c.bench_function("hot path/cached query answered with metrics", |b| {
        b.iter(|| answer_hit(&cache, black_box(&client), later, received, &mut out, &acct))
    });
}

fn bench_insert(c: &mut Criterion) {
    let now = Instant::now();
    let client = query(NAME, true);
    let parsed = parse_query(&client).unwrap();
    let positive = reply(&client, ResponseCode::NoError, 2);
    let negative = reply(&client, ResponseCode::NXDomain, 0);
    let cache = Cache::new(CacheConfig::default());
    c.bench_function("insert/replace positive", |b| {
        b.iter(|| cache.insert(&parsed, black_box(&positive), now))
    });
    c.bench_function("insert/replace negative", |b| {
        b.iter(|| cache.insert(&parsed, black_box(&negative), now))
    });

    // Distinct names into a full cache: every insert also evicts one entry.
    let cfg = CacheConfig {
        success_capacity: 16 * 1024,
        ..CacheConfig::default()
    };
    let cache = Cache::new(cfg);
    let names: Vec<(Vec<u8>, Vec<u8>)> = (0..64 * 1024)
        .map(|i| {
            let q = query(&format!("pod-{i}.my-namespace.svc.cluster.local."), true);
            let r = reply(&q, ResponseCode::NoError, 2);
            (q, r)
        })
        .collect();
    let mut i = 0;
    c.bench_function("insert/distinct names with eviction", |b| {
        b.iter(|| {
            let (q, r) = &names[i % names.len()];
            i += 1;
            let parsed = parse_query(q).unwrap();
            cache.insert(&parsed, r, now)
        })
    });
}

/// One idle-sweep pass over a full cache (the Deckhouse module's 120 000 + 65 536 entries, asked and
/// popular but nowhere near their prefetch point): what the sweep costs every 250 ms.
fn bench_idle_sweep(c: &mut Criterion) {
    let now = Instant::now();
    let cache = Cache::new(CacheConfig::default());
    for i in 0..(120_000 + 65_536) {
        let q = query(&format!("pod-{i}.my-namespace.svc.cluster.local."), true);
        let kind = if i < 120_000 {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        let records = if i < 120_000 { 2 } else { 0 };
        let parsed = parse_query(&q).unwrap();
        cache.insert(&parsed, &reply(&q, kind, records), now);
        for _ in 0..10 {
            let mut out = Vec::new();
            cache.answer(&parsed, now, &mut out, udp_limit(&parsed));
        }
    }
    // Shards fill unevenly: about a thousand entries are evicted before the cache is full.
    let stats = cache.stats();
    let entries = stats.success_entries + stats.denial_entries;
    assert!(entries > 180_000, "{stats:?}");
    c.bench_function("idle sweep/full pass, full cache of popular entries", |b| {
        b.iter(|| {
            (0..10)
                .map(|part| cache.idle_refreshes(now, (part, 10), 256).watched)
                .sum::<usize>()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_hit, bench_hot_path, bench_insert, bench_idle_sweep
}
criterion_main!(benches);
