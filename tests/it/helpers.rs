//! `spawn_app()` and friends: start the real service on port 0 with a temporary database.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use friendhook::config::{Cli, Command, ServeArgs};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const SECRET: &str = "test-secret";
pub const APPKEY: &str = "demo-org#demo-app";

/// A running service.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub db_path: PathBuf,
    pub db_url: String,
    pub client: reqwest::Client,
    pub sandbox: Option<friendhook::sandbox::SandboxHandle>,
    /// The service's queue of `/v1/reconciliation` reports (a test can take the only slot).
    pub reports: std::sync::Arc<friendhook::http::journal::ReportGate>,
    /// The service's Easemob client.
    pub easemob: Option<friendhook::easemob::EasemobClient>,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

pub fn serve_args(db_url: &str, extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "friendhook",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--sandbox-listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
    ];
    // The default secret, unless the test brings its own (standard-webhooks needs whsec_...).
    if !extra.contains(&"--callback-secret") {
        argv.extend_from_slice(&["--callback-secret", SECRET]);
    }
    // A stop waits for no callbacks, unless the test is about that wait.
    if !extra.contains(&"--callback-linger") {
        argv.extend_from_slice(&["--callback-linger", "0s"]);
    }
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid test arguments").command {
        Command::Serve(args) => *args,
        #[allow(unreachable_patterns)]
        _ => unreachable!(),
    }
}

impl TestApp {
    /// Starts a service on a fresh temporary database.
    pub async fn spawn(extra: &[&str]) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("friendhook.db");
        let mut app = TestApp::spawn_on(&db_path, extra).await;
        app._dir = Some(dir);
        app
    }

    /// Starts a service on the given database file (kept after the service stops).
    pub async fn spawn_on(db_path: &std::path::Path, extra: &[&str]) -> TestApp {
        TestApp::spawn_on_with_clock(db_path, extra, friendhook::clock::system()).await
    }

    /// Starts a service on a fresh temporary database, with the given clock.
    pub async fn spawn_with_clock(extra: &[&str], clock: friendhook::clock::SharedClock) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut app = TestApp::spawn_on_with_clock(&dir.path().join("friendhook.db"), extra, clock).await;
        app._dir = Some(dir);
        app
    }

    /// Starts a service on the given database file with the given clock.
    pub async fn spawn_on_with_clock(
        db_path: &std::path::Path,
        extra: &[&str],
        clock: friendhook::clock::SharedClock,
    ) -> TestApp {
        let db_url = format!("sqlite://{}", db_path.display());
        let args = serve_args(&db_url, extra);
        let service = friendhook::commands::serve::build(&args, clock).await.expect("service starts");
        let addr = service.listener.local_addr().expect("addr");
        let mut service = service;
        let sandbox = service.sandbox.take();
        let reports = service.state.reports.clone();
        let easemob = service.state.easemob.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            let friendhook::commands::serve::Service { listener, router, limits, state, .. } = service;
            // As `serve` does on a signal: the stop's first step, before the listener closes.
            let (linger, grace) = (args.callback_linger, limits.shutdown_grace);
            friendhook::app::serve(
                listener,
                router,
                limits,
                async {
                    let _ = rx.await;
                    state.begin_stop();
                },
                friendhook::commands::serve::callbacks_to_come(&state, linger, grace),
            )
            .await
            .expect("serve");
            let store = state.store.clone();
            drop(state);
            store.close().await;
        });
        TestApp {
            addr,
            base: format!("http://{addr}"),
            db_path: db_path.to_path_buf(),
            db_url,
            // The server closes keep-alive connections that stay idle past --header-timeout (1 s
            // in the slow-loris test); a pooled connection reused at that instant fails with
            // IncompleteMessage. Dropping idle connections sooner than any server timeout used
            // in the tests avoids that race.
            client: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_millis(300))
                .build()
                .expect("http client"),
            sandbox,
            reports,
            easemob,
            shutdown: Some(tx),
            join: Some(join),
            _dir: None,
        }
    }

    /// Tells the service to stop, as a signal would, without waiting for it: `stop` then waits.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        self.begin_stop();
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.shutdown().await;
        }
        self._dir.take()
    }

    /// The built-in sandbox (sandbox mode only).
    pub fn sandbox(&self) -> &friendhook::sandbox::SandboxHandle {
        self.sandbox.as_ref().expect("sandbox mode")
    }

    /// Registers users in the sandbox through the real client.
    pub async fn register(&self, names: &[&str]) {
        let cfg = friendhook::easemob::ClientConfig::new(
            self.sandbox().base_url(),
            "demo-org",
            "demo-app",
            "sandbox-client-id",
            friendhook::secret::Secret::new("sandbox-client-secret"),
        );
        let client = friendhook::easemob::EasemobClient::new(cfg, friendhook::clock::system()).expect("client");
        for chunk in names.chunks(60) {
            let users: Vec<friendhook::easemob::NewUser> = chunk
                .iter()
                .map(|n| friendhook::easemob::NewUser {
                    username: n.to_string(),
                    password: "pw".into(),
                    nickname: None,
                })
                .collect();
            client.register_users(&users).await.expect("register users");
        }
    }

    /// Waits (bounded) until the sandbox has no callback delivery in flight.
    pub async fn settle(&self) {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.sandbox().wait_callbacks_settled())
            .await
            .expect("callbacks settle within 30 s");
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Posts `count` signed roster `add` callbacks from alice to u0, u1, ... (msg ids
    /// `<prefix>0`, `<prefix>1`, ..., timestamps a millisecond apart), each answered 200.
    pub async fn store_adds_from_alice(&self, msg_id_prefix: &str, count: i64) {
        for i in 0..count {
            let body = roster_body(
                &format!("{msg_id_prefix}{i}"),
                "alice",
                &format!("u{i}"),
                "add",
                1_700_000_000_000 + i,
                SECRET,
            );
            assert_eq!(self.post_callback(body).await.status(), 200);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs a callback body with the JSON content type.
    pub async fn post_callback(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url("/callbacks/easemob"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Scrapes `GET /metrics`: each sample (`name{labels}`) with its value.
    pub async fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let r = self.client.get(self.url("/metrics")).send().await.expect("request");
        assert_eq!(r.status(), 200);
        friendhook::metrics::parse_samples(&r.text().await.expect("metrics text"))
    }

    /// Starts `GET /v1/feed?after=0&wait=60s` on an empty feed and returns once the service is
    /// holding it (its long-poll gauge at 1).
    pub async fn waiting_long_poll(&self) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        let (client, url) = (self.client.clone(), self.url("/v1/feed?after=0&wait=60s"));
        let waiter = tokio::spawn(async move { client.get(url).send().await });
        while self.metrics().await.get("friendhook_feed_long_polls").copied() != Some(1.0) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        waiter
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A correctly signed roster callback body.
pub fn roster_body(msg_id: &str, from: &str, to: &str, operation: &str, timestamp: i64, secret: &str) -> String {
    let call_id = format!("{APPKEY}_{msg_id}");
    let security = friendhook::signature::easemob::sign(&call_id, secret, &timestamp.to_string());
    json!({
        "chat_type": "roster",
        "callId": call_id,
        "security": security,
        "payload": {"reason": "", "operation": operation},
        "host": "msync-api-01",
        "appkey": APPKEY,
        "from": format!("{APPKEY}_{from}@easemob.com"),
        "to": to,
        "eventType": "chat",
        "msg_id": msg_id,
        "timestamp": timestamp,
    })
    .to_string()
}

/// `serve` flags for a real-Easemob setup at `base` (a standalone sandbox) with the sandbox's
/// credentials.
pub fn real_easemob_args(base: &str) -> Vec<&str> {
    vec![
        "--easemob-base-url",
        base,
        "--easemob-org",
        "demo-org",
        "--easemob-app",
        "demo-app",
        "--easemob-client-id",
        "sandbox-client-id",
        "--easemob-client-secret",
        "sandbox-client-secret",
    ]
}

/// A client of the sandbox itself (not through the gate).
pub fn sandbox_client(sandbox: &friendhook::sandbox::SandboxHandle) -> friendhook::easemob::EasemobClient {
    friendhook::easemob::EasemobClient::new(
        friendhook::easemob::ClientConfig::new(
            sandbox.base_url(),
            "demo-org",
            "demo-app",
            "sandbox-client-id",
            friendhook::secret::Secret::new("sandbox-client-secret"),
        ),
        friendhook::clock::system(),
    )
    .unwrap()
}

/// Runs a service on `db` until alice has added bob (the call recorded, its callback stored),
/// then stops it: the database an upgrade test edits into an earlier release's. The call record.
pub async fn database_where_alice_added_bob(db: &std::path::Path) -> Value {
    let app = TestApp::spawn_on(db, &[]).await;
    app.register(&["alice", "bob"]).await;
    let (status, call) = app.post_json("/v1/friends", json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!((status, call["outcome"].as_str()), (201, Some("succeeded")), "{call}");
    app.settle().await;
    app.stop().await;
    call
}

/// A service with a zero match window whose sandbox drops every callback (and `extra` flags),
/// after one successful add alice → bob (returned): the test alone decides which callbacks
/// arrive.
pub async fn alice_added_bob_and_no_callback_came(extra: &[&str]) -> (TestApp, Value) {
    let args = [&["--match-window", "0s", "--sandbox-drop-rate", "1"], extra].concat();
    let app = TestApp::spawn(&args).await;
    app.register(&["alice", "bob"]).await;
    let (_, call) = app.post_json("/v1/friends", serde_json::json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(call["outcome"], "succeeded", "{call}");
    (app, call)
}
