//! Getting back callbacks Easemob could not deliver, from its exception cache:
//! `GET /v1/easemob/exception-cache` and `POST /v1/easemob/exception-cache/resend`, against a
//! standalone sandbox playing Easemob in a real-Easemob setup.

use serde_json::{Value, json};

use crate::helpers::*;

/// A standalone sandbox whose callbacks go to `callback_url`, signed with the tests' secret, with
/// alice and bob registered.
async fn easemob_sending_to(callback_url: &str, exception_cache: bool) -> friendhook::sandbox::SandboxHandle {
    let sandbox = friendhook::sandbox::spawn(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        friendhook::sandbox::SandboxConfig {
            callback_url: Some(callback_url.to_owned()),
            callback_secret: Some(friendhook::secret::Secret::new(SECRET)),
            exception_cache,
            ..friendhook::sandbox::SandboxConfig::default()
        },
        friendhook::clock::system(),
    )
    .await
    .unwrap();
    let client = sandbox_client(&sandbox);
    let users = ["alice", "bob", "carol"].map(|n| friendhook::easemob::NewUser {
        username: n.into(),
        password: "pw".into(),
        nickname: None,
    });
    client.register_users(&users).await.unwrap();
    sandbox
}

async fn settled(sandbox: &friendhook::sandbox::SandboxHandle) {
    tokio::time::timeout(std::time::Duration::from_secs(30), sandbox.wait_callbacks_settled())
        .await
        .expect("callbacks settle within 30 s");
}

#[tokio::test]
async fn callbacks_that_found_friendhook_unreachable_are_re_sent_from_the_exception_cache_and_stored_once() {
    // Easemob's rule points at an address where nothing listens: friendhook is "down".
    let easemob = easemob_sending_to("http://127.0.0.1:9/callbacks/easemob", true).await;
    let base = easemob.base_url();
    let app = TestApp::spawn(&real_easemob_args(&base)).await;
    for friend in ["bob", "carol"] {
        let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": friend})).await;
        assert_eq!((status, call["outcome"].as_str()), (201, Some("succeeded")), "{call}");
    }
    settled(&easemob).await;
    assert_eq!(easemob.stats().callbacks_failed, 2);
    let (_, report) = app.get_json("/v1/reconciliation").await;
    assert_eq!(
        report["summary"]["pending"].as_i64().unwrap_or(0) + report["summary"]["missing"].as_i64().unwrap_or(0),
        2,
        "{report}"
    );

    let (status, cache) = app.get_json("/v1/easemob/exception-cache").await;
    assert_eq!(status, 200, "{cache}");
    assert_eq!(cache["callbacks"], 2, "{cache}");
    let date = cache["buckets"][0]["date"].as_str().unwrap().to_owned();
    assert_eq!(date.len(), 12, "yyyyMMddHHmm: {date}");

    // friendhook is back, at this address: ask for everything kept, sent here.
    let target = app.url("/callbacks/easemob");
    let (status, answer) =
        app.post_json("/v1/easemob/exception-cache/resend", json!({"all": true, "target_url": target})).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert!(results.iter().all(|r| r["resent"] == true), "{answer}");
    assert_eq!(results.iter().map(|r| r["size"].as_u64().unwrap()).sum::<u64>(), 2);
    settled(&easemob).await;

    assert_eq!(easemob.stats().callbacks_redelivered, 2);
    let (_, stored) = app.get_json("/v1/callbacks").await;
    assert_eq!(stored["items"].as_array().unwrap().len(), 2, "{stored}");
    let (_, report) = app.get_json("/v1/reconciliation").await;
    assert_eq!(report["summary"]["matched"], 2, "{report}");

    // The bucket is empty now: asking again names it as gone, and nothing is stored twice.
    // A date not shaped like a bucket key is named as such.
    let (status, again) =
        app.post_json("/v1/easemob/exception-cache/resend", json!({"dates": [date, "2026-11-27 10:10"]})).await;
    assert_eq!(status, 200);
    assert_eq!(again["results"][0]["resent"], false, "{again}");
    assert!(again["results"][0]["reason"].as_str().unwrap().contains("not in Easemob's exception cache"), "{again}");
    assert_eq!(again["results"][1]["resent"], false, "{again}");
    assert!(again["results"][1]["reason"].as_str().unwrap().contains("not a bucket key"), "{again}");
    let (_, cache) = app.get_json("/v1/easemob/exception-cache").await;
    assert_eq!(cache, json!({"buckets": [], "callbacks": 0}));

    app.stop().await;
    easemob.shutdown().await;
}

#[tokio::test]
async fn without_the_add_on_the_answer_says_so_and_a_request_must_name_what_to_re_send() {
    let easemob = easemob_sending_to("http://127.0.0.1:9/callbacks/easemob", false).await;
    let base = easemob.base_url();
    let app = TestApp::spawn(&real_easemob_args(&base)).await;

    let (status, err) = app.get_json("/v1/easemob/exception-cache").await;
    assert_eq!((status, err["code"].as_str()), (502, Some("exception_cache_not_enabled")), "{err}");
    assert!(err["detail"].as_str().unwrap().contains("paid add-on"), "{err}");

    // A target nothing can receive at would spend one of a bucket's few re-sends.
    for bad in [
        json!({}),
        json!({"all": true, "dates": ["202611271010"]}),
        json!({"all": true, "target_url": "ftp://x"}),
        json!({"all": true, "target_url": "http://"}),
        json!({"all": true, "target_url": "http://exa mple/\n"}),
        json!({"all": true, "target_url": "https://example.com/cb\n"}),
    ] {
        let (status, err): (u16, Value) = app.post_json("/v1/easemob/exception-cache/resend", bad.clone()).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_request")), "{bad}: {err}");
    }
    let (_, err): (u16, Value) =
        app.post_json("/v1/easemob/exception-cache/resend", json!({"all": true, "dates": ["202611271010"]})).await;
    assert!(err["detail"].as_str().unwrap().contains("not both"), "{err}");
    let (status, err) = app.post_json("/v1/easemob/exception-cache/resend", json!({"all": true})).await;
    assert_eq!((status, err["code"].as_str()), (502, Some("exception_cache_not_enabled")), "{err}");

    app.stop().await;
    easemob.shutdown().await;
}
