//! The watchdog: a plain thread that probes the daemon's own UDP listeners, checks that
//! every UDP receive thread keeps going round its loop and that the tokio runtime is alive;
//! after `timeout` of continuous failure it exits the process non-zero, so the kernel closes
//! the sockets and pods fall back to kube-proxy's path instead of hanging on a wedged cache.

use crate::udp::ThreadProgress;
use crate::wire;
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
    if s.send(&wire::notify_probe(id)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(n) if wire::message_id(&buf[..n]) == Some(id) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Progress of every UDP thread at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen(Vec<(u64, u64)>);

impl Seen {
    fn now(threads: &[Arc<ThreadProgress>]) -> Self {
        Seen(threads.iter().map(|t| t.snapshot()).collect())
    }
}

/// One round's verdict, from the threads' progress since the last round (≥ one probe
/// interval ago, several receive timeouts): every UDP thread must have gone round its loop,
/// including those of listeners the probe cannot reach, and the listeners must answer the
/// probe, or be serving others (an overloaded socket may drop the probe).
fn round_ok(before: &Seen, after: &Seen, probes_ok: bool, runtime_alive: bool) -> bool {
    let pairs = || before.0.iter().zip(&after.0);
    let all_looping = pairs().all(|(b, a)| a.0 > b.0);
    let serving = pairs().any(|(b, a)| a.1 > b.1);
    runtime_alive && all_looping && (probes_ok || serving)
}

pub fn spawn(
    targets: Vec<SocketAddr>,
    timeout: Duration,
    heartbeat: Arc<Heartbeat>,
    threads: Vec<Arc<ThreadProgress>>,
    stop: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut failing_since: Option<Instant> = None;
        let mut before = Seen::now(&threads);
        std::thread::sleep(PROBE_INTERVAL);
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let probes_ok = targets.iter().all(|t| probe(*t, PROBE_INTERVAL));
            let after = Seen::now(&threads);
            let ok = round_ok(&before, &after, probes_ok, heartbeat.age() < timeout);
            before = after;
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match (ok, failing_since) {
                (true, _) => failing_since = None,
                (false, None) => failing_since = Some(started),
                (false, Some(since)) if since.elapsed() >= timeout => {
                    tracing::error!(?targets, "watchdog: self-probe or a UDP thread failing for {timeout:?}, exiting so pods fall back");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(threads: &[(u64, u64)]) -> Seen {
        Seen(threads.to_vec())
    }

    #[test]
    fn a_round_passes_only_when_every_thread_looped_and_the_listeners_answer_or_serve() {
        let before = seen(&[(10, 100), (10, 0)]);
        let looped_idle = seen(&[(15, 100), (14, 0)]);
        assert!(round_ok(&before, &looped_idle, true, true));
        assert!(
            !round_ok(&before, &looped_idle, false, true),
            "probe lost, nothing served"
        );
        assert!(
            !round_ok(&before, &looped_idle, true, false),
            "runtime stuck"
        );
        let serving = seen(&[(15, 900), (14, 0)]);
        assert!(
            round_ok(&before, &serving, false, true),
            "probe lost under load"
        );
        // The second thread (a ClusterIP listener, say) is stuck: its probe cannot be sent
        // from the host, but its loop count shows it.
        let stuck = seen(&[(15, 900), (10, 0)]);
        assert!(!round_ok(&before, &stuck, true, true));
    }
}
