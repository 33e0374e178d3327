//! A minimal DNS client (build a query, parse the reply header and A/AAAA answers) and the
//! load generator the switchover tests use.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Record types the tests ask for.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

static NEXT_ID: AtomicU16 = AtomicU16::new(1);

/// What a reply said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    pub rcode: u8,
    pub addrs: Vec<IpAddr>,
    /// Smallest TTL among the answer records.
    pub min_ttl: Option<u32>,
}

/// Why a query got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    Timeout,
    /// ICMP port unreachable (the connected socket got ECONNREFUSED).
    Refused,
    Malformed(String),
    /// A well-formed answer that is not the expected one (rcode or addresses).
    WrongAnswer(String),
    Io(String),
}

/// A query for `name`/`qtype` with recursion desired.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)? as usize;
        if len & 0xc0 == 0xc0 {
            return Some(pos + 2);
        }
        pos += 1;
        if len == 0 {
            return Some(pos);
        }
        pos += len;
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// Parses a reply: ID, rcode, and the A/AAAA records of the answer section.
pub fn parse_reply(msg: &[u8]) -> Result<Answer, QueryError> {
    let bad = || QueryError::Malformed(format!("{} bytes", msg.len()));
    if msg.len() < 12 || msg[2] & 0x80 == 0 {
        return Err(bad());
    }
    let id = u16_at(msg, 0).ok_or_else(bad)?;
    let rcode = msg[3] & 0x0f;
    let qd = u16_at(msg, 4).ok_or_else(bad)?;
    let an = u16_at(msg, 6).ok_or_else(bad)?;
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos).ok_or_else(bad)? + 4;
    }
    let mut addrs = Vec::new();
    let mut min_ttl = None::<u32>;
    for _ in 0..an {
        pos = skip_name(msg, pos).ok_or_else(bad)?;
        let rtype = u16_at(msg, pos).ok_or_else(bad)?;
        let ttl_hi = u16_at(msg, pos + 4).ok_or_else(bad)? as u32;
        let ttl_lo = u16_at(msg, pos + 6).ok_or_else(bad)? as u32;
        let rdlen = u16_at(msg, pos + 8).ok_or_else(bad)? as usize;
        let rdata = msg.get(pos + 10..pos + 10 + rdlen).ok_or_else(bad)?;
        min_ttl = Some(min_ttl.map_or(ttl_hi << 16 | ttl_lo, |t| t.min(ttl_hi << 16 | ttl_lo)));
        match (rtype, rdlen) {
            (TYPE_A, 4) => addrs.push(IpAddr::V4(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (TYPE_AAAA, 16) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(rdata);
                addrs.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            _ => {}
        }
        pos += 10 + rdlen;
    }
    Ok(Answer {
        id,
        rcode,
        addrs,
        min_ttl,
    })
}

fn next_id() -> u16 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One UDP query from a fresh socket (fresh source port) in the calling thread's netns.
pub fn query_udp(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Result<Answer, QueryError> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(|_| QueryError::Io("bind addr".into()))?;
    let sock = UdpSocket::bind(bind).map_err(|e| QueryError::Io(e.to_string()))?;
    sock.connect(server)
        .map_err(|e| QueryError::Io(e.to_string()))?;
    query_on(&sock, name, qtype, timeout)
}

/// One query on an already connected UDP socket (the caller decides whether ports repeat).
pub fn query_on(
    sock: &UdpSocket,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Result<Answer, QueryError> {
    let id = next_id();
    sock.send(&build_query(id, name, qtype)).map_err(io_err)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QueryError::Timeout);
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| QueryError::Io(e.to_string()))?;
        let n = sock.recv(&mut buf).map_err(io_err)?;
        let answer = parse_reply(&buf[..n])?;
        // A late reply to an earlier query on a reused port is not this query's answer.
        if answer.id == id {
            return Ok(answer);
        }
    }
}

fn io_err(e: std::io::Error) -> QueryError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => QueryError::Timeout,
        ErrorKind::ConnectionRefused => QueryError::Refused,
        _ => QueryError::Io(e.to_string()),
    }
}

/// One query over TCP.
pub fn query_tcp(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Result<Answer, QueryError> {
    let mut s = TcpStream::connect_timeout(&server, timeout).map_err(io_err)?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let q = build_query(next_id(), name, qtype);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).map_err(io_err)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(io_err)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).map_err(io_err)?;
    parse_reply(&msg)
}

/// How the load generator picks source ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    /// A new socket (new ephemeral port) per query, as glibc's resolver does.
    Fresh,
    /// Each worker keeps one socket for its whole run: the same source port again and again.
    Reused,
}

/// A load run: `rate` queries per second for `duration`, spread over `workers` threads, each
/// query waiting up to `timeout` for its answer.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub server: SocketAddr,
    pub name: String,
    pub expect: IpAddr,
    pub rate: u32,
    pub duration: Duration,
    pub timeout: Duration,
    pub workers: u32,
    pub ports: PortMode,
}

/// The outcome of one query of a load run, at its send time since the run started.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Duration,
    pub error: QueryError,
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    /// Queries that got no answer within the timeout (lost).
    pub timeouts: u64,
    /// Queries refused with ICMP port unreachable.
    pub refused: u64,
    /// Answers with the wrong rcode/address, or other errors.
    pub wrong: u64,
    pub failures: Vec<Failure>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.timeouts + self.refused + self.wrong
    }

    /// Queries per second actually sent.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.timeouts += other.timeouts;
        self.refused += other.refused;
        self.wrong += other.wrong;
        self.failures.extend(other.failures);
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

/// Starts a load run in the network namespace at `netns` (a pod's) on a background thread.
pub fn spawn_load(
    netns: std::path::PathBuf,
    spec: LoadSpec,
) -> std::thread::JoinHandle<Result<LoadReport, crate::HarnessError>> {
    std::thread::spawn(move || crate::netns::in_netns(&netns, move || run_load(&spec)))
}

/// Runs the load in the calling thread's network namespace (call it through `in_netns`).
pub fn run_load(spec: &LoadSpec) -> LoadReport {
    let start = Instant::now();
    let workers: Vec<_> = (0..spec.workers.max(1))
        .map(|w| {
            let spec = spec.clone();
            let ns = std::fs::File::open("/proc/thread-self/ns/net").ok();
            std::thread::spawn(move || {
                // Threads start in the process's namespace: follow the caller into its netns.
                if let Some(ns) = ns {
                    let _ = nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET);
                }
                run_worker(&spec, w, start)
            })
        })
        .collect();
    let mut report = LoadReport::default();
    for w in workers {
        if let Ok(r) = w.join() {
            report.merge(r);
        }
    }
    report.failures.sort_by_key(|f| f.at);
    report
}

fn run_worker(spec: &LoadSpec, worker: u32, start: Instant) -> LoadReport {
    let mut report = LoadReport::default();
    let interval = Duration::from_secs_f64(spec.workers.max(1) as f64 / spec.rate.max(1) as f64);
    let mut next = start + interval.mul_f64(worker as f64 / spec.workers.max(1) as f64);
    let reused = match spec.ports {
        PortMode::Reused => connected_socket(spec.server).ok(),
        PortMode::Fresh => None,
    };
    while next < start + spec.duration {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        let at = start.elapsed();
        report.sent += 1;
        let result = match &reused {
            Some(sock) => query_on(sock, &spec.name, TYPE_A, spec.timeout),
            None => query_udp(spec.server, &spec.name, TYPE_A, spec.timeout),
        };
        let error = match result {
            Ok(a) if a.rcode == 0 && a.addrs.contains(&spec.expect) => {
                report.answered += 1;
                continue;
            }
            Ok(a) => QueryError::WrongAnswer(format!("rcode {} addrs {:?}", a.rcode, a.addrs)),
            Err(e) => e,
        };
        match error {
            QueryError::Timeout => report.timeouts += 1,
            QueryError::Refused => report.refused += 1,
            _ => report.wrong += 1,
        }
        report.failures.push(Failure { at, error });
    }
    report.elapsed = start.elapsed();
    report
}

fn connected_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })?;
    sock.connect(server)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_labels_and_question() {
        let q = build_query(0x1234, "web.default.svc.cluster.local", TYPE_A);
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(q[12], 3);
        assert_eq!(&q[13..16], b"web");
        assert_eq!(&q[q.len() - 4..], &[0, 1, 0, 1]);
    }

    #[test]
    fn reply_with_compressed_a_record_parses() {
        let mut r = build_query(7, "a.b", TYPE_A);
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
        let a = parse_reply(&r).unwrap();
        assert_eq!(a.id, 7);
        assert_eq!(a.rcode, 0);
        assert_eq!(a.addrs, vec![IpAddr::from([10, 0, 0, 1])]);
        assert_eq!(a.min_ttl, Some(30));
    }

    #[test]
    fn truncated_reply_is_malformed() {
        let mut r = build_query(7, "a.b", TYPE_A);
        r[2] = 0x81;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12, 0, 1]);
        assert!(matches!(parse_reply(&r), Err(QueryError::Malformed(_))));
    }
}
