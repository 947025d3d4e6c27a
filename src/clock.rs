//! Wall-clock time as an injectable dependency.
//!
//! Everything whose behaviour depends on "now" (token expiry, signature tolerance, reconciliation
//! windows, the sandbox's token TTL) takes a [`SharedClock`] instead of calling the system clock, so
//! tests move time forward explicitly instead of sleeping. [`Reused`] serves a result again for
//! a while by that clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in Unix epoch milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The real system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock frozen at `start_ms`.
    pub fn new(start_ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(start_ms)))
    }

    /// Moves the clock forward (or backward, with a negative value) by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to an absolute time.
    pub fn set_ms(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// The last successful result of an expensive check, served again for a while.
///
/// For results that are costly to produce and asked for often (`/readyz`'s write probe, the
/// reconciliation behind `/metrics`): a success at time `t` answers every request until
/// `t + reuse_ms`; a failure is never reused, so the next request tries again. The lock is held
/// while producing, so requests that arrive meanwhile wait and share the result. Times come from
/// the caller's [`Clock`], so tests cross the reuse period by moving the clock; a clock that went
/// back produces anew.
#[derive(Debug)]
pub struct Reused<T> {
    reuse_ms: i64,
    last: tokio::sync::Mutex<Option<(i64, T)>>,
}

impl<T: Clone> Reused<T> {
    /// Successes stand for `reuse_ms`.
    pub fn new(reuse_ms: i64) -> Self {
        Self { reuse_ms, last: tokio::sync::Mutex::new(None) }
    }

    /// The result as of `now_ms`: the last success if it is younger than `reuse_ms`, else what
    /// `produce` gives now (kept if it is a success).
    pub async fn get<E, F>(&self, now_ms: i64, produce: impl FnOnce() -> F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, value)) = &*last
            && (0..self.reuse_ms).contains(&(now_ms - at))
        {
            return Ok(value.clone());
        }
        *last = None;
        let value = produce().await?;
        *last = Some((now_ms, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod reused_tests {
    use super::Reused;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_success_stands_for_its_period_and_a_failure_never() {
        let reused = Reused::<u32>::new(1_000);
        let runs = AtomicU32::new(0);
        let produce = |ok: bool| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move { if ok { Ok(n) } else { Err(n) } }
        };
        assert_eq!(reused.get(5_000, || produce(true)).await, Ok(1));
        assert_eq!(reused.get(5_999, || produce(true)).await, Ok(1), "reused within the period");
        assert_eq!(reused.get(6_000, || produce(false)).await, Err(2), "produced again once it has passed");
        assert_eq!(reused.get(6_001, || produce(true)).await, Ok(3), "a failure is not reused");
        assert_eq!(reused.get(4_000, || produce(true)).await, Ok(4), "a clock that went back produces anew");
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }
}
