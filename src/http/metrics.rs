//! `GET /metrics`: the service's metrics in the OpenMetrics text format, for Prometheus and
//! anything that scrapes it. What the metrics are is [`crate::metrics`]' business; this module only
//! reads the values a scrape has to look up (the write queue, the chain head, the quarantine, the
//! file sizes, the trailing window's reconciliation) and answers.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::app::SharedState;
use crate::metrics::ScrapeValues;

/// OpenMetrics 1.0 text, which Prometheus and its compatible scrapers parse natively.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Routes of this module.
pub fn router() -> axum::Router<SharedState> {
    axum::Router::new().route("/metrics", get(get_metrics))
}

async fn get_metrics(State(state): State<SharedState>) -> Response {
    let (queue_depth, queue_capacity) = state.store.write_queue();
    let head_seq = *state.store.committed().borrow();
    let now = ScrapeValues {
        queue_depth,
        queue_capacity,
        head_seq,
        // Walks the partial index of held rows, bounded by --quarantine-cap. A scrape must answer
        // while the database is failing (that is when it matters), so an error is exported as NaN.
        quarantine_held: state.store.count_quarantine_held().await.ok(),
        file_sizes: state.store.file_sizes(),
        disk_free_bytes: state.store.disk_free_bytes(),
        app_token_state: match &state.easemob {
            Some(client) => Some(client.token_health().await.state()),
            None => None,
        },
        reconciliation: match &state.trailing {
            Some(trailing) => Some(trailing.figures(&state.store, state.match_params()).await),
            None => None,
        },
    };
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], state.metrics.render(now)).into_response()
}
