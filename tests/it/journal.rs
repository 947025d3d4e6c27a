//! The feed, the audit chain and `friendhook audit verify`.

use friendhook::commands::audit::{FileCheck, Progress};
use serde_json::Value;

use crate::helpers::*;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_friendhook")
}

async fn feed_page(app: &TestApp, after: i64, limit: i64) -> Vec<Value> {
    let r = app.client.get(app.url(&format!("/v1/feed?after={after}&limit={limit}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn feed_pages_through_everything_across_a_restart_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("feed.db");
    let app = TestApp::spawn_on(&db, &[]).await;
    for i in 0..30 {
        let body = roster_body(&format!("9{i:03}"), "alice", &format!("f{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    let mut seen: Vec<i64> = Vec::new();
    let mut after = 0;
    // read a first part, then restart the service in the middle of the consumer's run
    for _ in 0..2 {
        let page = feed_page(&app, after, 7).await;
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        seen.extend(page.iter().map(|r| r["seq"].as_i64().unwrap()));
    }
    app.stop().await;
    let app = TestApp::spawn_on(&db, &[]).await;
    for i in 30..40 {
        let body = roster_body(&format!("9{i:03}"), "bob", &format!("f{i}"), "add", 1_700_000_000_000 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    loop {
        let page = feed_page(&app, after, 7).await;
        let Some(last) = page.last() else { break };
        after = last["seq"].as_i64().unwrap();
        for r in &page {
            assert_eq!(r["kind"], "callback");
            assert!(
                r["owner"].is_string()
                    && r["friend"].is_string()
                    && r["event_time"].is_i64()
                    && r["received_time"].is_i64()
            );
        }
        seen.extend(page.iter().map(|r| r["seq"].as_i64().unwrap()));
    }
    assert_eq!(seen, (1..=40).collect::<Vec<i64>>(), "every record exactly once, in order");
    app.stop().await;
}

#[tokio::test]
async fn feed_long_poll_returns_as_soon_as_something_is_stored() {
    let app = TestApp::spawn(&[]).await;
    let client = app.client.clone();
    let url = app.url("/v1/feed?after=0&wait=30s");
    let waiter = tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() });
    // The waiter cannot finish before something is stored: nothing is there yet.
    let body = roster_body("555", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let text =
        tokio::time::timeout(std::time::Duration::from_secs(20), waiter).await.expect("long-poll answered").unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1);
    app.stop().await;
}

/// A stop answers a waiting long-poll at once, with the empty page and where the reader stands,
/// rather than holding the shutdown for the poll's wait and then cutting it off unanswered.
#[tokio::test]
async fn a_stop_answers_a_waiting_long_poll_with_the_empty_page() {
    let mut app = TestApp::spawn(&[]).await;
    let waiter = app.waiting_long_poll().await;

    app.begin_stop();

    let response = tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
        .await
        .expect("answered before its 60 s wait")
        .expect("task")
        .expect("an HTTP answer, not a closed connection");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-last-seq"], "0");
    assert_eq!(response.text().await.expect("body"), "");
    app.stop().await;
}

async fn feed_response(app: &TestApp, query: &str) -> (u16, Option<i64>, Vec<Value>) {
    let r = app.client.get(app.url(&format!("/v1/feed?{query}"))).send().await.unwrap();
    let status = r.status().as_u16();
    let last = r.headers().get("x-last-seq").map(|v| v.to_str().unwrap().parse().unwrap());
    let text = r.text().await.unwrap();
    let records = if status == 200 {
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    } else {
        vec![serde_json::from_str(&text).unwrap()]
    };
    (status, last, records)
}

#[tokio::test]
async fn a_time_filtered_feed_moves_past_what_it_does_not_match() {
    let app = TestApp::spawn(&[]).await;
    let t0 = 1_700_000_000_000;
    for i in 0..6 {
        let body = roster_body(&format!("61{i}"), "alice", &format!("u{i}"), "add", t0 + i, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }

    // Nothing before t0: the answer is empty, but the reader is past all six records.
    let (status, last, records) = feed_response(&app, &format!("after=0&until={t0}")).await;
    assert_eq!((status, last, records.len()), (200, Some(6), 0));

    // A window matching some: a short page resumes after its last record, the end of a
    // complete page at the head.
    let (_, last, records) = feed_response(&app, &format!("after=0&since={}&limit=2", t0 + 3)).await;
    let seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!((seqs, last), (vec![4, 5], Some(5)), "cut at the limit: resume after its last record");
    let (_, last, records) = feed_response(&app, &format!("after=5&since={}&limit=2", t0 + 3)).await;
    let seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!((seqs, last), (vec![6], Some(6)));

    // Later records matching the window still arrive after the cursor moved on.
    let body = roster_body("619", "carol", "dave", "add", t0 - 10, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let (_, last, records) = feed_response(&app, &format!("after=6&until={t0}")).await;
    assert_eq!(last, Some(7));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["owner"], "carol");
    app.stop().await;
}

#[tokio::test]
async fn a_cursor_beyond_the_journal_is_refused() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("620", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);

    let (status, last, records) = feed_response(&app, "after=1").await;
    assert_eq!((status, last, records.len()), (200, Some(1), 0), "at the head: nothing new yet");

    let (status, _, error) = feed_response(&app, "after=2&wait=30s").await;
    assert_eq!(status, 400, "refused at once, not held for the wait");
    assert_eq!(error[0]["code"], "cursor_ahead");
    assert!(error[0]["detail"].as_str().unwrap().contains("last seq (1)"), "{}", error[0]);
    app.stop().await;
}

/// `X-Last-Hash` travels with the cursor; sent back as `after_hash`, it tells this journal from
/// another one that has grown past the same seq (a replaced database, an older copy restored).
#[tokio::test]
async fn a_cursor_with_its_hash_is_refused_by_another_journal_of_the_same_length() {
    async fn page(app: &TestApp, query: &str) -> (u16, Option<String>, Option<String>, String) {
        let r = app.client.get(app.url(&format!("/v1/feed?{query}"))).send().await.unwrap();
        let header = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let (status, last, hash) = (r.status().as_u16(), header("x-last-seq"), header("x-last-hash"));
        (status, last, hash, r.text().await.unwrap())
    }
    let read = TestApp::spawn(&[]).await;
    let other = TestApp::spawn(&[]).await;
    for (app, prefix) in [(&read, "630"), (&other, "631")] {
        let (_, last, hash, _) = page(app, "after=0").await;
        assert_eq!((last.as_deref(), hash.as_deref()), (Some("0"), Some(&"0".repeat(64)[..])), "the chain's start");
        for i in 0..5 {
            let body =
                roster_body(&format!("{prefix}{i}"), "alice", &format!("u{i}"), "add", 1_700_000_000_000 + i, SECRET);
            assert_eq!(app.post_callback(body).await.status(), 200);
        }
    }
    let (status, last, hash, _) = page(&read, "after=0&limit=3").await;
    assert_eq!((status, last.as_deref()), (200, Some("3")));
    let hash = hash.expect("X-Last-Hash");
    let (_, record3) = read.get_json("/v1/callbacks/3").await;
    assert_eq!(record3["chain_hash"], hash.as_str(), "the link of the record at X-Last-Seq");

    // The journal it came from goes on from it (the hash in either case).
    let (status, last, _, body) = page(&read, &format!("after=3&after_hash={}", hash.to_uppercase())).await;
    assert_eq!((status, last.as_deref(), body.lines().count()), (200, Some("5"), 2), "{body}");

    // Another journal of the same length answers the same seq with another link.
    let (status, _, _, body) = page(&other, &format!("after=3&after_hash={hash}")).await;
    assert_eq!(status, 409, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "cursor_mismatch");
    assert!(error["detail"].as_str().unwrap().contains("another database, or an older copy"), "{error}");
    // Without the hash, it cannot tell.
    assert_eq!(page(&other, "after=3").await.0, 200);
    // A wait longer than the most there is is refused, as a `limit` too large is.
    let (status, _, _, body) = page(&read, "after=5&wait=61s").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`wait` is at most 60s, got 61s"), "{body}");
    let (status, _, _, body) = page(&read, "after=0&limit=10001").await;
    assert!(status == 400 && body.contains("got 10001"), "{body}");
    // Something that is not a link at all is a malformed query, not another database.
    let (status, _, _, body) = page(&read, "after=3&after_hash=abc").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_query") && body.contains("64 hex digits"), "{body}");
    read.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn calls_and_callbacks_share_the_feed_in_seq_order_and_export_as_ndjson_and_csv() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice", "bob"]).await;
    let (status, _) = app.post_json("/v1/friends", serde_json::json!({"owner": "alice", "friend": "bob"})).await;
    assert_eq!(status, 201);
    let (status, refused) =
        app.post_json("/v1/friends", serde_json::json!({"owner": "alice", "friend": "nobody"})).await;
    assert_eq!((status, refused["upstream_status"].as_i64()), (201, Some(404)), "{refused}");
    app.settle().await;

    let (_, last, feed) = feed_response(&app, "after=0").await;
    let seqs: Vec<i64> = feed.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "one journal, no gaps");
    assert_eq!(last, seqs.last().copied());
    let kinds: Vec<&str> = feed.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "call").count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"callback"), "the sandbox's roster callback is stored: {kinds:?}");
    let rejected = feed.iter().find(|r| r["outcome"] == "rejected").expect("the refused call");
    assert_eq!(rejected["upstream_status"], 404);
    assert_eq!(rejected["outcome_detail"], refused["outcome_detail"], "the call record's detail: {rejected}");
    assert!(feed.iter().all(|r| r.get("outcome_detail").is_some()), "every key on every line");

    let db_url = app.db_url.clone();
    let _dir = app.stop().await;
    let export = |format: &str| {
        let out = std::process::Command::new(bin())
            .args(["export", "--database-url", &db_url, "--format", format])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let ndjson: Vec<Value> = export("ndjson").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ndjson, feed, "the export holds the feed's records");

    let csv = export("csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let fields: Vec<&str> = feed[0].as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted_header = header.clone();
    sorted_header.sort_unstable();
    let mut sorted_fields = fields.clone();
    sorted_fields.sort_unstable();
    assert_eq!(sorted_header, sorted_fields, "one CSV column per feed field");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), feed.len());
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rejected_row = rows.iter().find(|r| r[column("outcome")] == "rejected").expect("rejected row");
    assert_eq!(rejected_row[column("upstream_status")], "404");
    assert_eq!(rejected_row[column("upstream_error")], rejected["upstream_error"].as_str().unwrap());
    assert_eq!(rejected_row[column("outcome_detail")], rejected["outcome_detail"].as_str().unwrap());

    // Incremental: the closing line names where the export read up to and its link; --after
    // goes on from there, and --after-hash refuses a seq whose link is another.
    let run = |extra: &[&str]| {
        let out =
            std::process::Command::new(bin()).args(["export", "--database-url", &db_url]).args(extra).output().unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let head = seqs.len() as i64;
    let link = |seq: i64| feed_link(&db_url, seq);
    let (ok, _, stderr) = run(&[]);
    assert!(ok && stderr.contains(&format!("read up to seq {head}, link {}", link(head))), "{stderr}");
    let (ok, _, stderr) = run(&["--after", &(head + 1).to_string()]);
    assert!(!ok && stderr.contains("beyond this journal's last seq"), "{stderr}");
    let middle = head / 2;
    let (_, _, stderr) = run(&["--until", "0"]);
    assert!(stderr.contains("exported 0 records") && stderr.contains(&format!("read up to seq {head}")), "{stderr}");
    // That cursor is past the records the range left out: it is offered for the same range only,
    // with where an export without the range starts again.
    assert!(
        stderr.contains(&format!("what is new in the same range goes on with --until 0 --after {head}"))
            && stderr.contains("an export without the range starts again from --after 0"),
        "{stderr}"
    );
    let (_, _, stderr) = run(&[]);
    assert!(!stderr.contains("range"), "no range, no caveat: {stderr}");
    // A duration back from now is noted as the time it stood for; every record here is recent.
    let (ok, stdout, stderr) = run(&["--since", "1h", "--until", "0s"]);
    assert!(ok && stderr.starts_with("--since 1h: --since 1"), "{stderr}");
    assert!(stderr.contains("--until 0s: --until 1"), "{stderr}");
    // The cursor's range as resolved, not `1h` (which an hour later is another range).
    assert!(
        stderr.contains("in the same range goes on with --since 1") && !stderr.contains("with --since 1h"),
        "{stderr}"
    );
    assert_eq!(stdout.lines().count(), feed.len(), "the last hour holds every record: {stderr}");
    let (ok, stdout, stderr) = run(&["--after", &middle.to_string(), "--after-hash", &link(middle)]);
    assert!(ok, "{stderr}");
    let rest: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rest, feed[middle as usize..], "the records after --after");
    // (How many callbacks the sandbox sends varies, so `middle` may be 1: no record's link is
    // all `a`s.)
    let (ok, stdout, stderr) = run(&["--after", &middle.to_string(), "--after-hash", &"a".repeat(64)]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(stderr.contains(&format!("the record at seq {middle} carries the link")), "{stderr}");

    // Under --log-format json, stderr is JSON lines only, progress included, and the closing
    // line gives the cursor as fields.
    let out = std::process::Command::new(bin())
        .args(["--log-format", "json", "export", "--database-url", &db_url, "--progress-every", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let progress: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["message"].as_str().filter(|m| m.starts_with("exported ") && m.ends_with("/s)")))
        .collect();
    // Progress is told between pages, and one page of 10,000 holds them all, whatever
    // --progress-every asks for: a line for the page.
    assert_eq!(progress.len(), 1, "--progress-every 1: a line per page: {lines:#?}");
    assert!(progress[0].starts_with(&format!("exported {head} records (")), "{progress:?}");
    let closing = lines.last().expect("a closing line");
    assert_eq!(
        (closing["read_up_to"].as_i64(), closing["link"].as_str()),
        (Some(head), Some(link(head).as_str())),
        "{closing}"
    );
    assert_eq!(closing["records"].as_i64(), Some(head), "{closing}");
}

/// A service's database after it stored `count` additions from alice (msg ids from `prefix`) and
/// stopped: its path, its URL, and the directory that keeps it.
async fn stopped_with_adds_from_alice(
    prefix: &str,
    count: i64,
) -> (std::path::PathBuf, String, Option<tempfile::TempDir>) {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice(prefix, count).await;
    let (db_path, db_url) = (app.db_path.clone(), app.db_url.clone());
    (db_path, db_url, app.stop().await)
}

/// The chain link of the record at `seq`, read from the file.
fn feed_link(db_url: &str, seq: i64) -> String {
    let out = std::process::Command::new("sqlite3")
        .arg(db_url.trim_start_matches("sqlite://"))
        .arg(format!(
            "SELECT chain_hash FROM callbacks WHERE seq = {seq} UNION ALL SELECT chain_hash FROM calls WHERE seq = {seq}"
        ))
        .output()
        .expect("sqlite3 is installed");
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(link.len(), 64, "seq {seq} has a link: {}", String::from_utf8_lossy(&out.stderr));
    link
}

/// Runs `sqlite3` on the file: the tests' stand-in for someone with write access to it.
pub fn sqlite(db_path: &std::path::Path, sql: &str) {
    let out = std::process::Command::new("sqlite3")
        .arg(db_path)
        .arg(sql)
        .output()
        .expect("sqlite3 is installed (.ci/run installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What sqlite3 prints for `sql` on the file.
pub fn sqlite_out(db_path: &std::path::Path, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3").arg(db_path).arg(sql).output().expect("sqlite3 is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `friendhook audit rebuild-user-index --database-url db_url`, run to its end.
fn rebuild_user_index(db_url: &str) -> std::process::Output {
    std::process::Command::new(bin()).args(["audit", "rebuild-user-index", "--database-url", db_url]).output().unwrap()
}

/// `friendhook audit verify --database-url db_url extra...`: exit code, stdout, stderr.
fn audit_verify(db_url: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--database-url", db_url])
        .args(extra)
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn audit_verify_passes_on_an_intact_database_and_fails_after_an_edit() {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice("8", 5).await;
    let (_, head) = app.get_json("/v1/audit/head").await;
    assert_eq!(head["seq"], 5);
    assert_eq!(head["hash"].as_str().unwrap().len(), 64);
    let db_path = app.db_path.clone();
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;

    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: 5 records"));
    let (code, out, _) = audit_verify(&db_url, &["--json"]);
    assert_eq!(code, Some(0), "{out}");
    let intact: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(intact["verdict"], "intact", "{intact}");
    assert_eq!((intact["records"].as_i64(), &intact["head"]), (Some(5), &head), "{intact}");
    assert_eq!(intact["in_flight"], serde_json::json!({"count": 0, "ids": []}), "{intact}");
    assert_eq!(intact["integrity_check"], "passed", "{intact}");
    let (_, out, _) = audit_verify(&db_url, &["--json", "--skip-integrity-check"]);
    let skipped: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(skipped["integrity_check"], "skipped", "not `false`, which reads as failed: {skipped}");

    // An attacker with file access: drop the append-only trigger and rewrite a stored event.
    sqlite(&db_path, "DROP TRIGGER callbacks_immutable; UPDATE callbacks SET to_user = 'mallory' WHERE seq = 3;");

    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("seq 3"), "names the first bad record: {out}");
    let (code, out, _) = audit_verify(&db_url, &["--json"]);
    assert_eq!(code, Some(1), "{out}");
    let broken: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(broken["verdict"], "broken", "{broken}");
    assert!(broken["problem"].as_str().unwrap().starts_with("seq 3 "), "{broken}");
    assert!(broken["next"].as_str().unwrap().starts_with("keep this file as it is"), "no label in a field: {broken}");

    let (code, out, err) = audit_verify("sqlite:///nonexistent/dir/x.db", &["--json"]);
    assert_eq!(code, Some(2), "{out}{err}");
    let not_checked: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(not_checked["verdict"], "not_checked", "{not_checked}");
    assert!(err.contains("could not be checked"), "{err}");
}

/// Seqs have no gaps, so a record removed behind friendhook's back shows in the first page that
/// spans it: the export goes on, and says so.
#[tokio::test]
async fn an_export_over_a_record_removed_from_the_file_warns_of_the_gap() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("9", 5).await;
    let export = |extra: &[&str]| {
        let out =
            std::process::Command::new(bin()).args(["export", "--database-url", &db_url]).args(extra).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (_, stderr) = export(&[]);
    assert!(!stderr.contains("warning"), "an intact journal: {stderr}");

    sqlite(&db_path, "DROP TRIGGER callbacks_no_delete; DELETE FROM callbacks WHERE seq = 3;");
    let (stdout, stderr) = export(&[]);
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stderr.contains("warning: the journal lacks 1 record(s) between seq 1 and 5: records were removed"),
        "{stderr}"
    );
    // Progress every two records does not make pages of two (small pages slow a large export
    // down several times): one page spans the gap, as without it.
    let (_, stderr) = export(&["--progress-every", "2"]);
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    assert!(stderr.contains("lacks 1 record(s) between seq 1 and 5"), "{stderr}");
    assert_eq!(stderr.matches("exported 4 records (").count(), 1, "progress once, after the page: {stderr}");
    // Filtered by event time, a page skips seqs by design: nothing to say.
    let (_, stderr) = export(&["--since", "2000-01-01T00:00:00Z"]);
    assert!(!stderr.contains("warning"), "{stderr}");

    // A cursor on the removed record: no link to compare, so the export goes on, and says why
    // nothing vouches for what follows; with the link it had, refused as removed, not as
    // "another database".
    let removed = "there is no record at seq 3, although this journal goes on to seq 5: it was removed";
    let (stdout, stderr) = export(&["--after", "3"]);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stderr.contains(&format!("warning: {removed}")) && stderr.contains("audit verify"), "{stderr}");
    let out = std::process::Command::new(bin())
        .args(["export", "--database-url", &db_url, "--after", "3", "--after-hash", &"b".repeat(64)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(stderr.contains(removed) && stderr.contains("Nothing was written"), "{stderr}");
    let app = TestApp::spawn_on(&db_path, &[]).await;
    let answer =
        app.client.get(app.url(&format!("/v1/feed?after=3&after_hash={}", "b".repeat(64)))).send().await.unwrap();
    assert_eq!(answer.status(), 409);
    let error: Value = answer.json().await.unwrap();
    assert_eq!(error["code"], "cursor_mismatch");
    assert!(error["detail"].as_str().unwrap().contains(removed), "{error}");
    let _dir = app.stop().await;
}

#[tokio::test]
async fn a_calls_outcome_detail_is_written_once_and_chained() {
    let app = TestApp::spawn(&[]).await;
    app.register(&["alice"]).await;
    let (status, call) = app.post_json("/v1/friends", serde_json::json!({"owner": "alice", "friend": "nobody"})).await;
    assert_eq!((status, call["outcome"].as_str()), (201, Some("rejected")), "{call}");
    assert!(call["outcome_detail"].is_string(), "{call}");
    let seq = call["seq"].as_i64().unwrap();
    // The answer and the record carry the outcome's chain link, to cite it.
    let link = call["chain_hash"].as_str().expect("a chained outcome has its link").to_string();
    let (_, read) = app.get_json(&format!("/v1/calls/{}", call["id"])).await;
    assert_eq!(read["chain_hash"], link.as_str(), "{read}");
    let db_path = app.db_path.clone();
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;
    assert_eq!(feed_link(&db_url, seq), link);
    assert_eq!(audit_verify(&db_url, &["--expect-head", &format!("{seq}:{link}")]).0, Some(0));
    assert_eq!(audit_verify(&db_url, &[]).0, Some(0), "a record with a detail verifies");

    let edit = format!("UPDATE calls SET outcome_detail = 'all fine' WHERE seq = {seq};");
    let out = std::process::Command::new("sqlite3").arg(&db_path).arg(&edit).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("a call outcome is recorded once"), "{out:?}");

    sqlite(&db_path, &format!("DROP TRIGGER calls_outcome_once; {edit}"));
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("seq {seq}")), "names the edited call: {out}");
}

/// A call closed by a restart (here as not sent; `unknown` ones alike) records no attempt: its
/// `attempts` is 0, and NULL in its place was read as 0 and carried the same link. It is named as
/// an edit now.
#[tokio::test]
async fn a_chained_calls_attempts_edited_to_null_is_found() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("76", 1).await;
    // An intent without an outcome, as a crash leaves it: the next start closes it (not sent).
    sqlite(
        &db_path,
        "INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms) VALUES ('add', 'alice', 'bob', 'alice|bob', 1)",
    );
    TestApp::spawn_on(&db_path, &[]).await.stop().await;
    let (seq, attempts) =
        (sqlite_out(&db_path, "SELECT seq FROM calls"), sqlite_out(&db_path, "SELECT attempts FROM calls"));
    assert_eq!(attempts, "0", "closed without an attempt");
    assert_eq!(audit_verify(&db_url, &[]).0, Some(0));

    sqlite(&db_path, "DROP TRIGGER calls_outcome_once; UPDATE calls SET attempts = NULL;");
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("seq {seq} (call id 1): cannot be read as stored")), "{out}");
}

#[tokio::test]
async fn a_database_of_schema_6_is_upgraded_with_its_chain_intact_and_records_details_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v6.db");
    let call = database_where_alice_added_bob(&db).await;
    let db_url = format!("sqlite://{}", db.display());
    // Schema 6 as an earlier release left it: no `outcome_detail`, the trigger without it.
    sqlite(
        &db,
        "DROP TRIGGER calls_outcome_once; ALTER TABLE calls DROP COLUMN outcome_detail; \
         CREATE TRIGGER calls_outcome_once BEFORE UPDATE OF completed_at_ms, outcome, upstream_status, upstream_error, \
         attempts, response_body, seq, prev_hash, chain_hash ON calls WHEN OLD.outcome IS NOT NULL \
         BEGIN SELECT RAISE(ABORT, 'a call outcome is recorded once'); END; \
         DELETE FROM _sqlx_migrations WHERE version = 7;",
    );

    let app = TestApp::spawn_on(&db, &[]).await;
    let (status, refused) =
        app.post_json("/v1/friends", serde_json::json!({"owner": "alice", "friend": "nobody"})).await;
    assert_eq!((status, refused["outcome"].as_str()), (201, Some("rejected")), "{refused}");
    assert!(refused["outcome_detail"].is_string(), "{refused}");
    let (_, old) = app.get_json(&format!("/v1/calls/{}", call["id"])).await;
    assert!(old["outcome_detail"].is_null() && old["outcome"] == "succeeded", "{old}");
    app.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "records from before and after the upgrade verify: {out}");
}

/// A call in flight when a friendhook of schema 9 stopped may have been sent (that version marked
/// nothing): the upgrade marks it so, and it is closed `unknown`, as that version would have.
#[tokio::test]
async fn a_call_left_in_flight_by_schema_9_is_closed_unknown_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("v9.db");
    database_where_alice_added_bob(&db).await;
    let db_url = format!("sqlite://{}", db.display());
    sqlite(
        &db,
        "DROP TRIGGER calls_sent_once; ALTER TABLE calls DROP COLUMN sent_at_ms; \
         DELETE FROM _sqlx_migrations WHERE version = 10; \
         INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms) VALUES ('add', 'alice', 'carol', 'k', 1);",
    );

    let app = TestApp::spawn_on(&db, &[]).await;
    let (_, call) = app.get_json("/v1/calls/2").await;
    assert_eq!(call["outcome"], "unknown", "{call}");
    app.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("note: 1 call(s) were closed as `unknown` by a restart (ids 2)"), "{out}");
}

/// Time bounds take RFC 3339 with any offset (Easemob's users are mostly on UTC+8), and a range
/// with `since` after `until` is refused rather than answered with nothing.
#[tokio::test]
async fn time_bounds_take_any_offset_and_a_swapped_range_is_refused() {
    let app = TestApp::spawn(&[]).await;
    for i in 0..3 {
        let body =
            roster_body(&format!("78{i}"), "alice", &format!("u{i}"), "add", 1_700_000_000_000 + i * 1000, SECRET);
        assert_eq!(app.post_callback(body).await.status(), 200);
    }
    // 1_700_000_001_000 ms is 2023-11-14T22:13:21Z, i.e. 2023-11-15T06:13:21+08:00.
    for since in ["1700000001000", "2023-11-14T22:13:21Z", "2023-11-15T06:13:21%2B08:00"] {
        let (status, page) = app.get_json(&format!("/v1/callbacks?since={since}")).await;
        assert_eq!(status, 200, "{since}: {page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 2, "{since}: {page}");
    }
    for path in ["/v1/callbacks", "/v1/calls", "/v1/reconciliation", "/v1/feed"] {
        let (status, err) = app.get_json(&format!("{path}?since=2000&until=1000")).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")), "{path}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("swap them"), "{path}: {err}");
    }
    app.stop().await;
}

/// A call forged with the seq that ends a page of the walk is still read and named: a page is
/// never cut between two records of one seq. Walked in pages of 2 here (5,000 in the command).
#[tokio::test]
async fn a_record_forged_with_the_seq_that_ends_a_page_is_found() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("76", 4).await;
    // A plain INSERT: no trigger stands in its way.
    sqlite(
        &db_path,
        "INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms, completed_at_ms, outcome, upstream_status, \
         attempts, seq, prev_hash, chain_hash) VALUES ('add', 'mallory', 'u1', 'k', 1, 2, 'succeeded', 200, 1, 2, 'x', 'y');",
    );

    let store = friendhook::store::Store::open_read_only(&db_url).await.unwrap();
    let verdict = friendhook::commands::audit::verify_in_pages(&store, None, 2).await.unwrap();
    let friendhook::commands::audit::Verdict::Broken(problem) = verdict else { panic!("not found: {verdict:?}") };
    assert!(problem.contains("seq 2 (call id 1)"), "{problem}");
    store.close().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("What next: keep this file as it is"), "says what to do: {out}");
}

/// `audit verify` lists the calls without an outcome, which the chain cannot vouch for yet (a
/// call inserted outside friendhook looks like one), and fails when the append-only triggers
/// were dropped, even if what is left is consistent.
#[tokio::test]
async fn audit_verify_lists_calls_without_outcome_and_fails_without_its_guards() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("friendhook.db");
    database_where_alice_added_bob(&db).await;
    let db_url = format!("sqlite://{}", db.display());
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("no outcome"), "{out}");

    sqlite(
        &db,
        "INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms) VALUES ('add', 'mallory', 'alice', 'k', 1);",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("note: 1 call(s) have no outcome yet (ids 2)"), "{out}");
    // And one marked sent, as a call whose request left is.
    sqlite(
        &db,
        "INSERT INTO calls (op, owner, friend, pair_key, requested_at_ms, sent_at_ms) \
         VALUES ('add', 'mallory', 'bob', 'k2', 1, 2);",
    );
    // The next start closes them (not sent, and `unknown`) and chains them: still named, since
    // nothing can tell them from calls a crash interrupted.
    TestApp::spawn_on(&db, &[]).await.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("note: 1 call(s) were closed as `failed`, not sent, by a restart (ids 2)"), "{out}");
    assert!(out.contains("note: 1 call(s) were closed as `unknown` by a restart (ids 3)"), "{out}");
    let (_, json, _) = audit_verify(&db_url, &["--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
    assert_eq!(json["closed_not_sent"], serde_json::json!({"count": 1, "ids": [2]}), "{json}");
    assert_eq!(json["closed_unknown"], serde_json::json!({"count": 1, "ids": [3]}), "{json}");

    // Redefined under its own name to guard nothing: as good as dropped.
    sqlite(
        &db,
        "DROP TRIGGER calls_immutable; CREATE TRIGGER calls_immutable BEFORE UPDATE OF owner ON calls WHEN 0 \
         BEGIN SELECT 1; END;",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("append-only trigger(s) calls_immutable (altered) were dropped, redefined or added"), "{out}");

    // One added by hand that keeps a user's callbacks out.
    sqlite(
        &db,
        "CREATE TRIGGER zz_filter BEFORE INSERT ON callbacks WHEN NEW.to_user = 'u3' BEGIN SELECT RAISE(IGNORE); END;",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("calls_immutable (altered), zz_filter (not friendhook's)"), "{out}");
    sqlite(&db, "DROP TRIGGER zz_filter;");

    sqlite(&db, "DROP TRIGGER calls_no_delete;");
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("append-only trigger(s) calls_no_delete, calls_immutable (altered) were dropped"), "{out}");
}

/// A long walk reports its progress (on stderr, in `audit verify`), every so many records.
#[tokio::test]
async fn audit_verify_reports_its_progress_through_a_long_chain() {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice("9", 5).await;
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;
    let store = friendhook::store::Store::open_read_only(&db_url).await.unwrap();
    let mut seen = Vec::new();
    let verdict = friendhook::commands::audit::verify_reporting(
        &store,
        None,
        2,
        (2, &mut |p| seen.push(p)),
        FileCheck::Integrity,
    )
    .await
    .unwrap();
    assert!(matches!(verdict, friendhook::commands::audit::Verdict::Intact { records: 5, .. }), "{verdict:?}");
    assert_eq!(seen, [Progress::Records(2), Progress::Records(4), Progress::IntegrityCheck]);
    store.close().await;
}

/// The lookup by user is derived from the events, not chained: deleting its entries hid events
/// from `from`/`to` queries while `audit verify` said intact. It is now compared with the events.
#[tokio::test]
async fn audit_verify_finds_a_lookup_by_user_that_disagrees_with_the_events() {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice("8", 3).await;
    let (db_path, db_url) = (app.db_path.clone(), app.db_url.clone());
    let _dir = app.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");

    sqlite(
        &db_path,
        "DELETE FROM callback_users WHERE user_id = 'alice' AND seq = 2; \
         INSERT INTO callback_users (role, bucket, user_id, seq) VALUES (0, 0, 'mallory', 1);",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("disagrees with the events: 1 entries missing, 1 that no event has"), "{out}");

    // The remedy it names works: refused while a service holds the database, then the lookup is
    // emptied and the service rebuilds it at its next start.
    assert!(out.contains("friendhook audit rebuild-user-index"), "{out}");
    let rebuild = || rebuild_user_index(&db_url);
    let running = TestApp::spawn_on(&db_path, &[]).await;
    let refused = rebuild();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use"), "{refused:?}");
    running.stop().await;
    sqlite(
        &db_path,
        "DELETE FROM callback_users WHERE user_id = 'alice' AND seq = 3;          INSERT INTO callback_users (role, bucket, user_id, seq) VALUES (0, 0, 'mallory', 2);",
    );
    let done = rebuild();
    assert!(done.status.success(), "{done:?}");
    assert!(String::from_utf8_lossy(&done.stdout).contains("emptied the lookup by user"), "{done:?}");
    TestApp::spawn_on(&db_path, &[]).await.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test]
async fn audit_verify_detects_an_edited_raw_body_and_a_deleted_record() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("7", 4).await;
    let sql = |statements: &str| sqlite(&db_path, statements);
    sql(
        "DROP TRIGGER callbacks_immutable; UPDATE callbacks SET raw_body = replace(raw_body, 'u1', 'zz') WHERE seq = 2;",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("seq 2"));

    sql(
        "UPDATE callbacks SET raw_body = replace(raw_body, 'zz', 'u1') WHERE seq = 2; DROP TRIGGER callbacks_no_delete; DROP TRIGGER callback_deliveries_no_delete; DELETE FROM callback_deliveries WHERE callback_id = (SELECT id FROM callbacks WHERE seq = 3); DELETE FROM callbacks WHERE seq = 3;",
    );
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("seq 3 is missing"), "{out}");
}

/// Records cut from the end leave a consistent, shorter chain; what else in the file refers to
/// their seqs gives it away, and the verdict says so instead of blaming the lookup by user.
#[tokio::test]
async fn audit_verify_notices_records_removed_from_the_end() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("74", 4).await;
    // The stop brought the lookup by user up to the head: it refers to seq 4.
    assert_eq!(sqlite_out(&db_path, "SELECT upto_seq FROM callback_users_progress"), "4");
    let schema = sqlite_out(&db_path, "SELECT sql || ';' FROM sqlite_master WHERE name = 'callbacks_no_delete'");
    sqlite(&db_path, &format!("DROP TRIGGER callbacks_no_delete; DELETE FROM callbacks WHERE seq = 4; {schema}"));

    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("ends at seq 3") && out.contains("refers to seq 4"), "{out}");
    assert!(out.contains("removed from the end"), "{out}");
    assert!(!out.contains("rebuild-user-index"), "the lookup is not to blame: {out}");

    // A service started on it would give seq 4 to its next record, and the trace would be gone:
    // it is refused, before anything is written, unless the operator says to go on.
    let refused = friendhook::commands::serve::build(&serve_args(&db_url, &[]), friendhook::clock::system()).await;
    let err = format!("{:#}", refused.err().expect("refused"));
    assert!(err.contains("the journal ends at seq 3, but the file still refers to seq 4"), "{err}");
    assert!(err.contains("--accept-journal-cut"), "{err}");
    assert_eq!(sqlite_out(&db_path, "SELECT max(seq) FROM callbacks"), "3", "nothing was written");
    let app = TestApp::spawn_on(&db_path, &["--accept-journal-cut"]).await;
    assert_eq!(
        app.post_callback(roster_body("749", "alice", "u9", "add", 1_700_000_000_009, SECRET)).await.status(),
        200
    );
    app.stop().await;
    assert_eq!(sqlite_out(&db_path, "SELECT to_user FROM callbacks WHERE seq = 4"), "u9", "seq 4 went to the new one");
    // The lookup by user still has the removed record's entries; the remedy verify names clears it.
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rebuild-user-index"), "{out}");
    let rebuilt = rebuild_user_index(&db_url);
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    TestApp::spawn_on(&db_path, &[]).await.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
}

/// A file SQLite cannot read (bytes edited, cut short) fails the check, exit 1 with what to do,
/// rather than exit 2 as if it could not be looked at.
#[tokio::test]
async fn audit_verify_calls_a_damaged_file_broken() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("77", 3).await;
    let mut bytes = std::fs::read(&db_path).unwrap();
    // Every page's header but the first's (which names the schema): a B-tree page type SQLite
    // does not know.
    for header in (4096..bytes.len()).step_by(4096) {
        bytes[header] = 0xff;
    }
    std::fs::write(&db_path, bytes).unwrap();
    let (code, out, err) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("BROKEN: the file is damaged") && out.contains("What next"), "{out}");
}

/// An index rewritten through the file's schema (its definition put back as it was, its content
/// without a row) hides that row from every query through it while each record and its link
/// are intact: SQLite's integrity check, which `audit verify` runs after its walk, finds it.
#[tokio::test]
async fn audit_verify_finds_an_index_forged_to_hide_a_row() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("78", 5).await;
    let call_id = sqlite_out(&db_path, "SELECT call_id FROM callbacks WHERE seq = 3");
    let through_index =
        format!("SELECT count(*) FROM callbacks INDEXED BY callbacks_by_call_id WHERE call_id = '{call_id}'");
    assert_eq!(sqlite_out(&db_path, &through_index), "1");
    sqlite(
        &db_path,
        "DROP INDEX callbacks_by_call_id;
         CREATE INDEX callbacks_by_call_id ON callbacks (call_id) WHERE seq <> 3;
         PRAGMA writable_schema = ON;
         UPDATE sqlite_master SET sql = 'CREATE INDEX callbacks_by_call_id ON callbacks (call_id)'
           WHERE name = 'callbacks_by_call_id';",
    );
    assert_eq!(sqlite_out(&db_path, &through_index), "0", "the forged index hides the callback");

    let (code, out, err) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("BROKEN: the chain is intact, but SQLite's integrity check"), "{out}");
    assert!(out.contains("callbacks_by_call_id") && out.contains("REINDEX"), "{out}");
    assert!(err.contains("now SQLite's integrity check of the file"), "{err}");
    // What skipping it leaves out, as its --help says.
    let (code, out, _) = audit_verify(&db_url, &["--skip-integrity-check"]);
    assert_eq!(code, Some(0), "{out}");

    // The remedy the verdict names.
    sqlite(&db_path, "REINDEX");
    assert_eq!(sqlite_out(&db_path, &through_index), "1");
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "{out}");
}

/// An index dropped, redefined or added by hand changes no record, so the chain is intact; but
/// a missing one fails the reconciliation, and an added unique one refuses events. `audit
/// verify` names each and gives the SQL that puts friendhook's back, which works.
#[tokio::test]
async fn audit_verify_names_indexes_unlike_friendhooks_and_how_to_put_them_back() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("79", 3).await;
    sqlite(
        &db_path,
        "DROP INDEX callbacks_roster_by_id; DROP INDEX calls_by_pair; CREATE INDEX calls_by_pair ON calls (pair_key); \
         CREATE UNIQUE INDEX one_event_per_pair ON callbacks (from_user, to_user, operation);",
    );
    let (code, out, err) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(
            "BROKEN: the chain is intact, but the index(es) calls_by_pair (altered), callbacks_roster_by_id (missing), \
             one_event_per_pair (not friendhook's) differ from friendhook's"
        ),
        "{out}"
    );
    let remedy = out.split("sqlite3 FILE \"").nth(1).and_then(|rest| rest.split('"').next()).expect("the SQL to run");
    assert!(!remedy.contains('\n'), "one line, to paste: {remedy}");

    // Meanwhile the reports that read through the missing index say which it is and where the
    // cure is, instead of SQLite's bare "no such index".
    let reconcile = std::process::Command::new(bin()).args(["reconcile", "--database-url", &db_url]).output().unwrap();
    let said = String::from_utf8_lossy(&reconcile.stderr);
    assert_eq!(reconcile.status.code(), Some(1), "{said}");
    assert!(
        said.contains("no index `callbacks_roster_by_id`") && said.contains("friendhook audit verify --database-url"),
        "{said}"
    );
    let app = TestApp::spawn_on(&db_path, &[]).await;
    let (status, body) = app.get_json("/v1/reconciliation").await;
    assert_eq!((status, body["code"].as_str()), (503, Some("index_missing")), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| d.contains("friendhook audit verify")), "{body}");
    // Still ready (callbacks are received), but a monitor polling /readyz sees what differs.
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")), "{ready}");
    assert_eq!(
        ready["schema"]["indexes"],
        serde_json::json!([
            "calls_by_pair (altered)",
            "callbacks_roster_by_id (missing)",
            "one_event_per_pair (not friendhook's)"
        ]),
        "{ready}"
    );
    assert_eq!(ready["schema"]["triggers"], serde_json::json!([]), "{ready}");
    assert!(ready["schema"]["detail"].as_str().is_some_and(|d| d.contains("friendhook audit verify")), "{ready}");
    let _dir = app.stop().await;

    sqlite(&db_path, remedy);
    let app = TestApp::spawn_on(&db_path, &[]).await;
    let (_, ready) = app.get_json("/readyz").await;
    assert_eq!(ready["schema"], "ok", "after the remedy: {ready}");
    let _dir = app.stop().await;
    let (code, out, _) = audit_verify(&db_url, &[]);
    assert_eq!(code, Some(0), "after the remedy: {out}");
    let (_, json, _) = audit_verify(&db_url, &["--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).expect("json")["verdict"], "intact", "{json}");
}

#[tokio::test]
async fn audit_verify_names_rows_slipped_in_below_the_chain_or_made_unreadable() {
    let (db_path, db_url, _dir) = stopped_with_adds_from_alice("75", 3).await;
    let sql = |statements: &str| sqlite(&db_path, statements);
    let verify = || {
        let (code, out, _) = audit_verify(&db_url, &[]);
        (code, out)
    };

    // No trigger stands in the way of an INSERT: a forged event with seq 0 (reconciliation and
    // the read API would count it) must not pass as outside the chain.
    sql(
        "INSERT INTO callbacks (seq, dedup_key, call_id, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, \
         body_sha256, prev_hash, chain_hash, chat_type, operation, from_user, to_user) \
         SELECT 0, 'forged', call_id, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, body_sha256, \
         prev_hash, chain_hash, chat_type, operation, from_user, 'mallory' FROM callbacks WHERE seq = 1;",
    );
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("seq 0") && out.contains("outside the chain"), "{out}");
    // The lowest seq there is, too: a walk reading "after i64::MIN" would pass over it.
    sql("DROP TRIGGER callbacks_no_delete; DELETE FROM callbacks WHERE seq = 0; \
         INSERT INTO callbacks (seq, dedup_key, call_id, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, \
         body_sha256, prev_hash, chain_hash, chat_type, operation, from_user, to_user) \
         SELECT -9223372036854775808, 'forged', call_id, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, \
         body_sha256, prev_hash, chain_hash, chat_type, operation, from_user, 'mallory' FROM callbacks WHERE seq = 1;");
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("seq -9223372036854775808") && out.contains("outside the chain"), "{out}");
    sql("DELETE FROM callbacks WHERE seq < 1;");
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the chain is intact, but the append-only trigger(s) callbacks_no_delete"), "{out}");

    // A body edited to bytes that are not UTF-8 is a broken record, not an error.
    sql("DROP TRIGGER callbacks_immutable; UPDATE callbacks SET raw_body = CAST(x'7bff7d' AS TEXT) WHERE seq = 2;");
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("seq 2") && out.contains("body edited"), "{out}");
}

#[tokio::test]
async fn audit_verify_checks_a_head_published_earlier_and_exits_2_when_it_cannot_check() {
    let app = TestApp::spawn(&[]).await;
    let post = |i: i64| roster_body(&format!("76{i}"), "alice", &format!("u{i}"), "add", 1_700_000_000_000 + i, SECRET);
    for i in 0..3 {
        assert_eq!(app.post_callback(post(i)).await.status(), 200);
    }
    let (_, head) = app.get_json("/v1/audit/head").await;
    let published = format!("{}:{}", head["seq"], head["hash"].as_str().unwrap());
    for i in 3..5 {
        assert_eq!(app.post_callback(post(i)).await.status(), 200);
    }
    let db_url = app.db_url.clone();
    let _dir = app.stop().await;
    let verify = |extra: &[&str]| {
        let (code, out, err) = audit_verify(&db_url, extra);
        (code, format!("{out}{err}"))
    };

    let (code, out) = verify(&["--expect-head", &published]);
    assert_eq!(code, Some(0), "records stored after publishing are fine: {out}");
    assert!(
        out.contains("intact: 5 records") && out.contains(&format!("passes through the published head {published}")),
        "{out}"
    );

    let other = format!("3:{}", "0".repeat(64));
    let (code, out) = verify(&["--expect-head", &other]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not the published") && out.contains("published by another database"), "{out}");
    assert!(out.contains("make sure that head is this database's"), "given a head, not told to give one: {out}");
    assert!(!out.contains("run this check with --expect-head"), "{out}");

    let (code, out) = verify(&["--expect-head", &format!("9:{}", "0".repeat(64))]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("removed from the end"), "{out}");

    let (code, out) = verify(&["--expect-head", &format!("{published}junk")]);
    assert_eq!(code, Some(2), "a malformed head is a usage error: {out}");
    assert!(out.contains("--expect-head: HASH") && out.contains("64 hex digits"), "{out}");
    // Under --json too, with the object a monitoring job reads on stdout.
    let (code, stdout, _) = audit_verify(&db_url, &["--json", "--expect-head", "5:abc"]);
    assert_eq!(code, Some(2), "{stdout}");
    let not_checked: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(not_checked["verdict"], "not_checked", "{not_checked}");
    assert!(not_checked["error"].as_str().unwrap().contains("--expect-head"), "{not_checked}");

    let (code, _, err) = audit_verify("sqlite:///nonexistent/friendhook.db", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("could not be checked"), "{err}");
}

#[tokio::test]
async fn stored_rows_cannot_be_deleted_or_edited_through_sql_while_triggers_stand() {
    let app = TestApp::spawn(&[]).await;
    let body = roster_body("61", "alice", "bob", "add", 1_700_000_000_000, SECRET);
    assert_eq!(app.post_callback(body).await.status(), 200);
    let db_path = app.db_path.clone();
    let _dir = app.stop().await;
    // A busy timeout, as every client of a shared SQLite file should have: this once failed in a
    // full run with a message that was not kept (a transient lock is the likely reading).
    let o = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(&db_path)
        .arg("DELETE FROM callbacks;")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("append-only"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(&db_path)
        .arg("UPDATE callbacks SET raw_body = '{}';")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("append-only"), "{}", String::from_utf8_lossy(&o.stderr));
}
