//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text) and the throttle that keeps
//! a burst of identical failures from flooding the log.
//!
//! Owns the registry and every metric's name and help text; handlers and the writer only hold
//! handles (cheap clones of atomics) and count. What a scrape reads from elsewhere (queue depth,
//! the chain head) is set by the HTTP handler just before encoding, so this module does no I/O.
//!
//! Why these: Easemob retries a failed callback once and then drops it, and 90 failures within 30 s
//! suspend the callback rule. An operator has to see 503s (`result="overloaded"` /
//! `"unavailable"`), how full the write queue runs and how long commits take before that happens,
//! and 401s (`result="rejected"`) as soon as a secret is rotated on one side only.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

use crate::model::{CallOp, Outcome};
use crate::reconcile::Summary;

/// How a callback delivery was answered: the `result` label of
/// `friendhook_callbacks_received_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackResult {
    /// 200: a new event, committed.
    Stored,
    /// 200: another delivery of an event already stored.
    Duplicate,
    /// 200: failed verification, kept in quarantine (`--on-bad-signature quarantine`).
    Quarantined,
    /// 401: failed verification.
    Rejected,
    /// 400 / 413 / 415: not a callback friendhook can read.
    Invalid,
    /// 403: from outside `--allow-from`.
    Forbidden,
    /// 503: the write queue was full.
    Overloaded,
    /// 503: the database could not commit (or the service is stopping).
    Unavailable,
    /// 408: not answered within `--request-timeout` (a body sent too slowly, or a commit that
    /// waited on a database lock held elsewhere).
    TimedOut,
}

impl CallbackResult {
    const ALL: [CallbackResult; 9] = [
        CallbackResult::Stored,
        CallbackResult::Duplicate,
        CallbackResult::Quarantined,
        CallbackResult::Rejected,
        CallbackResult::Invalid,
        CallbackResult::Forbidden,
        CallbackResult::Overloaded,
        CallbackResult::Unavailable,
        CallbackResult::TimedOut,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackResult::Stored => "stored",
            CallbackResult::Duplicate => "duplicate",
            CallbackResult::Quarantined => "quarantined",
            CallbackResult::Rejected => "rejected",
            CallbackResult::Invalid => "invalid",
            CallbackResult::Forbidden => "forbidden",
            CallbackResult::Overloaded => "overloaded",
            CallbackResult::Unavailable => "unavailable",
            CallbackResult::TimedOut => "timed_out",
        }
    }
}

/// How `GET /v1/reconciliation` answered, for `friendhook_report_requests_total{answer}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportAnswer {
    /// The reconciliation was computed for this request.
    Computed,
    /// The page was cut from the reconciliation kept from an earlier page of the same report.
    Reused,
    /// 503 `reconciliation_busy`: another report was still being computed.
    Busy,
}

impl ReportAnswer {
    const ALL: [ReportAnswer; 3] = [ReportAnswer::Computed, ReportAnswer::Reused, ReportAnswer::Busy];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportAnswer::Computed => "computed",
            ReportAnswer::Reused => "reused",
            ReportAnswer::Busy => "busy",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];
/// `friendhook_calls_total`'s labels: op and outcome.
type CallLabels = [(&'static str, &'static str); 2];

/// What the writer records about each commit (a batch of writes is one commit; a batch of more
/// than 64 callbacks is several). Cloning shares the underlying metrics; a default value is
/// registered nowhere (for stores opened outside the service, and for tests).
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    /// Writes (callbacks, call records, ...) per commit.
    pub commit_writes: Histogram,
    /// Time to write and commit them, fsync included.
    pub commit_seconds: Histogram,
    /// Batches that could not be committed (every write in them answered 503).
    pub failed_commits: Counter,
    /// `/readyz` write probes committed (kept out of `commit_writes` and `commit_seconds`).
    pub probe_commits: Counter,
    /// WAL frames the writer's last checkpoint could not copy into the database file.
    pub checkpoint_lag_frames: Gauge,
    /// Checkpoints of the writer's that failed.
    pub checkpoint_failures: Counter,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        Self {
            // 1, 2, 4, ... 512 (the default --max-batch).
            commit_writes: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 100 µs to ~3.3 s: an fsync on a healthy disk lands in the first few buckets, a
            // stalled disk in the last.
            commit_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            failed_commits: Counter::default(),
            probe_commits: Counter::default(),
            checkpoint_lag_frames: Gauge::default(),
            checkpoint_failures: Counter::default(),
        }
    }
}

/// Every metric of the service.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    callbacks: [Counter; CallbackResult::ALL.len()],
    calls: Family<CallLabels, Counter>,
    easemob_attempts: Family<Labels, Counter>,
    write_queue_depth: Gauge,
    write_queue_capacity: Gauge,
    chain_head_seq: Gauge,
    quarantine_held: Gauge<f64, AtomicU64>,
    database_bytes: Family<Labels, Gauge>,
    disk_free_bytes: Gauge,
    easemob_app_token: Family<Labels, Gauge>,
    reports: [Counter; ReportAnswer::ALL.len()],
    feed_long_polls: Gauge,
    api_requests: Family<ApiLabels, Counter>,
    api_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
    writer: WriterMetrics,
    reconciliation: Option<ReconciliationMetrics>,
}

/// `friendhook_api_requests_total`'s labels: route (axum's template, `/v1/calls/{id}`), method
/// and status code. Each takes few values: unknown methods are `other`, unknown paths
/// `unmatched`, so a scanner cannot grow the series.
type ApiLabels = [(&'static str, String); 3];
type RouteLabel = [(&'static str, String); 1];

/// A method as a label value: the ones the API takes and the usual others; anything else is
/// one value.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn api_seconds_histogram() -> Histogram {
    // 1 ms to about 33 s: a read answers in milliseconds, a trigger waits for Easemob and a
    // batch for the rate limiter (longer ones land in +Inf, counted all the same).
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// A float gauge: NaN says "could not be computed" where 0 would be a claim.
type FloatGauge = Gauge<f64, AtomicU64>;

/// The `friendhook_reconciliation_*` family: calls of a trailing window by reconciliation status.
#[derive(Debug)]
struct ReconciliationMetrics {
    window_seconds: Gauge,
    calls: Family<Labels, FloatGauge>,
    orphan_callbacks: FloatGauge,
    latency_seconds: Family<Labels, FloatGauge>,
    computed_seconds: FloatGauge,
}

/// The status label values of `friendhook_reconciliation_calls`, as `GET /v1/reconciliation`
/// names them.
const RECONCILIATION_STATUSES: [&str; 5] = ["matched", "pending", "missing", "not_expected", "unexpected"];

/// The `percentile` label values of `friendhook_reconciliation_latency_seconds`.
const LATENCY_PERCENTILES: [&str; 3] = ["50", "95", "99"];

/// A reconciliation of the trailing window, as a scrape exports it.
#[derive(Debug, Clone, Copy)]
pub struct ReconciliationFigures {
    /// The window's length.
    pub window_ms: i64,
    /// The counts; `None` if the database could not be read (exported as NaN).
    pub summary: Option<Summary>,
    /// How long computing them took.
    pub took: std::time::Duration,
}

impl ReconciliationMetrics {
    fn register(registry: &mut Registry) -> Self {
        let window_seconds = registered(
            registry,
            "reconciliation_window_seconds",
            "Length of the trailing window the reconciliation_* figures cover (--metrics-reconcile-window)",
            Gauge::default(),
        );
        let calls = registered(
            registry,
            "reconciliation_calls",
            "Calls requested within the trailing window, by reconciliation status (missing: succeeded, and no \
             callback came within --match-window); NaN: the database could not be read",
            Family::<Labels, FloatGauge>::default(),
        );
        let orphan_callbacks = registered(
            registry,
            "reconciliation_orphan_callbacks",
            "Roster callbacks with an event time within the trailing window that no call explains",
            FloatGauge::default(),
        );
        let latency_seconds = registered(
            registry,
            "reconciliation_latency_seconds",
            "Call requested to its callback stored, percentile (nearest rank) over the window's calls that got one; \
             NaN: none did",
            Family::<Labels, FloatGauge>::default(),
        );
        let computed_seconds = registered(
            registry,
            "reconciliation_compute_seconds",
            "How long the last computation of the reconciliation_* figures took (they are reused for 10 s)",
            FloatGauge::default(),
        );
        Self { window_seconds, calls, orphan_callbacks, latency_seconds, computed_seconds }
    }

    fn set(&self, f: &ReconciliationFigures) {
        self.window_seconds.set(f.window_ms / 1000);
        self.computed_seconds.set(f.took.as_secs_f64());
        let counts = f.summary.map(|s| [s.matched, s.pending, s.missing, s.not_expected, s.unexpected]);
        for (i, status) in RECONCILIATION_STATUSES.iter().enumerate() {
            let value = counts.map_or(f64::NAN, |c| c[i] as f64);
            self.calls.get_or_create(&[("status", status)]).set(value);
        }
        self.orphan_callbacks.set(f.summary.map_or(f64::NAN, |s| s.orphan as f64));
        let latency = f.summary.map(|s| [s.match_latency_ms.p50, s.match_latency_ms.p95, s.match_latency_ms.p99]);
        for (i, percentile) in LATENCY_PERCENTILES.iter().enumerate() {
            let ms = latency.and_then(|l| l[i]);
            self.latency_seconds
                .get_or_create(&[("percentile", percentile)])
                .set(ms.map_or(f64::NAN, |ms| ms as f64 / 1000.0));
        }
    }
}

/// What only a scrape can know: read by the handler from the store just before encoding.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScrapeValues {
    /// Writes waiting for the writer.
    pub queue_depth: usize,
    /// `--write-queue`.
    pub queue_capacity: usize,
    /// Last committed sequence number.
    pub head_seq: i64,
    /// Requests held in quarantine; `None` if the database could not be read (exported as NaN).
    pub quarantine_held: Option<i64>,
    /// Bytes of the database file and of its write-ahead log; `None` (the file cannot be found):
    /// left as last scraped, or absent if never read.
    pub file_sizes: Option<(u64, u64)>,
    /// Bytes left for the service on the database's file system; `None`: left as last scraped.
    pub disk_free_bytes: Option<u64>,
    /// The Easemob app token's [`crate::easemob::TokenHealth::state`]; `None` without a client.
    pub app_token_state: Option<&'static str>,
    /// The trailing window's reconciliation, when the service computes it.
    pub reconciliation: Option<ReconciliationFigures>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(WriterMetrics::default())
    }
}

impl Metrics {
    /// Registers every metric; `writer` is the store's handle, so its batches show up here.
    pub fn new(writer: WriterMetrics) -> Self {
        let mut registry = Registry::with_prefix("friendhook");
        registry.register(
            "build",
            "The running binary: package version and the commit it was built from",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("commit", crate::COMMIT)]),
        );
        let received = Family::<Labels, Counter>::default();
        // Every result is created up front, so each series exists from the first scrape at 0
        // (a rate over a series that appears only with its first 503 misses that first burst).
        let callbacks = CallbackResult::ALL.map(|r| received.get_or_create_owned(&[("result", r.as_str())]));
        registry.register(
            "callbacks_received",
            "Callback deliveries by how they were answered (stored and duplicate: 200 after commit; \
             overloaded and unavailable: 503, Easemob retries once)",
            received,
        );
        let calls = registered(
            &mut registry,
            "calls",
            "Friend additions (op=add) and removals (op=remove) sent to Easemob, by recorded outcome \
             (unknown: interrupted by a stop)",
            Family::<CallLabels, Counter>::default(),
        );
        let easemob_attempts = registered(
            &mut registry,
            "easemob_attempts",
            "HTTP attempts those calls took, retries included, by op",
            Family::<Labels, Counter>::default(),
        );
        for op in [CallOp::Add, CallOp::Remove] {
            for outcome in [Outcome::Succeeded, Outcome::Rejected, Outcome::Failed, Outcome::Unknown] {
                calls.get_or_create_owned(&[("op", op.as_str()), ("outcome", outcome.as_str())]);
            }
            easemob_attempts.get_or_create_owned(&[("op", op.as_str())]);
        }
        let write_queue_depth = registered(
            &mut registry,
            "write_queue_depth",
            "Writes waiting for the writer at scrape time; callbacks get 503 when it reaches the capacity",
            Gauge::default(),
        );
        let write_queue_capacity = registered(
            &mut registry,
            "write_queue_capacity",
            "Size of the write queue (--write-queue)",
            Gauge::default(),
        );
        let chain_head_seq = registered(
            &mut registry,
            "chain_head_seq",
            "Sequence number of the last committed event (callbacks and call outcomes share one sequence)",
            Gauge::default(),
        );
        let quarantine_held = registered(
            &mut registry,
            "quarantine_held",
            "Requests held in quarantine, not stored as events yet (NaN: the database could not be read)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let database_bytes = registered(
            &mut registry,
            "database_bytes",
            "Size of the SQLite database file (file=\"database\") and of its write-ahead log (file=\"wal\")",
            Family::<Labels, Gauge>::default(),
        );
        let disk_free_bytes = registered(
            &mut registry,
            "disk_free_bytes",
            "Bytes the service may still write on the database's file system (what df shows as available); under \
             64 KiB every callback that needs a new page gets 503",
            Gauge::default(),
        );
        let easemob_app_token = registered(
            &mut registry,
            "easemob_app_token",
            "The Easemob app token's state, 1 for the current one (not_fetched: no trigger yet; valid; \
             refresh_failing: valid, but refreshing it failed, and triggers fail once it expires; failing: none, \
             the last fetch failed, triggers get 503 easemob_token_unavailable; dropped: expired or refused, the \
             next trigger fetches one). /readyz says why",
            Family::<Labels, Gauge>::default(),
        );
        let report_requests = Family::<Labels, Counter>::default();
        let reports = ReportAnswer::ALL.map(|a| report_requests.get_or_create_owned(&[("answer", a.as_str())]));
        registry.register(
            "report_requests",
            "GET /v1/reconciliation requests by answer (computed: a reconciliation was computed; reused: \
             a next page cut from the one kept; busy: 503, another report was running)",
            report_requests,
        );
        let feed_long_polls = registered(
            &mut registry,
            "feed_long_polls",
            "GET /v1/feed requests waiting for records (wait=...) right now",
            Gauge::default(),
        );
        let api_requests = registered(
            &mut registry,
            "api_requests",
            "Requests to the /v1 API by route, method and status code (499: the connection closed \
             before the answer, the client gone or cut off by a stop; the callback endpoint has callbacks_received; probes and \
             /metrics are not counted)",
            Family::<ApiLabels, Counter>::default(),
        );
        let api_seconds = registered(
            &mut registry,
            "api_request_seconds",
            "Time to answer a /v1 API request, by route (a trigger's includes Easemob's answers and the rate \
             limiter's waits; a feed long-poll's its wait)",
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(api_seconds_histogram),
        );
        registry.register("commit_writes", "Writes per commit (group commit)", writer.commit_writes.clone());
        registry.register(
            "commit_seconds",
            "Time to write and commit one group of writes, fsync included",
            writer.commit_seconds.clone(),
        );
        registry.register(
            "commit_failures",
            "Batches that could not be committed (each of their writes was answered 503)",
            writer.failed_commits.clone(),
        );
        registry.register(
            "readyz_write_probes",
            "Write probes committed: /readyz's (at most one a second however often it is called) and the one at \
             start-up (not counted in \
             commit_writes and commit_seconds)",
            writer.probe_commits.clone(),
        );
        registry.register(
            "checkpoint_lag_frames",
            "WAL frames (pages) the writer's last checkpoint could not copy into the database file (checked every \
             10 s while it writes); one that keeps growing means a reader holds an old snapshot",
            writer.checkpoint_lag_frames.clone(),
        );
        registry.register(
            "checkpoint_failures",
            "Checkpoints of the WAL that failed (a full disk, an I/O error), tried after a commit that succeeded; \
             a failing commit is counted in commit_failures",
            writer.checkpoint_failures.clone(),
        );
        Self {
            registry,
            callbacks,
            calls,
            easemob_attempts,
            write_queue_depth,
            write_queue_capacity,
            chain_head_seq,
            quarantine_held,
            database_bytes,
            disk_free_bytes,
            easemob_app_token,
            reports,
            feed_long_polls,
            api_requests,
            api_seconds,
            writer,
            reconciliation: None,
        }
    }

    /// Adds the `friendhook_reconciliation_*` figures (the service computes them per scrape when
    /// `--metrics-reconcile-window` is not 0). Without this they are absent rather than 0: a
    /// missing series does not claim that nothing is missing.
    pub fn with_reconciliation(mut self) -> Self {
        self.reconciliation = Some(ReconciliationMetrics::register(&mut self.registry));
        self
    }

    /// The handle to give the store's writer.
    pub fn writer(&self) -> WriterMetrics {
        self.writer.clone()
    }

    /// Counts a feed long-poll as waiting until the returned guard is dropped.
    pub fn feed_long_poll(&self) -> impl Drop + use<> {
        struct Waiting(Gauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.feed_long_polls.inc();
        Waiting(self.feed_long_polls.clone())
    }

    /// Counts one answered /v1 request; `route` is the matched route's template.
    pub fn api_request(&self, route: String, method: &axum::http::Method, status: u16, seconds: f64) {
        self.api_seconds.get_or_create(&[("route", route.clone())]).observe(seconds);
        self.api_requests
            .get_or_create(&[
                ("route", route),
                ("method", method_label(method).to_owned()),
                ("code", status.to_string()),
            ])
            .inc();
    }

    /// Counts one callback delivery.
    pub fn callback(&self, result: CallbackResult) {
        self.callbacks[result as usize].inc();
    }

    /// Deliveries answered with `result` since start.
    pub fn callbacks(&self, result: CallbackResult) -> u64 {
        self.callbacks[result as usize].get()
    }

    /// Counts one recorded call outcome and the HTTP attempts it took.
    pub fn call(&self, op: CallOp, outcome: Outcome, attempts: u64) {
        self.calls.get_or_create(&[("op", op.as_str()), ("outcome", outcome.as_str())]).inc();
        self.easemob_attempts.get_or_create(&[("op", op.as_str())]).inc_by(attempts);
    }

    /// Counts one `GET /v1/reconciliation` by how it was answered.
    pub fn report(&self, answer: ReportAnswer) {
        self.reports[answer as usize].inc();
    }

    /// Counts calls closed at start-up (interrupted by a previous stop): `unknown` if they had
    /// been sent, `failed` if not.
    pub fn calls_interrupted(&self, op: CallOp, outcome: Outcome, n: u64) {
        self.calls.get_or_create(&[("op", op.as_str()), ("outcome", outcome.as_str())]).inc_by(n);
    }

    /// The OpenMetrics text of every metric, with the values only a scrape can know.
    pub fn render(&self, now: ScrapeValues) -> String {
        self.write_queue_depth.set(now.queue_depth as i64);
        self.write_queue_capacity.set(now.queue_capacity as i64);
        self.chain_head_seq.set(now.head_seq);
        self.quarantine_held.set(now.quarantine_held.map_or(f64::NAN, |n| n as f64));
        if let Some((database, wal)) = now.file_sizes {
            self.database_bytes.get_or_create(&[("file", "database")]).set(database as i64);
            self.database_bytes.get_or_create(&[("file", "wal")]).set(wal as i64);
        }
        if let Some(free) = now.disk_free_bytes {
            self.disk_free_bytes.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        if let Some(current) = now.app_token_state {
            for state in crate::easemob::TokenHealth::STATES {
                self.easemob_app_token.get_or_create(&[("state", state)]).set(i64::from(state == current));
            }
        }
        if let (Some(m), Some(f)) = (&self.reconciliation, &now.reconciliation) {
            m.set(f);
        }
        let mut text = String::new();
        // Writing into a String cannot fail; an encoding error would be a bug in a label.
        if let Err(err) = encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "encoding metrics failed");
        }
        text
    }
}

/// Registers `metric` under `name` and returns it: the registry keeps one handle, the caller the
/// other (both share the same value).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The samples of an OpenMetrics (or Prometheus) text, `name{labels}` to value; comments and
/// lines that do not end in a number are skipped. For `friendhook bench` and the tests, which read
/// the service's `/metrics` from outside.
pub fn parse_samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Logs a recurring failure at most once per interval, with how often it happened meanwhile.
///
/// A full write queue or a failing disk fails every request: one log line per request would
/// bury everything else (and cost I/O when there is least of it to spare). The first occurrence is
/// reported at once; later ones are counted and reported together once `every_ms` has passed.
/// The clock is passed in, so the behaviour is tested without waiting.
#[derive(Debug)]
pub struct LogThrottle {
    every_ms: i64,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last_reported_ms: Option<i64>,
    unreported: u64,
}

impl LogThrottle {
    /// Reports at most once per `every_ms`.
    pub fn new(every_ms: i64) -> Self {
        Self { every_ms, state: Mutex::new(ThrottleState::default()) }
    }

    /// Records one occurrence at `now_ms`. `Some(n)` when it is time to log: `n` occurrences
    /// (this one included) since the last report.
    pub fn hit(&self, now_ms: i64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.unreported += 1;
        let due = s.last_reported_ms.is_none_or(|last| now_ms - last >= self.every_ms);
        if !due {
            return None;
        }
        s.last_reported_ms = Some(now_ms);
        Some(std::mem::take(&mut s.unreported))
    }

    /// Occurrences counted since the last report, and not reported: for a last line at a stop.
    pub fn take_unreported(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unreported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_once_then_summed_per_interval() {
        let throttle = LogThrottle::new(10_000);
        assert_eq!(throttle.hit(1_000), Some(1), "the first occurrence is reported at once");
        for t in 1_001..1_500 {
            assert_eq!(throttle.hit(t), None);
        }
        assert_eq!(throttle.hit(10_999), None, "one millisecond short of the interval");
        assert_eq!(throttle.hit(11_000), Some(501), "499 + 1 held back + this one");
        assert_eq!(throttle.hit(60_000), Some(1));
        assert_eq!(throttle.take_unreported(), 0, "the last one was reported");
        assert_eq!(throttle.hit(60_001), None);
        assert_eq!(throttle.hit(60_002), None);
        assert_eq!(throttle.take_unreported(), 2, "held back since the last line");
        assert_eq!(throttle.take_unreported(), 0, "taken once");
    }

    #[test]
    fn each_result_indexes_its_own_counter() {
        // `callback()` indexes the counters by discriminant; ALL must list them in that order.
        for (i, r) in CallbackResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn every_result_and_outcome_is_exported_from_the_start() {
        let metrics = Metrics::default();
        let text = metrics.render(ScrapeValues {
            queue_depth: 3,
            queue_capacity: 8192,
            head_seq: 42,
            quarantine_held: Some(7),
            file_sizes: Some((4096, 0)),
            disk_free_bytes: Some(1 << 40),
            app_token_state: Some("failing"),
            reconciliation: None,
        });
        for r in CallbackResult::ALL {
            let line = format!("friendhook_callbacks_received_total{{result=\"{}\"}} 0\n", r.as_str());
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        for op in ["add", "remove"] {
            for o in ["succeeded", "rejected", "failed", "unknown"] {
                let line = format!("friendhook_calls_total{{op=\"{op}\",outcome=\"{o}\"}} 0\n");
                assert!(text.contains(&line), "missing {line:?} in\n{text}");
            }
            let line = format!("friendhook_easemob_attempts_total{{op=\"{op}\"}} 0\n");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("friendhook_write_queue_depth 3\n"), "{text}");
        assert!(text.contains("friendhook_write_queue_capacity 8192\n"), "{text}");
        assert!(text.contains("friendhook_chain_head_seq 42\n"), "{text}");
        assert!(text.contains("friendhook_quarantine_held 7.0\n"), "{text}");
        assert!(text.contains("friendhook_database_bytes{file=\"database\"} 4096\n"), "{text}");
        assert!(text.contains("friendhook_disk_free_bytes 1099511627776\n"), "{text}");
        assert!(text.contains("friendhook_database_bytes{file=\"wal\"} 0\n"), "{text}");
        for state in crate::easemob::TokenHealth::STATES {
            let line = format!("friendhook_easemob_app_token{{state=\"{state}\"}} {}\n", i32::from(state == "failing"));
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        let unreadable = metrics.render(ScrapeValues { quarantine_held: None, ..ScrapeValues::default() });
        assert!(unreadable.contains("friendhook_quarantine_held NaN\n"), "{unreadable}");
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    }

    #[test]
    fn counts_land_on_their_own_series() {
        let metrics = Metrics::default();
        metrics.callback(CallbackResult::Stored);
        metrics.callback(CallbackResult::Stored);
        metrics.callback(CallbackResult::Overloaded);
        metrics.call(CallOp::Add, Outcome::Succeeded, 3);
        metrics.call(CallOp::Remove, Outcome::Rejected, 1);
        metrics.calls_interrupted(CallOp::Add, Outcome::Unknown, 2);
        metrics.calls_interrupted(CallOp::Remove, Outcome::Unknown, 1);
        metrics.calls_interrupted(CallOp::Remove, Outcome::Failed, 4);
        metrics.writer().commit_writes.observe(5.0);
        let text = metrics.render(ScrapeValues::default());
        assert_eq!(metrics.callbacks(CallbackResult::Stored), 2);
        assert!(text.contains("friendhook_callbacks_received_total{result=\"stored\"} 2\n"), "{text}");
        assert!(text.contains("friendhook_callbacks_received_total{result=\"overloaded\"} 1\n"), "{text}");
        assert!(text.contains("friendhook_callbacks_received_total{result=\"duplicate\"} 0\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"add\",outcome=\"succeeded\"} 1\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"remove\",outcome=\"rejected\"} 1\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"add\",outcome=\"unknown\"} 2\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"remove\",outcome=\"unknown\"} 1\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"remove\",outcome=\"failed\"} 4\n"), "{text}");
        assert!(text.contains("friendhook_calls_total{op=\"remove\",outcome=\"succeeded\"} 0\n"), "{text}");
        assert!(text.contains("friendhook_easemob_attempts_total{op=\"add\"} 3\n"), "{text}");
        assert!(text.contains("friendhook_easemob_attempts_total{op=\"remove\"} 1\n"), "{text}");
        assert!(text.contains("friendhook_commit_writes_count 1\n"), "{text}");
        assert!(text.contains("friendhook_commit_writes_sum 5.0\n"), "{text}");
        let samples = parse_samples(&text);
        assert_eq!(samples["friendhook_callbacks_received_total{result=\"stored\"}"], 2.0);
        assert_eq!(samples["friendhook_commit_writes_bucket{le=\"8.0\"}"], 1.0);
        assert!(!samples.keys().any(|k| k.starts_with('#')), "comments are not samples");
    }

    #[test]
    fn reconciliation_figures_land_on_their_status_and_are_nan_when_unreadable() {
        let metrics = Metrics::default().with_reconciliation();
        let mut summary = Summary {
            matched: 5,
            pending: 4,
            missing: 3,
            not_expected: 2,
            unexpected: 1,
            orphan: 6,
            ..Summary::default()
        };
        summary.match_latency_ms.p50 = Some(250);
        let figures = ReconciliationFigures {
            window_ms: 3_600_000,
            summary: Some(summary),
            took: std::time::Duration::from_millis(12),
        };
        let m =
            parse_samples(&metrics.render(ScrapeValues { reconciliation: Some(figures), ..ScrapeValues::default() }));
        let calls = |status: &str| m[&format!("friendhook_reconciliation_calls{{status=\"{status}\"}}")];
        assert_eq!(
            [calls("matched"), calls("pending"), calls("missing"), calls("not_expected"), calls("unexpected")],
            [5.0, 4.0, 3.0, 2.0, 1.0]
        );
        assert_eq!(m["friendhook_reconciliation_orphan_callbacks"], 6.0);
        assert_eq!(m["friendhook_reconciliation_window_seconds"], 3600.0);
        assert_eq!(m["friendhook_reconciliation_compute_seconds"], 0.012);
        assert_eq!(m["friendhook_reconciliation_latency_seconds{percentile=\"50\"}"], 0.25);
        assert!(m["friendhook_reconciliation_latency_seconds{percentile=\"95\"}"].is_nan(), "no figure, no zero");

        let unreadable = ReconciliationFigures { summary: None, ..figures };
        let m = parse_samples(
            &metrics.render(ScrapeValues { reconciliation: Some(unreadable), ..ScrapeValues::default() }),
        );
        for status in RECONCILIATION_STATUSES {
            assert!(m[&format!("friendhook_reconciliation_calls{{status=\"{status}\"}}")].is_nan(), "{status}");
        }
        assert!(m["friendhook_reconciliation_orphan_callbacks"].is_nan());
    }

    #[test]
    fn without_reconciliation_there_are_no_reconciliation_series() {
        let text = Metrics::default().render(ScrapeValues::default());
        assert!(!text.contains("friendhook_reconciliation"), "{text}");
    }
}
