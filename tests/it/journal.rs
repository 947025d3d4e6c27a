//! The feed, the audit chain and `friendhook audit verify`.

use serde_json::Value;

use crate::helpers::*;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_friendhook")
}

async fn feed_page(app: &TestApp, after: i64, limit: i64) -> Vec<Value> {
    let r = app.client.get(app.url(&format!("/v1/feed?after={after}&limit={limit}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn feed_pages_through_everything_across_a_restart_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("feed.db");
    let app = TestApp::spawn_on(&db, &[]).await;
    for i in 0..30 {
        let body = roster_body(&format!("9{i:03}"), "alice", &format!("f{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let mut seen: Vec<i64> = Vec::new();
    let mut after = 0;
    // read a first part, then restart the service in the middle of the consumer's run
    for _ in 0..2 {
        let page = feed_page(&app, after, 7).await;
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        seen.extend(page.iter().map(|r| r["seq"].as_i64().unwrap()));
    }
    app.stop().await;
    let app = TestApp::spawn_on(&db, &[]).await;
    for i in 30..40 {
        let body = roster_body(&format!("9{i:03}"), "bob", &format!("f{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    loop {
        let page = feed_page(&app, after, 7).await;
        let Some(last) = page.last() else { break };
        after = last["seq"].as_i64().unwrap();
        for r in &page {
            assert_eq!(r["kind"], "callback");
            assert!(
                r["owner"].is_string()
                    && r["friend"].is_string()
                    && r["event_time"].is_i64()
                    && r["received_time"].is_i64()
            );
        }
        seen.extend(page.iter().map(|r| r["seq"].as_i64().unwrap()));
    }
    assert_eq!(seen, (1..=40).collect::<Vec<i64>>(), "every record exactly once, in order");
    app.stop().await;
}

#[tokio::test]
async fn feed_long_poll_returns_as_soon_as_something_is_stored() {
    let app = TestApp::spawn(&[]).await;
    let client = app.client.clone();
    let url = app.url("/v1/feed?after=0&wait=30s");
    let waiter = tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() });
    // The waiter cannot finish before something is stored: nothing is there yet.
    let body = roster_body("555", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let text =
        tokio::time::timeout(std::time::Duration::from_secs(20), waiter).await.expect("long-poll answered").unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1);
    app.stop().await;
}

#[tokio::test]
async fn audit_verify_passes_on_an_intact_database_and_fails_after_an_edit() {
    let app = TestApp::spawn(&[]).await;
    for i in 0..5 {
        let body = roster_body(&format!("8{i}"), "alice", &format!("u{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let (_, head) = app.get_json("/v1/audit/head").await;
    assert_eq!(head["seq"], 5);
    assert_eq!(head["hash"].as_str().unwrap().len(), 64);
    let db_path = app.db_path.clone();
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;

    let ok = std::process::Command::new(bin()).args(["audit", "verify", "--database-url", &db_url]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact: 5 records"));

    // An attacker with file access: drop the append-only trigger and rewrite a stored event.
    let edit = std::process::Command::new("sqlite3")
        .arg(&db_path)
        .arg("DROP TRIGGER callbacks_immutable; UPDATE callbacks SET to_user = 'mallory' WHERE seq = 3;")
        .output()
        .expect("sqlite3 is installed (.ci/run installs it)");
    assert!(edit.status.success(), "{}", String::from_utf8_lossy(&edit.stderr));

    let bad = std::process::Command::new(bin()).args(["audit", "verify", "--database-url", &db_url]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("seq 3"), "names the first bad record: {out}");
}

#[tokio::test]
async fn audit_verify_detects_an_edited_raw_body_and_a_deleted_record() {
    let app = TestApp::spawn(&[]).await;
    for i in 0..4 {
        let body = roster_body(&format!("7{i}"), "alice", &format!("u{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let db_path = app.db_path.clone();
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;
    let sql = |s: &str| {
        let o = std::process::Command::new("sqlite3").arg(&db_path).arg(s).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    sql(
        "DROP TRIGGER callbacks_immutable; UPDATE callbacks SET raw_body = replace(raw_body, 'u1', 'zz') WHERE seq = 2;",
    );
    let out = std::process::Command::new(bin()).args(["audit", "verify", "--database-url", &db_url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq 2"));

    sql(
        "UPDATE callbacks SET raw_body = replace(raw_body, 'zz', 'u1') WHERE seq = 2; DROP TRIGGER callbacks_no_delete; DROP TRIGGER callback_deliveries_no_delete; DELETE FROM callback_deliveries WHERE callback_id = (SELECT id FROM callbacks WHERE seq = 3); DELETE FROM callbacks WHERE seq = 3;",
    );
    let out = std::process::Command::new(bin()).args(["audit", "verify", "--database-url", &db_url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("seq 3 is missing"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn stored_rows_cannot_be_deleted_or_edited_through_sql_while_triggers_stand() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("61", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let db_path = app.db_path.clone();
    let _dir = app.stop().await;
    let o = std::process::Command::new("sqlite3").arg(&db_path).arg("DELETE FROM callbacks;").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("append-only"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new("sqlite3")
        .arg(&db_path)
        .arg("UPDATE callbacks SET raw_body = '{}';")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("append-only"), "{}", String::from_utf8_lossy(&o.stderr));
}
