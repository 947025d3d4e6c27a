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
//! After a 429 the pacer holds every call back for a while ([`RequestPacer::hold_for`]): the App
//! Key's budget is shared with the app's other servers and SDKs, so once Easemob refuses one call
//! the calls queued behind it would only use up their retries on more 429s.
//!
//! Waiters queue on a fair (FIFO) mutex in front of the `governor` limiter. Without it, every
//! waiting task would wake at each release and race for the single slot (a thundering herd of
//! up to N wake-ups per slot), and the order in which calls leave would be arbitrary, so a call
//! could starve behind later ones.
//!
//! Two lanes share that queue ([`Lane`]): the calls of a batch ([`Lane::Bulk`]) first queue among
//! themselves on a second fair mutex, so that only one of them at a time waits in the shared
//! queue. A call someone is waiting on ([`Lane::Interactive`]: a single trigger) therefore waits
//! behind at most one batch call and the interactive calls before it, not behind a whole batch
//! (1,000 pairs are 10 s at 100/s: past the request's deadline). Within each lane, calls take
//! their turns in the order they asked for them.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How much wider than `1 s / rate` the spacing between requests is (see the module docs).
pub(crate) const SAFETY_MARGIN: f64 = 0.02;

/// Which queue a call waits in for its turn (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Lane {
    /// A call a client is waiting on (a single trigger, a read): ahead of a batch's calls.
    #[default]
    Interactive,
    /// One of a batch's calls: behind interactive calls, first come first served among themselves.
    Bulk,
}

/// Spaces requests evenly at a fixed rate, first come first served within each [`Lane`].
pub(crate) struct RequestPacer {
    queue: Mutex<()>,
    /// Bulk calls wait here first, so that at most one of them is in `queue` at a time.
    bulk: Mutex<()>,
    limiter: DefaultDirectRateLimiter,
    /// No request leaves before this (set after a 429).
    held_until: std::sync::Mutex<Option<Instant>>,
}

impl RequestPacer {
    /// A pacer letting at most `per_second` requests through in any second, one every
    /// `(1 + SAFETY_MARGIN) s / per_second`.
    pub(crate) fn new(per_second: NonZeroU32) -> Self {
        let spacing = Duration::from_secs_f64((1.0 + SAFETY_MARGIN) / f64::from(per_second.get()));
        // `with_period` refuses only a zero period, which a rate of at most u32::MAX cannot give.
        let quota =
            Quota::with_period(spacing).unwrap_or_else(|| Quota::per_second(per_second)).allow_burst(NonZeroU32::MIN);
        Self {
            queue: Mutex::new(()),
            bulk: Mutex::new(()),
            limiter: RateLimiter::direct(quota),
            held_until: std::sync::Mutex::new(None),
        }
    }

    /// Waits until this caller may send one request.
    pub(crate) async fn wait_turn(&self, lane: Lane) {
        // Held until the turn is taken: the next bulk call then moves into the shared queue.
        let _bulk = match lane {
            Lane::Bulk => Some(self.bulk.lock().await),
            Lane::Interactive => None,
        };
        let _turn = self.queue.lock().await;
        // Re-read after each wait: another 429 may have moved the hold meanwhile.
        while let Some(until) = self.held_until().filter(|until| *until > Instant::now()) {
            tokio::time::sleep_until(until).await;
        }
        self.limiter.until_ready().await;
    }

    /// Holds every request back for `pause` from now (a later hold already set stays).
    pub(crate) fn hold_for(&self, pause: Duration) {
        let until = Instant::now() + pause;
        let mut held = self.held_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_none_or(|current| current < until) {
            *held = Some(until);
        }
    }

    fn held_until(&self) -> Option<Instant> {
        *self.held_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// These tests run on real time and assert lower bounds only (a loaded machine can only be later).
// Reading governor's clock from tokio's, to pause it in tests, was tried and not kept: the waits
// would then go through tokio's timer, which rounds each one up to a whole millisecond, and
// because a late request moves the next slot, requests at 100/s left 11 ms apart instead of
// 10.2 ms (7% of the quota lost). governor's own timer waits to the microsecond.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// `n` callers wait for their turn at once; when each got it, measured from `started`.
    async fn turns_taken(pacer: &Arc<RequestPacer>, n: usize, started: Instant) -> Vec<Duration> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let pacer = pacer.clone();
                tokio::spawn(async move {
                    pacer.wait_turn(Lane::Interactive).await;
                    started.elapsed()
                })
            })
            .collect();
        let mut times = Vec::with_capacity(n);
        for task in tasks {
            times.push(task.await.expect("task"));
        }
        times
    }

    #[tokio::test]
    async fn requests_leave_evenly_spaced() {
        let pacer = Arc::new(RequestPacer::new(NonZeroU32::new(100).expect("non-zero")));
        let mut times = turns_taken(&pacer, 21, Instant::now()).await;
        times.sort();
        // 21 requests at 100/s: the first at once (within a second: this runs beside the other
        // tests), the last no earlier than 200 ms later (204 ms with the margin).
        assert!(times[0] < Duration::from_secs(1), "{times:?}");
        assert!(times[20] >= Duration::from_millis(200), "{times:?}");
        // No burst: at most the slots at 0, 10.2, ..., 91.8 ms fit in the first 100 ms.
        // (Measured times can only be later than the releases, never earlier.)
        let early = times.iter().filter(|t| **t < Duration::from_millis(100)).count();
        assert!(early <= 10, "{times:?}");
    }

    /// After a 429 every caller waits out the hold, whoever got the 429; a shorter hold set
    /// later does not cut it short. (Lower bounds only: a loaded machine can only be later.)
    #[tokio::test]
    async fn a_hold_keeps_every_caller_back() {
        let pacer = Arc::new(RequestPacer::new(NonZeroU32::new(1_000).expect("non-zero")));
        let started = Instant::now();
        pacer.hold_for(Duration::from_millis(300));
        pacer.hold_for(Duration::from_millis(10));
        for waited in turns_taken(&pacer, 3, started).await {
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
        }
    }

    /// A call someone waits on overtakes a queued batch: it waits behind at most the one batch
    /// call already in the shared queue. Each lane keeps its order. (Order only, no timing: on
    /// one thread, the batch's calls are all queued before the interactive one is spawned.)
    #[tokio::test(flavor = "current_thread")]
    async fn an_interactive_call_overtakes_a_queued_batch() {
        let pacer = Arc::new(RequestPacer::new(NonZeroU32::new(50).expect("non-zero")));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (first_turn, mut first_taken) = tokio::sync::mpsc::unbounded_channel();
        let wait = |lane: Lane, name: String| {
            let (pacer, order, first_turn) = (pacer.clone(), order.clone(), first_turn.clone());
            tokio::spawn(async move {
                pacer.wait_turn(lane).await;
                order.lock().expect("lock").push(name);
                let _ = first_turn.send(());
            })
        };
        let mut tasks: Vec<_> = (0..8).map(|i| wait(Lane::Bulk, format!("bulk{i}"))).collect();
        first_taken.recv().await.expect("the first turn");
        tasks.push(wait(Lane::Interactive, "single".into()));
        for task in tasks {
            task.await.expect("task");
        }
        let order = order.lock().expect("lock").clone();
        let single = order.iter().position(|n| n == "single").expect("taken");
        assert!(single <= 2, "behind at most the bulk call taking its turn and the one queued: {order:?}");
        let bulk: Vec<&String> = order.iter().filter(|n| n.starts_with("bulk")).collect();
        let expected: Vec<String> = (0..8).map(|i| format!("bulk{i}")).collect();
        assert_eq!(bulk, expected.iter().collect::<Vec<_>>(), "the batch in order");
    }
}
