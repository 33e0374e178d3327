//! The UDP hot path: one thread per socket doing recvmmsg → parse → cache → sendmmsg in
//! batches, with buffers allocated once. Misses and prefetches leave through a bounded
//! channel to the tokio side; if it is full the client gets stale data or SERVFAIL at once.
//! Misses leave one by one (a client waits); prefetches are collected for up to
//! [`PREFETCH_BATCH_DELAY`] and leave together, because waking the tokio side costs more
//! than the upstream exchange itself on a virtualised node.

use crate::answer::Accounting;
use crate::cache::Cache;
use crate::drain::RawUdpSender;
use crate::fast::{Fast, answer_fast, stale_or_servfail};
use crate::metrics::Proto;
use crate::request::Request;
use crate::wire::{self, ParsedQuery, Query};
use socket2::{SockAddr, Socket};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const BATCH: usize = 32;
/// Larger datagrams are not DNS queries we answer (MSG_TRUNC → dropped).
const RECV_BUF: usize = 4096;

/// How long a prefetch may wait for company (checked when the thread wakes: at the latest
/// after the 100 ms receive timeout). Entries come due with 12.5–25 % of their TTL left,
/// ≥ 625 ms at the Deckhouse module's 5 s denial clamp, so the wait costs no freshness.
pub const PREFETCH_BATCH_DELAY: Duration = Duration::from_millis(10);
/// A batch leaves at once when it reaches this size.
const PREFETCH_BATCH_MAX: usize = 64;

/// Work for the tokio side.
#[derive(Debug)]
pub enum Job {
    /// A client datagram the cache could not answer.
    Miss(Miss),
    /// Queries whose entries are due for a background refresh.
    Prefetch(Vec<Vec<u8>>),
}

#[derive(Debug)]
pub struct Miss {
    pub request: Request,
    /// Index of the listener whose socket received it (the reply leaves through it).
    pub listener: usize,
}

/// Sends replies from the tokio side through a listener's socket. At shutdown the socket
/// closes (docs/design-facts.md §1: the closed socket is the fallback) and answers to queries still in
/// flight leave through a raw socket with the listener's address and port (`drain`).
#[derive(Clone)]
pub struct ReplyHandle {
    path: Arc<RwLock<ReplyPath>>,
    local: SocketAddr,
}

#[derive(Clone)]
enum ReplyPath {
    Socket(Arc<Socket>),
    Raw(Arc<RawUdpSender>),
    Closed,
}

impl ReplyHandle {
    pub fn new(sock: Socket, local: SocketAddr) -> Self {
        Self {
            path: Arc::new(RwLock::new(ReplyPath::Socket(Arc::new(sock)))),
            local,
        }
    }

    /// Best effort, never blocks: a full send buffer drops the reply (the client retries).
    pub fn send(&self, bytes: &[u8], peer: SocketAddr) {
        let path = self.path.read().map_or(ReplyPath::Closed, |g| g.clone());
        let sent = match path {
            ReplyPath::Socket(s) => s
                .send_to_with_flags(bytes, &SockAddr::from(peer), libc::MSG_DONTWAIT)
                .map(drop),
            ReplyPath::Raw(raw) => raw.send(bytes, peer),
            ReplyPath::Closed => Ok(()),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, %peer, "udp reply not sent");
        }
    }

    /// Drops this handle's descriptor of the listening socket and switches to the raw path
    /// for the grace period (without CAP_NET_RAW those answers are dropped; clients retry
    /// and reach kube-proxy).
    pub fn close(&self) {
        let next = match RawUdpSender::open(self.local) {
            Ok(raw) => ReplyPath::Raw(Arc::new(raw)),
            Err(e) => {
                tracing::info!(error = %e, listen = %self.local, "answers to UDP queries in flight at shutdown will be dropped");
                ReplyPath::Closed
            }
        };
        if let Ok(mut g) = self.path.write() {
            *g = next;
        }
    }
}

/// What one UDP thread has done, for the watchdog (which cannot probe a ClusterIP listener
/// from the host: kube-proxy's nat OUTPUT would DNAT the probe away). `loops` moves at least
/// once per receive timeout while the thread is alive, `datagrams` while it serves. Only the
/// owning thread writes, so plain loads and stores suffice; one cache line per thread keeps
/// UDP threads from sharing one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ThreadProgress {
    loops: AtomicU64,
    datagrams: AtomicU64,
}

impl ThreadProgress {
    fn record(&self, datagrams: usize) {
        let bump =
            |c: &AtomicU64, by: u64| c.store(c.load(Ordering::Relaxed) + by, Ordering::Relaxed);
        bump(&self.loops, 1);
        bump(&self.datagrams, datagrams as u64);
    }

    /// (loops, datagrams) so far.
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.loops.load(Ordering::Relaxed),
            self.datagrams.load(Ordering::Relaxed),
        )
    }
}

pub struct HotPath {
    pub socket: Socket,
    pub cache: Arc<Cache>,
    pub jobs: mpsc::Sender<Job>,
    /// Metrics and query log of this listener's UDP side.
    pub accounting: Accounting,
    pub listener: usize,
    pub shutdown: Arc<AtomicBool>,
    /// This thread's progress, read by the watchdog.
    pub progress: Arc<ThreadProgress>,
    /// Pause between small back-to-back batches (0: never).
    pub coalesce: Duration,
    /// EEVDF slice to ask for (zero: the kernel's default).
    pub slice: Duration,
    /// The CPU this thread runs on, the one whose queries its socket takes (`--threads auto`).
    pub cpu: Option<usize>,
    /// Refreshes lost to a full job queue.
    pub prefetch_dropped: prometheus::IntCounter,
}

/// Prefetch queries collected by one hot thread, waiting to be handed over together.
#[derive(Default)]
struct PrefetchBatch {
    packets: Vec<Vec<u8>>,
    since: Option<Instant>,
}

impl PrefetchBatch {
    fn push(&mut self, pkt: &[u8], now: Instant) {
        self.since.get_or_insert(now);
        self.packets.push(pkt.to_vec());
    }

    fn due(&self, now: Instant) -> bool {
        self.packets.len() >= PREFETCH_BATCH_MAX
            || self
                .since
                .is_some_and(|t| now.saturating_duration_since(t) >= PREFETCH_BATCH_DELAY)
    }

    /// Hands the batch over; a full channel drops it (the entries then expire and are
    /// fetched on demand, as without prefetch) and counts what it dropped.
    fn flush(&mut self, jobs: &mpsc::Sender<Job>, dropped: &prometheus::IntCounter) {
        self.since = None;
        let packets = std::mem::take(&mut self.packets);
        let n = packets.len() as u64;
        if n > 0 && jobs.try_send(Job::Prefetch(packets)).is_err() {
            dropped.inc_by(n);
        }
    }
}

/// Preallocated recvmmsg/sendmmsg state. The mmsghdr pointers are refreshed before every
/// syscall, so the struct may move freely between batches.
struct Batch {
    bufs: Vec<[u8; RECV_BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    outs: Vec<Vec<u8>>,
    out_iov: Vec<libc::iovec>,
    out_msgs: Vec<libc::mmsghdr>,
    /// For each reply in `outs`, the index of the datagram it answers.
    out_for: Vec<usize>,
}

fn zeroed<T>() -> T {
    // SAFETY: only used for plain C structs (sockaddr_storage, iovec, mmsghdr) for which
    // all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    fn new() -> Self {
        Self {
            bufs: vec![[0u8; RECV_BUF]; BATCH],
            addrs: (0..BATCH).map(|_| zeroed()).collect(),
            iov: (0..BATCH).map(|_| zeroed()).collect(),
            msgs: (0..BATCH).map(|_| zeroed()).collect(),
            outs: (0..BATCH).map(|_| Vec::with_capacity(1500)).collect(),
            out_iov: (0..BATCH).map(|_| zeroed()).collect(),
            out_msgs: (0..BATCH).map(|_| zeroed()).collect(),
            out_for: Vec::with_capacity(BATCH),
        }
    }

    fn recv(&mut self, fd: i32) -> std::io::Result<usize> {
        for i in 0..BATCH {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
        // SAFETY: every msghdr points into buffers owned by `self` that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Length of datagram `i`, unless it was larger than the buffer.
    fn datagram_len(&self, i: usize) -> Option<usize> {
        let m = &self.msgs[i];
        (m.msg_hdr.msg_flags & libc::MSG_TRUNC == 0).then_some((m.msg_len as usize).min(RECV_BUF))
    }

    fn peer(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to_std(&self.addrs[i])
    }

    /// Sends `outs[..out_for.len()]` to their datagrams' senders.
    fn send(&mut self, fd: i32) {
        let n = self.out_for.len();
        for (k, &i) in self.out_for.iter().enumerate() {
            self.out_iov[k] = libc::iovec {
                iov_base: self.outs[k].as_mut_ptr().cast(),
                iov_len: self.outs[k].len(),
            };
            let h = &mut self.out_msgs[k].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.msgs[i].msg_hdr.msg_namelen;
            h.msg_iov = &mut self.out_iov[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: the headers point into buffers owned by `self`.
            let r = unsafe {
                libc::sendmmsg(fd, self.out_msgs[sent..].as_mut_ptr(), (n - sent) as u32, 0)
            };
            if r <= 0 {
                // Skip the datagram that failed (e.g. unreachable peer) and go on.
                tracing::trace!(error = %std::io::Error::last_os_error(), "sendmmsg");
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl HotPath {
    pub fn run(self) {
        let fd = self.socket.as_raw_fd();
        let mut b = Batch::new();
        // Precise short sleeps for batching (the default timer slack is 50 µs).
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64) };
        self.pin();
        self.ask_for_slice();
        let mut last = Instant::now();
        let mut prefetch = PrefetchBatch::default();
        while !self.shutdown.load(Ordering::Relaxed) {
            let received = b.recv(fd);
            self.progress.record(*received.as_ref().unwrap_or(&0));
            let now = Instant::now();
            if prefetch.due(now) {
                prefetch.flush(&self.jobs, &self.prefetch_dropped);
            }
            let n = match received {
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "recvmmsg");
                    continue;
                }
            };
            self.handle_batch(&mut b, n, now, &mut prefetch);
            b.send(fd);
            // Busy but not saturated (small batches arriving back to back): wait a moment so
            // the next wake-up finds several datagrams, like NIC interrupt moderation. Wake-ups,
            // not packet handling, dominate the cost per answer at moderate rates; an idle
            // server never sleeps here, so a lone query gets no added latency.
            if !self.coalesce.is_zero()
                && n < BATCH / 4
                && now.duration_since(last) < self.coalesce * 2
            {
                std::thread::sleep(self.coalesce);
            }
            last = now;
        }
        tracing::debug!(listener = self.listener, "udp receive thread stopped");
    }

    /// Unpinned, the thread would still get its CPU's queries but answer them wherever the
    /// scheduler put it, paying a cross-CPU wake-up each way.
    fn pin(&self) {
        let Some(cpu) = self.cpu else { return };
        if let Err(e) = crate::sched::pin_this_thread(cpu) {
            tracing::warn!(error = %e, cpu, listener = self.listener, "udp thread not pinned");
        }
    }

    fn ask_for_slice(&self) {
        if self.slice.is_zero() {
            return;
        }
        match crate::sched::request_slice_for_this_thread(self.slice) {
            Ok(Some(got)) => {
                tracing::debug!(listener = self.listener, slice = ?got, "udp thread slice")
            }
            Ok(None) => {
                tracing::debug!("no custom scheduler slice (Linux < 6.12 or a real-time policy)")
            }
            Err(e) => tracing::warn!(error = %e, "sched_setattr: keeping the default slice"),
        }
    }

    fn handle_batch(&self, b: &mut Batch, n: usize, now: Instant, prefetch: &mut PrefetchBatch) {
        b.out_for.clear();
        let m = self.accounting.metrics();
        for i in 0..n {
            let Some(len) = b.datagram_len(i) else {
                continue;
            };
            let pkt = &b.bufs[i][..len];
            let k = b.out_for.len();
            let mut out = std::mem::take(&mut b.outs[k]);
            let answered = match answer_fast(&self.cache, pkt, now, &mut out, Proto::Udp, m) {
                Fast::Reply {
                    answered,
                    prefetch: due,
                } => {
                    if due {
                        prefetch.push(pkt, now);
                    }
                    Some(answered)
                }
                Fast::Drop => None,
                Fast::Miss(parsed) => match b.peer(i) {
                    None => None,
                    Some(peer) if self.hand_over(pkt, parsed, peer, now) => None,
                    Some(_) => Some(self.overloaded(pkt, &parsed.attach(pkt), now, &mut out)),
                },
            };
            if let Some(a) = answered {
                self.accounting.answered(&a, out.len(), now, || b.peer(i));
                b.out_for.push(i);
            }
            b.outs[k] = out;
        }
    }

    /// Queues a missed datagram for the tokio side; false when the queue is full.
    fn hand_over(&self, pkt: &[u8], parsed: ParsedQuery, peer: SocketAddr, now: Instant) -> bool {
        let request = Request::new(pkt.to_vec(), parsed, peer, Proto::Udp, now);
        let job = Job::Miss(Miss {
            request,
            listener: self.listener,
        });
        self.jobs.try_send(job).is_ok()
    }

    /// Miss queue full: answered here at once, never queued (see `stale_or_servfail`).
    fn overloaded(
        &self,
        pkt: &[u8],
        q: &Query<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> crate::answer::Answered {
        let m = self.accounting.metrics();
        stale_or_servfail(&self.cache, q, pkt, now, wire::udp_limit(q), m, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("dropped", "test").unwrap()
    }

    #[test]
    fn prefetches_wait_for_company_until_the_delay_or_the_size_cap() {
        let t0 = Instant::now();
        let mut batch = PrefetchBatch::default();
        assert!(!batch.due(t0), "nothing to send");
        batch.push(b"q1", t0);
        assert!(!batch.due(t0 + Duration::from_millis(9)));
        assert!(batch.due(t0 + PREFETCH_BATCH_DELAY));
        let mut full = PrefetchBatch::default();
        (0..PREFETCH_BATCH_MAX).for_each(|_| full.push(b"q", t0));
        assert!(full.due(t0), "a full batch leaves at once");
    }

    #[test]
    fn a_batch_leaves_as_one_job_and_a_full_queue_counts_what_it_drops() {
        let (tx, mut rx) = mpsc::channel(1);
        let dropped = counter();
        let t0 = Instant::now();
        let mut batch = PrefetchBatch::default();
        for q in [&b"a"[..], b"b", b"c"] {
            batch.push(q, t0);
        }
        batch.flush(&tx, &dropped);
        match rx.try_recv() {
            Ok(Job::Prefetch(packets)) => assert_eq!(packets, [b"a", b"b", b"c"]),
            other => panic!("expected one prefetch job, got {other:?}"),
        }
        assert_eq!(dropped.get(), 0);
        assert!(
            !batch.due(t0 + PREFETCH_BATCH_DELAY),
            "emptied, timer reset"
        );

        tx.try_send(Job::Prefetch(vec![])).unwrap(); // the queue is now full
        batch.push(b"d", t0);
        batch.push(b"e", t0);
        batch.flush(&tx, &dropped);
        assert_eq!(dropped.get(), 2);
    }
}
