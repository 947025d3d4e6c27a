//! The Easemob sandbox over real HTTP: a sandbox on 127.0.0.1:0 with a `ManualClock`, driven by
//! reqwest, and for callbacks a small axum receiver on 127.0.0.1:0 that records what it gets.
//!
//! No sleeps: callback tests wait on `wait_callbacks_settled` under a timeout, and time-dependent
//! behaviour (token expiry, the rate window) moves the manual clock.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use friendhook::clock::ManualClock;
use friendhook::sandbox::{self, CallbackRecord, InjectedFault, SandboxConfig, SandboxHandle, SandboxStats};
use friendhook::secret::Secret;
use md5::{Digest, Md5};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const START_MS: i64 = 1_700_000_000_000;
const CALLBACK_SECRET: &str = "callback-secret";

/// A running sandbox, its clock and a client.
struct Sandbox {
    handle: SandboxHandle,
    clock: Arc<ManualClock>,
    http: reqwest::Client,
}

async fn spawn_sandbox(config: SandboxConfig) -> Sandbox {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the sandbox");
    let clock = ManualClock::new(START_MS);
    let handle = sandbox::spawn(listener, config, clock.clone()).await.expect("start the sandbox");
    Sandbox { handle, clock, http: reqwest::Client::new() }
}

/// A sandbox whose callbacks go to `receiver`, signed with [`CALLBACK_SECRET`].
async fn spawn_sandbox_for(receiver: &Receiver, config: SandboxConfig) -> Sandbox {
    spawn_sandbox(SandboxConfig {
        callback_url: Some(receiver.url.clone()),
        callback_secret: Some(Secret::new(CALLBACK_SECRET)),
        ..config
    })
    .await
}

/// Status and JSON body of a response.
async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.expect("a JSON body");
    (status, body)
}

impl Sandbox {
    /// `http://127.0.0.1:PORT/demo-org/demo-app{path}`.
    fn api(&self, path: &str) -> String {
        format!("{}/demo-org/demo-app{path}", self.handle.base_url())
    }

    async fn request_token(&self, body: Value) -> (u16, Value) {
        read(self.http.post(self.api("/token")).json(&body).send().await.expect("token request")).await
    }

    async fn token(&self) -> String {
        let (status, body) = self
            .request_token(json!({
                "grant_type": "client_credentials",
                "client_id": "sandbox-client-id",
                "client_secret": "sandbox-client-secret"
            }))
            .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().expect("access_token").to_owned()
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, self.api(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.expect("API request")).await
    }

    async fn register(&self, token: &str, usernames: &[&str]) -> Value {
        let users: Vec<Value> = usernames.iter().map(|name| json!({"username": name, "password": "pw"})).collect();
        let (status, body) = self.call(reqwest::Method::POST, "/users", token, Some(Value::Array(users))).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn add_friend(&self, token: &str, owner: &str, friend: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, &format!("/users/{owner}/contacts/users/{friend}"), token, None).await
    }

    async fn remove_friend(&self, token: &str, owner: &str, friend: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, &format!("/users/{owner}/contacts/users/{friend}"), token, None).await
    }

    async fn friends_of(&self, token: &str, owner: &str) -> Vec<String> {
        let (status, body) =
            self.call(reqwest::Method::GET, &format!("/users/{owner}/contacts/users"), token, None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body["data"].clone()).expect("data is a list of usernames")
    }

    /// Registers `owner` and `n` friends (`friend0`...), lets `owner` add each in turn, and waits
    /// for the callbacks.
    async fn owner_adds_friends(&self, n: usize) {
        let token = self.token().await;
        let names: Vec<String> = (0..n).map(|i| format!("friend{i}")).collect();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("owner");
        self.register(&token, &all).await;
        for name in &names {
            self.add_friend(&token, "owner", name).await;
        }
        self.settle().await;
    }

    /// Registers alice and bob, lets alice add bob, and waits for the callbacks; the token.
    async fn alice_adds_bob(&self) -> String {
        let token = self.token().await;
        self.register(&token, &["alice", "bob"]).await;
        self.add_friend(&token, "alice", "bob").await;
        self.settle().await;
        token
    }

    async fn settle(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.handle.wait_callbacks_settled())
            .await
            .expect("callbacks settle in time");
    }
}

/// A callback receiver that records every body and answers with a fixed status.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn spawn_receiver(answer: StatusCode) -> Receiver {
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/callback",
            post(move |State(bodies): State<Arc<Mutex<Vec<Bytes>>>>, body: Bytes| async move {
                bodies.lock().expect("receiver lock").push(body);
                answer
            }),
        )
        .with_state(Arc::clone(&bodies));
    Receiver { url: format!("{}/callback", serve(app).await), bodies }
}

/// Serves `app` on a free loopback port; its base URL.
async fn serve(app: axum::Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
    let base = format!("http://{}", listener.local_addr().expect("receiver address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

impl Receiver {
    fn raw(&self) -> Vec<Bytes> {
        self.bodies.lock().expect("receiver lock").clone()
    }

    fn bodies(&self) -> Vec<Value> {
        self.raw().iter().map(|b| serde_json::from_slice(b).expect("callback body is JSON")).collect()
    }
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value.as_object().expect("an object").keys().map(String::as_str).collect()
}

fn assert_easemob_error(status: u16, body: &Value, expected_status: u16, error: &str, description: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(body["error_description"], description, "{body}");
    assert_eq!(keys(body), BTreeSet::from(["error", "exception", "timestamp", "duration", "error_description"]));
}

fn fates(records: &[CallbackRecord]) -> Vec<&str> {
    records.iter().map(|r| r.fate.as_str()).collect()
}

// ---------------------------------------------------------------- token

#[tokio::test]
async fn the_right_credentials_get_a_token_with_its_lifetime() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let (status, body) = sandbox
        .request_token(json!({
            "grant_type": "client_credentials",
            "client_id": "sandbox-client-id",
            "client_secret": "sandbox-client-secret",
            "ttl": "3600"
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["application"].as_str().map(str::len), Some(36));

    let default_ttl = sandbox.token().await;
    assert!(!default_ttl.is_empty());
    assert_eq!(sandbox.handle.stats().tokens_issued, 2);
}

#[tokio::test]
async fn a_wrong_client_secret_or_id_is_an_invalid_grant() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let (status, body) = sandbox
        .request_token(
            json!({"grant_type": "client_credentials", "client_id": "sandbox-client-id", "client_secret": "nope"}),
        )
        .await;
    assert_easemob_error(status, &body, 400, "invalid_grant", "client_secret does not match");
    let (status, body) = sandbox
        .request_token(
            json!({"grant_type": "client_credentials", "client_id": "nope", "client_secret": "sandbox-client-secret"}),
        )
        .await;
    assert_easemob_error(status, &body, 400, "invalid_grant", "client_id does not match");
}

#[tokio::test]
async fn a_token_request_without_client_id_or_json_is_refused() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let (status, body) = sandbox.request_token(json!({"grant_type": "client_credentials", "client_secret": "x"})).await;
    assert_easemob_error(status, &body, 400, "illegal_argument", "client_id must be provided.");

    let not_json = sandbox
        .http
        .post(sandbox.api("/token"))
        .header("content-type", "application/json")
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("token request");
    let (status, body) = read(not_json).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("json_parse")));
}

#[tokio::test]
async fn a_token_request_without_a_json_content_type_is_unsupported() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let form = sandbox
        .http
        .post(sandbox.api("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("token request");
    let (status, body) = read(form).await;
    assert_easemob_error(status, &body, 415, "web_application", "Unsupported Media Type");
}

#[tokio::test]
async fn an_invalid_config_is_refused_at_start() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = SandboxConfig { drop_rate: 2.0, ..SandboxConfig::default() };
    assert!(sandbox::spawn(listener, config, ManualClock::new(0)).await.is_err());
}

#[tokio::test]
async fn a_token_request_for_an_unknown_app_is_not_found() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let url = format!("{}/demo-org/other-app/token", sandbox.handle.base_url());
    let body = json!({"grant_type": "client_credentials", "client_id": "sandbox-client-id", "client_secret": "sandbox-client-secret"});
    let (status, body) = read(sandbox.http.post(url).json(&body).send().await.expect("token request")).await;
    assert_easemob_error(
        status,
        &body,
        404,
        "organization_application_not_found",
        "Could not find application for demo-org/other-app from URI: demo-org/other-app/token",
    );
}

#[tokio::test]
async fn a_token_stops_working_once_its_ttl_has_passed() {
    let sandbox = spawn_sandbox(SandboxConfig { token_ttl_secs: 60, ..SandboxConfig::default() }).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice"]).await;

    sandbox.clock.advance_ms(59_999);
    let (status, _) = sandbox.call(reqwest::Method::GET, "/users/alice", &token, None).await;
    assert_eq!(status, 200);

    sandbox.clock.advance_ms(1);
    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/alice", &token, None).await;
    assert_easemob_error(status, &body, 401, "unauthorized", "Unable to authenticate due to expired access token");
}

#[tokio::test]
async fn missing_unknown_and_corrupt_tokens_are_refused() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let no_token = sandbox.http.get(sandbox.api("/users/alice")).send().await.expect("request");
    let (status, body) = read(no_token).await;
    assert_easemob_error(status, &body, 401, "unauthorized", "Unable to authenticate due to expired access token");

    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/alice", "YWMtneverissued", None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));

    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/alice", "garbage!", None).await;
    assert_easemob_error(
        status,
        &body,
        401,
        "auth_bad_access_token",
        "Unable to authenticate due to corrupt access token",
    );
}

// ---------------------------------------------------------------- users

#[tokio::test]
async fn registering_one_user_returns_its_lower_cased_entity() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let user = json!({"username": "Alice", "password": "pw", "nickname": "Ally"});
    let (status, body) = sandbox.call(reqwest::Method::POST, "/users", &token, Some(user)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["action"], "post");
    assert_eq!(body["path"], "/users");
    assert_eq!(body["organization"], "demo-org");
    assert_eq!(body["applicationName"], "demo-app");
    assert!(body.get("data").is_none(), "a single registration has no data");
    let entity = &body["entities"][0];
    assert_eq!(entity["username"], "alice");
    assert_eq!(entity["type"], "user");
    assert_eq!(entity["activated"], true);
    assert_eq!(entity["nickname"], "Ally");
    assert_eq!(entity["created"], START_MS);
    assert_eq!(entity["modified"], START_MS);

    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/ALICE", &token, None).await;
    assert_eq!((status, body["entities"][0]["username"].as_str()), (200, Some("alice")));
}

#[tokio::test]
async fn registering_an_existing_user_alone_is_a_duplicate_error() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice"]).await;
    let (status, body) = sandbox
        .call(reqwest::Method::POST, "/users", &token, Some(json!({"username": "ALICE", "password": "pw"})))
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("duplicate_unique_property_exists")), "{body}");
    assert!(body["error_description"].as_str().is_some_and(|d| d.contains("value of alice exists")));
}

#[tokio::test]
async fn registering_an_array_reports_taken_names_per_user() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice"]).await;
    let body = sandbox.register(&token, &["bob", "Alice", "carol", "bob"]).await;
    let created: Vec<&str> =
        body["entities"].as_array().expect("entities").iter().filter_map(|e| e["username"].as_str()).collect();
    assert_eq!(created, ["bob", "carol"]);
    assert_eq!(
        body["data"],
        json!([
            {"username": "alice", "registerUserFailReason": "the alice already exists"},
            {"username": "bob", "registerUserFailReason": "the bob already exists"}
        ])
    );
}

#[tokio::test]
async fn illegal_usernames_missing_passwords_and_big_batches_are_refused() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let (status, body) = sandbox
        .call(reqwest::Method::POST, "/users", &token, Some(json!({"username": "no spaces", "password": "pw"})))
        .await;
    assert_easemob_error(status, &body, 400, "illegal_argument", "username no spaces is not legal");

    let (status, body) = sandbox.call(reqwest::Method::POST, "/users", &token, Some(json!({"username": "dave"}))).await;
    assert_easemob_error(status, &body, 400, "illegal_argument", "password or pin must provided");

    let many: Vec<Value> = (0..61).map(|i| json!({"username": format!("u{i}"), "password": "pw"})).collect();
    let (status, body) = sandbox.call(reqwest::Method::POST, "/users", &token, Some(Value::Array(many))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("illegal_argument")));
    let (status, _) = sandbox.call(reqwest::Method::GET, "/users/u0", &token, None).await;
    assert_eq!(status, 404, "a refused batch creates nobody");
}

#[tokio::test]
async fn a_user_can_be_fetched_and_deleted() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob"]).await;
    sandbox.add_friend(&token, "alice", "bob").await;

    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/alice", &token, None).await;
    assert_eq!(status, 200);
    assert_eq!((body["action"].as_str(), body["count"].as_u64()), (Some("get"), Some(1)));

    let (status, body) = sandbox.call(reqwest::Method::DELETE, "/users/alice", &token, None).await;
    assert_eq!(status, 200);
    assert_eq!((body["action"].as_str(), body["entities"][0]["username"].as_str()), (Some("delete"), Some("alice")));

    let (status, body) = sandbox.call(reqwest::Method::GET, "/users/alice", &token, None).await;
    assert_easemob_error(status, &body, 404, "service_resource_not_found", "Service resource not found");
    let (status, _) = sandbox.call(reqwest::Method::DELETE, "/users/alice", &token, None).await;
    assert_eq!(status, 404);
    assert!(sandbox.friends_of(&token, "bob").await.is_empty(), "a deleted user leaves every friend list");
}

// ---------------------------------------------------------------- contacts

#[tokio::test]
async fn adding_a_friend_answers_the_documented_body_field_for_field() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let registered = sandbox.register(&token, &["user1"]).await;
    let owner_uuid = registered["entities"][0]["uuid"].as_str().expect("uuid").to_owned();
    let friend = json!({"username": "user2", "password": "pw", "nickname": "testuser"});
    let (_, registered) = sandbox.call(reqwest::Method::POST, "/users", &token, Some(friend)).await;
    let friend_entity = registered["entities"][0].clone();

    sandbox.clock.advance_ms(5);
    let (status, body) = sandbox.add_friend(&token, "user1", "user2").await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        keys(&body),
        BTreeSet::from([
            "action",
            "application",
            "path",
            "uri",
            "entities",
            "timestamp",
            "duration",
            "organization",
            "applicationName"
        ])
    );
    assert_eq!(body["action"], "post");
    assert_eq!(body["application"], registered["application"]);
    assert_eq!(body["path"], format!("/users/{owner_uuid}/contacts"));
    assert_eq!(body["uri"], sandbox.api(&format!("/users/{owner_uuid}/contacts")));
    assert_eq!(body["entities"], json!([friend_entity]));
    assert_eq!(
        keys(&body["entities"][0]),
        BTreeSet::from(["uuid", "type", "created", "modified", "username", "activated", "nickname"])
    );
    assert_eq!(body["timestamp"], START_MS + 5);
    assert_eq!(body["duration"], 0);
    assert_eq!(body["organization"], "demo-org");
    assert_eq!(body["applicationName"], "demo-app");
}

#[tokio::test]
async fn friendship_is_two_way_and_listed() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob", "carol"]).await;
    sandbox.add_friend(&token, "alice", "carol").await;
    let (status, _) = sandbox.add_friend(&token, "ALICE", "Bob").await;
    assert_eq!(status, 200);

    assert_eq!(sandbox.friends_of(&token, "alice").await, ["bob", "carol"]);
    assert_eq!(sandbox.friends_of(&token, "bob").await, ["alice"]);
    let (_, body) = sandbox.call(reqwest::Method::GET, "/users/alice/contacts/users", &token, None).await;
    assert_eq!(keys(&body), BTreeSet::from(["action", "uri", "entities", "data", "timestamp", "duration", "count"]));
    assert_eq!((body["action"].as_str(), body["count"].as_u64()), (Some("get"), Some(2)));
    assert_eq!(body["uri"], sandbox.api("/users/alice/contacts/users"));
    assert_eq!(body["entities"], json!([]));
}

#[tokio::test]
async fn removing_a_friend_removes_both_directions() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob"]).await;
    sandbox.add_friend(&token, "alice", "bob").await;

    let (status, body) = sandbox.remove_friend(&token, "bob", "alice").await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["action"], "delete");
    assert_eq!(body["entities"][0]["username"], "alice");
    assert!(sandbox.friends_of(&token, "alice").await.is_empty());
    assert!(sandbox.friends_of(&token, "bob").await.is_empty());
}

#[tokio::test]
async fn adding_past_the_friend_limit_is_forbidden_but_re_adding_is_not() {
    let sandbox = spawn_sandbox(SandboxConfig { friend_limit: 2, ..SandboxConfig::default() }).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob", "carol", "dave"]).await;
    sandbox.add_friend(&token, "alice", "bob").await;
    sandbox.add_friend(&token, "alice", "carol").await;

    let (status, body) = sandbox.add_friend(&token, "alice", "dave").await;
    assert_easemob_error(status, &body, 403, "exceed_limit", "user contact number exceed limit");
    let (status, body) = sandbox.add_friend(&token, "dave", "alice").await;
    assert_easemob_error(status, &body, 403, "exceed_limit", "user contact number exceed limit");

    let (status, _) = sandbox.add_friend(&token, "alice", "bob").await;
    assert_eq!(status, 200, "re-adding an existing friend at the limit is fine");
    assert_eq!(sandbox.friends_of(&token, "alice").await, ["bob", "carol"]);
}

#[tokio::test]
async fn friends_of_unknown_users_are_not_found() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice"]).await;
    for (status, body) in [
        sandbox.add_friend(&token, "alice", "ghost").await,
        sandbox.add_friend(&token, "ghost", "alice").await,
        sandbox.remove_friend(&token, "alice", "ghost").await,
        sandbox.call(reqwest::Method::GET, "/users/ghost/contacts/users", &token, None).await,
    ] {
        assert_easemob_error(status, &body, 404, "service_resource_not_found", "Service resource not found");
    }
}

// ---------------------------------------------------------------- rate limit, faults, routes

#[tokio::test]
async fn requests_past_the_rate_limit_get_429_reach_limit() {
    let sandbox = spawn_sandbox(SandboxConfig { rate_limit: 1, ..SandboxConfig::default() }).await;
    let token = sandbox.token().await;
    let calls = (0..50).map(|_| sandbox.call(reqwest::Method::GET, "/users/nobody", &token, None));
    let answers = futures_util::future::join_all(calls).await;

    let limited: Vec<&(u16, Value)> = answers.iter().filter(|(status, _)| *status == 429).collect();
    assert!(!limited.is_empty());
    for (status, body) in &limited {
        assert_easemob_error(*status, body, 429, "reach_limit", "This request has reached api limit");
    }
    // The clock is frozen, so all 50 fall in one window and exactly one gets through.
    assert_eq!(answers.iter().filter(|(status, _)| *status == 404).count(), 1);
    let stats = sandbox.handle.stats();
    assert!(stats.rate_limited >= 1);
    assert_eq!(stats.rate_limited, 49);

    sandbox.clock.advance_ms(1_000);
    let (status, _) = sandbox.call(reqwest::Method::GET, "/users/nobody", &token, None).await;
    assert_eq!(status, 404, "the next second has a fresh budget");
}

#[tokio::test]
async fn token_requests_are_not_rate_limited() {
    let sandbox = spawn_sandbox(SandboxConfig { rate_limit: 1, ..SandboxConfig::default() }).await;
    for _ in 0..5 {
        sandbox.token().await;
    }
    assert_eq!(sandbox.handle.stats().rate_limited, 0);
}

#[tokio::test]
async fn an_injected_401_hits_once_then_requests_succeed() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob"]).await;
    sandbox.handle.inject_faults(InjectedFault {
        status: 401,
        count: 1,
        path_contains: Some("/contacts/".into()),
        error: None,
    });

    let (status, body) = sandbox.add_friend(&token, "alice", "bob").await;
    assert_easemob_error(status, &body, 401, "unauthorized", "Unable to authenticate due to expired access token");
    let (status, _) = sandbox.add_friend(&token, "alice", "bob").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn faults_posted_over_http_answer_the_next_matching_requests() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let fault = json!({"status": 429, "count": 2});
    let response = sandbox
        .http
        .post(format!("{}/_sandbox/faults", sandbox.handle.base_url()))
        .json(&fault)
        .send()
        .await
        .expect("fault request");
    assert_eq!(response.status(), 200);

    for _ in 0..2 {
        let (status, body) = sandbox.call(reqwest::Method::GET, "/users/nobody", &token, None).await;
        assert_easemob_error(status, &body, 429, "reach_limit", "This request has reached api limit");
    }
    let (status, _) = sandbox.call(reqwest::Method::GET, "/users/nobody", &token, None).await;
    assert_eq!(status, 404);
    assert_eq!(sandbox.handle.stats().rate_limited, 0, "injected 429s are not the limiter's");

    let (status, body) = read(
        sandbox
            .http
            .post(format!("{}/_sandbox/faults", sandbox.handle.base_url()))
            .json(&json!({"status": 200, "count": 1}))
            .send()
            .await
            .expect("fault request"),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("illegal_argument")));
}

#[tokio::test]
async fn injected_5xx_faults_can_aim_at_the_token_endpoint() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    sandbox.handle.inject_faults(InjectedFault {
        status: 503,
        count: 1,
        path_contains: Some("/token".into()),
        error: None,
    });
    let body = json!({"grant_type": "client_credentials", "client_id": "sandbox-client-id", "client_secret": "sandbox-client-secret"});
    let (status, answer) = sandbox.request_token(body).await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("service_unavailable")));
    sandbox.token().await;
}

#[tokio::test]
async fn control_endpoints_need_no_token_and_match_the_handle() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice"]).await;
    let base = sandbox.handle.base_url();

    let stats: SandboxStats = sandbox
        .http
        .get(format!("{base}/_sandbox/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON");
    let direct = sandbox.handle.stats();
    assert_eq!((stats.requests, stats.tokens_issued), (direct.requests, direct.tokens_issued));
    assert_eq!(stats.requests, 2, "the token request and the registration; control requests are not counted");

    let records: Vec<CallbackRecord> = sandbox
        .http
        .get(format!("{base}/_sandbox/callbacks"))
        .send()
        .await
        .expect("callbacks")
        .json()
        .await
        .expect("JSON");
    assert!(records.is_empty());
}

#[tokio::test]
async fn unknown_routes_and_methods_get_easemob_errors() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let (status, body) = sandbox.call(reqwest::Method::GET, "/chatgroups", &token, None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("web_application")));
    let (status, body) = sandbox.call(reqwest::Method::PUT, "/users", &token, None).await;
    assert_eq!((status, body["error"].as_str()), (405, Some("web_application")));
}

// ---------------------------------------------------------------- callbacks

#[tokio::test]
async fn callbacks_arrive_signed_with_the_documented_fields() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    sandbox.alice_adds_bob().await;

    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), 1);
    let body = &bodies[0];
    assert_eq!(
        keys(body),
        BTreeSet::from([
            "chat_type",
            "callId",
            "security",
            "payload",
            "host",
            "appkey",
            "from",
            "to",
            "eventType",
            "msg_id",
            "timestamp"
        ])
    );
    let msg_id = body["msg_id"].as_str().expect("msg_id is a string");
    assert!(msg_id.len() >= 18 && msg_id.bytes().all(|b| b.is_ascii_digit()), "{msg_id}");
    let call_id = format!("demo-org#demo-app_{msg_id}");
    assert_eq!(body["callId"], call_id);
    assert_eq!(body["chat_type"], "roster");
    assert_eq!(body["payload"], json!({"reason": "", "operation": "add"}));
    assert_eq!(body["appkey"], "demo-org#demo-app");
    assert_eq!(body["from"], "demo-org#demo-app_alice@easemob.com");
    assert_eq!(body["to"], "bob");
    assert_eq!(body["eventType"], "chat");
    assert_eq!(body["timestamp"], START_MS);
    assert_eq!(body["security"], md5_hex(&format!("{call_id}{CALLBACK_SECRET}{START_MS}")));

    let records = sandbox.handle.callbacks();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!((record.call_id.as_str(), record.msg_id.as_str()), (call_id.as_str(), msg_id));
    assert_eq!(
        (record.from_user.as_str(), record.to_user.as_str(), record.operation.as_str()),
        ("alice", "bob", "add")
    );
    assert_eq!((record.fate.as_str(), record.attempts), ("delivered", 1));
    let stats = sandbox.handle.stats();
    assert_eq!((stats.callbacks_sent, stats.callbacks_pending, stats.callbacks_failed), (1, 0, 0));
}

#[tokio::test]
async fn a_remove_sends_a_remove_callback_with_a_roster_version() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    let token = sandbox.alice_adds_bob().await;

    sandbox.remove_friend(&token, "alice", "bob").await;
    sandbox.settle().await;

    let records = sandbox.handle.callbacks();
    assert_eq!(records.iter().map(|r| r.operation.as_str()).collect::<Vec<_>>(), ["add", "remove"]);
    let remove =
        receiver.bodies().into_iter().find(|b| b["payload"]["operation"] == "remove").expect("a remove callback");
    let version = remove["payload"]["roster_ver"].as_str().expect("roster_ver");
    assert!(version.len() == 40 && version.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()), "{version}");
    assert_ne!(remove["msg_id"], records[0].msg_id.as_str(), "each event has its own msg_id");
}

#[tokio::test]
async fn re_adding_a_friend_sends_no_second_callback() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob"]).await;
    sandbox.add_friend(&token, "alice", "bob").await;
    sandbox.add_friend(&token, "bob", "alice").await;
    sandbox.settle().await;
    assert_eq!(receiver.bodies().len(), 1);
}

#[tokio::test]
async fn two_callbacks_per_add_go_both_ways_as_one_event() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox =
        spawn_sandbox_for(&receiver, SandboxConfig { callbacks_per_add: 2, ..SandboxConfig::default() }).await;
    sandbox.alice_adds_bob().await;

    let records = sandbox.handle.callbacks();
    let directions: Vec<(&str, &str)> = records.iter().map(|r| (r.from_user.as_str(), r.to_user.as_str())).collect();
    assert_eq!(directions, [("alice", "bob"), ("bob", "alice")]);
    // One operation told to both users, like Easemob's documented accept / remote_accept pair:
    // one callId, msg_id and timestamp; only `from` and `to` differ.
    assert_eq!((&records[0].call_id, &records[0].msg_id), (&records[1].call_id, &records[1].msg_id));
    let mut bodies = receiver.bodies();
    bodies.sort_by_key(|b| b["from"].as_str().unwrap_or_default().to_owned());
    let froms: Vec<&str> = bodies.iter().map(|b| b["from"].as_str().unwrap_or_default()).collect();
    assert_eq!(froms, ["demo-org#demo-app_alice@easemob.com", "demo-org#demo-app_bob@easemob.com"]);
    assert_eq!(bodies[0]["timestamp"], bodies[1]["timestamp"]);
    assert_eq!(bodies[0]["callId"], bodies[1]["callId"]);
}

#[tokio::test]
async fn a_failing_receiver_gets_one_retry_then_the_callback_fails() {
    let receiver = spawn_receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    sandbox.alice_adds_bob().await;

    let raw = receiver.raw();
    assert_eq!(raw.len(), 2, "the first attempt and exactly one retry");
    assert_eq!(raw[0], raw[1], "the retry repeats the same bytes");
    let records = sandbox.handle.callbacks();
    assert_eq!((records[0].fate.as_str(), records[0].attempts), ("failed", 2));
    let stats = sandbox.handle.stats();
    assert_eq!((stats.callbacks_failed, stats.callbacks_sent, stats.callbacks_pending), (1, 0, 0));
}

/// Easemob counts only a 200: a receiver that redirects (http to https, a trailing slash) has
/// not received the callback, so the sandbox does not follow it (a POST followed as a GET would
/// lose the body and still count as delivered).
#[tokio::test]
async fn a_redirect_is_a_failed_attempt_not_a_delivery() {
    let gets = Arc::new(Mutex::new(0u32));
    let app = axum::Router::new()
        .route("/callback", post(|| async { (StatusCode::FOUND, [(axum::http::header::LOCATION, "/landing")]) }))
        .route(
            "/landing",
            axum::routing::any({
                let gets = Arc::clone(&gets);
                move || async move {
                    *gets.lock().expect("lock") += 1;
                    StatusCode::OK
                }
            }),
        );
    let receiver = Receiver { url: format!("{}/callback", serve(app).await), bodies: Arc::default() };
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    sandbox.alice_adds_bob().await;

    let records = sandbox.handle.callbacks();
    assert_eq!((records[0].fate.as_str(), records[0].attempts), ("failed", 2));
    assert_eq!(*gets.lock().expect("lock"), 0, "the redirect was not followed");
}

/// 90 failed attempts within 30 s ban the callback rule: callbacks due during the ban are not
/// sent at all (`banned`), and the first ban lasts 5 minutes (of the injected clock).
#[tokio::test]
async fn ninety_failures_in_thirty_seconds_ban_the_callback_rule_for_five_minutes() {
    let receiver = spawn_receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
    let token = sandbox.token().await;
    let friends: Vec<String> = (0..47).map(|i| format!("f{i}")).collect();
    let mut users = vec!["alice"];
    users.extend(friends.iter().map(String::as_str));
    sandbox.register(&token, &users).await;

    // 45 callbacks, each tried twice: the 90th failure bans the rule.
    for friend in &friends[..45] {
        assert_eq!(sandbox.add_friend(&token, "alice", friend).await.0, 200);
    }
    sandbox.settle().await;
    assert_eq!(receiver.raw().len(), 90);
    assert_eq!(sandbox.add_friend(&token, "alice", &friends[45]).await.0, 200, "the API itself is not banned");
    sandbox.settle().await;
    assert_eq!(receiver.raw().len(), 90, "nothing is sent while the rule is banned");
    let records = sandbox.handle.callbacks();
    assert_eq!((records[45].fate.as_str(), records[45].attempts), ("banned", 0));
    let stats = sandbox.handle.stats();
    assert_eq!((stats.callbacks_failed, stats.callbacks_banned, stats.callbacks_pending), (45, 1, 0));

    sandbox.clock.advance_ms(5 * 60_000);
    sandbox.add_friend(&token, "alice", &friends[46]).await;
    sandbox.settle().await;
    assert_eq!(receiver.raw().len(), 92, "after five minutes the rule sends again");
    assert_eq!(sandbox.handle.callbacks()[46].fate, "failed");
}

/// Easemob accepts a reply of up to 1,000 characters: a longer one is a failed attempt.
#[tokio::test]
async fn a_reply_over_a_thousand_bytes_is_a_failed_attempt() {
    let app = axum::Router::new()
        .route("/callback", post(|| async { "x".repeat(1_001) }))
        .route("/short", post(|| async { "x".repeat(1_000) }));
    let base = serve(app).await;
    for (path, fate) in [("/callback", "failed"), ("/short", "delivered")] {
        let receiver = Receiver { url: format!("{base}{path}"), bodies: Arc::default() };
        let sandbox = spawn_sandbox_for(&receiver, SandboxConfig::default()).await;
        sandbox.alice_adds_bob().await;
        assert_eq!(sandbox.handle.callbacks()[0].fate, fate, "{path}");
    }
}

#[tokio::test]
async fn an_unreachable_receiver_fails_the_callback_after_a_retry() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/callback", closed.local_addr().expect("address"));
    drop(closed);
    let sandbox = spawn_sandbox(SandboxConfig { callback_url: Some(url), ..SandboxConfig::default() }).await;
    sandbox.alice_adds_bob().await;

    let records = sandbox.handle.callbacks();
    assert_eq!((records[0].fate.as_str(), records[0].attempts), ("failed", 2));
}

#[tokio::test]
async fn a_drop_rate_of_one_drops_every_callback() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig { drop_rate: 1.0, ..SandboxConfig::default() }).await;
    let token = sandbox.token().await;
    sandbox.register(&token, &["alice", "bob", "carol"]).await;

    sandbox.add_friend(&token, "alice", "bob").await;
    sandbox.add_friend(&token, "alice", "carol").await;
    sandbox.remove_friend(&token, "alice", "bob").await;
    sandbox.settle().await;

    assert!(receiver.bodies().is_empty());
    let records = sandbox.handle.callbacks();
    assert_eq!(fates(&records), ["dropped", "dropped", "dropped"]);
    assert!(records.iter().all(|r| r.attempts == 0));
    assert_eq!(sandbox.handle.stats().callbacks_dropped, 3);
}

#[tokio::test]
async fn a_duplicate_rate_of_one_sends_every_callback_twice() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&receiver, SandboxConfig { duplicate_rate: 1.0, ..SandboxConfig::default() }).await;
    sandbox.alice_adds_bob().await;

    let raw = receiver.raw();
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0], raw[1], "a duplicate is the same body");
    let records = sandbox.handle.callbacks();
    assert_eq!((records[0].fate.as_str(), records[0].attempts), ("delivered", 2));
    let stats = sandbox.handle.stats();
    assert_eq!((stats.callbacks_duplicated, stats.callbacks_sent), (1, 1));
}

#[tokio::test]
async fn a_bad_signature_rate_of_one_signs_with_a_wrong_secret() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox =
        spawn_sandbox_for(&receiver, SandboxConfig { bad_signature_rate: 1.0, ..SandboxConfig::default() }).await;
    sandbox.alice_adds_bob().await;

    let body = &receiver.bodies()[0];
    let call_id = body["callId"].as_str().expect("callId");
    let right = md5_hex(&format!("{call_id}{CALLBACK_SECRET}{}", body["timestamp"]));
    let security = body["security"].as_str().expect("security");
    assert_ne!(security, right);
    assert_eq!(security.len(), 32);
}

#[tokio::test]
async fn delayed_callbacks_are_all_delivered() {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let sandbox =
        spawn_sandbox_for(&receiver, SandboxConfig { delay_ms: 40, seed: 3, ..SandboxConfig::default() }).await;
    sandbox.owner_adds_friends(8).await;

    assert_eq!(receiver.bodies().len(), 8);
    assert!(sandbox.handle.callbacks().iter().all(|r| r.fate == "delivered"));
}

/// Runs the same operations against a sandbox with the given seed and returns the fates and
/// attempt counts of its callbacks.
async fn fates_for_seed(seed: u64) -> Vec<(String, u32)> {
    let receiver = spawn_receiver(StatusCode::OK).await;
    let config = SandboxConfig { drop_rate: 0.4, duplicate_rate: 0.4, delay_ms: 5, seed, ..SandboxConfig::default() };
    let sandbox = spawn_sandbox_for(&receiver, config).await;
    sandbox.owner_adds_friends(20).await;
    sandbox.handle.callbacks().into_iter().map(|r| (r.fate, r.attempts)).collect()
}

#[tokio::test]
async fn the_same_seed_gives_the_same_fates() {
    let first = fates_for_seed(42).await;
    let second = fates_for_seed(42).await;
    assert_eq!(first, second);
    assert!(first.iter().any(|(fate, _)| fate == "dropped"), "{first:?}");
    assert!(first.iter().any(|(fate, _)| fate == "delivered"), "{first:?}");
}

#[tokio::test]
async fn without_a_callback_url_no_callbacks_are_generated() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    sandbox.alice_adds_bob().await;
    assert!(sandbox.handle.callbacks().is_empty());
    let stats = sandbox.handle.stats();
    assert_eq!(
        stats.callbacks_sent
            + stats.callbacks_dropped
            + stats.callbacks_failed
            + stats.callbacks_banned
            + stats.callbacks_pending,
        0
    );
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let sandbox = spawn_sandbox(SandboxConfig::default()).await;
    let base = sandbox.handle.base_url();
    sandbox.handle.shutdown().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    assert!(http.get(format!("{base}/_sandbox/stats")).send().await.is_err());
}

/// Easemob's exception cache: a callback that failed both attempts is kept in a 10-minute bucket
/// and sent again, same bytes, when the bucket is asked for; the bucket then empties.
#[tokio::test]
async fn a_failed_callback_is_kept_in_the_exception_cache_and_sent_again_on_request() {
    let down = spawn_receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let up = spawn_receiver(StatusCode::OK).await;
    let sandbox = spawn_sandbox_for(&down, SandboxConfig::default()).await;
    let token = sandbox.alice_adds_bob().await;

    let (status, info) = sandbox.call(reqwest::Method::GET, "/callbacks/storage/info", &token, None).await;
    assert_eq!(status, 200, "{info}");
    // START_MS (2023-11-14T22:13:20Z) is in the bucket of 22:10.
    assert_eq!(info["data"], json!([{"date": "202311142210", "size": 1, "retry": 0}]), "{info}");
    assert_eq!(info["path"], "/callbacks");

    let unknown = json!({"date": "202311142200", "retry": 0, "targetUrl": up.url});
    let (status, answer) = sandbox.call(reqwest::Method::POST, "/callbacks/storage/retry", &token, Some(unknown)).await;
    assert_eq!((status, answer["data"].as_str()), (200, Some("failure")), "no such bucket: {answer}");

    let retry = json!({"date": "202311142210", "retry": 0, "targetUrl": up.url});
    let (status, answer) = sandbox.call(reqwest::Method::POST, "/callbacks/storage/retry", &token, Some(retry)).await;
    assert_eq!((status, answer["data"].as_str()), (200, Some("success")), "{answer}");
    sandbox.settle().await;

    assert_eq!(up.raw(), vec![down.raw()[0].clone()], "the same bytes, signature included");
    let stats = sandbox.handle.stats();
    assert_eq!((stats.callbacks_failed, stats.callbacks_redelivered), (1, 1));
    assert_eq!(sandbox.handle.callbacks()[0].fate, "redelivered");
    let (_, info) = sandbox.call(reqwest::Method::GET, "/callbacks/storage/info", &token, None).await;
    assert_eq!(info["data"], json!([]), "{info}");
}

#[tokio::test]
async fn a_bucket_sent_again_to_a_receiver_still_down_keeps_its_callbacks_and_counts_the_retry() {
    let down = spawn_receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let sandbox = spawn_sandbox_for(&down, SandboxConfig::default()).await;
    let token = sandbox.alice_adds_bob().await;
    let retry = json!({"date": "202311142210", "retry": 0});
    let (status, answer) = sandbox.call(reqwest::Method::POST, "/callbacks/storage/retry", &token, Some(retry)).await;
    assert_eq!((status, answer["data"].as_str()), (200, Some("success")), "{answer}");
    sandbox.settle().await;
    assert_eq!(down.raw().len(), 4, "two attempts at first, two on the re-send to the rule's URL");
    let (_, info) = sandbox.call(reqwest::Method::GET, "/callbacks/storage/info", &token, None).await;
    assert_eq!(info["data"], json!([{"date": "202311142210", "size": 1, "retry": 1}]), "{info}");

    // Three days after its bucket ended, it is gone.
    sandbox.clock.advance_ms(3 * 24 * 3_600_000 + 600_000);
    let token = sandbox.token().await;
    let (_, info) = sandbox.call(reqwest::Method::GET, "/callbacks/storage/info", &token, None).await;
    assert_eq!(info["data"], json!([]), "{info}");
}

#[tokio::test]
async fn without_the_exception_cache_add_on_its_endpoints_answer_403_and_nothing_is_kept() {
    let down = spawn_receiver(StatusCode::SERVICE_UNAVAILABLE).await;
    let sandbox = spawn_sandbox_for(&down, SandboxConfig { exception_cache: false, ..SandboxConfig::default() }).await;
    let token = sandbox.alice_adds_bob().await;
    let (status, body) = sandbox.call(reqwest::Method::GET, "/callbacks/storage/info", &token, None).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("service_not_enabled")), "{body}");
    let (status, _) = sandbox
        .call(reqwest::Method::POST, "/callbacks/storage/retry", &token, Some(json!({"date": "202311142210"})))
        .await;
    assert_eq!(status, 403);
    let (status, body) = spawn_sandbox(SandboxConfig::default())
        .await
        .call(reqwest::Method::POST, "/callbacks/storage/retry", "YWMtnotatoken", Some(json!({})))
        .await;
    assert_eq!(status, 401, "the token is checked first: {body}");
}
