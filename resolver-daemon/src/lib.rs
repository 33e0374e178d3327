//! node-local-dns-resolver: a node-local caching DNS forwarder.
//!
//! Query flow: `udp` (hot thread: recvmmsg → `wire::parse_query` → `cache` → sendmmsg) or
//! `tcp` → `fast::answer_fast`; on a miss a `request::Request` (parsed once) goes to
//! `resolve::Resolver` (coalescing, stale, prefetch) → `upstream` (validated exchange) →
//! `cache::insert` → reply; `answer` counts, logs and sends every reply; `wire` owns every
//! DNS byte rule; `server` wires it all.
//!
//! Unsafe code is denied except in the modules that make raw system calls (`sched`, `udp`).
#![deny(unsafe_code)]

pub mod answer;
pub mod cache;
pub mod config;
pub mod drain;
pub mod fast;
pub mod http;
pub mod memlimit;
pub mod metrics;
pub mod pace;
pub mod request;
pub mod resolve;
#[allow(unsafe_code)]
pub mod sched;
pub mod server;
pub mod setup;
pub mod sockets;
pub mod tcp;
#[allow(unsafe_code)]
pub mod udp;
pub mod upstream;
pub mod watchdog;
pub mod wire;
