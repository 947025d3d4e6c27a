//! The real `friendhook` binary as a child process, for the tests that need a process boundary:
//! signals (SIGTERM, SIGINT, SIGKILL), exit codes and everything the service prints.
//!
//! The child listens on port 0 for both the receiver and the sandbox and the helper learns the
//! ports from the start-up log, so no port is ever picked, released and hoped to stay free. Both
//! stdout and stderr are drained continuously (a full pipe would stall the child) into one buffer
//! that tests can search.

#![allow(dead_code)]

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::helpers::SECRET;

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_friendhook");

/// The sandbox's documented credentials.
pub const SANDBOX_CLIENT_ID: &str = "sandbox-client-id";
pub const SANDBOX_CLIENT_SECRET: &str = "sandbox-client-secret";

/// Generous bound for the child to open its database and start listening (a debug build on a
/// loaded 2-core CI box).
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running `friendhook serve`.
pub struct ServeProcess {
    child: tokio::process::Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT` of the receiver and the API.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the built-in sandbox.
    pub sandbox: String,
    log: Arc<Mutex<String>>,
    /// The tasks copying stdout and stderr into `log`; they end when the child's pipes close.
    drains: Vec<tokio::task::JoinHandle<()>>,
}

/// Removes ANSI colour sequences (`ESC [ ... letter`), so log lines can be matched as plain text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn drain(pipe: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log.lock().expect("log lock");
            log.push_str(&strip_ansi(&line));
            log.push('\n');
        }
    })
}

/// The value after `key=` on the first log line containing `marker`, up to whitespace.
fn field_after(log: &str, marker: &str, key: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let start = line.find(key)? + key.len();
    Some(line[start..].split_whitespace().next()?.trim_end_matches(',').to_string())
}

impl ServeProcess {
    /// Starts `friendhook serve` on `db_url` with the given extra flags and environment (and the
    /// test secret unless `extra` names one), and waits until it listens.
    pub async fn start(db_url: &str, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--sandbox-listen", "127.0.0.1:0", "--database-url", db_url]);
        if !extra.contains(&"--callback-secret") {
            cmd.args(["--callback-secret", SECRET]);
        }
        // A stop waits for no callbacks, unless the test is about that wait.
        if !extra.contains(&"--callback-linger") {
            cmd.args(["--callback-linger", "0s"]);
        }
        cmd.args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A failing test must not leave a service running.
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("start the friendhook binary");
        let pid = child.id().expect("child pid");
        let log = Arc::new(Mutex::new(String::new()));
        let drains = vec![
            drain(child.stdout.take().expect("stdout"), log.clone()),
            drain(child.stderr.take().expect("stderr"), log.clone()),
        ];

        let mut process = ServeProcess { child, pid, base: String::new(), sandbox: String::new(), log, drains };
        process.wait_for_log("friendhook is listening", START_WITHIN).await;
        let log = process.log();
        let receiver = field_after(&log, "friendhook is listening", "callbacks go to POST http://")
            .and_then(|s| s.strip_suffix("/callbacks/easemob").map(str::to_string))
            .unwrap_or_else(|| panic!("receiver address not found in the log:\n{log}"));
        process.base = format!("http://{receiver}");
        // With --easemob-base-url there is no sandbox of its own.
        if !extra.contains(&"--easemob-base-url") {
            process.sandbox = field_after(&log, "sandbox mode:", "sandbox=")
                .unwrap_or_else(|| panic!("sandbox address not found in the log:\n{log}"));
        }
        process
    }

    /// Everything the child printed so far (stdout and stderr, colours removed).
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the log contains `needle`; panics with the log if it does not within `within`
    /// or the child exits first.
    pub async fn wait_for_log(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last lines may still be in the pipes: read them to the end, then look again.
                self.join_drains(within).await;
                if self.log().contains(needle) {
                    return;
                }
                panic!("friendhook exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log within {within:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) through kill(1).
    pub fn signal(&self, name: &str) {
        let status =
            std::process::Command::new("kill").args(["-s", name, &self.pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -s {name} {} failed", self.pid);
    }

    /// Waits for the drain tasks to reach the end of both pipes (the child has exited).
    async fn join_drains(&mut self, within: Duration) {
        for drain in std::mem::take(&mut self.drains) {
            let _ = tokio::time::timeout(within, drain).await;
        }
    }

    /// SIGKILL, without waiting.
    pub fn kill_now(&mut self) {
        self.child.start_kill().expect("SIGKILL the child");
    }

    /// Waits for the child to exit; panics with the log if it is still running after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => {
                // Everything it printed, to the end of both pipes.
                self.join_drains(within).await;
                status.expect("wait for the child")
            }
            Err(_) => panic!("friendhook did not exit within {within:?}:\n{}", self.log()),
        }
    }
}

/// An app token from the sandbox's token endpoint, as any Easemob client would get one.
pub async fn sandbox_token(http: &reqwest::Client, sandbox: &str) -> String {
    let r = http
        .post(format!("{sandbox}/demo-org/demo-app/token"))
        .json(&json!({"grant_type": "client_credentials", "client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET}))
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), 200, "token request");
    let body: Value = r.json().await.expect("token body");
    body["access_token"].as_str().expect("access_token").to_string()
}

/// Registers users in the sandbox through its REST API (60 per request, Easemob's batch limit).
pub async fn sandbox_register(http: &reqwest::Client, sandbox: &str, token: &str, names: &[String]) {
    for chunk in names.chunks(60) {
        let users: Vec<Value> = chunk.iter().map(|n| json!({"username": n, "password": "pw"})).collect();
        let r = http
            .post(format!("{sandbox}/demo-org/demo-app/users"))
            .bearer_auth(token)
            .json(&users)
            .send()
            .await
            .expect("register request");
        assert_eq!(r.status(), 200, "register users: {}", r.text().await.unwrap_or_default());
    }
}

/// A reqwest client whose every request is bounded, so a wedged service fails a test instead of
/// hanging it.
pub fn bounded_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}
