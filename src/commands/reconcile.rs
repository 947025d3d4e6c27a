//! `friendhook reconcile`: print the reconciliation summary and the items that need attention
//! (missing, unexpected, orphan) as a table, or everything as JSON. Reads the database directly
//! (read-only) or asks a running service.

use anyhow::Context;
use clap::Args;

use super::{fmt_time, one_line};
use crate::clock::{self, Clock};
use crate::config::parse_duration;
use crate::http::query::parse_flag_range;
use crate::reconcile::MatchParams;
use crate::report::{self, ReportQuery};
use crate::store::Store;
use serde_json::Value;
use unicode_width::UnicodeWidthStr;

/// `friendhook reconcile` options.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The database to read (opened read-only). Ignored with --url.
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,
    /// Ask a running service instead (e.g. http://127.0.0.1:8080). The service computes one
    /// report at a time; while it is busy with another, this waits and asks again.
    #[arg(long, value_parser = parse_service_url)]
    pub url: Option<String>,
    /// The service's API token, sent with --url as `Authorization: Bearer`; with several
    /// (comma-separated, as `serve` takes them during a rotation) the first is sent.
    #[arg(long, env = "FRIENDHOOK_API_TOKEN", value_delimiter = ',', hide_env_values = true,
          value_parser = crate::config::SECRET_ITEM)]
    pub api_token: Vec<crate::secret::Secret>,
    /// Calls requested (and orphans timestamped) at or after this: epoch ms, RFC 3339, or a
    /// duration back from now (`1h`: an hour ago; printed as the time it stands for, so that the
    /// report can be asked for again).
    #[arg(long)]
    pub since: Option<String>,
    /// ... and before this (the same forms).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this status. Default: missing, unexpected and orphan in the table; every status with
    /// --json.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::report::STATUSES))]
    pub status: Option<String>,
    /// Only calls of this owner (orphans: either side). A call is filtered as it was recorded: a
    /// pair sent both ways in one batch is one call, in the direction given first, so to ask
    /// about two users give them both ways (--owner A --friend B, then --owner B --friend A).
    #[arg(long)]
    pub owner: Option<String>,
    /// Only calls with this friend (orphans: either side).
    #[arg(long)]
    pub friend: Option<String>,
    /// Only this call (the `id` POST /v1/friends answered): its verdict whatever it is, and the
    /// callback it was matched with. Without --since/--until it is judged over the call's own
    /// time, beside everything that competes for its callbacks, instead of over all history.
    #[arg(long)]
    pub call_id: Option<i64>,
    /// Judge as of this point: the `as_of` an earlier report printed (or had in its JSON), to get
    /// that report again. Default: now.
    #[arg(long)]
    pub as_of: Option<String>,
    /// Print JSON (the same document as GET /v1/reconciliation, all pages merged).
    #[arg(long)]
    pub json: bool,
    /// Exit with status 3 when the report counts any of these statuses (comma-separated), after
    /// printing it: for a cron job or a CI step to alert on. Without it the exit is 0 whatever
    /// the report holds (1 when no report could be made, 2 when the command line is wrong).
    #[arg(long, value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(crate::report::STATUSES))]
    pub fail_on: Vec<String>,
    /// Matching skew, with --database-url [default: 5s; with --url the service's own applies].
    #[arg(long, env = "FRIENDHOOK_MATCH_SKEW", value_parser = parse_duration)]
    pub match_skew: Option<std::time::Duration>,
    /// Matching window, with --database-url [default: 5m; with --url the service's own applies].
    #[arg(long, env = "FRIENDHOOK_MATCH_WINDOW", value_parser = parse_duration)]
    pub match_window: Option<std::time::Duration>,
}

/// `--url`: an http(s) URL with a host, so that a typo is named as one rather than reported as a
/// service that cannot be reached.
fn parse_service_url(text: &str) -> Result<String, String> {
    crate::config::http_url(text).map_err(|e| format!("{e}; give the service's base URL, e.g. http://127.0.0.1:8080"))
}

/// The exit status of a report that counts a status named by `--fail-on`.
pub const EXIT_ATTENTION: u8 = 3;

/// `--match-skew` when not given (as `serve`'s default).
const DEFAULT_SKEW: std::time::Duration = std::time::Duration::from_secs(5);
/// `--match-window` when not given (as `serve`'s default).
const DEFAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Where the report comes from: a running service, or the database file.
enum Source {
    Service(String),
    /// The store, and the reconciliation once computed: the statuses asked for one after the
    /// other are pages of one report, so it is computed once.
    Database(Store, Option<Box<report::Computed>>),
}

impl Source {
    /// The whole report (all pages merged) for one status, judged as of `as_of` (an `as_of` token
    /// of an earlier report) or of now.
    async fn report(
        &mut self,
        args: &ReconcileArgs,
        status: Option<&str>,
        as_of: Option<&str>,
    ) -> anyhow::Result<Value> {
        match self {
            Source::Service(base) => fetch_all_pages(base, args, status, as_of).await,
            Source::Database(store, computed) => {
                let (since_ms, until_ms) = parse_flag_range(args.since.as_deref(), args.until.as_deref())
                    .map_err(|e| super::UsageError(e.to_string()))?;
                let mut query = ReportQuery {
                    since_ms,
                    until_ms,
                    status: status.map(str::to_string),
                    owner: args.owner.clone(),
                    friend: args.friend.clone(),
                    call_id: args.call_id,
                    limit: usize::MAX / 2,
                    after: None,
                    as_of: None,
                };
                if let Some(token) = as_of {
                    query.as_of = Some(as_of_in(store, token).await?);
                }
                let id = args.call_id.unwrap_or_default();
                match report::narrow_to_call(store, &mut query).await? {
                    report::OneCall::Judged => {}
                    report::OneCall::NotRecorded => anyhow::bail!(
                        "no call with id {id} in {}; `friendhook export` lists the calls recorded",
                        args.database_url
                    ),
                    report::OneCall::AfterAsOf => {
                        anyhow::bail!(
                            "call {id} was recorded after --as-of, so that report cannot hold it; ask without --as-of"
                        )
                    }
                }
                let computed = match computed {
                    Some(computed) => computed,
                    None => {
                        let params = MatchParams {
                            skew_ms: args.match_skew.unwrap_or(DEFAULT_SKEW).as_millis() as i64,
                            window_ms: args.match_window.unwrap_or(DEFAULT_WINDOW).as_millis() as i64,
                            now_ms: clock::SystemClock.now_ms(),
                        };
                        // `--as-of` (or the first status's point) was read and checked above.
                        let as_of = match query.as_of {
                            Some(as_of) => as_of,
                            None => report::AsOf::now(store, params.now_ms).await?,
                        };
                        let basis = report::ReportBasis::new(as_of, &query, params);
                        computed.insert(Box::new(report::compute(store, basis).await?))
                    }
                };
                let mut page = report::page(computed, &query);
                report::attach_outcome_details(store, &mut page, computed.basis.as_of.point).await?;
                Ok(serde_json::to_value(page)?)
            }
        }
    }
}

/// Adds `part`'s items to `doc`'s (or makes `part` the document, with its summary and `as_of`,
/// if there is none yet): pages of one report, or reports of one `as_of` for several statuses.
fn append_items(doc: &mut Option<Value>, part: Value) {
    match doc {
        None => *doc = Some(part),
        Some(d) => {
            let more = part["items"].as_array().cloned().unwrap_or_default();
            if let Some(items) = d["items"].as_array_mut() {
                items.extend(more);
            }
        }
    }
}

/// Every page of the service's report for one status.
async fn fetch_all_pages(
    base: &str,
    args: &ReconcileArgs,
    status: Option<&str>,
    as_of: Option<&str>,
) -> anyhow::Result<Value> {
    let mut cursor: Option<String> = None;
    let mut doc: Option<Value> = None;
    loop {
        let mut q: Vec<(&str, String)> = vec![("limit", "1000".into())];
        for (k, v) in [("since", &args.since), ("until", &args.until), ("owner", &args.owner), ("friend", &args.friend)]
        {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        if let Some(s) = status {
            q.push(("status", s.to_string()));
        }
        if let Some(id) = args.call_id {
            q.push(("call_id", id.to_string()));
        }
        match (&cursor, as_of) {
            (Some(c), _) => q.push(("cursor", c.clone())),
            (None, Some(a)) => q.push(("as_of", a.to_string())),
            (None, None) => {}
        }
        let token = args.api_token.iter().find(|t| !t.expose().is_empty());
        let page = fetch_page(&format!("{}/v1/reconciliation", base.trim_end_matches('/')), &q, token).await?;
        cursor = page["next_cursor"].as_str().map(str::to_string);
        append_items(&mut doc, page);
        if cursor.is_none() {
            break;
        }
    }
    doc.ok_or_else(|| anyhow::anyhow!("no report"))
}

/// The point `token` names, if this database has reached it.
async fn as_of_in(store: &Store, token: &str) -> anyhow::Result<report::AsOf> {
    let as_of = report::AsOf::parse(token).ok_or_else(|| {
        super::UsageError(format!("--as-of `{token}` is not an `as_of` of a report (<seq>.<last call id>.<epoch ms>)"))
    })?;
    let facts = store.point_facts(as_of.point).await?;
    as_of
        .check(&facts, crate::clock::system().now_ms())
        .map_err(|problem| anyhow::anyhow!("--as-of `{token}` {problem}; is it the right database?"))?;
    Ok(as_of)
}

/// Most times one page is asked for again while the service is busy with another report.
const BUSY_RETRIES: u32 = 10;

/// One page of the service's report. The service computes one report at a time and answers 503
/// `reconciliation_busy` (with `Retry-After`) to a report that could not start in time; that is
/// worth waiting for, so the page is asked for again, up to [`BUSY_RETRIES`] times.
async fn fetch_page(
    url: &str,
    query: &[(&str, String)],
    token: Option<&crate::secret::Secret>,
) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let mut retries = 0;
    loop {
        let mut request = client.get(url).query(query);
        if let Some(token) = token {
            request = request.bearer_auth(token.expose());
        }
        let resp = request
            .send()
            .await
            .with_context(|| format!("cannot reach {url}; is `friendhook serve` running there?"))?;
        if resp.status().is_success() {
            let what = format!(
                "{url} answered {} with something other than a reconciliation report; is --url a friendhook \
                 service (its base URL, e.g. http://127.0.0.1:8080)?",
                resp.status()
            );
            let page: Value = resp.json().await.with_context(|| what.clone())?;
            anyhow::ensure!(page.is_object(), what);
            return Ok(page);
        }
        let status = resp.status();
        let wait = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|s| s.clamp(1, 30));
        let body = resp.text().await.unwrap_or_default();
        let busy = serde_json::from_str::<Value>(&body).is_ok_and(|b| b["code"] == "reconciliation_busy");
        match wait {
            Some(secs) if busy && retries < BUSY_RETRIES => {
                retries += 1;
                crate::console::note(format_args!(
                    "the service is computing another reconciliation report; asking again in {secs} s \
                     ({retries}/{BUSY_RETRIES})"
                ));
                tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
            }
            _ if status == reqwest::StatusCode::UNAUTHORIZED => anyhow::bail!(
                "the service answered {status}: {body}; give its API token with --api-token (or FRIENDHOOK_API_TOKEN)"
            ),
            // The service checks the flags this command passes on as the query: its 400 is theirs.
            _ if status == reqwest::StatusCode::BAD_REQUEST => {
                return Err(super::UsageError(format!("the service answered {status}: {body}")).into());
            }
            _ => anyhow::bail!("the service answered {status}: {body}"),
        }
    }
}

/// Runs the command; the exit status is 0, or [`EXIT_ATTENTION`] as `--fail-on` asks.
pub async fn run(mut args: ReconcileArgs) -> anyhow::Result<u8> {
    // Durations back from now become the times they stand for, once, before any report is
    // asked for: every status's report then has the same window, and it can be given again.
    let now_ms = clock::SystemClock.now_ms();
    super::resolve_relative_times(now_ms, [("--since", &mut args.since), ("--until", &mut args.until)]);
    let statuses: Vec<Option<&str>> = match args.status.as_deref() {
        Some(s) => vec![Some(s)],
        // One call's verdict is asked for whatever it is.
        None if args.json || args.call_id.is_some() => vec![None],
        None => vec![Some("missing"), Some("unexpected"), Some("orphan")],
    };
    let mut merged: Option<Value> = None;
    // One report per status; the first one's point holds for the others, so that together they
    // are one report.
    let mut as_of: Option<String> = args.as_of.clone();
    let mut source = match &args.url {
        Some(base) => Source::Service(base.clone()),
        None => Source::Database(Store::open_read_only(&args.database_url).await?, None),
    };
    for status in statuses {
        let r = source.report(&args, status, as_of.as_deref()).await?;
        if as_of.is_none() {
            as_of = r["as_of"].as_str().map(str::to_string);
        }
        append_items(&mut merged, r);
    }
    let mut report = merged.ok_or_else(|| anyhow::anyhow!("no report"))?;
    report["next_cursor"] = Value::Null;
    // A service judges with its own matching; the flags only apply to a database read here. Said
    // only of a flag given (or set in the environment): a cron job's mail is not for noise.
    if args.url.is_some() {
        let given = [
            ("match_skew_ms", "--match-skew", args.match_skew),
            ("match_window_ms", "--match-window", args.match_window),
        ];
        for (key, flag, value) in given {
            let Some(value) = value else { continue };
            let served = report[key].as_i64();
            if served.is_some_and(|ms| ms != value.as_millis() as i64) {
                crate::console::note(format_args!(
                    "note: the service judged with its own {flag} {} ({flag} {} here applies with --database-url only)",
                    compact_duration(served.unwrap_or_default()),
                    compact_duration(value.as_millis() as i64)
                ));
            }
        }
    }
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::out!("{}", render_table(&report, args.url.is_none().then_some(args.database_url.as_str())));
    }
    let counted: Vec<String> = args
        .fail_on
        .iter()
        .filter_map(|status| {
            report["summary"][status.as_str()].as_i64().filter(|n| *n > 0).map(|n| format!("{status} {n}"))
        })
        .collect();
    if counted.is_empty() {
        return Ok(0);
    }
    crate::console::note(format_args!(
        "--fail-on: the report counts {}; exit status {EXIT_ATTENTION}",
        counted.join(", ")
    ));
    Ok(EXIT_ATTENTION)
}

/// `ms` as one duration argument (`1s500ms`, not humantime's `1s 500ms`, which a shell splits).
fn compact_duration(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)).to_string().replace(' ', "")
}

/// Renders a reconciliation document (as served by GET /v1/reconciliation) as a text table;
/// `database_url`, when the report was read from a file, goes into the history check's command.
pub fn render_table(r: &Value, database_url: Option<&str>) -> String {
    use std::fmt::Write;
    let s = &r["summary"];
    let n = |k: &str| s[k].as_i64().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "matched {}  pending {}  missing {}  not_expected {}  unexpected {}  orphan {}",
        n("matched"),
        n("pending"),
        n("missing"),
        n("not_expected"),
        n("unexpected"),
        n("orphan")
    );
    let l = &s["match_latency_ms"];
    let f = |k: &str| l[k].as_i64().map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "match latency  p50 {}  p95 {}  p99 {}  max {}", f("p50"), f("p95"), f("p99"), f("max"));
    if let Some(as_of) = r["as_of"].as_str() {
        let chain = r["as_of_chain_hash"].as_str().unwrap_or("-");
        // The matching is part of the report: the same point judged with another window is
        // another report (`demo` judges with a 1 s window, for one).
        let duration = |key: &str| {
            r[key]
                .as_i64()
                .map(|ms| format!(" --{} {}", key.trim_end_matches("_ms").replace('_', "-"), compact_duration(ms)))
        };
        let matching: String = ["match_skew_ms", "match_window_ms"].into_iter().filter_map(duration).collect();
        let _ = writeln!(
            out,
            "as of {as_of} (chain {chain}; --as-of {as_of}{matching} with the same filters gives this report again)"
        );
        // The link is read as stored, not recomputed: a report of an edited file carries the
        // same one. What backs a citation is the chain recomputed up to it.
        if let Some(at) = crate::report::AsOf::parse(as_of).filter(|_| chain != "-") {
            let seq = at.point.seq;
            let (database, on) = match database_url {
                Some(url) => (format!(" --database-url {url}"), "recomputes the chain up to this link"),
                None => (String::new(), "run on the service's database file: recomputes the chain up to this link"),
            };
            let _ =
                writeln!(out, "history check: friendhook audit verify{database} --expect-head {seq}:{chain} ({on})");
        }
    }
    let items = r["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        let _ = writeln!(out, "\nnothing to list");
        return out;
    }
    // Names and operations come from callbacks, whose signature does not cover them: one line each.
    let str_of = |v: &Value| one_line(&v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
    let rows: Vec<[String; 7]> = items
        .iter()
        .map(|item| {
            let (id, a, b, t, detail) = if item["kind"] == "call" {
                (
                    str_of(&item["id"]),
                    str_of(&item["owner"]),
                    str_of(&item["friend"]),
                    item["requested_at"].as_i64().unwrap_or(0),
                    format!(
                        "{} {}{}{}{}",
                        str_of(&item["op"]),
                        str_of(&item["outcome"]),
                        upstream_of(item),
                        if item["late"] == true { " (late)" } else { "" },
                        callbacks_of(item)
                    ),
                )
            } else {
                (
                    str_of(&item["seq"]),
                    str_of(&item["from_user"]),
                    str_of(&item["to_user"]),
                    item["timestamp"].as_i64().unwrap_or(0),
                    str_of(&item["operation"]),
                )
            };
            [str_of(&item["status"]), str_of(&item["kind"]), id, a, b, fmt_time(t), detail]
        })
        .collect();
    // Columns as wide as what they hold (Easemob user names run to 64 characters), so that a long
    // name does not push the rest of its line out of step with the others.
    let header = ["STATUS", "KIND", "ID/SEQ", "OWNER/FROM", "FRIEND/TO", "TIME (UTC)", "detail"];
    let minimum = [12, 8, 8, 16, 16, 24, 0];
    // Widths as a terminal shows them: a name from an unsigned `from` may hold CJK characters,
    // two columns each, which a count of characters would take for one.
    let width =
        |column: usize| rows.iter().map(|row| row[column].width()).chain([minimum[column], header[column].len()]).max();
    let [w0, w1, w2, w3, w4, w5] = [0, 1, 2, 3, 4, 5].map(|c| width(c).unwrap_or(0));
    out.push('\n');
    for row in std::iter::once(header.map(str::to_string)).chain(rows) {
        let [status, kind, id, a, b, time, detail] = row;
        let (status, kind, a, b, time) = (pad(&status, w0), pad(&kind, w1), pad(&a, w3), pad(&b, w4), pad(&time, w5));
        let _ = writeln!(out, "{status} {kind} {id:>w2$}  {a} {b} {time} {detail}");
    }
    out
}

/// `text` followed by the spaces that make it `width` terminal columns wide (`format!`'s padding
/// counts characters).
fn pad(text: &str, width: usize) -> String {
    format!("{text}{}", " ".repeat(width.saturating_sub(text.width())))
}

/// What Easemob answered a call that did not succeed, for its detail: ` (Easemob 403
/// exceed_limit)`; nothing for a success, or for a call Easemob never answered (its
/// `outcome_detail`, in `--json`, says why).
fn upstream_of(item: &Value) -> String {
    if item["outcome"] == "succeeded" {
        return String::new();
    }
    let Some(status) = item["upstream_status"].as_i64() else { return String::new() };
    match item["upstream_error"].as_str() {
        Some(error) => format!(" (Easemob {status} {})", one_line(error)),
        None => format!(" (Easemob {status})"),
    }
}

/// The callbacks a call item was matched with, for its detail: `, callback seq 12` (and how many
/// more came for the pair), so that the table answers "which event" without `--json`.
fn callbacks_of(item: &Value) -> String {
    let Some(seq) = item["matched"]["seq"].as_i64() else { return String::new() };
    match item["extras"].as_array().map_or(0, Vec::len) {
        0 => format!(", callback seq {seq}"),
        more => format!(", callback seq {seq} (+{more} more)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_item_names_its_callback_and_what_easemob_answered_a_failure() {
        let report = serde_json::json!({
            "summary": {"matched": 2, "match_latency_ms": {}},
            "items": [
                {"status": "matched", "kind": "call", "id": 4, "op": "add", "outcome": "succeeded", "owner": "u00",
                 "friend": "u01", "requested_at": 1_700_000_000_000_i64, "late": false,
                 "matched": {"seq": 12}, "extras": []},
                {"status": "matched", "kind": "call", "id": 5, "op": "add", "outcome": "succeeded", "owner": "u02",
                 "friend": "u03", "requested_at": 1_700_000_000_000_i64, "late": true, "upstream_status": 200,
                 "matched": {"seq": 30}, "extras": [{"seq": 31}]},
                {"status": "unexpected", "kind": "call", "id": 6, "op": "add", "outcome": "rejected", "owner": "u04",
                 "friend": "u05", "requested_at": 1_700_000_000_000_i64, "late": false, "upstream_status": 403,
                 "upstream_error": "exceed_limit", "matched": {"seq": 40}, "extras": []},
                {"status": "not_expected", "kind": "call", "id": 7, "op": "remove", "outcome": "failed", "owner": "u06",
                 "friend": "u07", "requested_at": 1_700_000_000_000_i64, "late": false, "upstream_status": null,
                 "matched": null, "extras": []},
            ],
        });
        let table = render_table(&report, None);
        assert!(table.contains("add succeeded, callback seq 12\n"), "{table}");
        assert!(table.contains("add succeeded (late), callback seq 30 (+1 more)\n"), "{table}");
        assert!(table.contains("add rejected (Easemob 403 exceed_limit), callback seq 40\n"), "{table}");
        assert!(table.contains("remove failed\n"), "Easemob never answered: {table}");
    }

    #[test]
    fn a_service_url_must_be_an_http_url_with_a_host() {
        assert!(parse_service_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_service_url("https://friendhook.internal/").is_ok());
        let err = parse_service_url("not-a-url").expect_err("no scheme");
        assert!(err.contains("relative URL without a base") && err.contains("e.g. http://127.0.0.1:8080"), "{err}");
        assert!(parse_service_url("ftp://host").expect_err("scheme").contains("`ftp` is not an http(s) URL"));
    }

    #[test]
    fn the_table_shows_each_item_on_one_line_whatever_its_names_hold() {
        let report = serde_json::json!({
            "summary": {"orphan": 1, "match_latency_ms": {}},
            "items": [{
                "status": "orphan", "kind": "callback", "seq": 7, "timestamp": 1_700_000_000_000_i64,
                "from_user": "x\u{1b}[31mRED\u{1b}[0m\rmissing call 99 fake", "to_user": "a\nb\u{202e}c", "operation": "add",
            }],
        });
        let table = render_table(&report, None);
        assert!(!table.contains('\u{1b}') && !table.contains('\r'), "{table:?}");
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("orphan ")).collect();
        assert_eq!(rows.len(), 1, "{table}");
        assert!(rows[0].contains("x?[31mRED?[0m?missing call 99 fake") && rows[0].contains("a?b?c"), "{table}");
        assert!(rows[0].contains("2023-11-14T22:13:20.000Z"), "{table}");
    }

    #[test]
    fn a_long_user_name_widens_its_column_instead_of_pushing_its_line_out_of_step() {
        let long = "a-user-name-of-forty-characters-0123456";
        let item = |id: i64, owner: &str| {
            serde_json::json!({"status": "missing", "kind": "call", "id": id, "op": "add", "outcome": "succeeded",
                "owner": owner, "friend": "bob", "requested_at": 1_700_000_000_000_i64, "matched": null, "extras": []})
        };
        let report = serde_json::json!({"summary": {"missing": 2, "match_latency_ms": {}},
            "items": [item(1, "al"), item(22, long)]});
        let table = render_table(&report, None);
        let lines: Vec<&str> = table.lines().filter(|l| l.starts_with("STATUS") || l.starts_with("missing ")).collect();
        assert_eq!(lines.len(), 3, "{table}");
        // Every column starts where the header's does, on every line.
        for column in ["FRIEND/TO", "TIME (UTC)", "detail"] {
            let at = lines[0].find(column).expect("header");
            let value = match column {
                "FRIEND/TO" => "bob",
                "TIME (UTC)" => "2023-11-14T22:13:20.000Z",
                _ => "add succeeded",
            };
            for line in &lines[1..] {
                assert_eq!(line.find(value), Some(at), "{column}:\n{table}");
            }
        }
        assert!(lines[2].contains(long), "{table}");
    }

    #[test]
    fn a_name_of_wide_characters_is_padded_to_the_columns_it_takes() {
        let orphan = |seq: i64, from: &str| {
            serde_json::json!({"status": "orphan", "kind": "callback", "seq": seq, "timestamp": 1_700_000_000_000_i64,
                "from_user": from, "to_user": "bob", "operation": "add"})
        };
        // 20 characters, 40 columns: wider than the column's 16 minimum either way.
        let wide = "张三李四王五赵六钱七孙八周九吴十郑一冯二";
        let report = serde_json::json!({"summary": {"orphan": 2, "match_latency_ms": {}},
            "items": [orphan(1, "al"), orphan(2, wide)]});
        let table = render_table(&report, None);
        let lines: Vec<&str> = table.lines().filter(|l| l.starts_with("STATUS") || l.starts_with("orphan ")).collect();
        assert_eq!(lines.len(), 3, "{table}");
        // Where a terminal shows "bob" on each line: the columns before it, in display width.
        let column_of = |line: &str, value: &str| line.find(value).map(|at| line[..at].width());
        let at = column_of(lines[0], "FRIEND/TO").expect("header");
        for line in &lines[1..] {
            assert_eq!(column_of(line, "bob"), Some(at), "\n{table}");
        }
        assert_eq!(at, "orphan       callback        2  ".width() + wide.width() + 1, "\n{table}");
    }
}
