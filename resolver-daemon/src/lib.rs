//! node-local-dns-resolver: a node-local caching DNS forwarder.
//!
//! Query flow: `udp` (hot thread: recvmmsg → `wire::parse_query` → `cache` → sendmmsg) or
//! `tcp` → on a miss `resolve` (coalescing, stale, prefetch) → `upstream` (validated
//! exchange) → `cache::insert` → reply; `metrics` counts every step; `server` wires it all.
pub mod cache;
pub mod config;
pub mod drain;
pub mod http;
pub mod memlimit;
pub mod metrics;
pub mod pace;
pub mod resolve;
pub mod sched;
pub mod server;
pub mod setup;
pub mod sockets;
pub mod tcp;
pub mod udp;
pub mod upstream;
pub mod watchdog;
pub mod wire;
