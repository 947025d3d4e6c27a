//! The sandbox's in-memory world: users and friendships, issued tokens, the request budget, the
//! injected-fault queue, the seeded RNGs and the callback log, behind one mutex.
//!
//! The mutex is a `std` one and is never held across an `.await`: every operation takes it,
//! changes the world, plans its callbacks and lets go before anything is sent. Holding it while
//! planning is what makes fault draws follow request order, and so makes seeds reproducible.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::callbacks::{self, CallbackLog, CallbackRecord, Delivery, RosterEvent, Settled};
use super::config::SandboxConfig;
use super::error::{ApiError, EasemobError};
use super::exception_cache::{BucketInfo, Cached, ExceptionCache};
use super::faults::{FaultQueue, InjectedFault};
use super::limiter::FixedWindow;
use super::rule::RuleHealth;
use crate::clock::SharedClock;

/// Callback sends in progress at most (see `SandboxState::sending`).
const MAX_SENDS_AT_ONCE: usize = 256;

/// How long the sandbox waits for a callback receiver, per attempt.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters, as `GET /_sandbox/stats` reports them.
///
/// Every generated callback is in exactly one of sent, dropped, failed, banned or pending, so their sum
/// is the number of callbacks generated.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SandboxStats {
    /// API requests received (everything except `/_sandbox/...`), whatever the answer.
    pub requests: u64,
    /// Requests answered 429 by the rate limiter (injected 429s are not counted).
    pub rate_limited: u64,
    /// Callbacks some attempt of which was answered 200.
    pub callbacks_sent: u64,
    /// Callbacks never sent (drop fault).
    pub callbacks_dropped: u64,
    /// Callbacks chosen to be sent twice (they are also counted by their fate).
    pub callbacks_duplicated: u64,
    /// Callbacks whose every attempt failed.
    pub callbacks_failed: u64,
    /// Callbacks not sent because the callback rule was banned (90 failures within 30 s).
    #[serde(default)]
    pub callbacks_banned: u64,
    /// Callbacks still being delayed, sent or retried.
    pub callbacks_pending: u64,
    /// Failed callbacks delivered later from the exception cache (still counted as failed or
    /// banned too: that is how their first delivery ended).
    #[serde(default)]
    pub callbacks_redelivered: u64,
    /// Tokens issued by `POST /{org}/{app}/token`.
    pub tokens_issued: u64,
}

/// One registered user.
#[derive(Debug, Clone)]
pub struct User {
    /// Entity uuid.
    pub uuid: String,
    /// Creation time, ms.
    pub created: i64,
    /// Last modification time, ms.
    pub modified: i64,
    /// Optional display name.
    pub nickname: Option<String>,
    /// Friends' usernames, sorted (so the friend list has a stable order).
    pub friends: BTreeSet<String>,
}

/// Everything that changes, behind [`SandboxState`]'s mutex.
#[derive(Debug)]
pub struct World {
    /// Users by lower-case username.
    pub users: HashMap<String, User>,
    /// Token -> expiry (ms since epoch; `None` = never expires).
    tokens: HashMap<String, Option<i64>>,
    /// One budget per API (method and path shape, see [`api_of`]).
    limiters: HashMap<String, FixedWindow>,
    faults: FaultQueue,
    /// Draws callback faults; seeded from the config.
    fault_rng: StdRng,
    /// Draws entity uuids; seeded too, so the same seed gives the same uuids.
    id_rng: StdRng,
    last_msg_id: u64,
    callbacks: CallbackLog,
    /// Callbacks whose delivery failed, for a re-send on request.
    exception_cache: ExceptionCache,
    /// The callback rule's failures and bans.
    rule: RuleHealth,
    requests: u64,
    rate_limited: u64,
    tokens_issued: u64,
}

impl World {
    /// An empty world whose RNGs start from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            users: HashMap::new(),
            tokens: HashMap::new(),
            limiters: HashMap::new(),
            faults: FaultQueue::default(),
            fault_rng: StdRng::seed_from_u64(seed),
            id_rng: StdRng::seed_from_u64(seed ^ ID_SEED_SALT),
            last_msg_id: 0,
            callbacks: CallbackLog::default(),
            exception_cache: ExceptionCache::default(),
            rule: RuleHealth::default(),
            requests: 0,
            rate_limited: 0,
            tokens_issued: 0,
        }
    }
}

/// The shared state of one sandbox server.
pub struct SandboxState {
    config: SandboxConfig,
    clock: SharedClock,
    base_url: String,
    application: String,
    world: Mutex<World>,
    http: reqwest::Client,
    in_flight: watch::Sender<u64>,
    deliveries: Mutex<JoinSet<()>>,
    /// Sends at once (each holds a connection): a stalled receiver under a high callback rate
    /// must not cost one socket per callback in flight. The others wait, still `pending`.
    sending: tokio::sync::Semaphore,
}

impl std::fmt::Debug for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxState")
            .field("config", &self.config)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// A stable uuid-shaped string for the application, derived from the App Key so it survives
/// restarts like Easemob's does.
fn application_uuid(app_key: &str) -> String {
    use md5::{Digest, Md5};
    let digest = Md5::digest(app_key.as_bytes());
    uuid_from_bytes(&digest)
}

fn uuid_from_bytes(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Mixed into the seed so the uuid stream differs from the fault stream of the same seed.
const ID_SEED_SALT: u64 = 0x5eed_1d5a_17b0_0c75;

impl SandboxState {
    /// State for a server reachable at `base_url` (used in the `uri` fields of responses).
    pub fn new(config: SandboxConfig, clock: SharedClock, base_url: String) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        // Easemob counts only a 200 as delivered: a redirect is a failed attempt, not something to
        // follow (a POST turned into a GET would lose the body and still count as delivered).
        // And it posts straight to the rule's URL, whatever proxy the environment names.
        let http = reqwest::Client::builder()
            .timeout(CALLBACK_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let world = World::new(config.seed);
        Ok(Arc::new(Self {
            application: application_uuid(&config.app_key()),
            config,
            clock,
            base_url,
            world: Mutex::new(world),
            http,
            in_flight: watch::Sender::new(0),
            deliveries: Mutex::new(JoinSet::new()),
            sending: tokio::sync::Semaphore::new(MAX_SENDS_AT_ONCE),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The injected clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The application uuid reported in responses.
    pub fn application(&self) -> &str {
        &self.application
    }

    /// `http://host:port/{org}/{app}`, the prefix of every `uri` field.
    pub fn app_url(&self) -> String {
        format!("{}/{}/{}", self.base_url, self.config.org, self.config.app)
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A turn to send callbacks, held while sending; waits while [`MAX_SENDS_AT_ONCE`] are
    /// being sent. (`None` only if the semaphore were closed, which nothing does.)
    pub(crate) async fn send_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.sending.acquire().await.ok()
    }

    /// Locks the world. A panic while it was held cannot leave it half-changed in a way that
    /// matters to a fake server, so a poisoned lock is simply taken over.
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SandboxStats {
        let world = self.world();
        SandboxStats {
            requests: world.requests,
            rate_limited: world.rate_limited,
            callbacks_sent: world.callbacks.sent,
            callbacks_dropped: world.callbacks.dropped,
            callbacks_duplicated: world.callbacks.duplicated,
            callbacks_failed: world.callbacks.failed,
            callbacks_banned: world.callbacks.banned,
            callbacks_pending: world.callbacks.pending,
            callbacks_redelivered: world.callbacks.redelivered,
            tokens_issued: world.tokens_issued,
        }
    }

    /// The remembered callback records, in generation order.
    pub fn callback_records(&self) -> Vec<CallbackRecord> {
        self.world().callbacks.records()
    }

    /// Queues an injected fault; an invalid status is refused.
    pub fn inject_fault(&self, fault: InjectedFault) -> Result<(), String> {
        self.world().faults.push(fault)
    }

    /// The gate every API request (`/{org}/{app}/...`) passes, in this order: count it, apply an
    /// injected fault, check the App Key, then (except for `/token`) the rate limit and the
    /// bearer token. Injected faults come first so that a test's fault always wins.
    pub fn admit(&self, method: &str, path: &str, authorization: Option<&str>) -> Result<(), EasemobError> {
        let now = self.clock.now_ms();
        let mut world = self.world();
        world.requests += 1;
        if let Some((status, error)) = world.faults.take(path) {
            return Err(EasemobError::Injected(status, error));
        }
        let Some((org, app, rest)) = split_api_path(path) else {
            return Err(EasemobError::RouteNotFound);
        };
        if org != self.config.org || app != self.config.app {
            return Err(EasemobError::AppNotFound {
                org: org.to_owned(),
                app: app.to_owned(),
                uri_path: path.trim_start_matches('/').to_owned(),
            });
        }
        let api = api_of(method, rest);
        let limit = if rest == "token" { self.config.token_rate_limit } else { self.config.rate_limit };
        if !world.limiters.entry(api).or_default().try_acquire(now, limit) {
            world.rate_limited += 1;
            return Err(EasemobError::ReachLimit);
        }
        if rest == "token" {
            return Ok(());
        }
        let token = bearer_token(authorization).ok_or(EasemobError::Unauthorized)?;
        if !looks_like_token(token) {
            return Err(EasemobError::CorruptToken);
        }
        match world.tokens.get(token) {
            Some(None) => Ok(()),
            Some(Some(expires_at)) if now < *expires_at => Ok(()),
            _ => Err(EasemobError::Unauthorized),
        }
    }

    /// Issues an app token that lives `ttl_secs` (0 = forever) from now on the injected clock.
    pub fn issue_token(&self, ttl_secs: i64) -> String {
        let now = self.clock.now_ms();
        // Tokens come from the OS-seeded RNG, not the seeded one: a token cached by a client
        // must not become valid again in a restarted sandbox with the same seed.
        let token = format!("YWMt{}", hex::encode(rand::rng().random::<[u8; 24]>()));
        let expires_at = (ttl_secs > 0).then(|| now.saturating_add(ttl_secs.saturating_mul(1000)));
        let mut world = self.world();
        world.tokens.retain(|_, expiry| expiry.is_none_or(|at| now < at));
        world.tokens.insert(token.clone(), expires_at);
        world.tokens_issued += 1;
        token
    }

    /// Plans the callbacks for `events` while the caller holds the world (so fault draws follow
    /// request order) and returns the deliveries to start once the lock is released.
    /// Without a callback URL nothing is generated.
    ///
    /// `events` are the callbacks of one operation, so they share one `msg_id` (hence `callId`)
    /// and one timestamp, as Easemob's documented pair of callbacks for one acceptance
    /// (`remote_accept` to the requester, `accept` to the acceptor) does; they differ in `to`.
    pub fn plan_callbacks(&self, world: &mut World, events: Vec<RosterEvent>) -> Vec<Delivery> {
        if self.config.callback_url.is_none() || events.is_empty() {
            return Vec::new();
        }
        let app_key = self.config.app_key();
        let secret = self.config.callback_secret.as_ref().map(|s| s.expose()).unwrap_or("");
        let now = self.clock.now_ms();
        let msg_id = callbacks::next_msg_id(world.last_msg_id, now);
        world.last_msg_id = msg_id;
        let mut deliveries = Vec::new();
        for event in events {
            let draw = callbacks::draw_faults(&mut world.fault_rng, &self.config);
            let signing_secret = if draw.bad_signature { callbacks::wrong_secret(secret) } else { secret.to_owned() };
            let body = callbacks::build_callback(&app_key, msg_id, &event, &signing_secret, now);
            let encoded = serde_json::to_vec(&body);
            let fate = match (&encoded, draw.drop) {
                (Err(_), _) => callbacks::fate::FAILED,
                (Ok(_), true) => callbacks::fate::DROPPED,
                (Ok(_), false) => callbacks::fate::PENDING,
            };
            let record = CallbackRecord {
                call_id: body.call_id.clone(),
                msg_id: body.msg_id.clone(),
                from_user: event.from.clone(),
                to_user: event.to.clone(),
                operation: event.operation.as_str().to_owned(),
                fate: fate.to_owned(),
                attempts: 0,
            };
            let seq = world.callbacks.push(record, draw.duplicate && fate == callbacks::fate::PENDING);
            match encoded {
                Ok(bytes) if !draw.drop => deliveries.push(Delivery {
                    seq,
                    body: Bytes::from(bytes),
                    duplicate: draw.duplicate,
                    delay_ms: draw.delay_ms,
                }),
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "could not encode a roster callback"),
            }
        }
        deliveries
    }

    /// Starts the planned deliveries, each in its own task so delays reorder them.
    pub fn start_deliveries(self: &Arc<Self>, deliveries: Vec<Delivery>) {
        let Some(url) = self.config.callback_url.clone() else {
            return;
        };
        let mut tasks = self.delivery_tasks();
        for delivery in deliveries {
            let guard = InFlightGuard::new(&self.in_flight);
            tasks.spawn(callbacks::deliver(Arc::clone(self), delivery, url.clone(), guard));
        }
    }

    /// The running delivery tasks, finished ones reaped first so that the set does not grow with
    /// every callback ever sent.
    fn delivery_tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        let mut tasks = self.deliveries.lock().unwrap_or_else(PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        tasks
    }

    pub(crate) fn set_callback_attempts(&self, seq: u64, attempts: u32) {
        self.world().callbacks.set_attempts(seq, attempts);
    }

    /// Settles a callback; one that did not get through is kept in the exception cache (when
    /// it is on) with the bytes it was sent as.
    pub(crate) fn finish_callback(&self, seq: u64, settled: Settled, attempts: u32, body: &Bytes) {
        let now = self.clock.now_ms();
        let mut world = self.world();
        world.callbacks.finish(seq, settled, attempts);
        if settled != Settled::Delivered && self.config.exception_cache {
            world.exception_cache.keep(now, Cached { seq, body: body.clone() });
        }
    }

    /// The exception cache's buckets now.
    pub fn exception_cache_info(&self) -> Vec<BucketInfo> {
        let now = self.clock.now_ms();
        self.world().exception_cache.info(now)
    }

    /// Starts sending the callbacks of the bucket named `date` again, to `target_url` or else to
    /// the rule's URL; false if no such bucket is kept.
    pub fn resend_from_exception_cache(self: &Arc<Self>, date: &str, target_url: Option<String>) -> bool {
        let now = self.clock.now_ms();
        let Some(url) = target_url.or_else(|| self.config.callback_url.clone()) else {
            return false;
        };
        let Some((start, items)) = self.world().exception_cache.take(now, date) else {
            return false;
        };
        let mut tasks = self.delivery_tasks();
        for item in items {
            let guard = InFlightGuard::new(&self.in_flight);
            tasks.spawn(callbacks::redeliver(Arc::clone(self), start, item, url.clone(), guard));
        }
        true
    }

    /// A callback of the exception cache got through on a re-send.
    pub(crate) fn redelivered(&self, seq: u64) {
        self.world().callbacks.redelivered(seq);
    }

    /// A callback of the exception cache failed again: back into its bucket.
    pub(crate) fn keep_again(&self, bucket_start: i64, item: Cached) {
        self.world().exception_cache.put_back(bucket_start, item);
    }

    /// Whether the callback rule is not banned now.
    pub(crate) fn callback_rule_may_send(&self) -> bool {
        self.world().rule.may_send(self.clock.now_ms())
    }

    /// Counts a failed delivery attempt against the rule, which may ban it.
    pub(crate) fn callback_attempt_failed(&self) {
        let now = self.clock.now_ms();
        if let Some(length) = self.world().rule.failed(now) {
            tracing::warn!(
                minutes = length / 60_000,
                "callback rule banned after 90 failed deliveries within 30 s, as Easemob does; callbacks due meanwhile are not sent"
            );
        }
    }

    /// Resolves once no delivery is in flight (delays and retries included).
    pub async fn wait_deliveries_settled(&self) {
        let mut in_flight = self.in_flight.subscribe();
        // The sender lives as long as `self`, so this can only end by reaching zero.
        let _ = in_flight.wait_for(|count| *count == 0).await;
    }

    /// Stops every delivery still in flight (used at shutdown); their records stay `pending`.
    pub fn abort_deliveries(&self) {
        self.deliveries.lock().unwrap_or_else(PoisonError::into_inner).abort_all();
    }

    /// Draws a fresh entity uuid from the seeded id RNG.
    pub fn new_uuid(world: &mut World) -> String {
        let bytes: [u8; 16] = world.id_rng.random();
        uuid_from_bytes(&bytes)
    }

    /// Stamps an error with the request's times.
    pub fn reject(&self, timing: &Timing, error: EasemobError) -> ApiError {
        let now = self.clock.now_ms();
        error.at(now, timing.elapsed_at(now))
    }
}

/// Counts one delivery as in flight for as long as it lives, so even an aborted delivery task
/// releases `wait_callbacks_settled`.
#[derive(Debug)]
pub struct InFlightGuard(watch::Sender<u64>);

impl InFlightGuard {
    fn new(in_flight: &watch::Sender<u64>) -> Self {
        in_flight.send_modify(|count| *count += 1);
        Self(in_flight.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// `/{org}/{app}/{rest}` split into its parts; `None` for paths with fewer segments.
pub fn split_api_path(path: &str) -> Option<(&str, &str, &str)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let org = parts.next().filter(|s| !s.is_empty())?;
    let app = parts.next().filter(|s| !s.is_empty())?;
    let rest = parts.next().filter(|s| !s.is_empty())?;
    Some((org, app, rest))
}

/// Which API a request is for, as Easemob's per-API rate limits count them: the method and the
/// path with user names left out (`POST users/*/contacts/users/*` is adding a friend).
fn api_of(method: &str, rest: &str) -> String {
    let mut shape = String::with_capacity(method.len() + rest.len() + 1);
    shape.push_str(method);
    shape.push(' ');
    let mut after_users = false;
    for (i, segment) in rest.split('/').enumerate() {
        if i > 0 {
            shape.push('/');
        }
        shape.push_str(if after_users { "*" } else { segment });
        after_users = segment == "users" && !after_users;
    }
    shape
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(header: Option<&str>) -> Option<&str> {
    let header = header?.trim();
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether a token is shaped like the ones this sandbox issues (`YWMt` + URL-safe characters);
/// anything else is "corrupt" rather than "expired".
fn looks_like_token(token: &str) -> bool {
    token.len() > 4
        && token.starts_with("YWMt")
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// When the current request started on the injected clock, for the `timestamp`/`duration`
/// fields. The gate puts it in the request's extensions; outside the gate it starts now.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Start of the request, ms since epoch.
    pub start_ms: i64,
}

impl Timing {
    /// The `duration` field for a response produced at `now_ms`.
    pub fn elapsed_at(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.start_ms).max(0)
    }
}

impl FromRequestParts<Arc<SandboxState>> for Timing {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<SandboxState>) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Timing>().copied().unwrap_or_else(|| Timing { start_ms: state.clock.now_ms() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const P: &str = "/demo-org/demo-app/users/x";

    fn state(config: SandboxConfig) -> (Arc<SandboxState>, Arc<ManualClock>) {
        let clock = ManualClock::new(1_700_000_000_000);
        let state = SandboxState::new(config, clock.clone(), "http://127.0.0.1:1".into()).expect("valid config");
        (state, clock)
    }

    #[test]
    fn bearer_tokens_are_taken_from_the_header() {
        assert_eq!(bearer_token(Some("Bearer YWMtabc")), Some("YWMtabc"));
        assert_eq!(bearer_token(Some("bearer  YWMtabc ")), Some("YWMtabc"));
        assert_eq!(bearer_token(Some("Basic abc")), None);
        assert_eq!(bearer_token(Some("Bearer")), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn only_tokens_of_our_shape_count_as_tokens() {
        assert!(looks_like_token("YWMt0123abcd"));
        assert!(!looks_like_token("YWMt"));
        assert!(!looks_like_token("hello"));
        assert!(!looks_like_token("YWMt{}"));
    }

    #[test]
    fn a_token_works_until_its_ttl_has_passed_on_the_injected_clock() {
        let (state, clock) = state(SandboxConfig::default());
        let token = state.issue_token(60);
        let header = format!("Bearer {token}");
        assert_eq!(state.admit("GET", P, Some(&header)), Ok(()));
        clock.advance_ms(59_999);
        assert_eq!(state.admit("GET", P, Some(&header)), Ok(()));
        clock.advance_ms(1);
        assert_eq!(state.admit("GET", P, Some(&header)), Err(EasemobError::Unauthorized));
    }

    #[test]
    fn a_zero_ttl_token_never_expires() {
        let (state, clock) = state(SandboxConfig::default());
        let header = format!("Bearer {}", state.issue_token(0));
        clock.advance_ms(i64::from(u32::MAX));
        assert_eq!(state.admit("GET", P, Some(&header)), Ok(()));
    }

    #[test]
    fn missing_unknown_and_corrupt_tokens_are_told_apart() {
        let (state, _) = state(SandboxConfig::default());
        assert_eq!(state.admit("GET", P, None), Err(EasemobError::Unauthorized));
        assert_eq!(state.admit("GET", P, Some("Bearer YWMtunknown")), Err(EasemobError::Unauthorized));
        assert_eq!(state.admit("GET", P, Some("Bearer !!")), Err(EasemobError::CorruptToken));
        assert_eq!(state.admit("POST", "/demo-org/demo-app/token", None), Ok(()));
        assert_eq!(state.stats().requests, 4);
    }

    #[test]
    fn the_rate_limit_applies_before_authentication_and_is_counted() {
        let (state, _) = state(SandboxConfig { rate_limit: 2, ..SandboxConfig::default() });
        assert_eq!(state.admit("GET", P, None), Err(EasemobError::Unauthorized));
        assert_eq!(state.admit("GET", P, None), Err(EasemobError::Unauthorized));
        assert_eq!(state.admit("GET", P, None), Err(EasemobError::ReachLimit));
        assert_eq!(
            state.admit("POST", "/demo-org/demo-app/token", None),
            Ok(()),
            "token requests have their own budget"
        );
        assert_eq!(state.stats().rate_limited, 1);
    }

    #[test]
    fn each_api_has_its_own_budget_and_tokens_theirs() {
        let config = SandboxConfig { rate_limit: 2, token_rate_limit: 3, ..SandboxConfig::default() };
        let (state, clock) = state(config);
        let header = format!("Bearer {}", state.issue_token(0));
        let add = |owner: &str, friend: &str| format!("/demo-org/demo-app/users/{owner}/contacts/users/{friend}");
        // Two adds of different users use up the add budget; removes and lists have their own.
        assert_eq!(state.admit("POST", &add("a", "b"), Some(&header)), Ok(()));
        assert_eq!(state.admit("POST", &add("c", "d"), Some(&header)), Ok(()));
        assert_eq!(state.admit("POST", &add("e", "f"), Some(&header)), Err(EasemobError::ReachLimit));
        assert_eq!(state.admit("DELETE", &add("a", "b"), Some(&header)), Ok(()));
        assert_eq!(state.admit("GET", "/demo-org/demo-app/users/a/contacts/users", Some(&header)), Ok(()));
        let token = "/demo-org/demo-app/token";
        assert!((0..3).all(|_| state.admit("POST", token, None).is_ok()));
        assert_eq!(state.admit("POST", token, None), Err(EasemobError::ReachLimit));
        clock.advance_ms(1_000);
        assert_eq!(state.admit("POST", &add("e", "f"), Some(&header)), Ok(()));
        assert_eq!(state.admit("POST", token, None), Ok(()));
    }

    #[test]
    fn apis_are_told_apart_by_method_and_path_without_user_names() {
        assert_eq!(api_of("POST", "users/alice/contacts/users/bob"), "POST users/*/contacts/users/*");
        assert_eq!(api_of("GET", "users/alice/contacts/users"), "GET users/*/contacts/users");
        assert_eq!(api_of("POST", "users"), "POST users");
        assert_eq!(api_of("GET", "users/users"), "GET users/*");
        assert_eq!(api_of("POST", "token"), "POST token");
    }

    #[test]
    fn an_unknown_app_key_is_not_found_and_short_paths_are_no_route() {
        let (state, _) = state(SandboxConfig::default());
        assert!(matches!(state.admit("POST", "/other/demo-app/token", None), Err(EasemobError::AppNotFound { .. })));
        assert_eq!(state.admit("GET", "/demo-org/demo-app", None), Err(EasemobError::RouteNotFound));
        assert_eq!(split_api_path("/o/a/users/x"), Some(("o", "a", "users/x")));
    }

    #[test]
    fn injected_faults_win_over_everything_else() {
        let (state, _) = state(SandboxConfig::default());
        state
            .inject_fault(InjectedFault { status: 503, count: 1, path_contains: Some("/token".into()), error: None })
            .expect("valid fault");
        let first = state.admit("POST", "/demo-org/demo-app/token", None);
        assert_eq!(first, Err(EasemobError::Injected(axum::http::StatusCode::SERVICE_UNAVAILABLE, None)));
        assert_eq!(state.admit("POST", "/demo-org/demo-app/token", None), Ok(()));
    }

    #[test]
    fn no_callback_url_means_no_callbacks() {
        let (state, _) = state(SandboxConfig::default());
        let event = RosterEvent {
            from: "a".into(),
            to: "b".into(),
            operation: callbacks::RosterOperation::Add,
            roster_ver: String::new(),
        };
        let mut world = state.world();
        assert!(state.plan_callbacks(&mut world, vec![event]).is_empty());
        assert!(world.callbacks.records().is_empty());
    }

    #[test]
    fn the_application_uuid_is_stable_and_uuid_shaped() {
        let uuid = application_uuid("demo-org#demo-app");
        assert_eq!(uuid, application_uuid("demo-org#demo-app"));
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
    }
}
