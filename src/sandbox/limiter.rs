//! The App Key's request budget: a fixed one-second window on the injected clock.
//!
//! A fixed window (not governor) because it runs on [`crate::clock::SharedClock`]: with a
//! `ManualClock` every request falls in the same window, so tests see exactly `limit` successes
//! and no timing flakiness. The price is that a burst straddling a second boundary can get up to
//! twice the limit through, which Easemob's own limiter may also allow; clients must not rely on it.

/// Counts requests in the current whole second.
#[derive(Debug, Default)]
pub struct FixedWindow {
    /// Which second (ms / 1000) the count belongs to.
    second: i64,
    used: u32,
}

impl FixedWindow {
    /// Takes one request from the budget of `limit` per second; `false` means answer 429.
    /// A limit of 0 means unlimited.
    pub fn try_acquire(&mut self, now_ms: i64, limit: u32) -> bool {
        if limit == 0 {
            return true;
        }
        let second = now_ms.div_euclid(1000);
        if second != self.second {
            self.second = second;
            self.used = 0;
        }
        if self.used < limit {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_exactly_the_limit_within_one_second() {
        let mut window = FixedWindow::default();
        let granted = (0..20).filter(|i| window.try_acquire(5_000 + i * 10, 5)).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn a_new_second_restores_the_budget() {
        let mut window = FixedWindow::default();
        assert!(window.try_acquire(1_999, 1));
        assert!(!window.try_acquire(1_999, 1));
        assert!(window.try_acquire(2_000, 1));
    }

    #[test]
    fn zero_means_unlimited() {
        let mut window = FixedWindow::default();
        assert!((0..1000).all(|_| window.try_acquire(0, 0)));
    }
}
