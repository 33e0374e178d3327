//! The forwarder: sends cache misses to the upstreams and accepts only replies that match.
//!
//! Every upstream query gets a fresh random ID and a fresh socket (random source port), bound
//! to the source chosen by `sockets::upstream_bind_source`. A reply counts only if it comes
//! from the upstream (connected socket) and carries our ID, QR=1 and our exact question;
//! anything else is ignored and never cached.

use crate::config::UpstreamProto;
use crate::metrics::{ForwardMetrics, UpstreamMetrics};
use crate::sockets::domain;
use crate::wire::{self, Query, build_query, is_truncated, reply_matches};
use socket2::{Protocol, SockAddr, Socket, Type};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Upstreams are told 1232 (EDNS); anything over this is not a reply we want.
const MAX_UDP_REPLY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("too many concurrent upstream queries")]
    Overloaded,
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    #[error("upstream {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("upstream {0} sent a reply that does not match the query")]
    Mismatch(SocketAddr),
    #[error("no upstream configured")]
    NoUpstream,
}

/// Where the resolver sends what the cache cannot answer; `Forwarder` is the real one, unit
/// tests use fakes.
pub trait Upstream: Send + Sync + 'static {
    /// The raw reply to `q`, already checked to answer it (`wire::reply_matches`).
    fn forward(&self, q: &Query<'_>) -> impl Future<Output = Result<Vec<u8>, ForwardError>> + Send;
    /// False when every upstream responsible for `q` is known dead (serve stale at once).
    fn any_healthy(&self, q: &Query<'_>) -> bool;
    /// Whether the daemon may report ready (see `Forwarder::ready`).
    fn ready(&self) -> bool;
}

impl Upstream for Forwarder {
    fn forward(&self, q: &Query<'_>) -> impl Future<Output = Result<Vec<u8>, ForwardError>> + Send {
        Forwarder::forward(self, q)
    }
    fn any_healthy(&self, q: &Query<'_>) -> bool {
        Forwarder::any_healthy(self, q)
    }
    fn ready(&self) -> bool {
        Forwarder::ready(self)
    }
}

/// One upstream server and what we know about it.
#[derive(Debug)]
pub struct UpstreamServer {
    pub addr: SocketAddr,
    /// Source to bind upstream sockets to (None: the kernel's choice).
    pub source: Option<IpAddr>,
    pub label: String,
    healthy: AtomicBool,
    answered: AtomicBool,
    /// Replies dropped because source/ID/question did not match (for tests and logs).
    pub mismatched: AtomicU64,
    /// Set once by `Forwarder::new`.
    metrics: OnceLock<UpstreamMetrics>,
}

impl UpstreamServer {
    pub fn new(addr: SocketAddr, source: Option<IpAddr>) -> Self {
        Self {
            addr,
            source,
            label: addr.to_string(),
            // Optimistic until proven otherwise: the first queries should not go stale.
            healthy: AtomicBool::new(true),
            answered: AtomicBool::new(false),
            mismatched: AtomicU64::new(0),
            metrics: OnceLock::new(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Healthy now, and not merely on the optimistic start-up assumption.
    pub fn is_ready(&self) -> bool {
        self.has_answered() && self.is_healthy()
    }

    fn mark(&self, ok: bool) {
        let was = self.healthy.swap(ok, Ordering::Relaxed);
        if ok && !self.answered.load(Ordering::Relaxed) {
            self.answered.store(true, Ordering::Relaxed);
        }
        if let Some(m) = self.metrics.get().filter(|_| was != ok) {
            m.healthy.set(ok as i64);
        }
    }
}

/// A group of upstreams tried in turn, healthy ones first, round-robin.
#[derive(Debug)]
pub struct UpstreamSet {
    pub upstreams: Vec<Arc<UpstreamServer>>,
    next: AtomicUsize,
}

impl UpstreamSet {
    pub fn new(upstreams: Vec<UpstreamServer>) -> Self {
        Self {
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.upstreams.iter().any(|u| u.is_healthy())
    }

    pub fn any_ready(&self) -> bool {
        self.upstreams.iter().any(|u| u.is_ready())
    }

    /// Try order for one query: healthy upstreams (rotated) then the unhealthy ones.
    fn order(&self) -> Vec<Arc<UpstreamServer>> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|i| self.upstreams[(start + i) % n].clone());
        let (mut healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|u| u.is_healthy());
        healthy.extend(sick);
        healthy
    }
}

pub struct ForwarderConfig {
    pub proto: UpstreamProto,
    pub timeout: Duration,
    pub attempts: u32,
    pub max_concurrent: usize,
    pub cluster_domain: String,
}

pub struct Forwarder {
    pub primary: UpstreamSet,
    /// Upstreams for names outside the cluster domain (`--external-to-resolv-conf`).
    pub external: Option<UpstreamSet>,
    cfg: ForwarderConfig,
    slots: Arc<Semaphore>,
    metrics: ForwardMetrics,
}

impl Forwarder {
    pub fn new(
        primary: UpstreamSet,
        external: Option<UpstreamSet>,
        cfg: ForwarderConfig,
        metrics: ForwardMetrics,
    ) -> Self {
        for u in primary
            .upstreams
            .iter()
            .chain(external.iter().flat_map(|s| s.upstreams.iter()))
        {
            let m = metrics.upstream(&u.label);
            m.healthy.set(1);
            let _ = u.metrics.set(m);
        }
        let slots = Arc::new(Semaphore::new(cfg.max_concurrent));
        Self {
            primary,
            external,
            cfg,
            slots,
            metrics,
        }
    }

    /// The upstream set responsible for `q`.
    pub fn set_for(&self, q: &Query<'_>) -> &UpstreamSet {
        match &self.external {
            Some(ext) if !is_cluster_name(q.qname, &self.cfg.cluster_domain) => ext,
            _ => &self.primary,
        }
    }

    pub fn any_healthy(&self, q: &Query<'_>) -> bool {
        self.set_for(q).any_healthy()
    }

    /// Readiness: some upstream of the primary set is healthy now and has answered at least
    /// once (a query or a health check). Health is the forwarder's own state: a failed
    /// attempt or health check marks an upstream down, an answer marks it up, so this follows
    /// the upstreams within a health-check interval either way.
    pub fn ready(&self) -> bool {
        self.primary.any_ready()
    }

    /// Resolves `q` upstream: the raw, validated reply.
    pub async fn forward(&self, q: &Query<'_>) -> Result<Vec<u8>, ForwardError> {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            self.metrics.max_concurrent_rejects.inc();
            return Err(ForwardError::Overloaded);
        };
        let order = self.set_for(q).order();
        let mut last = ForwardError::NoUpstream;
        for attempt in 0..self.cfg.attempts as usize {
            let Some(up) = order.get(attempt % order.len().max(1)) else {
                break;
            };
            match self.attempt(up, q).await {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream attempt failed");
                    up.mark(false);
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn attempt(&self, up: &UpstreamServer, q: &Query<'_>) -> Result<Vec<u8>, ForwardError> {
        let started = Instant::now();
        if let Some(m) = up.metrics.get() {
            m.requests.inc();
        }
        let reply = exchange(up, q, self.cfg.proto, self.cfg.timeout).await?;
        if let Some(m) = up.metrics.get() {
            m.response(wire::reply_rcode(&reply), started.elapsed().as_secs_f64());
        }
        up.mark(true);
        Ok(reply)
    }

    /// One round of active health checks ('. IN NS' to every upstream).
    pub async fn health_check(&self) {
        for set in std::iter::once(&self.primary).chain(self.external.iter()) {
            let mut all_failed = !set.upstreams.is_empty();
            for up in &set.upstreams {
                let q = wire::root_ns_query();
                let ok = exchange(up, &q, self.cfg.proto, self.cfg.timeout)
                    .await
                    .is_ok();
                if let Some(m) = up.metrics.get().filter(|_| !ok) {
                    m.healthcheck_failures.inc();
                    m.proxy_healthcheck_failures.inc();
                }
                all_failed &= !ok;
                up.mark(ok);
            }
            if all_failed {
                self.metrics.healthcheck_broken.inc();
            }
        }
    }
}

/// One query/response with one upstream over the configured transport.
async fn exchange(
    up: &UpstreamServer,
    q: &Query<'_>,
    proto: UpstreamProto,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let id: u16 = rand::random();
    let query = build_query(q, id);
    let deadline = tokio::time::Instant::now() + timeout;
    let run = async {
        match proto {
            UpstreamProto::Tcp => exchange_tcp(up, &query, q, id).await,
            UpstreamProto::Udp => exchange_udp(up, &query, q, id).await,
            UpstreamProto::PreferUdp => {
                let reply = exchange_udp(up, &query, q, id).await?;
                if is_truncated(&reply) {
                    // TC=1: the full answer only fits over TCP; fresh ID for the new query.
                    let id2: u16 = rand::random();
                    exchange_tcp(up, &build_query(q, id2), q, id2).await
                } else {
                    Ok(reply)
                }
            }
        }
    };
    tokio::time::timeout_at(deadline, run)
        .await
        .map_err(|_| ForwardError::Timeout(up.addr))?
}

/// The pinned source (`--upstream-source`) with port 0, so the kernel still picks a random
/// port; `None` when the kernel may choose the source address itself.
fn pinned_source(up: &UpstreamServer) -> Option<SocketAddr> {
    up.source.map(|ip| SocketAddr::new(ip, 0))
}

async fn exchange_udp(
    up: &UpstreamServer,
    query: &[u8],
    q: &Query<'_>,
    id: u16,
) -> Result<Vec<u8>, ForwardError> {
    let io_err = |source| ForwardError::Io {
        addr: up.addr,
        source,
    };
    let (sock, sent) = open_and_send(up, query).map_err(io_err)?;
    if !sent {
        sock.send(query).await.map_err(io_err)?;
    }
    // Uninitialised capacity: nothing to zero, and a matching reply is returned as is.
    let mut buf = Vec::with_capacity(MAX_UDP_REPLY);
    loop {
        buf.clear();
        sock.recv_buf(&mut buf).await.map_err(io_err)?;
        if reply_matches(&buf, q, id) {
            return Ok(buf);
        }
        up.mismatched.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(upstream = %up.addr, "ignored a reply that does not match the query");
    }
}

/// A fresh connected UDP socket (random source port) for one upstream query, with the
/// query already sent when the kernel took it (`true`). Connected: the kernel drops datagrams
/// from any other address/port and reports ICMP port-unreachable as ECONNREFUSED, so a dead
/// upstream fails fast. A fresh socket is writable, so sending before tokio registers it
/// saves a trip through the event loop, and without a source to pin, connect picks the
/// random port itself (no bind): refreshes cost fewer syscalls and wake-ups.
fn open_and_send(up: &UpstreamServer, query: &[u8]) -> io::Result<(tokio::net::UdpSocket, bool)> {
    let ty = Type::DGRAM.nonblocking().cloexec();
    let s = Socket::new(domain(&up.addr), ty, Some(Protocol::UDP))?;
    if let Some(src) = pinned_source(up) {
        s.bind(&SockAddr::from(src))?;
    }
    s.connect(&SockAddr::from(up.addr))?;
    let sent = match s.send(query) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e),
    };
    Ok((tokio::net::UdpSocket::from_std(s.into())?, sent))
}

async fn exchange_tcp(
    up: &UpstreamServer,
    query: &[u8],
    q: &Query<'_>,
    id: u16,
) -> Result<Vec<u8>, ForwardError> {
    let io_err = |source| ForwardError::Io {
        addr: up.addr,
        source,
    };
    let sock = if up.addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(io_err)?;
    if let Some(src) = pinned_source(up) {
        sock.bind(src).map_err(io_err)?;
    }
    let mut stream = sock.connect(up.addr).await.map_err(io_err)?;
    stream
        .write_all(&wire::tcp_framed(query))
        .await
        .map_err(io_err)?;
    let mut len = [0u8; wire::TCP_PREFIX_LEN];
    stream.read_exact(&mut len).await.map_err(io_err)?;
    let mut reply = vec![0u8; wire::tcp_message_len(len)];
    stream.read_exact(&mut reply).await.map_err(io_err)?;
    if reply_matches(&reply, q, id) {
        Ok(reply)
    } else {
        up.mismatched.fetch_add(1, Ordering::Relaxed);
        Err(ForwardError::Mismatch(up.addr))
    }
}

/// Whether a wire-format name is the cluster domain, below it, or a reverse zone (which the
/// cluster DNS serves for Services and Pods).
pub fn is_cluster_name(qname: &[u8], cluster_domain: &str) -> bool {
    let dotted = wire::dotted_lowercase(qname);
    [cluster_domain, "in-addr.arpa", "ip6.arpa"]
        .iter()
        .any(|d| !d.is_empty() && (dotted == *d || dotted.ends_with(&format!(".{d}"))))
}

/// `nameserver` lines of a resolv.conf, minus our own listen addresses (no loops).
pub fn resolv_conf_servers(text: &str, listen: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some("nameserver"))
                .then(|| parts.next())
                .flatten()
        })
        .filter_map(|ip| ip.split('%').next().and_then(|s| s.parse::<IpAddr>().ok()))
        .filter(|ip| !listen.iter().any(|l| l.ip() == *ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_while_an_upstream_that_answered_is_healthy_now() {
        let set = UpstreamSet::new(vec![
            UpstreamServer::new("192.0.2.1:53".parse().unwrap(), None),
            UpstreamServer::new("192.0.2.2:53".parse().unwrap(), None),
        ]);
        assert!(set.any_healthy(), "optimistic at start");
        assert!(!set.any_ready(), "but not ready before any answer");
        set.upstreams[0].mark(true);
        assert!(set.any_ready());
        set.upstreams[1].mark(false);
        assert!(set.any_ready(), "one healthy upstream is enough");
        set.upstreams[0].mark(false);
        assert!(!set.any_ready(), "every upstream down: not ready");
        set.upstreams[1].mark(true);
        assert!(set.any_ready(), "another upstream answering: ready again");
    }

    #[test]
    fn cluster_names_are_recognised() {
        assert!(is_cluster_name(
            b"\x03svc\x07cluster\x05local\x00",
            "cluster.local"
        ));
        assert!(is_cluster_name(
            b"\x07CLUSTER\x05local\x00",
            "cluster.local"
        ));
        assert!(is_cluster_name(
            b"\x0210\x07in-addr\x04arpa\x00",
            "cluster.local"
        ));
        assert!(!is_cluster_name(b"\x07example\x03com\x00", "cluster.local"));
        assert!(!is_cluster_name(
            b"\x0bxcluster\x05local\x00",
            "cluster.local"
        ));
    }

    #[test]
    fn resolv_conf_skips_our_own_addresses() {
        let text = "search x\nnameserver 10.96.0.10\nnameserver 1.1.1.1\n# nameserver 9.9.9.9\nnameserver fe80::1%eth0\n";
        let listen = ["10.96.0.10:53".parse().unwrap()];
        let got = resolv_conf_servers(text, &listen);
        assert_eq!(
            got,
            vec![
                "1.1.1.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
