//! The watchdog: a plain thread that probes the daemon's own UDP listeners and checks that
//! the tokio runtime is alive; after `timeout` of continuous failure it exits the process
//! non-zero, so the kernel closes the sockets and pods fall back to kube-proxy's path
//! instead of hanging on a wedged cache.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Set by a tokio task; the watchdog reads it.
#[derive(Default)]
pub struct Heartbeat {
    start: std::sync::OnceLock<Instant>,
    millis: AtomicU64,
}

impl Heartbeat {
    fn base(&self) -> Instant {
        *self.start.get_or_init(Instant::now)
    }
    pub fn beat(&self) {
        self.millis
            .store(self.base().elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    pub fn age(&self) -> Duration {
        let now = self.base().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.millis.load(Ordering::Relaxed)))
    }
}

/// A NOTIFY (opcode 4) for `.`: the fast path answers NOTIMP itself, so the probe exercises
/// the socket and receive thread without touching upstreams or the cache.
fn probe_message(id: u16) -> [u8; 17] {
    let mut m = [0u8; 17];
    m[..2].copy_from_slice(&id.to_be_bytes());
    m[2] = 4 << 3;
    m[5] = 1; // QDCOUNT
    // root name (0), type SOA (6), class IN (1)
    m[12..17].copy_from_slice(&[0, 0, 6, 0, 1]);
    m
}

/// True when `target` answers a probe within `wait`.
pub fn probe(target: SocketAddr, wait: Duration) -> bool {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()
    } else {
        "[::]:0".parse()
    }
    .unwrap_or(target);
    let Ok(s) = UdpSocket::bind(bind) else {
        return false;
    };
    if s.set_read_timeout(Some(wait)).is_err() || s.connect(target).is_err() {
        return false;
    }
    let id: u16 = rand::random();
    if s.send(&probe_message(id)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// `received` counts datagrams the UDP threads took off their sockets: while it moves, the
/// receive path is alive even if an overloaded socket drops our probes.
pub fn spawn(
    targets: Vec<SocketAddr>,
    timeout: Duration,
    heartbeat: Arc<Heartbeat>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut failing_since: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let before = received.load(Ordering::Relaxed);
            let probes_ok = targets.iter().all(|t| probe(*t, PROBE_INTERVAL));
            let serving = received.load(Ordering::Relaxed) > before;
            let ok = heartbeat.age() < timeout && (probes_ok || serving);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match (ok, failing_since) {
                (true, _) => failing_since = None,
                (false, None) => failing_since = Some(started),
                (false, Some(since)) if since.elapsed() >= timeout => {
                    tracing::error!(?targets, "watchdog: self-probe failing for {timeout:?}, exiting so pods fall back");
                    std::process::exit(3);
                }
                (false, Some(_)) => {}
            }
            std::thread::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed()));
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread");
    }
}
