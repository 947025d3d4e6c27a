//! The app-token cache: when to reuse, refresh or fetch the token, and single flight.
//!
//! The rules, all judged by the injected clock:
//! - A token is *fresh* for the first half of its life (`expires_in` counted from the moment the
//!   request was sent), *stale* for the second half, *expired* after. Fresh tokens are used as
//!   they are; a stale one triggers a refresh, like the official SDKs, which cache for half the
//!   lifetime, so a token is never used near its end (Easemob warns that a token can stop working
//!   slightly before `expires_in` runs out).
//! - Fetches are single flight: one caller fetches while the others that need a token wait for
//!   it and reuse it. A caller that still has a valid (stale) token does not wait for a refresh
//!   someone else is running: it uses the stale token, so the refresh at half-life holds up no
//!   call but the one that runs it.
//! - A failed fetch (after the client's own retries of a 429, 5xx or lost answer) is remembered
//!   for [`FAILURE_COOLDOWN_MS`]; meanwhile calls fail fast with the
//!   same error instead of hammering the token endpoint (Easemob warns that requesting tokens
//!   too often can get an account banned; the Java SDK caches errors for 10 s). A stale token
//!   that is still valid keeps being used while a refresh is failing.
//! - [`TokenCache::invalidate`] drops the token a 401 was answered to, and only that one: when
//!   50 calls get a 401 for the same token, the first invalidates it and the others find the
//!   replacement.
//!
//! The HTTP request itself is the caller's (see `client.rs`); this module only decides.

use std::future::Future;

use tokio::sync::Mutex;

use crate::clock::SharedClock;
use crate::secret::Secret;

/// How long a failed token fetch is remembered before the endpoint is asked again.
pub(crate) const FAILURE_COOLDOWN_MS: i64 = 5_000;

/// A cached app token.
#[derive(Clone, Debug)]
pub(crate) struct AppToken {
    /// The bearer token; `Secret` so that no `Debug` of the client can print it.
    pub(crate) value: Secret,
    /// When the token request was sent (clock milliseconds).
    pub(crate) issued_at_ms: i64,
    /// When Easemob says it expires; `None` when it does not (`expires_in` of 0).
    pub(crate) expires_at_ms: Option<i64>,
    /// Tells tokens apart, so that a 401 invalidates only the token it was answered to.
    pub(crate) generation: u64,
}

/// Where a token is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// First half of its life: use it.
    Fresh,
    /// Second half: refresh, but it may still be used if the refresh fails.
    Stale,
    /// Past `expires_in`: unusable.
    Expired,
}

/// Judges a token at `now_ms`.
pub(crate) fn freshness(token: &AppToken, now_ms: i64) -> Freshness {
    let Some(expires_at_ms) = token.expires_at_ms else {
        return Freshness::Fresh;
    };
    let half_life_at_ms = token.issued_at_ms + (expires_at_ms - token.issued_at_ms) / 2;
    if now_ms >= expires_at_ms {
        Freshness::Expired
    } else if now_ms >= half_life_at_ms {
        Freshness::Stale
    } else {
        Freshness::Fresh
    }
}

/// What the token endpoint granted.
#[derive(Debug)]
pub(crate) struct FetchedToken {
    pub(crate) access_token: Secret,
    /// Lifetime in seconds; 0 or less means "does not expire".
    pub(crate) expires_in_secs: i64,
}

/// Why no token could be had; becomes `ApiFailure::NoToken { reason: "token: ...", .. }`.
#[derive(Clone, Debug)]
pub(crate) struct TokenFailure {
    /// The token endpoint's status, if it answered (its error type is in `reason`).
    pub(crate) status: Option<u16>,
    /// What went wrong and what to fix, without the `token: ` prefix.
    pub(crate) reason: String,
}

#[derive(Default)]
struct TokenState {
    token: Option<AppToken>,
    /// The last failed fetch and when the endpoint may be asked again.
    failure: Option<(TokenFailure, i64)>,
    last_generation: u64,
}

/// What [`TokenCache::get`] should do with the state as it is.
enum Judged {
    /// A fresh token, or a stale one while a failed refresh cools down.
    Use(AppToken),
    /// No usable token, and the last fetch failed less than the cooldown ago.
    Fail(TokenFailure),
    /// Fetch; the stale token is what can be used meanwhile (`None`: none or expired).
    Refresh(Option<AppToken>),
}

impl TokenState {
    fn judge(&self, now_ms: i64) -> Judged {
        let usable_while_refreshing = match self.token.as_ref().map(|token| (token, freshness(token, now_ms))) {
            Some((token, Freshness::Fresh)) => return Judged::Use(token.clone()),
            Some((token, Freshness::Stale)) => Some(token.clone()),
            Some((_, Freshness::Expired)) | None => None,
        };
        match (&self.failure, usable_while_refreshing) {
            (Some((_, retry_at_ms)), Some(stale)) if now_ms < *retry_at_ms => Judged::Use(stale),
            (Some((failure, retry_at_ms)), None) if now_ms < *retry_at_ms => Judged::Fail(failure.clone()),
            (_, stale) => Judged::Refresh(stale),
        }
    }
}

/// The cache; one per client, shared by its clones.
pub(crate) struct TokenCache {
    clock: SharedClock,
    /// Never held across a fetch, so a look at the cached token never waits for the network.
    state: Mutex<TokenState>,
    /// Held by the one caller fetching (single flight).
    fetching: Mutex<()>,
}

impl TokenCache {
    pub(crate) fn new(clock: SharedClock) -> Self {
        Self { clock, state: Mutex::new(TokenState::default()), fetching: Mutex::new(()) }
    }

    /// A usable token: the cached one if fresh, otherwise the result of `fetch` (run by at most
    /// one caller at a time; the others wait and reuse its result). A caller whose cached token
    /// is stale but still valid does not wait for a refresh another caller is running: it uses
    /// the stale token.
    pub(crate) async fn get<F, Fut>(&self, fetch: F) -> Result<AppToken, TokenFailure>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<FetchedToken, TokenFailure>>,
    {
        let stale = match self.state.lock().await.judge(self.clock.now_ms()) {
            Judged::Use(token) => return Ok(token),
            Judged::Fail(failure) => return Err(failure),
            Judged::Refresh(stale) => stale,
        };
        let _flight = match &stale {
            Some(token) => match self.fetching.try_lock() {
                Ok(flight) => flight,
                Err(_) => return Ok(token.clone()),
            },
            None => self.fetching.lock().await,
        };
        // The fetch this caller may have waited for could have settled it.
        let now_ms = self.clock.now_ms();
        let usable_while_refreshing = match self.state.lock().await.judge(now_ms) {
            Judged::Use(token) => return Ok(token),
            Judged::Fail(failure) => return Err(failure),
            Judged::Refresh(stale) => stale,
        };

        let fetched = fetch().await;
        // A fetch can take its whole retry budget (tens of seconds against a hanging endpoint):
        // its failure cools down from when it ended, or the callers queued behind it would find
        // the cooldown over and each run a fetch of its own, one after the other.
        let done_ms = self.clock.now_ms();
        let mut state = self.state.lock().await;
        match fetched {
            Ok(fetched) => {
                state.last_generation += 1;
                let token = AppToken {
                    value: fetched.access_token,
                    // The request time, not the answer time: errs towards refreshing early.
                    issued_at_ms: now_ms,
                    expires_at_ms: (fetched.expires_in_secs > 0)
                        .then(|| now_ms.saturating_add(fetched.expires_in_secs.saturating_mul(1000))),
                    generation: state.last_generation,
                };
                state.token = Some(token.clone());
                state.failure = None;
                Ok(token)
            }
            Err(failure) => {
                state.failure = Some((failure.clone(), done_ms + FAILURE_COOLDOWN_MS));
                // The stale token may have expired while the fetch ran: sent, it would only be
                // answered 401 and the call recorded as rejected for a token endpoint's outage.
                match usable_while_refreshing.filter(|stale| freshness(stale, done_ms) != Freshness::Expired) {
                    Some(stale) => {
                        tracing::warn!(
                            reason = %failure.reason,
                            "refreshing the Easemob app token failed; using the current token until it expires"
                        );
                        Ok(stale)
                    }
                    None => {
                        state.token = None;
                        Err(failure)
                    }
                }
            }
        }
    }

    /// Forgets the token with this generation (Easemob answered 401 to it); a newer token, fetched
    /// meanwhile by another call, is kept.
    pub(crate) async fn invalidate(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|token| token.generation == generation) {
            state.token = None;
        }
    }

    /// Whether a token newer than this generation has been fetched since.
    pub(crate) async fn renewed_since(&self, generation: u64) -> bool {
        self.state.lock().await.last_generation > generation
    }

    /// The cached token if it can be used now without fetching (fresh, or stale but still
    /// valid); `None` when it would have to be fetched.
    pub(crate) async fn cached(&self) -> Option<AppToken> {
        let now_ms = self.clock.now_ms();
        let state = self.state.lock().await;
        state.token.as_ref().filter(|token| freshness(token, now_ms) != Freshness::Expired).cloned()
    }
}

/// What the cache holds, for `/readyz`: read without asking Easemob anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenHealth {
    /// No token asked for yet.
    NotFetched,
    /// A token that can be used now; `expires_in_ms` is `None` for one that does not expire.
    /// `refresh_failing`: the last refresh failed (the token is used until it expires).
    Valid { expires_in_ms: Option<i64>, refresh_failing: Option<String> },
    /// No usable token, and the last fetch failed: triggers are answered 503
    /// `easemob_token_unavailable` until one succeeds.
    Failing { reason: String },
    /// The token expired or was refused (401), and none has been asked for since: the next
    /// trigger fetches one.
    Dropped,
}

impl TokenHealth {
    /// Every [`TokenHealth::state`], for a metric that exports each of them.
    pub const STATES: [&'static str; 5] = ["not_fetched", "valid", "refresh_failing", "failing", "dropped"];

    /// Its name as the `friendhook_easemob_app_token` metric labels it: a valid token whose
    /// refresh failed is `refresh_failing` (it works until it expires, which is when triggers
    /// start failing, so that is the state to alert on early).
    pub fn state(&self) -> &'static str {
        match self {
            TokenHealth::NotFetched => "not_fetched",
            TokenHealth::Valid { refresh_failing: None, .. } => "valid",
            TokenHealth::Valid { refresh_failing: Some(_), .. } => "refresh_failing",
            TokenHealth::Failing { .. } => "failing",
            TokenHealth::Dropped => "dropped",
        }
    }
}

impl TokenCache {
    /// What the cache holds now.
    pub(crate) async fn health(&self) -> TokenHealth {
        let now_ms = self.clock.now_ms();
        let state = self.state.lock().await;
        let failure = state.failure.as_ref().map(|(failure, _)| failure.reason.clone());
        match (state.token.as_ref().filter(|token| freshness(token, now_ms) != Freshness::Expired), failure) {
            (Some(token), refresh_failing) => {
                TokenHealth::Valid { expires_in_ms: token.expires_at_ms.map(|at| at - now_ms), refresh_failing }
            }
            (None, Some(reason)) => TokenHealth::Failing { reason },
            (None, None) if state.last_generation == 0 => TokenHealth::NotFetched,
            (None, None) => TokenHealth::Dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const START_MS: i64 = 1_700_000_000_000;

    fn token(issued_at_ms: i64, expires_at_ms: Option<i64>) -> AppToken {
        AppToken { value: Secret::new("t"), issued_at_ms, expires_at_ms, generation: 1 }
    }

    async fn granted(value: &str, expires_in_secs: i64) -> Result<FetchedToken, TokenFailure> {
        Ok(FetchedToken { access_token: Secret::new(value), expires_in_secs })
    }

    async fn refused() -> Result<FetchedToken, TokenFailure> {
        Err(TokenFailure { status: Some(503), reason: "token endpoint answered 503".into() })
    }

    #[test]
    fn token_is_fresh_for_the_first_half_of_its_life() {
        let t = token(0, Some(1_000));
        assert_eq!(freshness(&t, 0), Freshness::Fresh);
        assert_eq!(freshness(&t, 499), Freshness::Fresh);
        assert_eq!(freshness(&t, 500), Freshness::Stale);
        assert_eq!(freshness(&t, 999), Freshness::Stale);
        assert_eq!(freshness(&t, 1_000), Freshness::Expired);
        assert_eq!(freshness(&t, i64::MAX), Freshness::Expired);
    }

    #[test]
    fn token_without_expiry_stays_fresh() {
        assert_eq!(freshness(&token(0, None), i64::MAX), Freshness::Fresh);
    }

    #[tokio::test]
    async fn cached_token_is_reused_until_half_life_then_refreshed() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());

        let first = cache.get(|| granted("one", 100)).await.expect("token");
        assert_eq!(first.value.expose(), "one");
        assert_eq!(first.expires_at_ms, Some(START_MS + 100_000));

        clock.advance_ms(49_999);
        let reused = cache.get(|| async { panic!("a fresh token must not be refetched") }).await.expect("token");
        assert_eq!(reused.value.expose(), "one");

        clock.advance_ms(1);
        let refreshed = cache.get(|| granted("two", 100)).await.expect("token");
        assert_eq!(refreshed.value.expose(), "two");
        assert!(refreshed.generation > first.generation);
    }

    #[tokio::test]
    async fn health_tells_a_working_token_from_a_failing_fetch_without_fetching() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        assert_eq!(cache.health().await, TokenHealth::NotFetched);
        cache.get(refused).await.expect_err("refused");
        let failing = TokenHealth::Failing { reason: "token endpoint answered 503".into() };
        assert_eq!(cache.health().await, failing);
        clock.advance_ms(FAILURE_COOLDOWN_MS * 10);
        assert_eq!(cache.health().await, failing, "still failing until a fetch succeeds, cooldown or not");

        let first = cache.get(|| granted("one", 100)).await.expect("token");
        assert_eq!(cache.health().await, TokenHealth::Valid { expires_in_ms: Some(100_000), refresh_failing: None });
        // Past half-life the refresh fails: the old token is still used, and the failure shown.
        clock.advance_ms(60_000);
        cache.get(refused).await.expect("the stale token");
        assert_eq!(
            cache.health().await,
            TokenHealth::Valid {
                expires_in_ms: Some(40_000),
                refresh_failing: Some("token endpoint answered 503".into())
            }
        );
        clock.advance_ms(40_000);
        assert_eq!(cache.health().await, failing, "expired, with the refresh still failing");

        cache.get(|| granted("two", 0)).await.expect("token");
        assert_eq!(cache.health().await, TokenHealth::Valid { expires_in_ms: None, refresh_failing: None });
        let current = cache.cached().await.expect("cached");
        assert!(current.generation > first.generation);
        cache.invalidate(current.generation).await;
        assert_eq!(cache.health().await, TokenHealth::Dropped, "refused with 401: the next call fetches");
    }

    #[tokio::test]
    async fn expired_token_is_replaced() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        cache.get(|| granted("one", 10)).await.expect("token");
        clock.advance_ms(10_000);
        let next = cache.get(|| granted("two", 10)).await.expect("token");
        assert_eq!(next.value.expose(), "two");
    }

    #[tokio::test]
    async fn failed_fetch_is_cached_for_the_cooldown() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        let fetches = AtomicU32::new(0);

        for _ in 0..3 {
            let failure = cache
                .get(|| async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    refused().await
                })
                .await
                .expect_err("no token");
            assert_eq!(failure.status, Some(503));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        clock.advance_ms(FAILURE_COOLDOWN_MS);
        let token = cache.get(|| granted("one", 100)).await.expect("token");
        assert_eq!(token.value.expose(), "one");
    }

    /// A fetch that fails after a long wait (a hanging token endpoint, retried) cools down from
    /// when it failed: the callers queued behind it get its failure instead of each asking
    /// again; and a stale token that expired meanwhile is not handed out.
    #[tokio::test]
    async fn a_slow_failed_fetch_cools_down_from_when_it_ended() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        cache.get(|| granted("one", 100)).await.expect("token");
        clock.advance_ms(95_000);
        let slow_refusal = || async {
            clock.advance_ms(FAILURE_COOLDOWN_MS + 1_000);
            refused().await
        };
        let failure = cache.get(slow_refusal).await.expect_err("the token expired while its refresh ran");
        assert_eq!(failure.status, Some(503));
        let again = cache.get(|| async { panic!("the cooldown runs from the failure") }).await;
        assert_eq!(again.expect_err("still cooling down").status, Some(503));
        clock.advance_ms(FAILURE_COOLDOWN_MS);
        assert_eq!(cache.get(|| granted("two", 100)).await.expect("token").value.expose(), "two");
    }

    #[tokio::test]
    async fn stale_token_is_used_while_its_refresh_fails() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        cache.get(|| granted("one", 100)).await.expect("token");

        clock.advance_ms(60_000);
        let still = cache.get(refused).await.expect("stale token");
        assert_eq!(still.value.expose(), "one");
        // Within the cooldown the stale token is served without asking again.
        let again = cache.get(|| async { panic!("cooldown must prevent a fetch") }).await.expect("stale token");
        assert_eq!(again.value.expose(), "one");

        clock.advance_ms(40_000);
        cache.get(refused).await.expect_err("expired and no refresh");
    }

    /// The refresh at half-life holds up only the caller running it: the others go on with the
    /// stale token, which is still valid, instead of waiting for the token endpoint.
    #[tokio::test]
    async fn callers_with_a_stale_token_do_not_wait_for_a_refresh_in_progress() {
        let clock = ManualClock::new(START_MS);
        let cache = Arc::new(TokenCache::new(clock.clone()));
        cache.get(|| granted("one", 100)).await.expect("token");
        clock.advance_ms(60_000);

        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let refresher = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get(|| async move {
                        let _ = started_tx.send(());
                        let _ = finish_rx.await;
                        granted("two", 100).await
                    })
                    .await
            }
        });
        started.await.expect("the refresh started");

        let meanwhile = cache.get(|| async { panic!("a refresh is already running") });
        let meanwhile = tokio::time::timeout(std::time::Duration::from_secs(10), meanwhile)
            .await
            .expect("not held up by the refresh")
            .expect("token");
        assert_eq!(meanwhile.value.expose(), "one", "the stale token, at once");

        finish.send(()).expect("refresher waiting");
        assert_eq!(refresher.await.expect("task").expect("token").value.expose(), "two");
        let after = cache.get(|| async { panic!("the new token is fresh") }).await.expect("token");
        assert_eq!(after.value.expose(), "two");
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_token_it_names() {
        let clock = ManualClock::new(START_MS);
        let cache = TokenCache::new(clock.clone());
        let first = cache.get(|| granted("one", 100)).await.expect("token");

        assert!(!cache.renewed_since(first.generation).await, "no newer token yet");
        cache.invalidate(first.generation).await;
        assert!(cache.cached().await.is_none(), "gone: it has to be fetched");
        let second = cache.get(|| granted("two", 100)).await.expect("token");
        assert_eq!(second.value.expose(), "two");
        assert!(cache.renewed_since(first.generation).await, "the second is newer");

        // A late 401 for the first token must not throw away the second.
        cache.invalidate(first.generation).await;
        assert_eq!(cache.cached().await.map(|t| t.generation), Some(second.generation));
        let kept = cache.get(|| async { panic!("second token is still valid") }).await.expect("token");
        assert_eq!(kept.generation, second.generation);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let clock = ManualClock::new(START_MS);
        let cache = Arc::new(TokenCache::new(clock));
        let fetches = Arc::new(AtomicU32::new(0));

        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                let fetches = fetches.clone();
                tokio::spawn(async move {
                    cache
                        .get(|| async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            granted("one", 100).await
                        })
                        .await
                        .expect("token")
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task").value.expose(), "one");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
