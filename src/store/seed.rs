//! Bulk seeding of synthetic history, for the reconciliation and feed benchmarks only.
//!
//! Writes directly (not through the group-commit writer) in large transactions, but produces
//! exactly what the service would have stored, hash chain included, so `audit verify` passes on a
//! seeded database.

use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use super::chain::{self, CallContent, CallbackContent};
use super::{Store, StoreError};

/// Shape of the synthetic history.
#[derive(Debug, Clone, Copy)]
pub struct SeedSpec {
    /// Number of calls.
    pub calls: u64,
    /// Number of callbacks (matched ones first, the rest orphans).
    pub callbacks: u64,
    /// Time of the first call (epoch ms).
    pub start_ms: i64,
    /// Time between consecutive calls (ms).
    pub step_ms: i64,
}

impl Store {
    /// Seeds an empty database; calls `progress(rows_written)` now and then.
    pub async fn seed_bulk(&self, spec: SeedSpec, mut progress: impl FnMut(u64)) -> Result<(), StoreError> {
        let url = self.database_url.clone();
        // Bulk statements take seconds by design; sqlx would log each as a slow statement.
        let mut conn = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)?
            .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO)
            .connect()
            .await?;
        sqlx::query("PRAGMA synchronous = OFF").execute(&mut conn).await?;
        let mut prev = chain::GENESIS.to_string();
        let mut seq = 0i64;
        let mut written = 0u64;
        let mut matched_callbacks = 0u64;
        let chunk = 20_000u64;
        let mut i = 0u64;
        while i < spec.calls {
            let end = (i + chunk).min(spec.calls);
            let mut calls = Vec::with_capacity((end - i) as usize);
            let mut cbs = Vec::with_capacity((end - i) as usize);
            for n in i..end {
                let id = n as i64 + 1;
                let owner = format!("user{}", n % 50_000);
                let friend = format!("peer{}", (n * 7) % 49_999);
                let requested = spec.start_ms + n as i64 * spec.step_ms;
                let completed = requested + 40 + (n % 30) as i64;
                let outcome = match n % 100 {
                    0..=2 => "rejected",
                    3 | 4 => "failed",
                    _ => "succeeded",
                };
                let (status, error): (Option<i64>, Option<&str>) = match outcome {
                    "rejected" => (Some(403), Some("exceed_limit")),
                    "failed" => (None, Some("transport")),
                    _ => (Some(200), None),
                };
                seq += 1;
                let content = CallContent {
                    seq,
                    id,
                    op: "add",
                    owner: &owner,
                    friend: &friend,
                    idempotency_key: None,
                    requested_at_ms: requested,
                    completed_at_ms: completed,
                    outcome,
                    upstream_status: status,
                    upstream_error: error,
                    attempts: 1,
                    response_body: None,
                    outcome_detail: None,
                };
                let hash = chain::link(&prev, &content.canonical());
                calls.push(json!([
                    id,
                    "add",
                    owner,
                    friend,
                    super::writer::pair_key(&owner, &friend),
                    requested,
                    completed,
                    outcome,
                    status,
                    error,
                    1,
                    seq,
                    prev,
                    hash
                ]));
                prev = hash;
                // Most succeeded calls get their callback; every 50th is missing.
                if outcome == "succeeded" && n % 50 != 7 && matched_callbacks < spec.callbacks {
                    matched_callbacks += 1;
                    let ts = completed + 80 + (n % 200) as i64;
                    let (cb, h) = callback_row(&mut seq, &prev, n, &owner, &friend, ts, ts + 150);
                    cbs.push(cb);
                    prev = h;
                }
            }
            insert_chunk(&mut conn, calls, cbs).await?;
            written += end - i;
            progress(written);
            i = end;
        }
        // The remaining callbacks are orphans: friendships made outside friendhook.
        let mut n = 0u64;
        let orphans = spec.callbacks.saturating_sub(matched_callbacks);
        while n < orphans {
            let end = (n + chunk).min(orphans);
            let mut cbs = Vec::with_capacity((end - n) as usize);
            for k in n..end {
                let ts = spec.start_ms + (k as i64 * spec.step_ms * spec.calls as i64 / orphans.max(1) as i64);
                let (cb, h) = callback_row(
                    &mut seq,
                    &prev,
                    spec.calls + k,
                    &format!("app{}", k % 10_000),
                    &format!("other{}", k % 9_999),
                    ts,
                    ts + 200,
                );
                cbs.push(cb);
                prev = h;
            }
            insert_chunk(&mut conn, Vec::new(), cbs).await?;
            written += end - n;
            progress(written);
            n = end;
        }
        // What the writer does behind the commit, done once for the whole seed.
        super::writer::index_users(&mut conn, 0, seq).await?;
        sqlx::query("PRAGMA optimize").execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }
}

fn callback_row(seq: &mut i64, prev: &str, n: u64, from: &str, to: &str, ts: i64, received: i64) -> (Value, String) {
    *seq += 1;
    let appkey = "demo-org#demo-app";
    let msg_id = format!("{}", 1_100_000_000_000_000_000u64 + n);
    let call_id = format!("{appkey}_{msg_id}");
    let raw = json!({"chat_type":"roster","callId":call_id,"security":"0123456789abcdef0123456789abcdef",
        "payload":{"reason":"","operation":"add"},"host":"bench","appkey":appkey,
        "from":format!("{appkey}_{from}@easemob.com"),"to":to,"eventType":"chat","msg_id":msg_id,"timestamp":ts})
    .to_string();
    let body_sha = chain::sha256_hex(raw.as_bytes());
    let dedup = json!([call_id, "chat", to, "add"]).to_string();
    let content = CallbackContent {
        seq: *seq,
        dedup_key: &dedup,
        call_id: &call_id,
        msg_id: Some(&msg_id),
        appkey: Some(appkey),
        event_type: Some("chat"),
        chat_type: Some("roster"),
        operation: Some("add"),
        from_user: Some(from),
        to_user: Some(to),
        timestamp_ms: ts,
        received_at_ms: received,
        scheme: "easemob",
        secret_index: 0,
        body_sha256: &body_sha,
    };
    let hash = chain::link(prev, &content.canonical());
    let row = json!([
        *seq,
        dedup,
        call_id,
        msg_id,
        appkey,
        "chat",
        "roster",
        "add",
        from,
        to,
        super::writer::pair_key(from, to),
        ts,
        received,
        "easemob",
        0,
        raw,
        body_sha,
        prev,
        hash
    ]);
    (row, hash)
}

async fn insert_chunk(conn: &mut SqliteConnection, calls: Vec<Value>, cbs: Vec<Value>) -> Result<(), StoreError> {
    let mut tx = conn.begin().await?;
    if !calls.is_empty() {
        sqlx::query(
            "INSERT INTO calls (id, op, owner, friend, pair_key, requested_at_ms, completed_at_ms, outcome,
                                upstream_status, upstream_error, attempts, seq, prev_hash, chain_hash)
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
                    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13 FROM json_each(?1)",
        )
        .bind(Value::Array(calls).to_string())
        .execute(&mut *tx)
        .await?;
    }
    if !cbs.is_empty() {
        sqlx::query(
            "INSERT INTO callbacks (seq, dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation,
                                    from_user, to_user, pair_key, timestamp_ms, received_at_ms, scheme, secret_index,
                                    raw_body, body_sha256, prev_hash, chain_hash)
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
                    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14,
                    value->>15, value->>16, value->>17, value->>18 FROM json_each(?1)",
        )
        .bind(Value::Array(cbs).to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
