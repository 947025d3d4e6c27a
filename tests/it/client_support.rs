//! Set-up shared by the client tests: a sandbox and a client on one manual clock. Used by
//! `tests/it/client.rs` and by `tests/client_logs.rs` (which needs a process of its own).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use friendhook::clock::{ManualClock, SharedClock};
use friendhook::easemob::{ClientConfig, EasemobClient, NewUser};
use friendhook::sandbox::{self, InjectedFault, SandboxConfig, SandboxHandle};
use tokio::net::TcpListener;

pub(crate) const START_MS: i64 = 1_700_000_000_000;

/// A sandbox with room for the functional tests: no rate limit unless a test asks for one (the
/// sandbox's window runs on the manual clock, where every request falls in the same second).
pub(crate) fn sandbox_config() -> SandboxConfig {
    SandboxConfig { rate_limit: 0, token_ttl_secs: 3_600, ..SandboxConfig::default() }
}

pub(crate) async fn start_sandbox(config: SandboxConfig, clock: SharedClock) -> SandboxHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
    sandbox::spawn(listener, config, clock).await.expect("sandbox starts")
}

/// Client settings matching the sandbox, with millisecond backoffs and a fixed jitter seed.
pub(crate) fn client_config(sandbox: &SandboxHandle, config: &SandboxConfig) -> ClientConfig {
    let mut client = ClientConfig::new(
        sandbox.base_url().to_string(),
        config.org.clone(),
        config.app.clone(),
        config.client_id.clone(),
        config.client_secret.clone(),
    );
    client.base_backoff = Duration::from_millis(1);
    client.max_backoff = Duration::from_millis(5);
    client.max_retry_time = Duration::from_secs(5);
    client.request_timeout = Duration::from_secs(5);
    client.jitter_seed = Some(7);
    client
}

/// A sandbox and a client sharing one manual clock.
pub(crate) struct Harness {
    pub(crate) sandbox: SandboxHandle,
    pub(crate) client: EasemobClient,
    pub(crate) clock: Arc<ManualClock>,
}

pub(crate) async fn harness_with(config: SandboxConfig, tune: impl FnOnce(&mut ClientConfig)) -> Harness {
    let clock = ManualClock::new(START_MS);
    let sandbox = start_sandbox(config.clone(), clock.clone()).await;
    let mut client_config = client_config(&sandbox, &config);
    tune(&mut client_config);
    let client = EasemobClient::new(client_config, clock.clone()).expect("client builds");
    Harness { sandbox, client, clock }
}

pub(crate) async fn harness() -> Harness {
    harness_with(sandbox_config(), |_| {}).await
}

pub(crate) fn user(name: &str) -> NewUser {
    NewUser { username: name.to_owned(), password: format!("{name}-password"), nickname: None }
}

pub(crate) async fn register(client: &EasemobClient, names: &[&str]) {
    let users: Vec<NewUser> = names.iter().map(|name| user(name)).collect();
    client.register_users(&users).await.expect("users register");
}

pub(crate) fn contacts_fault(status: u16, count: u32) -> InjectedFault {
    InjectedFault { status, count, path_contains: Some("/contacts/".to_owned()), error: None }
}

pub(crate) fn token_fault(status: u16, count: u32) -> InjectedFault {
    InjectedFault { status, count, path_contains: Some("/token".to_owned()), error: None }
}

/// The token endpoint refusing the credentials once, as after the client secret was changed.
pub(crate) fn token_refused_once() -> InjectedFault {
    InjectedFault { error: Some("invalid_grant".to_owned()), ..token_fault(400, 1) }
}
