//! `friendhook demo`: the whole loop on one machine in one command. Starts the service with its
//! sandbox, registers users, triggers a few hundred friend additions (some bound to fail), waits
//! for the callbacks, and prints what was called, what came back and how it reconciles.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, CommandFactory, FromArgMatches};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::config::{Cli, ServeArgs};
use crate::easemob::{ClientConfig, EasemobClient, NewUser};
use crate::secret::Secret;
use crate::store::Replaceable;

/// `friendhook demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Database for the demo, deleted and created afresh on every run. Refused (nothing deleted)
    /// if it is not a friendhook database, a service holds it, or it holds callbacks of another
    /// Easemob app than the sandbox's; give the demo a file of its own, not a service's
    /// database. The demo ignores the FRIENDHOOK_* variables of `serve`.
    #[arg(long, default_value = "friendhook-demo.db")]
    pub database: std::path::PathBuf,
    /// Friend additions to trigger.
    #[arg(long, default_value_t = 300, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub adds: usize,
    /// Users to register in the sandbox (at least 2: a user cannot befriend itself).
    #[arg(long, default_value_t = 120, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    pub users: usize,
    /// Sandbox friend limit (low, so that some additions hit 403 exceed_limit).
    #[arg(long, default_value_t = 8)]
    pub friend_limit: usize,
    /// Share of callbacks the sandbox drops (0..1), so that some calls end up `missing`.
    #[arg(long, default_value_t = 0.03, value_parser = crate::sandbox::config::parse_probability)]
    pub drop_rate: f64,
    /// Seed for the pairs and the sandbox's faults.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Keep serving after the report (Ctrl-C to stop), to explore the HTTP API.
    #[arg(long)]
    pub keep_running: bool,
    /// Where the service listens (with --keep-running you may want a fixed port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Where the sandbox playing Easemob listens (with --keep-running, a fixed port lets another
    /// client call it too).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sandbox_listen: String,
}

/// The demo service's match window: short, so that calls whose callback the sandbox dropped show
/// as `missing` within the demo's run.
const DEMO_MATCH_WINDOW: &str = "1s";

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let db_url = format!("sqlite://{}", args.database.display());
    // Everything that can refuse runs before the old demo database is deleted.
    match crate::store::check_replaceable(&db_url).await? {
        Replaceable::Nothing => {}
        // Every event the demo stores comes from its sandbox: one from another app means a
        // service's database (a copy of production, say) was given by mistake, and it is not
        // the demo's to delete.
        Replaceable::FriendhookDatabase => {
            let sandbox = crate::sandbox::SandboxConfig::default();
            let demo_appkey = format!("{}#{}", sandbox.org, sandbox.app);
            if let Some(appkey) = crate::store::other_apps_event(&db_url, &demo_appkey).await? {
                bail!(
                    "{} holds callbacks of the Easemob app `{appkey}`, not only the demo's (`{demo_appkey}`): it is a \
                     service's database, which the demo would delete. Give the demo a file of its own with \
                     --database (its default is friendhook-demo.db). Nothing was changed",
                    args.database.display()
                );
            }
        }
        Replaceable::Foreign => bail!(
            "{} exists and is not a friendhook database; the demo recreates its database on every run, so give \
             it a file of its own with --database. Nothing was changed",
            args.database.display()
        ),
    }
    // Both bound and let go at once: a port in use is refused before anything is deleted. Both
    // held together, so the same fixed port given twice is refused too.
    let service_port = std::net::TcpListener::bind(&args.listen).with_context(|| {
        format!("cannot listen on {} (--listen); is something else using it? Nothing was changed", args.listen)
    })?;
    let sandbox_port = std::net::TcpListener::bind(&args.sandbox_listen).with_context(|| {
        format!(
            "cannot listen on {} (--sandbox-listen); is something else using it? Nothing was changed",
            args.sandbox_listen
        )
    })?;
    drop((service_port, sandbox_port));
    for suffix in ["", "-wal", "-shm"] {
        let mut p = args.database.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let drop_rate = args.drop_rate.to_string();
    let friend_limit = args.friend_limit.to_string();
    let seed = args.seed.to_string();
    let argv = [
        "friendhook",
        "serve",
        "--listen",
        &args.listen,
        "--sandbox-listen",
        &args.sandbox_listen,
        "--database-url",
        &db_url,
        "--callback-secret",
        "demo-secret",
        "--sandbox-drop-rate",
        &drop_rate,
        "--sandbox-friend-limit",
        &friend_limit,
        "--sandbox-seed",
        &seed,
        "--sandbox-delay-ms",
        "200",
        "--match-window",
        DEMO_MATCH_WINDOW,
    ];
    // Only these arguments and the defaults: the environment of a shell set up for a real
    // service (FRIENDHOOK_API_TOKEN, FRIENDHOOK_ALLOW_FROM, ...) would make the demo's own
    // requests fail.
    let serve_command = Cli::command()
        .find_subcommand("serve")
        .cloned()
        .ok_or_else(|| anyhow!("the serve command is missing"))?
        .mut_args(|arg| arg.env(None));
    let serve_args = ServeArgs::from_arg_matches(&serve_command.try_get_matches_from(&argv[1..])?)?;
    let service = crate::commands::serve::build(&serve_args, crate::clock::system()).await?;
    let crate::commands::serve::Service { listener, router, limits, state, sandbox } = service;
    let sandbox = sandbox.ok_or_else(|| anyhow::anyhow!("demo needs sandbox mode"))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The demo stops once it has read the report: no callbacks to wait for by then.
    let server = tokio::spawn(crate::app::serve(
        listener,
        router,
        limits,
        async move {
            let _ = stop_rx.await;
        },
        std::future::ready(()),
    ));
    crate::outln!(
        "friendhook demo: service on {base}, sandbox (playing Easemob) on {}, database {}",
        sandbox.base_url(),
        args.database.display()
    );

    // Users, registered through the embedded client like any Easemob app back end would.
    let client = EasemobClient::new(
        ClientConfig::new(
            sandbox.base_url(),
            "demo-org",
            "demo-app",
            "sandbox-client-id",
            Secret::new("sandbox-client-secret"),
        ),
        crate::clock::system(),
    )?;
    let names: Vec<String> = (0..args.users).map(|i| format!("user_{i:03}")).collect();
    for chunk in names.chunks(60) {
        let users: Vec<NewUser> = chunk
            .iter()
            .map(|n| NewUser { username: n.clone(), password: "demo-password".into(), nickname: None })
            .collect();
        client.register_users(&users).await.map_err(|e| anyhow::anyhow!("registering users: {e}"))?;
    }
    crate::outln!("registered {} users (friend limit {} per user)", names.len(), args.friend_limit);

    // Pairs: mostly real users (some will hit the friend limit), a few unknown ones.
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let pairs: Vec<Value> = (0..args.adds)
        .map(|i| {
            let owner = &names[rng.random_range(0..names.len())];
            let friend = if i % 20 == 7 {
                format!("ghost_{i}")
            } else {
                loop {
                    let f = &names[rng.random_range(0..names.len())];
                    if f != owner {
                        break f.clone();
                    }
                }
            };
            json!({"owner": owner, "friend": friend})
        })
        .collect();
    let http = reqwest::Client::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut done = 0;
    for chunk in pairs.chunks(50) {
        let resp = answer(http.post(format!("{base}/v1/friends/batch")).json(&json!({"pairs": chunk})).send().await?)
            .await
            .context("triggering a batch of friend additions")?;
        for r in resp["results"].as_array().cloned().unwrap_or_default() {
            let key = match r["upstream_error"].as_str() {
                Some(e) => format!("{} ({e})", r["outcome"].as_str().unwrap_or("?")),
                None => r["outcome"].as_str().unwrap_or("?").to_string(),
            };
            *outcomes.entry(key).or_default() += 1;
        }
        done += chunk.len();
        crate::console::note(format_args!("  triggered {done}/{} friend additions", pairs.len()));
    }
    crate::outln!("\ncalls made to Easemob (POST /v1/friends/batch):");
    for (k, n) in &outcomes {
        crate::outln!("  {n:>5}  {k}");
    }

    crate::console::note("  waiting for the callbacks ...");
    let _ = tokio::time::timeout(Duration::from_secs(60), sandbox.wait_callbacks_settled()).await;
    // Let the 1 s match window close, so calls whose callback was dropped show as missing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stats = sandbox.stats();
    crate::outln!(
        "\ncallbacks: the sandbox sent {}, dropped {} on purpose; friendhook stored {}",
        stats.callbacks_sent,
        stats.callbacks_dropped,
        state.store.count_callbacks().await?
    );
    let report = answer(http.get(format!("{base}/v1/reconciliation?limit=1000")).send().await?)
        .await
        .context("reading the reconciliation")?;
    let mut attention = report.clone();
    if let Some(items) = attention["items"].as_array_mut() {
        items.retain(|i| matches!(i["status"].as_str(), Some("missing" | "unexpected" | "orphan")));
    }
    crate::outln!("\nreconciliation (GET /v1/reconciliation; items needing attention):");
    crate::out!("{}", crate::commands::reconcile::render_table(&attention, Some(&db_url)));

    if args.keep_running {
        // Listened for before the line is printed, so a Ctrl-C right after it is a clean stop.
        let mut signals = crate::app::StopSignals::listen()?;
        crate::outln!(
            "\nstill serving on {base} (Ctrl-C to stop); try: curl '{base}/v1/reconciliation?status=missing'"
        );
        signals.recv().await;
    } else {
        crate::outln!(
            "\nexplore the stored data afterwards (the same match window, so the same report):\n  \
             friendhook reconcile --database-url {db_url} --match-window {DEMO_MATCH_WINDOW}\n  \
             friendhook audit verify --database-url {db_url}"
        );
    }
    let _ = stop_tx.send(());
    server.await??;
    sandbox.shutdown().await;
    let store = state.store.clone();
    drop(state);
    store.close().await;
    Ok(())
}

/// The JSON of a successful answer from the demo's own service; any other answer is an error
/// that names its status and body.
async fn answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("the demo's service answered {status}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}
