//! `friendhook export`: write the feed's records (calls with final outcomes and callbacks) as
//! NDJSON or CSV, in seq order, streaming page by page so memory stays flat.

use std::io::Write;
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
    /// A header line, then one row per record.
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
    /// Write here instead of standard output.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// Print progress to standard error every this many records (0: never).
    #[arg(long, default_value_t = 100_000)]
    pub progress_every: u64,
}

/// Records read per page of an export (the feed's largest `limit`).
const EXPORT_PAGE: u64 = 10_000;

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

/// Streams every matching record after seq `after` to `out`.
pub async fn export(
    store: &Store,
    (after, since, until): (i64, i64, i64),
    format: Format,
    out: &mut dyn Write,
    progress_every: u64,
) -> anyhow::Result<Exported> {
    let started = Instant::now();
    let mut after = after;
    let mut written = 0u64;
    if format == Format::Csv {
        let mut w = csv_writer();
        w.write_record(CSV_HEADER)?;
        out.write_all(&csv_into_bytes(w)?)?;
    }
    // Pages of 10,000, fewer when progress is asked for more often: it is reported between pages.
    let page_limit = if progress_every > 0 { progress_every.min(EXPORT_PAGE) } else { EXPORT_PAGE };
    loop {
        let page = store.feed_page(after, page_limit as i64, since, until).await?;
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
                    write_csv_row(&mut w, &serde_json::from_str::<FeedRecord>(line)?, &mut numbers)?;
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

/// Runs the command.
pub async fn run(mut args: ExportArgs) -> anyhow::Result<()> {
    // Noted on stderr: an export of "the last day" says which day it holds.
    let now_ms = crate::clock::system().now_ms();
    super::resolve_relative_times(now_ms, [("--since", &mut args.since), ("--until", &mut args.until)]);
    let (since, until) =
        parse_flag_range(args.since.as_deref(), args.until.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
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
    if let Some(expected) = args.after_hash.as_deref() {
        let found = store.link_at(args.after).await?;
        if found.as_deref() != Some(expected) {
            anyhow::bail!(
                "the record at seq {} carries the link {}, not --after-hash {expected}: this is another database, or \
                 an older copy of the one the previous export read, so the records after it here are not the ones \
                 that followed. Nothing was written. Export from --after 0, or from the last seq both agree on",
                args.after,
                found.as_deref().unwrap_or("(no record)")
            );
        }
    }
    let started = Instant::now();
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create --output {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let range = (args.after, since.unwrap_or(i64::MIN), until.unwrap_or(i64::MAX));
    let exported = export(&store, range, args.format, &mut out, args.progress_every).await?;
    let secs = started.elapsed().as_secs_f64();
    let n = exported.records;
    let link = store.link_at(exported.read_up_to).await?.unwrap_or_default();
    let rate = n as f64 / secs.max(1e-9);
    let upto = exported.read_up_to;
    let records = if n == 1 { "record" } else { "records" };
    if crate::console::is_json() {
        // The cursor as fields of their own: a script keeps them for the next run.
        tracing::info!(target: "friendhook::console", records = n, seconds = secs, read_up_to = upto, link = %link,
            "exported {n} {records}; the next export of what is new goes on with --after {upto} --after-hash {link}");
    } else {
        crate::console::to_stderr(format_args!(
            "exported {n} {records} in {secs:.2} s ({rate:.0} records/s); read up to seq {upto}, link {link}: the next \
             export of what is new goes on with --after {upto} --after-hash {link}\n"
        ));
    }
    Ok(())
}
