//! Pacing of background refreshes (prefetch, idle sweep, stale refresh).
//!
//! Entries fetched together reach their prefetch point together: a cohort of thousands of
//! names asks for thousands of upstream queries within a fraction of a second. Each costs
//! the daemon some 20–60 µs of CPU, so under a CPU limit such a burst exhausts the CFS quota
//! and every answer, cache hits included, waits for the next period (measured: p99 1–5 ms
//! instead of 0.15 ms at 20k q/s under a half-core limit; with 2000 a second, 0.155–0.159 in
//! three rounds; with 1000, too few for that mix, entries expired). Refreshes therefore wait in a
//! bounded queue and start at most `--prefetch-rate` per second. What cannot wait is dropped
//! and counted; such an entry expires and is fetched on demand, as without prefetch.

use std::time::{Duration, Instant};

/// Shortest wait between groups of refreshes once the saved-up burst is spent (half the
/// bucket's 10 ms burst, so the tokens saved meanwhile always fit in it).
const PACE_TICK: Duration = Duration::from_millis(5);

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Saves up at most 10 ms worth of tokens (at least one), so the largest burst the
    /// bucket lets through is what the rate allows in one CFS period of 10 ms.
    pub fn new(rate: u32, now: Instant) -> Self {
        let burst = (f64::from(rate) / 100.0).max(1.0);
        Self {
            rate: f64::from(rate.max(1)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token: how long to wait before using it (zero when one was saved up).
    /// Tokens taken early are owed, so callers that wait as told keep the average rate.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes one token like `take`, but a wait is never shorter than `PACE_TICK`: past the
    /// saved-up burst, the tokens saved while waiting let the next few through at once, so
    /// work starts in groups once per tick instead of one item per token. Each wait is a
    /// timer wake-up of the waiting thread; at 2000 a second that is 200 of them, not 2000.
    /// The average rate is unchanged (tokens are still owed and saved as in `take`).
    pub fn take_in_groups(&mut self, now: Instant) -> Duration {
        match self.take(now) {
            Duration::ZERO => Duration::ZERO,
            wait => wait.max(PACE_TICK),
        }
    }
}

/// Refreshes that may wait: one second of the rate (at least 64). A refresh that waited
/// longer would mostly find its entry expired already. Unpaced (rate 0) the queue only
/// hands refreshes to the runtime, so it is as deep as the UDP threads' job queue.
pub fn queue_len(rate: u32) -> usize {
    if rate == 0 {
        UNPACED_QUEUE
    } else {
        (rate as usize).max(64)
    }
}

const UNPACED_QUEUE: usize = 8192;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_bucket_lets_ten_milliseconds_worth_through_at_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        for i in 0..10 {
            assert_eq!(b.take(t0), Duration::ZERO, "token {i}");
        }
        assert_eq!(b.take(t0), ms(1), "the 11th waits for the next token");
    }

    #[test]
    fn waiting_as_told_keeps_the_average_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(500, t0);
        let mut now = t0;
        for _ in 0..1005 {
            now += b.take(now);
        }
        // 5 saved up, then 1000 at 500/s: two seconds.
        let took = now - t0;
        assert!(
            took >= Duration::from_millis(1999) && took <= Duration::from_millis(2001),
            "{took:?}"
        );
    }

    #[test]
    fn grouped_waits_keep_the_rate_with_a_tenth_of_the_wake_ups() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2000, t0);
        let (mut now, mut waits, mut group, mut largest) = (t0, 0, 0, 0);
        for _ in 0..2020 {
            let wait = b.take_in_groups(now);
            if !wait.is_zero() {
                assert!(wait >= PACE_TICK, "{wait:?}");
                waits += 1;
                largest = largest.max(group);
                group = 0;
            }
            now += wait;
            group += 1;
        }
        // 20 saved up, then 2000 at 2000/s: one second, in groups of 10 every 5 ms.
        let took = now - t0;
        assert!(took >= ms(999) && took <= ms(1006), "{took:?}");
        assert!((199..=201).contains(&waits), "{waits} wake-ups");
        assert!(largest <= 20, "no group beyond the 10 ms burst: {largest}");
    }

    #[test]
    fn slow_rates_wait_their_own_interval_not_the_tick() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        assert_eq!(b.take_in_groups(t0), Duration::ZERO);
        assert_eq!(b.take_in_groups(t0), ms(10));
    }

    #[test]
    fn an_idle_bucket_saves_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(200, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(later), Duration::ZERO);
        assert_eq!(b.take(later), Duration::ZERO, "burst is 2");
        assert_eq!(b.take(later), ms(5), "then one per 1/200 s");
    }

    #[test]
    fn slow_rates_still_let_one_through() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::from_secs(1));
    }

    #[test]
    fn the_queue_holds_one_second_of_the_rate() {
        assert_eq!(queue_len(5000), 5000);
        assert_eq!(queue_len(10), 64);
        assert_eq!(
            queue_len(0),
            UNPACED_QUEUE,
            "no limit: a deep hand-over queue"
        );
    }
}
