//! POST /callbacks/easemob and the read-back endpoints.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn valid_callback_is_stored_with_its_raw_body() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("1187654321098765432", "alice", "bob", "add", 1_700_000_000_123, SECRET);

    let r = app.post_callback(body.clone()).await;
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["status"], "ok");
    assert_eq!(ack["duplicate"], false);
    let seq = ack["seq"].as_i64().unwrap();

    let (status, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(status, 200);
    let item = &list["items"][0];
    assert_eq!(item["seq"], seq);
    assert_eq!(item["call_id"], format!("{APPKEY}_1187654321098765432"));
    assert_eq!(item["msg_id"], "1187654321098765432");
    assert_eq!(item["operation"], "add");
    assert_eq!(item["from_user"], "alice");
    assert_eq!(item["to_user"], "bob");
    assert_eq!(item["chat_type"], "roster");
    assert_eq!(item["event_type"], "chat");
    assert_eq!(item["appkey"], APPKEY);
    assert_eq!(item["timestamp"], 1_700_000_000_123i64);
    assert_eq!(item["deliveries"], 1);
    assert_eq!(item["scheme"], "easemob");
    assert_eq!(item["secret_index"], 0);

    let (status, one) = app.get_json(&format!("/v1/callbacks/{seq}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["raw_body"].as_str().unwrap(), body, "raw body is kept byte-exact");
    assert_eq!(one["delivery_log"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_timestamp_sent_as_a_string_of_digits_is_verified_by_its_digits_and_stored() {
    let app = TestApp::spawn(&[]).await;
    let mut body: Value =
        serde_json::from_str(&roster_body("5501", "alice", "bob", "add", 1_700_000_000_321, SECRET)).unwrap();
    body["timestamp"] = json!("1700000000321");
    let body = body.to_string();

    let r = app.post_callback(body.clone()).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let seq = r.json::<Value>().await.unwrap()["seq"].as_i64().unwrap();
    let (_, one) = app.get_json(&format!("/v1/callbacks/{seq}")).await;
    assert_eq!(one["timestamp"], 1_700_000_000_321i64);
    assert_eq!(one["raw_body"].as_str().unwrap(), body, "stored as it came, quotes included");

    let mut forged: Value = serde_json::from_str(&body).unwrap();
    forged["timestamp"] = json!("1700000000322");
    assert_eq!(app.post_callback(forged.to_string()).await.status(), 401, "the digits are what is signed");
    app.stop().await;
}

#[tokio::test]
async fn duplicate_delivery_is_stored_once_and_counted() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("42", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    let first: Value = app.post_callback(body.clone()).await.json().await.unwrap();
    let r = app.post_callback(body.clone()).await;
    assert_eq!(r.status(), 200);
    let second: Value = r.json().await.unwrap();
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["seq"], first["seq"]);

    let (_, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["deliveries"], 2);
    let (_, one) = app.get_json(&format!("/v1/callbacks/{}", first["seq"])).await;
    assert_eq!(one["delivery_log"].as_array().unwrap().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn accept_and_remote_accept_sharing_a_call_id_are_two_events() {
    let app = TestApp::spawn(&[]).await;
    let ts = 1_642_648_213_494i64;
    let call_id = format!("{APPKEY}_966725899779049516");
    let security = friendhook::signature::easemob::sign(&call_id, SECRET, &ts.to_string());
    for (to, op) in [("alice", "remote_accept"), ("bob", "accept")] {
        let body = json!({"chat_type":"roster","callId":call_id,"security":security,
            "payload":{"roster_ver":"DD6E14FE5EE5A9ABC52CA86C5DE1601CF729BFD6","operation":op},
            "host":"x","appkey":APPKEY,"from":format!("{APPKEY}_bob@easemob.com"),"to":to,
            "eventType":"chat","msg_id":"966725899779049516","timestamp":ts});
        let r = app.post_callback(body.to_string()).await;
        assert_eq!(r.status(), 200);
        let ack: Value = r.json().await.unwrap();
        assert_eq!(ack["duplicate"], false);
    }
    let (_, list) = app.get_json(&format!("/v1/callbacks?call_id={}", urlencode(&call_id))).await;
    let ops: Vec<&str> = list["items"].as_array().unwrap().iter().map(|i| i["operation"].as_str().unwrap()).collect();
    assert_eq!(ops, vec!["remote_accept", "accept"]);
    app.stop().await;
}

fn urlencode(s: &str) -> String {
    s.replace('#', "%23")
}

#[tokio::test]
async fn from_user_containing_underscores_keeps_them() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("7", "al_ice_x", "b_o_b", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let (_, list) = app.get_json("/v1/callbacks?from=al_ice_x").await;
    assert_eq!(list["items"][0]["from_user"], "al_ice_x");
    assert_eq!(list["items"][0]["to_user"], "b_o_b");
    app.stop().await;
}

#[tokio::test]
async fn bad_signature_gets_401_and_a_rejection_record_but_no_event() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("9", "alice", "bob", "add", 1_700_000_000_000, "wrong-secret");
    let r = app.post_callback(body).await;
    assert_eq!(r.status(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(err["detail"], "signature verification failed", "does not say which check failed");

    let (_, list) = app.get_json("/v1/callbacks").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let db = app.db_url.clone();
    let _dir = app.stop().await;
    let rows = sqlite_count(
        &db,
        "SELECT count(*) FROM rejected_deliveries WHERE reason = 'signature_mismatch' AND body_size > 0",
    )
    .await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn rejection_log_is_capped() {
    let app = TestApp::spawn(&["--rejection-log-cap", "5"]).await;
    for i in 0..12 {
        let body = roster_body(&i.to_string(), "alice", "bob", "add", 1_700_000_000_000, "wrong-secret");
        assert_eq!(app.post_callback(body).await.status(), 401);
    }
    let db = app.db_url.clone();
    let _dir = app.stop().await;
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rejected_deliveries").await, 5);
    assert_eq!(sqlite_count(&db, "SELECT min(id) FROM rejected_deliveries").await, 8, "oldest pruned first");
}

pub async fn sqlite_count(db_url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(db_url).await.unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
}

#[tokio::test]
async fn malformed_json_gets_400_with_code_and_detail() {
    let app = TestApp::spawn(&[]).await;
    for body in ["{not json", "", "[1,2]", r#"{"timestamp": 1, "security": "x"}"#] {
        let r = app.post_callback(body.to_string()).await;
        assert_eq!(r.status(), 400, "body {body:?}");
        let err: Value = r.json().await.unwrap();
        assert!(err["code"].is_string() && err["detail"].is_string(), "{err}");
    }
    app.stop().await;
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let app = TestApp::spawn(&["--max-body-bytes", "1024"]).await;
    let big = format!(r#"{{"callId":"x","timestamp":1,"security":"{}"}}"#, "a".repeat(4096));
    let r = app.post_callback(big).await;
    assert_eq!(r.status(), 413);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "payload_too_large");
    app.stop().await;
}

#[tokio::test]
async fn fifty_identical_concurrent_deliveries_make_one_event_with_fifty_deliveries() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("5050", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = app.client.clone();
        let url = app.url("/callbacks/easemob");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (_, list) = app.get_json("/v1/callbacks").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["deliveries"], 50);
    app.stop().await;
}

#[tokio::test]
async fn stored_event_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("restart.db");
    let app = TestApp::spawn_on(&db, &[]).await;
    let body = roster_body("77", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    let ack: Value = app.post_callback(body.clone()).await.json().await.unwrap();
    app.stop().await;

    let app = TestApp::spawn_on(&db, &[]).await;
    let (status, one) = app.get_json(&format!("/v1/callbacks/{}", ack["seq"])).await;
    assert_eq!(status, 200);
    assert_eq!(one["raw_body"].as_str().unwrap(), body);
    // and a re-delivery after the restart is still recognised as a duplicate
    let again: Value = app.post_callback(body).await.json().await.unwrap();
    assert_eq!(again["duplicate"], true);
    app.stop().await;
}

#[tokio::test]
async fn unknown_callback_seq_is_404_json() {
    let app = TestApp::spawn(&[]).await;
    let (status, err) = app.get_json("/v1/callbacks/999").await;
    assert_eq!(status, 404);
    assert_eq!(err["code"], "not_found");
    let (status, _) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn listing_pages_with_a_cursor_in_sequence_order() {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice("10", 5).await;
    let (_, p1) = app.get_json("/v1/callbacks?limit=3").await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 3);
    let cursor = p1["next_cursor"].as_str().unwrap().to_string();
    let (_, p2) = app.get_json(&format!("/v1/callbacks?limit=3&cursor={cursor}")).await;
    let seqs: Vec<i64> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p2["items"].as_array().unwrap())
        .map(|i| i["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 5);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(p2["next_cursor"].is_null());
    let (_, ranged) = app.get_json("/v1/callbacks?since=1700000000002&until=1700000000004").await;
    assert_eq!(ranged["items"].as_array().unwrap().len(), 2);
    app.stop().await;
}

/// A misspelt operation filter is an error, not an empty page that reads as "no such events";
/// one that stored callbacks have is served, documented or not.
#[tokio::test]
async fn an_operation_filter_nothing_has_and_easemob_does_not_document_is_refused() {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice("20", 1).await;
    for op in ["ADD", "bogus"] {
        let (status, err) = app.get_json(&format!("/v1/callbacks?operation={op}")).await;
        assert_eq!((status, &err["code"]), (400, &json!("invalid_query")), "{op}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("roster operations are add, remove,"), "{op}: {err}");
    }
    let (status, none) = app.get_json("/v1/callbacks?operation=remove").await;
    assert_eq!((status, none["items"].as_array().map(Vec::len)), (200, Some(0)), "documented, none yet: {none}");
    let body = roster_body("20990", "alice", "bob", "renamed", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let (status, found) = app.get_json("/v1/callbacks?operation=renamed").await;
    assert_eq!((status, found["items"].as_array().map(Vec::len)), (200, Some(1)), "{found}");
    let (status, _) = app.get_json("/v1/callbacks?operation=renamed&from=carol").await;
    assert_eq!(status, 200, "an operation some callback has is a filter like any other");
    app.stop().await;
}

/// Signs like a relay speaking Standard Webhooks would (HMAC-SHA256 over `id.timestamp.body`).
fn standard_webhooks_request(app: &TestApp, body: &str, key: &[u8], msg_id: &str, ts: i64) -> reqwest::RequestBuilder {
    let sig = friendhook::signature::standard_webhooks::sign(msg_id, ts, body.as_bytes(), key);
    app.client
        .post(app.url("/callbacks/easemob"))
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", format!("v1,bm90LXRoaXMtb25l {sig}"))
        .body(body.to_string())
}

#[tokio::test]
async fn standard_webhooks_scheme_verifies_the_whole_body_and_the_timestamp() {
    use base64::Engine;
    let key = b"relay-shared-key-0123456789abcdef";
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let app = TestApp::spawn(&["--signature-scheme", "standard-webhooks", "--callback-secret", &secret]).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // An Easemob body without `security`: the relay's signature replaces it.
    let body = r#"{"chat_type":"roster","callId":"demo-org#demo-app_42","payload":{"operation":"add"},"appkey":"demo-org#demo-app","from":"demo-org#demo-app_alice@easemob.com","to":"bob","eventType":"chat","msg_id":"42","timestamp":1700000000000}"#;

    let ok = standard_webhooks_request(&app, body, key, "msg_1", now).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let tampered = body.replace("bob", "eve");
    let sig_for_original = friendhook::signature::standard_webhooks::sign("msg_2", now, body.as_bytes(), key);
    let r = app
        .client
        .post(app.url("/callbacks/easemob"))
        .header("content-type", "application/json")
        .header("webhook-id", "msg_2")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", sig_for_original)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the body is signed: changing `to` fails");
    let stale = standard_webhooks_request(&app, body, key, "msg_3", now - 3600).send().await.unwrap();
    assert_eq!(stale.status(), 401, "outside the 5 minute tolerance");
    let (_, list) = app.get_json("/v1/callbacks").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["scheme"], "standard-webhooks");
    app.stop().await;
}

#[tokio::test]
async fn allow_from_refuses_sources_outside_the_list() {
    let outside = TestApp::spawn(&["--allow-from", "10.0.0.0/8"]).await;
    let body = roster_body("7001", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    let r = outside.post_callback(body.clone()).await;
    assert_eq!(r.status(), 403);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "forbidden");
    outside.stop().await;

    let inside = TestApp::spawn(&["--allow-from", "10.0.0.0/8,127.0.0.0/8"]).await;
    assert_eq!(inside.post_callback(body).await.status(), 200);
    inside.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_checked_and_recorded() {
    let forwarded = |app: &TestApp, body: String, xff: &'static str| {
        app.client
            .post(app.url("/callbacks/easemob"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", xff)
            .body(body)
            .send()
    };
    // The test client is on 127.0.0.1: it plays the reverse proxy.
    let app = TestApp::spawn(&["--trusted-proxy", "127.0.0.0/8", "--allow-from", "203.0.113.0/24"]).await;
    let body = roster_body("7101", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    let r = forwarded(&app, body.clone(), "198.51.100.1, 203.0.113.7").await.unwrap();
    assert_eq!(r.status(), 200, "the proxy saw 203.0.113.7");
    let seq = r.json::<Value>().await.unwrap()["seq"].as_i64().unwrap();
    let (_, one) = app.get_json(&format!("/v1/callbacks/{seq}")).await;
    assert_eq!(one["delivery_log"][0]["remote_addr"], "203.0.113.7", "the sender, not the proxy");

    // What a sender writes itself (the left entries) is not believed.
    let r = forwarded(&app, roster_body("7102", "alice", "bob", "add", 1, SECRET), "203.0.113.7, 198.51.100.1")
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the proxy saw 198.51.100.1");
    // Without the header the proxy itself is the source, outside the list.
    assert_eq!(app.post_callback(roster_body("7103", "alice", "bob", "add", 1, SECRET)).await.status(), 403);

    // A bad signature's rejection record names the forwarded source too.
    let bad = roster_body("7104", "alice", "bob", "add", 1, "wrong-secret");
    assert_eq!(forwarded(&app, bad, "203.0.113.9").await.unwrap().status(), 401);
    let db = app.db_url.clone();
    let _dir = app.stop().await;
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM rejected_deliveries WHERE remote_addr = '203.0.113.9'").await,
        1
    );

    // A stray byte in what the sender wrote does not turn the source into the (allowed) proxy.
    let app = TestApp::spawn(&["--trusted-proxy", "127.0.0.1/32", "--allow-from", "203.0.113.0/24,127.0.0.1/32"]).await;
    let r = app
        .client
        .post(app.url("/callbacks/easemob"))
        .header("content-type", "application/json")
        .header("x-forwarded-for", reqwest::header::HeaderValue::from_bytes(b"203.0.113.5\xff, 198.51.100.1").unwrap())
        .body(roster_body("7106", "alice", "bob", "add", 1, SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the proxy saw 198.51.100.1");
    app.stop().await;

    // Without --trusted-proxy the header is ignored: a sender cannot claim an allowed address.
    let app = TestApp::spawn(&["--allow-from", "203.0.113.0/24"]).await;
    let r = forwarded(&app, roster_body("7105", "alice", "bob", "add", 1, SECRET), "203.0.113.7").await.unwrap();
    assert_eq!(r.status(), 403);
    app.stop().await;
}

#[tokio::test]
async fn a_callback_without_a_signature_is_refused_like_a_bad_one_and_quarantined_in_that_mode() {
    let unsigned = |msg_id: &str| {
        let mut body: serde_json::Value =
            serde_json::from_str(&roster_body(msg_id, "alice", "bob", "add", 1_700_000_000_000, SECRET)).unwrap();
        body.as_object_mut().unwrap().remove("security");
        body.to_string()
    };
    let app = TestApp::spawn(&[]).await;
    let r = app.post_callback(unsigned("4401")).await;
    assert_eq!(r.status(), 401, "it cannot be authenticated: not a 400 for an unreadable body");
    let m = app.metrics().await;
    assert_eq!(m.get(r#"friendhook_callbacks_received_total{result="rejected"}"#), Some(&1.0));
    app.stop().await;

    let app = TestApp::spawn(&["--on-bad-signature", "quarantine"]).await;
    let r = app.post_callback(unsigned("4402")).await;
    assert_eq!(r.status(), 200);
    let ack: serde_json::Value = r.json().await.unwrap();
    assert_eq!(ack["status"], "quarantined");
    app.stop().await;
}

#[tokio::test]
async fn callback_users_are_stored_lower_cased_and_found_by_any_case() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("4403", "Alice", "Bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let (_, list) = app.get_json("/v1/callbacks?to=BOB&from=alice").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!((items[0]["from_user"].as_str(), items[0]["to_user"].as_str()), (Some("alice"), Some("bob")), "{list}");
    app.stop().await;
}

#[tokio::test]
async fn callbacks_stored_with_upper_case_users_by_an_earlier_release_are_found_and_matched_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("upgraded.db");
    database_where_alice_added_bob(&db).await;

    // What an earlier release left behind: users stored as sent ("Alice"), their lookup entries
    // likewise, and schema version 4.
    crate::journal::sqlite(
        &db,
        "DROP TRIGGER callbacks_immutable; UPDATE callbacks SET from_user = 'Alice' WHERE from_user = 'alice'; \
         UPDATE callback_users SET user_id = 'Alice' WHERE user_id = 'alice'; \
         DELETE FROM _sqlx_migrations WHERE version = 5;",
    );
    assert_eq!(
        sqlite_count(&format!("sqlite://{}", db.display()), "SELECT count(*) FROM callbacks WHERE from_user = 'Alice'")
            .await,
        1
    );

    let app = TestApp::spawn_on(&db, &[]).await;
    for filter in ["from=alice", "from=Alice", "to=bob&from=ALICE"] {
        let (_, list) = app.get_json(&format!("/v1/callbacks?{filter}")).await;
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{filter}: {list}");
    }
    let (_, report) = app.get_json("/v1/reconciliation").await;
    assert_eq!(report["summary"]["matched"], 1, "{report}");
    app.stop().await;
}
