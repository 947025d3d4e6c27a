//! Database faults: the callback endpoint answers 503 (so Easemob's one retry has a chance),
//! `/readyz` reports the fault, and the service recovers by itself once the fault is gone.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_process_gets_503_and_recovers_when_released() {
    let clock = friendhook::clock::ManualClock::new(1_800_000_000_000);
    let app = TestApp::spawn_with_clock(&["--sqlite-busy-timeout", "200ms"], clock.clone()).await;
    let first = roster_body("300001", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(first).await.status(), 200);

    // Another process takes the write lock and keeps it.
    let lock = WriteLock::take(&app.db_path).await;
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
    lock.release().await;
    // Right after callbacks failed, a commit of /readyz's probe alone is not taken as a recovery
    // (on a nearly full disk the probe can commit while callbacks cannot); ten seconds on, it is.
    // Meanwhile the detail says so, rather than repeat a fault that may be over.
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let write = body["database"]["write"].as_str().unwrap_or_default();
    assert!(write.contains("database is locked") && write.ends_with("or at once when one commits)"), "{body}");
    clock.advance_ms(10_000);
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "{body}");
    // Easemob's retry of the refused callback now succeeds and is a new event, not a duplicate.
    let r = app.post_callback(second).await;
    assert_eq!(r.status(), 200);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["duplicate"], false);
    let (_, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "both acknowledged callbacks are stored");
    // /metrics tells the same story: one callback refused with 503, two failed commits (the
    // readyz probe's and the callback's), both deliveries that were answered 200 stored.
    let m = app.metrics().await;
    assert_eq!(m["friendhook_callbacks_received_total{result=\"unavailable\"}"], 1.0);
    assert_eq!(m["friendhook_callbacks_received_total{result=\"stored\"}"], 2.0);
    assert_eq!(m["friendhook_commit_failures_total"], 2.0);
    app.stop().await;
}

/// A callback queued behind a batch that waits on the lock waits for two busy timeouts, longer
/// than the request deadline: it must still get the 503 that asks Easemob to retry, never a 408.
/// So must one on its way into quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_queued_behind_a_locked_batch_get_503_before_the_request_deadline() {
    let app = TestApp::spawn(&[
        "--sqlite-busy-timeout",
        "1s",
        "--request-timeout",
        "1500ms",
        "--on-bad-signature",
        "quarantine",
    ])
    .await;
    let lock = WriteLock::take(&app.db_path).await;

    // One callback takes the writer into a wait on the lock; the next ones queue behind it, every
    // other one signed with a wrong secret (held in quarantine).
    let mut sent = tokio::task::JoinSet::new();
    for n in 0..6 {
        let secret = if n % 2 == 0 { SECRET } else { "not-the-secret" };
        let body = roster_body(&format!("31000{n}"), "alice", &format!("f{n}"), "add", 1_700_000_000_000 + n, secret);
        let client = app.client.clone();
        let url = format!("{}/callbacks/easemob", app.base);
        sent.spawn(async move {
            let r = client.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            let retry_after = r.headers().contains_key("retry-after");
            (r.status().as_u16(), retry_after, r.json::<Value>().await.unwrap())
        });
        if n == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let mut answers = Vec::new();
    while let Some(joined) = sent.join_next().await {
        answers.push(joined.unwrap());
    }
    lock.release().await;

    for (status, retry_after, body) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert!(retry_after, "503 without Retry-After: {body}");
        assert_eq!(body["code"], "storage_unavailable", "{body}");
    }
    let m = app.metrics().await;
    assert_eq!(m.get("friendhook_callbacks_received_total{result=\"timed_out\"}").copied().unwrap_or(0.0), 0.0);
    app.stop().await;
}

/// SQLite's write lock on a database, held by another process (the `sqlite3` shell) until
/// released.
struct WriteLock {
    shell: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

impl WriteLock {
    async fn take(db: &std::path::Path) -> WriteLock {
        let mut shell = tokio::process::Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sqlite3 is installed (.ci/run installs it)");
        let mut stdin = shell.stdin.take().unwrap();
        // The service's writer may be in a short transaction of its own (the lookup by user
        // catches up right after a commit): wait for it rather than fail, and should BEGIN fail
        // anyway, stop the shell, so that `locked` is never printed without the lock.
        stdin.write_all(b".timeout 10000\n.bail on\nBEGIN IMMEDIATE;\nSELECT 'locked';\n").await.unwrap();
        stdin.flush().await.unwrap();
        // sqlite3 prints `locked` only once BEGIN IMMEDIATE holds the lock: no guessing at timing.
        let mut out = tokio::io::BufReader::new(shell.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(10), out.next_line()).await;
        assert_eq!(line.unwrap().unwrap().as_deref(), Some("locked"));
        WriteLock { shell, stdin }
    }

    async fn release(mut self) {
        self.stdin.write_all(b"ROLLBACK;\n.quit\n").await.unwrap();
        drop(self.stdin);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.shell.wait()).await;
    }
}

/// A batch none of whose calls could be recorded sent nothing, so it fails as a whole with the
/// store's 503 and Retry-After, and sending it again once the fault is gone is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_could_record_nothing_is_answered_503_and_sent_nowhere() {
    let app = TestApp::spawn(&["--sqlite-busy-timeout", "200ms"]).await;
    app.register(&["alice", "bob", "carol"]).await;
    let pairs =
        serde_json::json!({"pairs": [{"owner": "alice", "friend": "bob"}, {"owner": "alice", "friend": "carol"}]});

    let lock = WriteLock::take(&app.db_path).await;
    let resp = app.client.post(format!("{}/v1/friends/batch", app.base)).json(&pairs).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "storage_unavailable", "{err}");
    lock.release().await;

    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(0), "nothing recorded, nothing sent: {calls}");
    let (status, batch) = app.post_json("/v1/friends/batch", pairs).await;
    assert_eq!(status, 200, "{batch}");
    let outcomes: Vec<&str> =
        batch["results"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["succeeded", "succeeded"], "{batch}");
    app.stop().await;
}

/// A client that gives up while its call's intent waits on the lock must not leave the call in
/// flight, unsent: the call goes on without it and gets its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_the_intent_is_written_leaves_a_call_that_still_runs() {
    let app = TestApp::spawn(&["--sqlite-busy-timeout", "5s"]).await;
    app.register(&["alice", "bob", "carol", "dave"]).await;
    // The service's app token first: the client must give up while the intent waits on the
    // lock, not before, while the token is fetched (nothing would be recorded then).
    let (status, warm) = app.post_json("/v1/friends", serde_json::json!({"owner": "carol", "friend": "dave"})).await;
    assert_eq!(status, 201, "{warm}");
    let lock = WriteLock::take(&app.db_path).await;
    // Well inside the 5 s the intent waits for the lock.
    let impatient = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build().unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/friends", app.base))
        .header("idempotency-key", "gave-up-1")
        .json(&serde_json::json!({"owner": "alice", "friend": "bob"}))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client was meant to give up while the database was locked: {gave_up:?}");
    lock.release().await;

    // The call was sent and its outcome recorded; the key replays it.
    let mut outcome = Value::Null;
    for _ in 0..100 {
        let (_, calls) = app.get_json("/v1/calls?owner=alice").await;
        outcome = calls["items"][0]["outcome"].clone();
        if outcome != "in_flight" && !outcome.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(outcome, "succeeded");
    let replay = app
        .client
        .post(format!("{}/v1/friends", app.base))
        .header("idempotency-key", "gave-up-1")
        .json(&serde_json::json!({"owner": "alice", "friend": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    app.stop().await;
}

/// A small tmpfs of our own, so that "disk full" and "read-only" are real file-system states.
/// Needs root (CI runs as root); elsewhere the tests say so and stop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: mounting a tmpfs needs root; run the suite as root (as CI does) to cover this fault");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with `file` until it refuses, then gives back `margin` bytes. Measuring the
    /// free space first and writing that much less is a race: the service's own writes (its WAL
    /// grows after a commit) can take the margin in between, and the filler then fails instead.
    fn fill_leaving(&self, file: &std::path::Path, margin: u64) {
        use std::io::Write;
        let mut f = std::fs::File::create(file).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the small disk: {e}"),
            }
        }
        let written = f.metadata().unwrap().len();
        assert!(written > margin, "the small disk had less than {margin} bytes free before filling");
        f.set_len(written - margin).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

async fn stored_call_ids(app: &TestApp) -> Vec<String> {
    let (_, list) = app.get_json("/v1/callbacks?limit=1000").await;
    list["items"].as_array().unwrap().iter().map(|i| i["call_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_503_and_the_service_recovers_when_space_is_freed() {
    let Some(disk) = SmallDisk::mount("3m") else { return };
    let clock = friendhook::clock::ManualClock::new(1_800_000_000_000);
    let app =
        TestApp::spawn_on_with_clock(&disk.path().join("full.db"), &["--sqlite-busy-timeout", "200ms"], clock.clone())
            .await;
    let warm = roster_body("400000", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(warm).await.status(), 200);
    // Leave only a little room, then write until the disk refuses.
    let filler = disk.path().join("filler");
    disk.fill_leaving(&filler, 96 * 1024);
    let mut acked = vec![format!("{APPKEY}_400000")];
    let mut refused = None;
    for n in 1..5000 {
        let body =
            roster_body(&format!("4{n:05}"), "alice", &format!("friend_{n}"), "add", 1_700_000_000_000 + n, SECRET);
        let r = app.post_callback(body.clone()).await;
        match r.status().as_u16() {
            200 => acked.push(format!("{APPKEY}_4{n:05}")),
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                refused = Some(body);
                break;
            }
            other => panic!("only 200 or 503 may answer a full disk, got {other}"),
        }
    }
    let refused = refused.expect("the disk filled up within 5,000 callbacks");
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "readyz reports the full disk: {ready}");

    std::fs::remove_file(&filler).unwrap();
    // Right after callbacks failed, a commit of /readyz's probe alone is not taken as a recovery
    // (on a nearly full disk the probe can commit while callbacks cannot); ten seconds on, it is.
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    clock.advance_ms(10_000);
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "recovered without a restart: {ready}");
    let r = app.post_callback(refused).await;
    assert_eq!(r.status(), 200, "Easemob's retry now succeeds");
    let stored = stored_call_ids(&app).await;
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is stored");
    }
    assert_eq!(stored.len(), acked.len() + 1);
    let db = app.db_url.clone();
    app.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["audit", "verify", "--database-url", &db])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Sets or clears the immutable attribute: even root cannot write to such a file, through file
/// descriptors opened before as well. `false` when chattr is not permitted here.
fn set_immutable(path: &std::path::Path, on: bool) -> bool {
    std::process::Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_file_gets_503_and_the_service_recovers_when_writable_again() {
    let clock = friendhook::clock::ManualClock::new(1_800_000_000_000);
    let app = TestApp::spawn_with_clock(&["--sqlite-busy-timeout", "200ms"], clock.clone()).await;
    let first = roster_body("500001", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(first).await.status(), 200);
    let wal = app.db_path.with_extension("db-wal");
    if !set_immutable(&app.db_path, true) {
        eprintln!("SKIPPED: chattr needs root on a file system with attributes; run as root (as CI does)");
        app.stop().await;
        return;
    }
    let wal_locked = set_immutable(&wal, true);

    let second = roster_body("500002", "alice", "carol", "add", 1_700_000_000_001, SECRET);
    let r = app.post_callback(second.clone()).await;
    let refused = r.status().as_u16();
    let (ready_status, ready) = app.get_json("/readyz").await;
    // Writable again before asserting, so a failure cannot leave an immutable file behind.
    set_immutable(&app.db_path, false);
    if wal_locked {
        set_immutable(&wal, false);
    }
    assert_eq!(refused, 503, "never 200 for something not committed");
    assert_eq!(ready_status, 503, "readyz reports the read-only database: {ready}");

    // Right after callbacks failed, a commit of /readyz's probe alone is not taken as a recovery
    // (on a nearly full disk the probe can commit while callbacks cannot); ten seconds on, it is.
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    clock.advance_ms(10_000);
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200, "recovered without a restart: {ready}");
    let r = app.post_callback(second).await;
    assert_eq!(r.status(), 200, "Easemob's retry now succeeds");
    assert_eq!(stored_call_ids(&app).await.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn readyz_commits_one_write_probe_a_second_however_often_it_is_called() {
    let clock = friendhook::clock::ManualClock::new(1_800_000_000_000);
    let app = TestApp::spawn_with_clock(&[], clock.clone()).await;
    let commits = || async { app.metrics().await["friendhook_readyz_write_probes_total"] };
    let before = commits().await;

    // Ten at once, then ten more in a row, all within one (frozen) second.
    let at_once = futures_util::future::join_all((0..10).map(|_| app.get_json("/readyz"))).await;
    assert!(at_once.iter().all(|(status, _)| *status == 200), "{at_once:?}");
    for _ in 0..10 {
        assert_eq!(app.get_json("/readyz").await.0, 200);
    }
    assert_eq!(commits().await - before, 1.0, "one probe committed for twenty calls");

    clock.advance_ms(friendhook::http::health::WRITE_PROBE_REUSE_MS);
    assert_eq!(app.get_json("/readyz").await.0, 200);
    assert_eq!(commits().await - before, 2.0, "a second later, a new probe");
    app.stop().await;
}

/// Easemob has acted, but the database cannot take the outcome: the request is answered 503
/// `outcome_not_recorded` naming the call, and friendhook keeps recording it until the fault is
/// gone, instead of leaving the call in flight until a restart closes it as `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_database_refused_is_recorded_once_the_fault_is_gone() {
    let (sandbox, app, lock) = an_add_whose_outcome_the_database_refuses().await;
    let client = sandbox_client(&sandbox);
    assert_eq!(client.list_friends("alice").await.unwrap(), ["bob"], "Easemob did add the friend");

    lock.release().await;
    let call = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let (_, call) = app.get_json("/v1/calls/1").await;
            if call["outcome"] != "in_flight" {
                return call;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the outcome is recorded within 30 s of the lock's release");
    assert_eq!(call["outcome"], "succeeded", "{call}");
    assert_eq!(call["upstream_status"], 200, "{call}");
    assert_eq!(call["attempts"], 1, "Easemob was called once: {call}");
    let m = app.metrics().await;
    assert_eq!(m["friendhook_calls_total{op=\"add\",outcome=\"succeeded\"}"], 1.0);
    assert!(m["friendhook_commit_failures_total"] >= 3.0, "the request waited through three attempts");
    app.stop().await;
    sandbox.shutdown().await;
}

/// An outcome still waiting for the database does not hold up a stop (the store would wait 30 s
/// for the writer that its retries keep alive): the retries end, and the next start closes the
/// call as `unknown`, as after any stop mid-call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_an_outcome_the_database_refuses() {
    let (sandbox, app, lock) = an_add_whose_outcome_the_database_refuses().await;
    let db_path = app.db_path.clone();
    let dir = tokio::time::timeout(std::time::Duration::from_secs(10), app.stop())
        .await
        .expect("the service stops without waiting out the outcome's retries");
    lock.release().await;

    let app = TestApp::spawn_on(&db_path, &easemob_args(&sandbox.base_url())).await;
    let (_, call) = app.get_json("/v1/calls/1").await;
    assert_eq!(call["outcome"], "unknown", "{call}");
    app.stop().await;
    drop(dir);
    sandbox.shutdown().await;
}

/// A service whose add of alice to bob reached Easemob, but whose outcome another process's
/// write lock keeps out of the database: answered 503 `outcome_not_recorded`, call 1 in flight,
/// the lock still held.
async fn an_add_whose_outcome_the_database_refuses() -> (friendhook::sandbox::SandboxHandle, TestApp, WriteLock) {
    let sandbox = sandbox_with_alice_and_bob().await;
    let mut gate = Gate::spawn(sandbox.base_url()).await;
    let app = TestApp::spawn(&easemob_args(&gate.base)).await;

    let request = tokio::spawn({
        let (http, url) = (app.client.clone(), app.url("/v1/friends"));
        async move { http.post(url).json(&serde_json::json!({"owner": "alice", "friend": "bob"})).send().await }
    });
    // The add has reached Easemob (its intent is recorded); another process now takes the write
    // lock before Easemob's answer comes back, so the outcome cannot be committed.
    gate.arrived().await;
    let lock = WriteLock::take(&app.db_path).await;
    gate.open();

    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    assert!(!response.headers().contains_key("retry-after"), "a client must not send it again by itself");
    let err: Value = response.json().await.unwrap();
    assert_eq!(err["code"], "outcome_not_recorded", "{err}");
    let detail = err["detail"].as_str().unwrap();
    assert!(detail.contains("call 1 went to Easemob") && detail.contains("GET /v1/calls/1"), "{detail}");
    let (_, call) = app.get_json("/v1/calls/1").await;
    assert_eq!(call["outcome"], "in_flight", "{call}");
    (sandbox, app, lock)
}

/// Without an app token nothing can be sent: the call is answered 503 and not recorded, so its
/// Idempotency-Key is still free once the credentials are fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_get_an_app_token_is_answered_without_being_recorded() {
    let sandbox = sandbox_with_alice_and_bob().await;
    let base = sandbox.base_url();
    let mut wrong = easemob_args(&base);
    let secret = wrong.iter().position(|a| *a == "sandbox-client-secret").unwrap();
    wrong[secret] = "not-the-secret";
    let app = TestApp::spawn(&wrong).await;
    let add = serde_json::json!({"owner": "alice", "friend": "bob"});
    let post = |http: reqwest::Client, url: String| {
        let add = add.clone();
        async move { http.post(url).header("idempotency-key", "k-1").json(&add).send().await.unwrap() }
    };

    let refused = post(app.client.clone(), app.url("/v1/friends")).await;
    assert_eq!(refused.status(), 503);
    assert!(!refused.headers().contains_key("retry-after"), "wrong credentials do not pass by waiting");
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["code"], "easemob_token_unavailable", "{err}");
    assert!(err["detail"].as_str().unwrap().contains("--easemob-client-secret"), "{err}");
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(0), "{calls}");
    // /readyz shows it, and stays ready: callbacks are still received.
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")), "{ready}");
    assert_eq!(ready["easemob"]["app_token"], "failing", "{ready}");
    assert!(ready["easemob"]["detail"].as_str().unwrap().contains("--easemob-client-secret"), "{ready}");
    // And /metrics, for an alert.
    let m = app.metrics().await;
    assert_eq!(m["friendhook_easemob_app_token{state=\"failing\"}"], 1.0, "{m:?}");
    assert_eq!(m["friendhook_easemob_app_token{state=\"valid\"}"], 0.0, "{m:?}");
    let db_path = app.db_path.clone();
    let dir = app.stop().await;

    // Fixed credentials: the same key now makes the call.
    let app = TestApp::spawn_on(&db_path, &easemob_args(&base)).await;
    let made = post(app.client.clone(), app.url("/v1/friends")).await;
    assert_eq!(made.status(), 201);
    let call: Value = made.json().await.unwrap();
    assert_eq!(call["outcome"], "succeeded", "{call}");
    let (_, ready) = app.get_json("/readyz").await;
    assert_eq!(ready["easemob"]["app_token"], "valid", "{ready}");
    assert!(ready["easemob"]["expires_in_s"].as_i64().is_some_and(|s| s > 0), "{ready}");
    let m = app.metrics().await;
    assert_eq!(m["friendhook_easemob_app_token{state=\"valid\"}"], 1.0, "{m:?}");
    assert_eq!(m["friendhook_easemob_app_token{state=\"failing\"}"], 0.0, "{m:?}");
    app.stop().await;
    drop(dir);
    sandbox.shutdown().await;
}

/// `serve` flags for a real-Easemob setup at `base`, with short storage timeouts.
fn easemob_args(base: &str) -> Vec<&str> {
    let mut args = real_easemob_args(base);
    args.extend_from_slice(&["--sqlite-busy-timeout", "200ms", "--request-timeout", "60s"]);
    args
}

/// A standalone sandbox (a real-Easemob setup's upstream) with users alice and bob registered.
async fn sandbox_with_alice_and_bob() -> friendhook::sandbox::SandboxHandle {
    let sandbox = friendhook::sandbox::spawn(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        friendhook::sandbox::SandboxConfig::default(),
        friendhook::clock::system(),
    )
    .await
    .unwrap();
    let users = ["alice", "bob"].map(|n| friendhook::easemob::NewUser {
        username: n.into(),
        password: "pw".into(),
        nickname: None,
    });
    sandbox_client(&sandbox).register_users(&users).await.unwrap();
    sandbox
}

/// A proxy in front of the sandbox that holds the first add-friend request until opened.
struct Gate {
    base: String,
    arrived: tokio::sync::mpsc::Receiver<()>,
    open: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Gate {
    async fn spawn(upstream: String) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, arrived) = tokio::sync::mpsc::channel(8);
        let open = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let gate = open.clone();
        let http = reqwest::Client::new();
        let forward = move |req: axum::extract::Request| {
            let (tx, gate, http, upstream) = (tx.clone(), gate.clone(), http.clone(), upstream.clone());
            async move {
                let (parts, body) = req.into_parts();
                if parts.uri.path().contains("/contacts/users/") {
                    let _ = tx.send(()).await;
                    let _ = gate.acquire().await.unwrap();
                }
                let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let url = format!("{upstream}{}", parts.uri.path_and_query().unwrap());
                let answer = http.request(parts.method, url).headers(parts.headers).body(body).send().await.unwrap();
                let status = answer.status();
                let headers = answer.headers().clone();
                let bytes = answer.bytes().await.unwrap();
                let mut response = axum::response::Response::new(axum::body::Body::from(bytes));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                response
            }
        };
        let router = axum::Router::new().fallback(forward);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Gate { base, arrived, open }
    }

    async fn arrived(&mut self) {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.arrived.recv())
            .await
            .expect("the add reaches Easemob within 30 s");
    }

    fn open(&self) {
        self.open.add_permits(1_000);
    }
}

/// A callback whose body is slow to arrive and then cannot commit before the deadline is told
/// that its body was slow, not that the database failed; and a bad signature's 401 does not wait
/// past the deadline for its record to commit (it used to, into a 408).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_named_as_the_cause_and_a_401_does_not_wait_for_a_locked_database() {
    // The default deadlines: commit 9 s, request 10 s. A row queued behind a batch that waits on
    // the lock waits for two busy timeouts (10 s), so nothing below commits in time, whatever the
    // timing; the slow body is blamed when it leaves less than a tenth of the commit deadline.
    let app = TestApp::spawn(&["--sqlite-busy-timeout", "5s", "--request-timeout", "10s"]).await;
    let lock = WriteLock::take(&app.db_path).await;
    let post = |body: String| {
        let client = app.client.clone();
        let url = format!("{}/callbacks/easemob", app.base);
        async move {
            let r = client.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let first = tokio::spawn(post(roster_body("320001", "alice", "bob", "add", 1_700_000_000_000, SECRET)));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let bad = tokio::spawn(post(roster_body("320002", "alice", "carol", "add", 1_700_000_000_001, "not-the-secret")));

    // The slow one: all but its last byte, then the rest 8.5 s after the service asked for the
    // body (its 100 Continue: the handler runs, so its clock has started), blamed from 8.1 s; the
    // request deadline, 10 s, leaves 1.5 s of slack.
    let body = roster_body("320003", "alice", "dave", "add", 1_700_000_000_002, SECRET);
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /callbacks/easemob HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut continued = Vec::new();
    while !continued.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await.unwrap(),
            1,
            "closed before 100 Continue"
        );
        continued.push(byte[0]);
    }
    assert!(continued.starts_with(b"HTTP/1.1 100"), "{}", String::from_utf8_lossy(&continued));
    stream.write_all(&body.as_bytes()[..body.len() - 1]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(8500)).await;
    stream.write_all(&body.as_bytes()[body.len() - 1..]).await.unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "{answer}");
    let json: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["code"], "slow_request_body", "{json}");
    // "took 8s", or 9s should this test have run late: the point is that the body is blamed.
    let took = json["detail"]
        .as_str()
        .unwrap()
        .split("the request body took ")
        .nth(1)
        .and_then(|rest| rest.split('s').next().and_then(|secs| secs.parse::<u64>().ok()));
    assert!(took.is_some_and(|secs| secs >= 8), "{json}");

    let (status, err) = bad.await.unwrap();
    assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")), "{err}");
    let (status, err) = first.await.unwrap();
    assert_eq!((status, err["code"].as_str()), (503, Some("storage_unavailable")), "{err}");
    lock.release().await;
    app.stop().await;
}

/// A database file removed while the service runs stays open, and SQLite goes on committing into
/// it: lost at the stop. No callback is acknowledged once the path no longer leads to the file
/// opened, and `/readyz` says why.
#[tokio::test]
async fn a_database_file_removed_under_the_service_gets_no_more_200s() {
    let app = TestApp::spawn(&[]).await;
    let before = app.post_callback(roster_body("330001", "alice", "bob", "add", 1_700_000_000_000, SECRET)).await;
    assert_eq!(before.status(), 200);

    std::fs::remove_file(&app.db_path).expect("remove the database file");
    let after = app.post_callback(roster_body("330002", "alice", "carol", "add", 1_700_000_000_001, SECRET)).await;
    let status = after.status();
    let retry_after = after.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let err: Value = after.json().await.unwrap();
    let (ready, readyz) = app.get_json("/readyz").await;

    assert_eq!((status.as_u16(), err["code"].as_str()), (503, Some("storage_unavailable")), "{err}");
    // Not "retry shortly": it does not pass by waiting.
    let detail = err["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("until an operator puts the file back and restarts the service"), "{err}");
    assert_eq!(retry_after.as_deref(), Some("30"));
    assert_eq!(ready, 503, "{readyz}");
    let why = readyz["database"]["write"].as_str().unwrap_or_default();
    assert!(why.contains("was removed or replaced while the service ran") && why.contains("/proc/"), "{readyz}");
    assert!(!app.db_path.exists(), "nothing was created in its place");
    let db_path = app.db_path.clone();
    let dir = app.stop().await;

    // The stop saved what the service held (the refused callback had been written too: not
    // acknowledged, it is Easemob's retry that counts), and moved its WAL out of the way.
    let beside = |suffix: &str| -> Vec<std::path::PathBuf> {
        let name = format!("{}{suffix}", db_path.file_name().unwrap().to_string_lossy());
        let mut found: Vec<_> = std::fs::read_dir(db_path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&name))
            .collect();
        found.sort();
        found
    };
    let rescued = beside(".rescued-");
    assert_eq!(rescued.len(), 1, "{rescued:?}");
    let held = std::process::Command::new("sqlite3")
        .arg(&rescued[0])
        .arg("SELECT group_concat(msg_id) FROM (SELECT msg_id FROM callbacks ORDER BY seq)")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&held.stdout).trim(), "330001,330002");
    assert!(!db_path.with_extension("db-wal").exists(), "the old WAL is not left where the next open replays it");
    assert_eq!(beside("-wal.stale-").len(), 1);

    // Put back as the log says, it is the service's database again, chain intact.
    std::fs::rename(&rescued[0], &db_path).unwrap();
    let app = TestApp::spawn_on(&db_path, &[]).await;
    let (_, head) = app.get_json("/v1/audit/head").await;
    assert_eq!(head["seq"], 2, "{head}");
    app.stop().await;
    drop(dir);
}

/// A batch sent again under its key while its call is still at Easemob: that pair says so
/// (`idempotency_in_flight`, with its call), nothing is sent again; once the call has ended, the
/// same request is answered with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_while_its_call_runs_is_told_so_per_pair() {
    let sandbox = sandbox_with_alice_and_bob().await;
    let mut gate = Gate::spawn(sandbox.base_url()).await;
    let app = TestApp::spawn(&easemob_args(&gate.base)).await;
    let send = || {
        app.client
            .post(app.url("/v1/friends/batch"))
            .header("idempotency-key", "nightly-1")
            .json(&serde_json::json!({"pairs": [{"owner": "alice", "friend": "bob"}]}))
            .send()
    };
    let first = tokio::spawn(send());
    gate.arrived().await;

    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    let result = &again["results"][0];
    assert_eq!(result["error"]["code"], "idempotency_in_flight", "{again}");
    assert_eq!((result["sent"].as_bool(), result["call_id"].as_i64()), (Some(true), Some(1)), "{again}");
    let (_, running) = app.get_json("/v1/calls/1").await;
    assert_eq!(running["outcome"], "in_flight", "{running}");
    assert!(running["sent_at"].is_i64(), "its turn came and its request left: {running}");

    gate.open();
    let first: Value = first.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(first["results"][0]["outcome"], "succeeded", "{first}");
    let (sent, done) = (&first["results"][0]["sent_at"], &first["results"][0]["completed_at"]);
    assert!(sent.as_i64().is_some_and(|sent| sent <= done.as_i64().unwrap()), "{first}");
    let last = send().await.unwrap();
    assert_eq!(last.headers()["idempotent-replayed"], "true");
    assert_eq!(last.json::<Value>().await.unwrap(), first);
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(1), "one call: {calls}");
    app.stop().await;
    sandbox.shutdown().await;
}
