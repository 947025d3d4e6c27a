//! Hostile and abusive traffic: what an attacker or a broken sender can throw at the receiver,
//! and the proof that it neither breaks the service nor costs an acknowledged callback.
//!
//! Every test sends valid, signed callbacks alongside the abuse and checks they are answered 200
//! and stored. Bounds on time are upper bounds in whole seconds: they catch a hang, not a slow
//! machine.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::helpers::*;
use crate::process::{SANDBOX_CLIENT_SECRET, ServeProcess, bounded_client, sandbox_register, sandbox_token};
use crate::receiver::sqlite_count;

const TS: i64 = 1_700_000_000_000;

/// Generous bound for "the server closed this connection"; the configured timeouts are 1 s.
const CLOSED_WITHIN: Duration = Duration::from_secs(10);

/// Generous bound for one ordinary request on a loaded CI box.
const PROMPT: Duration = Duration::from_secs(5);

fn call_id(msg_id: &str) -> String {
    format!("{APPKEY}_{msg_id}")
}

/// Every stored callback's call_id, paging through the whole list.
async fn stored_call_ids(app: &TestApp) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = app.get_json(&format!("/v1/callbacks?limit=1000&cursor={cursor}")).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().expect("items") {
            ids.push(item["call_id"].as_str().expect("call_id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => return ids,
        }
    }
}

/// A roster callback whose `timestamp` is written as `ts_text` and signed over `signed_text`: if
/// the parser accepted the text, the signature would verify and the event would be stored.
fn body_with_timestamp(msg_id: &str, ts_text: &str, signed_text: &str) -> Vec<u8> {
    let call_id = call_id(msg_id);
    let security = friendhook::signature::easemob::sign(&call_id, SECRET, signed_text);
    format!(
        r#"{{"chat_type":"roster","callId":"{call_id}","security":"{security}","payload":{{"operation":"add"}},"appkey":"{APPKEY}","from":"{APPKEY}_alice@easemob.com","to":"bob","eventType":"chat","msg_id":"{msg_id}","timestamp":{ts_text}}}"#
    )
    .into_bytes()
}

/// One hostile request and the answer it must get: status and stable error code.
struct Hostile {
    name: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

/// A JSON-typed hostile body that must get 400 with `code`.
fn hostile(name: &'static str, body: impl Into<Vec<u8>>, code: &'static str) -> Hostile {
    Hostile { name, content_type: "application/json", body: body.into(), status: 400, code }
}

/// The corpus. Bodies that are close to valid are correctly signed, so that a parser slip would
/// show up as a stored event rather than a harmless 401.
fn hostile_corpus() -> Vec<Hostile> {
    let valid = |msg: &str| roster_body(msg, "alice", "bob", "add", TS, SECRET).into_bytes();
    // A byte planted inside the `to` string value, between `b` and `ob`.
    let planted = |msg: &str, byte: u8| {
        let mut body = valid(msg);
        let at = body.windows(5).position(|w| w == b"\"bob\"").expect("to field") + 2;
        body.insert(at, byte);
        body
    };
    let invalid_utf8 = planted("h-utf8", 0xff);
    let nul_in_string = planted("h-nul-string", 0);
    let mut nul_after = valid("h-nul-after");
    nul_after.push(0);
    let truncated = valid("h-truncated");
    let truncated = truncated[..truncated.len() / 2].to_vec();
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(valid("h-bom"));
    let deep_inside = {
        let v = String::from_utf8(valid("h-deep-inside")).expect("utf8");
        let depth = 100_000;
        format!("{},\"x\":{}{}}}", &v[..v.len() - 1], "[".repeat(depth), "]".repeat(depth))
    };
    let duplicate_call_id = {
        let (a, b) = (call_id("h-dup-a"), call_id("h-dup-b"));
        let security = friendhook::signature::easemob::sign(&b, SECRET, &TS.to_string());
        format!(
            r#"{{"callId":"{a}","callId":"{b}","security":"{security}","timestamp":{TS},"to":"bob","eventType":"chat","payload":{{"operation":"add"}}}}"#
        )
    };
    let duplicate_timestamp = {
        let c = call_id("h-dup-ts");
        let security = friendhook::signature::easemob::sign(&c, SECRET, &TS.to_string());
        format!(r#"{{"callId":"{c}","security":"{security}","timestamp":{TS},"timestamp":1,"to":"bob"}}"#)
    };

    vec![
        hostile("invalid UTF-8 inside a string", invalid_utf8, "invalid_json"),
        hostile("100,000 nested [", "[".repeat(100_000), "invalid_json"),
        hostile("100,000 nested {\"a\":", "{\"a\":".repeat(100_000), "invalid_json"),
        hostile("100,000-deep array inside a signed body", deep_inside, "invalid_json"),
        hostile(
            "20-digit timestamp",
            body_with_timestamp("h-ts20", "99999999999999999999", "99999999999999999999"),
            "invalid_field",
        ),
        hostile(
            "negative timestamp",
            body_with_timestamp("h-tsneg", "-1700000000000", "-1700000000000"),
            "invalid_field",
        ),
        hostile(
            "fractional timestamp",
            body_with_timestamp("h-tsfrac", "1700000000000.5", "1700000000000.5"),
            "invalid_field",
        ),
        // A string of digits is read (see receiver.rs); a string of anything else is not.
        hostile(
            "string timestamp that is not digits",
            body_with_timestamp("h-tsstr", "\"1700000000000Z\"", "1700000000000Z"),
            "invalid_field",
        ),
        hostile("exponent timestamp 1e3", body_with_timestamp("h-tsexp", "1e3", "1e3"), "invalid_field"),
        hostile("null timestamp", body_with_timestamp("h-tsnull", "null", "null"), "missing_field"),
        hostile("duplicate callId keys", duplicate_call_id, "invalid_json"),
        hostile("duplicate timestamp keys", duplicate_timestamp, "invalid_json"),
        hostile("raw NUL inside a string", nul_in_string, "invalid_json"),
        hostile("raw NUL after a valid body", nul_after, "invalid_json"),
        hostile("only NUL bytes", vec![0u8; 64], "invalid_json"),
        hostile("empty body", Vec::new(), "invalid_json"),
        hostile("UTF-8 BOM before a valid body", bom, "invalid_json"),
        hostile("body ending mid-token", truncated, "invalid_json"),
        hostile("JSON array", "[1,2,3]", "invalid_json"),
        hostile("JSON string", "\"hello\"", "invalid_json"),
        hostile("JSON number", "42", "invalid_json"),
        hostile("JSON null", "null", "invalid_json"),
        Hostile {
            name: "text/plain with a valid signed body",
            content_type: "text/plain",
            body: valid("h-text-plain"),
            status: 415,
            code: "unsupported_media_type",
        },
        Hostile {
            name: "form content type with a valid signed body",
            content_type: "application/x-www-form-urlencoded",
            body: valid("h-form"),
            status: 415,
            code: "unsupported_media_type",
        },
    ]
}

/// Asserts an error answer is `{"code": "...", "detail": "..."}` JSON.
fn assert_json_error(what: &str, content_type: Option<&str>, body: &[u8]) -> Value {
    assert!(
        content_type.is_some_and(|c| c.starts_with("application/json")),
        "{what}: error answered with content type {content_type:?}"
    );
    let err: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e})"));
    assert!(err["code"].is_string() && err["detail"].is_string(), "{what}: {err}");
    err
}

/// Sends `head`, then `body` from a separate task (so a server that answers early and stops
/// reading cannot block the exchange), and reads one response: (status, head, body).
async fn raw_exchange(addr: std::net::SocketAddr, head: Vec<u8>, body: Vec<u8>) -> (u16, String, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(&head).await.expect("write request head");
    let sender = tokio::spawn(async move {
        // Errors are expected here: the server may close before the body is through.
        let _ = writer.write_all(&body).await;
        writer
    });
    let answer =
        tokio::time::timeout(CLOSED_WITHIN, read_response(&mut reader)).await.expect("response within the bound");
    sender.abort();
    answer
}

async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read response head");
        assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    loop {
        if length.is_some_and(|n| body.len() >= n) {
            break;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    (status, head, body)
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Reads until the server closes the connection (EOF or reset); `Err` if it is still open after
/// `within`.
async fn wait_closed(mut reader: tokio::net::tcp::OwnedReadHalf, within: Duration) -> Result<Duration, ()> {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| ())
}

#[tokio::test]
async fn hostile_bodies_get_json_4xx_while_valid_callbacks_sent_alongside_are_stored() {
    // Arrange: a body limit large enough that the nesting bodies (up to 500 kB) reach the parser
    // instead of being cut off by the size check.
    let max_body = 1 << 20;
    let app = TestApp::spawn(&["--max-body-bytes", &max_body.to_string()]).await;
    let corpus = hostile_corpus();
    let valid: Vec<(String, String)> = (0..30)
        .map(|i| {
            let msg = format!("valid-{i}");
            (call_id(&msg), roster_body(&msg, "alice", &format!("friend{i}"), "add", TS + i, SECRET))
        })
        .collect();

    // Act: every hostile request and every valid one in flight at the same time, interleaved.
    let mut hostile_tasks = JoinSet::new();
    let mut valid_tasks = JoinSet::new();
    let url = app.url("/callbacks/easemob");
    for (i, h) in corpus.into_iter().enumerate() {
        let (client, hostile_url) = (app.client.clone(), url.clone());
        hostile_tasks.spawn(async move {
            let r = client.post(hostile_url).header("content-type", h.content_type).body(h.body).send().await;
            let r = r.unwrap_or_else(|e| panic!("{}: no answer ({e})", h.name));
            let status = r.status().as_u16();
            let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = r.bytes().await.expect("body");
            (h.name, (h.status, h.code), status, content_type, body)
        });
        if let Some((id, body)) = valid.get(i) {
            let (client, url, id, body) = (app.client.clone(), url.clone(), id.clone(), body.clone());
            valid_tasks.spawn(async move {
                let r = client.post(url).header("content-type", "application/json").body(body).send().await;
                (id, r.expect("valid callback answered").status().as_u16())
            });
        }
    }
    for (id, body) in valid.iter().skip(valid_tasks.len()) {
        let (client, url, id, body) = (app.client.clone(), url.clone(), id.clone(), body.clone());
        valid_tasks.spawn(async move {
            let r = client.post(url).header("content-type", "application/json").body(body).send().await;
            (id, r.expect("valid callback answered").status().as_u16())
        });
    }
    // The size cases go over a raw connection: the server answers 413 without reading the rest,
    // and a client still writing its body may see the connection reset before it reads the
    // answer, which an HTTP client library reports as an error instead of the 413.
    let oversized = format!(r#"{{"callId":"x","timestamp":1,"security":"{}"}}"#, "a".repeat(max_body + 1));
    let json_head = "POST /callbacks/easemob HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    let size_cases = [
        // Declared too large: refused from the header alone.
        ("oversized body", format!("{json_head}Content-Length: {}\r\n\r\n", oversized.len()), oversized.clone()),
        // Undeclared (chunked): refused once the limit is read, without buffering the rest.
        (
            "oversized chunked body",
            format!("{json_head}Transfer-Encoding: chunked\r\n\r\n"),
            format!("{:x}\r\n{oversized}\r\n0\r\n\r\n", oversized.len()),
        ),
        // A Content-Length far beyond the limit with a tiny body: refused without waiting for
        // bytes that will never come.
        (
            "huge Content-Length, small body",
            format!("{json_head}Content-Length: 1000000000000000\r\n\r\n"),
            "{}".to_string(),
        ),
    ];
    let mut size_answers = Vec::new();
    for (name, head, body) in size_cases {
        size_answers.push((name, raw_exchange(app.addr, head.into_bytes(), body.into_bytes()).await));
    }

    // Assert: each hostile request got its 4xx as {"code","detail"} JSON.
    let mut answered = 0;
    while let Some(joined) = hostile_tasks.join_next().await {
        let (name, (want_status, want_code), got, content_type, body) = joined.expect("hostile task did not panic");
        assert_eq!(got, want_status, "{name}: {}", String::from_utf8_lossy(&body));
        let err = assert_json_error(name, content_type.as_deref(), &body);
        assert_eq!(err["code"], want_code, "{name}: {err}");
        answered += 1;
    }
    for (name, (status, head, body)) in &size_answers {
        assert_eq!(*status, 413, "{name}: {head}");
        let err = assert_json_error(name, header_value(head, "content-type"), body);
        assert_eq!(err["code"], "payload_too_large", "{name}");
        answered += 1;
    }
    // ...and every valid callback sent alongside got 200.
    while let Some(joined) = valid_tasks.join_next().await {
        let (id, status) = joined.expect("valid task did not panic");
        assert_eq!(status, 200, "valid callback {id}");
    }
    println!("hostile corpus: {answered} requests answered 4xx, {} valid callbacks answered 200", valid.len());

    // The service is still healthy and stored exactly the valid callbacks, nothing else.
    assert_eq!(app.get_json("/healthz").await.0, 200);
    assert_eq!(app.get_json("/readyz").await.0, 200);
    let stored: BTreeSet<String> = stored_call_ids(&app).await.into_iter().collect();
    let expected: BTreeSet<String> = valid.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(stored, expected);
    app.stop().await;
}

#[tokio::test]
async fn slow_loris_connections_are_closed_by_the_header_timeout_while_others_are_served() {
    // Arrange
    let app = TestApp::spawn(&["--header-timeout", "1s"]).await;
    let mut closing = JoinSet::new();

    // Act: silent connections (connect, send nothing), tricklers (one header byte every 200 ms,
    // forever) and a stalled client (half a request line, then nothing).
    for kind in 0..30 {
        let stream = TcpStream::connect(app.addr).await.expect("connect");
        let (reader, mut writer) = stream.into_split();
        match kind % 3 {
            0 => {
                closing.spawn(async move {
                    let r = wait_closed(reader, CLOSED_WITHIN).await;
                    drop(writer);
                    ("silent", r)
                });
            }
            1 => {
                let trickle = tokio::spawn(async move {
                    let prefix = b"POST /callbacks/easemob HTTP/1.1\r\nHost: x\r\nX-Padding: ";
                    for &byte in prefix.iter().chain(std::iter::repeat(&b'a')) {
                        if writer.write_all(&[byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
                closing.spawn(async move {
                    let r = wait_closed(reader, CLOSED_WITHIN).await;
                    trickle.abort();
                    ("trickler", r)
                });
            }
            _ => {
                writer.write_all(b"POST /callbacks/eas").await.expect("write");
                closing.spawn(async move {
                    let r = wait_closed(reader, CLOSED_WITHIN).await;
                    drop(writer);
                    ("stalled", r)
                });
            }
        }
    }
    // Meanwhile an ordinary client is served promptly.
    let started = Instant::now();
    let r = app.post_callback(roster_body("loris-valid", "alice", "bob", "add", TS, SECRET)).await;
    let valid_latency = started.elapsed();
    let health = app.get_json("/healthz").await.0;

    // Assert
    assert_eq!(r.status(), 200);
    assert_eq!(health, 200);
    assert!(valid_latency < PROMPT, "a normal request took {valid_latency:?} during the slow-loris attack");
    let mut slowest = Duration::ZERO;
    while let Some(joined) = closing.join_next().await {
        let (kind, closed) = joined.expect("task");
        let after = closed.unwrap_or_else(|()| panic!("a {kind} connection was still open after {CLOSED_WITHIN:?}"));
        slowest = slowest.max(after);
    }
    println!("slow loris: 30 connections closed, the last after {slowest:?}; a normal request took {valid_latency:?}");
    assert_eq!(stored_call_ids(&app).await, vec![call_id("loris-valid")]);
    app.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_outlives_the_header_timeout_while_idle_but_not_the_idle_timeout() {
    // Arrange: a header timeout far shorter than the idle timeout.
    let app = TestApp::spawn(&["--header-timeout", "1s", "--idle-timeout", "60s"]).await;
    let short_idle = TestApp::spawn(&["--header-timeout", "1s", "--idle-timeout", "2s"]).await;
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    // Act: one request, then idle for twice the header timeout (the wait is what is tested: any
    // wait between 1 s and 60 s must give the same answer), then a second request on the same
    // connection; then the first bytes of a third request whose headers never finish.
    let (mut reader, mut writer) = TcpStream::connect(app.addr).await.expect("connect").into_split();
    writer.write_all(get).await.expect("write");
    let first = read_response(&mut reader).await.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writer.write_all(get).await.expect("write after idling");
    let second = tokio::time::timeout(CLOSED_WITHIN, read_response(&mut reader)).await;
    writer.write_all(b"GET /heal").await.expect("write");
    let trickle_closed = wait_closed(reader, CLOSED_WITHIN).await;

    let (mut idle_reader, mut idle_writer) = TcpStream::connect(short_idle.addr).await.expect("connect").into_split();
    // Timed from before the request: the service's idle clock starts later (at its answer), so
    // however late this test runs, what it measures is never shorter than the idle it saw.
    let idle_started = Instant::now();
    idle_writer.write_all(get).await.expect("write");
    let idle_first = read_response(&mut idle_reader).await.0;
    let idle_closed = wait_closed(idle_reader, CLOSED_WITHIN).await.map(|_| idle_started.elapsed());

    // Assert
    assert_eq!(first, 200);
    assert_eq!(second.expect("the kept-alive connection answered").0, 200);
    assert!(trickle_closed.is_ok(), "unfinished headers on a kept-alive connection were not cut");
    assert_eq!(idle_first, 200);
    let idle_for = idle_closed.expect("an idle connection is closed after --idle-timeout");
    assert!(idle_for >= Duration::from_millis(1500), "closed after {idle_for:?}, before the idle timeout");
    app.stop().await;
    short_idle.stop().await;
}

#[tokio::test]
async fn a_body_trickler_gets_a_json_408_from_the_request_timeout() {
    // Arrange
    // A deadline long enough for the callback sent beside it to commit on a loaded machine; the
    // trickled body would take about a minute.
    let app = TestApp::spawn(&["--request-timeout", "3s", "--sqlite-busy-timeout", "1s"]).await;
    let body = roster_body("trickled", "alice", "bob", "add", TS, SECRET);
    let head = format!(
        "POST /callbacks/easemob HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = TcpStream::connect(app.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();

    // Act: the headers and a few bytes, then one byte every 300 ms: the body would take minutes.
    writer.write_all(head.as_bytes()).await.expect("write head");
    writer.write_all(&body.as_bytes()[..10]).await.expect("write start of body");
    let trickle = {
        let rest = body.as_bytes()[10..].to_vec();
        tokio::spawn(async move {
            for byte in rest {
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let started = Instant::now();
    let r = app.post_callback(roster_body("beside-trickler", "alice", "carol", "add", TS, SECRET)).await;
    let valid_latency = started.elapsed();
    let mut response = Vec::new();
    let read = tokio::time::timeout(CLOSED_WITHIN, async {
        let mut chunk = [0u8; 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
            if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}") {
                return;
            }
        }
    })
    .await;
    trickle.abort();

    // Assert
    assert!(read.is_ok(), "the trickling request was neither answered nor closed within {CLOSED_WITHIN:?}");
    let text = String::from_utf8_lossy(&response).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "expected a 408, got {text:?}");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let err = assert_json_error("request timeout", header_value(head, "content-type"), body.as_bytes());
    assert_eq!(err["code"], "request_timeout");
    println!("body trickler answered 408 after {:?}; a normal request took {valid_latency:?}", started.elapsed());
    assert_eq!(r.status(), 200);
    assert!(valid_latency < PROMPT, "a normal request took {valid_latency:?} beside the trickler");
    assert_eq!(stored_call_ids(&app).await, vec![call_id("beside-trickler")], "the trickled body was never stored");
    let metrics = app.metrics().await;
    assert_eq!(
        metrics.get(r#"friendhook_callbacks_received_total{result="timed_out"}"#),
        Some(&1.0),
        "the 408 is counted like every other answer to a delivery"
    );
    app.stop().await;
}

/// The trigger endpoints wait on Easemob for up to --trigger-timeout (minutes), but their body
/// is read under the ordinary request deadline: a sender trickling one is answered 408 like any
/// other, instead of holding a slot of the API for the trigger timeout. An oversized one is
/// refused before it is sent, even when it asks `Expect: 100-continue`.
#[tokio::test]
async fn a_trigger_body_is_read_under_the_request_timeout_not_the_trigger_timeout() {
    let app = TestApp::spawn(&["--request-timeout", "1s", "--sqlite-busy-timeout", "500ms"]).await;
    for path in ["/v1/friends", "/v1/friends/batch", "/v1/easemob/exception-cache/resend"] {
        let head =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n");
        // Ten bytes of a hundred, and then nothing: only the request timeout can end it.
        let (status, head, body) = raw_exchange(app.addr, head.into_bytes(), b"{\"owner\":".to_vec()).await;
        assert_eq!(status, 408, "{path}: {head}");
        let err = assert_json_error(path, header_value(&head, "content-type"), &body);
        assert_eq!(err["code"], "request_timeout", "{path}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("nothing was started"), "{path}: {err}");
    }
    let head = "POST /v1/friends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n";
    let (status, head, _) = raw_exchange(app.addr, head.as_bytes().to_vec(), Vec::new()).await;
    assert_eq!(status, 413, "refused without a 100 Continue first: {head}");
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(0), "{calls}");
    app.stop().await;

    // With an API token, a caller without it is refused before its body is read at all.
    let guarded =
        TestApp::spawn(&["--request-timeout", "1s", "--sqlite-busy-timeout", "500ms", "--api-token", "t0k"]).await;
    let head = "POST /v1/friends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let (status, head, _) = raw_exchange(guarded.addr, head.as_bytes().to_vec(), b"{\"owner\":".to_vec()).await;
    assert_eq!(status, 401, "not a 408 after waiting for the body: {head}");
    guarded.stop().await;
}

#[tokio::test]
async fn a_full_api_leaves_callbacks_probes_and_metrics_their_turn() {
    // One request at a time of each kind, and a long-poll holding the API's.
    let app = TestApp::spawn(&["--max-in-flight", "1"]).await;
    let client = app.client.clone();
    let url = app.url("/v1/feed?after=0&wait=30s");
    let long_poll = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    // Until another API request has to wait, the long-poll may not have its slot yet.
    let held = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let mut api_waited = false;
    for _ in 0..50 {
        if held.get(app.url("/v1/calls")).send().await.is_err() {
            api_waited = true;
            break;
        }
    }
    assert!(api_waited, "with --max-in-flight 1 and a long-poll running, another API request waits");

    let patient = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for open in ["/healthz", "/readyz", "/metrics"] {
        let r = patient.get(app.url(open)).send().await.unwrap_or_else(|e| panic!("{open} answered: {e}"));
        assert_eq!(r.status(), 200, "{open}");
    }
    let body = roster_body("beside-long-poll", "alice", "bob", "add", TS, SECRET);
    let r = patient
        .post(app.url("/callbacks/easemob"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the callback is answered while the API is full");
    assert_eq!(r.status(), 200);
    // The stored callback ends the long-poll.
    assert_eq!(long_poll.await.unwrap().expect("long-poll answered"), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_burst_of_ten_thousand_bad_signatures_neither_delays_valid_callbacks_nor_grows_the_rejection_log() {
    // Arrange
    const BAD: usize = 10_000;
    const VALID: usize = 50;
    const CAP: i64 = 500;
    let app = TestApp::spawn(&["--rejection-log-cap", &CAP.to_string()]).await;
    let sent_bad = Arc::new(AtomicUsize::new(0));
    let url = app.url("/callbacks/easemob");

    // Act: 32 workers share the 10,000 bad requests (each a distinct body with a wrong secret).
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..32 {
        let (client, url, sent_bad) = (app.client.clone(), url.clone(), sent_bad.clone());
        workers.spawn(async move {
            let mut not_401 = Vec::new();
            loop {
                let n = sent_bad.fetch_add(1, Ordering::Relaxed);
                if n >= BAD {
                    return not_401;
                }
                let body = roster_body(&format!("bad-{n}"), "mallory", "bob", "add", TS, "wrong-secret");
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(401) => {}
                    other => not_401.push(format!("{other:?}")),
                }
            }
        });
    }
    // The valid callbacks are spread through the burst by progress, not by the clock: the k-th
    // goes out once 150·k bad requests have been started, so all 50 are sent while it runs.
    let valid_sender = {
        let (client, url, sent_bad) = (app.client.clone(), url.clone(), sent_bad.clone());
        tokio::spawn(async move {
            let mut answers = Vec::with_capacity(VALID);
            for k in 0..VALID {
                while sent_bad.load(Ordering::Relaxed) < 150 * k {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let msg = format!("valid-{k}");
                let body = roster_body(&msg, "alice", &format!("friend{k}"), "add", TS, SECRET);
                let t = Instant::now();
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await;
                answers.push((call_id(&msg), r.map(|r| r.status().as_u16()).ok(), t.elapsed()));
            }
            answers
        })
    };
    let mut wrong = Vec::new();
    while let Some(joined) = workers.join_next().await {
        wrong.extend(joined.expect("worker"));
    }
    let burst_time = started.elapsed();
    let answers = valid_sender.await.expect("valid sender");

    // Assert
    assert!(wrong.is_empty(), "bad signatures answered other than 401: {:?}", &wrong[..wrong.len().min(10)]);
    let mut latencies: Vec<Duration> = answers.iter().map(|(_, _, t)| *t).collect();
    latencies.sort();
    println!(
        "bad-signature burst: {BAD} x 401 in {burst_time:?}; {VALID} valid callbacks during it: \
         min {:?}, median {:?}, max {:?}",
        latencies[0],
        latencies[VALID / 2],
        latencies[VALID - 1]
    );
    for (id, status, latency) in &answers {
        assert_eq!(*status, Some(200), "valid callback {id}");
        assert!(*latency < PROMPT, "valid callback {id} took {latency:?}");
    }
    let stored: HashSet<String> = stored_call_ids(&app).await.into_iter().collect();
    let expected: HashSet<String> = answers.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(stored, expected, "exactly the valid callbacks are stored");
    let db = app.db_url.clone();
    let _dir = app.stop().await;
    let kept = sqlite_count(&db, "SELECT count(*) FROM rejected_deliveries").await;
    println!("rejection log after the burst: {kept} rows (cap {CAP})");
    assert_eq!(kept, CAP, "the rejection log holds the newest {CAP} rejections, no more");
}

#[tokio::test]
async fn under_overload_every_answer_is_200_and_stored_or_503_with_retry_after_and_a_retry_succeeds() {
    // Arrange: the smallest possible writer, so that a few hundred concurrent callbacks overrun it.
    // 300 connections (600 descriptors in this one process) leave room under a 1024 fd limit for
    // the tests running beside this one.
    const N: usize = 300;
    let app = TestApp::spawn(&["--write-queue", "4", "--max-batch", "1"]).await;
    let bodies: Vec<(String, String)> = (0..N)
        .map(|i| {
            let msg = format!("load-{i}");
            (call_id(&msg), roster_body(&msg, &format!("u{i}"), "bob", "add", TS + i as i64, SECRET))
        })
        .collect();

    // Act
    let mut tasks = JoinSet::new();
    for (id, body) in bodies.clone() {
        let url = app.url("/callbacks/easemob");
        let client = app.client.clone();
        tasks.spawn(async move {
            let r = client.post(url).header("content-type", "application/json").body(body.clone()).send().await;
            let r = r.expect("answered");
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            let json: Value = r.json().await.unwrap_or(Value::Null);
            (id, body, status, retry_after, json)
        });
    }
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, body, status, retry_after, json) = joined.expect("task");
        match status {
            200 => acked.push(id),
            503 => {
                let secs: u64 = retry_after
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("503 without a numeric Retry-After: {retry_after:?}"));
                assert!(secs >= 1, "Retry-After {secs}");
                assert_eq!(json["code"], "overloaded", "{json}");
                refused.push((id, body));
            }
            other => {
                panic!("{id}: status {other} under overload ({json}); only 200 or 503 are allowed")
            }
        }
    }
    println!("overload: {} x 200, {} x 503 with Retry-After out of {N}", acked.len(), refused.len());

    // Assert: every 200 is stored.
    let stored: HashSet<String> = stored_call_ids(&app).await.into_iter().collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is not stored");
    }
    // A 503'd callback was not stored, and re-sending it (as Easemob retries) stores it.
    for (id, body) in &refused {
        let r = app.post_callback(body.clone()).await;
        assert_eq!(r.status(), 200, "retry of {id}");
        let ack: Value = r.json().await.expect("ack");
        assert_eq!(ack["duplicate"], false, "{id} was answered 503 yet already stored");
    }
    let stored: HashSet<String> = stored_call_ids(&app).await.into_iter().collect();
    let all: HashSet<String> = bodies.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(stored, all, "after the retries every callback is stored exactly once");
    app.stop().await;
}

#[tokio::test]
async fn max_in_flight_makes_excess_requests_wait_rather_than_fail() {
    // Arrange
    const N: usize = 100;
    let app = TestApp::spawn(&["--max-in-flight", "2"]).await;

    // Act
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let url = app.url("/callbacks/easemob");
        let client = app.client.clone();
        let body = roster_body(&format!("limited-{i}"), "alice", &format!("f{i}"), "add", TS, SECRET);
        tasks.spawn(async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("answered")
                .status()
                .as_u16()
        });
    }

    // Assert
    while let Some(joined) = tasks.join_next().await {
        assert_eq!(joined.expect("task"), 200);
    }
    assert_eq!(stored_call_ids(&app).await.len(), N);
    app.stop().await;
}

/// True if `log` contains `YWMt` followed by 48 hex digits: the shape of every token the sandbox
/// issues, so this catches the service's own token too, which the test never sees.
fn contains_sandbox_token(log: &str) -> bool {
    log.match_indices("YWMt").any(|(i, _)| {
        let rest = &log.as_bytes()[i + 4..];
        rest.len() >= 48 && rest[..48].iter().all(u8::is_ascii_hexdigit)
    })
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_log_at_debug_level() {
    secrets_and_tokens_stay_out_of_the_log_at("debug", "DEBUG").await;
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_log_even_at_trace_level() {
    // Trace is where libraries print statements and wire details, so it is the riskiest level.
    secrets_and_tokens_stay_out_of_the_log_at("trace", "TRACE").await;
}

/// Runs the binary at `level`, drives triggers and callbacks good and bad, stops it with SIGTERM,
/// and searches everything it printed for the secrets and tokens in play.
async fn secrets_and_tokens_stay_out_of_the_log_at(level: &str, level_marker: &str) {
    // Arrange: the real binary, with a secret that cannot appear by accident.
    const CALLBACK_SECRET: &str = "cb-secret-7Hq2xZ9vLw-never-log-me";
    const API_TOKEN: &str = "api-token-3Rt8pN-never-log-me";
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("secrets.db").display());
    let mut service = ServeProcess::start(
        &db_url,
        &["--callback-secret", CALLBACK_SECRET, "--api-token", API_TOKEN],
        &[("RUST_LOG", level)],
    )
    .await;
    let http = bounded_client();
    let token = sandbox_token(&http, &service.sandbox).await;
    let users: Vec<String> = ["alice", "bob", "carol", "dave"].iter().map(|s| s.to_string()).collect();
    sandbox_register(&http, &service.sandbox, &token, &users).await;

    // Act: triggers (the service fetches and uses its own token), callbacks good and bad.
    for friend in ["bob", "carol", "dave", "nobody"] {
        let r = http
            .post(format!("{}/v1/friends", service.base))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({"owner": "alice", "friend": friend}))
            .send()
            .await
            .expect("trigger");
        assert_eq!(r.status(), 201, "trigger alice -> {friend}");
    }
    for (msg, secret, want) in
        [("s-ok-1", CALLBACK_SECRET, 200), ("s-ok-2", CALLBACK_SECRET, 200), ("s-bad", SECRET, 401)]
    {
        let r = http
            .post(format!("{}/callbacks/easemob", service.base))
            .header("content-type", "application/json")
            .body(roster_body(msg, "alice", "bob", "add", TS, secret))
            .send()
            .await
            .expect("callback");
        assert_eq!(r.status().as_u16(), want, "{msg}");
    }
    // A request to the sandbox with a bad token, so the 401 path of the sandbox is logged too.
    let r = http
        .get(format!("{}/demo-org/demo-app/users/alice", service.sandbox))
        .bearer_auth("YWMtnot-a-token")
        .send()
        .await;
    assert_eq!(r.expect("sandbox answered").status(), 401);
    // The sandbox's callbacks for the adds have arrived once three are stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page: Value = http
            .get(format!("{}/v1/callbacks?operation=add", service.base))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        if page["items"].as_array().map_or(0, Vec::len) >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox callbacks did not arrive: {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(20)).await;

    // Assert
    let log = service.log();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the service cleanly:\n{log}");
    assert!(log.contains(level_marker), "the test is only meaningful if {level} logging was on:\n{log}");
    // ...and that the service's own token round trip ran, and was logged about, at this level.
    assert!(log.contains("obtained an Easemob app token"), "{log}");
    println!("secrets test at {level}: {} log lines checked", log.lines().count());
    for (what, secret) in [
        ("the callback secret", CALLBACK_SECRET),
        ("the API token", API_TOKEN),
        ("the sandbox client secret", SANDBOX_CLIENT_SECRET),
        ("the access token issued to the test", token.as_str()),
    ] {
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            panic!("{what} appears in the log: {line}");
        }
    }
    assert!(!contains_sandbox_token(&log), "an issued access token appears in the log");
}

/// Requests the API itself refuses before any handler logic runs: each gets the documented JSON
/// error with the right status, not axum's plain text, and a negative cursor is refused rather
/// than walked from (a lookup by user steps through its index from the cursor's bucket).
#[tokio::test]
async fn malformed_api_requests_get_json_errors_with_the_right_status() {
    let app = TestApp::spawn(&[]).await;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "negative cursor with a user filter",
            app.client.get(format!("{}/v1/callbacks?from=alice&cursor=-9223372036854775808", app.base)),
            400,
            "invalid_query",
        ),
        ("negative cursor of calls", app.client.get(format!("{}/v1/calls?cursor=-1", app.base)), 400, "invalid_query"),
        ("negative feed position", app.client.get(format!("{}/v1/feed?after=-1", app.base)), 400, "invalid_query"),
        // Ignored, these would answer everything: the feed from its start, every callback.
        ("the feed given a cursor", app.client.get(format!("{}/v1/feed?cursor=20", app.base)), 400, "invalid_query"),
        ("a misspelt filter", app.client.get(format!("{}/v1/callbacks?form=alice", app.base)), 400, "invalid_query"),
        ("calls by user", app.client.get(format!("{}/v1/calls?user=alice", app.base)), 400, "invalid_query"),
        ("a report by pair", app.client.get(format!("{}/v1/reconciliation?pair=a", app.base)), 400, "invalid_query"),
        (
            "GET on the callback endpoint",
            app.client.get(format!("{}/callbacks/easemob", app.base)),
            405,
            "method_not_allowed",
        ),
        ("PUT on /v1/friends", app.client.put(format!("{}/v1/friends", app.base)), 405, "method_not_allowed"),
        ("call id not UTF-8", app.client.get(format!("{}/v1/calls/%FF", app.base)), 400, "invalid_path"),
        ("seq not UTF-8", app.client.get(format!("{}/v1/callbacks/%C3", app.base)), 400, "invalid_path"),
        ("user not UTF-8", app.client.delete(format!("{}/v1/friends/%FF/bob", app.base)), 400, "invalid_path"),
        (
            "friend request without a JSON content type",
            app.client.post(format!("{}/v1/friends", app.base)).body(r#"{"owner":"alice","friend":"bob"}"#),
            415,
            "unsupported_media_type",
        ),
        // serde would take a struct written as an array of its fields, in order.
        (
            "a pair as an array",
            app.client.post(app.url("/v1/friends")).json(&json!(["alice", "bob"])),
            400,
            "invalid_json",
        ),
        (
            "a batch pair as an array",
            app.client.post(app.url("/v1/friends/batch")).json(&json!({"pairs": [["alice", "bob"]]})),
            400,
            "invalid_json",
        ),
        (
            "a batch as an array",
            app.client.post(app.url("/v1/friends/batch")).json(&json!([[{"owner": "alice", "friend": "bob"}]])),
            400,
            "invalid_json",
        ),
        (
            "an idempotency key in the body",
            app.client
                .post(app.url("/v1/friends"))
                .json(&json!({"owner": "alice", "friend": "bob", "idempotency_key": "k1"})),
            400,
            "invalid_json",
        ),
        (
            "a re-send as an array",
            app.client.post(app.url("/v1/easemob/exception-cache/resend")).json(&json!([[], true])),
            400,
            "invalid_json",
        ),
    ];
    for (what, request, status, code) in cases {
        let resp = request.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status().as_u16(), status, "{what}");
        if status == 405 {
            assert!(resp.headers().contains_key("allow"), "{what}: a 405 says which methods the path takes");
        }
        let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = resp.bytes().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let err = assert_json_error(what, content_type.as_deref(), &body);
        assert_eq!(err["code"], code, "{what}: {err}");
    }
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"], json!([]), "no refused request made a call: {calls}");
    let (_, err) = app.post_json("/v1/friends", json!(["alice", "bob"])).await;
    assert!(err["detail"].as_str().unwrap_or("").contains("expected a JSON object"), "says what it wants: {err}");
    // A parameter of the wrong type is named in the answer's own words.
    let (status, err) = app.get_json("/v1/calls?limit=abc").await;
    assert_eq!(status, 400, "{err}");
    assert!(err["detail"].as_str().unwrap_or("").starts_with("`limit`: must be a whole number (digits only)"), "{err}");
    let (status, err) = app.get_json("/v1/calls?limit=99999999999999999999").await;
    assert_eq!(status, 400, "{err}");
    assert!(err["detail"].as_str().unwrap_or("").starts_with("`limit`: is out of range for a whole number"), "{err}");
    // A callback URL set up with a trailing slash: the answer names the path meant.
    let resp = app.client.post(app.url("/callbacks/easemob/")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert!(err["detail"].as_str().unwrap_or("").contains("did you mean `/callbacks/easemob`?"), "{err}");
    let (_, err) = app.get_json("/v1/feed?cursor=20").await;
    assert!(err["detail"].as_str().unwrap_or("").contains("`after`"), "names what the feed takes: {err}");
    // Over the body limit: sent raw, the body from its own task, so that the server answering
    // before it has read everything cannot fail the exchange.
    let oversized = format!(r#"{{"owner":"alice","friend":"{}"}}"#, "b".repeat(3 * 1024 * 1024));
    let head = format!(
        "POST /v1/friends HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        oversized.len()
    );
    let (status, head, body) = raw_exchange(app.addr, head.into_bytes(), oversized.into_bytes()).await;
    assert_eq!(status, 413, "{head}");
    let err = assert_json_error("friend request over the body limit", header_value(&head, "content-type"), &body);
    assert_eq!(err["code"], "payload_too_large", "{err}");

    // A cursor of 0 is the start, as before.
    let (status, page) = app.get_json("/v1/callbacks?from=alice&cursor=0").await;
    assert_eq!(status, 200, "{page}");
    app.stop().await;
}

/// Anyone who can reach the callback endpoint can send bad signatures: one log line each would
/// let them flood the log. The first is logged at once, the rest counted into the next line (at
/// most one every 10 s); each is in /metrics and the rejection log besides.
#[tokio::test]
async fn a_run_of_bad_signatures_is_logged_once_not_once_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("flood.db").display());
    let mut service = ServeProcess::start(&db_url, &[], &[]).await;
    let http = bounded_client();
    for i in 0..50 {
        let r = http
            .post(format!("{}/callbacks/easemob", service.base))
            .header("content-type", "application/json")
            .body(roster_body(&format!("flood-{i}"), "alice", "bob", "add", TS, "not-the-secret"))
            .send()
            .await
            .expect("callback");
        assert_eq!(r.status(), 401);
    }
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(20)).await;

    let log = service.log();
    assert_eq!(status.code(), Some(0), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("callback failed verification")).collect();
    // Two if the run happened to straddle a 10 s boundary on a slow machine; never fifty.
    assert!((1..=2).contains(&lines.len()), "{lines:#?}");
    assert!(lines[0].contains("since_last_line=1"), "{}", lines[0]);
}

/// A callback refused as unreadable is an event Easemob drops after its retry: the log says so,
/// once for a run of them rather than once each.
#[tokio::test]
async fn unreadable_callbacks_are_logged_once_for_a_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("unreadable.db").display());
    let mut service = ServeProcess::start(&db_url, &[], &[]).await;
    let http = bounded_client();
    for i in 0..20 {
        let (content_type, want) = if i % 2 == 0 { ("application/json", 400) } else { ("text/plain", 415) };
        let r = http
            .post(format!("{}/callbacks/easemob", service.base))
            .header("content-type", content_type)
            .body(format!("{{\"callId\": {i}"))
            .send()
            .await
            .expect("callback");
        assert_eq!(r.status(), want);
    }
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(20)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(0), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("callback refused as unreadable")).collect();
    // Two if the run happened to straddle a 10 s boundary on a slow machine; never twenty.
    assert!((1..=2).contains(&lines.len()), "{lines:#?}");
    assert!(lines[0].contains("status=400") && lines[0].contains("code=\"invalid_json\""), "{}", lines[0]);
    assert!(lines[0].contains("since_last_line=1"), "{}", lines[0]);
    // Named `source`, as the lines of refused signatures and sources name the sender.
    assert!(lines[0].contains("source=127.0.0.1:"), "{}", lines[0]);
}

#[tokio::test]
async fn a_compressed_or_bom_prefixed_callback_is_refused_naming_the_cause() {
    let app = TestApp::spawn(&[]).await;
    let post = |body: Vec<u8>, encoding: &'static str| {
        let request = app.client.post(app.url("/callbacks/easemob")).header("content-type", "application/json");
        let request = if encoding.is_empty() { request } else { request.header("content-encoding", encoding) };
        request.body(body).send()
    };
    let body = |msg: &str| roster_body(msg, "alice", "bob", "add", TS, SECRET).into_bytes();

    // The header decides, whatever the bytes: a proxy compressing bodies sends the header too.
    for encoding in ["gzip", "br", "deflate"] {
        let answer = post(body("h-gzip"), encoding).await.unwrap();
        assert_eq!(answer.status(), 415, "{encoding}");
        let err: Value = answer.json().await.unwrap();
        assert_eq!(err["code"], "unsupported_media_type", "{err}");
        let detail = err["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("Content-Encoding `{encoding}`")) && detail.contains("uncompressed"),
            "{detail}"
        );
    }
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(body("h-bom-detail"));
    let answer = post(bom, "").await.unwrap();
    assert_eq!(answer.status(), 400);
    let err: Value = answer.json().await.unwrap();
    assert!(err["detail"].as_str().unwrap().contains("byte-order mark (bytes EF BB BF)"), "{err}");
    let (_, list) = app.get_json("/v1/callbacks").await;
    assert_eq!(list["items"], json!([]), "nothing refused was stored");

    // `identity` is no encoding at all.
    let answer = post(body("h-identity"), "identity").await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());

    // The trigger API names them the same way, and nothing is started.
    let trigger = |body: Vec<u8>, encoding: &'static str| {
        let request = app.client.post(app.url("/v1/friends")).header("content-type", "application/json");
        let request = if encoding.is_empty() { request } else { request.header("content-encoding", encoding) };
        request.body(body).send()
    };
    let pair = br#"{"owner": "alice", "friend": "bob"}"#.to_vec();
    let answer = trigger(pair.clone(), "gzip").await.unwrap();
    assert_eq!(answer.status(), 415);
    let err: Value = answer.json().await.unwrap();
    assert!(err["detail"].as_str().unwrap().contains("Content-Encoding `gzip` is not accepted"), "{err}");
    let answer = trigger([b"\xef\xbb\xbf".as_slice(), &pair].concat(), "").await.unwrap();
    assert_eq!(answer.status(), 400);
    let err: Value = answer.json().await.unwrap();
    assert_eq!(err["code"], "invalid_json", "{err}");
    assert!(err["detail"].as_str().unwrap().contains("byte-order mark (bytes EF BB BF)"), "{err}");
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"], json!([]), "no call was started");
    let _dir = app.stop().await;
}
