//! `friendhook export` as a process: --output replaces the file only with a complete export
//! (whatever stops the run first), --no-header, and a reader that closes the pipe early.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;
use crate::journal::sqlite;
use crate::process::BIN;

/// A stopped service's database holding `count` additions from alice (seqs 1..=count, event
/// times 1_700_000_000_000 + seq - 1): its path, its URL, and the directory that keeps it.
async fn database_with_adds(prefix: &str, count: i64) -> (std::path::PathBuf, String, Option<tempfile::TempDir>) {
    let app = TestApp::spawn(&[]).await;
    app.store_adds_from_alice(prefix, count).await;
    let (db_path, db_url) = (app.db_path.clone(), app.db_url.clone());
    (db_path, db_url, app.stop().await)
}

/// Appends `count` roster callbacks after the journal's last seq, straight into the file: a
/// journal of hundreds of thousands of records in seconds, where the service would take
/// minutes. Their chain links are blank (the export does not check them; `audit verify` would).
fn grow_journal(db_path: &Path, count: u64) {
    sqlite(
        db_path,
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
             INSERT INTO callbacks (seq, dedup_key, call_id, msg_id, appkey, event_type, chat_type, operation,
                 from_user, to_user, timestamp_ms, received_at_ms, scheme, secret_index, raw_body, body_sha256,
                 prev_hash, chain_hash)
             SELECT head + i, 'bulk' || i, '{APPKEY}_bulk' || i, 'bulk' || i, '{APPKEY}', 'chat', 'roster', 'add',
                 'alice', 'friend' || i, 1700000000000 + head + i, 1700000000000 + head + i, 'easemob', 0, '{{}}',
                 '', '', ''
             FROM n, (SELECT max(seq) AS head FROM callbacks);"
        ),
    );
}

/// `friendhook export --database-url db_url extra...`: exit code, stdout, stderr.
fn export(db_url: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(["export", "--database-url", db_url]).args(extra).output().expect("run export");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A run that fails after it began writing (a record it cannot turn into a CSV row) leaves the
/// previous export as it was, with nothing beside it, and says so; a run that completes
/// replaces it whole.
#[tokio::test]
async fn an_export_to_a_file_that_fails_midway_leaves_the_previous_file() {
    let (db_path, db_url, _db_dir) = database_with_adds("x", 5).await;
    // Someone with write access to the file puts text where a time goes: SQLite renders it as
    // it is, the CSV conversion refuses it.
    sqlite(&db_path, "DROP TRIGGER callbacks_immutable; UPDATE callbacks SET received_at_ms = 'soon' WHERE seq = 3;");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.csv");
    std::fs::write(&file, "the previous export\n").unwrap();
    let output = file.to_str().unwrap();

    let (code, _, stderr) = export(&db_url, &["--format", "csv", "--output", output]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the record at seq 3 does not have a feed record's fields"), "{stderr}");
    assert!(stderr.contains(&format!("Nothing was written to {output}, which holds what it held before")), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "the previous export\n");
    assert_eq!(names(dir.path()), ["export.csv"], "no partial file left");

    // Refused before reading anything: the same.
    let (code, _, stderr) = export(&db_url, &["--after", "9", "--output", output]);
    assert!(code == Some(1) && stderr.contains("beyond this journal's last seq"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "the previous export\n");

    // NDJSON carries the record as stored: the run completes and replaces the file.
    let (code, stdout, stderr) = export(&db_url, &["--output", output]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty() && stderr.contains("exported 5 records"), "{stdout}\n{stderr}");
    let written = std::fs::read_to_string(&file).unwrap();
    let seqs: Vec<Value> = written.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].clone()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5].map(Value::from), "{written}");
    assert!(written.contains(r#""received_time":"soon""#), "{written}");
    assert_eq!(names(dir.path()), ["export.csv"], "no partial file left");
}

/// Runs `export --output FILE` over a large journal and sends `signal` once the export is
/// being written: the process ends with 128 + the signal's number, FILE keeps what it held,
/// and the partial file is removed.
fn signal_during_an_export(db_url: &str, signal: &str, expected_code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.ndjson");
    std::fs::write(&file, "the previous export\n").unwrap();
    let mut child = Command::new(BIN)
        .args(["export", "--database-url", db_url, "--output", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The partial file exists from before the first page is read (the signals are listened for
    // from before it is created) until the rename; the journal takes seconds to export.
    let partial = dir.path().join(format!(".export.ndjson.partial-{}", child.id()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !partial.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the export ended before it wrote anything");
        assert!(Instant::now() < deadline, "no {} within 60 s", partial.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -s {signal}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "the export finished before SIG{signal} (grow the journal): {stderr}");
    assert_eq!(out.status.code(), Some(expected_code), "SIG{signal}: {stderr}");
    assert!(
        stderr.contains(&format!("interrupted by SIG{signal}: nothing was written to {}", file.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("exported "), "no closing line: {stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "the previous export\n");
    assert_eq!(names(dir.path()), ["export.ndjson"], "no partial file left after SIG{signal}");
}

#[tokio::test]
async fn sigint_or_sigterm_during_an_export_to_a_file_leaves_the_previous_file() {
    let (db_path, db_url, _db_dir) = database_with_adds("s", 1).await;
    // 400,000 records: seconds of export, where the signal follows the partial file's creation
    // within milliseconds.
    grow_journal(&db_path, 400_000);
    signal_during_an_export(&db_url, "INT", 130);
    signal_during_an_export(&db_url, "TERM", 143);
}

/// `friendhook export | head -1`: the reader closes the pipe after a line, and the export
/// ends quietly with status 0, as tools in a pipeline do.
#[tokio::test]
async fn an_export_whose_reader_closes_the_pipe_ends_quietly() {
    let (db_path, db_url, _db_dir) = database_with_adds("p", 1).await;
    // Far more than a pipe holds (64 KiB), so that the export still writes after the reader left.
    grow_journal(&db_path, 5_000);
    for format in ["ndjson", "csv"] {
        let mut child = Command::new(BIN)
            .args(["export", "--database-url", &db_url, "--format", format])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.starts_with(if format == "csv" { "seq," } else { "{\"seq\":1," }), "{first}");
        // The reader (and with it the pipe) is gone here.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{format}: {stderr}");
        assert!(stderr.is_empty(), "{format}: nothing on stderr, no `Broken pipe`: {stderr}");
    }
}

/// `--no-header`: an incremental CSV export appended to the previous one reads as one export;
/// NDJSON, which has no header, refuses it.
#[tokio::test]
async fn no_header_leaves_the_csv_header_out_for_appending() {
    let (_db_path, db_url, _db_dir) = database_with_adds("h", 5).await;
    let (code, whole, stderr) = export(&db_url, &["--format", "csv"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(whole.starts_with("seq,kind,"), "{whole}");
    assert_eq!(whole.lines().count(), 6);
    // The first two records (event time before the third's), then what follows seq 2.
    let (code, first, stderr) = export(&db_url, &["--format", "csv", "--until", "1700000000002"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, rest, stderr) = export(&db_url, &["--format", "csv", "--after", "2", "--no-header"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(rest.starts_with("3,callback,"), "{rest}");
    assert_eq!(rest.lines().count(), 3, "{rest}");
    assert_eq!(first + &rest, whole);

    let (code, stdout, stderr) = export(&db_url, &["--no-header"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "a usage error, as clap's own: {stderr}");
    assert!(
        stderr.contains("--no-header leaves out the CSV header row") && stderr.contains("--format csv"),
        "{stderr}"
    );
    // --help says what it is for.
    let help = Command::new(BIN).args(["export", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--no-header") && help.contains("CSV only"), "{help}");
}

/// A named pipe as --output is written into, as standard output is, not replaced by a file
/// renamed over it (which, for /dev/stdout or /dev/null as root, would replace the device).
#[cfg(unix)]
#[tokio::test]
async fn an_output_that_is_a_pipe_is_written_into_not_replaced() {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let (_db_path, db_url, _db_dir) = database_with_adds("f", 5).await;
    let (code, expected, stderr) = export(&db_url, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("feed");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success());
    // Read and write: opening a pipe with a reader alone would wait for a writer. The export
    // (5 records) fits in the pipe's buffer, so it ends before anything is read.
    let mut pipe = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
    let (code, _, stderr) = export(&db_url, &["--output", fifo.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "still the pipe");
    assert_eq!(names(dir.path()), ["feed"], "no partial file");
    let mut written = vec![0; expected.len()];
    pipe.read_exact(&mut written).unwrap();
    assert_eq!(String::from_utf8(written).unwrap(), expected);
}
