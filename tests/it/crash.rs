//! Process-level durability, with the real binary as a child process: a signal-driven graceful
//! shutdown finishes what it accepted, and a SIGKILL at an arbitrary moment loses nothing that was
//! acknowledged.
//!
//! "Acknowledged" is the contract under test: a callback answered 200 and a trigger answered 201
//! were committed before the answer was written, so they must be in the database after any stop,
//! however abrupt. Requests cut off by the kill have no answer and promise nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::{Connection, Row, SqliteConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::helpers::*;
use crate::process::{BIN, ServeProcess, bounded_client, sandbox_register, sandbox_token};

const TS: i64 = 1_700_000_000_000;

/// Generous bound for one exchange or one state change the test waits for.
const WITHIN: Duration = Duration::from_secs(20);

fn call_id(msg_id: &str) -> String {
    format!("{APPKEY}_{msg_id}")
}

async fn open_db(db_url: &str) -> SqliteConnection {
    SqliteConnection::connect(db_url).await.expect("open the database file")
}

/// `PRAGMA integrity_check` says `ok`.
async fn assert_integrity(db_url: &str) {
    let mut conn = open_db(db_url).await;
    let verdict: String =
        sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut conn).await.expect("integrity_check");
    assert_eq!(verdict, "ok", "PRAGMA integrity_check");
    conn.close().await.expect("close");
}

/// `friendhook audit verify` exits 0 (the hash chain over every record is intact).
async fn assert_audit_verifies(db_url: &str) -> String {
    let run = tokio::process::Command::new(BIN)
        .args(["audit", "verify", "--database-url", db_url])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WITHIN, run).await.expect("audit verify finishes").expect("run audit verify");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "audit verify: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `call_id -> seq` of every stored callback.
async fn stored_callbacks(db_url: &str) -> HashMap<String, i64> {
    let mut conn = open_db(db_url).await;
    let rows = sqlx::query("SELECT call_id, seq FROM callbacks").fetch_all(&mut conn).await.expect("callbacks");
    let map = rows.iter().map(|r| (r.get::<String, _>(0), r.get::<Option<i64>, _>(1).unwrap_or(-1))).collect();
    conn.close().await.expect("close");
    map
}

/// `id -> outcome` of every stored call (`None`: no outcome recorded).
async fn stored_calls(db_url: &str) -> HashMap<i64, Option<String>> {
    let mut conn = open_db(db_url).await;
    let rows = sqlx::query("SELECT id, outcome FROM calls").fetch_all(&mut conn).await.expect("calls");
    let map = rows.iter().map(|r| (r.get::<i64, _>(0), r.get::<Option<String>, _>(1))).collect();
    conn.close().await.expect("close");
    map
}

async fn register_users(service: &ServeProcess, names: &[String]) {
    let http = bounded_client();
    let token = sandbox_token(&http, &service.sandbox).await;
    sandbox_register(&http, &service.sandbox, &token, names).await;
}

/// Sends `head` with `Expect: 100-continue` and waits for the `100 Continue`: hyper sends it when
/// the handler first reads the body, so from then on the request is provably in flight inside
/// the service (accepted, routed, handler running), not waiting in a socket queue.
async fn start_in_flight(addr: &str, path: &str, body_len: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WITHIN, async {
        while !got.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read 100 Continue");
            assert!(n > 0, "closed before 100 Continue");
            got.push(byte[0]);
        }
    })
    .await
    .expect("100 Continue within the bound");
    assert!(got.starts_with(b"HTTP/1.1 100"), "expected 100 Continue, got {:?}", String::from_utf8_lossy(&got));
    stream
}

/// Reads one response to EOF or its Content-Length: (status, JSON body).
async fn finish_response(stream: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WITHIN, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|n| buf.len() >= end + 4 + n) {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("response within the bound");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response: {text:?}"));
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line: {head}"));
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// SIGTERM or SIGINT while callbacks and a trigger are mid-body: the listener closes at once, the
/// in-flight requests are answered (the callbacks 200 and stored; the trigger 503 `shutting_down`
/// with nothing recorded or sent, since its callback would come to a closed port), and the exit
/// is 0 within the grace.
async fn in_flight_requests_complete_and_are_stored_after(signal: &str) {
    // Arrange: four callbacks and one trigger, each provably inside the service, half its body sent.
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("graceful.db").display());
    let grace = Duration::from_secs(10);
    let mut service = ServeProcess::start(&db_url, &["--shutdown-grace", "10s", "--request-timeout", "60s"], &[]).await;
    register_users(&service, &["alice".into(), "bob".into()]).await;
    let addr = service.base.trim_start_matches("http://").to_string();
    let mut requests = Vec::new();
    for i in 0..4 {
        let body = roster_body(&format!("graceful-{signal}-{i}"), "alice", &format!("f{i}"), "add", TS, SECRET);
        requests.push(("/callbacks/easemob", body));
    }
    requests.push(("/v1/friends", r#"{"owner":"alice","friend":"bob"}"#.to_string()));
    let mut in_flight = Vec::new();
    for (path, body) in &requests {
        let mut stream = start_in_flight(&addr, path, body.len()).await;
        stream.write_all(&body.as_bytes()[..body.len() / 2]).await.expect("first half");
        in_flight.push((stream, *path, body.clone()));
    }

    // Act: signal; once the service says it stopped accepting, finish the bodies.
    let signalled = Instant::now();
    service.signal(signal);
    service.wait_for_log("no longer accepting", WITHIN).await;
    let refused = TcpStream::connect(&addr).await;
    let mut answers = Vec::new();
    for (mut stream, path, body) in in_flight {
        stream.write_all(&body.as_bytes()[body.len() / 2..]).await.expect("second half");
        answers.push((path, finish_response(&mut stream).await));
    }
    let status = service.wait_exit(WITHIN).await;
    let took = signalled.elapsed();

    // Assert
    let log = service.log();
    assert!(refused.is_err(), "a new connection was accepted after the shutdown began");
    let mut stored_seqs = Vec::new();
    for (path, (code, body)) in &answers {
        if *path == "/v1/friends" {
            assert_eq!((*code, body["code"].as_str()), (503, Some("shutting_down")), "in-flight trigger: {body}");
            assert!(body["detail"].as_str().is_some_and(|d| d.contains("nothing was recorded or sent")), "{body}");
        } else {
            assert_eq!(*code, 200, "in-flight callback: {body}");
            stored_seqs.push(body["seq"].as_i64().expect("seq"));
        }
    }
    assert_eq!(status.code(), Some(0), "exit status after SIG{signal}:\n{log}");
    assert!(took < grace, "exit took {took:?}, beyond the {grace:?} grace");
    assert!(log.contains("all connections closed"), "in-flight requests finished, not cut by the grace:\n{log}");
    println!("SIG{signal}: {} in-flight requests completed, exit 0 after {took:?}", answers.len());

    let callbacks = stored_callbacks(&db_url).await;
    for i in 0..4 {
        assert!(
            callbacks.contains_key(&call_id(&format!("graceful-{signal}-{i}"))),
            "callback {i} answered 200 but not stored"
        );
    }
    assert!(stored_calls(&db_url).await.is_empty(), "the refused trigger recorded no call");
    assert_integrity(&db_url).await;
    assert_audit_verifies(&db_url).await;
}

/// Easemob sends a call's callback after answering the call: a service stopped right after a
/// friend addition still receives its callback (and stores it) before closing its listener.
#[tokio::test]
async fn a_stop_right_after_a_call_still_receives_its_callback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("linger.db").display());
    // The sandbox sends each callback up to 1 s after the call; the stop waits 4 s after it.
    let extra =
        ["--sandbox-delay-ms", "1000", "--sandbox-seed", "7", "--callback-linger", "4s", "--shutdown-grace", "20s"];
    let mut service = ServeProcess::start(&db_url, &extra, &[]).await;
    register_users(&service, &["alice".into(), "bob".into()]).await;
    let http = bounded_client();
    let call: Value = http
        .post(format!("{}/v1/friends", service.base))
        .json(&serde_json::json!({"owner": "alice", "friend": "bob"}))
        .send()
        .await
        .expect("trigger")
        .json()
        .await
        .expect("json");
    assert_eq!(call["outcome"], "succeeded", "{call}");

    service.signal("TERM");
    let status = service.wait_exit(WITHIN).await;
    let log = service.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(
        stored_callbacks(&db_url).await.len(),
        1,
        "the call's callback came during the stop and was stored:\n{log}"
    );
    assert!(log.contains("stopping: still receiving callbacks"), "{log}");
    assert_audit_verifies(&db_url).await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_and_store_then_exits_zero() {
    in_flight_requests_complete_and_are_stored_after("TERM").await;
}

#[tokio::test]
async fn sigint_lets_in_flight_requests_finish_and_store_then_exits_zero() {
    in_flight_requests_complete_and_are_stored_after("INT").await;
}

/// A callback provably inside the service (100 Continue given), half its body sent, and the
/// service's stop begun by SIGTERM: the held request keeps the stop open.
/// Also gives the database's URL, and its directory to keep while it is read.
async fn stop_held_open_by_a_callback(name: &str) -> (ServeProcess, TcpStream, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join(format!("{name}.db")).display());
    let service = ServeProcess::start(&db_url, &["--shutdown-grace", "10s", "--request-timeout", "60s"], &[]).await;
    let addr = service.base.trim_start_matches("http://").to_string();
    let body = roster_body(name, "alice", "bob", "add", TS, SECRET);
    let mut stream = start_in_flight(&addr, "/callbacks/easemob", body.len()).await;
    stream.write_all(&body.as_bytes()[..body.len() / 2]).await.expect("first half");
    (service, stream, body, db_url, dir)
}

/// `timeout`, and systemd's default KillMode, signal the service and its process group: the
/// same stop arrives twice within moments, and must not cut what the first one lets finish.
#[tokio::test]
async fn a_second_signal_right_after_the_first_is_the_same_stop() {
    // Arrange
    let (mut service, mut held, body, db_url, _dir) = stop_held_open_by_a_callback("second-signal-same-stop").await;

    // Act: TERM then INT from one shell, microseconds apart (two signals of one kind could
    // merge into one while pending; two kinds cannot), as a process group's stop arrives; the
    // body is finished only once the service has taken the second signal.
    let both = std::process::Command::new("sh")
        .args(["-c", "kill -s TERM \"$0\" && kill -s INT \"$0\"", &service.pid.to_string()])
        .status()
        .expect("run sh");
    assert!(both.success());
    service.wait_for_log("taken as the same stop", WITHIN).await;
    held.write_all(&body.as_bytes()[body.len() / 2..]).await.expect("second half");
    let (code, answer) = finish_response(&mut held).await;
    let status = service.wait_exit(WITHIN).await;

    // Assert
    let log = service.log();
    assert_eq!(code, 200, "the held callback is answered, not cut: {answer}\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("exiting at once"), "{log}");
    let seq = answer["seq"].as_i64().expect("seq");
    assert_eq!(stored_callbacks(&db_url).await.get(&call_id("second-signal-same-stop")), Some(&seq));
}

/// A second signal well after the first is an operator insisting: exit at once, status 130,
/// without waiting for the request the stop was holding open.
#[tokio::test]
async fn a_later_second_signal_exits_at_once() {
    // Arrange
    let (mut service, mut held, _body, _db_url, _dir) = stop_held_open_by_a_callback("second-signal-later").await;

    // Act: the service notes the first signal's time before it logs "no longer accepting", so a
    // second sent more than a second after that line is more than a second after the first.
    service.signal("TERM");
    service.wait_for_log("no longer accepting", WITHIN).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    service.signal("TERM");
    let status = service.wait_exit(WITHIN).await;

    // Assert
    let log = service.log();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("second signal: exiting at once"), "{log}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WITHIN, held.read_to_end(&mut rest)).await.expect("the connection closes");
    assert!(read.is_err() || rest.is_empty(), "no answer to the request cut: {:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn a_request_that_never_finishes_does_not_hold_the_exit_beyond_the_grace() {
    // Arrange: a callback whose body never comes, with a request timeout far beyond the grace.
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("stalled.db").display());
    let mut service = ServeProcess::start(&db_url, &["--shutdown-grace", "1s", "--request-timeout", "300s"], &[]).await;
    let addr = service.base.trim_start_matches("http://").to_string();
    let mut stalled = start_in_flight(&addr, "/callbacks/easemob", 500).await;
    // The same against the built-in sandbox, which runs in the same process and stops with it.
    let sandbox_addr = service.sandbox.trim_start_matches("http://").to_string();
    let mut stalled_sandbox = start_in_flight(&sandbox_addr, "/demo-org/demo-app/token", 500).await;

    // Act
    let signalled = Instant::now();
    service.signal("TERM");
    let status = service.wait_exit(WITHIN).await;
    let took = signalled.elapsed();

    // Assert: exit 0 after the grace ran out (well before the 300 s request timeout), and the
    // stalled client is disconnected rather than left hanging.
    let log = service.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("did not finish within the shutdown grace"), "{log}");
    // Generous: the point is "about the grace", not "about the 300 s request timeout".
    assert!(took < Duration::from_secs(1) + Duration::from_secs(10), "exit took {took:?} with a 1 s grace");
    for (what, stream) in [("receiver", &mut stalled), ("sandbox", &mut stalled_sandbox)] {
        let mut sink = [0u8; 64];
        let closed = tokio::time::timeout(WITHIN, stream.read(&mut sink)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the stalled {what} connection is closed: {closed:?}");
    }
    println!("stalled request: exit 0 after {took:?} (grace 1 s)");
}

/// What the drivers saw acknowledged in one round.
#[derive(Default)]
struct Acked {
    /// call_id -> seq from the 200.
    callbacks: HashMap<String, i64>,
    /// call id -> outcome from the 201.
    calls: HashMap<i64, String>,
    /// Answers that are neither an acknowledgement nor a transport error (should be none).
    surprises: Vec<String>,
}

/// Drives signed callbacks (4 tasks) and friend triggers (2 tasks) at `service` until `kill_after`
/// requests are acknowledged, then SIGKILLs it mid-traffic and returns what was acknowledged.
async fn drive_then_kill(service: &mut ServeProcess, round: usize, users: &[String], kill_after: usize) -> Acked {
    let acked = Arc::new(Mutex::new(Acked::default()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let http = bounded_client();
    let mut drivers = JoinSet::new();
    for worker in 0..4 {
        let (http, base, acked, count, stop) =
            (http.clone(), service.base.clone(), acked.clone(), count.clone(), stop.clone());
        drivers.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("crash-r{round}-w{worker}-{i}");
                i += 1;
                let body = roster_body(&msg, "alice", &format!("f{worker}"), "add", TS + i, SECRET);
                let sent = http
                    .post(format!("{base}/callbacks/easemob"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let Ok(r) = sent else { continue };
                let status = r.status().as_u16();
                // A body cut off by the kill is not an acknowledgement: only a complete 200 counts.
                let Ok(json) = r.json::<Value>().await else {
                    continue;
                };
                let mut acked = acked.lock().expect("lock");
                match (status, json["seq"].as_i64()) {
                    (200, Some(seq)) => {
                        acked.callbacks.insert(call_id(&msg), seq);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => acked.surprises.push(format!("callback {msg}: {status} {json}")),
                }
            }
        });
    }
    for worker in 0..2 {
        let (http, base, acked, count, stop) =
            (http.clone(), service.base.clone(), acked.clone(), count.clone(), stop.clone());
        let users = users.to_vec();
        let mut rng = StdRng::seed_from_u64(((round as u64) << 8) | worker);
        drivers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let owner = &users[rng.random_range(0..users.len())];
                let friend = &users[rng.random_range(0..users.len())];
                if owner == friend {
                    continue;
                }
                let sent = http
                    .post(format!("{base}/v1/friends"))
                    .json(&serde_json::json!({"owner": owner, "friend": friend}))
                    .send()
                    .await;
                let Ok(r) = sent else { continue };
                let status = r.status().as_u16();
                let Ok(json) = r.json::<Value>().await else {
                    continue;
                };
                let mut acked = acked.lock().expect("lock");
                match (status, json["id"].as_i64(), json["outcome"].as_str()) {
                    (201, Some(id), Some(outcome)) => {
                        acked.calls.insert(id, outcome.to_string());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => acked.surprises.push(format!("trigger {owner}->{friend}: {status} {json}")),
                }
            }
        });
    }

    // The kill point is a count of acknowledgements, not a time, so every round kills after the
    // same amount of work on any machine while requests are still in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < kill_after {
        assert!(
            Instant::now() < deadline,
            "only {} of {kill_after} acknowledgements within 60 s",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    service.kill_now();
    stop.store(true, Ordering::Relaxed);
    let status = service.wait_exit(WITHIN).await;
    assert_eq!(status.code(), None, "killed by a signal, not exited");
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(joined) = drivers.join_next().await {
            joined.expect("driver task");
        }
    })
    .await
    .expect("drivers stop once the service is gone");
    Arc::try_unwrap(acked).ok().expect("drivers are done").into_inner().expect("lock")
}

#[tokio::test]
async fn sigkill_at_seeded_moments_loses_no_acknowledged_callback_or_call() {
    // Arrange
    const SEED: u64 = 0x00C0_FFEE;
    const ROUNDS: usize = 4;
    let mut rng = StdRng::seed_from_u64(SEED);
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut all_callbacks: HashMap<String, i64> = HashMap::new();
    let mut all_calls: HashMap<i64, String> = HashMap::new();
    let mut service = ServeProcess::start(&db_url, &[], &[]).await;
    let started = Instant::now();

    for round in 0..ROUNDS {
        // Act: traffic, SIGKILL after a seeded number of acknowledgements, restart on the same file.
        let kill_after = rng.random_range(100..=600);
        // The sandbox lives in the service process, so its users die with it.
        register_users(&service, &users).await;
        let acked = drive_then_kill(&mut service, round, &users, kill_after).await;
        assert!(
            acked.surprises.is_empty(),
            "answers other than 200/201: {:?}",
            &acked.surprises[..acked.surprises.len().min(5)]
        );
        all_callbacks.extend(acked.callbacks.iter().map(|(k, v)| (k.clone(), *v)));
        all_calls.extend(acked.calls.iter().map(|(k, v)| (*k, v.clone())));
        service = ServeProcess::start(&db_url, &[], &[]).await;

        // Assert: everything acknowledged so far, in this round and every earlier one, is stored
        // as acknowledged; the file is sound and the hash chain intact.
        let stored = stored_callbacks(&db_url).await;
        let lost_callbacks: Vec<_> = all_callbacks
            .iter()
            .filter(|(id, seq)| stored.get(*id) != Some(seq))
            .map(|(id, seq)| format!("{id} (seq {seq})"))
            .collect();
        let calls = stored_calls(&db_url).await;
        let lost_calls: Vec<_> = all_calls
            .iter()
            .filter(|(id, outcome)| calls.get(*id).and_then(|o| o.as_deref()) != Some(outcome.as_str()))
            .map(|(id, outcome)| format!("call {id} acknowledged {outcome}, stored {:?}", calls.get(id)))
            .collect();
        let open = calls.values().filter(|o| o.is_none()).count();
        let unknown = calls.values().filter(|o| o.as_deref() == Some("unknown")).count();
        assert_integrity(&db_url).await;
        let audit = assert_audit_verifies(&db_url).await;
        println!(
            "round {round}: SIGKILL after {kill_after} acks ({} callbacks, {} calls acknowledged this round); \
             after restart: {} callbacks and {} calls stored, {unknown} calls unknown (cut mid-flight), \
             acknowledged-but-lost = {}; audit: {audit}",
            acked.callbacks.len(),
            acked.calls.len(),
            stored.len(),
            calls.len(),
            lost_callbacks.len() + lost_calls.len()
        );
        assert!(
            lost_callbacks.is_empty(),
            "acknowledged callbacks lost: {:?}",
            &lost_callbacks[..lost_callbacks.len().min(10)]
        );
        assert!(
            lost_calls.is_empty(),
            "acknowledged calls lost or changed: {:?}",
            &lost_calls[..lost_calls.len().min(10)]
        );
        assert_eq!(open, 0, "the restart closed every call cut off by the kill");
    }

    // The last restart also stops cleanly.
    service.signal("TERM");
    let status = service.wait_exit(WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", service.log());
    println!(
        "crash test: {ROUNDS} kills, {} callbacks and {} calls acknowledged in all, acknowledged-but-lost = 0 ({:?})",
        all_callbacks.len(),
        all_calls.len(),
        started.elapsed()
    );
}

/// A proxy in front of a standalone sandbox: passes everything through (the token, users), but
/// holds every add-friend request unanswered and records whom it was for.
struct HoldingProxy {
    base: String,
    held: Arc<Mutex<Vec<String>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl HoldingProxy {
    async fn spawn(upstream: String) -> HoldingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let held = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (seen, notify, http) = (held.clone(), arrived.clone(), reqwest::Client::new());
        let forward = move |req: axum::extract::Request| {
            let (seen, notify, http, upstream) = (seen.clone(), notify.clone(), http.clone(), upstream.clone());
            async move {
                let (parts, body) = req.into_parts();
                let path = parts.uri.path().to_string();
                if let Some((_, friend)) = path.split_once("/contacts/users/") {
                    seen.lock().expect("lock").push(friend.to_string());
                    notify.notify_one();
                    std::future::pending::<()>().await;
                }
                let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                let url = format!("{upstream}{}", parts.uri.path_and_query().expect("path"));
                let answer =
                    http.request(parts.method, url).headers(parts.headers).body(body).send().await.expect("upstream");
                let status = answer.status();
                let mut response =
                    axum::response::Response::new(axum::body::Body::from(answer.bytes().await.expect("upstream body")));
                *response.status_mut() = status;
                response
            }
        };
        tokio::spawn(async move { axum::serve(listener, axum::Router::new().fallback(forward)).await });
        HoldingProxy { base, held, arrived }
    }
}

/// A SIGKILL in the middle of a batch: the calls already sent are closed `unknown` by the next
/// start (Easemob may have acted), the ones still waiting for their turn under the rate limit as
/// `failed` with 0 attempts and "not sent" (nothing reached Easemob), and no call that reached
/// Easemob is among those.
#[tokio::test]
async fn sigkill_mid_batch_tells_the_calls_sent_from_the_ones_still_waiting_for_their_turn() {
    // Arrange: the service in front of a holding proxy, one call a second.
    let sandbox = friendhook::sandbox::spawn(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        friendhook::sandbox::SandboxConfig::default(),
        friendhook::clock::system(),
    )
    .await
    .expect("sandbox");
    let friends: Vec<String> = (0..30).map(|i| format!("friend{i}")).collect();
    let users: Vec<friendhook::easemob::NewUser> = std::iter::once("alice".to_string())
        .chain(friends.iter().cloned())
        .map(|username| friendhook::easemob::NewUser { username, password: "pw".into(), nickname: None })
        .collect();
    sandbox_client(&sandbox).register_users(&users).await.expect("register");
    let proxy = HoldingProxy::spawn(sandbox.base_url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("batch.db").display());
    let mut args = real_easemob_args(&proxy.base);
    args.extend_from_slice(&["--easemob-rate-limit", "1"]);
    let mut service = ServeProcess::start(&db_url, &args, &[]).await;

    // Act: a batch of 30 adds; killed once the first has reached "Easemob" (the proxy). At one
    // call a second, the rest are waiting for their turn then.
    let pairs: Vec<Value> = friends.iter().map(|f| serde_json::json!({"owner": "alice", "friend": f})).collect();
    let batch = {
        let (http, url) = (bounded_client(), format!("{}/v1/friends/batch", service.base));
        tokio::spawn(async move { http.post(url).json(&serde_json::json!({"pairs": pairs})).send().await })
    };
    tokio::time::timeout(WITHIN, proxy.arrived.notified()).await.expect("the first add reaches the proxy");
    service.kill_now();
    service.wait_exit(WITHIN).await;
    // Its connection was cut by the kill: no answer to look at.
    let _ = batch.await;
    let reached: Vec<String> = proxy.held.lock().expect("lock").clone();

    // Assert: the restart closes every call, each by whether it was sent.
    let mut service = ServeProcess::start(&db_url, &args, &[]).await;
    let mut conn = open_db(&db_url).await;
    let rows = sqlx::query("SELECT friend, outcome, attempts, outcome_detail FROM calls ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("calls");
    assert!(rows.len() >= 2, "the batch's intents were recorded: {} calls", rows.len());
    let (mut unknown, mut not_sent) = (Vec::new(), Vec::new());
    for row in &rows {
        let friend: String = row.get("friend");
        let outcome: String = row.get("outcome");
        let detail: String = row.get("outcome_detail");
        match outcome.as_str() {
            "unknown" => {
                assert!(detail.contains("may or may not have acted"), "{friend}: {detail}");
                unknown.push(friend);
            }
            "failed" => {
                assert_eq!(row.get::<i64, _>("attempts"), 0, "{friend}: {detail}");
                assert!(detail.starts_with("not sent:") && detail.contains("safe to send again"), "{friend}: {detail}");
                not_sent.push(friend);
            }
            other => panic!("call for {friend} closed as {other}: {detail}"),
        }
    }
    for friend in &reached {
        assert!(unknown.contains(friend), "{friend} reached Easemob, so its call is unknown: {unknown:?}");
    }
    assert!(!reached.is_empty() && !not_sent.is_empty(), "reached {reached:?}, not sent {not_sent:?}");
    println!(
        "batch cut by SIGKILL: {} calls recorded, {} reached Easemob, closed {} unknown and {} not sent",
        rows.len(),
        reached.len(),
        unknown.len(),
        not_sent.len()
    );
    let log = service.log();
    let line = log.lines().find(|l| l.contains("before they were sent as outcome=failed")).unwrap_or_default();
    assert!(line.contains(&format!("calls={}", not_sent.len())), "{log}");
    service.signal("TERM");
    assert_eq!(service.wait_exit(WITHIN).await.code(), Some(0), "{}", service.log());
    assert_audit_verifies(&db_url).await;
    sandbox.shutdown().await;
}
