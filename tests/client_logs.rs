//! The client's log lines, captured by a thread-local tracing subscriber.
//!
//! A process of its own: tracing caches, per call site, whether any subscriber is interested,
//! and in a test binary whose other tests hit the same call sites on other threads at the same
//! moment, that cache can drop this test's debug events. Alone here, nothing races it.

#![allow(clippy::unwrap_used)]

#[path = "it/client_support.rs"]
mod client_support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use client_support::*;
use friendhook::easemob::{ClientConfig, EasemobClient};
use friendhook::secret::Secret;

/// Collects everything written by a tracing subscriber.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }
}

#[tokio::test]
async fn logs_show_attempts_and_retries_but_never_the_secret_or_token() {
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime is single-threaded, so a thread-local default sees every event.
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = harness().await;
    register(&h.client, &["alice", "bob"]).await;
    h.sandbox.inject_faults(contacts_fault(401, 1));
    h.sandbox.inject_faults(contacts_fault(429, 1));
    h.client.add_friend("alice", "bob").await.expect("added");
    let wrong = EasemobClient::new(
        ClientConfig { client_secret: Secret::new("wrong-secret"), ..client_config(&h.sandbox, &sandbox_config()) },
        h.clock.clone(),
    )
    .expect("client");
    wrong.get_user("alice").await.expect_err("no token");

    let text = log.text();
    assert!(text.contains("retrying"), "{text}");
    assert!(text.contains("attempt=3"), "{text}");
    assert!(!text.contains("sandbox-client-secret"), "{text}");
    assert!(!text.contains("wrong-secret"), "{text}");
    assert!(!text.contains("Bearer"), "{text}");
    // The client's own Debug output is just as discreet.
    let debug = format!("{:?}", h.client);
    assert!(!debug.contains("sandbox-client-secret"), "{debug}");
}
