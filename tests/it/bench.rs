//! `friendhook bench`, the benchmark users run, end to end on the real binary: short phases and
//! few connections, so it checks what the command reports and that nothing was lost, never how
//! fast anything was (figures are only checked to be numbers).

use std::time::Duration;

use crate::process::BIN;

/// Runs `friendhook bench ARGS` in a scratch directory, within two minutes.
async fn bench_output(args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let run =
        tokio::process::Command::new(BIN).arg("bench").args(args).current_dir(dir.path()).kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("bench finished").expect("bench ran")
}

/// Runs `friendhook bench ARGS` in a scratch directory and returns its stdout; panics with both
/// streams if it fails.
async fn bench(args: &[&str]) -> String {
    let out = bench_output(args).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

/// The line starting with `label`, split into whitespace-separated fields after the label.
fn fields<'a>(out: &'a str, label: &str) -> Vec<&'a str> {
    let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"));
    line[label.len()..].split_whitespace().collect()
}

#[tokio::test]
async fn bench_ingest_reports_every_phase_and_that_every_acknowledged_callback_was_stored() {
    let out = bench(&[
        "ingest",
        "--connections",
        "4",
        "--duration",
        "300ms",
        "--rounds",
        "2",
        "--rate",
        "100",
        "--open-loop-duration",
        "300ms",
    ])
    .await;
    for label in [
        "bare HTTP (GET /healthz) #1",
        "verified + committed (POST) #1",
        "bare HTTP (GET /healthz) #2",
        "verified + committed (POST) #2",
        "open loop at 100/s (from schedule)",
    ] {
        let row = fields(&out, label);
        assert_eq!(row.len(), 5, "req/s, p50, p99, p99.9, non-2xx in {row:?}");
        assert!(row[0].parse::<f64>().expect("req/s") >= 0.0, "{label}: {row:?}");
        assert_eq!(row[4], "0", "{label}: no request may fail");
    }
    for label in ["ratio committed / bare #1", "ratio committed / bare #2", "median ratio of 2 rounds"] {
        let ratio: f64 = fields(&out, label)[0].parse().expect("ratio");
        assert!(ratio >= 0.0, "{label}: {ratio}");
    }
    // "durability  acknowledged N, stored N: equal"
    let durability = fields(&out, "durability");
    assert_eq!(durability[0], "acknowledged");
    let acknowledged: u64 = durability[1].trim_end_matches(',').parse().expect("acknowledged");
    // Each closed-loop connection sends at least once per round, and the open loop sends all 30.
    assert!(acknowledged >= 2 * 4 + 30, "{out}");
    assert_eq!(durability[2..], ["stored", &format!("{acknowledged}:"), "equal"], "{out}");
    if cfg!(target_os = "linux") {
        assert!(out.contains("CPU per request"), "{out}");
        let cpu = out.split("CPU per request").nth(1).expect("CPU table");
        for label in ["verified + committed (POST) #2", "open loop at 100/s (from schedule)"] {
            let row = fields(cpu, label);
            assert_eq!(row.len(), 4, "service µs, client µs, idle %, CPU-bound rate in {row:?}");
            // Figures only: a short phase on a busy machine may use less CPU than one clock tick.
            for value in &row[..2] {
                assert!(value.parse::<f64>().expect("µs per request") >= 0.0, "{row:?}");
            }
            assert!(row[2].ends_with('%'), "{row:?}");
            // A closed loop's rate is a number unless it used no measurable CPU; a fixed rate has none.
            let open = label.starts_with("open loop");
            assert!(if open { row[3] == "-" } else { row[3] == "-" || row[3].parse::<f64>().is_ok() }, "{row:?}");
        }
    }
    // The writer's commits during each callback phase, read from the service's /metrics.
    let commits = out.split("Group commit").nth(1).unwrap_or_else(|| panic!("no group-commit table in:\n{out}"));
    for label in ["verified + committed (POST) #1", "verified + committed (POST) #2", "open loop at 100/s"] {
        let row = fields(commits, label);
        let row: Vec<f64> = row[row.len() - 3..].iter().map(|v| v.parse().expect("a number")).collect();
        assert!(row[0] >= 1.0, "{label}: at least one commit: {row:?}");
        assert!((1.0..=512.0).contains(&row[1]), "{label}: writes per commit within 1..=--max-batch: {row:?}");
        assert!(row[2] > 0.0, "{label}: a commit takes time: {row:?}");
    }
}

#[tokio::test]
async fn bench_trigger_adds_friends_at_the_limit_without_a_429_and_matches_every_callback() {
    let out = bench(&["trigger", "--adds", "20"]).await;
    assert_eq!(fields(&out, "succeeded"), ["20"], "{out}");
    assert_eq!(fields(&out, "429s drawn from the sandbox"), ["0"], "{out}");
    assert_eq!(fields(&out, "callbacks matched"), ["20"], "{out}");
}

#[tokio::test]
async fn bench_reconcile_seeds_times_the_queries_and_finds_the_lean_summary_equal_to_the_report() {
    // A small seed; the command itself fails if `/metrics`' summary differs from the report's.
    let out = bench(&["reconcile", "--calls", "20000", "--callbacks", "24000"]).await;
    assert!(out.contains("seeding friendhook-bench-1m.db with 20000 calls and 24000 callbacks"), "{out}");
    let window = fields(&out, "one-hour window:");
    assert_eq!(window[0], "median");
    assert!(window[1].parse::<f64>().is_ok(), "{out}");
    let lean = fields(&out, "one-hour window, summary only (what /metrics computes):");
    assert!(lean[1].parse::<f64>().is_ok(), "{out}");
    let full = fields(&out, "full summary over everything:");
    assert!(full[0].parse::<f64>().is_ok(), "{out}");
    // 20,000 calls, of which the seed leaves 3% rejected and 2% failed (not expecting a callback).
    assert!(out.contains("not_expected 1000,"), "{out}");
    let busy = fields(&out, "summary only (what /metrics computes),");
    let busy_calls: u64 = busy[0].parse().expect("a count of calls");
    assert!(busy_calls > 10_000, "the busy-hour window spans most of this small seed: {out}");
    assert!(out.lines().any(|l| l.starts_with("peak RSS of this process:")), "{out}");
}

#[tokio::test]
async fn bench_refuses_a_database_a_running_service_holds() {
    // Opening a reused file closes calls left without an outcome as `unknown`: beside a running
    // service those would be its calls still in flight, so the bench takes the service's lock.
    let app = crate::helpers::TestApp::spawn(&[]).await;
    let db = app.db_path.to_str().expect("utf-8 path").to_owned();
    let out = bench_output(&["reconcile", "--database", &db]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is in use by another friendhook service"), "{stderr}");
    app.stop().await;
}
