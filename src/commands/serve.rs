//! `friendhook serve`: open the store, build the verifier, start the sandbox if no real Easemob is
//! configured, and serve HTTP until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::app::{self, AppState, ServerLimits, Settings};
use crate::clock::{self, SharedClock};
use crate::config::ServeArgs;
use crate::easemob::{ClientConfig, EasemobClient};
use crate::http::journal::ReportGate;
use crate::metrics::{LogThrottle, Metrics, WriterMetrics};
use crate::model::Outcome;
use crate::report::TrailingReconciliation;
use crate::secret::Secret;
use crate::signature::{Scheme, Verifier};
use crate::store::{Store, StoreOptions, WriterLimits};

/// Everything `serve` starts, bound and ready; `run` serves it.
pub struct Service {
    /// The receiver's listener.
    pub listener: TcpListener,
    /// The router with all state.
    pub router: axum::Router,
    /// Server limits.
    pub limits: ServerLimits,
    /// Shared state (tests inspect the store through it).
    pub state: Arc<AppState>,
    /// The built-in sandbox, when no real Easemob is configured.
    pub sandbox: Option<crate::sandbox::SandboxHandle>,
}

/// Store options from the serve flags; the writer records its batches in `metrics`.
pub fn store_options(args: &ServeArgs, metrics: WriterMetrics) -> StoreOptions {
    StoreOptions {
        database_url: args.db.database_url.clone(),
        synchronous: args.db.sqlite_synchronous,
        write_queue: args.write_queue,
        limits: WriterLimits {
            max_batch: args.max_batch.max(1),
            rejection_cap: args.rejection_log_cap,
            quarantine_cap: args.quarantine_cap,
        },
        read_connections: 4,
        busy_timeout: args.db.sqlite_busy_timeout,
        recover_interrupted_calls: true,
        instance_lock: true,
        metrics,
        accept_journal_cut: args.accept_journal_cut,
    }
}

fn generated_secret() -> Secret {
    let bytes: [u8; 16] = rand::random();
    Secret::new(hex::encode(bytes))
}

fn client_config(
    args: &ServeArgs,
    base_url: String,
    org: String,
    app: String,
    client_id: String,
    secret: Secret,
) -> ClientConfig {
    let mut cfg = ClientConfig::new(base_url, org, app, client_id, secret);
    cfg.rate_limit_per_sec = args.easemob.easemob_rate_limit;
    cfg.max_attempts = args.easemob.easemob_max_attempts;
    cfg.max_retry_time = args.easemob.easemob_max_retry_time;
    cfg.request_timeout = args.easemob.easemob_request_timeout;
    // The connection is part of the exchange: its own limit can only be shorter.
    cfg.connect_timeout = cfg.connect_timeout.min(cfg.request_timeout);
    cfg
}

fn real_client(args: &ServeArgs, base: &str, clock: SharedClock) -> anyhow::Result<EasemobClient> {
    let e = &args.easemob;
    // Unset or empty alike: an empty variable is what an environment file with `EASEMOB_ORG=` gives.
    let required = |value: Option<&str>, what: &str, flag: &str| match value {
        Some(v) if !v.is_empty() => Ok(()),
        Some(_) => Err(anyhow::anyhow!("{flag} is empty; --easemob-base-url is set, so {what} is required")),
        None => Err(anyhow::anyhow!("--easemob-base-url is set, so {what} is required: pass {flag}")),
    };
    required(e.easemob_org.as_deref(), "the org", "--easemob-org (EASEMOB_ORG)")?;
    required(e.easemob_app.as_deref(), "the app", "--easemob-app (EASEMOB_APP)")?;
    required(e.easemob_client_id.as_deref(), "the client id", "--easemob-client-id (EASEMOB_CLIENT_ID)")?;
    required(
        e.easemob_client_secret.as_ref().map(Secret::expose),
        "the client secret",
        "--easemob-client-secret (EASEMOB_CLIENT_SECRET)",
    )?;
    let (org, app, id, secret) = (
        e.easemob_org.clone().unwrap_or_default(),
        e.easemob_app.clone().unwrap_or_default(),
        e.easemob_client_id.clone().unwrap_or_default(),
        e.easemob_client_secret.clone().unwrap_or_else(|| Secret::new("")),
    );
    let cfg = client_config(args, base.to_string(), org, app, id, secret);
    EasemobClient::new(cfg, clock).context("could not build the Easemob client")
}

/// Starts the built-in sandbox as Easemob: its callbacks go to this receiver, signed with the
/// receiver's first secret; the client talks to it with the sandbox's documented credentials.
async fn start_sandbox(
    args: &ServeArgs,
    listener: TcpListener,
    receiver: std::net::SocketAddr,
    secret: Secret,
    clock: SharedClock,
) -> anyhow::Result<(EasemobClient, crate::sandbox::SandboxHandle)> {
    let config = crate::sandbox::SandboxConfig {
        callback_url: Some(format!("http://{receiver}/callbacks/easemob")),
        callback_secret: Some(secret),
        rate_limit: args.easemob.sandbox_rate_limit,
        friend_limit: args.easemob.sandbox_friend_limit,
        drop_rate: args.easemob.sandbox_drop_rate,
        duplicate_rate: args.easemob.sandbox_duplicate_rate,
        delay_ms: args.easemob.sandbox_delay_ms,
        callbacks_per_add: args.easemob.sandbox_callbacks_per_add,
        bad_signature_rate: args.easemob.sandbox_bad_signature_rate,
        seed: args.easemob.sandbox_seed,
        ..crate::sandbox::SandboxConfig::default()
    };
    if args.signature_scheme != Scheme::Easemob {
        tracing::warn!(
            "the sandbox signs callbacks with Easemob's scheme; with --signature-scheme standard-webhooks they will be rejected"
        );
    }
    let (org, app, id, client_secret) =
        (config.org.clone(), config.app.clone(), config.client_id.clone(), config.client_secret.clone());
    let sandbox = crate::sandbox::spawn(listener, config, clock.clone()).await?;
    tracing::info!(
        sandbox = %sandbox.base_url(), org = %org, app = %app, client_id = %id,
        callback_url = %format!("http://{receiver}/callbacks/easemob"),
        "sandbox mode: no --easemob-base-url, so the built-in Easemob sandbox plays Easemob"
    );
    let cfg = client_config(args, sandbox.base_url(), org, app, id, client_secret);
    let client = EasemobClient::new(cfg, clock).context("could not build the Easemob client")?;
    Ok((client, sandbox))
}

/// The address the sandbox's callbacks come from: it posts to the receiver's own address, so the
/// kernel picks that address as the source, or loopback for a listener on every address.
fn sandbox_callback_source(receiver: std::net::SocketAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match receiver.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// What plays Easemob, ready before the database is opened.
enum Upstream {
    /// Real Easemob, through this client.
    Real(EasemobClient),
    /// The built-in sandbox, to be started on this listener.
    Sandbox(TcpListener),
}

/// Refuses Easemob settings that would silently do something else than meant.
fn check_easemob_settings(args: &ServeArgs) -> anyhow::Result<()> {
    let e = &args.easemob;
    match e.easemob_base_url.as_deref().map(str::trim) {
        Some("") => bail!(
            "--easemob-base-url (EASEMOB_BASE_URL) is empty: give Easemob's REST host (e.g. https://a1.easemob.com), \
             or unset it to run with the built-in sandbox"
        ),
        Some(_) => Ok(()),
        None => {
            let given: Vec<&str> = [
                (e.easemob_org.is_some(), "--easemob-org"),
                (e.easemob_app.is_some(), "--easemob-app"),
                (e.easemob_client_id.is_some(), "--easemob-client-id"),
                (e.easemob_client_secret.is_some(), "--easemob-client-secret"),
            ]
            .into_iter()
            .filter_map(|(set, flag)| set.then_some(flag))
            .collect();
            if given.is_empty() {
                return Ok(());
            }
            bail!(
                "{} given but no --easemob-base-url (EASEMOB_BASE_URL): without it friendhook would run with its \
                 built-in sandbox and ignore them. Give the base URL of your Easemob data centre (e.g. \
                 https://a1.easemob.com), or unset them for sandbox mode",
                given.join(", ")
            )
        }
    }
}

/// Binds the listener and builds every part, without serving yet.
///
/// Everything that can be refused is checked, and both ports are bound, before the database is
/// opened: opening it as the service closes calls a previous run left in flight, which must not
/// happen for a start that then fails.
pub async fn build(args: &ServeArgs, clock: SharedClock) -> anyhow::Result<Service> {
    // An empty token would let `Authorization: Bearer ` through: refuse it rather than guess
    // whether the operator meant "no tokens" or mistyped one.
    if args.api_token.iter().any(|t| t.expose().trim().is_empty()) {
        bail!(
            "--api-token (FRIENDHOOK_API_TOKEN) contains an empty token; give non-empty tokens, or unset it to leave /v1 open"
        );
    }
    check_easemob_settings(args)?;
    if args.request_timeout <= args.db.sqlite_busy_timeout {
        bail!(
            "--request-timeout ({}) must be longer than --sqlite-busy-timeout ({}): a callback waiting on a locked \
             database should be answered 503 with Retry-After when the wait gives up, not cut off with 408 first",
            humantime::format_duration(args.request_timeout),
            humantime::format_duration(args.db.sqlite_busy_timeout)
        );
    }
    let sandbox_mode = args.easemob.easemob_base_url.is_none();
    if sandbox_mode && args.easemob.require_easemob {
        bail!(
            "--require-easemob (FRIENDHOOK_REQUIRE_EASEMOB) is set but no --easemob-base-url (EASEMOB_BASE_URL) is \
             given, so friendhook would send friend additions to its built-in sandbox instead of Easemob. Give \
             EASEMOB_BASE_URL, EASEMOB_ORG, EASEMOB_APP, EASEMOB_CLIENT_ID and EASEMOB_CLIENT_SECRET (was the \
             environment file loaded?), or unset --require-easemob to run the sandbox"
        );
    }
    if sandbox_mode && !args.listen.ip().is_loopback() {
        // A deployment whose environment file went missing starts here, and looks healthy.
        tracing::warn!(listen = %args.listen,
            "sandbox mode on an address other hosts can reach: friend additions go to the built-in sandbox, \
             not to Easemob. If this is a deployment, give EASEMOB_BASE_URL and the credentials; \
             FRIENDHOOK_REQUIRE_EASEMOB=true makes a start without them fail instead");
    }
    if args.api_token.is_empty() && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen,
            "no --api-token (FRIENDHOOK_API_TOKEN): the /v1 API (triggers, history, reconciliation) is open to \
             whoever reaches this address; set tokens, or listen on 127.0.0.1 behind a proxy that checks them");
    }
    for (unknown, meant) in crate::config::unknown_env_vars(std::env::vars_os().map(|(name, _)| name)) {
        match meant {
            Some(meant) => {
                tracing::warn!("{unknown} is set, but friendhook reads no such variable: did you mean {meant}?")
            }
            None => tracing::warn!("{unknown} is set, but friendhook reads no such variable"),
        }
    }
    let mut secrets = crate::config::callback_secrets(&args.callback_secret);
    if secrets.is_empty() {
        if sandbox_mode && args.signature_scheme == Scheme::Easemob {
            secrets.push(generated_secret());
            if args.callback_secret.is_empty() {
                tracing::info!("no --callback-secret given: generated one for the built-in sandbox (not shown)");
            } else {
                // Given, but empty (`FRIENDHOOK_CALLBACK_SECRET=` from an unset variable, say):
                // fine for the sandbox, which signs with whatever this is, but worth a word.
                tracing::warn!(
                    "--callback-secret (or FRIENDHOOK_CALLBACK_SECRET) is set but empty: generated one for the built-in sandbox (not shown); with real Easemob an empty secret is refused"
                );
            }
        } else {
            bail!(
                "no callback secret: pass --callback-secret (or FRIENDHOOK_CALLBACK_SECRET) with the secret of your \
                 Easemob callback rule (standard-webhooks: whsec_<base64>)"
            );
        }
    }
    let verifier_first_secret = secrets[0].clone();
    let verifier = Verifier::new(args.signature_scheme, secrets, args.timestamp_tolerance.as_secs() as i64)
        .context("invalid --callback-secret")?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!("could not listen on {} (is another friendhook running? try --listen)", args.listen)
    })?;
    if args.easemob.easemob_base_url.is_some() {
        warn_of_settings_real_mode_ignores(&args.easemob);
    }
    let upstream = match &args.easemob.easemob_base_url {
        Some(base) => Upstream::Real(real_client(args, base.trim(), clock.clone())?),
        None => Upstream::Sandbox(TcpListener::bind(args.easemob.sandbox_listen).await.with_context(|| {
            format!("could not start the sandbox on {} (try --sandbox-listen)", args.easemob.sandbox_listen)
        })?),
    };
    let trailing =
        (!args.metrics_reconcile_window.is_zero()).then(|| TrailingReconciliation::new(args.metrics_reconcile_window));
    let metrics = if trailing.is_some() { Metrics::default().with_reconciliation() } else { Metrics::default() };
    let store = match Store::open(store_options(args, metrics.writer()), clock.clone()).await {
        Ok(store) => store,
        Err(err) if err.names_the_database() => return Err(err.into()),
        Err(err) if err.is_read_only() => {
            return Err(anyhow::Error::new(err).context(format!(
                "could not open the database {} for writing: make the file, its -wal and -shm files and their \
                 directory writable by this user (SQLite creates files beside the database)",
                args.db.database_url
            )));
        }
        Err(err) if crate::store::is_full(crate::store::disk_free_bytes(&args.db.database_url)) => {
            return Err(anyhow::Error::new(err).context(format!(
                "could not open the database {}: the file system holding it is full (SQLite needs room for its -wal \
                 and -shm files); free some space and start again",
                args.db.database_url
            )));
        }
        Err(err) => {
            return Err(
                anyhow::Error::new(err).context(format!("could not open the database {}", args.db.database_url))
            );
        }
    };
    // Not a refusal: callbacks would be lost while the service stays down. Loud, though. One read
    // of the schema for both checks.
    match store.schema_unlike_migrations().await {
        Ok((guards, indexes)) => {
            if !guards.is_empty() {
                tracing::error!(
                    triggers = %guards.join(", "),
                    "the database's append-only triggers were dropped, redefined or added outside friendhook, so stored records can be deleted \
                     or rewritten without an error; run `friendhook audit verify` on this file and find out who changed it"
                );
            }
            // A missing index fails reconciliation, a unique one added by hand refuses events
            // (503s that Easemob drops after its retry).
            if !indexes.is_empty() {
                tracing::error!(
                    indexes = %indexes.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", "),
                    "the database's indexes differ from friendhook's (changed outside friendhook); `friendhook audit verify` \
                     prints the one-line SQL that puts them back, to run with the service stopped"
                );
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not compare the database's triggers and indexes with friendhook's")
        }
    }
    let settings = Settings {
        max_body_bytes: args.max_body_bytes,
        on_bad_signature: args.on_bad_signature,
        allow_from: crate::config::networks(&args.allow_from),
        trusted_proxies: crate::config::networks(&args.trusted_proxy),
        match_skew_ms: args.match_skew.as_millis() as i64,
        match_window_ms: args.match_window.as_millis() as i64,
        commit_timeout: app::commit_timeout(args.request_timeout),
    };
    // `10.0.0.1/8` means 10.0.0.0/8 to ipnet, which may not be what was meant (the address alone?).
    for (flag, nets) in [("--allow-from", &settings.allow_from), ("--trusted-proxy", &settings.trusted_proxies)] {
        for net in nets.iter().filter(|net| net.trunc() != **net) {
            tracing::warn!(
                "{flag} {net} has host bits set, so it is taken as the whole network {}; write that, or the \
                 address alone ({}), to say which you mean",
                net.trunc(),
                net.addr()
            );
        }
    }
    let receiver_addr = listener.local_addr()?;
    let (easemob, sandbox) = match upstream {
        Upstream::Real(client) => (client, None),
        Upstream::Sandbox(sandbox_listener) => {
            let sandbox_source = sandbox_callback_source(receiver_addr);
            if !settings.allow_from.is_empty() && !settings.allow_from.iter().any(|net| net.contains(&sandbox_source)) {
                tracing::warn!(
                    allow_from = %settings.allow_from.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    sandbox_source = %sandbox_source,
                    "the sandbox posts its callbacks from {sandbox_source}, which --allow-from does not cover: each will \
                     be answered 403 and every call will end up `missing`; add {sandbox_source} to --allow-from, or \
                     leave it unset while the sandbox plays Easemob"
                );
            }
            let (client, sandbox) =
                start_sandbox(args, sandbox_listener, receiver_addr, verifier_first_secret.clone(), clock.clone())
                    .await?;
            (client, Some(sandbox))
        }
    };
    let easemob = Some(easemob);
    for (op, n) in store.recovered_calls.unknown.by_op() {
        metrics.calls_interrupted(op, Outcome::Unknown, n);
    }
    for (op, n) in store.recovered_calls.not_sent.by_op() {
        metrics.calls_interrupted(op, Outcome::Failed, n);
    }
    let state = Arc::new(AppState {
        store,
        verifier,
        clock,
        settings,
        metrics,
        easemob,
        overloads: LogThrottle::new(10_000),
        commit_timeouts: LogThrottle::new(10_000),
        bad_signatures: LogThrottle::new(10_000),
        quarantine_full: LogThrottle::new(10_000),
        unreadable_callbacks: LogThrottle::new(10_000),
        trailing,
        write_probe: Default::default(),
        // Half the request deadline: a report that starts later would risk running into it.
        reports: Arc::new(ReportGate::new(args.request_timeout / 2)),
        stopping: Default::default(),
    });
    let limits = ServerLimits {
        max_in_flight: args.max_in_flight.max(1),
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        request_timeout: args.request_timeout,
        trigger_timeout: args.trigger_timeout,
        shutdown_grace: args.shutdown_grace,
    };
    let router = app::router(state.clone(), &limits, args.api_token.clone());
    Ok(Service { listener, router, limits, state, sandbox })
}

/// How long start-up waits for Easemob's first app token.
const CREDENTIALS_CHECK: Duration = Duration::from_secs(5);

/// Asks Easemob for an app token at start-up, so that wrong credentials or a wrong host show in
/// the log now rather than as 503s on the first trigger. Only logged: Easemob may be briefly
/// unreachable. A slow answer is warned of after [`CREDENTIALS_CHECK`] and still waited for: the
/// fetch goes on (dropped, it would be cancelled, and the first trigger would start another).
async fn check_credentials(base: &str, client: &EasemobClient) {
    let app_key = client.app_key();
    let fetch = client.ensure_token();
    tokio::pin!(fetch);
    let answer = match tokio::time::timeout(CREDENTIALS_CHECK, &mut fetch).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(
                easemob = base,
                app_key,
                "Easemob's token endpoint did not answer within 5 s; triggers wait for it (check \
                 --easemob-base-url and the network)"
            );
            fetch.await
        }
    };
    match answer {
        Ok(()) => tracing::info!(easemob = base, app_key, "Easemob gave an app token: the credentials work"),
        Err(failure) => tracing::warn!(easemob = base, app_key, error = %failure,
            "Easemob gave no app token; triggers are answered 503 easemob_token_unavailable until it does"),
    }
}

/// Free space under which start-up warns: the WAL's 64 MiB and some 200,000 small callbacks
/// (about 1 KB each with their indexes).
const LOW_DISK_BYTES: u64 = 256 << 20;

/// Signals this close together are one stop, sent twice (see `run`).
const SAME_STOP: Duration = Duration::from_secs(1);

/// What a stopping service waits for before it closes its listener: the callbacks of the calls
/// it made to Easemob until `linger` after the last one ended (see
/// [`EasemobClient::callbacks_settled`]), for at most half the grace, so that the requests still
/// running get the other half. Nothing to wait for when no call was made lately, or with no
/// Easemob client.
pub async fn callbacks_to_come(state: &AppState, linger: Duration, grace: Duration) {
    let Some(client) = state.easemob.as_ref() else { return };
    let settled = client.callbacks_settled(linger);
    tokio::pin!(settled);
    // Said only when there is something to wait for.
    if futures_util::FutureExt::now_or_never(settled.as_mut()).is_some() {
        return;
    }
    tracing::info!(
        "stopping: still receiving callbacks, until {} after the last call made to Easemob ends (at most {})",
        humantime::format_duration(linger),
        humantime::format_duration(grace / 2)
    );
    if tokio::time::timeout(grace / 2, settled).await.is_err() {
        tracing::warn!(
            "stopping: calls to Easemob still running after half the shutdown grace; callbacks that come after \
             the listener closes are retried once by Easemob, then dropped (see the exception cache)"
        );
    }
}

/// `friendhook serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let service = build(&args, clock::system()).await?;
    let addr = service.listener.local_addr()?;
    // Before the line that says the service listens: see `StopSignals`.
    let mut signals = app::StopSignals::listen()?;
    tracing::info!(%addr, database = %args.db.database_url, scheme = args.signature_scheme.as_str(),
        version = env!("CARGO_PKG_VERSION"), commit = crate::COMMIT,
        "friendhook is listening; callbacks go to POST http://{addr}/callbacks/easemob");
    let Service { listener, router, limits, state, sandbox } = service;
    // SQLite opens a file it may not write read-only without a word, and a disk can be full:
    // say so at start-up, not at the first callback. Not a refusal (a write lock held a while
    // by `quarantine reverify` fails the probe too), and in the background, so a busy lock does
    // not hold the start.
    tokio::spawn({
        let store = state.store.clone();
        let database = args.db.database_url.clone();
        async move {
            // The probe below commits on a full disk (a checkpointed WAL is rewritten in place),
            // so the free space is looked at on its own.
            match store.disk_free_bytes() {
                free if crate::store::is_full(free) => tracing::error!(
                    database,
                    free_bytes = free,
                    "the database's file system is full: callbacks are answered 503 storage_unavailable as soon as a \
                     commit needs a new page; free some space"
                ),
                Some(free) if free < LOW_DISK_BYTES => tracing::warn!(
                    database,
                    free_bytes = free,
                    "the database's file system has little space left: once it is full every callback is answered 503 \
                     (friendhook_disk_free_bytes shows it)"
                ),
                _ => {}
            }
            if let Err(err) = store.probe_write().await {
                let advice = if err.is_read_only() {
                    "make the file, its -wal and -shm files and their directory writable by this user"
                } else {
                    "check the disk's free space and whether another process holds the database's write lock"
                };
                tracing::error!(database, error = %err,
                    "the database cannot be written: every callback is answered 503 storage_unavailable until it can; {advice}");
            }
        }
    });
    if let (Some(base), Some(client)) = (args.easemob.easemob_base_url.clone(), state.easemob.clone()) {
        // Beside the service, not before it: callbacks are received whatever Easemob answers.
        tokio::spawn(async move { check_credentials(&base, &client).await });
    }
    // One grace for the whole stop: the sandbox gets what the receiver left of it, so a client
    // stalled on either port cannot hold the exit much past --shutdown-grace.
    let signalled = std::sync::OnceLock::<Instant>::new();
    let shutdown = async {
        signals.recv().await;
        let _ = signalled.set(Instant::now());
        state.begin_stop();
        // A second signal means "now": the operator has seen the first one being honoured. One
        // that follows within a second is the same stop sent twice, not an operator insisting:
        // `timeout`, and systemd's default KillMode, signal the service and its process group.
        let first = Instant::now();
        tokio::spawn(async move {
            loop {
                signals.recv().await;
                if first.elapsed() >= SAME_STOP {
                    break;
                }
                tracing::info!("a second signal within a second of the first: taken as the same stop");
            }
            tracing::warn!("second signal: exiting at once, without waiting for in-flight requests");
            std::process::exit(130);
        });
    };
    let drain = callbacks_to_come(&state, args.callback_linger, limits.shutdown_grace);
    app::serve(listener, router, limits, shutdown, drain).await?;
    let deadline = *signalled.get_or_init(Instant::now) + limits.shutdown_grace;
    if let Some(sandbox) = sandbox {
        sandbox.shutdown_within(deadline.saturating_duration_since(Instant::now())).await;
    }
    if let Some(n) = state.easemob.as_ref().map(EasemobClient::not_sent_at_stop).filter(|n| *n > 0) {
        tracing::warn!(
            calls = n,
            "calls still waiting for their turn at the stop were not sent to Easemob: each is \
            recorded `failed` with 0 attempts and is safe to send again (GET /v1/calls?outcome=failed lists them)"
        );
    }
    state.log_unreported_at_stop();
    let store = state.store.clone();
    drop(state);
    // What is left of the grace, and at least long enough for the writer's last batch.
    store.close_within(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(2))).await;
    tracing::info!("stopped");
    Ok(())
}

/// The sandbox's settings that differ from their defaults, by flag: with a real Easemob they do
/// nothing, which someone who set them (a test plan's environment file, say) should hear.
fn sandbox_settings_set(e: &crate::config::EasemobArgs) -> Vec<&'static str> {
    let default: std::net::SocketAddr = ([127, 0, 0, 1], 8081).into();
    [
        ("--sandbox-listen", e.sandbox_listen != default),
        ("--sandbox-rate-limit", e.sandbox_rate_limit != 100),
        ("--sandbox-friend-limit", e.sandbox_friend_limit != 100),
        ("--sandbox-drop-rate", e.sandbox_drop_rate != 0.0),
        ("--sandbox-duplicate-rate", e.sandbox_duplicate_rate != 0.0),
        ("--sandbox-delay-ms", e.sandbox_delay_ms != 0),
        ("--sandbox-callbacks-per-add", e.sandbox_callbacks_per_add != 1),
        ("--sandbox-bad-signature-rate", e.sandbox_bad_signature_rate != 0.0),
        ("--sandbox-seed", e.sandbox_seed != 0),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect()
}

fn warn_of_settings_real_mode_ignores(e: &crate::config::EasemobArgs) {
    let ignored = sandbox_settings_set(e);
    if !ignored.is_empty() {
        tracing::warn!(
            settings = %ignored.join(", "),
            "sandbox settings given with --easemob-base-url do nothing: the built-in sandbox does not run against a \
             real Easemob (unset them, or their FRIENDHOOK_SANDBOX_* variables)"
        );
    }
    if e.easemob_rate_limit > 100 {
        tracing::warn!(
            rate_limit = e.easemob_rate_limit,
            "--easemob-rate-limit is above Easemob's documented 100 calls/s per App Key for the contact APIs: right \
             only if your plan's limit is higher; otherwise calls past it get 429 and are retried late"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    #[test]
    fn the_easemob_flags_reach_the_client() {
        let argv = ["friendhook", "serve", "--easemob-max-retry-time", "7s", "--easemob-request-timeout", "2s"];
        let Command::Serve(args) = Cli::try_parse_from(argv).expect("valid").command else {
            panic!("not serve");
        };
        let config = client_config(&args, "http://x".into(), "o".into(), "a".into(), "id".into(), Secret::new("s"));
        assert_eq!((config.max_retry_time, config.request_timeout), (Duration::from_secs(7), Duration::from_secs(2)));
        assert_eq!(config.connect_timeout, Duration::from_secs(2), "no longer than the whole exchange");
    }

    #[test]
    fn the_sandbox_settings_given_are_the_ones_named() {
        let parse = |argv: &[&str]| {
            let Command::Serve(args) = Cli::try_parse_from(argv).expect("valid").command else {
                panic!("not serve");
            };
            sandbox_settings_set(&args.easemob)
        };
        assert_eq!(parse(&["friendhook", "serve"]), Vec::<&str>::new(), "the defaults are not settings given");
        assert_eq!(
            parse(&["friendhook", "serve", "--sandbox-friend-limit", "3", "--sandbox-drop-rate", "0.5"]),
            ["--sandbox-friend-limit", "--sandbox-drop-rate"]
        );
    }
}
