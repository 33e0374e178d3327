//! The forwarder: sends cache misses to the upstreams and accepts only replies that match.
//!
//! Every upstream query gets a fresh random ID and a fresh socket (random source port), bound
//! to the source chosen by `sockets::upstream_bind_source`. A reply counts only if it comes
//! from the upstream (connected socket) and carries our ID, QR=1 and our exact question;
//! anything else is ignored and never cached.

use crate::config::UpstreamProto;
use crate::metrics::{ForwardMetrics, UpstreamMetrics};
use crate::sockets::domain;
use crate::wire::{Query, build_query};
use socket2::{Protocol, SockAddr, Socket, Type};
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

/// One upstream server and what we know about it.
#[derive(Debug)]
pub struct Upstream {
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

impl Upstream {
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
    pub upstreams: Vec<Arc<Upstream>>,
    next: AtomicUsize,
}

impl UpstreamSet {
    pub fn new(upstreams: Vec<Upstream>) -> Self {
        Self {
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn any_healthy(&self) -> bool {
        self.upstreams.iter().any(|u| u.is_healthy())
    }

    /// Try order for one query: healthy upstreams (rotated) then the unhealthy ones.
    fn order(&self) -> Vec<Arc<Upstream>> {
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

    /// True once any upstream answered (readiness).
    pub fn any_answered(&self) -> bool {
        self.primary.upstreams.iter().any(|u| u.has_answered())
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

    async fn attempt(&self, up: &Upstream, q: &Query<'_>) -> Result<Vec<u8>, ForwardError> {
        let started = Instant::now();
        if let Some(m) = up.metrics.get() {
            m.requests.inc();
        }
        let reply = exchange(up, q, self.cfg.proto, self.cfg.timeout).await?;
        if let Some(m) = up.metrics.get() {
            let rcode = reply.get(3).map(|b| (b & 0xf) as u16).unwrap_or(0);
            m.response(rcode, started.elapsed().as_secs_f64());
        }
        up.mark(true);
        Ok(reply)
    }

    /// One round of active health checks ('. IN NS' to every upstream).
    pub async fn health_check(&self) {
        for set in std::iter::once(&self.primary).chain(self.external.iter()) {
            let mut all_failed = !set.upstreams.is_empty();
            for up in &set.upstreams {
                // `. IN NS`, like CoreDNS's forward health check.
                let q = Query {
                    id: 0,
                    flags: 0x0100,
                    qname: &[0],
                    qtype: 2,
                    qclass: 1,
                    edns: None,
                    question_end: 17,
                };
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
    up: &Upstream,
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
fn pinned_source(up: &Upstream) -> Option<SocketAddr> {
    up.source.map(|ip| SocketAddr::new(ip, 0))
}

async fn exchange_udp(
    up: &Upstream,
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
fn open_and_send(up: &Upstream, query: &[u8]) -> io::Result<(tokio::net::UdpSocket, bool)> {
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
    up: &Upstream,
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
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&(query.len() as u16).to_be_bytes());
    msg.extend_from_slice(query);
    stream.write_all(&msg).await.map_err(io_err)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_err)?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut reply).await.map_err(io_err)?;
    if reply_matches(&reply, q, id) {
        Ok(reply)
    } else {
        up.mismatched.fetch_add(1, Ordering::Relaxed);
        Err(ForwardError::Mismatch(up.addr))
    }
}

pub fn is_truncated(reply: &[u8]) -> bool {
    reply.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// ID, QR=1, opcode QUERY and exactly our question (name case-insensitively). The rest of
/// the message is validated by whoever uses it: the cache's parser before caching, hickory-proto
/// (`resolve::rewrite_for_client`) before passing an uncached reply on.
pub fn reply_matches(reply: &[u8], q: &Query<'_>, id: u16) -> bool {
    if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id {
        return false;
    }
    let qr = reply[2] & 0x80 != 0;
    let opcode = (reply[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([reply[4], reply[5]]);
    if !qr || opcode != 0 || qdcount != 1 {
        return false;
    }
    let name_end = 12 + q.qname.len();
    let Some(name) = reply.get(12..name_end) else {
        return false;
    };
    let Some(tc) = reply.get(name_end..name_end + 4) else {
        return false;
    };
    name.eq_ignore_ascii_case(q.qname)
        && tc[..2] == q.qtype.to_be_bytes()
        && tc[2..] == q.qclass.to_be_bytes()
}

/// Whether a wire-format name is the cluster domain, below it, or a reverse zone (which the
/// cluster DNS serves for Services and Pods).
pub fn is_cluster_name(qname: &[u8], cluster_domain: &str) -> bool {
    let dotted = wire_name_lower(qname);
    [cluster_domain, "in-addr.arpa", "ip6.arpa"]
        .iter()
        .any(|d| !d.is_empty() && (dotted == *d || dotted.ends_with(&format!(".{d}"))))
}

/// `www.Example.com.` wire form → `www.example.com` (escaping is irrelevant for suffix tests).
pub fn wire_name_lower(qname: &[u8]) -> String {
    let mut out = String::with_capacity(qname.len());
    let mut i = 0;
    while let Some(&len) = qname.get(i) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        let Some(label) = qname.get(i + 1..i + 1 + len as usize) else {
            break;
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
        i += 1 + len as usize;
    }
    out
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

    const QNAME: &[u8] = b"\x03www\x07Example\x03com\x00";

    fn query() -> Query<'static> {
        Query {
            id: 7,
            flags: 0x0110,
            qname: QNAME,
            qtype: 1,
            qclass: 1,
            edns: None,
            question_end: 12 + QNAME.len() + 4,
        }
    }

    fn reply_for(id: u16, qname: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&id.to_be_bytes());
        r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]);
        r.extend_from_slice(qname);
        r.extend_from_slice(&[0, 1, 0, 1]);
        r
    }

    #[test]
    fn built_query_carries_question_cd_and_edns() {
        let m = build_query(&query(), 0xbeef);
        let parsed = hickory_proto::op::Message::from_vec(&m).unwrap();
        assert_eq!(parsed.metadata.id, 0xbeef);
        assert!(parsed.metadata.recursion_desired);
        assert!(parsed.metadata.checking_disabled);
        assert_eq!(parsed.queries.len(), 1);
        assert_eq!(parsed.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    }

    #[test]
    fn accepts_only_matching_replies() {
        let q = query();
        assert!(reply_matches(
            &reply_for(9, b"\x03WWW\x07example\x03COM\x00"),
            &q,
            9
        ));
        assert!(!reply_matches(&reply_for(10, QNAME), &q, 9), "wrong id");
        assert!(
            !reply_matches(&reply_for(9, b"\x03xxx\x07example\x03com\x00"), &q, 9),
            "wrong name"
        );
        let mut not_response = reply_for(9, QNAME);
        not_response[2] &= 0x7f;
        assert!(!reply_matches(&not_response, &q, 9), "QR=0");
        let mut wrong_type = reply_for(9, QNAME);
        let n = wrong_type.len();
        wrong_type[n - 3] = 28;
        assert!(!reply_matches(&wrong_type, &q, 9), "wrong type");
        assert!(
            !reply_matches(&reply_for(9, QNAME)[..14], &q, 9),
            "truncated"
        );
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
