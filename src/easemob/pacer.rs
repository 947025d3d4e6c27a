//! The client-side rate limiter: keeps one App Key's requests under Easemob's per-second limit.
//!
//! Easemob counts requests per App Key per second (100/s by default) and answers 429 `reach_limit`
//! beyond that. A token bucket with a burst equal to the full rate would be allowed to send 100
//! requests at the very end of one server second and 100 more at the start of the next, which a
//! server counting in one-second windows can see as more than 100 in a window. So the bucket
//! holds **one** request: requests leave evenly spaced, one every `1 s / rate`, and any
//! one-second window, aligned however the server likes, holds at most `rate` of them. The cost
//! is that the rate is never exceeded even briefly, which is what we want from a shared quota.
//!
//! Waiters queue on a fair (FIFO) mutex in front of the `governor` limiter. Without it, every
//! waiting task would wake at each release and race for the single slot (a thundering herd of
//! up to N wake-ups per slot), and the order in which calls leave would be arbitrary, so a call
//! could starve behind later ones.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Mutex;

/// Spaces requests evenly at a fixed rate, first come first served.
pub(crate) struct RequestPacer {
    queue: Mutex<()>,
    limiter: DefaultDirectRateLimiter,
}

impl RequestPacer {
    /// A pacer letting `per_second` requests through per second, one every `1 s / per_second`.
    pub(crate) fn new(per_second: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(NonZeroU32::MIN);
        Self {
            queue: Mutex::new(()),
            limiter: RateLimiter::direct(quota),
        }
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
    use std::time::{Duration, Instant};

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
        // 21 requests at 100/s: the first at once, the last no earlier than 200 ms later.
        assert!(times[0] < Duration::from_millis(50), "{times:?}");
        assert!(times[20] >= Duration::from_millis(195), "{times:?}");
        // No burst: at most the slots at 0, 10, ..., 90 ms (and 100 ms) fit in the first 100 ms.
        // (Measured times can only be later than the releases, never earlier.)
        let early = times
            .iter()
            .filter(|t| **t < Duration::from_millis(100))
            .count();
        assert!(early <= 11, "{times:?}");
    }
}
