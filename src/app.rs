//! Application state, router assembly, and the HTTP server with its limits and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::clock::SharedClock;
use crate::config::OnBadSignature;
use crate::connection::{ConnectionClock, Overstayed, TimedIo, TrackedBody};
use crate::error::error_response;
use crate::metrics::{LogThrottle, Metrics};
use crate::secret::Secret;
use crate::signature::Verifier;
use crate::store::Store;

/// Settings the handlers read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest callback body.
    pub max_body_bytes: usize,
    /// Reject or quarantine on a bad signature.
    pub on_bad_signature: OnBadSignature,
    /// Source allow-list (empty: any).
    pub allow_from: Vec<ipnet::IpNet>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (empty: none).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Reconciliation skew (ms).
    pub match_skew_ms: i64,
    /// Reconciliation window (ms).
    pub match_window_ms: i64,
    /// Longest a callback waits for its commit before it is answered 503 with `Retry-After`:
    /// shorter than the request deadline, so that a database locked by another process gets the
    /// answer that asks Easemob to retry, not a 408.
    pub commit_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_body_bytes: 65536,
            on_bad_signature: OnBadSignature::Reject,
            allow_from: Vec::new(),
            trusted_proxies: Vec::new(),
            match_skew_ms: 5_000,
            match_window_ms: 300_000,
            commit_timeout: commit_timeout(ServerLimits::default().request_timeout),
        }
    }
}

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Signature verification.
    pub verifier: Verifier,
    /// Time source.
    pub clock: SharedClock,
    /// Handler settings.
    pub settings: Settings,
    /// Counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// Throttles the log line of callbacks answered 503 because the write queue is full.
    pub overloads: LogThrottle,
    /// Throttles the log line of callbacks answered 503 because their commit ran out of time.
    pub commit_timeouts: LogThrottle,
    /// Throttles the log line of callbacks that failed verification (anyone who can reach the
    /// endpoint can send them; `/metrics` counts every one).
    pub bad_signatures: LogThrottle,
    /// Throttles the log line of callbacks that failed verification while the quarantine was
    /// full: apart from the quarantined ones, so that the moment held requests turn into refused
    /// ones (events Easemob drops after its retry) is always told, not folded into their count.
    pub quarantine_full: LogThrottle,
    /// Throttles the log line of callbacks refused as unreadable (not JSON, too large, wrong
    /// content type): Easemob drops such an event after its retry, so each run of them is worth
    /// a line, but not one per request.
    pub unreadable_callbacks: LogThrottle,
    /// The Easemob client for the trigger API (the sandbox's, in sandbox mode).
    pub easemob: Option<crate::easemob::EasemobClient>,
    /// The trailing window's reconciliation for `/metrics` (`None`: turned off).
    pub trailing: Option<crate::report::TrailingReconciliation>,
    /// `/readyz`'s write probe, reused for a second after it succeeds.
    pub write_probe: crate::http::health::WriteProbe,
    /// `/v1/reconciliation` reports, one at a time.
    pub reports: Arc<crate::http::journal::ReportGate>,
    /// Set when the service is told to stop ([`AppState::begin_stop`]).
    pub stopping: Stopping,
}

/// Whether the service has been told to stop. Work that would otherwise hold the stop, or
/// outlast the receiver, ends early: a feed long-poll answers at once, calls not sent yet are not
/// sent (their callbacks would come to a closed port).
#[derive(Clone, Debug)]
pub struct Stopping(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Stopping {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Stopping {
    /// Resolves once the service is stopping (at once if it is).
    pub async fn wait(&self) {
        let mut stopping = self.0.subscribe();
        // `self` holds the sender, so the wait ends only when the flag is set.
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    fn set(&self) {
        self.0.send_replace(true);
    }
}

impl AppState {
    /// The first step of a stop, taken when the signal arrives (before the listener closes):
    /// long-polls end, and the Easemob client sends nothing it has not sent yet.
    pub fn begin_stop(&self) {
        self.stopping.set();
        if let Some(client) = &self.easemob {
            client.stop_sending();
        }
    }

    /// At the end of a stop: what the throttled WARN lines counted after their last line (a burst
    /// that ends with the process would otherwise never be told in the log; `/metrics` has it
    /// only while the process runs).
    pub fn log_unreported_at_stop(&self) {
        let overloaded = self.overloads.take_unreported();
        let commit_timeouts = self.commit_timeouts.take_unreported();
        let failed_verification = self.bad_signatures.take_unreported() + self.quarantine_full.take_unreported();
        let unreadable = self.unreadable_callbacks.take_unreported();
        if overloaded + commit_timeouts + failed_verification + unreadable > 0 {
            tracing::warn!(
                answered_503_queue_full = overloaded,
                answered_503_commit_timeout = commit_timeouts,
                failed_verification,
                refused_unreadable = unreadable,
                "callbacks refused since the last line of their kind, not logged before the stop (each kind is \
                 logged at most every 10 s)"
            );
        }
    }

    /// How reconciliation judges calls as of now (`--match-skew`, `--match-window`).
    pub fn match_params(&self) -> crate::reconcile::MatchParams {
        crate::reconcile::MatchParams {
            skew_ms: self.settings.match_skew_ms,
            window_ms: self.settings.match_window_ms,
            now_ms: self.clock.now_ms(),
        }
    }
}

/// The commit wait of a callback under a request deadline of `request_timeout`: a tenth less
/// (at most a second less), leaving the time to answer.
pub fn commit_timeout(request_timeout: Duration) -> Duration {
    request_timeout - (request_timeout / 10).min(Duration::from_secs(1))
}

/// State as the router holds it.
pub type SharedState = Arc<AppState>;

/// Limits applied around the router.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most requests handled at once (more wait).
    pub max_in_flight: usize,
    /// Headers must arrive within this time (from the connection's opening or the request's
    /// first byte).
    pub header_timeout: Duration,
    /// A kept-alive connection is closed after this long without a request.
    pub idle_timeout: Duration,
    /// Whole request (body read and handling) deadline.
    pub request_timeout: Duration,
    /// Deadline of the trigger endpoints (`/v1/friends...`), which wait for Easemob.
    pub trigger_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 4096,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(10),
            trigger_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The full router with its middleware; `api_tokens` guard the `/v1/...` endpoints (none: open).
pub fn router(state: SharedState, limits: &ServerLimits, api_tokens: Vec<Secret>) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .merge(crate::http::health::router())
        .merge(crate::http::metrics::router())
        .merge(crate::http::callbacks::router())
        .merge(crate::http::journal::router())
        .merge(crate::http::friends::router())
        .merge(crate::http::exception_cache::router())
        .fallback(|uri: axum::http::Uri| async move {
            // A callback rule set up with a trailing slash would fail every delivery (and Easemob
            // bans a rule after 90 failures in 30 s): the answer names the path meant.
            let detail = match uri.path().strip_suffix('/').filter(|p| !p.is_empty()) {
                Some(meant) => format!(
                    "no such endpoint; paths take no trailing slash: did you mean `{meant}`? (see the README's HTTP API)"
                ),
                None => "no such endpoint; see the README's HTTP API".to_owned(),
            };
            error_response(StatusCode::NOT_FOUND, "not_found", &detail)
        })
        // A known path with another method (axum adds the `Allow` header).
        .method_not_allowed_fallback(|| async {
            error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method (see `Allow` and the README's HTTP API)",
            )
        })
        .with_state(state.clone())
        // Inside the token check: a body is read for a caller already let in.
        .layer(axum::middleware::from_fn_with_state(limits.request_timeout, read_trigger_body_first))
        .layer(axum::middleware::from_fn_with_state(Arc::new(api_tokens), require_api_token))
        .layer(CatchPanicLayer::custom(|_| {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the service log")
        }))
        .layer(axum::middleware::from_fn_with_state(Deadlines { limits: *limits, state }, request_deadline))
        .layer(axum::middleware::from_fn_with_state(InFlight::new(limits.max_in_flight), limit_in_flight))
        // tower-http logs every 5xx at ERROR by default: under a burst that is one line per 503.
        // The handlers log what failed and why themselves (internal errors with their cause, 503s
        // throttled with a count), so the per-response line is only wanted when debugging.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        // Outermost, so that the time counted includes the wait for a slot and every answer is
        // counted, the deadline's 504s and the token check's 401s too.
        .layer(axum::middleware::from_fn_with_state(metrics_state, count_api_requests))
}

/// Counts each `/v1` request by route, method and status, with its time
/// (`friendhook_api_requests_total`, `friendhook_api_request_seconds`). Router-level layers run
/// after routing, so the matched route's template is known here.
async fn count_api_requests(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return next.run(request).await;
    }
    let route = request.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let mut counted = ApiRequestCount {
        state,
        route: Some(route),
        method: request.method().clone(),
        // A duration for a histogram, not a decision: the monotonic clock, not the injected one.
        started: std::time::Instant::now(),
    };
    let response = next.run(request).await;
    counted.finish(response.status().as_u16());
    response
}

/// One /v1 request being answered. Counted when the answer is ready, or, if the connection
/// closes first (hyper drops the handler's future: the client gave up, or a stop cut the
/// connection off after its grace), on drop with nginx's 499, so a client that gives up on a
/// slow trigger still shows in the rate and the histogram.
struct ApiRequestCount {
    state: SharedState,
    /// Taken when counted, so it is counted once.
    route: Option<String>,
    method: axum::http::Method,
    started: std::time::Instant,
}

/// The status code recorded for a request whose connection closed before the answer.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl ApiRequestCount {
    fn finish(&mut self, status: u16) {
        if let Some(route) = self.route.take() {
            self.state.metrics.api_request(route, &self.method, status, self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for ApiRequestCount {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED_REQUEST);
    }
}

/// The callback endpoint's path.
const CALLBACK_PATH: &str = "/callbacks/easemob";

/// Probes and the scraper: cheap, and needed most when everything else is busy.
const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// `--max-in-flight`, counted separately for callbacks and for everything else, so that neither
/// can take the other's turn: long-polls of the feed (up to a minute) and trigger requests
/// waiting for Easemob (up to `--trigger-timeout`) cannot hold off Easemob's callbacks, and a
/// callback burst cannot hold off the API. Probes and `/metrics` are not counted: a liveness
/// check that waits behind a busy service gets the service restarted when it is busiest.
#[derive(Clone)]
struct InFlight {
    callbacks: Arc<tokio::sync::Semaphore>,
    others: Arc<tokio::sync::Semaphore>,
}

impl InFlight {
    fn new(max_in_flight: usize) -> Self {
        let permits = max_in_flight.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            callbacks: Arc::new(tokio::sync::Semaphore::new(permits)),
            others: Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }
}

/// Holds a request until its kind has a free slot (see [`InFlight`]).
async fn limit_in_flight(State(in_flight): State<InFlight>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let semaphore = if path == CALLBACK_PATH {
        &in_flight.callbacks
    } else if PROBE_PATHS.contains(&path) {
        return next.run(request).await;
    } else {
        &in_flight.others
    };
    // The semaphores are never closed, so acquiring only fails if that changes.
    let Ok(_slot) = semaphore.acquire().await else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the service is stopping; retry");
    };
    next.run(request).await
}

/// Paths that answer without an API token: the callback endpoint authenticates each request by
/// its signature (Easemob cannot send our token), and probes and scrapers expect to be answered
/// without one.
const OPEN_PATHS: [&str; 4] = [CALLBACK_PATH, PROBE_PATHS[0], PROBE_PATHS[1], PROBE_PATHS[2]];

/// With API tokens configured, every other request (the `/v1/...` API, and any path added later)
/// must carry one as `Authorization: Bearer`. Every token is compared in constant time, so the
/// answer's timing does not tell how much of a guess was right.
async fn require_api_token(State(tokens): State<Arc<Vec<Secret>>>, request: Request, next: Next) -> Response {
    if tokens.is_empty() || OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    // Read as bytes: a token with bytes outside visible ASCII is a wrong token, not a missing one.
    let authorization = request.headers().get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()));
    let presented = authorization
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let (code, detail) = match presented {
        None => ("api_token_required", "this endpoint needs `Authorization: Bearer <token>` (see --api-token)"),
        Some(token) => {
            let known = tokens.iter().fold(subtle::Choice::from(0), |found, t| {
                found | subtle::ConstantTimeEq::ct_eq(t.expose().as_bytes(), token.as_bytes())
            });
            if bool::from(known) {
                return next.run(request).await;
            }
            ("api_token_invalid", "the bearer token is not one of --api-token; check it and retry")
        }
    };
    let mut response = error_response(StatusCode::UNAUTHORIZED, code, detail);
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Answers 408 when a request (reading its body included) is not done within `limit`, or 504
/// `still_running` when its handler had started work that goes on without it ([`WorkStarted`]).
///
/// Rather than tower-http's `TimeoutLayer`, whose 408 has an empty body: every error of this API
/// is `{"code", "detail"}` JSON, and a sender trickling its body is exactly the client that needs
/// to be told what happened.
///
/// Trigger endpoints get `trigger_timeout` instead: a batch of 1,000 additions at Easemob's
/// 100/s takes ten seconds by design, plus retries; so do the exception-cache endpoints, which
/// also wait on Easemob (with its retries) once per bucket. The feed's long-poll gets its wait on
/// top.
///
/// A callback answered 408 is counted (`timed_out`) here: its handler, which counts every other
/// answer, was dropped with the deadline, and Easemob counts the 408 towards banning the rule.
async fn request_deadline(
    State(Deadlines { limits, state }): State<Deadlines>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = WorkStarted::default();
    request.extensions_mut().insert(started.clone());
    let path = request.uri().path();
    let is_callback = path == CALLBACK_PATH;
    let is_feed = path == "/v1/feed";
    let is_resend = resends_exception_cache(path);
    let is_batch = path == "/v1/friends/batch";
    let limit = if waits_on_easemob(path) {
        limits.trigger_timeout
    } else if is_feed {
        limits.request_timeout + crate::http::journal::MAX_WAIT
    } else {
        limits.request_timeout
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        // A trigger or a re-send that ran out of time after handing its work to tasks of their
        // own: "retry it" would send the calls a second time.
        Err(_) if !started.give_up() => still_running(limit, is_resend, is_batch, &started),
        Err(_) => {
            if is_callback {
                state.metrics.callback(crate::metrics::CallbackResult::TimedOut);
            }
            error_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                &format!(
                    "the request did not complete within {} (a body sent too slowly, or a slow upstream); retry it",
                    humantime::format_duration(limit)
                ),
            )
        }
    }
}

/// The 504 of a request that waits on Easemob and ran out of `limit` after starting work that
/// goes on: what to follow instead of sending it again.
fn still_running(limit: Duration, is_resend: bool, is_batch: bool, started: &WorkStarted) -> Response {
    let limit = humantime::format_duration(limit);
    let body = if is_resend {
        // A re-send of the exception cache records no calls of friendhook's: its buckets are what to follow.
        let detail = format!(
            "not finished within {limit} (--trigger-timeout); the re-sends it started go on: do not send it again. \
             GET /v1/easemob/exception-cache shows each bucket's re-sends. Raise --trigger-timeout for larger caches"
        );
        serde_json::json!({"code": "still_running", "detail": detail})
    } else if !is_batch {
        let detail = format!(
            "not finished within {limit} (--trigger-timeout): the call goes on (waiting for its turn under the rate \
             limit, or for Easemob): do not send it again (a second add of a pair is a re-add, which Easemob answers \
             without an event; a request with the same Idempotency-Key is safe). GET /v1/calls/{{id}} shows it, \
             its id in `call_ids`, with its outcome once known"
        );
        serde_json::json!({"code": "still_running", "detail": detail, "call_ids": started.calls()})
    } else {
        let detail = format!(
            "not finished within {limit} (--trigger-timeout); what it started goes on: do not send it again (a \
             second add of a pair is a re-add, which Easemob answers without an event; a request with the same \
             Idempotency-Key is safe). GET /v1/calls/{{id}} shows each call of `call_ids`, with its outcome once \
             known (a pair of a batch not among them had no call yet then and may have been recorded a moment \
             later: GET /v1/calls?owner=... finds it). Raise --trigger-timeout for larger batches"
        );
        serde_json::json!({"code": "still_running", "detail": detail, "call_ids": started.calls()})
    };
    (StatusCode::GATEWAY_TIMEOUT, axum::Json(body)).into_response()
}

/// The endpoints that wait on Easemob, under `--trigger-timeout` rather than `--request-timeout`.
fn waits_on_easemob(path: &str) -> bool {
    path.starts_with("/v1/friends") || resends_exception_cache(path)
}

/// The exception-cache endpoints: they re-send Easemob's buckets and record no calls.
fn resends_exception_cache(path: &str) -> bool {
    path.starts_with("/v1/easemob/")
}

/// Reads the body of an endpoint that waits on Easemob before its handler runs, under the
/// ordinary `--request-timeout`: `--trigger-timeout` (minutes) is for the wait on Easemob, not
/// for a sender trickling a body, who would hold a slot of --max-in-flight as long. A declared
/// size over the limit is answered before anything is read (so `Expect: 100-continue` is never
/// told to go on).
async fn read_trigger_body_first(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    if !waits_on_easemob(request.uri().path()) {
        return next.run(request).await;
    }
    match read_body_first(request, limit).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// The request with its body read into memory within `limit` and
/// [`BODY_LIMIT`](crate::http::friends::BODY_LIMIT).
async fn read_body_first(request: Request, limit: Duration) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let max = crate::http::friends::BODY_LIMIT;
    // Named here, where the bytes are: the JSON parser would call either "expected value at line
    // 1 column 1".
    crate::http::callbacks::refuse_content_encoding(&parts.headers, "send the JSON uncompressed")
        .map_err(IntoResponse::into_response)?;
    match tokio::time::timeout(limit, crate::http::callbacks::read_body(&parts.headers, body, max)).await {
        Ok(Ok(bytes)) if bytes.starts_with("\u{feff}".as_bytes()) => Err(crate::error::ApiError::bad_request(
            "invalid_json",
            format!("{}: send the JSON without it", crate::callback::STARTS_WITH_BOM),
        )
        .into_response()),
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
        Ok(Err(refused)) => Err(refused.into_response()),
        Err(_) => Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            &format!(
                "the request body did not arrive within {}; nothing was started: send it whole and retry",
                humantime::format_duration(limit)
            ),
        )),
    }
}

/// Whether a request that waits on Easemob has started work that goes on whatever becomes of
/// the request (a call to Easemob, a re-send of the exception cache). Past the deadline such a
/// request is answered 504 `still_running` ("do not send it again"); one that started nothing,
/// 408 ("retry it"), and then it never starts anything: the two sides settle it with one atomic
/// exchange, so a call still waiting for its token when the deadline passes is not sent after
/// the client was told to retry it.
#[derive(Clone, Debug, Default)]
pub struct WorkStarted(Arc<StartedWork>);

#[derive(Debug, Default)]
struct StartedWork {
    state: std::sync::atomic::AtomicU8,
    /// The calls recorded for the request so far, for the 504's `call_ids`.
    calls: std::sync::Mutex<Vec<i64>>,
}

const NOTHING_YET: u8 = 0;
const STARTED: u8 = 1;
const ANSWERED_AS_NOT_STARTED: u8 = 2;

impl WorkStarted {
    /// Called right before work that outlives the request starts: an error when the request was
    /// already answered "retry it", and the work must not start (nobody sees that error: the
    /// client has its 408). Without a tracker (no deadline around the handler), always `Ok`.
    pub fn start(started: Option<&WorkStarted>) -> Result<(), crate::error::ApiError> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let may_start = started.is_none_or(|s| {
            matches!(s.0.state.compare_exchange(NOTHING_YET, STARTED, AcqRel, Acquire), Ok(_) | Err(STARTED))
        });
        if may_start {
            return Ok(());
        }
        Err(crate::error::ApiError::Unavailable {
            code: "request_timeout",
            detail: "the request's deadline passed before it started anything; nothing of it was sent".into(),
            retry_after_secs: 0,
        })
    }

    /// At the deadline: true when nothing had started (and now never will).
    fn give_up(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.0.state.compare_exchange(NOTHING_YET, ANSWERED_AS_NOT_STARTED, AcqRel, Acquire).is_ok()
    }

    /// Notes a call recorded for the request (its intent committed), so that a 504 can list it.
    pub fn note_call(started: Option<&WorkStarted>, id: i64) {
        if let Some(mut calls) = started.and_then(|s| s.0.calls.lock().ok()) {
            calls.push(id);
        }
    }

    /// The calls noted so far, in id order.
    fn calls(&self) -> Vec<i64> {
        let mut ids = self.0.calls.lock().map(|c| c.clone()).unwrap_or_default();
        ids.sort_unstable();
        ids
    }
}

/// What [`request_deadline`] needs: the limits, and the metrics to count a callback's 408.
#[derive(Clone)]
struct Deadlines {
    limits: ServerLimits,
    state: SharedState,
}

/// Serves `router` on `listener` until `shutdown` resolves, then until `drain` does (the stop has
/// begun: the router refuses new work, callbacks are still received); then stops accepting, lets
/// in-flight requests finish for up to what is left of `limits.shutdown_grace`, and returns.
///
/// hyper's connection builder is used directly (rather than `axum::serve`) for the per-connection
/// timeouts of [`crate::connection`]: clients that trickle their headers (slow loris) are cut off
/// after `limits.header_timeout`, kept-alive connections idle for `limits.idle_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
    drain: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header timeout also runs while a kept-alive connection is idle; it is replaced
    // by the connection clock below, which tells the two apart.
    http.header_read_timeout(None).keep_alive(true);
    tokio::pin!(shutdown);
    tokio::pin!(drain);
    let mut stop_began: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown, if stop_began.is_none() => {
                stop_began = Some(tokio::time::Instant::now());
                continue;
            }
            () = &mut drain, if stop_began.is_some() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Running out of file descriptors must not end the server; back off briefly.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let clock = ConnectionClock::new(limits.header_timeout, limits.idle_timeout);
        let service = hyper::service::service_fn({
            let clock = clock.clone();
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                clock.request_started();
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let router = router.clone();
                let clock = clock.clone();
                async move {
                    let response = router.oneshot(req.map(axum::body::Body::new)).await.into_response();
                    Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, clock)))
                }
            }
        });
        let conn = http.serve_connection(TokioIo::new(TimedIo::new(stream, clock.clone())), service);
        let conn = graceful.watch(conn);
        // Reap finished connections, so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            tokio::select! {
                ended = conn => if let Err(err) = ended {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                },
                overstayed = clock.overstayed() => match overstayed {
                    // Dropping the connection closes it, as hyper's own timeout did.
                    Overstayed::Headers => tracing::debug!(%peer, "closing a connection whose request headers did not arrive within --header-timeout"),
                    Overstayed::Idle => tracing::debug!(%peer, "closing a kept-alive connection idle for --idle-timeout"),
                },
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no longer accepting; waiting for in-flight requests");
    let grace_left = limits.shutdown_grace.saturating_sub(stop_began.map_or(Duration::ZERO, |at| at.elapsed()));
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace_left) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "in-flight requests did not finish within the shutdown grace; exiting anyway");
        }
    }
    // Connections still open past the grace are cut here. Merely walking away would leave their
    // tasks running, each holding the router and so a handle to the store, and the caller's
    // `Store::close` waits for every handle to go before the writer finishes: a single stalled
    // client would hold the exit well past the grace. Nothing acknowledged is lost by this: a
    // request still running has not been answered.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP, listened for from the moment this is made. SIGHUP (the
/// terminal that started the service closed; some supervisors' stop) is a stop like the others:
/// its default action ends the process at once, without the drain.
///
/// Made before the service says it listens: until a process listens for a signal, the signal's
/// default action applies, and SIGTERM's is to end the process on the spot, without a word and
/// without the stop's drain. A supervisor (or a test) that stops the service as soon as it read
/// "listening" would otherwise kill it.
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening for the three signals.
    pub fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let what = "listening for SIGINT, SIGTERM and SIGHUP (needed for a clean stop)";
            Ok(Self {
                interrupt: anyhow::Context::context(signal(SignalKind::interrupt()), what)?,
                terminate: anyhow::Context::context(signal(SignalKind::terminate()), what)?,
                hangup: anyhow::Context::context(signal(SignalKind::hangup()), what)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves at the next SIGINT, SIGTERM or SIGHUP, logging which.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("received SIGINT"),
            _ = self.terminate.recv() => tracing::info!("received SIGTERM"),
            _ = self.hangup.recv() => tracing::info!("received SIGHUP"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("received Ctrl-C");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 504 of a trigger past its deadline speaks of what the request was: one call, or a
    /// batch whose pairs may not all have a call yet.
    #[tokio::test]
    async fn a_trigger_past_its_deadline_is_told_what_goes_on() {
        let started = WorkStarted::default();
        WorkStarted::note_call(Some(&started), 7);
        let started = &started;
        let detail = |is_batch| async move {
            let response = still_running(Duration::from_secs(2), false, is_batch, started);
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
            let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(body["call_ids"], serde_json::json!([7]));
            body["detail"].as_str().expect("detail").to_owned()
        };
        let single = detail(false).await;
        assert!(single.contains("the call goes on") && single.contains("do not send it again"), "{single}");
        assert!(!single.contains("batch"), "{single}");
        let batch = detail(true).await;
        assert!(batch.contains("Raise --trigger-timeout for larger batches"), "{batch}");
    }
}
