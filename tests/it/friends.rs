//! The trigger API against the built-in sandbox, and the callbacks that come back.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn adding_a_friend_records_the_call_and_its_callback_arrives_verified_and_stored() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;

    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(status, 201, "{call}");
    assert_eq!(call["outcome"], "succeeded");
    assert_eq!(call["owner"], "alice");
    assert_eq!(call["friend"], "bob");
    assert_eq!(call["upstream_status"], 200);
    assert_eq!(call["attempts"], 1);
    assert!(call["upstream_error"].is_null());
    assert_eq!(call["response"]["entities"][0]["username"], "bob");
    assert!(call["completed_at"].as_i64().unwrap() >= call["requested_at"].as_i64().unwrap());

    app.settle().await;
    let (_, list) = app.get_json("/v1/callbacks?operation=add").await;
    let cb = &list["items"][0];
    assert_eq!(cb["from_user"], "alice");
    assert_eq!(cb["to_user"], "bob");
    assert_eq!(cb["chat_type"], "roster");
    assert_eq!(app.sandbox().stats().callbacks_sent, 1);

    let (status, same) = app.get_json(&format!("/v1/calls/{}", call["id"])).await;
    assert_eq!(status, 200);
    assert_eq!(same["outcome"], "succeeded");
    app.stop().await;
}

#[tokio::test]
async fn easemob_errors_are_recorded_as_rejected_calls() {
    let app = TestApp::spawn(&["--sandbox-friend-limit", "1"]).await;
    app.register(&["alice", "bob", "carol"]).await;

    let (status, unknown) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "nobody"})).await;
    assert_eq!(status, 201);
    assert_eq!(unknown["outcome"], "rejected");
    assert_eq!(unknown["upstream_status"], 404);
    assert_eq!(unknown["upstream_error"], "service_resource_not_found");
    assert_eq!(unknown["response"]["error"], "service_resource_not_found");
    let detail = unknown["outcome_detail"].as_str().expect("a refusal says why");
    assert!(detail.contains("HTTP 404") && detail.contains("service_resource_not_found"), "{detail}");

    let (_, first) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(first["outcome"], "succeeded");
    assert!(first["outcome_detail"].is_null(), "{first}");
    let (_, limited) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "carol"})).await;
    assert_eq!(limited["outcome"], "rejected");
    assert_eq!(limited["upstream_status"], 403);
    assert_eq!(limited["upstream_error"], "exceed_limit");

    let (_, rejected) = app.get_json("/v1/calls?outcome=rejected").await;
    assert_eq!(rejected["items"].as_array().unwrap().len(), 2);
    let (_, alices) = app.get_json("/v1/calls?owner=alice&friend=bob").await;
    assert_eq!(alices["items"].as_array().unwrap().len(), 1);

    // By operation: three adds so far, then a remove.
    let r = app.client.delete(app.url("/v1/friends/alice/bob")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let ops = |page: &serde_json::Value| -> Vec<String> {
        page["items"].as_array().unwrap().iter().map(|c| c["op"].as_str().unwrap().to_string()).collect()
    };
    let (_, adds) = app.get_json("/v1/calls?op=add").await;
    assert_eq!(ops(&adds), ["add", "add", "add"], "{adds}");
    let (_, removes) = app.get_json("/v1/calls?op=remove&owner=alice").await;
    assert_eq!(ops(&removes), ["remove"], "{removes}");
    // A value that cannot match, or none at all, is refused rather than answered with nothing.
    for (query, said) in [
        ("/v1/calls?op=delete", "`op` must be add or remove, got `delete`"),
        ("/v1/calls?owner=", "`owner` is empty"),
        ("/v1/callbacks?from=", "`from` is empty"),
        ("/v1/callbacks?operation=", "`operation` is empty"),
        ("/v1/reconciliation?friend=", "`friend` is empty"),
    ] {
        let (status, error) = app.get_json(query).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_query")), "{query}: {error}");
        assert!(error["detail"].as_str().unwrap().contains(said), "{query}: {error}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_refusal_after_a_5xx_is_failed_and_its_record_says_the_first_attempt_may_have_acted() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice"]).await;
    app.sandbox().inject_faults(crate::client_support::contacts_fault(503, 1));

    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "nobody"})).await;

    assert_eq!(status, 201, "{call}");
    assert_eq!((call["outcome"].as_str(), call["upstream_status"].as_i64()), (Some("failed"), Some(404)));
    let detail = call["outcome_detail"].as_str().expect("a failure says why");
    assert!(detail.contains("may") && detail.contains("check the result in Easemob"), "{detail}");
    // Kept with the record, not only in the answer.
    let (_, again) = app.get_json(&format!("/v1/calls/{}", call["id"])).await;
    assert_eq!(again["outcome_detail"], call["outcome_detail"]);
    app.stop().await;
}

/// The client secret changed in the console while the service ran: the call's token is refused
/// with 401 and the renewal with 400 invalid_grant. The call was not carried out; its record says
/// so, keeps Easemob's 401 and says what to fix.
#[tokio::test]
async fn a_call_refused_401_with_no_new_token_to_be_had_is_recorded_rejected_with_the_401() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob", "carol"]).await;
    // The service's client holds a token (the add of a missing token is refused before it is
    // recorded: 503, nothing sent).
    let (_, first) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "carol"})).await;
    assert_eq!(first["outcome"], "succeeded", "{first}");
    app.sandbox().inject_faults(crate::client_support::contacts_fault(401, 1));
    app.sandbox().inject_faults(crate::client_support::token_refused_once());

    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;

    assert_eq!(status, 201, "{call}");
    assert_eq!(call["outcome"], "rejected", "{call}");
    assert_eq!((call["upstream_status"].as_i64(), call["upstream_error"].as_str()), (Some(401), Some("unauthorized")));
    assert_eq!(call["attempts"], 1);
    let detail = call["outcome_detail"].as_str().expect("says why");
    assert!(detail.contains("invalid_grant") && detail.contains("--easemob-client-secret"), "{detail}");
    assert!(detail.contains("not carried out"), "{detail}");
    app.stop().await;
}

/// A stop during a batch sends none of the calls still waiting for their turn: their callbacks
/// would come to a receiver that no longer listens (and, failing, ban the callback rule). Each is
/// recorded as not sent, which is safe to send again, and the batch is answered.
#[tokio::test]
async fn a_stop_during_a_batch_sends_none_of_the_calls_still_waiting_and_records_them_not_sent() {
    let mut app = TestApp::spawn(&["--easemob-rate-limit", "1"]).await;
    let friends: Vec<String> = (0..20).map(|i| format!("friend{i}")).collect();
    let mut names = vec!["alice"];
    names.extend(friends.iter().map(String::as_str));
    app.register(&names).await;
    let pairs: Vec<Value> = friends.iter().map(|f| json!({"owner": "alice", "friend": f})).collect();
    let request = app.client.post(app.url("/v1/friends/batch")).json(&json!({ "pairs": pairs }));
    let batch = tokio::spawn(async move { request.send().await });
    // One call a second: once the first has been answered, the other nineteen wait their turns.
    while app.metrics().await.get("friendhook_calls_total{op=\"add\",outcome=\"succeeded\"}").copied() != Some(1.0) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let sent_before_stop = app.sandbox().stats().requests;

    app.begin_stop();

    let answer: Value = batch.await.expect("task").expect("the batch is answered").json().await.expect("JSON");
    let results = answer["results"].as_array().expect("results");
    let not_sent: Vec<&Value> = results
        .iter()
        .filter(|r| r["outcome"] == "failed" && r["attempts"] == 0)
        .filter(|r| r["outcome_detail"].as_str().is_some_and(|d| d.contains("safe to send again")))
        .collect();
    let succeeded = results.iter().filter(|r| r["outcome"] == "succeeded").count();
    assert_eq!(not_sent.len() + succeeded, 20, "each pair either went through or was not sent: {answer}");
    assert!(not_sent.len() >= 15, "the waiting calls were not sent: {answer}");
    // What `serve` logs at the end of the stop.
    assert_eq!(app.easemob.as_ref().expect("client").not_sent_at_stop(), not_sent.len() as u64);
    assert!(app.sandbox().stats().requests - sent_before_stop <= 5, "nothing more went to Easemob");
    app.stop().await;
}

/// Refused 429s never acted: the detail says the call is safe to send again.
#[tokio::test]
async fn a_call_given_up_after_429_answers_says_it_is_safe_to_send_again() {
    let app = TestApp::spawn(&["--easemob-max-attempts", "2"]).await;
    app.register(&["alice", "bob"]).await;
    app.sandbox().inject_faults(crate::client_support::contacts_fault(429, 2));

    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;

    assert_eq!((status, call["outcome"].as_str()), (201, Some("failed")), "{call}");
    let detail = call["outcome_detail"].as_str().expect("a failure says why");
    assert!(detail.contains("gave up after 2 attempt(s)"), "{detail}");
    assert!(detail.contains("no attempt can have been carried out: safe to send again"), "{detail}");
    app.stop().await;
}

#[tokio::test]
async fn a_call_given_up_after_5xx_answers_says_easemob_may_have_acted() {
    let app = TestApp::spawn(&["--easemob-max-attempts", "2"]).await;
    app.register(&["alice", "bob"]).await;
    app.sandbox().inject_faults(crate::client_support::contacts_fault(503, 2));

    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;

    assert_eq!((status, call["outcome"].as_str()), (201, Some("failed")), "{call}");
    let detail = call["outcome_detail"].as_str().expect("a failure says why");
    assert!(detail.contains("gave up after 2 attempt(s)"), "{detail}");
    assert!(detail.contains("may have been carried out: check the result in Easemob"), "{detail}");
    app.stop().await;
}

#[tokio::test]
async fn invalid_input_gets_400_and_nothing_is_sent() {
    let app = TestApp::spawn(&[]).await;
    let before = app.sandbox().stats().requests;
    for body in [
        json!({"owner": "alice"}),
        json!({"owner": "", "friend": "bob"}),
        json!({"owner": "alice", "friend": "ALICE"}),
        json!({"owner": "al ice", "friend": "bob"}),
        json!({"owner": "a".repeat(65), "friend": "bob"}),
    ] {
        let (status, err) = app.post_json("/v1/friends", body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert!(err["code"].is_string() && err["detail"].is_string());
    }
    let r = app
        .client
        .post(app.url("/v1/friends"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(app.sandbox().stats().requests, before, "nothing reached Easemob");
    let (_, calls) = app.get_json("/v1/calls").await;
    assert!(calls["items"].as_array().unwrap().is_empty(), "and nothing was recorded");
    app.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_call_and_calls_easemob_once() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;
    let send = || {
        app.client
            .post(app.url("/v1/friends"))
            .header("idempotency-key", "order-42")
            .json(&json!({"owner": "alice", "friend": "bob"}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let adds_after_first = app.sandbox().stats().requests;
    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(app.sandbox().stats().requests, adds_after_first, "Easemob was not called again");

    let other = app
        .client
        .post(app.url("/v1/friends"))
        .header("idempotency-key", "order-42")
        .json(&json!({"owner": "alice", "friend": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 422);

    // A key with spaces or tabs inside, or two keys: refused before anything is recorded.
    for keys in [vec!["a b\tc"], vec!["order-43", "order-44"]] {
        let mut request = app.client.post(app.url("/v1/friends")).json(&json!({"owner": "alice", "friend": "carol"}));
        for key in &keys {
            request = request.header("idempotency-key", *key);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 400, "{keys:?}");
        let err: Value = refused.json().await.unwrap();
        assert_eq!(err["code"], "invalid_idempotency_key", "{keys:?}: {err}");
    }
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(1), "{calls}");
    app.stop().await;
}

#[tokio::test]
async fn a_batch_runs_every_pair_and_answers_in_request_order() {
    let app = TestApp::spawn(&[]).await;
    let names: Vec<String> = (0..200).map(|i| format!("user_{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    app.register(&refs).await;
    let mut pairs: Vec<Value> = (0..100).map(|i| json!({"owner": names[2 * i], "friend": names[2 * i + 1]})).collect();
    pairs.push(json!({"owner": "user_0", "friend": "ghost"}));
    let (status, body) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 101);
    for (i, r) in results.iter().take(100).enumerate() {
        assert_eq!(r["owner"], names[2 * i]);
        assert_eq!(r["outcome"], "succeeded");
    }
    assert_eq!(results[100]["outcome"], "rejected");
    let ids: Vec<i64> = results.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "calls are numbered in request order: {ids:?}");
    assert_eq!(app.sandbox().stats().rate_limited, 0);

    let (status, _) = app.post_json("/v1/friends/batch", json!({"pairs": [{"owner": "a", "friend": "a"}]})).await;
    assert_eq!(status, 400);

    // Every bad pair is named in one answer (the first 20, then a count), and nothing is sent.
    let calls_before = app.sandbox().stats();
    let mut pairs = vec![
        json!({"owner": "user_0", "friend": "user_1"}),
        json!({"owner": "a", "friend": "a"}),
        json!({"owner": "user_2"}),
        json!({"owner": "bad name", "friend": "user_3"}),
    ];
    pairs.extend((0..25).map(|_| json!({"friend": "user_4"})));
    let (status, err) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_request")), "{err}");
    let detail = err["detail"].as_str().unwrap();
    assert!(detail.starts_with("28 of 29 pairs are invalid, so none was sent: pairs[1]: "), "{detail}");
    assert!(detail.contains("pairs[2]: `friend` is required"), "{detail}");
    assert!(detail.contains("pairs[3]: `owner`"), "{detail}");
    assert!(detail.contains("pairs[20]: `owner` is required") && !detail.contains("pairs[21]"), "{detail}");
    assert!(detail.ends_with("; and 8 more"), "{detail}");
    let one_bad = json!({"pairs": [{"owner": "user_0", "friend": "user_1"}, {"owner": "a", "friend": "a"}]});
    let (status, err) = app.post_json("/v1/friends/batch", one_bad).await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["detail"].as_str().unwrap().starts_with("1 of 2 pairs is invalid, so none was sent: pairs[1]: "),
        "{err}"
    );
    // A body that does not parse is refused whole too, its detail naming where.
    for (pairs, place) in [
        (json!([{"owner": "user_0", "friend": "user_1"}, 5]), "pairs[1]: expected a JSON object with named fields"),
        (json!([{"owner": "user_0", "friend": 7}]), "pairs[0]: friend: invalid type: integer `7`, expected a string"),
    ] {
        let (status, err) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_json")), "{err}");
        assert!(err["detail"].as_str().unwrap().contains(place), "{place}: {err}");
    }
    assert_eq!(app.sandbox().stats().requests, calls_before.requests, "nothing went to the sandbox");
    app.stop().await;
}

/// A key given twice is refused, not read as its last value: `{"owner":"alice","owner":"bob"}`
/// would otherwise add bob's friend.
#[tokio::test]
async fn a_body_that_names_a_field_twice_is_refused_and_nothing_is_sent() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob", "carol"]).await;
    let before = app.sandbox().stats().requests;
    for (path, body, place) in [
        ("/v1/friends", r#"{"owner":"alice","owner":"bob","friend":"carol"}"#, "duplicate field `owner`"),
        (
            "/v1/friends/batch",
            r#"{"pairs":[{"owner":"alice","friend":"zed","friend":"bob"}]}"#,
            "pairs[0]: duplicate field `friend`",
        ),
        ("/v1/friends/batch", r#"{"pairs":[],"pairs":[{"owner":"alice","friend":"bob"}]}"#, "duplicate field `pairs`"),
        ("/v1/easemob/exception-cache/resend", r#"{"all":false,"all":true}"#, "duplicate field `all`"),
    ] {
        let resp =
            app.client.post(app.url(path)).header("content-type", "application/json").body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        let err: Value = resp.json().await.unwrap();
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_json")), "{body}: {err}");
        assert!(err["detail"].as_str().unwrap().contains(place), "{body}: {err}");
    }
    assert_eq!(app.sandbox().stats().requests, before, "nothing went to the sandbox");
    app.stop().await;
}

/// A replay is answered from its record even while no app token can be had: "nothing was
/// recorded or sent" would be false for it.
#[tokio::test]
async fn a_replay_is_answered_while_no_app_token_can_be_had() {
    let clock = friendhook::clock::ManualClock::new(1_800_000_000_000);
    let app = TestApp::spawn_with_clock(&[], clock.clone()).await;
    app.register(&["alice", "bob", "carol"]).await;
    let add = |friend: &'static str, key: &'static str| {
        app.client
            .post(app.url("/v1/friends"))
            .header("idempotency-key", key)
            .json(&json!({"owner": "alice", "friend": friend}))
            .send()
    };
    let first = add("bob", "order-7").await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();

    // The token expires, and the token endpoint now refuses the credentials.
    app.sandbox().inject_faults(crate::client_support::token_fault(401, 100));
    clock.advance_ms(2 * 86_400_000);

    let replay = add("bob", "order-7").await.unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap(), first);

    let (status, new) = {
        let r = add("carol", "order-8").await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((status.as_u16(), new["code"].as_str()), (503, Some("easemob_token_unavailable")), "{new}");
    app.stop().await;
}

/// A batch past --trigger-timeout is not answered "retry it": its calls were started and go on
/// (sent again, each would be a re-add), so the answer says so and the calls are all recorded.
#[tokio::test]
async fn a_batch_past_the_trigger_timeout_says_its_calls_go_on_and_they_do() {
    // 100 calls at the client's 20/s are spaced 50 ms apart: five seconds, far past the 2 s
    // deadline whatever the machine (the pacer's spacing is a floor, not an estimate), while the
    // two seconds before it leave ample time to read the batch, fetch the first app token and
    // commit the first intents (the 504 lists them).
    let app = TestApp::spawn(&["--trigger-timeout", "2s", "--easemob-rate-limit", "20"]).await;
    let friends: Vec<String> = (0..100).map(|i| format!("friend_{i}")).collect();
    let mut names = vec!["alice"];
    names.extend(friends.iter().map(String::as_str));
    app.register(&names).await;
    let pairs: Vec<Value> = friends.iter().map(|f| json!({"owner": "alice", "friend": f})).collect();
    let (status, body) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "still_running");
    assert!(body["detail"].as_str().unwrap().contains("do not send it again"), "{body}");
    // The calls to follow: those recorded by the deadline (the batch's intents are recorded
    // together right after it starts, but that is not what this test is about: a subset will do).
    let call_ids: Vec<i64> = body["call_ids"].as_array().unwrap().iter().map(|id| id.as_i64().unwrap()).collect();
    assert!(!call_ids.is_empty(), "calls were started, so some were recorded: {body}");

    let mut polls = 0;
    let outcomes = loop {
        polls += 1;
        assert!(polls < 3000, "the calls were not all recorded within 30 s");
        let (_, calls) = app.get_json("/v1/calls?owner=alice&limit=1000").await;
        let outcomes: Vec<String> =
            calls["items"].as_array().unwrap().iter().map(|c| c["outcome"].as_str().unwrap().to_string()).collect();
        if outcomes.len() == 100 && outcomes.iter().all(|o| o != "in_flight") {
            let ids: HashSet<i64> =
                calls["items"].as_array().unwrap().iter().map(|c| c["id"].as_i64().unwrap()).collect();
            assert!(call_ids.iter().all(|id| ids.contains(id)), "the 504 listed the batch's calls: {call_ids:?}");
            break outcomes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(outcomes.iter().all(|o| o == "succeeded"), "{outcomes:?}");
    app.stop().await;
}

/// A trigger that ran out of time before it started anything (here: waiting for an app token
/// from an Easemob that never answers) is answered 408 "retry it", and nothing is recorded.
#[tokio::test]
async fn a_trigger_past_its_deadline_before_anything_started_is_told_to_retry() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", silent.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut args = real_easemob_args(&base);
    // Long enough for the last request's refusal to come before it on a loaded machine.
    args.extend(["--trigger-timeout", "1s", "--easemob-max-attempts", "1"]);
    let app = TestApp::spawn(&args).await;
    for (path, body) in [
        ("/v1/friends", json!({"owner": "alice", "friend": "bob"})),
        ("/v1/friends/batch", json!({"pairs": [{"owner": "alice", "friend": "bob"}]})),
    ] {
        let (status, err) = app.post_json(path, body).await;
        assert_eq!((status, err["code"].as_str()), (408, Some("request_timeout")), "{path}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("retry it"), "{path}: {err}");
    }
    // The token request now fails at once (connection closed, one attempt): the calls waiting for
    // it give up, and they must not be sent or recorded after the client was told to retry.
    server.abort();
    let _ = server.await;
    let (status, err) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!((status, err["code"].as_str()), (503, Some("easemob_token_unavailable")), "{err}");
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"], json!([]), "nothing was recorded");
    app.stop().await;
}

/// A pair given twice in one batch, in either direction, is one call: friendship is two-way, so
/// the second add would be a re-add, which Easemob answers without an event; it would only ever
/// read `missing`, or take the first one's event and leave that one `missing`.
#[tokio::test]
async fn a_pair_repeated_in_a_batch_is_one_call_reported_at_each_position() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob", "carol", "dave"]).await;
    let pairs = json!([
        {"owner": "alice", "friend": "bob"},
        {"owner": "carol", "friend": "dave"},
        {"owner": "Alice", "friend": "BOB"},
        {"owner": "bob", "friend": "alice"},
    ]);
    let (status, body) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "one result per position");
    assert_eq!(results[2], results[0], "the repeat is the same call");
    assert_eq!(results[3], results[0], "so is the other direction: {body}");
    let ids: std::collections::HashSet<i64> = results.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 2, "alice -> bob once, carol -> dave once: {body}");
    for user in ["alice", "bob"] {
        let (_, calls) = app.get_json(&format!("/v1/calls?owner={user}")).await;
        assert_eq!(calls["items"].as_array().unwrap().len(), usize::from(user == "alice"), "{calls}");
    }
    assert_eq!(app.sandbox().stats().rate_limited, 0);
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_friend_is_a_recorded_call_with_a_remove_callback() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;
    let (_, add) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(add["outcome"], "succeeded");
    let r = app.client.delete(app.url("/v1/friends/alice/bob")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let del: Value = r.json().await.unwrap();
    assert_eq!(del["op"], "remove");
    assert_eq!(del["outcome"], "succeeded");
    app.settle().await;
    let (_, removes) = app.get_json("/v1/callbacks?operation=remove").await;
    assert_eq!(removes["items"].as_array().unwrap().len(), 1);
    app.stop().await;
}

/// A call cut off after it was marked sent (its turn had come) is closed `unknown` by the next
/// start; one cut off while it waited for its turn is closed `failed`, not sent.
#[tokio::test]
async fn a_call_cut_off_between_intent_and_outcome_is_unknown_after_restart_if_it_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let url = format!("sqlite://{}", db.display());
    // Simulate the crash window: intents committed, one marked sent, the process dies before
    // either outcome.
    let store =
        friendhook::store::Store::open(friendhook::store::StoreOptions::new(url.clone()), friendhook::clock::system())
            .await
            .unwrap();
    let mut ids = Vec::new();
    for friend in ["bob", "carol"] {
        let intent = store
            .insert_call_intent(friendhook::store::NewCall {
                op: friendhook::model::CallOp::Add,
                owner: "alice".into(),
                friend: friend.into(),
                idempotency_key: None,
            })
            .await
            .unwrap();
        let friendhook::store::IntentResult::Created(record) = intent else { panic!("new intent") };
        ids.push(record.id);
    }
    assert_eq!(store.mark_call_sent(ids[0]).await.unwrap(), None, "marked");
    assert_eq!(store.mark_call_sent(ids[0]).await.unwrap(), None, "marked again: as good");
    store.close().await;

    let app = TestApp::spawn_on(&db, &[]).await;
    let (status, sent) = app.get_json(&format!("/v1/calls/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert_eq!(sent["outcome"], "unknown");
    assert!(sent["completed_at"].is_i64());
    assert!(sent["attempts"].is_null(), "how many attempts were made was lost with the process: {sent}");
    assert!(sent["sent_at"].is_i64(), "{sent}");
    let detail = sent["outcome_detail"].as_str().expect("says what to check");
    assert!(detail.contains("may or may not have acted"), "{detail}");
    let (_, waiting) = app.get_json(&format!("/v1/calls/{}", ids[1])).await;
    assert_eq!(waiting["outcome"], "failed", "{waiting}");
    assert_eq!(waiting["attempts"], 0, "{waiting}");
    assert!(waiting["sent_at"].is_null(), "{waiting}");
    let detail = waiting["outcome_detail"].as_str().expect("says it was not sent");
    assert!(detail.starts_with("not sent:") && detail.contains("safe to send again"), "{detail}");
    let m = app.metrics().await;
    assert_eq!(m["friendhook_calls_total{op=\"add\",outcome=\"unknown\"}"], 1.0);
    assert_eq!(m["friendhook_calls_total{op=\"add\",outcome=\"failed\"}"], 1.0);
    app.stop().await;
}

#[tokio::test]
async fn the_sandbox_keeps_its_own_rate_limit_so_a_client_limit_set_too_high_shows_as_429s() {
    // The client may send 1,000/s; the sandbox, like Easemob, takes 5 adds a second.
    let app = TestApp::spawn(&["--easemob-rate-limit", "1000", "--sandbox-rate-limit", "5"]).await;
    let names: Vec<String> = (0..13).map(|i| format!("u{i}")).collect();
    app.register(&names.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let pairs: Vec<Value> = (1..13).map(|i| json!({"owner": "u0", "friend": format!("u{i}")})).collect();

    let (status, batch) = app.post_json("/v1/friends/batch", json!({"pairs": pairs})).await;

    assert_eq!(status, 200, "{batch}");
    let limited = app.sandbox().stats().rate_limited;
    assert!(limited > 0, "12 adds at once against 5/s: the sandbox answered no 429");
    app.stop().await;
}

#[tokio::test]
async fn names_are_taken_as_given() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;

    let (status, err) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": " bob"})).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_request")), "{err}");
    let r = app.client.delete(app.url("/v1/friends/alice/%20bob")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(0), "nothing was called: {calls}");
    app.stop().await;
}

/// A batch sent again under its Idempotency-Key is answered from its records, Easemob is not
/// called again; the key used with other pairs, or for a single call, is refused, nothing sent.
#[tokio::test]
async fn a_batch_sent_again_under_its_idempotency_key_calls_easemob_once() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob", "carol", "dave"]).await;
    let send = |key: &'static str, pairs: Value| {
        app.client
            .post(app.url("/v1/friends/batch"))
            .header("idempotency-key", key)
            .json(&json!({"pairs": pairs}))
            .send()
    };
    let pairs = json!([
        {"owner": "alice", "friend": "bob"},
        {"owner": "alice", "friend": "carol"},
        {"owner": "bob", "friend": "alice"},
    ]);
    let first = send("batch-7", pairs.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let outcomes: Vec<&str> =
        first["results"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["succeeded"; 3], "{first}");
    let keys: Vec<&str> =
        first["results"].as_array().unwrap().iter().map(|r| r["idempotency_key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["batch-7 0", "batch-7 1", "batch-7 0"], "one call per pair, keyed by its place: {first}");
    let requests = app.sandbox().stats().requests;

    let again = send("batch-7", pairs.clone()).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first, "the same records");
    assert_eq!(app.sandbox().stats().requests, requests, "Easemob was not called again");

    // Other pairs under the key, in any place: refused whole, nothing sent.
    for other in [
        json!([{"owner": "alice", "friend": "dave"}, {"owner": "alice", "friend": "carol"}]),
        json!([{"owner": "alice", "friend": "bob"}]),
    ] {
        let refused = send("batch-7", other.clone()).await.unwrap();
        assert_eq!(refused.status(), 422, "{other}");
        let err: Value = refused.json().await.unwrap();
        assert_eq!(err["code"], "idempotency_key_reused", "{err}");
    }
    // The key of a batch for a single call, and a single call's key for a batch.
    let single = |key: &'static str| {
        app.client
            .post(app.url("/v1/friends"))
            .header("idempotency-key", key)
            .json(&json!({"owner": "alice", "friend": "dave"}))
            .send()
    };
    assert_eq!(single("batch-7").await.unwrap().status(), 422);
    assert_eq!(single("one-8").await.unwrap().status(), 201);
    let refused = send("one-8", json!([{"owner": "alice", "friend": "dave"}])).await.unwrap();
    assert_eq!(refused.status(), 422);
    let (_, calls) = app.get_json("/v1/calls").await;
    assert_eq!(calls["items"].as_array().map(Vec::len), Some(3), "two from the batch, one single: {calls}");
    app.stop().await;
}

/// A single trigger sent while a batch waits for the rate limiter does not wait behind the whole
/// batch: it takes one of the next turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_call_overtakes_a_batch_waiting_for_the_rate_limiter() {
    let app = TestApp::spawn(&["--easemob-rate-limit", "10"]).await;
    let friends: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let mut names: Vec<&str> = friends.iter().map(String::as_str).collect();
    names.extend(["alice", "bob", "carol"]);
    app.register(&names).await;
    let pairs: Vec<Value> = friends.iter().map(|f| json!({"owner": "alice", "friend": f})).collect();
    let batch = tokio::spawn({
        let (http, url) = (app.client.clone(), app.url("/v1/friends/batch"));
        async move { http.post(url).json(&json!({"pairs": pairs})).send().await.unwrap().json::<Value>().await }
    });
    // The batch's first call is done: the other 19 are queued for their turns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, done) = app.get_json("/v1/calls?outcome=succeeded").await;
        if !done["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no call of the batch ended within 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let (status, single) = app.post_json("/v1/friends", json!({"owner": "bob", "friend": "carol"})).await;
    assert_eq!((status, single["outcome"].as_str()), (201, Some("succeeded")), "{single}");
    let batch = batch.await.unwrap().unwrap();
    let completed: Vec<i64> =
        batch["results"].as_array().unwrap().iter().map(|r| r["completed_at"].as_i64().unwrap()).collect();
    // Behind at most the batch call holding the queue (plus any that left while the single call
    // was being recorded); without the lanes it waited for all 20. Half is the bound asserted,
    // so that a stalled machine (a second is 10 turns here) cannot fail it.
    let after = completed.iter().filter(|&&t| t > single["completed_at"].as_i64().unwrap()).count();
    assert!(after >= 10, "only {after} of the batch's 20 calls ended after the single one: {completed:?} / {single}");
    app.stop().await;
}
