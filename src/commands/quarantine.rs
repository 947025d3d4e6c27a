//! `friendhook quarantine list`, `reverify` and `purge`: inspect the requests that
//! `--on-bad-signature quarantine` kept aside, promote the ones that verify under the right
//! secret into ordinary events, and delete the ones that never will.
//!
//! Owns the operator's side of the quarantine: output formats, the summary, and the one rule that
//! is specific to re-verifying later (see [`reverify_one`]). It does not decide what "verifies"
//! means: that is [`crate::http::callbacks::verify_request`], the receive path's own function, so
//! a request is promoted exactly when it would have been stored had the secret been right on
//! arrival. SQL is in [`crate::store::quarantine`].
//!
//! All three are safe while the service runs on the same database: `list` only reads, and
//! `reverify` and `purge` write through their own writer, which (like the service's) takes SQLite's write lock
//! per transaction and re-reads the chain head when another process has committed.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{fmt_time, one_line};
use crate::callback::{self, ParseError};
use crate::http::callbacks::{Refusal, verify_request};
use crate::secret::Secret;
use crate::signature::{Scheme, Verifier};
use crate::store::quarantine::QuarantinedRequest;
use crate::store::{NewCallback, PromotionResult, PurgeFilter, Store, StoreOptions, chain};

/// `friendhook quarantine ...`.
#[derive(Debug, Args)]
pub struct QuarantineArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: QuarantineCommand,
}

/// Quarantine subcommands.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Show the requests held in quarantine: when and from where they came, why they failed, and
    /// the callId and timestamp in their body. Read-only; safe while the service runs.
    List(ListArgs),
    /// Re-check every held request against the given secret(s), exactly as the receive path
    /// would have on arrival, and promote those that verify into ordinary events (deduplicated
    /// against events already stored). Safe while the service runs on the same database. Exit 0
    /// when nothing is left held, 3 when some requests stay held (with --dry-run: would stay), 1
    /// on an error.
    Reverify(ReverifyArgs),
    /// Delete held requests that will never verify (junk posted by an unknown sender, requests
    /// signed with a secret that is lost), which otherwise stay, count against
    /// --quarantine-cap and keep `reverify` exiting 3. Only held requests: promoted ones stay,
    /// as the record of where their event came from. Give --older-than or --id (or both); try
    /// --dry-run first. Safe while the service runs on the same database.
    Purge(PurgeArgs),
}

/// Options of `friendhook quarantine list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The database to inspect (opened read-only).
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,

    /// Print JSON (`{"held": N, "items": [...]}`) instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Also show requests already promoted into events.
    #[arg(long)]
    pub all: bool,
}

/// Options of `friendhook quarantine reverify`.
#[derive(Debug, Args)]
pub struct ReverifyArgs {
    /// The database holding the quarantine; it must exist. May be in use by a running service.
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,

    /// Secret(s) to try, comma-separated; any of them may verify a request. Easemob scheme: the
    /// callback rule's secret from the Easemob console; standard-webhooks: `whsec_<base64>`.
    /// Read as `serve` reads it (spaces around items ignored, empty items dropped), so the
    /// service's value works here unchanged. Prefer the environment variable, which keeps the
    /// secret out of shell history and `ps`.
    #[arg(long, env = "FRIENDHOOK_CALLBACK_SECRET", value_delimiter = ',', required = true, hide_env_values = true,
          value_parser = crate::config::SECRET_ITEM)]
    pub callback_secret: Vec<Secret>,

    /// Signature scheme to check the held requests under.
    #[arg(long, env = "FRIENDHOOK_SIGNATURE_SCHEME", value_enum, default_value = "easemob")]
    pub signature_scheme: Scheme,

    /// standard-webhooks only: how far `webhook-timestamp` may be from the time the request
    /// ARRIVED (not from now: a request held for a day was still fresh when it came).
    #[arg(long, env = "FRIENDHOOK_TIMESTAMP_TOLERANCE", default_value = "5m", value_parser = crate::config::parse_duration)]
    pub timestamp_tolerance: Duration,

    /// Only report what would be promoted; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `friendhook quarantine purge`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["older_than", "ids"])))]
pub struct PurgeArgs {
    /// The database holding the quarantine; it must exist. May be in use by a running service.
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,

    /// Only requests that arrived longer ago than this (e.g. `30d`); `0s` for every held request.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub older_than: Option<Duration>,

    /// Only this held request (its id in `quarantine list`); repeat for several.
    #[arg(long = "id")]
    pub ids: Vec<i64>,

    /// Only requests held for this reason (the `reason` column of `quarantine list`).
    #[arg(long, value_parser = crate::signature::VerifyError::REASONS)]
    pub reason: Option<String>,

    /// Only report what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Exit code of `reverify` when requests stay held: not an error (the run did what it could),
/// but a script or a cron job must be able to tell it from "nothing left" (0) and from a failed
/// run (1; 2 is clap's for a usage error).
pub const STILL_HELD_EXIT: u8 = 3;

/// Runs the command; returns the process exit code (see [`STILL_HELD_EXIT`]).
pub async fn run(args: QuarantineArgs) -> anyhow::Result<u8> {
    match args.command {
        QuarantineCommand::List(args) => list(args).await.map(|()| 0),
        QuarantineCommand::Reverify(args) => reverify(args).await,
        QuarantineCommand::Purge(args) => purge(args).await.map(|()| 0),
    }
}

async fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    let now_ms = crate::clock::system().now_ms();
    let older_than_ms = args.older_than.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let ids_given = args.ids.iter().collect::<std::collections::HashSet<_>>().len();
    let filter = PurgeFilter {
        // `0s`: everything received up to now (received_at_ms < now + 1).
        received_before_ms: older_than_ms.map(|ms| now_ms.saturating_sub(ms).saturating_add(1)),
        ids: args.ids,
        reason: args.reason,
    };
    // Read-only first: it refuses a database that does not exist, where `Store::open` would
    // silently create an empty one.
    let reader = Store::open_read_only(&args.database_url).await?;
    let purged = if args.dry_run {
        reader.preview_quarantine_purge(&filter).await?
    } else {
        let mut opts = StoreOptions::new(args.database_url.clone());
        // As for reverify: the service's calls are its own business.
        opts.recover_interrupted_calls = false;
        let writer = Store::open(opts, crate::clock::system()).await?;
        let purged = writer.purge_quarantine(filter).await;
        writer.close().await;
        purged?
    };
    let held = reader.count_quarantine_held().await?;
    reader.close().await;
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    crate::outln!(
        "{verb} {} held request(s), {} bytes of bodies; {held} held now. Promoted requests are kept.",
        purged.requests,
        purged.body_bytes
    );
    if !args.dry_run && purged.requests > 0 {
        crate::outln!("SQLite reuses the freed space for new rows; the file itself keeps its size.");
    }
    // An id that matched nothing is worth saying: a mistyped id reads as done otherwise.
    if ids_given > 0 && (purged.requests as usize) < ids_given {
        crate::console::warn(format_args!(
            "{} of the {ids_given} --id given matched no held request (not in the quarantine, already promoted or \
             purged, or left out by the other filters); `friendhook quarantine list` shows the held ones",
            ids_given - purged.requests as usize
        ));
    }
    Ok(())
}

/// Rows read per page: bodies are up to `--max-body-bytes` each, so the quarantine is never loaded
/// whole.
const PAGE: i64 = 200;

// ---------------------------------------------------------------------------------------------
// list

/// One held (or promoted) request as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListItem {
    /// Quarantine row id.
    pub id: i64,
    /// Arrival time, RFC 3339.
    pub received_at: String,
    /// Arrival time, epoch ms.
    pub received_at_ms: i64,
    /// Peer address.
    pub remote_addr: Option<String>,
    /// Why verification failed on arrival.
    pub reason: String,
    /// Body size in bytes.
    pub body_size: usize,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// `callId`, if the body parses as a callback.
    pub call_id: Option<String>,
    /// `timestamp` (epoch ms), if the body parses as a callback.
    pub timestamp: Option<i64>,
    /// Promoted into an event.
    pub promoted: bool,
    /// The event's seq, once promoted.
    pub promoted_seq: Option<i64>,
    /// When it was promoted, RFC 3339.
    pub promoted_at: Option<String>,
    /// When it was promoted, epoch ms (as `received_at_ms` beside `received_at`; the API and
    /// `reconcile --json` give `promoted_at` in these).
    pub promoted_at_ms: Option<i64>,
}

impl ListItem {
    /// Describes a stored row; the body is parsed leniently (no `security` required) and only
    /// for display: it is still unverified.
    pub fn from_request(r: &QuarantinedRequest) -> Self {
        let parsed = callback::parse(&r.raw_body).ok();
        Self {
            id: r.id,
            received_at: fmt_time(r.received_at_ms),
            received_at_ms: r.received_at_ms,
            remote_addr: r.remote_addr.clone(),
            reason: r.reason.clone(),
            body_size: r.raw_body.len(),
            body_sha256: r.body_sha256.clone(),
            call_id: parsed.as_ref().map(|p| p.call_id.clone()),
            timestamp: parsed.as_ref().map(|p| p.timestamp_ms),
            promoted: !r.is_held(),
            promoted_seq: r.promoted_seq,
            promoted_at: r.promoted_at_ms.map(fmt_time),
            promoted_at_ms: r.promoted_at_ms,
        }
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let store = Store::open_read_only(&args.database_url).await?;
    let mut items = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list_quarantine(after, PAGE, args.all).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        items.extend(page.iter().map(ListItem::from_request));
    }
    let held = items.iter().filter(|i| !i.promoted).count();
    if args.json {
        crate::outln!("{}", serde_json::json!({"held": held, "items": items}));
    } else {
        crate::out!("{}", render_table(&items));
        crate::outln!("{}", next_step(held, &args.database_url));
    }
    Ok(())
}

/// The table `list` prints (one header line, one line per item).
pub fn render_table(items: &[ListItem]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if items.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<24}  {:<21}  {:<26}  {:>6}  {:<12}  {:<24}  {:<40}  PROMOTED",
        "ID", "RECEIVED", "REMOTE", "REASON", "SIZE", "SHA256", "TIMESTAMP", "CALL_ID"
    );
    for i in items {
        let promoted = match (i.promoted, i.promoted_seq) {
            (false, _) => "no".to_string(),
            (true, Some(seq)) => format!("seq {seq}"),
            (true, None) => "yes".to_string(),
        };
        let _ = writeln!(
            out,
            "{:>6}  {:<24}  {:<21}  {:<26}  {:>6}  {:<12}  {:<24}  {:<40}  {}",
            i.id,
            i.received_at,
            i.remote_addr.as_deref().unwrap_or("-"),
            i.reason,
            i.body_size,
            i.body_sha256.get(..12).unwrap_or(&i.body_sha256),
            i.timestamp.map(fmt_time).unwrap_or_else(|| "-".into()),
            // A callId is attacker-chosen text until verified: keep it on one line.
            i.call_id.as_deref().map(one_line).unwrap_or_else(|| "(body does not parse)".into()),
            promoted
        );
    }
    out
}

/// What the operator should do next, given how many requests are held.
pub fn next_step(held: usize, database_url: &str) -> String {
    if held == 0 {
        return "Nothing held in quarantine.".into();
    }
    format!(
        "{held} request(s) held: they failed signature verification and are NOT stored as events.\n\
         Usually the callback secret is wrong (e.g. after a rotation). Once you know the right one, run\n  \
         FRIENDHOOK_CALLBACK_SECRET='<secret>' friendhook quarantine reverify --database-url {database_url}\n\
         (in the variable, not as --callback-secret, which `ps` shows; add --signature-scheme standard-webhooks\n\
         if that is your scheme, --dry-run to try a secret without writing),\n\
         and fix the service's --callback-secret too, or new callbacks keep landing here."
    )
}

// ---------------------------------------------------------------------------------------------
// reverify

/// Re-checks one held request and, if it verifies, returns the event to store, exactly as the
/// receive path would have built it on arrival: arrival time, peer address, exact body, and the
/// index of the verifying secret among the `--callback-secret` values given to `reverify`.
///
/// "Now" for the standard-webhooks timestamp tolerance is the request's arrival time, not the
/// time of the re-check: the question is whether the request was valid when it came, and by the
/// time someone fixes the secret every held request would be "too old" otherwise. Replay stays
/// bounded: only requests that actually arrived (and were kept) can be promoted, once each, and
/// the dedup key stops the same event being stored twice.
pub fn reverify_one(verifier: &Verifier, req: &QuarantinedRequest) -> Result<NewCallback, Refusal> {
    let headers = headers_from_json(&req.headers_json);
    let (event, secret_index) = verify_request(verifier, &headers, &req.raw_body, req.received_at_ms)?;
    // It parsed as JSON, so it is UTF-8; refuse rather than panic if that ever changes.
    let raw_body = String::from_utf8(req.raw_body.clone())
        .map_err(|_| Refusal::Unparseable(ParseError::NotJson("invalid UTF-8".into())))?;
    Ok(NewCallback {
        event,
        body_sha256: chain::sha256_hex(raw_body.as_bytes()),
        raw_body,
        received_at_ms: req.received_at_ms,
        remote_addr: req.remote_addr.clone(),
        scheme: verifier.scheme().as_str(),
        secret_index: secret_index as i64,
    })
}

/// Rebuilds the headers the receive path kept (a JSON object of strings). Anything else (not an
/// object, a non-string value, a name or value that is not a valid header) is left out: the
/// verifier then reports the header missing, which keeps the request held.
pub fn headers_from_json(text: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) else {
        return headers;
    };
    for (name, value) in map {
        let (Ok(name), Some(Ok(value))) =
            (HeaderName::from_bytes(name.as_bytes()), value.as_str().map(HeaderValue::from_str))
        else {
            continue;
        };
        headers.insert(name, value);
    }
    headers
}

/// What `reverify` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReverifySummary {
    /// Held requests examined.
    pub checked: u64,
    /// Promoted into events (or, with --dry-run, would be).
    pub promoted: u64,
    /// Of those, events that were already stored (counted as one more delivery).
    pub duplicates: u64,
    /// Still held: the signature still does not verify.
    pub still_held: u64,
    /// Still held: the signature verifies but the body is not a callback friendhook can read.
    pub unreadable: u64,
    /// Still held: the body no longer matches the digest taken on arrival (edited in the file).
    pub altered: u64,
    /// Promoted meanwhile by another run; skipped.
    pub taken_by_another_run: u64,
}

impl ReverifySummary {
    /// Requests left held (or, with --dry-run, that would be).
    pub fn held(&self) -> u64 {
        self.still_held + self.unreadable + self.altered
    }

    /// The summary lines, with what to do next.
    pub fn render(&self, dry_run: bool) -> String {
        let held = self.held();
        let verb = if dry_run { "would promote" } else { "promoted" };
        let mut out = format!(
            "checked {}, {verb} {} (of which {} were duplicates of events already stored), still held {held}",
            self.checked, self.promoted, self.duplicates
        );
        if self.taken_by_another_run > 0 {
            out.push_str(&format!(", {} promoted meanwhile by another run", self.taken_by_another_run));
        }
        out.push('\n');
        if self.still_held > 0 {
            out.push_str(&format!(
                "{} request(s) still fail verification with the given secret(s): check the callback rule's secret in \
                 the Easemob console and --signature-scheme; `friendhook quarantine list` shows them.\n",
                self.still_held
            ));
        }
        if self.unreadable > 0 {
            out.push_str(&format!(
                "{} request(s) verify but their body is not a callback friendhook can read (the receive path would \
                 answer 400); they stay held for inspection.\n",
                self.unreadable
            ));
        }
        if self.altered > 0 {
            out.push_str(&format!(
                "{} request(s) no longer match the SHA-256 taken when they arrived: the quarantine was edited in the \
                 database file. They are not promoted; investigate who had write access.\n",
                self.altered
            ));
        }
        if self.promoted > 0 && dry_run {
            out.push_str("Dry run: nothing was written. Run again without --dry-run to promote.\n");
        } else if self.promoted > 0 {
            out.push_str(
                "Make sure the service now runs with this secret in --callback-secret (FRIENDHOOK_CALLBACK_SECRET), \
                 or new callbacks keep landing in quarantine.\n",
            );
        }
        out
    }
}

async fn reverify(args: ReverifyArgs) -> anyhow::Result<u8> {
    let tolerance = i64::try_from(args.timestamp_tolerance.as_secs()).unwrap_or(i64::MAX);
    let verifier =
        Verifier::new(args.signature_scheme, crate::config::callback_secrets(&args.callback_secret), tolerance)
            .map_err(|e| anyhow::anyhow!("--callback-secret: {e}"))?;
    // Read-only first: it refuses a database that does not exist, where `Store::open` would
    // silently create an empty one and report nothing to do.
    let reader = Store::open_read_only(&args.database_url).await?;
    let writer = if args.dry_run {
        None
    } else {
        let mut opts = StoreOptions::new(args.database_url.clone());
        // The service may be running: closing its calls without an outcome as `unknown` is its
        // own start-up job, not ours.
        opts.recover_interrupted_calls = false;
        Some(Store::open(opts, crate::clock::system()).await?)
    };

    let mut summary = ReverifySummary::default();
    let mut would_store = std::collections::HashSet::new();
    let mut after = 0;
    let outcome = async {
        loop {
            let page = reader.list_quarantine(after, PAGE, false).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let mut promotable = Vec::new();
            for req in &page {
                summary.checked += 1;
                // The quarantine is not chained: the digest taken on arrival is what shows that
                // the body (or, for standard-webhooks, what its tolerance is judged against) is
                // still the one that came.
                if chain::sha256_hex(&req.raw_body) != req.body_sha256 {
                    summary.altered += 1;
                    crate::outln!(
                        "#{}: the body does not match its digest from arrival (edited?); left in quarantine",
                        req.id
                    );
                    continue;
                }
                match reverify_one(&verifier, req) {
                    Ok(cb) => promotable.push((req.id, cb)),
                    Err(Refusal::BadSignature(_)) => summary.still_held += 1,
                    Err(Refusal::Unparseable(e)) => {
                        summary.unreadable += 1;
                        crate::outln!(
                            "#{}: verifies, but the body is not a readable callback ({e}); left in quarantine",
                            req.id
                        );
                    }
                }
            }
            let Some(writer) = &writer else {
                for (id, cb) in &promotable {
                    summary.promoted += 1;
                    // A duplicate of an event stored, or of one this dry run would promote first.
                    let key = cb.event.dedup_key.as_str();
                    let duplicate = match reader.seq_of_dedup_key(key).await? {
                        Some(seq) => format!(" as one more delivery of event seq {seq}"),
                        None if !would_store.insert(key.to_owned()) => {
                            " as one more delivery of an event promoted above".into()
                        }
                        None => String::new(),
                    };
                    if !duplicate.is_empty() {
                        summary.duplicates += 1;
                    }
                    crate::outln!(
                        "#{id}: verifies (callId {}); would be promoted{duplicate}",
                        one_line(&cb.event.call_id)
                    );
                }
                continue;
            };
            // Submitted together, so the group-commit writer stores a page in a few transactions
            // instead of one fsync per request.
            let results = futures_util::future::join_all(
                promotable
                    .into_iter()
                    .map(|(id, cb)| async move { (id, writer.mark_quarantine_promoted(id, cb).await) }),
            )
            .await;
            // Every result of the page is reported before an error ends the run: the promotions
            // that did commit must be printed and counted.
            let mut first_error = None;
            for (id, result) in results {
                let promoted = match result {
                    Ok(promoted) => promoted,
                    Err(e) => {
                        crate::outln!("#{id}: could not be promoted: {e}");
                        first_error.get_or_insert(e);
                        continue;
                    }
                };
                match promoted {
                    PromotionResult::Promoted(ack) => {
                        summary.promoted += 1;
                        if ack.duplicate {
                            summary.duplicates += 1;
                            crate::outln!(
                                "#{id}: promoted; event seq {} was already stored (one more delivery)",
                                ack.seq
                            );
                        } else {
                            crate::outln!("#{id}: promoted as event seq {}", ack.seq);
                        }
                    }
                    PromotionResult::AlreadyPromoted => summary.taken_by_another_run += 1,
                }
            }
            if let Some(e) = first_error {
                return Err(e.into());
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(writer) = writer {
        // Waits for the writer to finish and close cleanly, also when a page failed.
        writer.close().await;
    }
    outcome.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}. Requests promoted before this error stay promoted; re-running reverify is safe (promoted ones \
             are skipped, events are deduplicated)"
        )
    })?;
    crate::out!("{}", summary.render(args.dry_run));
    Ok(if summary.held() > 0 { STILL_HELD_EXIT } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn easemob_body(secret: &str) -> Vec<u8> {
        let call_id = "demo-org#demo-app_1";
        let security = crate::signature::easemob::sign(call_id, secret, "1700000000000");
        format!(r#"{{"callId":"{call_id}","security":"{security}","timestamp":1700000000000,"to":"bob","payload":{{"operation":"add"}}}}"#)
            .into_bytes()
    }

    fn held(body: Vec<u8>, headers_json: &str, received_at_ms: i64) -> QuarantinedRequest {
        QuarantinedRequest {
            id: 1,
            received_at_ms,
            remote_addr: Some("10.0.0.1:5000".into()),
            reason: "signature_mismatch".into(),
            headers_json: headers_json.into(),
            body_sha256: chain::sha256_hex(&body),
            raw_body: body,
            promoted_seq: None,
            promoted_at_ms: None,
        }
    }

    fn verifier(scheme: Scheme, secrets: &[&str]) -> Verifier {
        Verifier::new(scheme, secrets.iter().map(|s| Secret::new(*s)).collect(), 300).expect("valid verifier")
    }

    #[test]
    fn easemob_request_verifies_only_with_its_secret_and_keeps_arrival_facts() {
        let req = held(easemob_body("right"), "{}", 1_700_000_000_500);
        assert!(matches!(reverify_one(&verifier(Scheme::Easemob, &["wrong"]), &req), Err(Refusal::BadSignature(_))));
        let cb = reverify_one(&verifier(Scheme::Easemob, &["wrong", "right"]), &req).expect("verifies");
        assert_eq!(cb.secret_index, 1);
        assert_eq!(cb.received_at_ms, 1_700_000_000_500);
        assert_eq!(cb.remote_addr.as_deref(), Some("10.0.0.1:5000"));
        assert_eq!(cb.raw_body.as_bytes(), req.raw_body.as_slice());
        assert_eq!(cb.scheme, "easemob");
    }

    #[test]
    fn standard_webhooks_tolerance_is_measured_from_arrival_not_from_now() {
        let key = crate::signature::standard_webhooks::parse_secret(WHSEC).expect("key");
        let body = br#"{"callId":"c1","timestamp":1614265330000}"#.to_vec();
        let ts = 1_614_265_330; // 2021: years before this test runs
        let sig = crate::signature::standard_webhooks::sign("msg_1", ts, &body, &key);
        let headers =
            serde_json::json!({"webhook-id": "msg_1", "webhook-timestamp": ts.to_string(), "webhook-signature": sig});
        let arrived_on_time = held(body.clone(), &headers.to_string(), ts * 1000 + 2_000);
        let cb = reverify_one(&verifier(Scheme::StandardWebhooks, &[WHSEC]), &arrived_on_time).expect("verifies");
        assert_eq!(cb.event.call_id, "c1");
        // The same request, had it arrived an hour late, was never valid.
        let arrived_late = held(body, &headers.to_string(), (ts + 3600) * 1000);
        assert!(matches!(
            reverify_one(&verifier(Scheme::StandardWebhooks, &[WHSEC]), &arrived_late),
            Err(Refusal::BadSignature(crate::signature::VerifyError::TimestampOutOfTolerance))
        ));
    }

    #[test]
    fn a_body_that_verifies_but_does_not_parse_is_unreadable() {
        let key = crate::signature::standard_webhooks::parse_secret(WHSEC).expect("key");
        let body = b"not json".to_vec();
        let sig = crate::signature::standard_webhooks::sign("m", 100, &body, &key);
        let headers = serde_json::json!({"webhook-id": "m", "webhook-timestamp": "100", "webhook-signature": sig});
        let req = held(body, &headers.to_string(), 100_000);
        assert!(matches!(
            reverify_one(&verifier(Scheme::StandardWebhooks, &[WHSEC]), &req),
            Err(Refusal::Unparseable(_))
        ));
    }

    #[test]
    fn headers_from_json_skips_what_is_not_a_header() {
        let h = headers_from_json(r#"{"webhook-id":"a","bad name":"x","webhook-timestamp":5,"x":"line\nbreak"}"#);
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("webhook-id").and_then(|v| v.to_str().ok()), Some("a"));
        assert!(headers_from_json("[1]").is_empty());
        assert!(headers_from_json("not json").is_empty());
    }

    #[test]
    fn list_item_reads_call_id_and_timestamp_when_the_body_parses() {
        let item = ListItem::from_request(&held(easemob_body("x"), "{}", 0));
        assert_eq!(item.call_id.as_deref(), Some("demo-org#demo-app_1"));
        assert_eq!(item.timestamp, Some(1_700_000_000_000));
        assert_eq!(item.received_at, "1970-01-01T00:00:00.000Z");
        let unparsed = ListItem::from_request(&held(b"\xff".to_vec(), "{}", 0));
        assert_eq!((unparsed.call_id.as_deref(), unparsed.timestamp), (None, None));
        assert!(render_table(&[unparsed]).contains("(body does not parse)"));
    }

    #[test]
    fn fmt_time_never_panics() {
        assert_eq!(fmt_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(fmt_time(-1), "-1");
        assert_eq!(fmt_time(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn summary_says_what_to_do_next() {
        let s = ReverifySummary { checked: 3, promoted: 1, duplicates: 1, still_held: 2, ..Default::default() };
        let text = s.render(false);
        assert!(
            text.starts_with(
                "checked 3, promoted 1 (of which 1 were duplicates of events already stored), still held 2"
            ),
            "{text}"
        );
        assert!(text.contains("Easemob console") && text.contains("--callback-secret"), "{text}");
        // The secret in the variable, as the README has it: a flag shows in `ps`.
        assert!(next_step(2, "sqlite://x.db").contains(
            "FRIENDHOOK_CALLBACK_SECRET='<secret>' friendhook quarantine reverify --database-url sqlite://x.db"
        ));
    }
}
