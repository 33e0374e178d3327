//! Finishing an answer: the one place replies are counted and logged (`Accounting`) for UDP
//! hits, UDP misses and TCP, and the miss path shared by both transports (`answer_miss`).
//! UDP hits are sent by the hot thread's batched sendmmsg; everything else leaves through a
//! `Responder`.

use crate::metrics::{Plugin, Proto, ServerMetrics, qtype_index};
use crate::request::Request;
use crate::resolve::Resolver;
use crate::udp::ReplyHandle;
use crate::upstream::Upstream;
use crate::wire;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;

/// How a reply came about, for the metrics and the query log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub plugin: Plugin,
    pub rcode: u16,
    pub qtype: u16,
    /// `qtype_index(qtype)`, computed once per query on the hot path.
    pub type_idx: usize,
}

impl Answered {
    pub fn new(plugin: Plugin, rcode: u16, qtype: u16) -> Self {
        Self {
            plugin,
            rcode,
            qtype,
            type_idx: qtype_index(qtype),
        }
    }
}

/// Metrics and query log of one listener and transport.
#[derive(Clone)]
pub struct Accounting {
    metrics: ServerMetrics,
    log_queries: bool,
    server: SocketAddr,
    proto: Proto,
}

impl Accounting {
    pub fn new(
        metrics: ServerMetrics,
        log_queries: bool,
        server: SocketAddr,
        proto: Proto,
    ) -> Self {
        Self {
            metrics,
            log_queries,
            server,
            proto,
        }
    }

    pub fn metrics(&self) -> &ServerMetrics {
        &self.metrics
    }

    /// Counts a reply of `size` bytes and logs it when asked to. `peer` is only called for
    /// the log: the hot path does not convert the client's address otherwise.
    #[inline]
    pub fn answered(
        &self,
        a: &Answered,
        size: usize,
        received: Instant,
        peer: impl FnOnce() -> Option<SocketAddr>,
    ) {
        self.metrics.response(
            a.type_idx,
            a.plugin,
            a.rcode,
            size,
            received.elapsed().as_secs_f64(),
        );
        if self.log_queries {
            self.log(a, size, peer());
        }
    }

    #[cold]
    fn log(&self, a: &Answered, size: usize, peer: Option<SocketAddr>) {
        let client = peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::info!(
            proto = self.proto.label(),
            client,
            server = %self.server,
            qtype = a.qtype,
            rcode = a.rcode,
            size,
            plugin = ?a.plugin,
            "query answered"
        );
    }
}

/// Where a reply to a client goes from the tokio side.
#[derive(Clone)]
pub enum Responder {
    /// Through the UDP listener (or the raw drain path after it closed).
    Udp(ReplyHandle),
    /// One TCP connection, shared by its pipelined queries.
    Tcp(Arc<Mutex<OwnedWriteHalf>>),
}

impl Responder {
    /// Best effort: a client that went away gets nothing, and no one else is affected.
    pub async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        match self {
            Responder::Udp(handle) => handle.send(bytes, peer),
            Responder::Tcp(writer) => {
                let framed = wire::tcp_framed(bytes);
                let _ = writer.lock().await.write_all(&framed).await;
            }
        }
    }
}

/// Counts, logs and sends one reply from the tokio side.
pub async fn finish(
    accounting: &Accounting,
    to: &Responder,
    a: &Answered,
    bytes: &[u8],
    peer: SocketAddr,
    received: Instant,
) {
    accounting.answered(a, bytes.len(), received, || Some(peer));
    to.send(bytes, peer).await;
}

/// The miss path, for UDP and TCP alike: resolve (upstream, stale, SERVFAIL), then finish.
pub async fn answer_miss<U: Upstream>(
    resolver: &Resolver<U>,
    req: Request,
    accounting: &Accounting,
    to: &Responder,
) {
    let reply = resolver.resolve(&req, accounting.metrics()).await;
    let answered = Answered::new(reply.plugin, reply.rcode, req.qtype());
    finish(
        accounting,
        to,
        &answered,
        &reply.bytes,
        req.peer(),
        req.received(),
    )
    .await;
}
