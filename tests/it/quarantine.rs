//! `--on-bad-signature quarantine` on the receive path, and `friendhook quarantine list|reverify`
//! run as the real binary against the service's SQLite file (while it runs, and after it stopped).

use serde_json::Value;

use crate::helpers::*;

/// The secret Easemob signs with after a rotation the service has not caught up with.
const ROTATED: &str = "rotated-secret";

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn friendhook(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(args)
        // The tests' own environment must not choose the database or the secret.
        .env_remove("FRIENDHOOK_DATABASE_URL")
        .env_remove("FRIENDHOOK_CALLBACK_SECRET")
        .env_remove("FRIENDHOOK_SIGNATURE_SCHEME")
        .output()
        .await
        .expect("run the friendhook binary");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn list_json(db_url: &str, all: bool) -> Value {
    let mut args = vec!["quarantine", "list", "--json", "--database-url", db_url];
    if all {
        args.push("--all");
    }
    let out = friendhook(&args).await;
    assert_eq!(out.code, 0, "list failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("list --json prints JSON")
}

/// Runs `reverify` and checks its exit code against its summary: 0 when nothing is left held, 3
/// when some requests stay held (a cron job alerts on it).
async fn reverify(db_url: &str, secrets: &str, extra: &[&str]) -> String {
    let mut args = vec!["quarantine", "reverify", "--database-url", db_url, "--callback-secret", secrets];
    args.extend_from_slice(extra);
    let out = friendhook(&args).await;
    let held: u64 = out
        .stdout
        .split("still held ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {}\n{}", out.stderr, out.stdout));
    assert_eq!(out.code, if held > 0 { 3 } else { 0 }, "still held {held}: {}\n{}", out.stderr, out.stdout);
    out.stdout
}

async fn audit_verify(db_url: &str) -> Output {
    friendhook(&["audit", "verify", "--database-url", db_url]).await
}

async fn callbacks(app: &TestApp) -> Vec<Value> {
    let (status, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(status, 200);
    list["items"].as_array().expect("items").clone()
}

fn sha256_hex(bytes: &[u8]) -> String {
    friendhook::store::chain::sha256_hex(bytes)
}

#[tokio::test]
async fn wrong_secret_in_quarantine_mode_is_answered_200_and_held_but_not_an_event() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    let body = roster_body("3001", "alice", "bob", "add", 1_700_000_000_123, ROTATED);

    let r = app.post_callback(body.clone()).await;
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.expect("json");
    assert_eq!(ack, serde_json::json!({"status": "quarantined"}));

    assert!(callbacks(&app).await.is_empty(), "a quarantined request is not an event");
    let (_, ready) = app.get_json("/readyz").await;
    assert_eq!(ready["quarantine"]["held"], 1);
    assert_eq!(ready["quarantine"]["quarantined_since_start"], 1);
    let m = app.metrics().await;
    assert_eq!(m["friendhook_quarantine_held"], 1.0);
    assert_eq!(m["friendhook_callbacks_received_total{result=\"quarantined\"}"], 1.0);

    let listed = list_json(&app.db_url, false).await;
    assert_eq!(listed["held"], 1);
    let item = &listed["items"][0];
    assert_eq!(item["call_id"], format!("{APPKEY}_3001"));
    assert_eq!(item["timestamp"], 1_700_000_000_123i64);
    assert_eq!(item["reason"], "signature_mismatch");
    assert_eq!(item["body_size"], body.len());
    assert_eq!(item["body_sha256"], sha256_hex(body.as_bytes()));
    assert_eq!(item["promoted"], false);
    assert!(item["remote_addr"].as_str().expect("remote").starts_with("127.0.0.1:"));
    assert!(item["received_at"].as_str().expect("time").ends_with('Z'), "RFC 3339: {item}");

    let table = friendhook(&["quarantine", "list", "--database-url", &app.db_url]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("signature_mismatch") && table.stdout.contains("_3001"), "{}", table.stdout);
    assert!(table.stdout.contains("friendhook quarantine reverify"), "says what to do next: {}", table.stdout);
    app.stop().await;
}

#[tokio::test]
async fn reverify_promotes_only_with_the_right_secret_while_the_service_runs() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    let body = roster_body("3002", "alice", "bob", "add", 1_700_000_000_000, ROTATED);
    assert_eq!(app.post_callback(body.clone()).await.status(), 200);
    let received_at_ms = list_json(&app.db_url, false).await["items"][0]["received_at_ms"].clone();

    let out = reverify(&app.db_url, "yet-another-secret", &[]).await;
    assert!(
        out.contains("checked 1, promoted 0 (of which 0 were duplicates of events already stored), still held 1"),
        "{out}"
    );
    assert!(out.contains("Easemob console"), "says what to check: {out}");
    let out = reverify(&app.db_url, ROTATED, &["--dry-run"]).await;
    assert!(out.contains("would promote 1"), "{out}");
    assert!(callbacks(&app).await.is_empty(), "neither a wrong secret nor a dry run stores anything");
    assert_eq!(list_json(&app.db_url, false).await["held"], 1);

    // Written as an operator might paste the service's value: spaces and a trailing comma are
    // read as `serve` reads them.
    let out = reverify(&app.db_url, &format!("yet-another-secret, {ROTATED} ,"), &[]).await;
    assert!(
        out.contains("checked 1, promoted 1 (of which 0 were duplicates of events already stored), still held 0"),
        "{out}"
    );

    let items = callbacks(&app).await;
    assert_eq!(items.len(), 1);
    let seq = items[0]["seq"].as_i64().expect("seq");
    assert_eq!(items[0]["call_id"], format!("{APPKEY}_3002"));
    assert_eq!(items[0]["secret_index"], 1, "index among the secrets given to reverify");
    assert_eq!(items[0]["received_at"], received_at_ms, "the event keeps its arrival time");
    let (_, one) = app.get_json(&format!("/v1/callbacks/{seq}")).await;
    assert_eq!(one["raw_body"].as_str().expect("raw body"), body, "raw body is kept byte-exact");

    assert!(list_json(&app.db_url, false).await["items"].as_array().expect("items").is_empty());
    let all = list_json(&app.db_url, true).await;
    assert_eq!(all["items"][0]["promoted"], true);
    assert_eq!(all["items"][0]["promoted_seq"], seq);
    let (_, ready) = app.get_json("/readyz").await;
    assert_eq!(ready["quarantine"]["held"], 0);
    assert_eq!(app.metrics().await["friendhook_quarantine_held"], 0.0, "promoted by another process");

    let out = reverify(&app.db_url, ROTATED, &[]).await;
    assert!(out.contains("checked 0, promoted 0"), "a second run finds nothing to do: {out}");

    // The running service numbers its next event after the one reverify stored.
    let next = roster_body("3003", "carol", "dave", "add", 1_700_000_000_001, SECRET);
    let r = app.post_callback(next).await;
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.expect("json");
    assert_eq!(ack["seq"], seq + 1);
    let audit = audit_verify(&app.db_url).await;
    assert_eq!(audit.code, 0, "audit chain: {}{}", audit.stdout, audit.stderr);
    app.stop().await;
}

#[tokio::test]
async fn a_callback_quarantined_and_later_delivered_correctly_signed_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("rotation.db");
    // Easemob signs with the rotated secret; the service still only knows the old one.
    let app = TestApp::spawn_on(&db, &["--on-bad-signature", "quarantine"]).await;
    let signed = roster_body("3004", "alice", "bob", "add", 1_700_000_000_000, ROTATED);
    let r = app.post_callback(signed.clone()).await;
    assert_eq!(r.json::<Value>().await.expect("json")["status"], "quarantined");
    app.stop().await;

    // Fixed configuration; Easemob delivers the same event again.
    let app = TestApp::spawn_on(&db, &["--on-bad-signature", "quarantine", "--callback-secret", ROTATED]).await;
    let r = app.post_callback(signed.clone()).await;
    let ack: Value = r.json().await.expect("json");
    assert_eq!((ack["status"].as_str(), ack["duplicate"].as_bool()), (Some("ok"), Some(false)));
    let db_url = app.db_url.clone();
    app.stop().await;

    // A dry run already tells the duplicate from a promotion.
    let out = reverify(&db_url, ROTATED, &["--dry-run"]).await;
    assert!(
        out.contains("would promote 1 (of which 1 were duplicates of events already stored), still held 0"),
        "{out}"
    );
    assert!(out.contains(&format!("as one more delivery of event seq {}", ack["seq"])), "{out}");

    // Reverify on the stopped database.
    let out = reverify(&db_url, ROTATED, &[]).await;
    assert!(
        out.contains("checked 1, promoted 1 (of which 1 were duplicates of events already stored), still held 0"),
        "{out}"
    );
    let app = TestApp::spawn_on(&db, &[]).await;
    let items = callbacks(&app).await;
    assert_eq!(items.len(), 1, "stored once");
    assert_eq!(items[0]["seq"], ack["seq"]);
    assert_eq!(items[0]["deliveries"], 2, "the quarantined request counts as a delivery");
    assert_eq!(list_json(&db_url, true).await["items"][0]["promoted_seq"], ack["seq"]);
    let audit = audit_verify(&db_url).await;
    assert_eq!(audit.code, 0, "audit chain: {}{}", audit.stdout, audit.stderr);
    app.stop().await;
}

#[tokio::test]
async fn beyond_the_quarantine_cap_a_bad_request_is_answered_401_and_recorded_as_a_rejection() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine", "--quarantine-cap", "3"]).await;
    for i in 0..3 {
        let body = roster_body(&format!("31{i}"), "alice", "bob", "add", 1_700_000_000_000, ROTATED);
        let r = app.post_callback(body).await;
        assert_eq!(r.status(), 200, "request {i} fits in the quarantine");
    }
    let fourth = roster_body("314", "alice", "bob", "add", 1_700_000_000_000, ROTATED);
    let r = app.post_callback(fourth.clone()).await;
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["code"], "unauthorized");

    let reader = friendhook::store::Store::open_read_only(&app.db_url).await.expect("open read-only");
    assert_eq!(reader.rejection_stats().await.expect("stats").rejected_deliveries, 1);
    assert_eq!(reader.count_quarantine_held().await.expect("count"), 3);

    // Promoting frees room: the next bad request is held again.
    reverify(&app.db_url, ROTATED, &[]).await;
    assert_eq!(app.post_callback(fourth).await.status(), 200);
    assert_eq!(reader.count_quarantine_held().await.expect("count"), 1);
    app.stop().await;
}

#[tokio::test]
async fn default_reject_mode_still_answers_401_and_holds_nothing() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("3005", "alice", "bob", "add", 1_700_000_000_000, ROTATED);
    assert_eq!(app.post_callback(body).await.status(), 401);
    let listed = list_json(&app.db_url, true).await;
    assert_eq!(listed["held"], 0);
    assert!(listed["items"].as_array().expect("items").is_empty());
    let table = friendhook(&["quarantine", "list", "--database-url", &app.db_url]).await;
    assert!(table.stdout.contains("Nothing held"), "{}", table.stdout);
    app.stop().await;
}

#[tokio::test]
async fn reverify_during_live_traffic_keeps_one_gap_free_chain() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    for i in 0..40 {
        let body = roster_body(&format!("32{i:02}"), "alice", &format!("q{i}"), "add", 1_700_000_000_000 + i, ROTATED);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    // Valid callbacks keep arriving while reverify promotes the held ones from another process.
    let traffic = {
        let client = app.client.clone();
        let url = app.url("/callbacks/easemob");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..40 {
                let body =
                    roster_body(&format!("33{i:02}"), "bob", &format!("v{i}"), "add", 1_700_000_100_000 + i, SECRET);
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
                tokio::task::yield_now().await;
            }
            statuses
        })
    };
    let out = reverify(&app.db_url, ROTATED, &[]).await;
    assert!(out.contains("checked 40, promoted 40"), "{out}");
    let statuses = traffic.await.expect("traffic task");
    assert!(statuses.iter().all(|s| *s == 200), "every live callback stored: {statuses:?}");

    let mut seqs = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, page) = app.get_json(&format!("/v1/callbacks?limit=1000{cursor}")).await;
        seqs.extend(page["items"].as_array().expect("items").iter().map(|i| i["seq"].as_i64().expect("seq")));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seqs, (1..=80).collect::<Vec<i64>>(), "one gap-free numbering across both processes");
    let audit = audit_verify(&app.db_url).await;
    assert_eq!(audit.code, 0, "audit chain: {}{}", audit.stdout, audit.stderr);
    app.stop().await;
}

#[tokio::test]
async fn reverify_refuses_a_database_that_does_not_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("typo.db").display());
    let out = friendhook(&["quarantine", "reverify", "--database-url", &url, "--callback-secret", ROTATED]).await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--database-url"), "says what to check: {}", out.stderr);
    assert!(!dir.path().join("typo.db").exists(), "no empty database is created");
}

#[tokio::test]
async fn a_held_request_edited_in_the_file_is_never_promoted() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    for (msg_id, to) in [("3101", "bob"), ("3102", "carol")] {
        let body = roster_body(msg_id, "alice", to, "add", 1_700_000_000_123, ROTATED);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let (db_path, db_url) = (app.db_path.clone(), app.db_url.clone());
    let _dir = app.stop().await;
    // Someone with write access swaps the addressee of one held request (the quarantine has no
    // chain and no triggers); the signature does not cover `to`, so it would still verify.
    let edit = std::process::Command::new("sqlite3")
        .arg(&db_path)
        .arg("UPDATE quarantine SET raw_body = CAST(replace(CAST(raw_body AS TEXT), '\"to\":\"carol\"', '\"to\":\"mallory\"') AS BLOB) WHERE instr(CAST(raw_body AS TEXT), 'carol') > 0;")
        .output()
        .expect("sqlite3 is installed (.ci/run installs it)");
    assert!(edit.status.success(), "{}", String::from_utf8_lossy(&edit.stderr));

    let out = reverify(&db_url, ROTATED, &[]).await;

    assert!(out.contains("does not match its digest from arrival"), "{out}");
    assert!(out.contains("promoted 1 ") && out.contains("still held 1"), "{out}");
    assert!(out.contains("the quarantine was edited in the database file"), "{out}");
    let held = list_json(&db_url, false).await;
    assert_eq!(held["held"], 1, "{held}");
    assert_eq!(held["items"][0]["call_id"], "demo-org#demo-app_3102", "{held}");
}

#[tokio::test]
async fn a_feed_long_poll_sees_events_promoted_by_reverify_beside_the_service() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    let body = roster_body("3201", "alice", "bob", "add", 1_700_000_000_123, ROTATED);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let client = app.client.clone();
    let url = app.url("/v1/feed?after=0&wait=60s");
    let long_poll = tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() });

    // Another process commits the event; the service's own writer never sees it.
    let out = reverify(&app.db_url, ROTATED, &[]).await;
    assert!(out.contains("promoted as event seq 1"), "{out}");

    let text = tokio::time::timeout(std::time::Duration::from_secs(20), long_poll)
        .await
        .expect("the long-poll answers well before its 60 s wait")
        .unwrap();
    let first: Value = serde_json::from_str(text.lines().next().expect("a record")).unwrap();
    assert_eq!((first["seq"].as_i64(), first["id"].as_str()), (Some(1), Some("demo-org#demo-app_3201")));
    app.stop().await;
}

/// A callback held in quarantine could not be matched while it was held: promoted after its
/// call was declared missing, it makes the call `matched` and `late`, with the latency to its
/// promotion, and says when it was promoted.
#[tokio::test]
async fn a_callback_promoted_after_its_call_was_declared_missing_reads_late() {
    let (app, call) = alice_added_bob_and_no_callback_came(&["--on-bad-signature", "quarantine"]).await;
    let t = call["requested_at"].as_i64().unwrap();
    let held = app.post_callback(roster_body("3301", "alice", "bob", "add", t, ROTATED)).await;
    assert_eq!(held.json::<Value>().await.unwrap()["status"], "quarantined");
    let (_, before) = app.get_json("/v1/reconciliation").await;
    assert_eq!(before["items"][0]["status"], "missing", "{before}");

    reverify(&app.db_url, ROTATED, &[]).await;
    let (_, after) = app.get_json("/v1/reconciliation").await;
    let item = &after["items"][0];
    assert_eq!((item["status"].as_str(), item["late"].as_bool()), (Some("matched"), Some(true)), "{after}");
    let matched = &item["matched"];
    let promoted_at = matched["promoted_at"].as_i64().expect("says when it was promoted");
    assert!(promoted_at >= matched["received_at"].as_i64().unwrap(), "{after}");
    assert_eq!(item["latency_ms"].as_i64(), Some(promoted_at - t), "measured to the promotion: {after}");
    // The event's own record says so too, in the list and alone (what a secret's rotation checks).
    let seq = matched["seq"].as_i64().unwrap();
    let (_, one) = app.get_json(&format!("/v1/callbacks/{seq}")).await;
    assert_eq!(one["promoted_at"].as_i64(), Some(promoted_at), "{one}");
    // `quarantine list --json` gives it as epoch ms too, beside its RFC 3339 text.
    let listed = list_json(&app.db_url, true).await;
    let row = &listed["items"][0];
    assert_eq!(row["promoted_at_ms"].as_i64(), Some(promoted_at), "{listed}");
    assert!(row["promoted_at"].is_string(), "{listed}");
    let (_, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(list["items"][0]["promoted_at"].as_i64(), Some(promoted_at), "{list}");
    let arrived = app.post_callback(roster_body("3302", "alice", "bob", "remove", t + 1, SECRET)).await;
    assert_eq!(arrived.status(), 200);
    let (_, list) = app.get_json("/v1/callbacks").await;
    assert!(list["items"][1]["seq"].is_i64() && list["items"][1]["promoted_at"].is_null(), "stored as it came: {list}");
    app.stop().await;
}

/// Requests that will never verify (here: junk posted without the secret) fill the quarantine
/// up to its cap, after which even a callback signed with a rotated secret is refused 401.
/// `quarantine purge` deletes held requests by age, id or reason, with a dry run first, while the
/// service runs; promoted requests stay.
#[tokio::test]
async fn purge_deletes_held_requests_that_will_never_verify_and_frees_the_cap() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine", "--quarantine-cap", "3"]).await;
    let rotated = roster_body("3401", "alice", "bob", "add", 1_700_000_000_000, ROTATED);
    assert_eq!(app.post_callback(rotated).await.status(), 200);
    for i in 0..2 {
        let junk = roster_body(&format!("340{}", i + 2), "mallory", "bob", "add", 1_700_000_000_000, "guess");
        assert_eq!(app.post_callback(junk).await.status(), 200, "junk {i} fits in the quarantine");
    }
    let late = roster_body("3409", "carol", "dave", "add", 1_700_000_000_000, ROTATED);
    assert_eq!(app.post_callback(late.clone()).await.status(), 401, "the cap is full");
    reverify(&app.db_url, ROTATED, &[]).await;
    let held: Vec<i64> = list_json(&app.db_url, false).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_i64().unwrap())
        .collect();
    assert_eq!(held.len(), 2, "the junk stays held");

    let out = friendhook(&["quarantine", "purge", "--database-url", &app.db_url]).await;
    assert_eq!(out.code, 2, "neither --older-than nor --id: a usage error, nothing deleted: {}", out.stderr);
    let first = held[0].to_string();
    let out = friendhook(&["quarantine", "purge", "--database-url", &app.db_url, "--id", &first, "--dry-run"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("would delete 1 held request(s)") && out.stdout.contains("2 held now"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "every id given was held: {}", out.stderr);
    let ids = ["--id", &first, "--id", "999999", "--dry-run"];
    let out = friendhook(&[&["quarantine", "purge", "--database-url", &app.db_url][..], &ids[..]].concat()).await;
    assert!(out.stdout.contains("would delete 1 held request(s)"), "{}", out.stdout);
    assert!(
        out.stderr.contains("1 of the 2 --id given matched no held request"),
        "a mistyped id is said: {}",
        out.stderr
    );
    let args = ["quarantine", "purge", "--database-url", &app.db_url, "--older-than", "0s"];
    let out = friendhook(&[&args[..], &["--reason", "missing_header"]].concat()).await;
    assert!(out.stdout.contains("deleted 0 held request(s)"), "no such reason held: {}", out.stdout);
    let out = friendhook(&args).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("deleted 2 held request(s)") && out.stdout.contains("0 held now"), "{}", out.stdout);

    let all = list_json(&app.db_url, true).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(1), "the promoted request is kept: {all}");
    assert_eq!(all["items"][0]["promoted"], true);
    assert_eq!(app.post_callback(late).await.status(), 200, "room in the quarantine again");
    app.stop().await;
}

/// A promotion that only adds a delivery to an event stored already changes nothing about when
/// that event could be matched: its call stays on time, with the same latency, and a report
/// given `as_of` before the promotion is the same report after it.
#[tokio::test]
async fn promoting_another_delivery_of_a_stored_event_leaves_its_reconciliation_alone() {
    let (app, call) = alice_added_bob_and_no_callback_came(&["--on-bad-signature", "quarantine"]).await;
    let t = call["requested_at"].as_i64().unwrap();
    assert_eq!(app.post_callback(roster_body("3501", "alice", "bob", "add", t, SECRET)).await.status(), 200);
    let (_, before) = app.get_json("/v1/reconciliation").await;
    let item = before["items"][0].clone();
    assert_eq!((item["status"].as_str(), item["matched"]["promoted_at"].is_null()), (Some("matched"), true));
    let as_of = before["as_of"].as_str().unwrap().to_string();

    // The same event again, signed with a rotated secret: held, then promoted as a duplicate.
    let held = app.post_callback(roster_body("3501", "alice", "bob", "add", t, ROTATED)).await;
    assert_eq!(held.json::<Value>().await.unwrap()["status"], "quarantined");
    let out = reverify(&app.db_url, ROTATED, &[]).await;
    assert!(out.contains("promoted 1 (of which 1 were duplicates"), "{out}");

    let (_, after) = app.get_json("/v1/reconciliation").await;
    let again = &after["items"][0];
    for key in ["status", "late", "latency_ms"] {
        assert_eq!(again[key], item[key], "{key}: {after}");
    }
    assert!(again["matched"]["promoted_at"].is_null(), "{after}");
    let (_, same) = app.get_json(&format!("/v1/reconciliation?as_of={as_of}")).await;
    assert_eq!(same["items"], before["items"], "the report as of before the promotion");
    app.stop().await;
}

/// A promotion is not chained, but reconciliation measures the promoted event's lateness to it:
/// the database keeps it as it was written (a held row can still be purged), and `audit verify`
/// compares it with the event it names.
#[tokio::test]
async fn a_promotion_is_kept_as_written_and_verify_compares_it_with_its_event() {
    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    let valid = roster_body("3601", "alice", "carol", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(valid).await.status(), 200);
    let held = roster_body("3602", "alice", "bob", "add", 1_700_000_000_001, ROTATED);
    assert_eq!(app.post_callback(held).await.status(), 200);
    let (db_path, db_url) = (app.db_path.clone(), app.db_url.clone());
    let _dir = app.stop().await;
    let out = reverify(&db_url, ROTATED, &[]).await;
    assert!(out.contains("promoted 1 "), "{out}");
    assert_eq!(audit_verify(&db_url).await.code, 0);

    let sqlite = |sql: &str| {
        let out = std::process::Command::new("sqlite3").arg(&db_path).arg(sql).output().expect("sqlite3 is installed");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = sqlite("DELETE FROM quarantine WHERE promoted_at_ms IS NOT NULL");
    assert!(!ok && err.contains("a promotion from quarantine is kept"), "{err}");
    let (ok, err) = sqlite("UPDATE quarantine SET promoted_at_ms = promoted_at_ms - 3600000");
    assert!(!ok && err.contains("a promotion from quarantine is recorded once"), "{err}");
    let (ok, err) = sqlite("UPDATE quarantine SET promoted_seq = 1");
    assert!(!ok && err.contains("a promotion from quarantine is recorded once"), "{err}");

    // Without its guard, the promotion is pointed at the event that arrived correctly signed
    // (it was never held); with the guard put back word for word, only the comparison is left.
    let migration = include_str!("../../migrations/0009_quarantine_promotions_kept.sql");
    let (ok, err) = sqlite(&format!(
        "DROP TRIGGER quarantine_promotion_once; DROP TRIGGER quarantine_promoted_no_delete;
         UPDATE quarantine SET promoted_seq = 1; {migration}"
    ));
    assert!(ok, "{err}");
    let out = audit_verify(&db_url).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("1 promotion(s) from quarantine disagree with the event they name (quarantine id 1 (seq 1))"),
        "{}",
        out.stdout
    );
}

/// The moment the quarantine fills, and failed callbacks go from held (200) to refused (401,
/// events Easemob drops after its retry), is told in the log at once, even right after a line
/// about the quarantined ones (each kind has its own 10 s spacing).
#[tokio::test]
async fn the_log_says_when_the_quarantine_is_full_right_after_quarantining() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("full.db").display());
    let mut service = crate::process::ServeProcess::start(
        &db_url,
        &["--on-bad-signature", "quarantine", "--quarantine-cap", "1"],
        &[],
    )
    .await;
    let http = crate::process::bounded_client();
    let mut statuses = Vec::new();
    for msg in ["full-1", "full-2"] {
        let body = roster_body(msg, "alice", "bob", "add", 1_700_000_000_000, "not-the-secret");
        let answer = http
            .post(format!("{}/callbacks/easemob", service.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("answered");
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(statuses, [200, 401], "held, then refused");
    service
        .wait_for_log("the quarantine is full (--quarantine-cap); answered 401", std::time::Duration::from_secs(10))
        .await;
    service.signal("TERM");
    service.wait_exit(std::time::Duration::from_secs(20)).await;
    let log = service.log();
    assert!(log.contains("QUARANTINED and answered 200"), "{log}");
}
