//! Roster callbacks: what the sandbox POSTs after a friend is added or removed, how it is signed,
//! which random faults it suffers, and the log of what happened to each one.
//!
//! Everything here except [`deliver`] is pure, so the wire format, the signature and the fault
//! draws are unit-tested without a network. Faults are drawn when a callback is generated, in
//! request order and under the state lock, from one seeded RNG: the same seed and the same
//! sequence of operations give the same drops, duplicates, bad signatures and delays, whatever
//! the network does later.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use md5::{Digest, Md5};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::config::SandboxConfig;
use super::exception_cache::Cached;
use super::state::{InFlightGuard, SandboxState};

/// How many callback records `GET /_sandbox/callbacks` keeps (the oldest are forgotten first), so
/// a long benchmark cannot grow the sandbox without bound. The counters in the stats are exact.
pub const MAX_RECORDED_CALLBACKS: usize = 100_000;

/// Smallest msg_id handed out: Easemob's ids are 18-19 digit numbers, and receivers may rely on
/// that shape even when a test clock starts at 0.
const MIN_MSG_ID: u64 = 100_000_000_000_000_000;

/// What happened to one generated callback, as `GET /_sandbox/callbacks` reports it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CallbackRecord {
    /// `{appkey}_{msg_id}`, as in the body.
    pub call_id: String,
    /// The event id, a numeric string.
    pub msg_id: String,
    /// The user the event is from (plain username, not the JID form of the body).
    pub from_user: String,
    /// The user the event is to.
    pub to_user: String,
    /// `payload.operation`: `add` or `remove`.
    pub operation: String,
    /// `pending` while in flight, then `delivered` (some attempt got a 200), `dropped` (never
    /// sent, by the drop fault), `failed` (every attempt failed) or `banned` (not sent: the
    /// callback rule was banned after 90 failures within 30 s); a failed or banned one delivered
    /// later from the exception cache becomes `redelivered`.
    pub fate: String,
    /// HTTP attempts made so far, retries and duplicate sends included.
    pub attempts: u32,
}

/// The two roster operations the sandbox's REST API causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RosterOperation {
    /// A friend was added (`POST .../contacts/users/{friend}`).
    Add,
    /// A friend was removed (`DELETE .../contacts/users/{friend}`).
    Remove,
}

impl RosterOperation {
    /// `payload.operation` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Remove => "remove",
        }
    }
}

/// One roster event to report: `from` did `operation` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterEvent {
    /// Acting user (plain username).
    pub from: String,
    /// Affected user (plain username).
    pub to: String,
    /// Added or removed.
    pub operation: RosterOperation,
    /// Version hash of `to`'s friend list after the change; carried by `remove` only.
    pub roster_ver: String,
}

/// The callback body, field for field and in the order of the reference's §8.4 example.
#[derive(Debug, Clone, Serialize)]
pub struct RosterCallback {
    /// Always `roster`.
    pub chat_type: &'static str,
    /// `{appkey}_{msg_id}`.
    #[serde(rename = "callId")]
    pub call_id: String,
    /// `md5Hex(callId + secret + timestamp)`.
    pub security: String,
    /// `{"reason":"","operation":"add"}` or `{"roster_ver":"...","operation":"remove"}`.
    pub payload: RosterPayload,
    /// Name of the sending server; opaque.
    pub host: &'static str,
    /// `org#app`.
    pub appkey: String,
    /// `{appkey}_{user}@easemob.com`.
    pub from: String,
    /// Plain username.
    pub to: String,
    /// Always `chat`.
    #[serde(rename = "eventType")]
    pub event_type: &'static str,
    /// Numeric string.
    pub msg_id: String,
    /// Ms since epoch when the operation completed (injected clock); signed.
    pub timestamp: i64,
}

/// The roster payload; its shape depends on the operation.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RosterPayload {
    /// `{"reason":"","operation":"add"}`: `reason` is the request message, empty for REST.
    Add { reason: String, operation: &'static str },
    /// `{"roster_ver":"<40 upper hex>","operation":"remove"}`.
    Remove { roster_ver: String, operation: &'static str },
}

/// Easemob's callback signature: md5 of the plain concatenation, 32 lowercase hex characters.
pub fn security(call_id: &str, secret: &str, timestamp: i64) -> String {
    let mut hasher = Md5::new();
    hasher.update(call_id.as_bytes());
    hasher.update(secret.as_bytes());
    hasher.update(timestamp.to_string().as_bytes());
    hex::encode(hasher.finalize())
}

/// The next event id: time-based like Easemob's (ms shifted left by 22 bits) so ids from a
/// restarted sandbox do not collide with earlier ones in a receiver's database, and strictly
/// increasing even when the clock stands still or goes back.
pub fn next_msg_id(last: u64, now_ms: i64) -> u64 {
    let from_clock = u64::try_from(now_ms).unwrap_or(0).saturating_mul(1 << 22);
    from_clock.max(last.saturating_add(1)).max(MIN_MSG_ID)
}

/// A friend-list version: 40 upper-case hex characters like Easemob's `roster_ver`, derived from
/// the user and the sorted friend list so equal lists give equal versions.
pub fn roster_ver<'a>(user: &str, friends: impl IntoIterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(user.as_bytes());
    for friend in friends {
        hasher.update(b"\n");
        hasher.update(friend.as_bytes());
    }
    hex::encode_upper(&hasher.finalize()[..20])
}

/// The random faults one callback suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDraw {
    /// Never sent.
    pub drop: bool,
    /// Sent twice with the same body.
    pub duplicate: bool,
    /// Signed with a wrong secret.
    pub bad_signature: bool,
    /// Wait this long before sending.
    pub delay_ms: u64,
}

/// Draws one callback's faults. Every decision consumes the RNG whatever the rates, so changing
/// one rate does not shift the other faults of the same seed.
pub fn draw_faults(rng: &mut StdRng, config: &SandboxConfig) -> FaultDraw {
    let drop = rng.random::<f64>() < config.drop_rate;
    let duplicate = rng.random::<f64>() < config.duplicate_rate;
    let bad_signature = rng.random::<f64>() < config.bad_signature_rate;
    let delay_ms = rng.random_range(0..=config.delay_ms);
    FaultDraw { drop, duplicate, bad_signature, delay_ms }
}

/// Builds the signed body for `event`.
pub fn build_callback(
    app_key: &str,
    msg_id: u64,
    event: &RosterEvent,
    signing_secret: &str,
    timestamp: i64,
) -> RosterCallback {
    let call_id = format!("{app_key}_{msg_id}");
    let payload = match event.operation {
        RosterOperation::Add => RosterPayload::Add { reason: String::new(), operation: "add" },
        RosterOperation::Remove => RosterPayload::Remove { roster_ver: event.roster_ver.clone(), operation: "remove" },
    };
    RosterCallback {
        chat_type: "roster",
        security: security(&call_id, signing_secret, timestamp),
        call_id,
        payload,
        host: "sandbox",
        appkey: app_key.to_owned(),
        from: format!("{app_key}_{}@easemob.com", event.from),
        to: event.to.clone(),
        event_type: "chat",
        msg_id: msg_id.to_string(),
        timestamp,
    }
}

/// A secret that is certainly not the configured one, for the bad-signature fault.
pub fn wrong_secret(secret: &str) -> String {
    format!("{secret}-not-the-secret")
}

/// Callback fates as stored in [`CallbackRecord::fate`].
pub mod fate {
    /// Generated, not yet finished.
    pub const PENDING: &str = "pending";
    /// Some attempt was answered 200.
    pub const DELIVERED: &str = "delivered";
    /// Never sent (drop fault).
    pub const DROPPED: &str = "dropped";
    /// Every attempt failed.
    pub const FAILED: &str = "failed";
    /// Never sent: the callback rule was banned when it was due.
    pub const BANNED: &str = "banned";
    /// Failed or banned, then delivered from the exception cache on request.
    pub const REDELIVERED: &str = "redelivered";
}

/// How a callback in flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Some attempt was answered 200.
    Delivered,
    /// Attempts were made; none was answered 200.
    Failed,
    /// No attempt was made: the rule was banned.
    Banned,
}

/// Records of generated callbacks (bounded) and exact counters.
#[derive(Debug, Default)]
pub struct CallbackLog {
    records: VecDeque<CallbackRecord>,
    /// Sequence number of `records[0]`.
    first_seq: u64,
    /// Delivered callbacks.
    pub sent: u64,
    /// Dropped callbacks.
    pub dropped: u64,
    /// Callbacks chosen to be sent twice.
    pub duplicated: u64,
    /// Failed callbacks.
    pub failed: u64,
    /// Callbacks not sent because the rule was banned.
    pub banned: u64,
    /// Callbacks still in flight.
    pub pending: u64,
    /// Failed or banned callbacks delivered later from the exception cache.
    pub redelivered: u64,
}

impl CallbackLog {
    /// Records a new callback and returns its sequence number.
    pub fn push(&mut self, record: CallbackRecord, duplicated: bool) -> u64 {
        match record.fate.as_str() {
            fate::DROPPED => self.dropped += 1,
            fate::FAILED => self.failed += 1,
            fate::DELIVERED => self.sent += 1,
            _ => self.pending += 1,
        }
        if duplicated {
            self.duplicated += 1;
        }
        let seq = self.first_seq + self.records.len() as u64;
        self.records.push_back(record);
        if self.records.len() > MAX_RECORDED_CALLBACKS {
            self.records.pop_front();
            self.first_seq += 1;
        }
        seq
    }

    fn record_mut(&mut self, seq: u64) -> Option<&mut CallbackRecord> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.records.get_mut(index)
    }

    /// Updates the attempt count of a callback in flight.
    pub fn set_attempts(&mut self, seq: u64, attempts: u32) {
        if let Some(record) = self.record_mut(seq) {
            record.attempts = attempts;
        }
    }

    /// Settles a pending callback. The counters move even when the record itself has already
    /// been forgotten.
    pub fn finish(&mut self, seq: u64, settled: Settled, attempts: u32) {
        self.pending = self.pending.saturating_sub(1);
        let fate = match settled {
            Settled::Delivered => {
                self.sent += 1;
                fate::DELIVERED
            }
            Settled::Failed => {
                self.failed += 1;
                fate::FAILED
            }
            Settled::Banned => {
                self.banned += 1;
                fate::BANNED
            }
        };
        if let Some(record) = self.record_mut(seq) {
            record.fate = fate.to_owned();
            record.attempts = attempts;
        }
    }

    /// A failed or banned callback got through on a re-send from the exception cache. Its first
    /// fate stays counted (that is how its first delivery ended); the record shows the last.
    pub fn redelivered(&mut self, seq: u64) {
        self.redelivered += 1;
        if let Some(record) = self.record_mut(seq) {
            record.fate = fate::REDELIVERED.to_owned();
            record.attempts += 1;
        }
    }

    /// All remembered records, oldest first.
    pub fn records(&self) -> Vec<CallbackRecord> {
        self.records.iter().cloned().collect()
    }
}

/// A callback that has been generated and must now be sent.
#[derive(Debug)]
pub struct Delivery {
    /// Its sequence number in the [`CallbackLog`].
    pub seq: u64,
    /// The exact bytes to POST (both sends of a duplicate use them).
    pub body: Bytes,
    /// Send a second time after the first send finishes.
    pub duplicate: bool,
    /// Wait before the first send.
    pub delay_ms: u64,
}

/// Sends one callback: optional delay, then one send (two for a duplicate), each with one
/// immediate retry on a failed attempt, as Easemob does; no attempt while the rule is banned.
/// The guard keeps the callback counted as in flight until this returns or the task is aborted.
pub async fn deliver(state: Arc<SandboxState>, delivery: Delivery, url: String, _in_flight: InFlightGuard) {
    if delivery.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delivery.delay_ms)).await;
    }
    let _turn = state.send_turn().await;
    let sends = if delivery.duplicate { 2 } else { 1 };
    let mut attempts = 0;
    let mut delivered = false;
    for _ in 0..sends {
        let sent = send_with_one_retry(&state, &url, &delivery.body, || {
            attempts += 1;
            state.set_callback_attempts(delivery.seq, attempts);
        })
        .await;
        match sent {
            Sent::Delivered => delivered = true,
            Sent::Failed => {}
            Sent::Banned => break,
        }
    }
    let settled = match (delivered, attempts) {
        (true, _) => Settled::Delivered,
        (false, 0) => Settled::Banned,
        (false, _) => Settled::Failed,
    };
    state.finish_callback(delivery.seq, settled, attempts, &delivery.body);
}

/// Sends a callback of the exception cache again (bucket starting at `bucket_start`): one send
/// with one immediate retry, like a first delivery; if neither gets through (or the rule is
/// banned), it goes back into its bucket.
pub async fn redeliver(
    state: Arc<SandboxState>,
    bucket_start: i64,
    item: Cached,
    url: String,
    _in_flight: InFlightGuard,
) {
    let _turn = state.send_turn().await;
    match send_with_one_retry(&state, &url, &item.body, || {}).await {
        Sent::Delivered => state.redelivered(item.seq),
        Sent::Failed | Sent::Banned => state.keep_again(bucket_start, item),
    }
}

/// How one send (an attempt and its retry) ended.
enum Sent {
    /// An attempt was answered 200.
    Delivered,
    /// Every attempt made failed.
    Failed,
    /// The rule was banned before an attempt was due (attempts before it may have failed).
    Banned,
}

/// One send as Easemob makes it: an attempt and, if it fails, one immediate retry, none while
/// the callback rule is banned; each failure counts towards a ban. `attempting` is called before
/// each attempt.
async fn send_with_one_retry(state: &SandboxState, url: &str, body: &Bytes, mut attempting: impl FnMut()) -> Sent {
    for _attempt_and_retry in 0..2 {
        if !state.callback_rule_may_send() {
            return Sent::Banned;
        }
        attempting();
        if post_once(state.http(), url, body.clone()).await {
            return Sent::Delivered;
        }
        state.callback_attempt_failed();
    }
    Sent::Failed
}

/// Longest reply Easemob accepts from a receiver; a longer one is a failed attempt.
const MAX_REPLY_BYTES: usize = 1_000;

/// One POST; only a 200 with a reply of at most [`MAX_REPLY_BYTES`] counts as success, as in
/// Easemob's rules.
async fn post_once(http: &reqwest::Client, url: &str, body: Bytes) -> bool {
    let response = http.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body).send().await;
    match response {
        Ok(mut response) if response.status() == reqwest::StatusCode::OK => {
            // Read no further than one byte past the limit.
            let mut reply = 0;
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        reply += chunk.len();
                        if reply > MAX_REPLY_BYTES {
                            tracing::debug!("callback receiver's reply is over 1,000 bytes: a failed attempt");
                            return false;
                        }
                    }
                    Ok(None) => return true,
                    Err(error) => {
                        tracing::debug!(%error, "callback receiver's reply was cut short");
                        return false;
                    }
                }
            }
        }
        Ok(response) => {
            tracing::debug!(status = %response.status(), "callback receiver answered non-200");
            false
        }
        Err(error) => {
            tracing::debug!(%error, "callback delivery failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn security_matches_the_reference_vector() {
        assert_eq!(
            security("demo-org#demo-app_966725899779049516", "test-secret", 1_642_648_213_494),
            "bac67bdb1f935f86b3eaa30286975387"
        );
    }

    #[test]
    fn an_add_callback_has_the_documented_fields() {
        let event = RosterEvent {
            from: "alice".into(),
            to: "bob".into(),
            operation: RosterOperation::Add,
            roster_ver: String::new(),
        };
        let body = build_callback("demo-org#demo-app", 1_187_654_321_098_765_432, &event, "s", 1_700_000_000_123);
        let value = serde_json::to_value(&body).expect("serialises");
        assert_eq!(
            value,
            serde_json::json!({
                "chat_type": "roster",
                "callId": "demo-org#demo-app_1187654321098765432",
                "security": security("demo-org#demo-app_1187654321098765432", "s", 1_700_000_000_123),
                "payload": {"reason": "", "operation": "add"},
                "host": "sandbox",
                "appkey": "demo-org#demo-app",
                "from": "demo-org#demo-app_alice@easemob.com",
                "to": "bob",
                "eventType": "chat",
                "msg_id": "1187654321098765432",
                "timestamp": 1_700_000_000_123_i64
            })
        );
    }

    #[test]
    fn a_remove_callback_carries_a_roster_version() {
        let event = RosterEvent {
            from: "alice".into(),
            to: "bob".into(),
            operation: RosterOperation::Remove,
            roster_ver: roster_ver("bob", ["carol"]),
        };
        let value = serde_json::to_value(build_callback("o#a", MIN_MSG_ID, &event, "s", 1)).expect("serialises");
        assert_eq!(value["payload"]["operation"], "remove");
        let version = value["payload"]["roster_ver"].as_str().expect("string");
        assert_eq!(version.len(), 40);
        assert!(version.chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
    }

    #[test]
    fn roster_versions_follow_the_list_not_the_time() {
        assert_eq!(roster_ver("bob", ["a", "c"]), roster_ver("bob", ["a", "c"]));
        assert_ne!(roster_ver("bob", ["a", "c"]), roster_ver("bob", ["a"]));
        assert_ne!(roster_ver("bob", []), roster_ver("ann", []));
    }

    #[test]
    fn msg_ids_are_long_numbers_that_always_increase() {
        let first = next_msg_id(0, 0);
        assert!(first.to_string().len() >= 18);
        let frozen = next_msg_id(first, 0);
        assert!(frozen > first);
        let real = next_msg_id(frozen, 1_700_000_000_000);
        assert!(real > frozen);
        assert!(next_msg_id(real, 1_000) > real, "a clock going back never repeats an id");
    }

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let config = SandboxConfig {
            drop_rate: 0.5,
            duplicate_rate: 0.5,
            bad_signature_rate: 0.5,
            delay_ms: 100,
            ..SandboxConfig::default()
        };
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50).map(|_| draw_faults(&mut rng, &config)).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(draws(7).iter().any(|d| d.drop) && draws(7).iter().any(|d| !d.drop));
        assert!(draws(7).iter().all(|d| d.delay_ms <= 100));
    }

    #[test]
    fn rates_of_zero_and_one_are_never_and_always() {
        let mut rng = StdRng::seed_from_u64(1);
        let never = SandboxConfig::default();
        let always =
            SandboxConfig { drop_rate: 1.0, duplicate_rate: 1.0, bad_signature_rate: 1.0, ..SandboxConfig::default() };
        for _ in 0..100 {
            let draw = draw_faults(&mut rng, &never);
            assert_eq!(draw, FaultDraw { drop: false, duplicate: false, bad_signature: false, delay_ms: 0 });
            let draw = draw_faults(&mut rng, &always);
            assert!(draw.drop && draw.duplicate && draw.bad_signature);
        }
    }

    fn record(fate: &str) -> CallbackRecord {
        CallbackRecord {
            call_id: "c".into(),
            msg_id: "1".into(),
            from_user: "a".into(),
            to_user: "b".into(),
            operation: "add".into(),
            fate: fate.into(),
            attempts: 0,
        }
    }

    #[test]
    fn the_log_counts_every_fate_once() {
        let mut log = CallbackLog::default();
        let first = log.push(record(fate::PENDING), true);
        let second = log.push(record(fate::PENDING), false);
        log.push(record(fate::DROPPED), false);
        assert_eq!((log.pending, log.dropped, log.duplicated), (2, 1, 1));
        log.finish(first, Settled::Delivered, 2);
        log.finish(second, Settled::Failed, 2);
        assert_eq!((log.pending, log.sent, log.failed), (0, 1, 1));
        let fates: Vec<String> = log.records().into_iter().map(|r| r.fate).collect();
        assert_eq!(fates, ["delivered", "failed", "dropped"]);
    }

    #[test]
    fn the_log_forgets_the_oldest_records_but_keeps_counting() {
        let mut log = CallbackLog::default();
        let first = log.push(record(fate::PENDING), false);
        for _ in 0..MAX_RECORDED_CALLBACKS {
            log.push(record(fate::DROPPED), false);
        }
        log.finish(first, Settled::Delivered, 1);
        assert_eq!(log.records().len(), MAX_RECORDED_CALLBACKS);
        assert_eq!(log.sent, 1);
        assert_eq!(log.pending, 0);
    }
}
