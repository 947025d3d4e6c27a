//! The client-side rate limiter: keeps one App Key's requests under Easemob's per-second limit.
//!
//! Easemob counts requests per App Key per second (100/s by default) and answers 429 `reach_limit`
//! beyond that. A token bucket with a burst equal to the full rate would be allowed to send 100
//! requests at the very end of one server second and 100 more at the start of the next, which a
//! server counting in one-second windows can see as more than 100 in a window. So the bucket
//! holds **one** request: requests leave evenly spaced, and any one-second window, aligned however
//! the server likes, holds at most `rate` of them. The cost is that the rate is never exceeded
//! even briefly, which is what we want from a shared quota.
//!
//! The spacing is [`SAFETY_MARGIN`] wider than `1 s / rate`. Evenly spaced at exactly `1 s / rate`,
//! requests would still *arrive* unevenly: one delayed by a millisecond of scheduling or network
//! jitter can slip into the next server window just as that window's hundredth request arrives,
//! making 101. With 2 % extra spacing, 100 requests span about 1.01 s, so a window can hold 100
//! only if arrival jitter exceeds ~10 ms; the throughput given up is 2 %.
//!
//! Waiters queue on a fair (FIFO) mutex in front of the `governor` limiter. Without it, every
//! waiting task would wake at each release and race for the single slot (a thundering herd of
//! up to N wake-ups per slot), and the order in which calls leave would be arbitrary, so a call
//! could starve behind later ones.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Mutex;

/// How much wider than `1 s / rate` the spacing between requests is (see the module docs).
pub(crate) const SAFETY_MARGIN: f64 = 0.02;

/// Spaces requests evenly at a fixed rate, first come first served.
pub(crate) struct RequestPacer {
    queue: Mutex<()>,
    limiter: DefaultDirectRateLimiter,
}

impl RequestPacer {
    /// A pacer letting at most `per_second` requests through in any second, one every
    /// `(1 + SAFETY_MARGIN) s / per_second`.
    pub(crate) fn new(per_second: NonZeroU32) -> Self {
        let spacing = Duration::from_secs_f64((1.0 + SAFETY_MARGIN) / f64::from(per_second.get()));
        // `with_period` refuses only a zero period, which a rate of at most u32::MAX cannot give.
        let quota =
            Quota::with_period(spacing).unwrap_or_else(|| Quota::per_second(per_second)).allow_burst(NonZeroU32::MIN);
        Self { queue: Mutex::new(()), limiter: RateLimiter::direct(quota) }
    }

    /// Waits until this caller may send one request.
    pub(crate) async fn wait_turn(&self) {
        let _turn = self.queue.lock().await;
        self.limiter.until_ready().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[tokio::test]
    async fn requests_leave_evenly_spaced() {
        let pacer = Arc::new(RequestPacer::new(NonZeroU32::new(100).expect("non-zero")));
        let started = Instant::now();
        let tasks: Vec<_> = (0..21)
            .map(|_| {
                let pacer = pacer.clone();
                tokio::spawn(async move {
                    pacer.wait_turn().await;
                    started.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.expect("task"));
        }
        times.sort();
        // 21 requests at 100/s: the first at once, the last no earlier than 200 ms later
        // (204 ms with the margin).
        assert!(times[0] < Duration::from_millis(50), "{times:?}");
        assert!(times[20] >= Duration::from_millis(200), "{times:?}");
        // No burst: at most the slots at 0, 10.2, ..., 91.8 ms fit in the first 100 ms.
        // (Measured times can only be later than the releases, never earlier.)
        let early = times.iter().filter(|t| **t < Duration::from_millis(100)).count();
        assert!(early <= 10, "{times:?}");
    }
}
