//! Command line and environment configuration (clap derive).
//!
//! Every option of `friendhook serve` has a long flag and an environment variable, and the
//! defaults run with no configuration at all: an SQLite file in the working directory and the
//! built-in Easemob sandbox. Secrets are [`Secret`]s, so `{:?}` on any of these structs is safe.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::secret::Secret;
use crate::signature::Scheme;

/// friendhook: trigger Easemob friend additions, receive and verify their callbacks, store them
/// durably, and reconcile one against the other.
#[derive(Debug, Parser)]
#[command(name = "friendhook", version = crate::VERSION, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// How log lines are written to stderr: `text` for people (coloured on a terminal), `json`
    /// for a log collector (one object per line: timestamp, level, target, message and the
    /// line's fields at the top level, the spans it ran in under `spans`). RUST_LOG picks which
    /// lines (default: info).
    #[arg(long, global = true, env = "FRIENDHOOK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The format of the log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (receiver, trigger API, reconciliation, feed, Prometheus /metrics).
    /// With no --easemob-base-url it also starts the built-in Easemob sandbox and wires the two
    /// together.
    Serve(Box<ServeArgs>),
    /// One command, the whole loop: service + sandbox, a few hundred friend additions (some
    /// bound to fail), their callbacks, and the reconciliation report.
    Demo(crate::commands::demo::DemoArgs),
    /// Run the Easemob-compatible sandbox on its own (token, users, contacts, roster callbacks,
    /// fault injection).
    Sandbox(crate::sandbox::SandboxArgs),
    /// Reconcile calls against callbacks and print what needs attention.
    Reconcile(crate::commands::reconcile::ReconcileArgs),
    /// Verify the tamper-evident hash chain (verify), or empty the lookup by user for the
    /// service to rebuild (rebuild-user-index).
    Audit(crate::commands::audit::AuditArgs),
    /// Callbacks held in quarantine (--on-bad-signature quarantine): list them, re-verify and
    /// promote them with the right secret, purge those that never will.
    Quarantine(crate::commands::quarantine::QuarantineArgs),
    /// Export the feed (calls and callbacks) as NDJSON or CSV.
    Export(crate::commands::export::ExportArgs),
    /// Benchmarks that print throughput, latency percentiles and memory.
    Bench(crate::bench::BenchArgs),
}

/// How hard SQLite flushes to disk on commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqliteSynchronous {
    /// fsync the WAL on every commit: an acknowledged callback survives power loss.
    Full,
    /// fsync only at checkpoints: survives a crash of the process, but the last commits before a
    /// power loss or kernel crash may be rolled back. Faster (fewer fsyncs).
    Normal,
}

/// What to do with a callback that fails verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnBadSignature {
    /// Answer 401 and record a rejection (hash and size, not the body).
    Reject,
    /// Keep the request in a bounded quarantine (not the event store) and answer 200, so that a
    /// wrong secret after a rotation does not get the Easemob rule banned or the events lost.
    Quarantine,
}

/// Storage options shared by every command that opens the database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// SQLite database URL; the file is created if missing and migrations are applied at start.
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,

    /// SQLite `synchronous` mode for the write connection (WAL journal either way). `full`: every
    /// acknowledged callback survives power loss. `normal`: faster, survives process crashes,
    /// may lose the last commits on power loss.
    #[arg(long, env = "FRIENDHOOK_SQLITE_SYNCHRONOUS", value_enum, default_value = "full")]
    pub sqlite_synchronous: SqliteSynchronous,

    /// How long a write waits for a database lock held by another process before it fails and
    /// the callback is answered 503 (so that Easemob's retry has a chance).
    #[arg(long, env = "FRIENDHOOK_SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub sqlite_busy_timeout: Duration,
}

/// Options of `friendhook serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP service listens on.
    #[arg(long, env = "FRIENDHOOK_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Start on a database whose journal lost records from its end (the file still refers to
    /// seqs past its last record), which is otherwise refused: new records would take those seqs
    /// and erase the trace. Keep a copy of the file first; `friendhook audit verify` on the copy
    /// names what is missing. true/false, yes/no, on/off or 1/0.
    #[arg(long, env = "FRIENDHOOK_ACCEPT_JOURNAL_CUT", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub accept_journal_cut: bool,

    /// Callback secret(s), comma-separated; any of them may verify a callback (several are active
    /// during a rotation). Easemob scheme: the rule's secret from the Easemob console.
    /// standard-webhooks: `whsec_<base64>`. Unset in sandbox mode (Easemob scheme): one is
    /// generated at start. Spaces around each item are ignored. Prefer the environment variable:
    /// flags show in the process list.
    #[arg(long, env = "FRIENDHOOK_CALLBACK_SECRET", value_delimiter = ',', hide_env_values = true,
          value_parser = SECRET_ITEM)]
    pub callback_secret: Vec<Secret>,

    /// API token(s), comma-separated: when set, the `/v1/...` API (trigger, calls, callbacks,
    /// reconciliation, feed, audit head) answers 401 unless the request carries
    /// `Authorization: Bearer <one of them>` (several are accepted during a rotation). Unset, it
    /// is open to whoever reaches the listener: keep it private. Only POST /callbacks/easemob
    /// (checked by its signature instead), /healthz, /readyz and /metrics answer without a token.
    /// Spaces around each item are ignored.
    #[arg(long, env = "FRIENDHOOK_API_TOKEN", value_delimiter = ',', hide_env_values = true,
          value_parser = SECRET_ITEM)]
    pub api_token: Vec<Secret>,

    /// Signature scheme checked on POST /callbacks/easemob.
    #[arg(long, env = "FRIENDHOOK_SIGNATURE_SCHEME", value_enum, default_value = "easemob")]
    pub signature_scheme: Scheme,

    /// Largest accepted callback body; larger requests get 413 without the rest being read (at
    /// least 1024: a roster event runs to some 500 bytes).
    #[arg(long, env = "FRIENDHOOK_MAX_BODY_BYTES", default_value_t = 65536, value_parser = parse_body_limit)]
    pub max_body_bytes: usize,

    /// standard-webhooks only: how far `webhook-timestamp` may be from now, either way.
    #[arg(long, env = "FRIENDHOOK_TIMESTAMP_TOLERANCE", default_value = "5m", value_parser = parse_duration)]
    pub timestamp_tolerance: Duration,

    /// At most this many rejected deliveries are kept (oldest pruned first).
    #[arg(long, env = "FRIENDHOOK_REJECTION_LOG_CAP", default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub rejection_log_cap: i64,

    /// Requests waiting for the writer beyond this many are answered 503 with Retry-After
    /// (never 200 before commit); bounds memory under overload.
    #[arg(long, env = "FRIENDHOOK_WRITE_QUEUE", default_value_t = 8192, value_parser = parse_count)]
    pub write_queue: usize,

    /// Most rows committed in one transaction by the group-commit writer.
    #[arg(long, env = "FRIENDHOOK_MAX_BATCH", default_value_t = 512, value_parser = parse_count)]
    pub max_batch: usize,

    /// Most requests handled at once, counted separately for callbacks and for the API (so a busy
    /// API cannot starve callbacks); further requests are read and wait for a slot, within their
    /// --request-timeout. Probes and /metrics are not counted.
    #[arg(long, env = "FRIENDHOOK_MAX_IN_FLIGHT", default_value_t = 4096, value_parser = parse_count)]
    pub max_in_flight: usize,

    /// A client must send a request's headers within this time, counted from the connection's
    /// opening or, on a kept-alive connection, from the request's first byte; otherwise the
    /// connection is closed (slow-loris protection).
    #[arg(long, env = "FRIENDHOOK_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_nonzero_duration)]
    pub header_timeout: Duration,

    /// A kept-alive connection with no request for this long is closed. Keep it longer than the
    /// idle time of your clients' connection pools (Easemob's server SDKs: 10 s), so that the
    /// client, not the service, closes an idle connection: a request sent on a connection just as
    /// the service closes it is lost to the client.
    #[arg(long, env = "FRIENDHOOK_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_nonzero_duration)]
    pub idle_timeout: Duration,

    /// A request (body read and handling) must finish within this time, or it is answered 408.
    /// Reconciliation reports run one at a time; one waits up to half of this for its turn, then
    /// is answered 503 `reconciliation_busy`.
    #[arg(long, env = "FRIENDHOOK_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_nonzero_duration)]
    pub request_timeout: Duration,

    /// Deadline of the endpoints that wait on Easemob: the triggers (POST /v1/friends,
    /// /v1/friends/batch, DELETE) and /v1/easemob/exception-cache. A batch of 1,000 at 100/s takes
    /// 10 s, plus retries. Past it, a request that had started its calls answers 504
    /// `still_running` with the `call_ids` recorded by then (they go on, see GET /v1/calls/{id}: do
    /// not send it again); one that had started
    /// nothing, 408 (nothing of it is sent later: retry it).
    #[arg(long, env = "FRIENDHOOK_TRIGGER_TIMEOUT", default_value = "5m", value_parser = parse_nonzero_duration)]
    pub trigger_timeout: Duration,

    /// On SIGTERM, SIGINT or SIGHUP: how long in-flight requests may take to finish before exit. At the signal,
    /// Easemob calls not sent yet (a batch's waiting pairs) are recorded as not sent, and feed
    /// long-polls are answered; calls still retrying when the grace ends are closed as `unknown`
    /// at the next start. A second signal exits at once (status 130).
    #[arg(long, env = "FRIENDHOOK_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// On a stop, callbacks are still received (triggers are refused) until the calls made to
    /// Easemob have ended and this long has passed since the last one, for at most half of
    /// --shutdown-grace: Easemob sends a call's callback after answering it, and one that finds
    /// the port closed is retried once, then dropped. 0s: close the listener at once.
    #[arg(long, env = "FRIENDHOOK_CALLBACK_LINGER", default_value = "3s", value_parser = parse_duration)]
    pub callback_linger: Duration,

    /// What to do with a callback that fails verification: `reject` (401) or `quarantine`
    /// (keep it aside, answer 200; see `friendhook quarantine`).
    #[arg(long, env = "FRIENDHOOK_ON_BAD_SIGNATURE", value_enum, default_value = "reject")]
    pub on_bad_signature: OnBadSignature,

    /// quarantine mode: keep at most this many quarantined requests (further ones are rejected;
    /// 0 holds none).
    #[arg(long, env = "FRIENDHOOK_QUARANTINE_CAP", default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(0..))]
    pub quarantine_cap: i64,

    /// Only accept callbacks from these source networks (comma-separated CIDRs or addresses, e.g.
    /// `203.0.113.0/24,127.0.0.1`). Empty: any source.
    #[arg(long, env = "FRIENDHOOK_ALLOW_FROM", value_delimiter = ',', value_parser = parse_network)]
    pub allow_from: Vec<Network>,

    /// Reverse proxies in front of friendhook (comma-separated CIDRs or addresses, e.g. `127.0.0.1`). A
    /// callback arriving from one of them is taken to come from the address its
    /// `X-Forwarded-For` reports (the rightmost entry not itself a listed proxy): that address is
    /// what `--allow-from` checks and the delivery log records. Empty: the header is ignored.
    #[arg(long, env = "FRIENDHOOK_TRUSTED_PROXY", value_delimiter = ',', value_parser = parse_network)]
    pub trusted_proxy: Vec<Network>,

    /// Reconciliation: how far before the call a callback's timestamp may lie (clock skew).
    #[arg(long, env = "FRIENDHOOK_MATCH_SKEW", default_value = "5s", value_parser = parse_duration)]
    pub match_skew: Duration,

    /// Reconciliation: how long after the call completed its callback may come.
    #[arg(long, env = "FRIENDHOOK_MATCH_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub match_window: Duration,

    /// `/metrics`: reconcile the calls requested within this trailing window for the
    /// `friendhook_reconciliation_*` figures (e.g. calls whose callback is missing), at most once
    /// every 10 s however often it is scraped. `0s` leaves those figures out.
    #[arg(long, env = "FRIENDHOOK_METRICS_RECONCILE_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub metrics_reconcile_window: Duration,

    #[command(flatten)]
    pub easemob: EasemobArgs,
}

/// How to reach Easemob. With no base URL, the built-in sandbox plays Easemob.
#[derive(Debug, Clone, Args)]
pub struct EasemobArgs {
    /// Easemob REST base URL (e.g. `https://a1.easemob.com`). Unset: start the built-in sandbox
    /// and use it (org demo-org, app demo-app, client id sandbox-client-id).
    #[arg(long, env = "EASEMOB_BASE_URL", value_parser = parse_setting)]
    pub easemob_base_url: Option<String>,

    /// Refuse to start without --easemob-base-url instead of running the built-in sandbox: for
    /// deployments, where a missing environment file would otherwise start a service that looks
    /// healthy and sends nothing to Easemob. true/false, yes/no, on/off or 1/0.
    #[arg(long, env = "FRIENDHOOK_REQUIRE_EASEMOB", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub require_easemob: bool,

    /// Easemob org name (the part of the App Key before `#`).
    #[arg(long, env = "EASEMOB_ORG", value_parser = parse_setting)]
    pub easemob_org: Option<String>,

    /// Easemob app name (the part of the App Key after `#`).
    #[arg(long, env = "EASEMOB_APP", value_parser = parse_setting)]
    pub easemob_app: Option<String>,

    /// Client ID from the Easemob console.
    #[arg(long, env = "EASEMOB_CLIENT_ID", value_parser = parse_setting)]
    pub easemob_client_id: Option<String>,

    /// Client secret from the Easemob console (never logged).
    #[arg(long, env = "EASEMOB_CLIENT_SECRET", hide_env_values = true, value_parser = SECRET)]
    pub easemob_client_secret: Option<Secret>,

    /// Client-side rate limit for Easemob calls, requests per second per App Key (Easemob's limit
    /// for the contact APIs is 100/s).
    #[arg(long, env = "EASEMOB_RATE_LIMIT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub easemob_rate_limit: u32,

    /// Most HTTP attempts per Easemob call (429, 5xx and transport errors are retried).
    #[arg(long, env = "EASEMOB_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub easemob_max_attempts: u32,

    /// No retry of an Easemob call starts later than this after its first attempt (0s: no
    /// retries by time). So a call lasts at most this plus one --easemob-request-timeout, plus
    /// its wait for the rate limiter.
    #[arg(long, env = "EASEMOB_MAX_RETRY_TIME", default_value = "30s", value_parser = parse_duration)]
    pub easemob_max_retry_time: Duration,

    /// Longest one HTTP exchange with Easemob may take, connecting included (a call that gets no
    /// answer within it counts as a timeout and is retried).
    #[arg(long, env = "EASEMOB_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_nonzero_duration)]
    pub easemob_request_timeout: Duration,

    /// Sandbox mode: where the built-in sandbox listens.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_LISTEN", default_value = "127.0.0.1:8081", value_parser = parse_listen)]
    pub sandbox_listen: SocketAddr,

    /// Sandbox mode: requests per second for the App Key to each of the sandbox's APIs before 429
    /// reach_limit (Easemob's: 100 for add, remove and list), whatever --easemob-rate-limit says:
    /// a client limit set too high then shows as 429s here, as it would against Easemob. 0 = unlimited.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_RATE_LIMIT", default_value_t = 100)]
    pub sandbox_rate_limit: u32,

    /// Sandbox mode: friends per user before 403 exceed_limit (Easemob's free plan: 100).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_FRIEND_LIMIT", default_value_t = 100)]
    pub sandbox_friend_limit: usize,

    /// Sandbox mode: share of callbacks never sent (0..1), to exercise reconciliation.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DROP_RATE", default_value_t = 0.0,
          value_parser = crate::sandbox::config::parse_probability)]
    pub sandbox_drop_rate: f64,

    /// Sandbox mode: share of callbacks sent twice (0..1).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DUPLICATE_RATE", default_value_t = 0.0,
          value_parser = crate::sandbox::config::parse_probability)]
    pub sandbox_duplicate_rate: f64,

    /// Sandbox mode: random delay before each callback, up to this many ms.
    #[arg(long, env = "FRIENDHOOK_SANDBOX_DELAY_MS", default_value_t = 0)]
    pub sandbox_delay_ms: u64,

    /// Sandbox mode: callbacks per add, 1 (owner to friend) or 2 (one in each direction).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_CALLBACKS_PER_ADD", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=2))]
    pub sandbox_callbacks_per_add: u8,

    /// Sandbox mode: share of callbacks signed with a wrong secret (0..1).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_BAD_SIGNATURE_RATE", default_value_t = 0.0,
          value_parser = crate::sandbox::config::parse_probability)]
    pub sandbox_bad_signature_rate: f64,

    /// Sandbox mode: seed of the fault generator (same seed, same faults).
    #[arg(long, env = "FRIENDHOOK_SANDBOX_SEED", default_value_t = 0)]
    pub sandbox_seed: u64,
}

impl Cli {
    /// The command line and environment, parsed; on an error, clap's message and exit. A value
    /// clap refuses is named by its flag only, so when it came from the environment the message
    /// also names the variable it was read from (a deployment sets `FRIENDHOOK_LISTEN`, and would
    /// look for a `--listen` nobody typed).
    pub fn parse_or_exit() -> Cli {
        Cli::try_parse().unwrap_or_else(|err| {
            let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
            name_env_origin(err, &argv, |name| std::env::var_os(name).is_some()).exit()
        })
    }
}

/// `err` with a tip naming the environment variable its refused value came from, when it did:
/// the refused flag is not on `argv` and its variable is set (`is_set`).
pub fn name_env_origin(
    mut err: clap::Error,
    argv: &[std::ffi::OsString],
    is_set: impl Fn(&str) -> bool,
) -> clap::Error {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(err.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return err;
    }
    // "--listen <ADDR>"
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else { return err };
    let Some(long) = arg.split_whitespace().next().and_then(|flag| flag.strip_prefix("--")) else { return err };
    let on_command_line = argv.iter().filter_map(|a| a.to_str()).any(|a| {
        a.strip_prefix("--")
            .and_then(|a| a.strip_prefix(long))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    if on_command_line {
        return err;
    }
    // The same long flag has the same variable in every subcommand that takes it.
    fn env_of(cmd: &clap::Command, long: &str) -> Option<String> {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str())
            .map(str::to_owned)
            .or_else(|| cmd.get_subcommands().find_map(|sub| env_of(sub, long)))
    }
    if let Some(var) = env_of(&Cli::command(), long).filter(|var| is_set(var)) {
        let tip = format!("the value was read from the environment variable {var} (no --{long} was given)");
        let mut tips = match err.get(ContextKind::Suggested) {
            Some(ContextValue::StyledStrs(tips)) => tips.clone(),
            _ => Vec::new(),
        };
        tips.push(tip.into());
        err.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    }
    err
}

/// The variables among `names` that look like friendhook's (`FRIENDHOOK_*`, `EASEMOB_*`) but that
/// no option reads, each with the one it most likely misspells: a typo in an environment file
/// otherwise leaves the setting at its default without a word (`FRIENDHOOK_API_TOKN` leaves /v1
/// open).
pub fn unknown_env_vars(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<(String, Option<String>)> {
    use clap::CommandFactory;
    fn collect(cmd: &clap::Command, into: &mut Vec<String>) {
        into.extend(cmd.get_arguments().filter_map(|a| a.get_env()?.to_str().map(str::to_owned)));
        for sub in cmd.get_subcommands() {
            collect(sub, into);
        }
    }
    // Read by the build, not by an option: `cargo run` hands the build script's value to the
    // binary it runs, so the README's quick start would otherwise warn of it on every start.
    let mut known = vec!["FRIENDHOOK_COMMIT".to_owned()];
    collect(&Cli::command(), &mut known);
    let mut unknown: Vec<(String, Option<String>)> = names
        .filter_map(|name| name.into_string().ok())
        .filter(|name| (name.starts_with("FRIENDHOOK_") || name.starts_with("EASEMOB_")) && !known.contains(name))
        .map(|name| {
            let meant = known
                .iter()
                .map(|k| (strsim::levenshtein(&name, k), k))
                .filter(|(distance, _)| *distance <= 3)
                .min()
                .map(|(_, k)| k.clone());
            (name, meant)
        })
        .collect();
    unknown.sort();
    unknown
}

/// A listen address: an IP address and a port. A bare port, the most common slip, is answered
/// with an example.
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    value.trim().parse().map_err(|_| {
        format!(
            "`{value}` is not an address to listen on: give an IP address and a port, e.g. 127.0.0.1:8080 \
             (this machine only) or 0.0.0.0:8080 (every interface)"
        )
    })
}

/// One item of a comma-separated list of secrets or tokens, without the spaces around it
/// (`a, b` must mean `a` and `b`: a secret that silently kept its leading space would fail every
/// callback signed with it). Empty items are left for `serve` to judge: an empty callback secret
/// is skipped (an empty `FRIENDHOOK_CALLBACK_SECRET=` means "none"), an empty API token refused.
/// One that begins or ends with a quote is refused (`KEY="a,b"` splits into `"a` and `b"`).
pub const SECRET_ITEM: SecretParser = SecretParser { item: true };

/// A secret setting: [`parse_setting`] for a [`Secret`], whose refusal does not show the value
/// (clap's own message for a refused value quotes it).
pub const SECRET: SecretParser = SecretParser { item: false };

/// Parses secrets; see [`SECRET`] and [`SECRET_ITEM`].
#[derive(Debug, Clone, Copy)]
pub struct SecretParser {
    item: bool,
}

impl clap::builder::TypedValueParser for SecretParser {
    type Value = Secret;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Secret, clap::Error> {
        let name = arg.map_or_else(String::new, |arg| {
            let long = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
            match arg.get_env().and_then(|e| e.to_str()) {
                Some(env) => format!("{long} ({env})"),
                None => long,
            }
        });
        let refuse = |why: &str| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{name}: {why}\n")).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("the value (not shown) is not UTF-8"))?.trim();
        let quoted = if self.item {
            [text.chars().next(), text.chars().last()].iter().any(|c| matches!(c, Some('"' | '\'')))
        } else {
            is_quoted(text)
        };
        if quoted {
            let what = if self.item {
                "an item (not shown) begins or ends with a quote"
            } else {
                "the value (not shown) is wrapped in quotes"
            };
            return Err(refuse(&format!("{what}, which would be taken as part of it: {QUOTES_HINT}")));
        }
        Ok(Secret::new(text))
    }
}

/// `text` if it is an http(s) URL with a host; otherwise what is wrong with it, for a value
/// parser to follow with an example of what it expects.
pub fn http_url(text: &str) -> Result<String, String> {
    match reqwest::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(text.to_owned()),
        Ok(url) => Err(format!("`{}` is not an http(s) URL", url.scheme())),
        Err(e) => Err(format!("`{text}`: {e}")),
    }
}

/// A text setting without the spaces around it, refused when it is wrapped in quotes.
///
/// Settings come from environment files as often as from a shell, and some of those keep what a
/// shell would have removed: `docker run --env-file` takes `KEY="value"` with its quotes, and a
/// line edited by hand keeps a trailing space. A database URL with a trailing space names another
/// file (a second database, beside the first, that the one-service lock does not cover); an org
/// or a secret with quotes makes every call or callback fail. Empty values are left to the command
/// that uses them (for some, empty means unset).
pub fn parse_setting(value: &str) -> Result<String, String> {
    let value = value.trim();
    if is_quoted(value) {
        return Err(format!("{value} is wrapped in quotes, which would be taken as part of the value: {QUOTES_HINT}"));
    }
    Ok(value.to_owned())
}

const QUOTES_HINT: &str = "remove them (an environment file read by `docker run --env-file` keeps quotes as written)";

fn is_quoted(value: &str) -> bool {
    value.len() >= 2
        && ((value.starts_with('"') && value.ends_with('"')) || (value.starts_with('\'') && value.ends_with('\'')))
}

/// The callback secrets of a `--callback-secret` list, empty items dropped (`a,` is `a`; an empty
/// variable is no secret). `serve` and `quarantine reverify` both go through here, so one value
/// of `FRIENDHOOK_CALLBACK_SECRET` means the same secrets, with the same `secret_index`, in both.
pub fn callback_secrets(items: &[Secret]) -> Vec<Secret> {
    items.iter().filter(|s| !s.expose().is_empty()).cloned().collect()
}

/// The log filter of a `RUST_LOG` value: `info` when there is none, and when it cannot be read, with
/// a warning to log saying so (an operator who asked for `debug` and silently got `info` would
/// look for lines that never come).
pub fn log_filter(rust_log: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    let info = || tracing_subscriber::EnvFilter::new("info");
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (info(), None),
        Some(text) => match tracing_subscriber::EnvFilter::try_new(text) {
            // A command's own lines (progress, summaries, the export's cursor) are its output,
            // not log lines: printed whatever RUST_LOG says in text, so kept at info in JSON too,
            // unless RUST_LOG names their target itself.
            Ok(filter) if !text.contains(crate::console::TARGET) => {
                let console = format!("{}=info", crate::console::TARGET).parse().expect("a valid directive");
                (filter.add_directive(console), None)
            }
            Ok(filter) => (filter, None),
            Err(e) => (
                info(),
                Some(format!(
                    "RUST_LOG={text:?} is not a log filter ({e}); logging at info. Examples: RUST_LOG=debug, \
                     RUST_LOG=info,friendhook::store=debug"
                )),
            ),
        },
    }
}

/// One item of a comma-separated list of networks; `None` for an empty item (`FRIENDHOOK_ALLOW_FROM=`
/// means "any source", as no flag does, and `a,` is `a`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(pub Option<ipnet::IpNet>);

/// The networks of a list, empty items dropped.
pub fn networks(items: &[Network]) -> Vec<ipnet::IpNet> {
    items.iter().filter_map(|n| n.0).collect()
}

/// `10.0.0.0/8`, or an address alone as the network of just that address (`10.0.0.1` as
/// `10.0.0.1/32`); spaces around it are dropped (`a, b` means `a` and `b`).
pub fn parse_network(item: &str) -> Result<Network, String> {
    let item = item.trim();
    if item.is_empty() {
        return Ok(Network(None));
    }
    if let Ok(net) = item.parse::<ipnet::IpNet>() {
        return Ok(Network(Some(net)));
    }
    item.parse::<std::net::IpAddr>()
        .map(|ip| Network(Some(ip.into())))
        .map_err(|_| format!("`{item}` is neither a network like 203.0.113.0/24 nor an address like 203.0.113.7"))
}

/// A duration that zero would break: a deadline of nothing fails every request.
pub fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("`{s}` is zero, which would fail every request; give a duration like 5s")),
        d => Ok(d),
    }
}

/// A count or a size that zero would break (a queue of none, batches of none, no requests at
/// all).
pub fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would refuse everything; give at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}` is not a whole number: {e}")),
    }
}

/// Smallest `--max-body-bytes`: below it every real callback (a roster event is some 500 bytes,
/// a message event more) would get 413, which Easemob drops after its retry.
pub const MIN_BODY_LIMIT: usize = 1024;

/// `--max-body-bytes`: a count of at least [`MIN_BODY_LIMIT`].
pub fn parse_body_limit(s: &str) -> Result<usize, String> {
    match parse_count(s)? {
        n if n < MIN_BODY_LIMIT => Err(format!(
            "{n} bytes would refuse every callback with 413 (a roster event alone is some 500 bytes); give at \
             least {MIN_BODY_LIMIT}, or leave the default 65536"
        )),
        n => Ok(n),
    }
}

/// Longest duration any setting takes. Far beyond any sensible timeout, window or age, and far
/// below what adding to a clock reading can take (humantime reads up to ~5.8e11 years; a deadline
/// that far ahead would overflow and panic in every request).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `5s`, `250ms`, `5m`, `1h`, up to [`MAX_DURATION`] (10 years).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 5s, 250ms or 5m: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("`{s}` is longer than 10 years, the most any setting takes"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_that_cannot_be_read_falls_back_to_info_and_says_so() {
        let (filter, warning) = log_filter(Some("friendhook=verbose"));
        assert_eq!(filter.to_string(), "info");
        assert!(warning.is_some_and(|w| w.contains("RUST_LOG=\"friendhook=verbose\" is not a log filter")));
        let (filter, warning) = log_filter(Some("info,friendhook::store=debug"));
        assert_eq!((filter.to_string().contains("friendhook::store=debug"), warning), (true, None));
        assert_eq!(log_filter(None).1, None);
        assert_eq!(log_filter(Some(" ")).0.to_string(), "info");
        // RUST_LOG=warn quiets logs, not a command's own lines (text prints them regardless).
        let quiet = log_filter(Some("warn")).0.to_string();
        assert!(quiet.contains("friendhook::console=info") && quiet.contains("warn"), "{quiet}");
        let own = log_filter(Some("warn,friendhook::console=off")).0.to_string();
        assert!(own.contains("friendhook::console=off") && !own.contains("console=info"), "as given: {own}");
    }

    #[test]
    fn text_settings_lose_the_spaces_around_them_and_quotes_are_refused() {
        let serve = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Serve(args)) => Ok(args),
            Ok(_) => unreachable!("serve"),
            Err(e) => Err(e.to_string()),
        };
        let args = serve(&[
            "friendhook",
            "serve",
            "--database-url",
            "sqlite://fh.db  ",
            "--easemob-org",
            " acme ",
            "--easemob-client-secret",
            "s3cret ",
        ])
        .expect("parsed");
        assert_eq!(args.db.database_url, "sqlite://fh.db");
        assert_eq!(args.easemob.easemob_org.as_deref(), Some("acme"));
        assert_eq!(args.easemob.easemob_client_secret.as_ref().map(Secret::expose), Some("s3cret"));
        let err = serve(&["friendhook", "serve", "--easemob-org", "\"acme\""]).expect_err("quoted");
        assert!(err.contains("\"acme\" is wrapped in quotes") && err.contains("docker run --env-file"), "{err}");
        let err = serve(&["friendhook", "serve", "--easemob-client-secret", "'s3cret'"]).expect_err("quoted");
        assert!(
            err.contains("--easemob-client-secret (EASEMOB_CLIENT_SECRET): the value (not shown) is wrapped in quotes"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        // A quoted list splits into items that each keep one quote.
        let err = serve(&["friendhook", "serve", "--callback-secret", "\"abc,def\""]).expect_err("quoted");
        assert!(err.contains("begins or ends with a quote") && !err.contains("abc"), "{err}");
        // Empty stays empty, for the command to judge; a quote inside a value is the value's.
        assert_eq!(parse_setting(" "), Ok(String::new()));
        assert_eq!(parse_setting("a\"b"), Ok("a\"b".to_owned()));
        assert_eq!(parse_setting("\""), Ok("\"".to_owned()));
    }

    #[test]
    fn a_misspelt_variable_is_named_with_the_one_meant() {
        let names = [
            "FRIENDHOOK_LISTN",
            "FRIENDHOOK_LISTEN",
            "EASEMOB_CLIENT_SECRT",
            "FRIENDHOOK_WHATEVER_ELSE",
            "PATH",
            "FRIENDHOOK_COMMIT",
        ];
        let unknown = unknown_env_vars(names.iter().map(std::ffi::OsString::from));
        assert_eq!(
            unknown,
            vec![
                ("EASEMOB_CLIENT_SECRT".to_owned(), Some("EASEMOB_CLIENT_SECRET".to_owned())),
                ("FRIENDHOOK_LISTN".to_owned(), Some("FRIENDHOOK_LISTEN".to_owned())),
                ("FRIENDHOOK_WHATEVER_ELSE".to_owned(), None),
            ]
        );
    }

    #[test]
    fn a_refused_value_from_the_environment_names_its_variable() {
        let refused = |argv: &[&str]| Cli::try_parse_from(argv).expect_err("refused");
        let argv = |args: &[&str]| args.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let listen_set = |var: &str| var == "FRIENDHOOK_LISTEN";
        // What clap sees is the same whether the value was typed or read from the variable; the
        // command line tells them apart.
        let err = refused(&["friendhook", "serve", "--listen", "8080"]);
        let text = name_env_origin(err, &argv(&["friendhook", "serve"]), listen_set).to_string();
        assert!(text.contains("invalid value '8080' for '--listen"), "{text}");
        assert!(
            text.contains("read from the environment variable FRIENDHOOK_LISTEN (no --listen was given)"),
            "{text}"
        );
        for typed in [&["friendhook", "serve", "--listen", "8080"][..], &["friendhook", "serve", "--listen=8080"]] {
            let err = refused(typed);
            let text = name_env_origin(err, &argv(typed), listen_set).to_string();
            assert!(!text.contains("FRIENDHOOK_LISTEN"), "typed, so not from the environment: {text}");
        }
        // A variable that is not set is not named; nor one of another flag.
        let err = refused(&["friendhook", "serve", "--listen", "8080"]);
        assert!(!name_env_origin(err, &argv(&["friendhook", "serve"]), |_| false).to_string().contains("FRIENDHOOK_"));
        // A flag whose name begins another's is not taken for it.
        let err = refused(&["friendhook", "serve", "--listen", "8080"]);
        let text = name_env_origin(err, &argv(&["friendhook", "serve", "--listen-x"]), listen_set).to_string();
        assert!(text.contains("FRIENDHOOK_LISTEN"), "{text}");
        // A global flag, in a subcommand.
        let err = refused(&["friendhook", "reconcile", "--log-format", "yaml"]);
        let text =
            name_env_origin(err, &argv(&["friendhook", "reconcile"]), |v| v == "FRIENDHOOK_LOG_FORMAT").to_string();
        assert!(text.contains("FRIENDHOOK_LOG_FORMAT"), "{text}");
    }
}
