//! `GET /metrics`: what an operator scrapes to see 503s, rejections and the writer before
//! Easemob's retry runs out.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn metrics_count_each_callback_by_its_answer_and_each_call_by_its_outcome() {
    // Arrange: three calls through the sandbox (an addition and a removal succeed and send their
    // callbacks, one addition is refused with 404), then four deliveries of our own, one of each kind.
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;
    let (_, added) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(added["outcome"], "succeeded", "{added}");
    let (_, refused) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "nobody"})).await;
    assert_eq!(refused["outcome"], "rejected", "{refused}");
    let removed = app.client.delete(app.url("/v1/friends/alice/bob")).send().await.unwrap();
    assert_eq!(removed.status(), 201);
    app.settle().await;
    let from_sandbox = app.sandbox().stats().callbacks_sent;
    assert!(from_sandbox >= 2, "the successful addition and removal sent their callbacks");

    let body = roster_body("900000000000000001", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body.clone()).await.status(), 200);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let forged = roster_body("900000000000000002", "carol", "erin", "add", 1_700_000_000_000, "wrong-secret");
    assert_eq!(app.post_callback(forged).await.status(), 401);
    assert_eq!(app.post_callback("{not json").await.status(), 400);
    assert_eq!(app.get_json("/v1/calls/99").await.0, 404);
    assert_eq!(app.get_json("/v1/no-such-endpoint").await.0, 404);

    // Act
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    let text = response.text().await.unwrap();
    let m = friendhook::metrics::parse_samples(&text);

    // Assert
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(text.ends_with("# EOF\n"));
    let received = |result: &str| m[&format!("friendhook_callbacks_received_total{{result=\"{result}\"}}")];
    assert_eq!(received("stored"), 1.0 + from_sandbox as f64, "{text}");
    assert_eq!(received("duplicate"), 1.0);
    assert_eq!(received("rejected"), 1.0);
    assert_eq!(received("invalid"), 1.0);
    for none in ["quarantined", "forbidden", "overloaded", "unavailable"] {
        assert_eq!(received(none), 0.0, "{none}");
    }
    let calls = |op: &str, outcome: &str| m[&format!("friendhook_calls_total{{op=\"{op}\",outcome=\"{outcome}\"}}")];
    assert_eq!(calls("add", "succeeded"), 1.0);
    assert_eq!(calls("add", "rejected"), 1.0);
    assert_eq!(calls("add", "unknown"), 0.0);
    assert_eq!(calls("remove", "succeeded"), 1.0);
    assert_eq!(calls("remove", "rejected"), 0.0);
    assert_eq!(m["friendhook_easemob_attempts_total{op=\"add\"}"], 2.0, "one attempt each: nothing was retried");
    assert_eq!(m["friendhook_easemob_attempts_total{op=\"remove\"}"], 1.0);

    let (_, head) = app.get_json("/v1/audit/head").await;
    assert_eq!(m["friendhook_chain_head_seq"], head["seq"].as_f64().unwrap(), "{head}");
    assert_eq!(m["friendhook_write_queue_depth"], 0.0, "nothing is waiting once every answer is in");
    assert_eq!(m["friendhook_write_queue_capacity"], 8192.0, "the --write-queue default");
    // Every answered write went through a commit, recorded before its answer: the three calls'
    // intents and outcomes, the stored and duplicate deliveries, the sandbox's callbacks, and the
    // rejection log entry.
    let writes = m["friendhook_commit_writes_sum"];
    assert!(writes >= 6.0 + 2.0 + from_sandbox as f64 + 1.0, "writes {writes}");
    assert!(m["friendhook_commit_writes_count"] >= 1.0);
    assert_eq!(
        m["friendhook_commit_seconds_count"], m["friendhook_commit_writes_count"],
        "one size and one duration per commit"
    );
    assert_eq!(m["friendhook_commit_failures_total"], 0.0);
    assert_eq!(m["friendhook_quarantine_held"], 0.0, "rejected (the default), not held");
    let file = std::fs::metadata(&app.db_path).unwrap().len() as f64;
    assert_eq!(m["friendhook_database_bytes{file=\"database\"}"], file, "nothing writes to the file between");
    assert!(m["friendhook_database_bytes{file=\"wal\"}"] > 0.0, "the WAL holds the commits since the last checkpoint");
    let free = m["friendhook_disk_free_bytes"];
    assert!(free > 0.0, "the test's temporary directory has room: {free}");
    // Which build answers: the version and the commit (the same text `--version` shows).
    let build =
        format!("friendhook_build_info{{version=\"{}\",commit=\"{}\"}}", env!("CARGO_PKG_VERSION"), friendhook::COMMIT);
    assert_eq!(m.get(&build), Some(&1.0), "{text}");
    assert_ne!(friendhook::COMMIT, "", "build.rs sets it, \"unknown\" outside git");
    // The /v1 API by route template, method and code; callbacks, probes and /metrics not.
    let api = |route: &str, method: &str, code: u16| {
        m.get(&format!("friendhook_api_requests_total{{route=\"{route}\",method=\"{method}\",code=\"{code}\"}}"))
            .copied()
    };
    assert_eq!(api("/v1/friends", "POST", 201), Some(2.0), "{text}");
    assert_eq!(api("/v1/calls/{id}", "GET", 404), Some(1.0), "{text}");
    assert_eq!(api("unmatched", "GET", 404), Some(1.0), "{text}");
    assert_eq!(api("/v1/friends/{owner}/{friend}", "DELETE", 201), Some(1.0), "{text}");
    assert_eq!(m.get("friendhook_api_request_seconds_count{route=\"/v1/friends\"}"), Some(&2.0), "{text}");
    assert!(m.get("friendhook_api_request_seconds_sum{route=\"/v1/friends\"}").is_some_and(|s| *s > 0.0), "{text}");
    let api_series = m.keys().filter(|k| k.starts_with("friendhook_api_requests_total")).count();
    assert_eq!(api_series, 4, "nothing but those four: {text}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_reconcile_the_trailing_window_and_reuse_the_result_for_ten_seconds() {
    // Arrange: a frozen clock shared by the service and its sandbox, so the window and the reuse
    // period are crossed by moving time, not by waiting.
    const T0: i64 = 1_800_000_000_000;
    let clock = friendhook::clock::ManualClock::new(T0);
    let app = TestApp::spawn_with_clock(&[], clock.clone()).await;
    app.register(&["alice", "bob"]).await;
    let (_, added) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(added["outcome"], "succeeded", "{added}");
    app.settle().await;
    let orphan = roster_body("910000000000000001", "carol", "dave", "add", T0 - 1_000, SECRET);
    assert_eq!(app.post_callback(orphan).await.status(), 200);
    let calls = |m: &std::collections::HashMap<String, f64>, status: &str| {
        m[&format!("friendhook_reconciliation_calls{{status=\"{status}\"}}")]
    };

    // Act + Assert: the report's figures, as /v1/reconciliation?since=<an hour ago> has them.
    let m = app.metrics().await;
    let (_, report) = app.get_json(&format!("/v1/reconciliation?since={}", T0 - 3_600_000)).await;
    assert_eq!(report["summary"]["matched"], 1, "{report}");
    assert_eq!(m["friendhook_reconciliation_window_seconds"], 3600.0, "the --metrics-reconcile-window default");
    assert_eq!(calls(&m, "matched"), 1.0);
    for status in ["pending", "missing", "not_expected", "unexpected"] {
        assert_eq!(calls(&m, status), 0.0, "{status}");
    }
    assert_eq!(m["friendhook_reconciliation_orphan_callbacks"], 1.0);
    assert_eq!(m["friendhook_reconciliation_latency_seconds{percentile=\"50\"}"], 0.0, "the clock stood still");

    // Within 10 s the figures are reused: a new orphan shows only once the clock has moved on.
    let another = roster_body("910000000000000002", "carol", "erin", "add", T0 - 500, SECRET);
    assert_eq!(app.post_callback(another).await.status(), 200);
    clock.advance_ms(9_999);
    assert_eq!(app.metrics().await["friendhook_reconciliation_orphan_callbacks"], 1.0, "reused");
    clock.advance_ms(1);
    assert_eq!(app.metrics().await["friendhook_reconciliation_orphan_callbacks"], 2.0, "recomputed");

    // An hour later, everything has left the window.
    clock.advance_ms(3_600_000);
    let m = app.metrics().await;
    assert_eq!(calls(&m, "matched"), 0.0);
    assert_eq!(m["friendhook_reconciliation_orphan_callbacks"], 0.0);
    assert!(m["friendhook_reconciliation_latency_seconds{percentile=\"99\"}"].is_nan(), "no call, no latency");
    app.stop().await;
}

#[tokio::test]
async fn a_zero_reconcile_window_leaves_the_reconciliation_figures_out() {
    let app = TestApp::spawn(&["--metrics-reconcile-window", "0s"]).await;
    let m = app.metrics().await;
    assert!(m.contains_key("friendhook_chain_head_seq"), "the other metrics are there");
    let reconciliation: Vec<&String> = m.keys().filter(|k| k.starts_with("friendhook_reconciliation")).collect();
    assert!(reconciliation.is_empty(), "{reconciliation:?}");
    app.stop().await;
}

/// `/readyz` commits a probe row; a readiness probe every second would otherwise fill the
/// group-commit figures (writes per commit, commit time) with one-write commits of its own.
#[tokio::test]
async fn readiness_probes_stay_out_of_the_group_commit_figures() {
    let app = TestApp::spawn(&[]).await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let m = app.metrics().await;
    assert_eq!(m["friendhook_commit_writes_count"], 0.0, "the probe's commit is not counted");
    assert_eq!(m["friendhook_commit_seconds_count"], 0.0);
    assert_eq!(m["friendhook_readyz_write_probes_total"], 1.0, "counted on its own");

    let body = roster_body("900000000000000101", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let m = app.metrics().await;
    assert_eq!((m["friendhook_commit_writes_count"], m["friendhook_commit_writes_sum"]), (1.0, 1.0));
    app.stop().await;
}

/// A client that gives up before its answer (here a feed long-poll, as a trigger waiting on
/// Easemob would be) is counted once, as 499, with the time it waited.
#[tokio::test]
async fn a_v1_request_whose_client_goes_away_is_counted_as_499() {
    let app = TestApp::spawn(&[]).await;
    let waiter = app.waiting_long_poll().await;

    // The client closes its connection: the service drops the handler it was running.
    waiter.abort();
    let closed = "friendhook_api_requests_total{route=\"/v1/feed\",method=\"GET\",code=\"499\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let m = loop {
        let m = app.metrics().await;
        if m.contains_key(closed) || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };

    assert_eq!(m.get(closed), Some(&1.0), "{m:?}");
    assert_eq!(m["friendhook_feed_long_polls"], 0.0, "the wait ended with the connection");
    assert_eq!(m.get("friendhook_api_request_seconds_count{route=\"/v1/feed\"}"), Some(&1.0));
    let answered = m.keys().filter(|k| k.starts_with("friendhook_api_requests_total{route=\"/v1/feed\"")).count();
    assert_eq!(answered, 1, "counted once, not also as 200: {m:?}");
    app.stop().await;
}
