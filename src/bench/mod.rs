//! `friendhook bench`: the benchmarks a user runs on their own machine. Each prints its figures;
//! none asserts a target (targets are judged by reading the output, never in a timed test).
//!
//! - `ingest`: the service as a child process; the same client and concurrency measure the bare
//!   HTTP ceiling (`GET /healthz`) and the verified-and-committed callback path, then an open-loop
//!   run at a fixed rate; peak RSS of the service; acknowledged vs stored; the CPU each phase
//!   cost the service and the client per request ([`cpu`]), and the writer's commits during each
//!   phase (from the service's `/metrics`).
//! - `trigger`: friend additions through the trigger API against the built-in sandbox.
//! - `reconcile` / `feed`: a database seeded with a million calls and callbacks.

pub mod cpu;
pub mod load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::Full;
use hyper::Request;

use crate::clock::{Clock, SystemClock};
use crate::config::{SqliteSynchronous, parse_duration};
use crate::reconcile::MatchParams;
use crate::report::{self, ReportQuery};
use crate::store::{Store, StoreOptions, seed::SeedSpec};

/// `friendhook bench ...`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Callback ingest: bare HTTP ceiling vs verified-and-committed, open-loop latency, RSS.
    Ingest(IngestArgs),
    /// Friend additions through the trigger API against the built-in sandbox: throughput at the
    /// rate limit, 429s drawn, trigger-to-stored-callback latency.
    Trigger(TriggerArgs),
    /// Reconciliation query times over a seeded database (1,000,000 calls and callbacks).
    Reconcile(SeedArgs),
    /// Full feed export rate over a seeded database.
    Feed(SeedArgs),
}

/// Options of `bench ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Concurrent connections of the closed-loop phases.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Length of each closed-loop phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Runs the bare and the committed phase alternately this many times and reports the median
    /// ratio as well. The bare ceiling of a shared or virtual machine moves by 10% or more from one
    /// run to the next; 3 rounds give a ratio worth comparing.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// SQLite synchronous mode of the service under test.
    #[arg(long, value_enum, default_value = "full")]
    pub sqlite_synchronous: SqliteSynchronous,
    /// Rate of the open-loop phase (callbacks per second); 0 skips it.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Length of the open-loop phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub open_loop_duration: Duration,
    /// The friendhook binary to run as the service (default: this one).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// Options of `bench trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// Friend additions to trigger (one batch request each of up to 1,000 pairs).
    #[arg(long, default_value_t = 1000)]
    pub adds: usize,
    /// Rate limit of both the client and the sandbox, requests per second.
    #[arg(long, default_value_t = 100)]
    pub rate_limit: u32,
    /// The friendhook binary to run as the service (default: this one).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// Options of `bench reconcile` / `bench feed`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Seeded database file; created (about a minute) if missing, reused if present.
    #[arg(long, default_value = "friendhook-bench-1m.db")]
    pub database: PathBuf,
    /// Calls to seed.
    #[arg(long, default_value_t = 1_000_000)]
    pub calls: u64,
    /// Callbacks to seed.
    #[arg(long, default_value_t = 1_000_000)]
    pub callbacks: u64,
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Ingest(a) => ingest(a).await,
        BenchCommand::Trigger(a) => bench_trigger(a).await,
        BenchCommand::Reconcile(a) => bench_reconcile(a).await,
        BenchCommand::Feed(a) => bench_feed(a).await,
    }
}

/// The service under test, as a child process.
pub struct ServiceProcess {
    child: tokio::process::Child,
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// Its sandbox's address.
    pub sandbox_addr: SocketAddr,
    /// Its database URL.
    pub db_url: String,
    _dir: tempfile::TempDir,
}

/// Where the service's start-up log says it listens (see `commands::serve`). The bench lets the
/// service bind port 0 and reads the ports back, rather than picking free ports itself: a port
/// picked, released and handed over can be taken by someone else in between.
#[derive(Debug, Default, PartialEq)]
struct Announced {
    addr: Option<SocketAddr>,
    sandbox: Option<SocketAddr>,
}

impl Announced {
    /// Takes what one log line announces.
    fn read(&mut self, line: &str) {
        if line.contains("friendhook is listening") {
            self.addr = log_field(line, "addr").and_then(|v| v.parse().ok());
        } else if line.contains("sandbox mode:") {
            self.sandbox = log_field(line, "sandbox").and_then(|v| v.strip_prefix("http://")?.parse().ok());
        }
    }
}

/// The value of ` key=value` in a log line, up to the next space.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split_whitespace().next()
}

impl ServiceProcess {
    /// Starts `friendhook serve` on ports it picks itself, with a fresh database, and waits until
    /// it is ready. The service's warnings and errors go to this process's stderr (everything it
    /// logs, with `BENCH_SERVICE_LOG` set to a filter).
    pub async fn start(binary: Option<&Path>, extra: &[&str]) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir()?;
        let db_url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let exe = match binary {
            Some(b) => b.to_path_buf(),
            None => std::env::current_exe()?,
        };
        let user_filter = std::env::var("BENCH_SERVICE_LOG").ok();
        // The start-up lines that name the ports are at info level.
        let filter = format!("{},friendhook::commands::serve=info", user_filter.as_deref().unwrap_or("warn"));
        let mut child = tokio::process::Command::new(exe)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--sandbox-listen", "127.0.0.1:0", "--database-url", &db_url])
            .args(extra)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().context("the service's stderr")?).lines();
        let forward = move |line: &str| {
            if user_filter.is_some() || !line.contains(" INFO ") {
                eprintln!("{line}");
            }
        };
        let mut announced = Announced::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (addr, sandbox_addr) = loop {
            if let Announced { addr: Some(addr), sandbox: Some(sandbox) } = announced {
                break (addr, sandbox);
            }
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    announced.read(&line);
                    forward(&line);
                }
                Ok(_) => anyhow::bail!("the service exited before it announced its ports (see its log above)"),
                Err(_) => anyhow::bail!("the service did not announce its ports within 30 s"),
            }
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                forward(&line);
            }
        });
        let svc = Self { child, addr, sandbox_addr, db_url, _dir: dir };
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("http://{addr}/readyz")).send().await
                && r.status().is_success()
            {
                return Ok(svc);
            }
            if Instant::now() > deadline {
                anyhow::bail!("the service did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The service's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let pid = self.child.id()?;
        peak_rss_of(pid)
    }

    /// SIGTERM, then wait for exit. The returned directory holds the database; it is removed
    /// when dropped.
    pub async fn stop(mut self) -> anyhow::Result<(String, tempfile::TempDir)> {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        Ok((self.db_url.clone(), self._dir))
    }
}

/// Peak RSS of a process from /proc (Linux).
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A signed roster callback body for bench request `n` of run `run`.
pub fn bench_callback(run: u64, n: u64, secret: &str, now_ms: i64) -> String {
    let appkey = "demo-org#demo-app";
    let msg_id = format!("{run}{n:012}");
    let call_id = format!("{appkey}_{msg_id}");
    let ts = now_ms.to_string();
    let security = crate::signature::easemob::sign(&call_id, secret, &ts);
    format!(
        r#"{{"chat_type":"roster","callId":"{call_id}","security":"{security}","payload":{{"reason":"","operation":"add"}},"host":"bench","appkey":"{appkey}","from":"{appkey}_u{a}@easemob.com","to":"u{b}","eventType":"chat","msg_id":"{msg_id}","timestamp":{ts}}}"#,
        a = n % 10_000,
        b = (n * 7 + 1) % 10_000
    )
}

fn row(name: &str, r: &load::LoadResult) -> String {
    format!(
        "{name:<34} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9}",
        r.throughput(),
        r.percentile_ms(0.50),
        r.percentile_ms(0.99),
        r.percentile_ms(0.999),
        r.errors
    )
}

async fn ingest(a: IngestArgs) -> anyhow::Result<()> {
    let secret = "bench-secret";
    let sync = match a.sqlite_synchronous {
        SqliteSynchronous::Full => "full",
        SqliteSynchronous::Normal => "normal",
    };
    let svc = ServiceProcess::start(a.binary.as_deref(), &["--callback-secret", secret, "--sqlite-synchronous", sync])
        .await?;
    let addr = svc.addr;
    println!(
        "friendhook bench ingest: {} connections, {:?} per closed-loop phase, synchronous={sync}, {} cores",
        a.connections,
        a.duration,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("{:<34} {:>9} {:>9} {:>9} {:>9} {:>9}", "phase", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "non-2xx");

    let host = addr.to_string();
    let healthz: load::MakeRequest = {
        let host = host.clone();
        Arc::new(move |_| {
            Request::get("/healthz").header("host", host.as_str()).body(Full::new(Bytes::new())).unwrap_or_default()
        })
    };
    let run_id: u64 = 1 + u64::from(rand::random::<u16>());
    let callback = |run: u64| -> load::MakeRequest {
        let host = host.clone();
        Arc::new(move |n| {
            let body = bench_callback(run, n, secret, SystemClock.now_ms());
            Request::post("/callbacks/easemob")
                .header("host", host.as_str())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        })
    };
    let mut phases = Phases::new(addr, svc.pid().unwrap_or(0));
    let mut ratios = Vec::new();
    let mut acknowledged = 0;
    for round in 1..=a.rounds {
        let suffix = if a.rounds > 1 { format!(" #{round}") } else { String::new() };
        let bare = phases
            .run(Phase::Bare, &format!("bare HTTP (GET /healthz){suffix}"), async {
                load::closed_loop(addr, a.connections, a.duration, healthz.clone()).await
            })
            .await?;
        // Each round its own run number, so every callback of the whole bench is a new event.
        let run = run_id + u64::from(round - 1);
        let full = phases
            .run(Phase::Committed, &format!("verified + committed (POST){suffix}"), async {
                load::closed_loop(addr, a.connections, a.duration, callback(run)).await
            })
            .await?;
        let ratio = full.throughput() / bare.throughput().max(1e-9);
        println!("{:<34} {:>9.2}", format!("ratio committed / bare{suffix}"), ratio);
        ratios.push(ratio);
        acknowledged += full.ok;
    }
    if a.rounds > 1 {
        println!("{:<34} {:>9.2}", format!("median ratio of {} rounds", a.rounds), median(&mut ratios));
    }

    if a.rate > 0 {
        let open = phases
            .run(Phase::OpenLoop, &format!("open loop at {}/s (from schedule)", a.rate), async {
                load::open_loop(addr, a.connections, a.rate, a.open_loop_duration, callback(run_id + 100_000)).await
            })
            .await?;
        acknowledged += open.ok;
    }
    let rss = svc.peak_rss();
    let (db_url, _dir) = svc.stop().await?;
    let store = Store::open_read_only(&db_url).await?;
    let stored = store.count_callbacks().await?;
    match rss {
        Some(b) => println!("{:<34} {:>9.1} MB", "peak RSS of the service", b as f64 / 1_048_576.0),
        None => println!("{:<34} {:>9}", "peak RSS of the service", "n/a"),
    }
    println!(
        "{:<34} acknowledged {acknowledged}, stored {stored}: {}",
        "durability",
        if acknowledged as i64 == stored { "equal" } else { "NOT EQUAL" }
    );
    phases.print_tables();
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs the load phases against one service and keeps what each cost: CPU (Linux only) and the
/// writer's group commits, read from the service's own `/metrics` before and after.
struct Phases {
    addr: SocketAddr,
    pid: u32,
    http: reqwest::Client,
    cpu_rows: Vec<(Phase, String, cpu::CpuUse)>,
    commit_rows: Vec<(String, CommitDelta)>,
}

/// The kind of a load phase, for the tables that compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Closed loop against `GET /healthz`.
    Bare,
    /// Closed loop of verified and committed callbacks.
    Committed,
    /// Callbacks at a fixed rate.
    OpenLoop,
}

/// What the writer did during one phase.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CommitDelta {
    commits: f64,
    jobs: f64,
    seconds: f64,
}

impl CommitDelta {
    fn of(samples: &std::collections::HashMap<String, f64>) -> Self {
        let get = |k: &str| samples.get(k).copied().unwrap_or(0.0);
        Self {
            commits: get("friendhook_commit_writes_count"),
            jobs: get("friendhook_commit_writes_sum"),
            seconds: get("friendhook_commit_seconds_sum"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            commits: self.commits - before.commits,
            jobs: self.jobs - before.jobs,
            seconds: self.seconds - before.seconds,
        }
    }
}

impl Phases {
    fn new(addr: SocketAddr, pid: u32) -> Self {
        // A new connection for each scrape: the scrapes are a phase apart, and a pooled
        // connection the service had just closed for idleness (`--idle-timeout`, shorter than a
        // phase if set so) would fail the scrape and leave that phase out of the group-commit
        // table.
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap_or_default();
        Self { addr, pid, http, cpu_rows: Vec::new(), commit_rows: Vec::new() }
    }

    /// The writer's counters now; `None` if `/metrics` cannot be read (the table is then left out).
    async fn commits(&self) -> Option<CommitDelta> {
        let r = self.http.get(format!("http://{}/metrics", self.addr)).send().await.ok()?;
        Some(CommitDelta::of(&crate::metrics::parse_samples(&r.text().await.ok()?)))
    }

    /// Runs one load phase and prints its row.
    async fn run(
        &mut self,
        phase: Phase,
        label: &str,
        load: impl Future<Output = anyhow::Result<load::LoadResult>>,
    ) -> anyhow::Result<load::LoadResult> {
        let commits_before = self.commits().await;
        let before = cpu::CpuSample::take(self.pid);
        let result = load.await?;
        if let (Some(before), Some(after)) = (before, cpu::CpuSample::take(self.pid)) {
            self.cpu_rows.push((phase, label.to_string(), before.until(&after, result.completed)));
        }
        if let (Some(before), Some(after)) = (commits_before, self.commits().await)
            && after.commits > before.commits
        {
            self.commit_rows.push((label.to_string(), after.since(before)));
        }
        println!("{}", row(label, &result));
        Ok(result)
    }

    fn print_tables(&self) {
        if !self.cpu_rows.is_empty() {
            println!("\nCPU per request (the client shares the machine with the service)");
            println!(
                "{:<34} {:>12} {:>12} {:>12} {:>14}",
                "phase", "service µs", "client µs", "idle CPU", "CPU-bound /s"
            );
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let mut bare_rate = None;
            let mut bound_ratios = Vec::new();
            for (phase, label, used) in &self.cpu_rows {
                // A fixed-rate phase is not limited by CPU; its cost per request includes waking
                // up for each one.
                let rate = if *phase == Phase::OpenLoop { None } else { used.cpu_bound_rate(cores) };
                match (phase, rate) {
                    (Phase::Bare, _) => bare_rate = rate,
                    (Phase::Committed, Some(rate)) => bound_ratios.extend(bare_rate.map(|bare| rate / bare)),
                    _ => {}
                }
                println!(
                    "{label:<34} {:>12.1} {:>12.1} {:>11.0}% {:>14}",
                    used.service_us_per_request,
                    used.client_us_per_request,
                    100.0 * used.machine_idle,
                    rate.map_or_else(|| "-".to_string(), |r| format!("{r:.0}"))
                );
            }
            if !bound_ratios.is_empty() {
                println!(
                    "CPU-bound /s: what {cores} cores would sustain at that CPU per request with none idle. Their \
                     committed / bare ratio, {:.2}{}, is the most these costs allow on this machine.",
                    median(&mut bound_ratios),
                    if bound_ratios.len() > 1 { " (median)" } else { "" }
                );
            }
        }
        if !self.commit_rows.is_empty() {
            println!("\nGroup commit (from the service's /metrics: writes per commit, time to write and commit them)");
            println!("{:<34} {:>12} {:>12} {:>12}", "phase", "commits", "writes each", "avg ms");
            for (label, d) in &self.commit_rows {
                println!(
                    "{label:<34} {:>12.0} {:>12.1} {:>12.2}",
                    d.commits,
                    d.jobs / d.commits.max(1.0),
                    1e3 * d.seconds / d.commits.max(1.0)
                );
            }
        }
    }
}

async fn bench_trigger(a: TriggerArgs) -> anyhow::Result<()> {
    let rate = a.rate_limit.max(1).to_string();
    let svc = ServiceProcess::start(
        a.binary.as_deref(),
        &["--easemob-rate-limit", &rate, "--sandbox-rate-limit", &rate, "--sandbox-friend-limit", "100000"],
    )
    .await?;
    let base = format!("http://{}", svc.addr);
    let sandbox = format!("http://{}", svc.sandbox_addr);
    println!(
        "friendhook bench trigger: {} friend additions, rate limit {}/s on the client and the sandbox",
        a.adds, a.rate_limit
    );
    // Users, registered through the embedded client (they share the sandbox's rate budget).
    let mut cfg = crate::easemob::ClientConfig::new(
        sandbox.clone(),
        "demo-org",
        "demo-app",
        "sandbox-client-id",
        crate::secret::Secret::new("sandbox-client-secret"),
    );
    cfg.rate_limit_per_sec = a.rate_limit.max(1);
    let client = crate::easemob::EasemobClient::new(cfg, crate::clock::system())?;
    let users = (a.adds * 2).max(2);
    let names: Vec<String> = (0..users).map(|i| format!("bench_{i}")).collect();
    for chunk in names.chunks(60) {
        let batch: Vec<crate::easemob::NewUser> = chunk
            .iter()
            .map(|n| crate::easemob::NewUser { username: n.clone(), password: "pw".into(), nickname: None })
            .collect();
        client.register_users(&batch).await.map_err(|e| anyhow::anyhow!("registering users: {e}"))?;
    }
    let http = reqwest::Client::new();
    // Start from a clean window: registrations used part of this second's budget.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before: serde_json::Value = http.get(format!("{sandbox}/_sandbox/stats")).send().await?.json().await?;
    let started = Instant::now();
    let mut succeeded = 0usize;
    for (k, chunk) in names.chunks(2).collect::<Vec<_>>().chunks(1000).enumerate() {
        let pairs: Vec<serde_json::Value> =
            chunk.iter().filter(|p| p.len() == 2).map(|p| serde_json::json!({"owner": p[0], "friend": p[1]})).collect();
        let resp: serde_json::Value = http
            .post(format!("{base}/v1/friends/batch"))
            .json(&serde_json::json!({"pairs": pairs}))
            .send()
            .await?
            .json()
            .await?;
        succeeded += resp["results"].as_array().map_or(0, |r| r.iter().filter(|c| c["outcome"] == "succeeded").count());
        crate::console::note(format_args!("  batch {} done ({succeeded} succeeded so far)", k + 1));
    }
    let elapsed = started.elapsed();
    let after: serde_json::Value = http.get(format!("{sandbox}/_sandbox/stats")).send().await?.json().await?;
    // Wait (bounded) for every callback to be stored, then read the latency from reconciliation.
    let deadline = Instant::now() + Duration::from_secs(60);
    let summary = loop {
        let r: serde_json::Value = http.get(format!("{base}/v1/reconciliation?limit=1")).send().await?.json().await?;
        if r["summary"]["matched"].as_u64().unwrap_or(0) as usize >= succeeded || Instant::now() > deadline {
            break r["summary"].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let d = |k: &str| after[k].as_i64().unwrap_or(0) - before[k].as_i64().unwrap_or(0);
    println!("{:<36} {:>10}", "friend additions triggered", a.adds);
    println!("{:<36} {:>10}", "succeeded", succeeded);
    println!("{:<36} {:>10.1} /s", "throughput", a.adds as f64 / elapsed.as_secs_f64().max(1e-9));
    println!("{:<36} {:>10}", "429s drawn from the sandbox", d("rate_limited"));
    println!("{:<36} {:>10}", "callbacks matched", summary["matched"]);
    let l = &summary["match_latency_ms"];
    println!(
        "{:<36} {:>7} ms {:>7} ms {:>7} ms",
        "trigger to stored callback p50/p99/max", l["p50"], l["p99"], l["max"]
    );
    let (_, _dir) = svc.stop().await?;
    Ok(())
}

async fn seeded_store(a: &SeedArgs) -> anyhow::Result<Store> {
    let url = format!("sqlite://{}", a.database.display());
    if a.database.exists() {
        // A file seeded by an older friendhook gets this one's schema first (what `serve` would
        // do at start-up), so the queries timed are the ones this binary runs. Under the service's
        // instance lock: opening closes calls left without an outcome as `unknown`, which, beside
        // a service running on this file, would be its calls still in flight.
        let opts = StoreOptions { instance_lock: true, ..StoreOptions::new(url.clone()) };
        Store::open(opts, crate::clock::system()).await?.close().await;
        let store = Store::open_read_only(&url).await?;
        let n = store.count_callbacks().await?;
        println!("reusing {} ({n} callbacks)", a.database.display());
        return Ok(store);
    }
    println!("seeding {} with {} calls and {} callbacks ...", a.database.display(), a.calls, a.callbacks);
    let started = Instant::now();
    let store = Store::open(StoreOptions::new(url.clone()), crate::clock::system()).await?;
    // A week of history ending now: about 6,000 calls per hour at a million calls.
    let span_ms = 7 * 24 * 3_600_000i64;
    let step = (span_ms / a.calls.max(1) as i64).max(1);
    let start = SystemClock.now_ms() - span_ms;
    let mut last_print = Instant::now();
    store
        .seed_bulk(SeedSpec { calls: a.calls, callbacks: a.callbacks, start_ms: start, step_ms: step }, |n| {
            if last_print.elapsed() > Duration::from_secs(2) {
                crate::console::note(format_args!("  ... {n} rows"));
                last_print = Instant::now();
            }
        })
        .await?;
    store.close().await;
    println!("seeded in {:.1} s", started.elapsed().as_secs_f64());
    Ok(Store::open_read_only(&url).await?)
}

async fn bench_reconcile(a: SeedArgs) -> anyhow::Result<()> {
    let store = seeded_store(&a).await?;
    let now = SystemClock.now_ms();
    let params = MatchParams { skew_ms: 5_000, window_ms: 300_000, now_ms: now };
    let hour = 3_600_000;
    let mid = now - 3 * 24 * hour;
    let mut window_times = Vec::new();
    let mut summary_times = Vec::new();
    let mut last = None;
    for k in 0..5 {
        let q = ReportQuery {
            since_ms: Some(mid + k * hour),
            until_ms: Some(mid + (k + 1) * hour),
            limit: 100,
            ..Default::default()
        };
        let t = Instant::now();
        let r = report::build(&store, &q, params).await?;
        window_times.push(t.elapsed());
        let t = Instant::now();
        let lean = report::summary(&store, mid + k * hour, mid + (k + 1) * hour, params).await?;
        summary_times.push(t.elapsed());
        anyhow::ensure!(lean == r.summary, "the summary differs from the report's: {lean:?} / {:?}", r.summary);
        last = Some(r.summary);
    }
    window_times.sort();
    summary_times.sort();
    if let Some(s) = last {
        println!(
            "one-hour window: median {:.1} ms, max {:.1} ms over 5 windows (last: matched {}, missing {}, not_expected {}, orphan {})",
            window_times[2].as_secs_f64() * 1e3,
            window_times[4].as_secs_f64() * 1e3,
            s.matched,
            s.missing,
            s.not_expected,
            s.orphan
        );
        println!(
            "one-hour window, summary only (what /metrics computes): median {:.1} ms, max {:.1} ms",
            summary_times[2].as_secs_f64() * 1e3,
            summary_times[4].as_secs_f64() * 1e3
        );
    }
    let t = Instant::now();
    let r = report::build(&store, &ReportQuery { limit: 100, ..Default::default() }, params).await?;
    let s = r.summary;
    println!(
        "full summary over everything: {:.2} s (matched {}, pending {}, missing {}, not_expected {}, unexpected {}, orphan {}; p50 {:?} ms, p99 {:?} ms)",
        t.elapsed().as_secs_f64(),
        s.matched,
        s.pending,
        s.missing,
        s.not_expected,
        s.unexpected,
        s.orphan,
        s.match_latency_ms.p50,
        s.match_latency_ms.p99
    );
    // Reconciliation holds both sides of its range in memory: what the service (or `friendhook
    // reconcile`) needs for a full summary of this database. Seeding, when this run seeded, is
    // included.
    if let Some(rss) = peak_rss_of(std::process::id()) {
        println!("peak RSS of this process: {:.0} MB", rss as f64 / 1e6);
    }

    // What `/metrics` computes for its trailing window: the summary alone, which holds only the
    // callbacks a call could explain. Over as many calls as an hour at Easemob's 100 calls/s.
    // Its own peak: the kernel's high-water mark is reset first (`clear_refs`), so it starts at
    // what the allocator kept from the full summary.
    let start_rss = reset_peak_rss();
    let span_ms = 7 * 24 * hour * 360_000 / a.calls.max(360_000) as i64;
    let t = Instant::now();
    let s = report::summary(&store, mid - span_ms / 2, mid + span_ms / 2, params).await?;
    println!(
        "summary only (what /metrics computes), {} calls and {} orphan callbacks in the window: {:.2} s",
        s.matched + s.pending + s.missing + s.not_expected + s.unexpected,
        s.orphan,
        t.elapsed().as_secs_f64()
    );
    if let (Some(start), Some(peak)) = (start_rss, peak_rss_of(std::process::id())) {
        println!(
            "peak RSS during that summary: {:.0} MB (at its start: {:.0} MB)",
            peak as f64 / 1e6,
            start as f64 / 1e6
        );
    }
    let q = ReportQuery {
        since_ms: Some(mid - span_ms / 2),
        until_ms: Some(mid + span_ms / 2),
        limit: 1,
        ..Default::default()
    };
    let full = report::build(&store, &q, params).await?.summary;
    anyhow::ensure!(s == full, "the summary differs from the report's: {s:?} / {full:?}");
    Ok(())
}

/// Resets this process's peak RSS to its current RSS (Linux `clear_refs`) and returns that, if
/// the kernel allows it.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    peak_rss_of(std::process::id())
}

async fn bench_feed(a: SeedArgs) -> anyhow::Result<()> {
    use crate::commands::export::{Format, Layout};
    let store = seeded_store(&a).await?;
    let t = Instant::now();
    let mut sink = std::io::sink();
    let everything = (0, i64::MIN, i64::MAX);
    let n =
        crate::commands::export::export(&store, everything, Layout::quiet(Format::Ndjson), &mut sink).await?.records;
    let secs = t.elapsed().as_secs_f64();
    println!("feed export (NDJSON): {n} records in {secs:.2} s = {:.0} lines/s", n as f64 / secs.max(1e-9));
    let t = Instant::now();
    let n = crate::commands::export::export(&store, everything, Layout::quiet(Format::Csv), &mut sink).await?.records;
    let secs = t.elapsed().as_secs_f64();
    println!("feed export (CSV):    {n} records in {secs:.2} s = {:.0} lines/s", n as f64 / secs.max(1e-9));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_are_read_from_the_service_start_up_lines() {
        let mut announced = Announced::default();
        announced.read(
            "2026-11-26T01:13:35.967323Z  INFO friendhook::commands::serve: sandbox mode: no --easemob-base-url, so the \
             built-in Easemob sandbox plays Easemob sandbox=http://127.0.0.1:41695 org=demo-org app=demo-app \
             client_id=sandbox-client-id callback_url=http://127.0.0.1:41325/callbacks/easemob",
        );
        assert_eq!(announced.sandbox, Some("127.0.0.1:41695".parse().expect("addr")));
        assert_eq!(announced.addr, None, "the callback URL is not the listening address line");
        announced.read(
            "2026-11-26T01:13:35.968Z  INFO friendhook::commands::serve: friendhook is listening; callbacks go to POST \
             http://127.0.0.1:41325/callbacks/easemob addr=127.0.0.1:41325 database=sqlite:///tmp/b.db scheme=easemob",
        );
        assert_eq!(announced.addr, Some("127.0.0.1:41325".parse().expect("addr")));
        let mut other = Announced::default();
        other.read("2026-11-26T01:13:35Z  WARN friendhook::store: remote_addr=127.0.0.1:9 something");
        assert_eq!(other, Announced::default());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [0.31, 0.23, 0.27]), 0.27);
        assert_eq!(median(&mut [0.4, 0.2, 0.3, 0.1]), 0.25);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn bench_callbacks_of_different_runs_are_different_events_and_verify() {
        let secret = "s";
        let a = bench_callback(7, 12, secret, 1_700_000_000_000);
        let b = bench_callback(8, 12, secret, 1_700_000_000_000);
        let parse = |body: &str| crate::callback::parse(body.as_bytes()).expect("parses");
        let secrets = [crate::secret::Secret::new(secret)];
        for body in [&a, &b] {
            let e = parse(body);
            let security = e.security.as_deref().expect("signed");
            assert_eq!(
                crate::signature::easemob::verify(&e.call_id, &e.timestamp_text, security, &secrets).ok(),
                Some(0)
            );
        }
        assert_ne!(parse(&a).dedup_key, parse(&b).dedup_key);
        assert_ne!(parse(&a).dedup_key, parse(&bench_callback(7, 13, secret, 1_700_000_000_000)).dedup_key);
    }
}
