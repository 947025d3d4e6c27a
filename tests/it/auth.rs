//! `--api-token`: the `/v1/...` endpoints need a bearer token; the callback endpoint, the probes
//! and `/metrics` do not.

use serde_json::{Value, json};

use crate::helpers::*;

async fn status_and_code(r: reqwest::Response) -> (u16, Value, Option<String>) {
    let status = r.status().as_u16();
    let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), challenge)
}

#[tokio::test]
async fn with_an_api_token_the_v1_endpoints_need_it_and_callbacks_probes_and_metrics_do_not() {
    // Arrange: two tokens, as during a rotation.
    let app = TestApp::spawn(&["--api-token", "tok-old-5Kq,tok-new-9Zx"]).await;
    app.register(&["alice", "bob"]).await;
    let calls = app.url("/v1/calls");

    // No token, a wrong one, the wrong scheme: 401 with a code that says which, and a challenge.
    let (status, body, challenge) = status_and_code(app.client.get(&calls).send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("api_token_required")), "{body}");
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    let (status, body, _) =
        status_and_code(app.client.get(&calls).bearer_auth("tok-old-5K").send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("api_token_invalid")), "a prefix is not the token: {body}");
    let basic = app.client.get(&calls).header("authorization", "Basic dG9rLW9sZC01S3E=").send().await.unwrap();
    assert_eq!(status_and_code(basic).await.1["code"], "api_token_required");
    // A token with bytes outside ASCII is a wrong token, not a missing one.
    let utf8 = reqwest::header::HeaderValue::from_bytes("Bearer 好".as_bytes()).unwrap();
    let wrong = app.client.get(&calls).header("authorization", utf8).send().await.unwrap();
    assert_eq!(status_and_code(wrong).await.1["code"], "api_token_invalid");

    // A trigger without the token sends nothing to Easemob.
    let before = app.sandbox().stats().requests;
    let r = app.client.post(app.url("/v1/friends")).json(&json!({"owner": "alice", "friend": "bob"})).send().await;
    assert_eq!(r.unwrap().status(), 401);
    assert_eq!(app.sandbox().stats().requests, before, "nothing reached the sandbox");

    // Act: either token, the scheme in any case.
    for (scheme, token) in [("Bearer", "tok-old-5Kq"), ("bearer", "tok-new-9Zx")] {
        let r = app.client.get(&calls).header("authorization", format!("{scheme} {token}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{scheme} {token}");
    }
    let r = app
        .client
        .post(app.url("/v1/friends"))
        .bearer_auth("tok-new-9Zx")
        .json(&json!({"owner": "alice", "friend": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Assert: what Easemob, probes and scrapers call needs no token.
    let body = roster_body("700000000000000001", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200, "callbacks are checked by their signature");
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.client.get(app.url(open)).send().await.unwrap().status(), 200, "{open}");
    }
    // Anything else is guarded too, so a path added later is not open by accident.
    let (status, body, _) = status_and_code(app.client.get(app.url("/v2/anything")).send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("api_token_required")), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn without_an_api_token_the_v1_endpoints_stay_open() {
    let app = TestApp::spawn(&[]).await;
    let (status, body) = app.get_json("/v1/calls").await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn an_empty_api_token_is_refused_at_start_rather_than_matching_an_empty_bearer() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("empty-token.db").display());
    for tokens in ["tok-1,", "tok-1, ,tok-2"] {
        let args = serve_args(&db_url, &["--api-token", tokens]);
        let err = friendhook::commands::serve::build(&args, friendhook::clock::system()).await.err().expect("refused");
        assert!(err.to_string().contains("empty token"), "{tokens}: {err}");
    }
}

#[tokio::test]
async fn spaces_around_listed_tokens_and_secrets_are_not_part_of_them() {
    // As an operator types them in an environment file during a rotation.
    let app =
        TestApp::spawn(&["--api-token", "tok-one, tok-two", "--callback-secret", &format!("old-secret, {SECRET}")])
            .await;
    let r = app.client.get(app.url("/v1/calls")).bearer_auth("tok-two").send().await.unwrap();
    assert_eq!(r.status(), 200, "the second token, without its leading space");
    let body = roster_body("700000000000000002", "carol", "dave", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200, "the second secret, without its leading space");
    app.stop().await;
}

#[tokio::test]
async fn reconcile_against_a_service_sends_its_api_token_and_says_when_it_is_missing() {
    let app = TestApp::spawn(&["--api-token", "tok-old-5Kq,tok-new-9Zx"]).await;
    // tokio's process: the service runs on this test's runtime and must go on answering.
    let reconcile = |extra: &[&str], env: Option<&str>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"));
        cmd.args(["reconcile", "--url", &app.base, "--json"]).args(extra).env_remove("FRIENDHOOK_API_TOKEN");
        if let Some(tokens) = env {
            cmd.env("FRIENDHOOK_API_TOKEN", tokens);
        }
        async move { cmd.output().await.unwrap() }
    };

    let without = reconcile(&[], None).await;
    assert_eq!(without.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("api_token_required") && stderr.contains("--api-token"), "{stderr}");
    for (extra, env) in [(&["--api-token", "tok-new-9Zx"][..], None), (&[][..], Some("tok-old-5Kq,tok-new-9Zx"))] {
        let out = reconcile(extra, env).await;
        assert!(out.status.success(), "{extra:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(doc["summary"].is_object(), "{doc}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("tok-"), "no token in the output");
    }
    app.stop().await;
}
