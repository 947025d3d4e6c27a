//! `friendhook audit verify`: recompute the hash chain and report the first record that does not
//! match; `friendhook audit rebuild-user-index`: the remedy for a lookup by user that disagrees
//! with the events.

use clap::{Args, Subcommand};

use crate::store::{Store, StoreError, chain};

/// `friendhook audit ...`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the SHA-256 chain over every stored callback and call outcome, and compare the
    /// lookup by user (derived from the events, not chained) with them. Exit 0 when intact, 1 at
    /// the first record that does not match (printed, with what to do next), when the append-only
    /// triggers were dropped, when the indexes differ from friendhook's (with the SQL that puts
    /// them back), when a promotion from quarantine or the lookup disagrees with the
    /// events, or when SQLite's integrity check finds the file at fault (an index that disagrees
    /// with its table); 2 when the check could not be made (no database, unreadable file, a
    /// malformed --expect-head). Calls still without
    /// an outcome, which the chain does not cover yet, and calls a restart closed (as `unknown`,
    /// or as `failed` not sent), whose request it cannot vouch for, are listed after an intact
    /// verdict. It takes about a minute
    /// for a million events and a million calls on a 2-core machine, SQLite's integrity check of
    /// the file 10-15 s more (--skip-integrity-check).
    Verify {
        /// The database to check (opened read-only).
        #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
        database_url: String,
        /// A head published earlier, `SEQ:HASH` (from GET /v1/audit/head): the chain must pass
        /// through it, i.e. the record at SEQ must still carry HASH. Detects history rewritten
        /// since it was published and records removed from the end; records stored since are
        /// fine.
        // Parsed by the command, not by clap, so that a malformed one under --json still gets
        // the `not_checked` object a monitoring job reads.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<String>,
        /// Skip SQLite's integrity check of the file (PRAGMA integrity_check), which otherwise
        /// runs after the chain's walk and adds about a fifth to its time. It is what finds an
        /// index that disagrees with its table: one rewritten through the file's schema so that a
        /// query through it (by call id, by user, by time) misses or invents rows while every
        /// record and its link are intact.
        #[arg(long)]
        skip_integrity_check: bool,
        /// Print the verdict as one JSON object on stdout, for a script or a monitoring job:
        /// `{"verdict": "intact", "records", "head": {"seq", "hash"}, "expect_head",
        /// "in_flight": {"count", "ids"}, "closed_unknown": {"count", "ids"}, "closed_not_sent":
        /// {"count", "ids"}, "integrity_check": "passed"
        /// or "skipped"}`,
        /// `{"verdict": "broken", "problem", "next"}`, or `{"verdict": "not_checked", "error"}`.
        /// The exit status is the same (0, 1, 2); progress stays on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Empty the lookup by user (`from`/`to` queries), which is derived from the events and not
    /// chained, so that the service rebuilds it from them, in the background, at its next start.
    /// The remedy when `audit verify` finds the lookup disagreeing with the events. The service
    /// must be stopped (refused otherwise); the events are not touched.
    RebuildUserIndex {
        /// The database whose lookup to rebuild.
        #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db",
          value_parser = crate::config::parse_setting)]
        database_url: String,
    },
}

/// Result of a verification.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every link matches.
    Intact {
        /// Records checked.
        records: u64,
        /// Last seq.
        head_seq: i64,
        /// Last hash.
        head_hash: String,
        /// Calls without an outcome, which the chain does not cover yet: how many, and the
        /// first [`IN_FLIGHT_SHOWN`] ids.
        in_flight: (i64, Vec<i64>),
        /// Calls closed as `unknown` by a restart: how many, and the first [`IN_FLIGHT_SHOWN`]
        /// ids.
        closed_unknown: (i64, Vec<i64>),
        /// Calls closed as `failed`, not sent, by a restart: how many, and the first
        /// [`IN_FLIGHT_SHOWN`] ids.
        closed_not_sent: (i64, Vec<i64>),
    },
    /// The first problem found.
    Broken(String),
}

/// A chain head published earlier: `SEQ:HASH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedHead {
    /// Its seq (0: the empty chain, whose link is [`chain::GENESIS`]).
    pub seq: i64,
    /// The link at that seq, 64 lower-case hex digits.
    pub hash: String,
}

/// Parses `SEQ:HASH` strictly (clap value parser).
pub fn parse_published_head(text: &str) -> Result<PublishedHead, String> {
    let advice = "expected SEQ:HASH as GET /v1/audit/head shows it, e.g. 560:1fb4361f... (64 hex digits)";
    let (seq, hash) = text.split_once(':').ok_or_else(|| advice.to_string())?;
    let seq: i64 = seq.parse().ok().filter(|seq| *seq >= 0).ok_or_else(|| format!("SEQ `{seq}`: {advice}"))?;
    let hash = chain::parse_link(hash).ok_or_else(|| format!("HASH `{}`: {advice}", hash.to_ascii_lowercase()))?;
    Ok(PublishedHead { seq, hash })
}

/// How many ids of calls without an outcome `verify` lists.
pub const IN_FLIGHT_SHOWN: i64 = 20;

/// Records read per page of the walk.
const PAGE: i64 = 5000;

/// Walks the chain in seq order.
pub async fn verify(store: &Store) -> anyhow::Result<Verdict> {
    verify_through(store, None).await
}

/// Walks the chain in seq order and, given a published head, checks that the chain still passes
/// through it.
pub async fn verify_through(store: &Store, published: Option<&PublishedHead>) -> anyhow::Result<Verdict> {
    verify_in_pages(store, published, PAGE).await
}

/// [`verify_through`], reading `page` records at a time.
pub async fn verify_in_pages(store: &Store, published: Option<&PublishedHead>, page: i64) -> anyhow::Result<Verdict> {
    verify_reporting(store, published, page, (u64::MAX, &mut |_| {}), FileCheck::Integrity).await
}

/// Whether `audit verify` also runs SQLite's integrity check of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// PRAGMA integrity_check after the walk: indexes against their tables, the file's pages.
    Integrity,
    /// The chain and friendhook's own checks only (`--skip-integrity-check`).
    Skip,
}

/// What a long verification reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Records of the chain checked so far.
    Records(u64),
    /// The walk is done; SQLite's integrity check of the file begins.
    IntegrityCheck,
}

/// How many problems SQLite's integrity check is asked for: enough to show their kind.
const INTEGRITY_PROBLEMS_SHOWN: u32 = 5;

/// Records between two progress lines of `audit verify`: a million events and a million calls
/// take the better part of a minute.
const PROGRESS_EVERY: u64 = 250_000;

/// [`verify_in_pages`], calling `progress.1` with the records checked so far every `progress.0`
/// of them, and when the integrity check `file_check` asks for begins.
pub async fn verify_reporting(
    store: &Store,
    published: Option<&PublishedHead>,
    page: i64,
    (every, progress): (u64, &mut dyn FnMut(Progress)),
    file_check: FileCheck,
) -> anyhow::Result<Verdict> {
    let mut expected_seq = 1i64;
    let mut prev = chain::GENESIS.to_string();
    let mut records = 0u64;
    if let Some(head) = published.filter(|head| head.seq == 0)
        && head.hash != chain::GENESIS
    {
        return Ok(Verdict::Broken(format!(
            "the chain's start is {}, not the published {}",
            chain::GENESIS,
            head.hash
        )));
    }
    // From the lowest seq there can be, not from 1, and that one included: a row slipped in
    // with seq 0 or below (down to i64::MIN) would otherwise be read by everything but this walk.
    let mut from = Some(i64::MIN);
    while let Some(start) = from {
        let records_read = store.chain_page(start, page).await?;
        if records_read.is_empty() {
            break;
        }
        for r in records_read {
            let what = format!("seq {} ({} id {})", r.seq, r.kind, r.id);
            if let Some(problem) = &r.unreadable {
                return Ok(Verdict::Broken(format!(
                    "{what}: cannot be read as stored ({problem}): edited outside friendhook"
                )));
            }
            if r.seq < expected_seq {
                return Ok(Verdict::Broken(format!(
                    "{what}: a seq below {expected_seq}, outside the chain's order (inserted outside friendhook)"
                )));
            }
            if r.seq != expected_seq {
                return Ok(Verdict::Broken(format!(
                    "record seq {expected_seq} is missing (next stored is {what}): a record was deleted or renumbered"
                )));
            }
            if r.prev_hash != prev {
                return Ok(Verdict::Broken(format!("{what}: prev_hash does not equal the previous record's link")));
            }
            if !r.body_digest_ok {
                return Ok(Verdict::Broken(format!(
                    "{what}: raw_body does not match its stored SHA-256 (body edited)"
                )));
            }
            if r.recomputed != r.chain_hash {
                return Ok(Verdict::Broken(format!(
                    "{what}: content does not match its chain link (record edited, or added outside friendhook)"
                )));
            }
            if let Some(head) = published.filter(|head| head.seq == r.seq)
                && head.hash != r.chain_hash
            {
                return Ok(Verdict::Broken(format!(
                    "{what} carries the link {}, not the published {}: the history up to it was rewritten \
                         (consistently) after the head was published, or the head was published by another \
                         database (or copied wrong)",
                    r.chain_hash, head.hash
                )));
            }
            // None only past i64::MAX, where nothing more can be stored.
            from = r.seq.checked_add(1);
            prev = r.chain_hash;
            expected_seq += 1;
            records += 1;
            if records.is_multiple_of(every) {
                progress(Progress::Records(records));
            }
        }
    }
    let head_seq = expected_seq - 1;
    if let Some(head) = published.filter(|head| head.seq > head_seq) {
        return Ok(Verdict::Broken(format!(
            "the chain is internally consistent but ends at seq {head_seq}, before the published head {}:{}: \
             records were removed from the end, or the head was published by another database (or copied wrong)",
            head.seq, head.hash
        )));
    }
    let beyond = store.references_past_head().await?;
    if let Some((what, seq)) = beyond.first() {
        return Ok(Verdict::Broken(format!(
            "the chain is internally consistent but ends at seq {head_seq}, and the file still refers to seq {seq} \
             ({what}{}): records were removed from the end of the journal, or the file was replaced by an older \
             copy of itself",
            if beyond.len() > 1 {
                format!(", and {} other reference(s) like it", beyond.len() - 1)
            } else {
                String::new()
            }
        )));
    }
    let (unchained, first) = store.unchained().await?;
    if unchained > 0 {
        return Ok(Verdict::Broken(format!(
            "{unchained} stored record(s) carry no chain link, the first {}: inserted outside friendhook",
            first.as_deref().unwrap_or("unknown")
        )));
    }
    let (missing, indexes) = store.schema_unlike_migrations().await?;
    if !missing.is_empty() {
        return Ok(Verdict::Broken(format!(
            "the chain is intact, but the append-only trigger(s) {} were dropped, redefined or added outside friendhook: \
             meanwhile, records could have been deleted, rewritten or kept out without an error (the chain shows what is \
             left, not what was removed from its end; --expect-head with a head published earlier does)",
            missing.join(", ")
        )));
    }
    if !indexes.is_empty() {
        let (names, remedy): (Vec<String>, Vec<String>) = indexes.into_iter().unzip();
        return Ok(Verdict::Broken(format!(
            "the chain is intact, but the index(es) {} differ from friendhook's (its schema was edited outside \
             friendhook): a missing one makes the reconciliation fail naming it, or a query slow; an altered one can \
             make queries miss rows, and a unique one added refuses events as duplicates (503s, which Easemob drops \
             after its retry). With the service stopped and a copy of the file kept, run `sqlite3 FILE \"{}\"`; then run this \
             check again",
            names.join(", "),
            remedy.join(" ")
        )));
    }
    let (unlike, first) = store.promotions_unlike_their_event(IN_FLIGHT_SHOWN).await?;
    let named: Vec<String> = first
        .iter()
        .map(|(id, seq)| match seq {
            Some(seq) => format!("quarantine id {id} (seq {seq})"),
            None => format!("quarantine id {id} (no seq)"),
        })
        .collect();
    if let Some(shown) = shown_ids(unlike, &named) {
        return Ok(Verdict::Broken(format!(
            "the chain is intact, but {unlike} promotion(s) from quarantine disagree with the event they name \
             ({shown}): no callback at that seq, or one with another body or arrival time than the held request. \
             Reconciliation measures a promoted event's lateness to its promotion, so such a row changes which \
             calls a report calls late: the quarantine table was edited outside friendhook"
        )));
    }
    if file_check == FileCheck::Integrity {
        progress(Progress::IntegrityCheck);
        let problems = store.integrity_problems(INTEGRITY_PROBLEMS_SHOWN).await?;
        if !problems.is_empty() {
            return Ok(Verdict::Broken(format!(
                "the chain is intact, but SQLite's integrity check of the file finds: {}. An index that disagrees \
                 with its table makes queries through it (by call id, by user, by time) miss or invent rows, and a \
                 unique one lets duplicates in, while every record is intact: the file's schema was edited (PRAGMA \
                 writable_schema), or its bytes damaged. With the service stopped and a copy of the file kept, \
                 `sqlite3 FILE 'REINDEX'` rebuilds every index from its table; then run this check again",
                problems.join("; ")
            )));
        }
    }
    let (missing_entries, extra_entries) = store.user_index_mismatches().await?;
    if missing_entries > 0 || extra_entries > 0 {
        return Ok(Verdict::Broken(format!(
            "the chain is intact, but the lookup by user (table callback_users, which answers `from`/`to` queries) \
             disagrees with the events: {missing_entries} entries missing, {extra_entries} that no event has, so a \
             query by user would hide or invent events. The chain vouches for the events that are there; the lookup \
             is derived from them, and a lookup edited on its own is what this looks like. Before rebuilding it, \
             make sure no events were removed: keep a copy of the file and run this check with --expect-head and a \
             head published earlier. Then, with the service stopped, `friendhook audit rebuild-user-index` empties \
             it, and the service rebuilds it in the background at its next start (queries stay complete meanwhile, \
             only slower)"
        )));
    }
    let in_flight = store.calls_without_outcome(IN_FLIGHT_SHOWN).await?;
    let closed_unknown = store.calls_closed_unknown(IN_FLIGHT_SHOWN).await?;
    let closed_not_sent = store.calls_closed_not_sent(IN_FLIGHT_SHOWN).await?;
    Ok(Verdict::Intact { records, head_seq, head_hash: prev, in_flight, closed_unknown, closed_not_sent })
}

/// What to do after a BROKEN verdict (printed after "What next: ").
const AFTER_BROKEN: &str = "keep this file as it is (copy it aside before anything else writes to it), \
    and find out what changed: compare it with a backup, or run this check with --expect-head and a head \
    published earlier (GET /v1/audit/head) to learn whether history before it was rewritten: without one, the \
    chain shows that each record follows from the one before it, not that nobody rewrote them all consistently.";

/// What to do after a BROKEN verdict of a check given a published head.
const AFTER_BROKEN_WITH_HEAD: &str = "keep this file as it is (copy it aside before anything else writes \
    to it), and find out what changed: compare it with a backup. Where the verdict names the published head, first \
    make sure that head is this database's and copied whole (as its GET /v1/audit/head gave it).";

/// Runs the command; returns the process exit code: 0 intact, 1 broken, 2 not checked.
pub async fn run(args: AuditArgs) -> anyhow::Result<u8> {
    let (database_url, expect_head, file_check, json) = match args.command {
        AuditCommand::Verify { database_url, expect_head, skip_integrity_check, json } => {
            let file_check = if skip_integrity_check { FileCheck::Skip } else { FileCheck::Integrity };
            let expect_head = match expect_head.as_deref().map(parse_published_head).transpose() {
                Ok(head) => head,
                Err(e) => return Ok(not_checked(&format!("--expect-head: {e}"), json)),
            };
            (database_url, expect_head, file_check, json)
        }
        AuditCommand::RebuildUserIndex { database_url } => {
            let removed = Store::reset_user_index(&database_url).await?;
            crate::outln!(
                "emptied the lookup by user ({removed} entries); the service rebuilds it from the events in the \
                 background at its next start, and `audit verify` then compares it again"
            );
            return Ok(0);
        }
    };
    let checked = async {
        let store = Store::open_read_only(&database_url).await?;
        // On stderr, so that stdout holds the verdict alone.
        let mut report = |progress| match progress {
            Progress::Records(n) => crate::console::note(format_args!("audit verify: {n} records checked")),
            Progress::IntegrityCheck => crate::console::note(format_args!(
                "audit verify: the chain is walked; now SQLite's integrity check of the file (indexes against \
                 their tables; --skip-integrity-check leaves it out)"
            )),
        };
        verify_reporting(&store, expect_head.as_ref(), PAGE, (PROGRESS_EVERY, &mut report), file_check).await
    };
    let verdict = match checked.await {
        Ok(verdict) => verdict,
        // A file SQLite cannot read as a database fails the check: its bytes were changed
        // outside SQLite, which is what a check of the history is there to catch.
        Err(e) if e.chain().any(|c| c.downcast_ref::<StoreError>().is_some_and(StoreError::is_damaged)) => {
            Verdict::Broken(format!(
                "the file is damaged ({e:#}): bytes of it were changed outside SQLite (edited, cut short, or \
                 written over by a disk or file-system fault), so its records cannot all be read"
            ))
        }
        Err(e) => return Ok(not_checked(&format!("{e:#}"), json)),
    };
    if json {
        crate::outln!("{}", verdict_json(&verdict, expect_head.as_ref(), file_check));
        return Ok(if matches!(verdict, Verdict::Intact { .. }) { 0 } else { 1 });
    }
    match verdict {
        Verdict::Intact { records, head_seq, head_hash, in_flight, closed_unknown, closed_not_sent } => {
            match &expect_head {
                Some(head) => crate::outln!(
                    "intact: {records} records, head seq {head_seq} hash {head_hash}; passes through the published \
                     head {}:{}",
                    head.seq,
                    head.hash
                ),
                None => crate::outln!("intact: {records} records, head seq {head_seq} hash {head_hash}"),
            }
            if let Some(note) = in_flight_note(&in_flight) {
                crate::outln!("{note}");
            }
            for note in
                [closed_note(&closed_unknown, "`unknown`"), closed_note(&closed_not_sent, "`failed`, not sent,")]
                    .into_iter()
                    .flatten()
            {
                crate::outln!("{note}");
            }
            Ok(0)
        }
        Verdict::Broken(msg) => {
            crate::outln!("BROKEN: {msg}");
            crate::outln!("What next: {}", if expect_head.is_some() { AFTER_BROKEN_WITH_HEAD } else { AFTER_BROKEN });
            Ok(1)
        }
    }
}

/// Says the check could not be made (on stdout too, as JSON, under --json); the exit status 2.
/// Not 1: a script must be able to tell "tampered" from "could not look".
fn not_checked(error: &str, json: bool) -> u8 {
    crate::console::error(format_args!("the chain could not be checked: {error}"));
    if json {
        crate::outln!("{}", serde_json::json!({"verdict": "not_checked", "error": error}));
    }
    2
}

/// The verdict as `audit verify --json` prints it.
fn verdict_json(verdict: &Verdict, expect_head: Option<&PublishedHead>, file_check: FileCheck) -> serde_json::Value {
    let listed = |(count, ids): &(i64, Vec<i64>)| serde_json::json!({"count": count, "ids": ids});
    match verdict {
        Verdict::Intact { records, head_seq, head_hash, in_flight, closed_unknown, closed_not_sent } => {
            serde_json::json!({
                "verdict": "intact",
                "records": records,
                "head": {"seq": head_seq, "hash": head_hash},
                "expect_head": expect_head.map(|head| format!("{}:{}", head.seq, head.hash)),
                "in_flight": listed(in_flight),
                "closed_unknown": listed(closed_unknown),
                "closed_not_sent": listed(closed_not_sent),
                // Not a boolean: `false` would read as "failed" (a failed check is a broken verdict).
                "integrity_check": if file_check == FileCheck::Integrity { "passed" } else { "skipped" },
            })
        }
        Verdict::Broken(problem) => serde_json::json!({
            "verdict": "broken",
            "problem": problem,
            "next": if expect_head.is_some() { AFTER_BROKEN_WITH_HEAD } else { AFTER_BROKEN },
        }),
    }
}

/// `ids`, the first of `count`, as a list for a note; `None` when there are none.
fn shown_ids<T: std::fmt::Display>(count: i64, ids: &[T]) -> Option<String> {
    if count == 0 {
        return None;
    }
    let mut shown = ids.iter().map(T::to_string).collect::<Vec<_>>().join(", ");
    if count > ids.len() as i64 {
        shown.push_str(", ...");
    }
    Some(shown)
}

/// The note on calls a restart closed `as_what`; `None` when there are none.
fn closed_note((count, ids): &(i64, Vec<i64>), as_what: &str) -> Option<String> {
    let shown = shown_ids(*count, ids)?;
    Some(format!(
        "note: {count} call(s) were closed as {as_what} by a restart (ids {shown}). The chain vouches for their \
         closing, not for their request, which carried no link while in flight: a row inserted into the file by \
         hand before a restart would look the same. Check them against your application's own records."
    ))
}

/// The note on calls without an outcome, which the chain does not cover yet; `None` when there
/// are none.
pub fn in_flight_note((count, ids): &(i64, Vec<i64>)) -> Option<String> {
    let shown = shown_ids(*count, ids)?;
    Some(format!(
        "note: {count} call(s) have no outcome yet (ids {shown}): in flight, or interrupted by a stop (the next \
         start closes them, as `unknown` if they were sent, as `failed` if not). Their intents join the chain with their outcome, so until then the chain \
         does not vouch for them; a call listed here that nobody requested was inserted outside friendhook"
    ))
}
