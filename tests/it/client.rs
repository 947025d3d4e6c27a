//! The Easemob client against the embedded sandbox, over real HTTP on 127.0.0.1.
//!
//! Each test starts its own sandbox on port 0. Time-dependent behaviour (token expiry) runs on a
//! `ManualClock` shared by the sandbox and the client, so the tests move time instead of
//! sleeping; only the rate-limit test uses the system clock, because the sandbox's per-second
//! window is what it is about. Backoffs are set to milliseconds so retries cost nothing.

use std::time::{Duration, Instant};

use friendhook::clock::{self, ManualClock};
use friendhook::easemob::{ApiFailure, BeforeFirstSend, ClientConfig, EasemobClient, NewUser, Sending};
use friendhook::sandbox::{InjectedFault, SandboxConfig};
use friendhook::secret::Secret;
use tokio::net::TcpListener;

use crate::client_support::*;

// ---------------------------------------------------------------------------------------------
// Endpoints

#[tokio::test]
async fn add_friend_makes_both_users_friends() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;

    let added = h.client.add_friend("alice", "bob").await.expect("added");

    assert_eq!(added.status, 200);
    assert_eq!(added.attempts, 1);
    assert_eq!(added.envelope.action.as_deref(), Some("post"));
    assert_eq!(added.envelope.entities[0].username.as_deref(), Some("bob"), "entities[0] is the friend");
    assert_eq!(h.client.list_friends("alice").await.expect("list"), ["bob"]);
    assert_eq!(h.client.list_friends("bob").await.expect("list"), ["alice"]);
}

#[tokio::test]
async fn delete_friend_ends_the_friendship_both_ways() {
    let h = harness().await;
    register(&h.client, &["alice", "bob", "carol"]).await;
    h.client.add_friend("alice", "bob").await.expect("added");
    h.client.add_friend("alice", "carol").await.expect("added");

    let deleted = h.client.delete_friend("alice", "bob").await.expect("deleted");

    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.envelope.action.as_deref(), Some("delete"));
    assert_eq!(h.client.list_friends("alice").await.expect("list"), ["carol"]);
    assert!(h.client.list_friends("bob").await.expect("list").is_empty());
}

#[tokio::test]
async fn register_user_sends_one_object_and_get_user_reads_it_back() {
    let h = harness().await;
    let alice = NewUser { nickname: Some("Alice A.".to_owned()), ..user("alice") };

    let registered = h.client.register_user(&alice).await.expect("registered");
    assert_eq!(registered.status, 200);
    assert_eq!(registered.envelope.entities[0].username.as_deref(), Some("alice"));

    let fetched = h.client.get_user("alice").await.expect("found");
    let entity = &fetched.envelope.entities[0];
    assert_eq!(entity.username.as_deref(), Some("alice"));
    assert_eq!(entity.nickname.as_deref(), Some("Alice A."));
    assert_eq!(entity.activated, Some(true));
    assert!(entity.uuid.is_some());
}

#[tokio::test]
async fn register_users_sends_a_batch_and_splits_more_than_60_into_chunks() {
    let h = harness().await;
    let small: Vec<NewUser> = (0..3).map(|i| user(&format!("small{i}"))).collect();
    let batch = h.client.register_users(&small).await.expect("registered");
    assert_eq!(batch.envelope.entities.len(), 3);
    assert_eq!(batch.attempts, 1);

    let many: Vec<NewUser> = (0..130).map(|i| user(&format!("many{i}"))).collect();
    let merged = h.client.register_users(&many).await.expect("registered");

    assert_eq!(merged.attempts, 3, "130 users take chunks of 60, 60 and 10");
    assert_eq!(merged.envelope.entities.len(), 130);
    h.client.get_user("many0").await.expect("first chunk");
    h.client.get_user("many129").await.expect("last chunk");
}

#[tokio::test]
async fn upper_case_usernames_are_stored_lower_case() {
    let h = harness().await;
    h.client.register_user(&user("MixedCase")).await.expect("registered");
    let fetched = h.client.get_user("mixedcase").await.expect("found");
    assert_eq!(fetched.envelope.entities[0].username.as_deref(), Some("mixedcase"));
}

// ---------------------------------------------------------------------------------------------
// Final errors

#[tokio::test]
async fn unknown_user_is_rejected_with_404_service_resource_not_found() {
    let h = harness().await;
    register(&h.client, &["alice"]).await;

    for failure in [
        h.client.get_user("nobody").await.expect_err("no such user"),
        h.client.add_friend("alice", "nobody").await.expect_err("no such friend"),
    ] {
        assert!(matches!(failure, ApiFailure::Rejected { .. }), "{failure:?}");
        assert_eq!(failure.upstream_status(), Some(404));
        assert_eq!(failure.upstream_error(), Some("service_resource_not_found"));
        assert_eq!(failure.attempts(), 1, "a 404 is not retried");
        assert!(failure.body().is_some());
    }
}

#[tokio::test]
async fn adding_past_the_friend_limit_is_rejected_with_403_exceed_limit() {
    let h = harness_with(SandboxConfig { friend_limit: 2, ..sandbox_config() }, |_| {}).await;
    register(&h.client, &["alice", "bob", "carol", "dave"]).await;
    h.client.add_friend("alice", "bob").await.expect("first");
    h.client.add_friend("alice", "carol").await.expect("second");

    let failure = h.client.add_friend("alice", "dave").await.expect_err("over the limit");

    let ApiFailure::Rejected { status, error, attempts, .. } = &failure else {
        panic!("expected Rejected, got {failure:?}");
    };
    assert_eq!(*status, 403);
    assert_eq!(*attempts, 1);
    let error = error.as_ref().expect("error body");
    assert_eq!(error.error, "exceed_limit");
    assert!(error.error_description.is_some());
}

#[tokio::test]
async fn wrong_client_secret_fails_with_invalid_grant_and_says_what_to_fix() {
    let h = harness_with(sandbox_config(), |config| {
        config.client_secret = Secret::new("not-the-secret");
    })
    .await;

    let failure = h.client.get_user("alice").await.expect_err("no token");

    let ApiFailure::NoToken { status, token_status, reason, attempts, may_have_acted, .. } = &failure else {
        panic!("expected NoToken, got {failure:?}");
    };
    assert_eq!(*token_status, Some(400));
    assert_eq!(*status, None, "the call itself got no answer");
    assert!(!may_have_acted);
    assert!(reason.contains("invalid_grant"), "{reason}");
    assert_eq!(*attempts, 0, "the API call itself was never sent");
    assert!(reason.starts_with("token: "), "{reason}");
    assert!(reason.ends_with("nothing was sent"), "{reason}");
    assert!(reason.contains("--easemob-client-secret"), "{reason}");
    assert!(!format!("{failure:?} {failure}").contains("not-the-secret"));
    assert_eq!(h.sandbox.stats().tokens_issued, 0);
}

#[tokio::test]
async fn a_failing_token_endpoint_is_not_asked_again_during_the_cooldown() {
    let h = harness_with(sandbox_config(), |config| {
        config.client_secret = Secret::new("not-the-secret");
    })
    .await;
    h.client.get_user("alice").await.expect_err("no token");
    let requests_after_first = h.sandbox.stats().requests;

    for _ in 0..5 {
        let failure = h.client.get_user("alice").await.expect_err("still no token");
        assert!(failure.detail().contains("invalid_grant"), "{failure:?}");
    }
    assert_eq!(h.sandbox.stats().requests, requests_after_first, "failed fast from the cached failure");

    h.clock.advance_ms(5_000);
    h.client.get_user("alice").await.expect_err("asks again, fails again");
    assert_eq!(h.sandbox.stats().requests, requests_after_first + 1);
}

#[tokio::test]
async fn a_token_endpoint_blip_is_retried_within_the_call() {
    let h = harness().await;
    register(&h.client, &["alice"]).await;
    // A second client on the same sandbox starts without a token.
    let client = EasemobClient::new(client_config(&h.sandbox, &sandbox_config()), h.clock.clone()).expect("client");
    let issued_before = h.sandbox.stats().tokens_issued;
    h.sandbox.inject_faults(token_fault(503, 2));

    let fetched = client.get_user("alice").await.expect("the third token request passes");

    assert_eq!(fetched.attempts, 1, "the API call itself went once");
    assert_eq!(h.sandbox.stats().tokens_issued - issued_before, 1);
}

#[tokio::test]
async fn a_token_endpoint_outage_fails_after_the_tries_then_recovers_after_the_cooldown() {
    let h = harness().await;
    h.sandbox.inject_faults(token_fault(503, 5));

    let failure = h.client.get_user("alice").await.expect_err("no token");
    assert!(
        matches!(&failure, ApiFailure::NoToken { token_status: Some(503), reason, .. }
            if reason.starts_with("token: ") && reason.contains("after 5 tries")),
        "{failure:?}"
    );
    assert_eq!(failure.attempts(), 0);
    let requests_after_failure = h.sandbox.stats().requests;

    // The endpoint is healthy again, but the failure is remembered for 5 s.
    let again = h.client.get_user("alice").await.expect_err("cooldown");
    assert!(matches!(again, ApiFailure::NoToken { token_status: Some(503), .. }), "{again:?}");
    assert_eq!(h.sandbox.stats().requests, requests_after_failure, "failed fast from the cached failure");
    assert_eq!(h.sandbox.stats().tokens_issued, 0);

    h.clock.advance_ms(5_000);
    register(&h.client, &["alice"]).await;
    h.client.get_user("alice").await.expect("found");
    assert_eq!(h.sandbox.stats().tokens_issued, 1);
}

#[tokio::test]
async fn an_unreachable_server_fails_as_transport_before_any_api_attempt() {
    // Bind and drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut config =
        ClientConfig::new(format!("http://127.0.0.1:{port}"), "demo-org", "demo-app", "id", Secret::new("s"));
    config.base_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(5);
    let client = EasemobClient::new(config, ManualClock::new(START_MS)).expect("client");

    let failure = client.add_friend("alice", "bob").await.expect_err("nobody there");

    assert!(matches!(failure, ApiFailure::NoToken { token_status: None, may_have_acted: false, .. }), "{failure:?}");
    assert_eq!(failure.upstream_status(), None);
    assert_eq!(failure.upstream_error(), None, "the call itself was not sent");
    assert_eq!(failure.attempts(), 0);
    assert!(failure.to_string().contains("token: could not reach"), "{failure}");
    assert!(failure.to_string().contains("after 5 tries"), "the token request was tried again: {failure}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = ClientConfig::new(format!("http://{address}"), "demo-org", "demo-app", "id", Secret::new("s"));
    config.request_timeout = Duration::from_millis(200);

    let client = EasemobClient::new(config, ManualClock::new(START_MS)).expect("client");
    let failure = client.get_user("alice").await.expect_err("timed out");

    // The token request is the first to meet the silence.
    assert!(failure.is_token_failure(), "{failure:?}");
    assert!(failure.detail().contains("request timed out"), "{failure}");
}

/// Reads one request from a fake Easemob's connection (its head, then its body): its request
/// line, or `None` once the client has closed the connection.
async fn read_request(socket: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let (mut request_line, mut length) = (String::new(), 0);
    loop {
        let mut line = String::new();
        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
        if request_line.is_empty() {
            request_line = line.trim_end().to_owned();
        }
    }
    socket.read_exact(&mut vec![0; length]).await.expect("request body");
    Some(request_line)
}

/// A fake Easemob's answer to a token request: a token for an hour.
async fn answer_token(socket: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let token = r#"{"access_token":"t","expires_in":3600}"#;
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{token}", token.len());
    socket.write_all(answer.as_bytes()).await.expect("write");
}

/// A call whose first attempt timed out and whose retry found nobody listening is labelled by
/// its last attempt (`transport`), not by the earlier timeout its detail also tells of.
#[tokio::test]
async fn a_failure_is_labelled_by_its_last_attempt_not_an_earlier_timeout() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    // Answers the token request; holds the add without answering and stops listening, so that
    // the retry's connection is refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let (add_seen, mut stop_listening) = tokio::sync::mpsc::channel::<()>(1);
    let _server = tokio::spawn(async move {
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => match accepted { Ok((socket, _)) => socket, Err(_) => return },
                _ = stop_listening.recv() => return,
            };
            let add_seen = add_seen.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                while let Some(request_line) = read_request(&mut socket).await {
                    if !request_line.contains("/token") {
                        let _ = add_seen.send(()).await;
                        // Held open, unanswered, until the client gives up on it.
                        let _ = socket.read_line(&mut String::new()).await;
                        return;
                    }
                    answer_token(socket.get_mut()).await;
                }
            });
        }
    });
    let mut config = ClientConfig::new(format!("http://{address}"), "demo-org", "demo-app", "id", Secret::new("s"));
    // The listener is gone within a moment of the add arriving, long before this passes.
    config.request_timeout = Duration::from_secs(1);
    config.max_attempts = 2;
    config.base_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(5);
    let client = EasemobClient::new(config, ManualClock::new(START_MS)).expect("client");

    let failure = client.add_friend("alice", "bob").await.expect_err("no answer");

    assert_eq!((failure.upstream_status(), failure.upstream_error()), (None, Some("transport")), "{failure:?}");
    let detail = failure.detail();
    assert!(detail.contains("last: could not connect"), "{detail}");
    assert!(detail.contains("an attempt (request timed out"), "the timeout may have acted: {detail}");
    assert!(detail.contains("may have been carried out: check the result in Easemob"), "{detail}");
}

/// A server that answers the token request whole and every other request with `answer` (closing
/// the connection after it if `then_close`), and the client of an app on it; the request lines
/// it was sent are in the list.
async fn client_of_a_server_answering(
    answer: &'static str,
    then_close: bool,
) -> (EasemobClient, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncWriteExt, BufReader};

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                while let Some(request_line) = read_request(&mut socket).await {
                    seen.lock().unwrap().push(request_line.clone());
                    if request_line.contains("/token") {
                        answer_token(socket.get_mut()).await;
                        continue;
                    }
                    socket.get_mut().write_all(answer.as_bytes()).await.expect("write");
                    if then_close {
                        return;
                    }
                }
            });
        }
    });
    let mut config = ClientConfig::new(format!("http://{address}"), "demo-org", "demo-app", "id", Secret::new("s"));
    config.base_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(5);
    (EasemobClient::new(config, ManualClock::new(START_MS)).expect("client"), requests)
}

/// An add answered 200 whose body is cut off was done: it is not sent again (a second add could
/// be refused 403 exceed_limit and the success recorded as a failure). A read cut off the same
/// way is asked again.
#[tokio::test]
async fn an_add_answered_200_with_a_body_cut_short_is_done_and_not_sent_again() {
    // The body stops 80 bytes short of its Content-Length, then the connection closes.
    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"action\":\"post\"";
    let (client, requests) = client_of_a_server_answering(answer, true).await;
    let sent = |what: &str| requests.lock().unwrap().iter().filter(|r| r.contains(what)).count();

    let added = client.add_friend("alice", "bob").await.expect("a 200 status is a success");
    assert_eq!((added.status, added.attempts), (200, 1));
    assert_eq!(sent("POST /demo-org/demo-app/users/alice/contacts/users/bob"), 1, "sent once");

    let failure = client.get_user("alice").await.expect_err("a read needs its whole body");
    assert!(failure.to_string().contains("cut short"), "{failure}");
    assert!(failure.attempts() > 1, "asked again: {failure}");
    assert_eq!(sent("GET /demo-org/demo-app/users/alice "), failure.attempts() as usize);
}

/// A success status whose body is not Easemob's JSON (a proxy's page, nothing at all) is not a
/// success: the call fails, saying what answered and what to check, and is not sent again.
#[tokio::test]
async fn an_add_answered_200_with_a_page_or_nothing_is_not_taken_for_a_success() {
    for (answer, shown) in [
        (
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 15\r\n\r\n<html>ok</html>",
            "`<html>ok</html>`",
        ),
        ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", "no body"),
    ] {
        let (client, requests) = client_of_a_server_answering(answer, false).await;

        let failure = client.add_friend("alice", "bob").await.expect_err("not Easemob's answer");
        assert_eq!((failure.upstream_status(), failure.attempts()), (Some(200), 1), "{failure:?}");
        assert!(failure.may_have_acted(), "{failure:?}");
        let detail = failure.detail();
        assert!(detail.contains(&format!("answered HTTP 200 with {shown}, not Easemob's JSON")), "{detail}");
        assert!(detail.contains("check --easemob-base-url"), "{detail}");
        let adds = requests.lock().unwrap().iter().filter(|r| r.contains("/contacts/users/bob")).count();
        assert_eq!(adds, 1, "not sent again");
    }
}

/// What the caller runs before a call's first request (the service marks the call sent there)
/// runs once, before anything is sent, however many attempts follow; one that fails ends the
/// call as not sent, with nothing sent.
#[tokio::test]
async fn the_note_before_the_first_send_runs_once_and_a_failed_one_sends_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let noting = |note| Sending { before_first_send: Some(note), ..Sending::default() };
    let answer = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let (client, requests) = client_of_a_server_answering(answer, false).await;
    let sent = |what: &str| requests.lock().unwrap().iter().filter(|r| r.contains(what)).count();
    let notes = Arc::new(AtomicUsize::new(0));
    let (counted, seen) = (notes.clone(), requests.clone());
    let note: BeforeFirstSend = Box::pin(async move {
        let sent_before = seen.lock().unwrap().iter().filter(|r| r.contains("/contacts/")).count();
        counted.fetch_add(1, Ordering::SeqCst);
        if sent_before == 0 { Ok(()) } else { Err(format!("{sent_before} request(s) left before the note")) }
    });

    let failure = client.change_friendship_with(false, "alice", "bob", noting(note)).await.expect_err("503 each time");
    assert!(failure.attempts() > 1, "retried: {failure:?}");
    assert_eq!(notes.load(Ordering::SeqCst), 1, "once, whatever the retries");
    assert_eq!(sent("POST /demo-org/demo-app/users/alice/contacts/users/bob"), failure.attempts() as usize);

    let refused: BeforeFirstSend = Box::pin(async { Err("not sent: the database said no".to_string()) });
    let failure = client.change_friendship_with(true, "alice", "bob", noting(refused)).await.expect_err("not sent");
    assert!(
        matches!(&failure, ApiFailure::NotSent { reason } if reason == "not sent: the database said no"),
        "{failure:?}"
    );
    assert_eq!((failure.attempts(), failure.may_have_acted()), (0, false));
    assert_eq!(sent("DELETE "), 0, "nothing sent");
}

// ---------------------------------------------------------------------------------------------
// Token lifecycle

#[tokio::test]
async fn token_is_reused_then_refreshed_at_half_life() {
    let h = harness_with(SandboxConfig { token_ttl_secs: 100, ..sandbox_config() }, |_| {}).await;
    register(&h.client, &["alice"]).await;
    assert_eq!(h.sandbox.stats().tokens_issued, 1);

    h.clock.advance_ms(49_000);
    h.client.get_user("alice").await.expect("found");
    assert_eq!(h.sandbox.stats().tokens_issued, 1, "still in its first half");

    h.clock.advance_ms(2_000);
    let fetched = h.client.get_user("alice").await.expect("found");
    assert_eq!(h.sandbox.stats().tokens_issued, 2, "refreshed proactively at half-life");
    assert_eq!(fetched.attempts, 1, "no 401 was needed");
}

#[tokio::test]
async fn a_failed_refresh_keeps_using_the_still_valid_token() {
    let h = harness_with(SandboxConfig { token_ttl_secs: 100, ..sandbox_config() }, |_| {}).await;
    register(&h.client, &["alice"]).await;
    h.sandbox.inject_faults(token_fault(500, 5));

    h.clock.advance_ms(60_000);
    let fetched = h.client.get_user("alice").await.expect("old token still works");

    assert_eq!(fetched.attempts, 1);
    assert_eq!(h.sandbox.stats().tokens_issued, 1, "the refresh failed all five tries");
}

#[tokio::test]
async fn expired_token_is_replaced_before_the_call() {
    let h = harness_with(SandboxConfig { token_ttl_secs: 100, ..sandbox_config() }, |_| {}).await;
    register(&h.client, &["alice"]).await;

    h.clock.advance_ms(101_000);
    let fetched = h.client.get_user("alice").await.expect("found");

    assert_eq!(fetched.attempts, 1);
    assert_eq!(h.sandbox.stats().tokens_issued, 2);
}

#[tokio::test]
async fn a_401_renews_the_token_and_retries_once() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(401, 1));

    let added = h.client.add_friend("alice", "bob").await.expect("added");

    assert_eq!(added.attempts, 2);
    assert_eq!(h.sandbox.stats().tokens_issued, 2, "a second token was fetched");
    assert_eq!(h.client.list_friends("alice").await.expect("list"), ["bob"]);
}

#[tokio::test]
async fn a_second_401_is_final() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(401, 2));

    let failure = h.client.add_friend("alice", "bob").await.expect_err("401 twice");

    assert!(matches!(failure, ApiFailure::Rejected { status: 401, .. }), "{failure:?}");
    assert_eq!(failure.attempts(), 2);
    assert_eq!(failure.upstream_error(), Some("unauthorized"));
    assert_eq!(h.sandbox.stats().tokens_issued, 2);
}

/// A call takes its token after its turn in the pacer: a token that expires while calls wait
/// there is renewed once, not sent by every waiting call and refused 401 (which would cost each
/// an attempt and the App Key's shared budget a request).
#[tokio::test]
async fn calls_waiting_in_the_pacer_take_the_token_after_their_turn() {
    let h =
        harness_with(SandboxConfig { token_ttl_secs: 100, ..sandbox_config() }, |c| c.rate_limit_per_sec = 10).await;
    let friends: Vec<String> = (0..4).map(|i| format!("friend_{i}")).collect();
    let mut names = vec!["alice"];
    names.extend(friends.iter().map(String::as_str));
    register(&h.client, &names).await;
    let before = h.sandbox.stats().requests;

    let calls: Vec<_> = friends
        .iter()
        .map(|f| {
            let (client, friend) = (h.client.clone(), f.clone());
            tokio::spawn(async move { client.add_friend("alice", &friend).await })
        })
        .collect();
    // Once the first call has been answered the others wait their turns, ~100 ms apart: the
    // token they would have taken before waiting expires now.
    while h.sandbox.stats().requests == before {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.clock.advance_ms(101_000);

    let mut attempts = Vec::new();
    for call in calls {
        attempts.push(call.await.expect("task").expect("added").attempts);
    }
    // Each call reads the token right before it is sent, so at most the one call that had just
    // read it when time moved can be refused.
    assert!(attempts.iter().filter(|a| **a > 1).count() <= 1, "attempts per call: {attempts:?}");
    assert_eq!(h.sandbox.stats().tokens_issued, 2, "the expired token was renewed once");
}

/// A call that can no longer get a token after an attempt that may have acted (a 5xx) says that
/// attempt may have acted, like any other give-up after one.
#[tokio::test]
async fn a_call_that_loses_its_token_after_a_5xx_says_the_5xx_may_have_acted() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(503, 1));
    h.sandbox.inject_faults(contacts_fault(401, 1));
    h.sandbox.inject_faults(token_refused_once());

    let failure = h.client.add_friend("alice", "bob").await.expect_err("no token after the 401");

    assert!(failure.is_token_failure(), "{failure:?}");
    assert!(failure.may_have_acted(), "{failure:?}");
    assert_eq!(failure.attempts(), 2);
    assert!(failure.detail().contains("an earlier attempt (HTTP 503"), "{}", failure.detail());
    assert!(failure.detail().contains("may have been carried out"), "{}", failure.detail());
}

/// The console's client secret changed under a running service: Easemob refuses the call's token
/// with 401 and no new one can be had. Easemob's last word on the call was that refusal, so it
/// was not carried out, and the failure keeps that answer, not only the token endpoint's.
#[tokio::test]
async fn a_401_with_no_token_to_be_had_after_it_is_a_refusal_that_keeps_the_401() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(401, 1));
    h.sandbox.inject_faults(token_refused_once());

    let failure = h.client.add_friend("alice", "bob").await.expect_err("no token after the 401");

    let ApiFailure::NoToken { status, token_status, may_have_acted, attempts, .. } = &failure else {
        panic!("expected NoToken, got {failure:?}");
    };
    assert_eq!((*status, *token_status, *may_have_acted, *attempts), (Some(401), Some(400), false, 1));
    assert!(!failure.may_have_acted());
    assert_eq!(failure.upstream_error(), Some("unauthorized"));
    let detail = failure.detail();
    assert!(detail.contains("--easemob-client-secret"), "says what to fix: {detail}");
    assert!(detail.contains("not carried out"), "{detail}");
    assert_eq!(h.sandbox.stats().tokens_issued, 1, "the renewal was refused");
}

/// A 429 from the token endpoint (it counts requests per second, like the API) is asked again a
/// second later at the earliest, not after the millisecond backoff of these tests.
#[tokio::test]
async fn a_token_request_refused_429_is_asked_again_no_sooner_than_a_second_later() {
    let h = harness().await;
    h.sandbox.inject_faults(token_fault(429, 1));

    let started = std::time::Instant::now();
    h.client.ensure_token().await.expect("the second token request passes");

    assert!(started.elapsed() >= Duration::from_secs(1), "asked again after {:?}", started.elapsed());
    assert_eq!(h.sandbox.stats().tokens_issued, 1);
}

#[tokio::test]
async fn fifty_concurrent_calls_on_a_fresh_client_fetch_one_token() {
    let h = harness().await;
    // Register through a second client so the one under test starts without a token.
    let setup = EasemobClient::new(client_config(&h.sandbox, &sandbox_config()), h.clock.clone()).expect("client");
    register(&setup, &["alice"]).await;
    let issued_before = h.sandbox.stats().tokens_issued;

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { client.get_user("alice").await })
        })
        .collect();
    for call in calls {
        call.await.expect("task").expect("found");
    }

    assert_eq!(h.sandbox.stats().tokens_issued - issued_before, 1);
}

// ---------------------------------------------------------------------------------------------
// Retries

#[tokio::test]
async fn two_429s_are_retried_after_backoff_then_succeed() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(429, 2));

    let started = Instant::now();
    let added = h.client.add_friend("alice", "bob").await.expect("added");

    assert_eq!(added.attempts, 3);
    assert_eq!(h.sandbox.stats().tokens_issued, 1, "a 429 does not touch the token");
    // Each 429 holds the client's calls back for a second (the backoff here is milliseconds):
    // the App Key's budget is shared, so the calls behind this one would only draw more 429s.
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_plan_limit_429_is_final_and_not_retried() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(InjectedFault { error: Some("resource_limited".to_owned()), ..contacts_fault(429, 5) });

    let failure = h.client.add_friend("alice", "bob").await.expect_err("plan limit");

    assert!(matches!(failure, ApiFailure::Rejected { status: 429, attempts: 1, .. }), "{failure:?}");
    assert_eq!(failure.upstream_error(), Some("resource_limited"));
}

/// A final refusal after an attempt whose fate is unknown does not prove the operation was not
/// done: that attempt may have done it (a retried add refused with 403 because the first one
/// added), so the call is `Failed`, not `Rejected`.
#[tokio::test]
async fn a_refusal_after_an_attempt_that_may_have_acted_is_not_final() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(503, 1));
    h.sandbox.inject_faults(contacts_fault(403, 1));

    let failure = h.client.add_friend("alice", "bob").await.expect_err("refused");

    let ApiFailure::Failed { status, attempts, reason, .. } = &failure else {
        panic!("expected Failed, got {failure:?}");
    };
    assert_eq!((*status, *attempts), (Some(403), 2));
    assert_eq!(failure.upstream_error(), Some("exceed_limit"));
    assert!(reason.contains("HTTP 503") && reason.contains("may have been carried out"), "{reason}");

    // Without the uncertain attempt before it, the same refusal is final.
    h.sandbox.inject_faults(contacts_fault(403, 1));
    let failure = h.client.add_friend("alice", "bob").await.expect_err("refused");
    assert!(matches!(failure, ApiFailure::Rejected { status: 403, attempts: 1, .. }), "{failure:?}");
}

/// A GET changes nothing, so a 404 after a 5xx still means what it says.
#[tokio::test]
async fn a_read_refused_after_a_5xx_is_still_final() {
    let h = harness().await;
    h.sandbox.inject_faults(InjectedFault {
        status: 503,
        count: 1,
        path_contains: Some("/users/ghost".to_owned()),
        error: None,
    });

    let failure = h.client.get_user("ghost").await.expect_err("no such user");

    assert!(matches!(failure, ApiFailure::Rejected { status: 404, attempts: 2, .. }), "{failure:?}");
}

/// A 500 that says the request is wrong (a wrong method or URL) is final: sent again, it would
/// only be refused again, and the give-up would claim the attempts may have acted.
#[tokio::test]
async fn a_500_naming_a_wrong_request_is_final_and_not_retried() {
    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(InjectedFault {
        status: 500,
        count: 1,
        path_contains: Some("/contacts/".to_owned()),
        error: Some("unsupported_service_operation".to_owned()),
    });

    let failure = h.client.add_friend("alice", "bob").await.expect_err("refused");

    assert!(matches!(failure, ApiFailure::Rejected { status: 500, .. }), "{failure:?}");
    assert_eq!(failure.attempts(), 1);
    assert_eq!(failure.upstream_error(), Some("unsupported_service_operation"));
}

#[tokio::test]
async fn persistent_5xx_fails_after_max_attempts() {
    let h = harness_with(sandbox_config(), |config| config.max_attempts = 4).await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(503, 100));

    let failure = h.client.add_friend("alice", "bob").await.expect_err("exhausted");

    let ApiFailure::Failed { status, attempts, reason, .. } = &failure else {
        panic!("expected Failed, got {failure:?}");
    };
    assert_eq!(*status, Some(503));
    assert_eq!(*attempts, 4);
    assert!(reason.contains("max_attempts"), "{reason}");
}

#[tokio::test]
async fn retries_stop_when_max_retry_time_is_used_up() {
    let h = harness_with(sandbox_config(), |config| {
        config.max_attempts = 100;
        config.base_backoff = Duration::from_millis(40);
        config.max_backoff = Duration::from_millis(40);
        // A budget for about 25 retries 40 ms apart, and ample for a second attempt on a loaded
        // machine.
        config.max_retry_time = Duration::from_secs(1);
    })
    .await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(500, 100));

    let started = Instant::now();
    let failure = h.client.add_friend("alice", "bob").await.expect_err("out of time");

    assert!(matches!(failure, ApiFailure::Failed { status: Some(500), .. }), "{failure:?}");
    assert!(failure.attempts() > 1 && failure.attempts() < 100, "{failure}");
    assert!(failure.to_string().contains("max_retry_time"), "{failure}");
    // The budget, plus the last attempt's answer (the sandbox answers at once).
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Rate limit

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_adds_draw_no_429() {
    // The system clock: the sandbox's one-second windows must pass in real time.
    let clock = clock::system();
    let config = SandboxConfig { rate_limit: 100, friend_limit: 2_000, ..sandbox_config() };
    let sandbox = start_sandbox(config.clone(), clock.clone()).await;
    let mut client_config = client_config(&sandbox, &config);
    client_config.rate_limit_per_sec = 100;
    client_config.max_retry_time = Duration::from_secs(60);
    let client = EasemobClient::new(client_config, clock).expect("client");

    let friends: Vec<String> = (0..1_000).map(|i| format!("friend{i}")).collect();
    let mut users: Vec<NewUser> = friends.iter().map(|name| user(name)).collect();
    users.push(user("hub"));
    client.register_users(&users).await.expect("registered");

    let started = Instant::now();
    let calls: Vec<_> = friends
        .into_iter()
        .map(|friend| {
            let client = client.clone();
            tokio::spawn(async move { client.add_friend("hub", &friend).await })
        })
        .collect();
    let mut retried = 0;
    for call in calls {
        let added = call.await.expect("task").expect("added");
        retried += usize::from(added.attempts > 1);
    }
    let elapsed = started.elapsed();

    let stats = sandbox.stats();
    assert_eq!(stats.rate_limited, 0, "the pacer kept every window under 100");
    assert_eq!(retried, 0);
    assert_eq!(client.list_friends("hub").await.expect("list").len(), 1_000);
    // 1,000 calls at (just under) 100/s cannot finish much faster than 10 s.
    assert!(elapsed >= Duration::from_secs(9), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Logging
