//! Reconciliation over real traffic: the sandbox's fault knobs drop, duplicate, delay and double
//! callbacks, and the report must agree exactly with the sandbox's own ground truth.

use std::collections::HashMap;

use friendhook::sandbox::InjectedFault;
use serde_json::{Value, json};

use crate::helpers::*;

/// `friendhook_report_requests_total{answer=...}` from the service's /metrics.
async fn report_requests(app: &TestApp, answer: &str) -> f64 {
    app.metrics().await[&format!("friendhook_report_requests_total{{answer=\"{answer}\"}}")]
}

async fn all_report_items(app: &TestApp, query: &str) -> (Value, Vec<Value>) {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    let mut summary;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/reconciliation?limit=50&{query}&cursor={c}"),
            None => format!("/v1/reconciliation?limit=50&{query}"),
        };
        let (status, page) = app.get_json(&q).await;
        assert_eq!(status, 200, "{page}");
        summary = page["summary"].clone();
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    (summary, items)
}

#[tokio::test]
async fn reconciliation_counts_equal_the_sandbox_ground_truth_under_faults() {
    // Window 0: every callback's event time lies within its call's [t0, t1] (the sandbox stamps it
    // while handling the add), so a call with no delivered callback is `missing` at once and the
    // test needs no waiting.
    let app = TestApp::spawn(&[
        "--sandbox-drop-rate",
        "0.3",
        "--sandbox-duplicate-rate",
        "0.3",
        "--sandbox-delay-ms",
        "40",
        "--sandbox-callbacks-per-add",
        "2",
        "--sandbox-seed",
        "20261125",
        "--match-window",
        "0s",
    ])
    .await;
    let names: Vec<String> = (0..300).map(|i| format!("u_{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    app.register(&refs).await;
    let mut pairs: Vec<Value> = (0..150).map(|i| json!({"owner": names[2 * i], "friend": names[2 * i + 1]})).collect();
    for (i, name) in names.iter().take(10).enumerate() {
        pairs.push(json!({"owner": name, "friend": format!("ghost_{i}")})); // rejected: unknown user
    }
    let (status, batch) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
    assert_eq!(status, 200);
    let results = batch["results"].as_array().unwrap();
    app.settle().await;

    // Ground truth: which adds had at least one callback delivered.
    let truth = app.sandbox().callbacks();
    let mut delivered_by_pair: HashMap<(String, String), usize> = HashMap::new();
    let mut delivered_records = 0;
    for cb in &truth {
        assert_ne!(cb.fate, "pending");
        let key = if cb.from_user < cb.to_user {
            (cb.from_user.clone(), cb.to_user.clone())
        } else {
            (cb.to_user.clone(), cb.from_user.clone())
        };
        let e = delivered_by_pair.entry(key).or_default();
        if cb.fate == "delivered" {
            *e += 1;
            delivered_records += 1;
        }
    }
    let mut expect_matched = 0;
    let mut expect_missing = 0;
    let mut expect_status: HashMap<i64, &str> = HashMap::new();
    for r in results {
        let id = r["id"].as_i64().unwrap();
        if r["outcome"] == "succeeded" {
            let (o, f) = (r["owner"].as_str().unwrap().to_string(), r["friend"].as_str().unwrap().to_string());
            let key = if o < f { (o, f) } else { (f, o) };
            if delivered_by_pair.get(&key).copied().unwrap_or(0) > 0 {
                expect_matched += 1;
                expect_status.insert(id, "matched");
            } else {
                expect_missing += 1;
                expect_status.insert(id, "missing");
            }
        } else {
            assert_eq!(r["outcome"], "rejected");
            expect_status.insert(id, "not_expected");
        }
    }
    assert!(
        expect_missing > 0 && expect_matched > 0,
        "the seed must exercise both (matched {expect_matched}, missing {expect_missing})"
    );

    let (summary, items) = all_report_items(&app, "").await;
    assert_eq!(summary["matched"], expect_matched, "{summary}");
    assert_eq!(summary["missing"], expect_missing, "{summary}");
    assert_eq!(summary["not_expected"], 10);
    assert_eq!(summary["pending"], 0);
    assert_eq!(summary["unexpected"], 0);
    assert_eq!(summary["orphan"], 0, "second-direction callbacks and duplicates attach as extras, never orphans");
    // /metrics reconciles the last hour, which holds every call of this test: the same counts.
    let m = app.metrics().await;
    let calls = |status: &str| m[&format!("friendhook_reconciliation_calls{{status=\"{status}\"}}")];
    assert_eq!(calls("matched"), expect_matched as f64);
    assert_eq!(calls("missing"), expect_missing as f64);
    assert_eq!(calls("not_expected"), 10.0);
    assert_eq!(calls("pending") + calls("unexpected"), 0.0);
    assert_eq!(m["friendhook_reconciliation_orphan_callbacks"], 0.0);
    for item in &items {
        let id = item["id"].as_i64().unwrap();
        assert_eq!(item["status"], expect_status[&id], "call {id}: {item}");
    }
    // Every delivered callback is accounted for exactly once, as a primary match or an extra
    // (duplicates are deduplicated on the way in, so count distinct events).
    let attached: usize =
        items.iter().map(|i| usize::from(!i["matched"].is_null()) + i["extras"].as_array().map_or(0, Vec::len)).sum();
    let (_, stored) = app.get_json("/v1/callbacks?limit=1000").await;
    let stored_events = stored["items"].as_array().unwrap().len();
    assert_eq!(attached, stored_events);
    assert_eq!(stored_events, delivered_records, "every delivered callback stored once");
    let duplicated = app.sandbox().stats().callbacks_duplicated;
    assert!(duplicated > 0, "the seed must exercise duplicates");

    // Status filter and paging.
    let (missing_summary, missing_items) = all_report_items(&app, "status=missing").await;
    assert_eq!(missing_items.len(), expect_missing);
    assert_eq!(missing_summary["matched"], expect_matched, "the summary covers the whole selection");
    app.stop().await;
}

#[tokio::test]
async fn a_callback_no_call_explains_is_an_orphan_and_one_for_a_failed_call_is_unexpected() {
    let app = TestApp::spawn(&["--match-window", "0s"]).await;
    app.register(&["alice"]).await;
    let (_, rejected) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "ghost"})).await;
    assert_eq!(rejected["outcome"], "rejected");
    let t = rejected["requested_at"].as_i64().unwrap();
    // Easemob says the friendship happened after all (e.g. a client app added it): unexpected.
    let body = roster_body("900001", "alice", "ghost", "add", t, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    // A friendship made entirely outside friendhook: orphan.
    let body = roster_body("900002", "carol", "dave", "add", t, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);

    let (summary, items) = all_report_items(&app, "").await;
    assert_eq!(summary["unexpected"], 1, "{summary}");
    assert_eq!(summary["orphan"], 1, "{summary}");
    // Why the call failed is in the report, as the call record has it.
    let unexpected = items.iter().find(|i| i["status"] == "unexpected").unwrap();
    for key in ["upstream_status", "upstream_error", "outcome_detail"] {
        assert!(!rejected[key].is_null(), "{key}: {rejected}");
        assert_eq!(unexpected[key], rejected[key], "{key}: {unexpected}");
    }
    let orphan = items.iter().find(|i| i["status"] == "orphan").unwrap();
    assert_eq!(orphan["from_user"], "carol");
    assert_eq!(orphan["kind"], "callback");
    let (_, only_carol) = all_report_items(&app, "owner=carol").await;
    assert_eq!(only_carol.len(), 1);
    let (_, only_carol_again) = all_report_items(&app, "owner=Carol").await;
    assert_eq!(only_carol_again, only_carol, "user IDs are compared lower-cased, as /v1/calls does");
    app.stop().await;
}

/// A refused attempt and its successful retry, the add then told to both users (the sandbox
/// sends its two callbacks as one event): both callbacks are the retry's. Before, the second one
/// became the refused attempt's match and read `unexpected`.
#[tokio::test]
async fn an_add_told_to_both_users_belongs_to_the_retry_not_to_the_refused_attempt() {
    let app = TestApp::spawn(&["--sandbox-callbacks-per-add", "2"]).await;
    app.register(&["alice", "bob"]).await;
    app.sandbox().inject_faults(InjectedFault {
        status: 403,
        count: 1,
        path_contains: Some("/contacts/".to_owned()),
        error: None,
    });
    let (_, refused) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(refused["outcome"], "rejected", "{refused}");
    let (_, retry) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(retry["outcome"], "succeeded", "{retry}");
    app.settle().await;

    let (summary, items) = all_report_items(&app, "").await;
    assert_eq!((summary["matched"].as_u64(), summary["not_expected"].as_u64()), (Some(1), Some(1)), "{summary}");
    assert_eq!((summary["unexpected"].as_u64(), summary["orphan"].as_u64()), (Some(0), Some(0)), "{summary}");
    let retried = items.iter().find(|i| i["id"] == retry["id"]).expect("the retry is reported");
    assert_eq!(retried["matched"]["from_user"], "alice", "{retried}");
    assert_eq!(retried["extras"][0]["from_user"], "bob", "{retried}");
    app.stop().await;
}

/// "What happened to call N?": its verdict whatever it is, nothing else; from the API and from
/// the CLI, through the service and from the file.
#[tokio::test]
async fn a_report_on_one_call_gives_its_verdict_alone() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob", "carol"]).await;
    let (_, before) = app.get_json("/v1/reconciliation").await;
    let (_, to_bob) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    let (_, to_carol) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "carol"})).await;
    app.settle().await;
    let t = to_carol["requested_at"].as_i64().unwrap();
    // A friendship made outside friendhook at the same time: an orphan of any report of the time.
    let body = roster_body("900003", "carol", "dave", "add", t, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);

    let id = to_bob["id"].as_i64().unwrap();
    let (summary, items) = all_report_items(&app, &format!("call_id={id}")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!((items[0]["id"].as_i64(), &items[0]["status"]), (Some(id), &json!("matched")), "{items:?}");
    assert_eq!(items[0]["matched"]["to_user"], "bob", "{items:?}");
    assert_eq!((summary["matched"].as_u64(), summary["orphan"].as_u64()), (Some(1), Some(0)), "{summary}");
    // A report as of before the call was recorded cannot hold it: said, not an empty report.
    let as_of = before["as_of"].as_str().unwrap();
    let (status, err) = app.get_json(&format!("/v1/reconciliation?call_id={id}&as_of={as_of}")).await;
    assert_eq!((status, &err["code"]), (400, &json!("invalid_query")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("was recorded after this `as_of`"), "{err}");
    let (status, err) = app.get_json("/v1/reconciliation?call_id=999").await;
    assert_eq!((status, &err["code"]), (404, &json!("not_found")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("no call with id 999"), "{err}");

    // The table lists the call though `matched` is not among the statuses it lists by default.
    let id = id.to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--url", &app.base, "--call-id", &id])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("matched ") && l.contains(" call ")).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].contains("alice") && rows[0].contains("bob") && !text.contains("dave"), "{text}");
    let db = app.db_url.clone();
    let _dir = app.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db, "--json", "--call-id", &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["items"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!((&doc["items"][0]["status"], doc["summary"]["matched"].as_u64()), (&json!("matched"), Some(1)), "{doc}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db, "--call-id", "999"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no call with id 999 in "), "{stderr}");
}

#[tokio::test]
async fn a_call_without_its_callback_is_pending_while_the_window_is_open() {
    let app = TestApp::spawn(&["--sandbox-drop-rate", "1"]).await;
    app.register(&["alice", "bob"]).await;
    let (_, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(call["outcome"], "succeeded");
    let (summary, _) = all_report_items(&app, "").await;
    assert_eq!(summary["pending"], 1, "default window is 5 minutes: {summary}");
    app.stop().await;
}

#[tokio::test]
async fn reconcile_cli_prints_the_table_and_json_from_the_database() {
    let (app, _) = alice_added_bob_and_no_callback_came(&[]).await;
    let base = app.base.clone();
    let db = app.db_url.clone();
    // tokio's Command: the service runs on this test's runtime and must keep answering meanwhile.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--url", &base])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("missing 1"), "{text}");
    assert!(text.contains("as of ") && text.contains("--as-of "), "a report says how to get it again: {text}");
    // ... and how to check the history it was computed over: the command it prints passes.
    let check = text.lines().find_map(|l| l.strip_prefix("history check: friendhook ")).expect("a history check line");
    let args: Vec<&str> = check.split(" (").next().unwrap().split(' ').collect();
    assert_eq!(args[..3], ["audit", "verify", "--expect-head"], "{check}");
    assert!(
        check.ends_with("(run on the service's database file: recomputes the chain up to this link)"),
        "read through --url, the file is not named: {check}"
    );
    let verify = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(&args)
        .args(["--database-url", &db])
        .output()
        .await
        .unwrap();
    assert!(verify.status.success(), "{check}: {}", String::from_utf8_lossy(&verify.stdout));
    assert_eq!(report_requests(&app, "computed").await, 1.0, "three statuses, one report: computed once");
    assert_eq!(report_requests(&app, "reused").await, 2.0);
    assert!(text.contains("alice") && text.contains("bob"), "{text}");
    let _dir = app.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db, "--json", "--match-window", "0s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["summary"]["missing"], 1);
    // Read from the file, the history check names it: the command runs as printed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let check = text.lines().find_map(|l| l.strip_prefix("history check: friendhook ")).expect("a history check line");
    let (command, why) = check.split_once(" (").unwrap();
    assert_eq!(why, "recomputes the chain up to this link)", "{check}");
    let verify =
        std::process::Command::new(env!("CARGO_BIN_EXE_friendhook")).args(command.split(' ')).output().unwrap();
    assert!(verify.status.success(), "{check}: {}", String::from_utf8_lossy(&verify.stdout));
    // For a cron job: exit 3 when the report counts a status named by --fail-on, 0 otherwise;
    // "the last hour" as a duration, printed as the time it stood for.
    let reconcile = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
            .args(["reconcile", "--database-url", &db, "--match-window", "0s"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = reconcile(&["--fail-on", "missing,unexpected"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stdout.contains("missing 1"), "the report is printed all the same: {stdout}");
    assert!(stderr.contains("--fail-on: the report counts missing 1; exit status 3"), "{stderr}");
    let (code, _, stderr) = reconcile(&["--fail-on", "orphan,unexpected"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = reconcile(&["--since", "1h", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.starts_with("--since 1h: --since 1"), "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["summary"]["missing"], 1, "a call of a minute ago");
    let (_, stdout, _) = reconcile(&["--since", "0s", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["summary"]["missing"], 0, "nothing since now");
    // A mistyped status is an error, not an empty list that reads as "nothing missing".
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db, "--status", "mising"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error, as clap's others: {stderr}");
    assert!(stderr.contains("invalid value 'mising' for '--status") && stderr.contains("'missing'"), "{stderr}");
    // A time it cannot read names the flag, as the command line has it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &db, "--since", "yesterday"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error too, though clap took its form: {stderr}");
    assert!(stderr.contains("`--since` must be epoch milliseconds or RFC 3339"), "{stderr}");
    assert!(stderr.contains("or a duration back from now such as 1h"), "{stderr}");
}

#[tokio::test]
async fn a_time_window_reconciles_only_what_happened_in_it() {
    // Bounded windows and "everything" are read by different queries; both must agree on rows.
    let (app, call) = alice_added_bob_and_no_callback_came(&[]).await;
    let t = call["requested_at"].as_i64().unwrap();
    let matching = roster_body("910001", "alice", "bob", "add", t, SECRET);
    assert_eq!(app.post_callback(matching).await.status(), 200);
    let month_ago = t - 30 * 24 * 3_600_000;
    let old_orphan = roster_body("910002", "carol", "dave", "add", month_ago, SECRET);
    assert_eq!(app.post_callback(old_orphan).await.status(), 200);

    let (recent, items) = all_report_items(&app, &format!("since={}&until={}", t - 60_000, t + 60_000)).await;
    assert_eq!((recent["matched"].as_i64(), recent["orphan"].as_i64()), (Some(1), Some(0)), "{recent}");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["matched"]["from_user"], "alice");
    assert_eq!(items[0]["matched"]["timestamp"], t);

    let (old, items) =
        all_report_items(&app, &format!("since={}&until={}", month_ago - 1_000, month_ago + 1_000)).await;
    assert_eq!((old["matched"].as_i64(), old["orphan"].as_i64()), (Some(0), Some(1)), "{old}");
    assert_eq!(items.len(), 1);
    assert_eq!((items[0]["from_user"].as_str(), items[0]["to_user"].as_str()), (Some("carol"), Some("dave")));
    assert_eq!(items[0]["timestamp"], month_ago);

    let (all, items) = all_report_items(&app, "").await;
    assert_eq!((all["matched"].as_i64(), all["orphan"].as_i64()), (Some(1), Some(1)), "{all}");
    assert_eq!(items.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_report_that_cannot_start_in_time_is_answered_503_busy() {
    // A report waits at most half the request deadline for its turn: 2 s here, a bound only the
    // held slot can reach, while the rest (a commit, /metrics' own report) has 4 s on a loaded
    // machine.
    let app = TestApp::spawn(&["--request-timeout", "4s", "--sqlite-busy-timeout", "1s"]).await;
    let slot = app.reports.enter().await.expect("the only slot is free");

    let resp = app.client.get(format!("{}/v1/reconciliation", app.base)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "2");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "reconciliation_busy", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("one at a time"), "{body}");
    assert_eq!(app.reports.waiting(), 0, "a report that gave up no longer counts as waiting");
    assert_eq!(report_requests(&app, "busy").await, 1.0);

    drop(slot);
    let (status, _) = app.get_json("/v1/reconciliation").await;
    assert_eq!(status, 200, "the slot is free again");
    app.stop().await;
}

#[tokio::test]
async fn a_queued_report_runs_once_the_one_before_it_finishes() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("900003", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let slot = app.reports.enter().await.expect("the only slot is free");
    let url = format!("{}/v1/reconciliation", app.base);
    let queued = tokio::spawn(app.client.get(url).send());
    // The report is in the queue (no sleeping: the gate counts it). The bound only stops a
    // broken build from hanging the suite; the default wait for a turn is 5 s.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while app.reports.waiting() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the request reaches the queue");

    drop(slot);
    let resp = queued.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["summary"]["orphan"], 1, "the report, computed after its wait: {body}");
    app.stop().await;
}

#[tokio::test]
async fn the_kept_report_is_let_go_once_unused_since_a_use() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("900004", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    assert_eq!(app.reports.kept_use(), None, "nothing computed yet");

    let (status, body) = app.get_json("/v1/reconciliation").await;
    assert_eq!(status, 200);
    let first = app.reports.kept_use().expect("the report is kept for its next pages");
    // The same report again: asked as of the same point.
    let as_of = body["as_of"].as_str().expect("a report names its point").to_owned();
    let (status, _) = app.get_json(&format!("/v1/reconciliation?as_of={as_of}")).await;
    assert_eq!(status, 200);
    let second = app.reports.kept_use().expect("still kept");
    assert_ne!(first, second, "each use is numbered");
    assert_eq!((report_requests(&app, "computed").await, report_requests(&app, "reused").await), (1.0, 1.0));

    // What the first use's expiry runs once KEEP_FOR has passed: a use came since, so it stays.
    assert!(!app.reports.let_go_unless_used_since(first));
    assert_eq!(app.reports.kept_use(), Some(second));
    // The last use's expiry lets it go: the same report is then computed again, not reused.
    assert!(app.reports.let_go_unless_used_since(second));
    assert_eq!(app.reports.kept_use(), None);
    let (status, again) = app.get_json(&format!("/v1/reconciliation?as_of={as_of}")).await;
    assert_eq!(status, 200);
    assert_eq!(again["summary"], body["summary"], "{again}");
    assert_eq!((report_requests(&app, "computed").await, report_requests(&app, "reused").await), (2.0, 1.0));
    app.stop().await;
}

/// A --url that answers 200 with JSON that is not a report (another service, a proxy's page) is
/// an error that says what to check; it panicked when the CLI marked the report's last page.
#[tokio::test]
async fn reconcile_cli_refuses_a_url_that_answers_something_else() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let other = axum::Router::new().fallback(|| async { axum::Json(serde_json::json!(["not", "a", "report"])) });
    tokio::spawn(async move { axum::serve(listener, other).await });

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--url", &base, "--json"])
        .output()
        .await
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("something other than a reconciliation report"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn reconcile_cli_asks_again_while_the_service_is_busy_with_another_report() {
    use tokio::io::AsyncBufReadExt;
    // A report waits 2 s for its turn here (half the request deadline), then the CLI is told to
    // come back (Retry-After).
    let app = TestApp::spawn(&["--request-timeout", "4s", "--sqlite-busy-timeout", "1s"]).await;
    let body = roster_body("920001", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let slot = app.reports.enter().await.expect("the only slot is free");
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--url", &app.base, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(cli.stderr.take().unwrap()).lines();
    let line = stderr.next_line().await.unwrap().expect("the CLI says why it waits");
    assert!(line.contains("asking again in 2 s (1/10)"), "{line}");

    drop(slot);
    let out = cli.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["summary"]["orphan"], 1, "{doc}");
    app.stop().await;
}

/// An `as_of` whose seq was lowered by hand, below records stored before its last call existed,
/// would hide them (here the orphan stored first) and still come with the chain's genuine link:
/// it is refused, while the points a report could have had are answered.
#[tokio::test]
async fn an_as_of_lowered_below_what_its_last_call_had_seen_is_refused() {
    let app = TestApp::spawn(&["--match-window", "0s", "--sandbox-drop-rate", "1"]).await;
    app.register(&["alice", "bob"]).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!(app.post_callback(roster_body("940001", "carol", "dave", "add", now, SECRET)).await.status(), 200);
    let (_, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(call["outcome"], "succeeded");
    let (_, report) = app.get_json("/v1/reconciliation").await;
    let as_of = report["as_of"].as_str().unwrap().to_string();
    let parts: Vec<&str> = as_of.split('.').collect();
    assert_eq!(parts[..2], ["2", "1"], "the orphan at seq 1, call 1's outcome at seq 2: {as_of}");

    // Seq 1 with call 1 in flight was a point of the journal; seq 0 with call 1 never was.
    let (status, seen) = app.get_json(&format!("/v1/reconciliation?as_of=1.1.{}", parts[2])).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["summary"]["orphan"], 1, "{seen}");
    let (status, err) = app.get_json(&format!("/v1/reconciliation?as_of=0.1.{}", parts[2])).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("seq 1 was stored before that call was recorded"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn the_pages_of_a_report_and_its_as_of_stay_put_while_more_is_stored() {
    let (app, call) = alice_added_bob_and_no_callback_came(&[]).await;
    let t = call["requested_at"].as_i64().unwrap();
    for (msg, from, to) in [("930001", "carol", "dave"), ("930002", "erin", "frank")] {
        assert_eq!(app.post_callback(roster_body(msg, from, to, "add", t, SECRET)).await.status(), 200);
    }
    let (status, first) = app.get_json("/v1/reconciliation?limit=1").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["summary"]["missing"].as_i64(), first["summary"]["orphan"].as_i64()), (Some(1), Some(2)));
    let as_of = first["as_of"].as_str().expect("a report names what it is judged on").to_string();
    assert_eq!(report_requests(&app, "computed").await, 1.0);
    // ... and the chain link there: nothing was stored since, so it is the chain head.
    let (_, head) = app.get_json("/v1/audit/head").await;
    assert!(as_of.starts_with(&format!("{}.", head["seq"])), "{as_of} vs {head}");
    assert_eq!(first["as_of_chain_hash"], head["hash"]);

    // Meanwhile: alice -> bob's callback after all, and another orphan.
    for (msg, from, to) in [("930003", "alice", "bob"), ("930004", "gina", "hank")] {
        assert_eq!(app.post_callback(roster_body(msg, from, to, "add", t, SECRET)).await.status(), 200);
    }

    // The rest of the report is the report that was started.
    let mut items = first["items"].as_array().unwrap().clone();
    let mut cursor = first["next_cursor"].as_str().map(str::to_string);
    while let Some(c) = cursor {
        let (status, page) = app.get_json(&format!("/v1/reconciliation?limit=1&cursor={c}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["summary"], first["summary"], "every page has the first page's summary");
        assert_eq!(page["as_of"], first["as_of"]);
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_str().map(str::to_string);
    }
    let statuses: Vec<&str> = items.iter().map(|i| i["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["missing", "orphan", "orphan"], "{items:?}");
    assert_eq!(report_requests(&app, "computed").await, 1.0, "the next pages were cut from the first page's");
    assert_eq!(report_requests(&app, "reused").await, 2.0);

    // The same as_of gives the same report again; without it, the report is of now.
    let (_, again) = app.get_json(&format!("/v1/reconciliation?limit=1&as_of={as_of}")).await;
    assert_eq!(again, first);
    let (_, now) = app.get_json("/v1/reconciliation").await;
    assert_eq!((now["summary"]["matched"].as_i64(), now["summary"]["orphan"].as_i64()), (Some(1), Some(3)), "{now}");
    assert_eq!(report_requests(&app, "computed").await, 2.0, "a report of now is computed");
    let (_, older) = app.get_json(&format!("/v1/reconciliation?limit=1&as_of={as_of}")).await;
    assert_eq!(older, first, "computed again, the same report");
    assert_eq!(report_requests(&app, "computed").await, 3.0);

    // A point the database has not reached, a malformed one, or one that contradicts the cursor.
    let (status, err) = app.get_json("/v1/reconciliation?as_of=999999.0.0").await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("has not reached"), "{err}");
    let (status, _) = app.get_json("/v1/reconciliation?as_of=soon").await;
    assert_eq!(status, 400);
    // A genuine as_of edited by hand: hiding the calls, or judging before anything was stored.
    let parts: Vec<&str> = as_of.split('.').collect();
    for (tampered, says) in [
        (format!("{}.0.{}", parts[0], parts[2]), "a later call's outcome"),
        (format!("{}.{}.-9223372036854775808", parts[0], parts[1]), "before what it names was stored"),
        (format!("{}.{}.9223372036854775807", parts[0], parts[1]), "still to come"),
    ] {
        let (status, err) = app.get_json(&format!("/v1/reconciliation?as_of={tampered}")).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")), "{tampered}: {err}");
        assert!(err["detail"].as_str().unwrap().contains(says), "{tampered}: {err}");
    }
    let c = first["next_cursor"].as_str().unwrap();
    let (status, err) = app.get_json(&format!("/v1/reconciliation?cursor={c}&as_of=0.0.0")).await;
    assert_eq!(status, 400, "{err}");
    // A cursor asked with other filters than its first page's would go on from a place in
    // another list: refused, whichever filter changed.
    for other in ["status=orphan", "owner=alice", &format!("since={}", t - 1)] {
        let (status, err) = app.get_json(&format!("/v1/reconciliation?limit=1&cursor={c}&{other}")).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")), "{other}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("continues a report with other filters"), "{err}");
    }
    let (status, _) = app.get_json(&format!("/v1/reconciliation?limit=1&cursor={c}")).await;
    assert_eq!(status, 200, "with its own filters it goes on");

    // `friendhook reconcile --as-of` gives the same report, from the service or the database.
    let source_args = [["--url", app.base.as_str()], ["--database-url", app.db_url.as_str()]];
    for source in source_args {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
            .args(["reconcile", "--json", "--match-window", "0s", "--as-of", &as_of])
            .args(source)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((&doc["summary"], &doc["as_of"]), (&first["summary"], &first["as_of"]), "{source:?}");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["reconcile", "--database-url", &app.db_url, "--as-of", "999999.0.0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has not reached"));
    app.stop().await;
}
