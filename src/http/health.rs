//! `GET /healthz` (the process is up) and `GET /readyz` (the database reads and the writer commits;
//! also how many requests the quarantine holds).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::app::SharedState;
use crate::clock::Reused;
use crate::easemob::TokenHealth;
use crate::metrics::CallbackResult;

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

async fn healthz() -> &'static str {
    "ok"
}

/// How long a successful write probe stands for the next `/readyz` calls.
///
/// Each probe commits 64 KiB (see migration 0003). A readiness check every few seconds costs
/// nothing, but a tight loop of them, or several probes at once, would keep the disk busy for
/// nothing; with this, `/readyz` commits at most once a second while all is well. A failed probe
/// is never reused, and a failure of the real writes (`WriterHealth`) shows at once.
pub const WRITE_PROBE_REUSE_MS: i64 = 1_000;

/// `/readyz`'s write probe: a success stands for [`WRITE_PROBE_REUSE_MS`], and concurrent calls
/// share one probe.
#[derive(Debug)]
pub struct WriteProbe(Reused<()>);

impl Default for WriteProbe {
    fn default() -> Self {
        Self(Reused::new(WRITE_PROBE_REUSE_MS))
    }
}

impl WriteProbe {
    /// Commits a probe unless one succeeded less than [`WRITE_PROBE_REUSE_MS`] before `now_ms`.
    async fn check(&self, store: &crate::store::Store, now_ms: i64) -> Result<(), String> {
        self.0.get(now_ms, || async { store.probe_write().await.map_err(|e| e.to_string()) }).await
    }
}

async fn readyz(State(state): State<SharedState>) -> Response {
    let read = state.store.probe_read().await.err().map(|e| e.to_string());
    let write = match state.write_probe.check(&state.store, state.clock.now_ms()).await {
        Ok(()) => state.store.writer_health().last_error(),
        Err(e) => Some(e),
    };
    // The probe commits on a full disk (SQLite rewrites a checkpointed WAL in place), while the
    // next callback that needs a new page does not.
    let write = write.or_else(|| {
        crate::store::is_full(state.store.disk_free_bytes()).then(|| {
            "the database's file system is full: callbacks get 503 as soon as a commit needs a new page; free some space"
                .to_owned()
        })
    });
    let ready = read.is_none() && write.is_none();
    // Held requests are not a readiness problem, but they are events not stored yet: showing them
    // here is how a wrong secret gets noticed. The count walks the partial index of held rows
    // (bounded by --quarantine-cap); null if it could not be read.
    let held = state.store.count_quarantine_held().await.ok();
    // Shown, but no part of readiness: callbacks are received whatever Easemob thinks of the
    // credentials, and a service taken out of its load balancer would lose them.
    let easemob = match &state.easemob {
        Some(client) => easemob_health(client.token_health().await),
        None => Value::Null,
    };
    // Shown, not part of readiness either: receiving goes on without an index or a trigger, but
    // a missing index fails reconciliation (503 index_missing), a unique one added by hand refuses
    // events, and without the triggers records can be rewritten unnoticed until `audit verify`.
    let schema = match state.store.schema_unlike_migrations().await {
        Ok((guards, indexes)) if guards.is_empty() && indexes.is_empty() => json!("ok"),
        Ok((guards, indexes)) => json!({
            "triggers": guards,
            "indexes": indexes.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            "detail": "changed outside friendhook: run `friendhook audit verify` on the database file, which names \
                       each difference and prints the SQL that puts friendhook's back",
        }),
        Err(e) => json!({"detail": format!("could not read the schema: {e}")}),
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "easemob": easemob,
        "schema": schema,
        "database": { "read": read.as_deref().unwrap_or("ok"), "write": write.as_deref().unwrap_or("ok") },
        "quarantine": {
            "held": held,
            "quarantined_since_start": state.metrics.callbacks(CallbackResult::Quarantined),
        },
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// The app token's state as `/readyz` shows it.
fn easemob_health(health: TokenHealth) -> Value {
    match health {
        TokenHealth::NotFetched => json!({"app_token": "not_fetched",
            "detail": "no app token asked for yet: the first trigger fetches one"}),
        TokenHealth::Valid { expires_in_ms, refresh_failing: None } => {
            json!({"app_token": "valid", "expires_in_s": expires_in_ms.map(|ms| ms / 1000)})
        }
        TokenHealth::Valid { expires_in_ms, refresh_failing: Some(reason) } => json!({
            "app_token": "valid",
            "expires_in_s": expires_in_ms.map(|ms| ms / 1000),
            "detail": format!("refreshing it failed ({reason}); it is used until it expires"),
        }),
        TokenHealth::Failing { reason } => json!({"app_token": "failing",
            "detail": format!("{reason}; triggers are answered 503 easemob_token_unavailable until a fetch succeeds")}),
        TokenHealth::Dropped => json!({"app_token": "dropped",
            "detail": "the last token expired or was refused (401): the next trigger fetches one"}),
    }
}
