//! How long to wait before retrying after a 429, a 5xx or a transport error.
//!
//! Exponential backoff with *equal jitter*: the n-th retry (n = 0 for the first) waits a random
//! time in `[cap/2, cap]`, where `cap = min(max_backoff, base_backoff * 2^n)`. Equal rather than
//! full jitter because a 429 means "this one-second window is full": full jitter can draw a
//! near-zero wait and retry straight into the same window, while equal jitter always waits at
//! least half the cap yet still spreads retries out so that clients do not retry in lockstep.
//!
//! The random source is a seeded [`StdRng`] (`ClientConfig::jitter_seed`), so a test can fix the
//! schedule. This module does not sleep; the caller does.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

/// The exponential part of the schedule, before jitter: `min(max, base * 2^retry)`.
pub(crate) fn backoff_cap(retry: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.checked_pow(retry).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// The wait before retry number `retry` (0-based): uniformly random in `[cap/2, cap]`.
pub(crate) fn backoff_delay(retry: u32, base: Duration, max: Duration, rng: &mut StdRng) -> Duration {
    let cap = backoff_cap(retry, base, max);
    let half = cap / 2;
    // Nanosecond resolution; a cap beyond u64 nanoseconds (584 years) is not a real setting.
    let spread = u64::try_from((cap - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rng.random_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const BASE: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn cap_doubles_from_the_base_and_stops_at_the_maximum() {
        let caps: Vec<u64> = (0..8).map(|n| backoff_cap(n, BASE, MAX).as_millis() as u64).collect();
        assert_eq!(caps, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn cap_does_not_overflow_for_many_retries() {
        assert_eq!(backoff_cap(40, BASE, MAX), MAX);
        assert_eq!(backoff_cap(u32::MAX, BASE, MAX), MAX);
        assert_eq!(backoff_cap(70, Duration::from_secs(u64::MAX / 2), Duration::MAX), Duration::MAX);
    }

    #[test]
    fn each_delay_lies_between_half_the_cap_and_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..10 {
            for _ in 0..100 {
                let cap = backoff_cap(retry, BASE, MAX);
                let delay = backoff_delay(retry, BASE, MAX, &mut rng);
                assert!(delay >= cap / 2 && delay <= cap, "{retry}: {delay:?}");
            }
        }
    }

    #[test]
    fn a_fixed_seed_gives_a_fixed_schedule() {
        let schedule = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..6).map(|n| backoff_delay(n, BASE, MAX, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(schedule(42), schedule(42));
        assert_ne!(schedule(42), schedule(43));
    }

    #[test]
    fn zero_base_means_no_wait() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(backoff_delay(3, Duration::ZERO, MAX, &mut rng), Duration::ZERO);
    }
}
