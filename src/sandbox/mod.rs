//! The embedded Easemob-compatible sandbox: a fake Easemob REST server for one App Key, in the
//! same binary (`friendhook sandbox`), that also sends roster callbacks with configurable faults.
//!
//! It owns the fake's HTTP surface, its in-memory world and its callback emitter. It does not
//! depend on the receiver, the client or the `signature` module: it signs callbacks itself, so a
//! bug there cannot hide a bug here.
//!
//! # Map
//! - [`config`]: [`SandboxConfig`] and the `friendhook sandbox` flags ([`SandboxArgs`]).
//! - [`routes`]: the router and the gate (request count, injected faults, App Key, rate limit,
//!   bearer token) in front of the handlers in [`token`], [`users`], [`contacts`], [`control`].
//! - [`state`]: users, tokens, counters and RNGs behind one mutex; plans callbacks.
//! - [`callbacks`]: the roster callback body, its md5 signature, fault draws and delivery.
//! - [`error`]: Easemob's five-field error body; [`wire`]: the success envelope.
//! - [`limiter`], [`faults`]: the per-second request budget and the injected-fault queue.
//! - [`rule`]: the callback rule's failure count and bans.
//!
//! # Endpoints
//! Easemob's: `POST /{org}/{app}/token`; `POST /{org}/{app}/users`; `GET`/`DELETE
//! /{org}/{app}/users/{username}`; `POST`/`DELETE /{org}/{app}/users/{owner}/contacts/users/{friend}`;
//! `GET /{org}/{app}/users/{owner}/contacts/users`. The sandbox's own (no auth, no rate limit, not
//! counted): `GET /_sandbox/stats`, `GET /_sandbox/callbacks`, `POST /_sandbox/faults`.
//!
//! # Choices where Easemob's documentation is silent
//! - **Gate order**: count the request, apply an injected fault, check the App Key (404
//!   `organization_application_not_found`), then the rate limit and, except for `/token`, the
//!   token. Injected faults match `/token` too (use `path_contains` to aim them) and do not
//!   use up the rate budget; injected 429s are not counted in `rate_limited`.
//! - **Rate limit**: a fixed one-second window on the injected clock per API (method and path
//!   without user names: adding, removing and listing friends each have their own budget, as
//!   Easemob counts them), `rate_limit` each; `/token` has its own, `token_rate_limit` (Easemob:
//!   300/s); 0 disables either. With a frozen `ManualClock` exactly the limit passes, which keeps
//!   tests deterministic.
//! - **Tokens**: `ttl` may be a number or a numeric string; `ttl` 0 (or `token_ttl_secs` 0) never
//!   expires. Missing, unknown and expired tokens get 401 `unauthorized`; a token not shaped like
//!   ours (`YWMt...`) gets 401 `auth_bad_access_token`. Tokens come from the OS RNG, so a restarted
//!   sandbox never re-issues a token a client still holds. Only `client_credentials` is played.
//! - **Users**: every endpoint needs the app token (authorized registration). Registration is
//!   unlimited (no free-plan 100-user cap). A malformed entry refuses the whole request; a taken
//!   name in an array is reported per user with 200, also when repeated within the same array.
//!   Deleting a user removes it from every friend list without callbacks.
//! - **Friends**: re-adding a friend answers 200, counts nothing twice and sends no callback;
//!   removing a non-friend likewise. Adding yourself is 400 `illegal_argument`. The friend limit
//!   is checked for both users. Lists are sorted by username.
//! - **Callbacks**: with no `callback_url`, none are generated at all (no records, no counters).
//!   An add sends owner -> friend (`add`), plus friend -> owner when `callbacks_per_add` is 2,
//!   the two as one event (one msg_id, callId and timestamp); a remove sends one owner -> friend
//!   `remove` whose `roster_ver` is a hash of the receiver's new friend list. msg_ids are time-based (ms << 22), strictly
//!   increasing and at least 18 digits. With no `callback_secret` the signature uses "".
//!   Success is a 200 answer only, with a reply of at most 1,000 bytes; one immediate retry, then
//!   `failed`. 90 failed attempts within 30 s (injected clock) ban the callback rule for 5, 10,
//!   15, 20, then 25 minutes ([`rule`]); a callback due meanwhile is not sent (`banned`). A duplicate is a second
//!   send of the same bytes after the first one finishes (with its own retry); its fate is
//!   `delivered` if either send got a 200. Delays use real time (they reorder deliveries); the
//!   `timestamp` is the injected clock at generation. At most 256 are being sent at once (each
//!   holds a connection); the rest wait, `pending`. Faults are drawn in request order from
//!   the seeded RNG, so the same seed and operations give the same faults.
//! - **Records**: `GET /_sandbox/callbacks` keeps the last [`callbacks::MAX_RECORDED_CALLBACKS`];
//!   the counters in the stats are exact.
//! - **Unknown routes / wrong methods**: 404 / 405 `web_application`, after the gate.

pub mod callbacks;
pub mod config;
pub mod contacts;
pub mod control;
pub mod error;
pub mod exception_cache;
pub mod faults;
pub mod limiter;
pub mod routes;
pub mod rule;
pub mod state;
pub mod token;
pub mod users;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use callbacks::CallbackRecord;
pub use config::{SandboxArgs, SandboxConfig};
pub use faults::InjectedFault;
pub use routes::router;
pub use state::{SandboxState, SandboxStats};

use crate::clock::SharedClock;

/// `friendhook sandbox`: serves until Ctrl-C or SIGTERM.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let config = args.to_config();
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding the sandbox to {}", args.listen))?;
    let handle = spawn(listener, config.clone(), crate::clock::system()).await?;
    let mut signals = crate::app::StopSignals::listen()?;
    tracing::info!(
        base_url = %handle.base_url(),
        org = %config.org,
        app = %config.app,
        client_id = %config.client_id,
        callback_url = config.callback_url.as_deref().unwrap_or("(none: no callbacks)"),
        friend_limit = config.friend_limit,
        rate_limit = config.rate_limit,
        callbacks_per_add = config.callbacks_per_add,
        drop_rate = config.drop_rate,
        duplicate_rate = config.duplicate_rate,
        delay_ms = config.delay_ms,
        bad_signature_rate = config.bad_signature_rate,
        seed = config.seed,
        "Easemob sandbox serving"
    );
    signals.recv().await;
    tracing::info!("Easemob sandbox shutting down");
    // A client stalled mid-request must not hold the exit: the same grace `serve` gives by default.
    handle.shutdown_within(std::time::Duration::from_secs(10)).await;
    Ok(())
}

/// Starts a sandbox on `listener` (bind `127.0.0.1:0` in tests) with the given clock, which
/// drives token expiry, rate windows and every timestamp.
pub async fn spawn(listener: TcpListener, config: SandboxConfig, clock: SharedClock) -> anyhow::Result<SandboxHandle> {
    let addr = listener.local_addr().context("reading the sandbox's local address")?;
    let state = SandboxState::new(config, clock, format!("http://{addr}"))?;
    let app = router(Arc::clone(&state));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // Dropping the handle also drops `stop`, which ends the server too.
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "sandbox server failed");
        }
    });
    Ok(SandboxHandle { addr, state, stop, server })
}

/// A running sandbox. Dropping it stops the server as well; [`SandboxHandle::shutdown`] also
/// waits for it to stop and cancels callback deliveries in flight.
#[derive(Debug)]
pub struct SandboxHandle {
    /// The address the sandbox listens on.
    pub addr: SocketAddr,
    state: Arc<SandboxState>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl SandboxHandle {
    /// `http://127.0.0.1:PORT`, the base URL for an Easemob client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters; the same as `GET /_sandbox/stats`.
    pub fn stats(&self) -> SandboxStats {
        self.state.stats()
    }

    /// The remembered callback records in generation order; the same as `GET /_sandbox/callbacks`.
    pub fn callbacks(&self) -> Vec<CallbackRecord> {
        self.state.callback_records()
    }

    /// Queues a fault; the same as `POST /_sandbox/faults`. A status that is not a 4xx/5xx is
    /// ignored with a warning (the HTTP endpoint answers 400 for it).
    pub fn inject_faults(&self, fault: InjectedFault) {
        if let Err(reason) = self.state.inject_fault(fault) {
            tracing::warn!(%reason, "injected fault ignored");
        }
    }

    /// Resolves when no callback delivery (delays and retries included) is in flight. Wrap it in
    /// a timeout in tests: a receiver that never answers holds it for up to four 5 s attempts.
    pub async fn wait_callbacks_settled(&self) {
        self.state.wait_deliveries_settled().await;
    }

    /// Stops accepting requests, waits for the server to finish and cancels deliveries in flight
    /// (their records stay `pending`).
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if let Err(error) = self.server.await {
            tracing::error!(%error, "sandbox server task failed");
        }
        self.state.abort_deliveries();
    }

    /// Like [`SandboxHandle::shutdown`], but gives requests in flight at most `grace`: a client
    /// that stalls mid-request would otherwise hold the caller forever (the sandbox has no
    /// request timeout). Past the grace the server task is aborted; connections still open end
    /// with the runtime.
    pub async fn shutdown_within(self, grace: std::time::Duration) {
        let _ = self.stop.send(());
        let mut server = self.server;
        match tokio::time::timeout(grace, &mut server).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "sandbox server task failed"),
            Err(_) => {
                tracing::warn!(?grace, "sandbox requests did not finish within the shutdown grace; abandoning them");
                server.abort();
            }
        }
        self.state.abort_deliveries();
    }
}
