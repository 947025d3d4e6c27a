//! `friendhook serve` refuses, before touching the database, settings that would silently do
//! something else than meant.

use std::str::FromStr;

use clap::Parser;
use friendhook::config::Cli;

use crate::helpers::*;

async fn refusal(db: &std::path::Path, extra: &[&str]) -> String {
    let args = serve_args(&format!("sqlite://{}", db.display()), extra);
    let err = friendhook::commands::serve::build(&args, friendhook::clock::system()).await.err().expect("refused");
    format!("{err:#}")
}

#[tokio::test]
async fn easemob_credentials_without_a_base_url_are_refused_instead_of_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("creds.db");
    let err = refusal(&db, &["--easemob-org", "acme", "--easemob-client-secret", "s3cret"]).await;
    assert!(err.contains("--easemob-org, --easemob-client-secret given but no --easemob-base-url"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    let err = refusal(&db, &["--easemob-base-url", " "]).await;
    assert!(err.contains("--easemob-base-url (EASEMOB_BASE_URL) is empty"), "{err}");
    // Empty is not given: `EASEMOB_CLIENT_ID=` in an environment file would send an empty id.
    let real = ["--easemob-base-url", "http://127.0.0.1:9", "--easemob-org", "acme", "--easemob-app", "chat"];
    let err =
        refusal(&db, &[&real[..], &["--easemob-client-id", "", "--easemob-client-secret", "s3cret"]].concat()).await;
    assert!(err.contains("--easemob-client-id (EASEMOB_CLIENT_ID) is empty"), "{err}");
    let err =
        refusal(&db, &[&real[..], &["--easemob-client-id", "YXA6id", "--easemob-client-secret", " "]].concat()).await;
    assert!(err.contains("--easemob-client-secret (EASEMOB_CLIENT_SECRET) is empty"), "{err}");
    assert!(!db.exists(), "nothing was created");
}

/// `--require-easemob` (for deployments): without the Easemob settings the service does not start
/// on its sandbox, and says which variables to give. With them, the flag changes nothing.
#[tokio::test]
async fn require_easemob_refuses_sandbox_mode() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("require.db");
    for flag in [&["--require-easemob"][..], &["--require-easemob", "yes"]] {
        let err = refusal(&db, flag).await;
        assert!(
            err.contains("--require-easemob (FRIENDHOOK_REQUIRE_EASEMOB) is set but no --easemob-base-url"),
            "{err}"
        );
        assert!(err.contains("was the environment file loaded?"), "{err}");
    }
    assert!(!db.exists(), "refused before the database is opened");
    let parse = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
        Ok(friendhook::config::Command::Serve(args)) => Ok(args.easemob.require_easemob),
        Ok(_) => unreachable!("serve"),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(parse(&["friendhook", "serve"]), Ok(false), "off unless asked for");
    assert_eq!(parse(&["friendhook", "serve", "--require-easemob", "off"]), Ok(false));
    let err = parse(&["friendhook", "serve", "--require-easemob", "maybe"]).expect_err("not a yes or no");
    assert!(err.contains("invalid value 'maybe'"), "{err}");
    // The way a deployment sets it: in the environment.
    let out = std::process::Command::new(crate::process::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--sandbox-listen", "127.0.0.1:0"])
        .arg("--database-url")
        .arg(format!("sqlite://{}", db.display()))
        .env("FRIENDHOOK_REQUIRE_EASEMOB", "true")
        .env_remove("EASEMOB_BASE_URL")
        .output()
        .expect("run friendhook");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is set but no --easemob-base-url"), "{stderr}");
    assert!(!db.exists(), "refused before the database is opened");
}

/// A URL of another database (PostgreSQL is planned, not here yet) is refused by name, by the
/// service and by a command that reads, instead of being taken for a file name.
#[tokio::test]
async fn a_database_url_that_is_not_sqlite_is_refused_by_name() {
    let url = "postgres://friendhook@localhost/friendhook";
    let err = friendhook::commands::serve::build(&serve_args(url, &[]), friendhook::clock::system()).await.err();
    let err = format!("{:#}", err.expect("refused"));
    assert!(err.contains("this release stores in SQLite only; give sqlite://<file>"), "{err}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["audit", "verify", "--database-url", url])
        .output();
    let out = out.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SQLite only"), "{stderr}");
}

/// URLs the service could not keep callbacks in are refused before anything is written: one
/// that names no file (SQLite would open a private temporary database per connection, and the
/// service answered 200 to callbacks it lost), one that opens read-only, and another program's
/// SQLite database (which the migrations used to fill with friendhook's tables).
#[tokio::test]
async fn a_database_url_the_service_cannot_keep_callbacks_in_is_refused() {
    let refused = |url: String| async move {
        let err = friendhook::commands::serve::build(&serve_args(&url, &[]), friendhook::clock::system()).await.err();
        format!("{:#}", err.unwrap_or_else(|| panic!("{url:?} was accepted")))
    };
    for url in ["", "sqlite://", "sqlite:"] {
        let err = refused(url.to_string()).await;
        assert!(err.contains("names no database file; give one, e.g. sqlite://friendhook.db"), "{url:?}: {err}");
    }

    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    let url = format!("sqlite://{}", other.display());
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
    let mut conn = sqlx::ConnectOptions::connect(&options).await.unwrap();
    sqlx::query("CREATE TABLE foo (x)").execute(&mut conn).await.unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let before = std::fs::read(&other).unwrap();
    let err = refused(url.clone()).await;
    assert!(err.contains("an SQLite database of something else (it has a table `foo`"), "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), before, "not a byte of it changed (not even to WAL)");
    let beside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, ["other.db"], "and nothing was created beside it");

    for read_only in ["?mode=ro", "?immutable=1", "?cache=shared&mode=ro"] {
        let err = refused(format!("{url}{read_only}")).await;
        assert!(err.contains("opens the database read-only (`mode=ro` or `immutable`)"), "{read_only}: {err}");
    }
    // Only the URL's parameters count: a directory that happens to be called so is a directory.
    let odd = dir.path().join("mode=robust");
    std::fs::create_dir(&odd).unwrap();
    TestApp::spawn_on(&odd.join("x.db"), &[]).await.stop().await;
}

#[tokio::test]
async fn an_in_memory_database_is_refused() {
    for url in ["sqlite::memory:", "sqlite://file.db?mode=memory"] {
        let args = serve_args(url, &[]);
        let err = friendhook::commands::serve::build(&args, friendhook::clock::system()).await.err().expect(url);
        assert!(format!("{err:#}").contains("in-memory database"), "{url}: {err:#}");
        // The commands that read say so too, rather than "no such database file".
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
            .args(["audit", "verify", "--database-url", url])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("is an in-memory database, new and empty for this command alone"), "{url}: {stderr}");
    }
}

#[tokio::test]
async fn a_second_service_on_the_same_database_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let first = TestApp::spawn_on(&db, &[]).await;

    let err = refusal(&db, &[]).await;
    assert!(err.contains("in use by another friendhook service"), "{err}");
    assert!(err.contains(&format!("by process {}", std::process::id())), "the holder is named: {err}");
    // The same file by another name: a symbolic link to it, or to its directory.
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    assert!(refusal(&link, &[]).await.contains("in use by another friendhook service"), "through a link to the file");
    let linked_dir = dir.path().join("linked-dir");
    std::os::unix::fs::symlink(dir.path(), &linked_dir).unwrap();
    let err = refusal(&linked_dir.join("shared.db"), &[]).await;
    assert!(err.contains("in use by another friendhook service"), "through a link to its directory: {err}");

    first.stop().await;
    let second = TestApp::spawn_on(&db, &[]).await;
    second.stop().await;
}

/// A stopped service has closed every connection to its file: the last close removes the WAL,
/// and `sqlite3` started at once reads the file. A stop right after a start is when a read
/// connection used to be left to close later, on its own thread, locking the file under the next
/// reader ("database is locked", about one stop in ten); a hundred rounds catch that nearly always.
#[tokio::test]
async fn a_stopped_service_has_closed_its_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("friendhook.db");
    let wal = dir.path().join("friendhook.db-wal");
    for round in 0..100 {
        TestApp::spawn_on(&db, &[]).await.stop().await;
        assert!(!wal.exists(), "round {round}: the WAL is still there, so a connection was still open");
        let read = std::process::Command::new("sqlite3").arg(&db).arg("SELECT count(*) FROM calls").output().unwrap();
        let stderr = String::from_utf8_lossy(&read.stderr);
        assert!(read.status.success(), "round {round}: {stderr}");
    }
}

/// A database file with a second name (a hard link) starts, with a warning that says why it is a
/// hazard and how to find the other names: SQLite keeps the WAL beside the name opened, and the
/// instance lock beside this name does not stop a service started by the other.
#[tokio::test]
async fn a_database_file_with_a_hard_link_is_served_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("friendhook.db");
    TestApp::spawn_on(&db, &[]).await.stop().await;
    let warning = "the database file has other names (hard links)";

    let db_url = format!("sqlite://{}", db.display());
    let mut alone = crate::process::ServeProcess::start(&db_url, &[], &[]).await;
    alone.signal("TERM");
    assert_eq!(alone.wait_exit(std::time::Duration::from_secs(20)).await.code(), Some(0), "{}", alone.log());
    assert!(!alone.log().contains(warning), "one name, no warning: {}", alone.log());

    std::fs::hard_link(&db, dir.path().join("copy.db")).unwrap();
    let mut linked = crate::process::ServeProcess::start(&db_url, &[], &[]).await;
    linked.signal("TERM");
    assert_eq!(linked.wait_exit(std::time::Duration::from_secs(20)).await.code(), Some(0), "{}", linked.log());
    let log = linked.log();
    let line = log.lines().find(|l| l.contains(warning)).unwrap_or_else(|| panic!("warned: {log}"));
    assert!(
        line.contains("WARN")
            && line.contains("other_names=1")
            && line.contains("find / -xdev -samefile PATH")
            && line.contains(&format!("path={}", db.display())),
        "{line}"
    );
}

#[tokio::test]
async fn a_sandbox_port_in_use_is_found_before_the_database_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("port.db");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let db_url = format!("sqlite://{}", db.display());
    let argv = ["friendhook", "serve", "--listen", "127.0.0.1:0", "--sandbox-listen", &port, "--database-url", &db_url];
    let friendhook::config::Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("serve arguments");
    };
    let err = friendhook::commands::serve::build(&args, friendhook::clock::system()).await.err().expect("refused");
    let err = format!("{err:#}");
    assert!(err.contains("could not start the sandbox"), "{err}");
    assert!(!db.exists(), "a start that fails does not open (or recover) the database");
}

#[tokio::test]
async fn a_request_timeout_within_the_busy_timeout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = refusal(&dir.path().join("t.db"), &["--request-timeout", "5s", "--sqlite-busy-timeout", "5s"]).await;
    assert!(err.contains("must be longer than --sqlite-busy-timeout"), "{err}");
}

#[test]
fn sandbox_fault_flags_are_checked_when_parsed_and_named() {
    for (flag, value) in [("--sandbox-drop-rate", "1.5"), ("--sandbox-callbacks-per-add", "0")] {
        let err = Cli::try_parse_from(["friendhook", "serve", flag, value]).expect_err("refused");
        assert!(err.to_string().contains(flag), "{err}");
    }
}

/// Zero would break each of these (every request failed or closed unanswered, every callback
/// 413, nothing ever sent): refused when parsed, naming the flag, instead of started with or
/// silently raised to 1.
#[test]
fn zero_where_zero_breaks_the_service_is_refused_when_parsed() {
    for flag in [
        "--trigger-timeout",
        "--header-timeout",
        "--idle-timeout",
        "--request-timeout",
        "--max-body-bytes",
        "--write-queue",
        "--max-batch",
        "--max-in-flight",
        "--easemob-rate-limit",
        "--easemob-max-attempts",
        "--easemob-request-timeout",
    ] {
        let value = if flag.ends_with("timeout") { "0s" } else { "0" };
        let err = Cli::try_parse_from(["friendhook", "serve", flag, value]).expect_err(flag);
        assert!(err.to_string().contains(flag), "{flag}: {err}");
    }
    assert!(
        Cli::try_parse_from(["friendhook", "serve", "--max-body-bytes", "1024", "--trigger-timeout", "1ms"]).is_ok()
    );
    // A limit no real callback fits under loses every one of them (413, dropped after a retry).
    let err = Cli::try_parse_from(["friendhook", "serve", "--max-body-bytes", "10"]).expect_err("too small");
    assert!(
        err.to_string().contains("would refuse every callback with 413") && err.to_string().contains("1024"),
        "{err}"
    );
    // Negative caps were quietly turned into 0 (quarantine off) and 1.
    for (flag, value) in [("--quarantine-cap", "-1"), ("--rejection-log-cap", "-5"), ("--rejection-log-cap", "0")] {
        let err = Cli::try_parse_from(["friendhook", "serve", &format!("{flag}={value}")]).expect_err(flag);
        assert!(err.to_string().contains(flag) && err.to_string().contains("not in"), "{flag}: {err}");
    }
}

/// humantime reads durations of up to ~5.8e11 years; a deadline that far ahead overflows the
/// clock and panicked in every connection. Anything past 10 years is refused when parsed.
#[test]
fn durations_beyond_ten_years_are_refused_when_parsed() {
    for flag in
        ["--header-timeout", "--request-timeout", "--shutdown-grace", "--match-window", "--easemob-max-retry-time"]
    {
        let err = Cli::try_parse_from(["friendhook", "serve", flag, "500000000000y"]).expect_err(flag);
        assert!(err.to_string().contains("longer than 10 years"), "{flag}: {err}");
    }
    assert!(Cli::try_parse_from(["friendhook", "serve", "--match-window", "3650days"]).is_ok());
}

/// `FRIENDHOOK_ALLOW_FROM=` (empty) means any source, as the help says; items are trimmed like the
/// secrets' (`a, b`), and an address alone is that address's network. All three were refused.
#[test]
fn network_lists_take_empty_values_spaces_and_bare_addresses() {
    let parse = |flag: &str, value: &str| match Cli::try_parse_from(["friendhook", "serve", flag, value]) {
        Ok(cli) => match cli.command {
            friendhook::config::Command::Serve(args) => {
                Ok((friendhook::config::networks(&args.allow_from), friendhook::config::networks(&args.trusted_proxy)))
            }
            _ => unreachable!(),
        },
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(parse("--allow-from", ""), Ok((vec![], vec![])));
    let nets = |list: &[&str]| list.iter().map(|n| n.parse::<ipnet::IpNet>().unwrap()).collect::<Vec<_>>();
    assert_eq!(
        parse("--allow-from", " 10.0.0.0/8, 127.0.0.1 ,::1"),
        Ok((nets(&["10.0.0.0/8", "127.0.0.1/32", "::1/128"]), vec![]))
    );
    assert_eq!(parse("--trusted-proxy", "10.0.0.1,"), Ok((vec![], nets(&["10.0.0.1/32"]))));
    let err = parse("--allow-from", "10.0.0.0/8,example.com").expect_err("not a network");
    assert!(err.contains("--allow-from") && err.contains("`example.com` is neither a network"), "{err}");
}

/// The demo's counts are checked when parsed: one user cannot befriend anyone (its pairs were
/// drawn until the friend differed from the owner), and a drop rate is a share.
#[test]
fn demo_arguments_out_of_range_are_refused_when_parsed() {
    for (flag, value) in [("--users", "1"), ("--users", "0"), ("--adds", "0"), ("--drop-rate", "1.5")] {
        let err = Cli::try_parse_from(["friendhook", "demo", flag, value]).expect_err(flag);
        assert!(err.to_string().contains(flag), "{flag}: {err}");
    }
    assert!(Cli::try_parse_from(["friendhook", "demo", "--users", "2", "--drop-rate", "1"]).is_ok());
}

fn demo(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .arg("demo")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("run friendhook demo")
}

#[tokio::test]
async fn the_demo_never_deletes_a_file_that_is_not_its_own_or_a_database_in_use() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "keep me").unwrap();
    let out = demo(dir.path(), &["--database", "notes.txt"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a friendhook database"), "{out:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(), "keep me");
    // Another program's SQLite database: left alone, nothing created beside it.
    crate::journal::sqlite(&dir.path().join("other.db"), "CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    let out = demo(dir.path(), &["--database", "other.db"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a friendhook database"), "{out:?}");
    assert!(!dir.path().join("other.db.lock").exists(), "no lock file beside a foreign database");

    // A sandbox port in use: refused before anything is deleted or created.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap().to_string();
    let out = demo(dir.path(), &["--sandbox-listen", &taken_at], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {taken_at} (--sandbox-listen)")), "{stderr}");
    assert!(!dir.path().join("friendhook-demo.db").exists(), "nothing created");
    drop(taken);

    let db = dir.path().join("live.db");
    let service = TestApp::spawn_on(&db, &[]).await;
    // An event of a real app (the tests' usual appkey is the sandbox's own).
    let real = roster_body("500001", "alice", "bob", "add", 1, SECRET).replace(APPKEY, "acme#prod");
    let mut real: serde_json::Value = serde_json::from_str(&real).unwrap();
    real["security"] = friendhook::signature::easemob::sign("acme#prod_500001", SECRET, "1").into();
    assert_eq!(service.post_callback(real.to_string()).await.status(), 200);
    let out = demo(dir.path(), &["--database", "live.db"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another friendhook service"), "{out:?}");
    let (_, list) = service.get_json("/v1/callbacks").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "the service's data is still there: {list}");
    service.stop().await;

    // Stopped, it is still no demo's: it holds another app's events.
    let out = demo(dir.path(), &["--database", "live.db"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("holds callbacks of the Easemob app `acme#prod`, not only the demo's (`demo-org#demo-app`)"),
        "{stderr}"
    );
    assert_eq!(crate::journal::sqlite_out(&db, "SELECT count(*) FROM callbacks"), "1", "nothing deleted");
}

#[tokio::test]
async fn the_demo_runs_end_to_end_whatever_the_shell_sets_for_a_real_service() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(
        dir.path(),
        &["--adds", "30", "--users", "12"],
        &[("FRIENDHOOK_API_TOKEN", "tok1"), ("FRIENDHOOK_ALLOW_FROM", "10.0.0.0/8")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let summary = stdout.lines().find(|l| l.starts_with("matched ")).expect("a reconciliation summary");
    let matched: u32 = summary.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("matched count");
    assert!(matched > 0, "{stdout}");
    assert!(dir.path().join("friendhook-demo.db").exists());
}

#[tokio::test]
async fn a_bare_port_or_an_unwritable_export_file_is_answered_with_what_to_give() {
    let err = Cli::try_parse_from(["friendhook", "serve", "--listen", "8080"]).expect_err("refused").to_string();
    assert!(err.contains("`8080` is not an address to listen on") && err.contains("e.g. 127.0.0.1:8080"), "{err}");

    let app = TestApp::spawn(&[]).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
        .args(["export", "--database-url", &app.db_url, "--output", "/nonexistent-dir/feed.ndjson"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot create --output /nonexistent-dir/feed.ndjson"), "{stderr}");
    app.stop().await;
}

/// A directory, or a file of something else, is named as such, by the service and by the
/// commands that read a database, and nothing (no lock file) is created beside it.
#[tokio::test]
async fn a_directory_or_a_file_that_is_not_sqlite_is_refused_with_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database\n").unwrap();
    let folder = dir.path().join("data");
    std::fs::create_dir(&folder).unwrap();

    let err = refusal(&text, &[]).await;
    assert!(err.contains("is not an SQLite database") && err.contains("Nothing was changed"), "{err}");
    let err = refusal(&folder, &[]).await;
    let example = format!("e.g. sqlite://{}", folder.join("friendhook.db").display());
    assert!(err.contains("is a directory") && err.contains(&example), "{err}");
    assert!(!err.contains("could not open the database"), "the message names the database once: {err}");

    for (db, expected) in [(&text, "is not an SQLite database"), (&folder, "is a directory")] {
        let url = format!("sqlite://{}", db.display());
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_friendhook"))
            .args(["reconcile", "--database-url", &url])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["data", "notes.txt"], "no lock file or database created beside them");
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "not a database\n");
}

/// A database in a directory that does not exist: said so, rather than "could not create the lock
/// file ...: No such file or directory".
#[tokio::test]
async fn a_database_in_a_missing_directory_is_refused_naming_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nodir").join("sub");
    let url = format!("sqlite://{}", missing.join("fh.db").display());
    let err = friendhook::store::Store::open(friendhook::store::StoreOptions::new(url), friendhook::clock::system())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains(&format!("the directory {} does not exist", missing.display())), "{text}");
    assert!(!dir.path().join("nodir").exists(), "nothing was created");
}

/// With real Easemob, wrong credentials show in the log at start-up, not only as 503s on the
/// first trigger; right ones are confirmed.
#[tokio::test]
async fn serve_checks_the_easemob_credentials_at_start_up() {
    let sandbox =
        crate::client_support::start_sandbox(crate::client_support::sandbox_config(), friendhook::clock::system())
            .await;
    let base = sandbox.base_url();
    let dir = tempfile::tempdir().expect("tempdir");
    for (secret, expected) in [
        ("sandbox-client-secret", "Easemob gave an app token: the credentials work"),
        ("not-the-secret", "Easemob gave no app token"),
    ] {
        let db_url = format!("sqlite://{}", dir.path().join(format!("{secret}.db")).display());
        let mut args = crate::helpers::real_easemob_args(&base);
        let at = args.iter().position(|a| *a == "--easemob-client-secret").expect("flag") + 1;
        args[at] = secret;
        // With the Easemob settings given, the deployment switch changes nothing.
        args.push("--require-easemob");
        let mut service = crate::process::ServeProcess::start(&db_url, &args, &[]).await;
        service.wait_for_log(expected, std::time::Duration::from_secs(20)).await;
        assert!(service.log().contains("app_key=\"demo-org#demo-app\""), "{}", service.log());
        service.signal("TERM");
        service.wait_exit(std::time::Duration::from_secs(20)).await;
    }
    sandbox.shutdown().await;
}

/// `--log-format json`: every line the service writes is one JSON object, with the message and
/// the line's own fields at the top level (what a log collector indexes).
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = format!("sqlite://{}", dir.path().join("json-logs.db").display());
    let mut child = tokio::process::Command::new(crate::process::BIN)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0", "--sandbox-listen", "127.0.0.1:0"])
        .args(["--database-url", &db_url, "--callback-secret", crate::helpers::SECRET])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the friendhook binary");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    let listening = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let object: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nbefore it: {seen:#?}"));
            seen.push(line);
            if object["message"].as_str().is_some_and(|m| m.starts_with("friendhook is listening")) {
                return object;
            }
        }
        panic!("the service ended before it listened: {seen:#?}")
    })
    .await
    .expect("the service listens within 30 s");
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
    assert!(listening["target"].as_str().is_some_and(|t| t.starts_with("friendhook")), "{listening}");
    let addr = listening["addr"].as_str().expect("the address as a field of its own");
    assert!(addr.starts_with("127.0.0.1:"), "{listening}");

    // The stop's lines too.
    let pid = child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-s", "TERM", &pid]).status().expect("kill").success());
    let rest = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            rest.push(
                serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")),
            );
        }
        rest
    })
    .await
    .expect("the service stops within 30 s");
    assert!(rest.iter().any(|line| line["message"] == "stopped"), "{rest:#?}");
    assert!(child.wait().await.expect("wait").success());
}

/// A deployment configures through the environment: a value clap refuses there is named by its
/// variable too, not only by a flag nobody typed.
#[test]
fn a_refused_setting_from_the_environment_names_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::process::BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env("FRIENDHOOK_LISTEN", "8080")
        .output()
        .expect("run friendhook");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`8080` is not an address to listen on"), "{stderr}");
    assert!(stderr.contains("read from the environment variable FRIENDHOOK_LISTEN"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "refused before anything was created");
}

#[tokio::test]
async fn sandbox_callbacks_outside_allow_from_are_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("allow.db").display());
    let warning = "the sandbox posts its callbacks from 127.0.0.1, which --allow-from does not cover";
    let run = |allow: &'static str| {
        let db_url = db_url.clone();
        async move {
            let mut service = crate::process::ServeProcess::start(&db_url, &["--allow-from", allow], &[]).await;
            service.signal("TERM");
            assert_eq!(
                service.wait_exit(std::time::Duration::from_secs(20)).await.code(),
                Some(0),
                "{}",
                service.log()
            );
            service.log()
        }
    };
    let log = run("10.0.0.0/8").await;
    let line = log.lines().find(|l| l.contains(warning)).unwrap_or_else(|| panic!("warned: {log}"));
    assert!(line.contains("WARN") && line.contains("add 127.0.0.1 to --allow-from"), "{line}");
    let log = run("10.0.0.0/8,127.0.0.0/8").await;
    assert!(!log.contains("--allow-from does not cover"), "covered, no warning: {log}");
}

#[tokio::test]
async fn a_database_whose_indexes_were_changed_by_hand_is_served_with_an_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("indexes.db");
    TestApp::spawn_on(&db, &[]).await.stop().await;
    crate::journal::sqlite(&db, "DROP INDEX calls_by_owner;");
    let mut service = crate::process::ServeProcess::start(&format!("sqlite://{}", db.display()), &[], &[]).await;
    service.signal("TERM");
    assert_eq!(service.wait_exit(std::time::Duration::from_secs(20)).await.code(), Some(0), "{}", service.log());
    let log = service.log();
    let line = log.lines().find(|l| l.contains("indexes differ from friendhook's")).unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("ERROR") && line.contains("calls_by_owner (missing)") && line.contains("audit verify"),
        "{line}"
    );
}

/// A misspelt variable is named at start with the one meant; `FRIENDHOOK_COMMIT`, which
/// `cargo run` (the README's quick start) hands the binary from the build script, is not one.
#[tokio::test]
async fn a_misspelt_variable_is_warned_of_and_the_builds_own_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("env.db").display());
    let mut service = crate::process::ServeProcess::start(
        &db_url,
        &[],
        &[("FRIENDHOOK_QUARANTINE_CAPP", "5"), ("FRIENDHOOK_COMMIT", "0123abc")],
    )
    .await;
    service.signal("TERM");
    assert_eq!(service.wait_exit(std::time::Duration::from_secs(20)).await.code(), Some(0), "{}", service.log());
    let log = service.log();
    assert!(
        log.contains(
            "FRIENDHOOK_QUARANTINE_CAPP is set, but friendhook reads no such variable: did you mean \
             FRIENDHOOK_QUARANTINE_CAP?"
        ),
        "{log}"
    );
    assert!(!log.contains("FRIENDHOOK_COMMIT is set"), "{log}");
}
