//! node-local-dns-resolver: a node-local caching DNS forwarder.
pub mod cache;
pub mod wire;
