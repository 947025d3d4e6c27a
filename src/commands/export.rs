//! `friendhook export`: write the feed's records (calls with final outcomes and callbacks) as
//! NDJSON or CSV, in seq order, streaming page by page so memory stays flat.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::http::query::parse_flag_range;
use crate::store::{FeedRecord, Store};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line (the same objects as GET /v1/feed).
    Ndjson,
    /// A header line (unless --no-header), then one row per record.
    Csv,
}

/// `friendhook export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The database to read (opened read-only).
    #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
    pub database_url: String,
    /// Only records whose event time is at or after this (epoch ms, RFC 3339 such as
    /// 2026-11-25T18:00:00+08:00, or a duration back from now such as 1h, noted on stderr as
    /// the time it stands for).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records whose event time is before this (the same forms).
    #[arg(long)]
    pub until: Option<String>,
    /// Only records after this seq: the `read up to seq` of the previous export (or a feed
    /// cursor), for exporting what is new since. Event time is not a safe key for that: a
    /// callback re-delivered days later keeps its event time and lands in a range already
    /// exported.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    pub after: i64,
    /// The link printed with that seq (`read up to seq N, link HASH`): refused if the record at
    /// --after carries another one (another database, or an older copy of this one).
    #[arg(long, value_parser = parse_link)]
    pub after_hash: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "ndjson")]
    pub format: Format,
    /// CSV only: leave out the header row, for appending an incremental export (--after) to an
    /// earlier one.
    #[arg(long)]
    pub no_header: bool,
    /// Write to FILE instead of standard output, atomically: into .FILE.partial-PID beside it,
    /// synced and renamed over FILE once complete. A run that fails or is stopped (Ctrl-C,
    /// SIGTERM) leaves FILE as it was. Needs write access to FILE's directory. A device or a
    /// named pipe (/dev/stdout) is written into as it goes.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print progress to standard error when the count passes a multiple of this (checked after
    /// each page of 10,000 records; 0: never).
    #[arg(long, default_value_t = 100_000)]
    pub progress_every: u64,
}

/// Records read per page of an export (the feed's largest `limit`), whatever the progress
/// setting: smaller pages only make the export slower.
const EXPORT_PAGE: i64 = 10_000;

const CSV_HEADER: [&str; 14] = [
    "seq",
    "kind",
    "owner",
    "friend",
    "operation",
    "outcome",
    "chat_type",
    "event_time",
    "received_time",
    "id",
    "msg_id",
    "upstream_status",
    "upstream_error",
    "outcome_detail",
];

/// What an export wrote, and where it stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Records written.
    pub records: u64,
    /// The journal seq it read up to (matching or not): the `--after` of the next export.
    pub read_up_to: i64,
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// NDJSON or CSV.
    pub format: Format,
    /// CSV: whether the header row comes first.
    pub header: bool,
    /// Progress on stderr when the count passes a multiple of this (0: never).
    pub progress_every: u64,
}

impl Layout {
    /// `format` with its header, without progress.
    pub fn quiet(format: Format) -> Layout {
        Layout { format, header: true, progress_every: 0 }
    }
}

/// Streams every matching record after seq `after` to `out`.
///
/// A failed write comes back as the [`std::io::Error`] itself (not wrapped), so that a caller can
/// tell a reader that went away (`BrokenPipe`) from a failure.
pub async fn export(
    store: &Store,
    (after, since, until): (i64, i64, i64),
    layout: Layout,
    out: &mut dyn Write,
) -> anyhow::Result<Exported> {
    let Layout { format, header, progress_every } = layout;
    let started = Instant::now();
    let mut after = after;
    let mut written = 0u64;
    if format == Format::Csv && header {
        let mut w = csv_writer();
        w.write_record(CSV_HEADER)?;
        out.write_all(&csv_into_bytes(w)?)?;
    }
    loop {
        let page = store.feed_page(after, EXPORT_PAGE, since, until).await?;
        if let Some(note) = page.missing_note(after) {
            crate::console::warn(note);
        }
        after = page.resume_after(after);
        let complete = page.complete;
        if page.count == 0 {
            break;
        }
        // One page at a time: a few MB at most, whatever the total size. SQLite rendered the
        // NDJSON already; CSV reads it back.
        let chunk = match format {
            Format::Csv => {
                let mut w = csv_writer();
                let mut numbers = CsvNumbers::default();
                for line in page.ndjson.lines() {
                    let record = serde_json::from_str::<FeedRecord>(line).with_context(|| {
                        let seq = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["seq"].as_i64());
                        format!(
                            "the record at seq {} does not have a feed record's fields and types, so it has no CSV \
                             row: was the database edited outside friendhook? `friendhook audit verify` checks \
                             it; --format ndjson exports it as stored",
                            seq.map_or_else(|| "?".to_string(), |s| s.to_string())
                        )
                    })?;
                    write_csv_row(&mut w, &record, &mut numbers)?;
                }
                csv_into_bytes(w)?
            }
            Format::Ndjson => {
                let mut bytes = page.ndjson.into_bytes();
                bytes.push(b'\n');
                bytes
            }
        };
        out.write_all(&chunk)?;
        let before = written;
        written += page.count as u64;
        if progress_every > 0 && before / progress_every != written / progress_every {
            let secs = started.elapsed().as_secs_f64();
            crate::console::note(format_args!("exported {written} records ({:.0}/s)", written as f64 / secs.max(1e-9)));
        }
        if complete {
            break;
        }
    }
    out.flush()?;
    Ok(Exported { records: written, read_up_to: after })
}

fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new())
}

fn csv_into_bytes(w: csv::Writer<Vec<u8>>) -> anyhow::Result<Vec<u8>> {
    w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))
}

/// The text of a row's numbers, reused from row to row.
#[derive(Default)]
struct CsvNumbers([String; 4]);

/// Writes `r` as one CSV row (the columns of [`CSV_HEADER`]), borrowing its fields: copying each
/// into a string of its own first cost twelve allocations a row.
fn write_csv_row(w: &mut csv::Writer<Vec<u8>>, r: &FeedRecord, numbers: &mut CsvNumbers) -> csv::Result<()> {
    use std::fmt::Write as _;
    fn s(v: &Option<String>) -> &str {
        v.as_deref().unwrap_or_default()
    }
    let [seq, event_time, received_time, upstream_status] = &mut numbers.0;
    for (text, n) in [(&mut *seq, r.seq), (&mut *event_time, r.event_time), (&mut *received_time, r.received_time)] {
        text.clear();
        let _ = write!(text, "{n}");
    }
    upstream_status.clear();
    if let Some(status) = r.upstream_status {
        let _ = write!(upstream_status, "{status}");
    }
    w.write_record([
        seq.as_str(),
        &r.kind,
        s(&r.owner),
        s(&r.friend),
        s(&r.operation),
        s(&r.outcome),
        s(&r.chat_type),
        event_time.as_str(),
        received_time.as_str(),
        &r.id,
        s(&r.msg_id),
        upstream_status.as_str(),
        s(&r.upstream_error),
        s(&r.outcome_detail),
    ])
}

/// `--after-hash`: a chain link, 64 hex digits (either case), as the last export printed it.
fn parse_link(text: &str) -> Result<String, String> {
    crate::store::chain::parse_link(text)
        .ok_or_else(|| "expected the 64 hex digits an export printed after `link` (or a feed's X-Last-Hash)".into())
}

/// A signal that ended an export to a file before it was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Stop {
    /// The status a shell gives a process the signal ended (128 + its number): what a script
    /// checks to tell an interrupted command from a failed one.
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Stop::Interrupt => "SIGINT",
            Stop::Terminate => "SIGTERM",
        }
    }
}

/// SIGINT and SIGTERM, listened for from the moment this is made: until then their default
/// action ends the process on the spot, and would leave the partial file beside --output.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let what = "listening for SIGINT and SIGTERM (to remove the partial export if one comes)";
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context(what)?,
                terminate: signal(SignalKind::terminate()).context(what)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(mut self) -> Stop {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            Stop::Interrupt
        }
    }
}

/// How an export to a file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToFile {
    /// Complete, and in place under the file's name.
    Written(Exported),
    /// Ended by a signal first: the file is as it was.
    Stopped(Stop),
}

/// Exports into a temporary file beside `path` (`.NAME.partial-PID`, in the same directory so
/// that the rename stays on one file system), synced to disk and renamed over `path` once
/// complete: `path` holds the previous content or the whole export, never a part of one. On an
/// error, or when `stop` resolves first, the temporary file is removed. For a file, or a name
/// with nothing yet: a device or a pipe is streamed into with [`export`].
pub async fn export_to_file(
    store: &Store,
    range: (i64, i64, i64),
    layout: Layout,
    path: &Path,
    stop: impl Future<Output = Stop>,
) -> anyhow::Result<ToFile> {
    let target = through_link(path);
    if target.is_dir() {
        anyhow::bail!("--output {} is a directory: name a file (in it, or anywhere else)", path.display());
    }
    let Some(name) = target.file_name() else {
        anyhow::bail!("--output {} does not name a file: give a file name such as export.ndjson", path.display());
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(name);
    partial_name.push(format!(".partial-{}", std::process::id()));
    let partial = PartialFile::create(dir.join(partial_name), target, path)?;
    let mut out = std::io::BufWriter::new(&partial.file);
    let finished = tokio::select! {
        // A signal wins over a page that is ready at the same moment: the person asked to stop.
        biased;
        stop = stop => return Ok(ToFile::Stopped(stop)),
        exported = export(store, range, layout, &mut out) => exported,
    };
    let nothing_written = |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e:#}. Nothing was written to {}, which holds what it held before (if it existed)",
            path.display()
        )
    };
    let exported = finished.map_err(nothing_written)?;
    out.into_inner().map_err(|e| nothing_written(e.into_error().into()))?;
    partial.persist(&dir).map_err(nothing_written)?;
    Ok(ToFile::Written(exported))
}

/// `path`, or the file a symbolic link there points to: the export replaces that file, as
/// writing through the link did, and leaves the link alone.
fn through_link(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path).unwrap_or_else(|_| path.into()),
        _ => path.into(),
    }
}

/// The temporary file an export is written into, removed when dropped unless it took its place
/// under the final name.
struct PartialFile {
    path: PathBuf,
    target: PathBuf,
    file: std::fs::File,
    in_place: bool,
}

impl PartialFile {
    /// `shown`: the --output as given (`target` may be where a link there points).
    fn create(path: PathBuf, target: PathBuf, shown: &Path) -> anyhow::Result<PartialFile> {
        // A new file, never one that was there (or a link planted there): a file of this name is
        // one an earlier export with this pid left when killed outright, and nobody's now.
        let open = || std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
        let file = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&path);
                open()
            }
            opened => opened,
        }
        .with_context(|| {
            format!(
                "cannot create --output {} (the export is written into {} first, then renamed): check that the \
                 directory exists and that this user may create files in it",
                shown.display(),
                path.display()
            )
        })?;
        // The export takes the previous one's place, and its permissions with it (writing into
        // the old file kept them).
        if let Ok(meta) = std::fs::metadata(&target) {
            let _ = file.set_permissions(meta.permissions());
        }
        Ok(PartialFile { path, target, file, in_place: false })
    }

    /// Syncs the file to disk and renames it over the target.
    fn persist(mut self, dir: &Path) -> anyhow::Result<()> {
        // Synced before the rename: after a power cut, the name must not point at a file whose
        // data never reached the disk.
        self.file.sync_all().with_context(|| format!("cannot sync {} to disk", self.path.display()))?;
        std::fs::rename(&self.path, &self.target)
            .with_context(|| format!("cannot rename {} to {}", self.path.display(), self.target.display()))?;
        self.in_place = true;
        // The rename itself is durable once the directory is synced. Some file systems refuse to
        // sync a directory; the export is in place either way.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.in_place {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` is something other than a file or a directory (/dev/null, /dev/stdout, a
/// named pipe): written into as it goes, since renaming a file over it would replace the device
/// or the pipe itself (and root may do that to /dev/null).
fn is_device_or_pipe(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| !meta.is_file() && !meta.is_dir())
}

/// Whether `err` is a write to a reader that went away (`friendhook export | head -1`).
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Runs the command; the exit status (0, or 130/143 when a signal ended an export to a file).
pub async fn run(mut args: ExportArgs) -> anyhow::Result<u8> {
    if args.no_header && args.format != Format::Csv {
        return Err(super::UsageError(
            "--no-header leaves out the CSV header row, and NDJSON has none: add --format csv, or drop --no-header"
                .into(),
        )
        .into());
    }
    // Noted on stderr: an export of "the last day" says which day it holds.
    let now_ms = crate::clock::system().now_ms();
    super::resolve_relative_times(now_ms, [("--since", &mut args.since), ("--until", &mut args.until)]);
    let (since, until) =
        parse_flag_range(args.since.as_deref(), args.until.as_deref()).map_err(|e| super::UsageError(e.to_string()))?;
    let store = Store::open_read_only(&args.database_url).await?;
    // As the feed refuses it: a seq past the head would skip whatever is stored up to it.
    let head = store.chain_head().await?.seq;
    if args.after > head {
        anyhow::bail!(
            "--after {} is beyond this journal's last seq ({head}): a seq from another database, or from this one \
             before it was restored from an older copy, would skip everything stored up to it. Nothing was written. \
             Export from --after 0, or from a seq an export of this database printed",
            args.after
        );
    }
    let found = store.link_at(args.after).await?;
    match (found, args.after_hash.as_deref()) {
        (None, Some(_)) => {
            anyhow::bail!("{}. Nothing was written", crate::store::journal::removed_cursor_note(args.after, head))
        }
        // Without a link to compare, the export goes on: the pages after the cursor are what this
        // file holds. Said all the same, as a gap inside the export would be.
        (None, None) => crate::console::warn(crate::store::journal::removed_cursor_note(args.after, head)),
        (Some(found), Some(expected)) if found != expected => anyhow::bail!(
            "the record at seq {} carries the link {found}, not --after-hash {expected}: this is another database, \
             or an older copy of the one the previous export read, so the records after it here are not the ones \
             that followed. Nothing was written. Export from --after 0, or from the last seq both agree on",
            args.after,
        ),
        (Some(_), _) => {}
    }
    let filtered = since.is_some() || until.is_some();
    let started = Instant::now();
    let range = (args.after, since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX));
    let layout = Layout { format: args.format, header: !args.no_header, progress_every: args.progress_every };
    let exported = match args.output.as_deref() {
        Some(path) if !is_device_or_pipe(path) => {
            let signals = StopSignals::listen()?;
            match export_to_file(&store, range, layout, path, signals.recv()).await? {
                ToFile::Written(exported) => exported,
                ToFile::Stopped(stop) => {
                    crate::console::error(format_args!(
                        "interrupted by {}: nothing was written to {}, which holds what it held before (if it \
                         existed). Run the export again to write it",
                        stop.name(),
                        path.display()
                    ));
                    return Ok(stop.exit_code());
                }
            }
        }
        // Standard output, a device or a pipe stream as they go (no signal handling: Ctrl-C ends
        // the process).
        stream => {
            let sink: Box<dyn Write> = match stream {
                Some(path) => Box::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .with_context(|| format!("cannot open --output {}", path.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut out = std::io::BufWriter::new(sink);
            match export(&store, range, layout, &mut out).await {
                Ok(exported) => exported,
                // The reader took what it wanted (`| head`) and closed the pipe: as for any tool
                // in a pipeline, that is the end, not a failure. The closing line would name a
                // cursor past records nobody read, so there is none.
                Err(e) if is_broken_pipe(&e) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let n = exported.records;
    let link = store.link_at(exported.read_up_to).await?.unwrap_or_default();
    let rate = n as f64 / secs.max(1e-9);
    let upto = exported.read_up_to;
    let records = if n == 1 { "record" } else { "records" };
    // With a range, the cursor is past the records this run left out as well: handed on as "what
    // is new" to an export without the range, it would skip them for good.
    let next = if filtered {
        // The range as resolved: `--until 1h` typed again an hour later is another range, and the
        // records between the two would be behind the cursor.
        let range: Vec<String> = [("--since", &args.since), ("--until", &args.until)]
            .into_iter()
            .filter_map(|(flag, value)| value.as_ref().map(|v| format!("{flag} {v}")))
            .collect();
        format!(
            "the next export of what is new in the same range goes on with {} --after {upto} --after-hash {link} \
             (records outside the range are behind that cursor too: an export without the range starts again from \
             --after {})",
            range.join(" "),
            args.after
        )
    } else {
        format!("the next export of what is new goes on with --after {upto} --after-hash {link}")
    };
    if crate::console::is_json() {
        // The cursor as fields of their own: a script keeps them for the next run.
        tracing::info!(target: "friendhook::console", records = n, seconds = secs, read_up_to = upto, link = %link,
            range_filtered = filtered, "exported {n} {records}; {next}");
    } else {
        crate::console::to_stderr(format_args!(
            "exported {n} {records} in {secs:.2} s ({rate:.0} records/s); read up to seq {upto}, link {link}: {next}\n"
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use super::*;

    const EVERYTHING: (i64, i64, i64) = (0, i64::MIN, i64::MAX);

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read the directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The size of the partial export in `dir` (0 while there is none).
    fn partial_size(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .expect("read the directory")
            .map(|e| e.expect("entry"))
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    /// A signal in the middle of an export to a file, once its first page is in the partial
    /// file: the file keeps what it held, and the partial file is gone.
    #[tokio::test]
    async fn a_signal_midway_leaves_the_previous_file_and_no_partial_one() {
        let db = tempfile::tempdir().expect("tempdir");
        // Three pages: the export cannot be complete when the first is in the file.
        let store = crate::store::seeded_test_store(&db, 12_000, 12_000).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("export.ndjson");
        std::fs::write(&file, "the previous export\n").expect("write");
        // Polled before every step of the export (the select is biased), until the first page
        // is written.
        let after_the_first_page = std::future::poll_fn(|cx| {
            if partial_size(dir.path()) > 0 {
                Poll::Ready(Stop::Interrupt)
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        });
        let ended = export_to_file(&store, EVERYTHING, Layout::quiet(Format::Ndjson), &file, after_the_first_page)
            .await
            .expect("export");
        assert_eq!(ended, ToFile::Stopped(Stop::Interrupt));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "the previous export\n");
        assert_eq!(names(dir.path()), ["export.ndjson"], "the partial file is removed");
        // A signal before anything was written, where there was no file: still none.
        let csv = dir.path().join("new.csv");
        let ended = export_to_file(&store, EVERYTHING, Layout::quiet(Format::Csv), &csv, async { Stop::Terminate })
            .await
            .expect("export");
        assert_eq!((ended, Stop::Terminate.exit_code()), (ToFile::Stopped(Stop::Terminate), 143));
        assert_eq!(names(dir.path()), ["export.ndjson"]);
        store.close().await;
    }

    /// A complete export replaces the file whole, with the file's permissions, and leaves
    /// nothing beside it; the same bytes as an export to a stream.
    #[tokio::test]
    async fn a_complete_export_replaces_the_file_and_leaves_nothing_beside_it() {
        let db = tempfile::tempdir().expect("tempdir");
        let store = crate::store::seeded_test_store(&db, 300, 400).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("export.csv");
        std::fs::write(&file, "the previous export, longer than nothing\n".repeat(10_000)).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        }
        let layout = Layout { format: Format::Csv, header: false, progress_every: 0 };
        let ended = export_to_file(&store, EVERYTHING, layout, &file, std::future::pending()).await.expect("export");
        let mut streamed = Vec::new();
        let exported = export(&store, EVERYTHING, layout, &mut streamed).await.expect("export");
        assert_eq!(ended, ToFile::Written(exported));
        assert_eq!(exported.records, 700);
        assert_eq!(std::fs::read(&file).expect("read"), streamed);
        assert_eq!(names(dir.path()), ["export.csv"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o640, "the previous file's permissions");
        }
        // Without the header, every line is a record.
        let text = String::from_utf8(streamed).expect("UTF-8");
        assert_eq!(text.lines().count(), 700);
        assert!(text.starts_with("1,"), "{}", &text[..40]);
        store.close().await;
    }

    /// A file name the export cannot be written under is refused before anything is read.
    #[tokio::test]
    async fn a_directory_is_no_output_file() {
        let db = tempfile::tempdir().expect("tempdir");
        let (store, _) = crate::store::open_test_store(&db).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let err = export_to_file(&store, EVERYTHING, Layout::quiet(Format::Ndjson), dir.path(), std::future::pending())
            .await
            .expect_err("a directory");
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(names(dir.path()).is_empty());
        store.close().await;
    }
}
