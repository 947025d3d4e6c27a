//! Database faults: the callback endpoint answers 503 (so Easemob's one retry has a chance),
//! `/readyz` reports the fault, and the service recovers by itself once the fault is gone.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_process_gets_503_and_recovers_when_released() {
    let app = TestApp::spawn(&["--sqlite-busy-timeout", "200ms"]).await;
    let first = roster_body("300001", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(first).await.status(), 200);

    // Another process takes the write lock and keeps it.
    let mut locker = tokio::process::Command::new("sqlite3")
        .arg(&app.db_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sqlite3 is installed (.ci/run installs it)");
    let mut stdin = locker.stdin.take().unwrap();
    stdin.write_all(b"BEGIN IMMEDIATE;\nSELECT 'locked';\n").await.unwrap();
    stdin.flush().await.unwrap();
    // sqlite3 prints `locked` only once BEGIN IMMEDIATE holds the lock: no guessing at timing.
    let mut out = tokio::io::BufReader::new(locker.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), out.next_line()).await;
    assert_eq!(line.unwrap().unwrap().as_deref(), Some("locked"));
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "readyz reports the fault: {body}");
    assert_eq!(body["status"], "not_ready");
    assert_ne!(body["database"]["write"], "ok", "{body}");

    let second = roster_body("300002", "alice", "carol", "add", 1_700_000_000_001, SECRET);
    let r = app.post_callback(second.clone()).await;
    assert_eq!(r.status(), 503, "never 200 for something not committed");
    assert!(r.headers().contains_key("retry-after"));
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "storage_unavailable");

    // The fault goes away; nothing needs restarting.
    stdin.write_all(b"ROLLBACK;\n.quit\n").await.unwrap();
    drop(stdin);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), locker.wait()).await;
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    // Easemob's retry of the refused callback now succeeds and is a new event, not a duplicate.
    let r = app.post_callback(second).await;
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["duplicate"], false);
    let (_, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "both acknowledged callbacks are stored");
    app.stop().await;
}
