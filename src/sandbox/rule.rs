//! The callback rule's health, as Easemob keeps it: 90 failed deliveries within 30 s ban the rule,
//! for 5 minutes times the number of bans in the last 24 hours (at most 25 minutes), and a
//! callback due while the rule is banned is not sent at all.
//!
//! Pure and on the injected clock, so tests move time instead of waiting out a ban. This is why
//! a receiver must not answer non-200 lightly: a burst of 503s costs far more than the callbacks
//! it refused.

use std::collections::VecDeque;

/// Failed attempts within [`FAILURE_WINDOW_MS`] that ban the rule.
pub const FAILURES_TO_BAN: usize = 90;
/// The window those failures are counted in.
pub const FAILURE_WINDOW_MS: i64 = 30_000;
/// A ban lasts this long times the number of bans in the last day, counted up to [`MAX_BAN_STEPS`].
pub const BAN_STEP_MS: i64 = 5 * 60_000;
/// At most this many steps: the fifth and every later ban of a day last 25 minutes.
pub const MAX_BAN_STEPS: usize = 5;
const DAY_MS: i64 = 24 * 3_600_000;

/// Failure times and bans of one callback rule.
#[derive(Debug, Default)]
pub struct RuleHealth {
    /// Times of the failed attempts of the last [`FAILURE_WINDOW_MS`].
    failures: VecDeque<i64>,
    /// Start times of the bans of the last day.
    bans: VecDeque<i64>,
    /// The current ban's end, if the rule is banned.
    banned_until_ms: Option<i64>,
}

impl RuleHealth {
    /// Whether a callback may be sent at `now_ms` (the rule is not banned).
    pub fn may_send(&self, now_ms: i64) -> bool {
        self.banned_until_ms.is_none_or(|until| now_ms >= until)
    }

    /// Counts a failed attempt; returns the ban's length when this failure bans the rule.
    pub fn failed(&mut self, now_ms: i64) -> Option<i64> {
        if !self.may_send(now_ms) {
            return None;
        }
        while self.failures.front().is_some_and(|&t| t <= now_ms - FAILURE_WINDOW_MS) {
            self.failures.pop_front();
        }
        self.failures.push_back(now_ms);
        if self.failures.len() < FAILURES_TO_BAN {
            return None;
        }
        self.failures.clear();
        while self.bans.front().is_some_and(|&t| t <= now_ms - DAY_MS) {
            self.bans.pop_front();
        }
        self.bans.push_back(now_ms);
        let length = BAN_STEP_MS * self.bans.len().min(MAX_BAN_STEPS) as i64;
        self.banned_until_ms = Some(now_ms + length);
        Some(length)
    }

    /// When the current ban ends, if the rule is banned at `now_ms`.
    pub fn banned_until(&self, now_ms: i64) -> Option<i64> {
        self.banned_until_ms.filter(|&until| now_ms < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ninety_failures_within_thirty_seconds_ban_the_rule_for_five_minutes() {
        let mut rule = RuleHealth::default();
        for i in 0..89 {
            assert_eq!(rule.failed(i * 300), None, "failure {}", i + 1);
        }
        assert!(rule.may_send(26_700));
        assert_eq!(rule.failed(29_000), Some(BAN_STEP_MS));
        assert!(!rule.may_send(29_000));
        assert!(!rule.may_send(29_000 + BAN_STEP_MS - 1));
        assert!(rule.may_send(29_000 + BAN_STEP_MS));
        assert_eq!(rule.banned_until(29_000), Some(29_000 + BAN_STEP_MS));
    }

    #[test]
    fn failures_older_than_thirty_seconds_do_not_count() {
        let mut rule = RuleHealth::default();
        for i in 0..200 {
            assert_eq!(rule.failed(i * 400), None, "75 a window at most: failure {}", i + 1);
        }
    }

    #[test]
    fn bans_of_the_same_day_last_longer_up_to_twenty_five_minutes() {
        let mut rule = RuleHealth::default();
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..6 {
            let length = (0..FAILURES_TO_BAN).find_map(|_| rule.failed(now)).expect("banned");
            lengths.push(length / 60_000);
            now += length;
        }
        assert_eq!(lengths, [5, 10, 15, 20, 25, 25]);
        // A day later the earlier bans no longer count: the next one is the first again.
        now += DAY_MS;
        let length = (0..FAILURES_TO_BAN).find_map(|_| rule.failed(now)).expect("banned");
        assert_eq!(length, BAN_STEP_MS);
    }

    #[test]
    fn failures_while_banned_are_not_counted() {
        let mut rule = RuleHealth::default();
        (0..FAILURES_TO_BAN).for_each(|_| _ = rule.failed(0));
        assert_eq!(rule.failed(1_000), None);
        assert!(rule.may_send(BAN_STEP_MS));
        // The ban cleared the count: it starts again from zero.
        assert_eq!((0..FAILURES_TO_BAN - 1).find_map(|_| rule.failed(BAN_STEP_MS)), None);
    }
}
