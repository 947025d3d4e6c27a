//! `friendhook audit verify`: recompute the hash chain and report the first record that does not
//! match.

use clap::{Args, Subcommand};

use crate::store::{Store, chain};

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
    /// Recompute the SHA-256 chain over every stored callback and call outcome; exit 0 when
    /// intact, 1 at the first record that does not match (printed).
    Verify {
        /// The database to check (opened read-only).
        #[arg(long, env = "FRIENDHOOK_DATABASE_URL", default_value = "sqlite://friendhook.db")]
        database_url: String,
        /// Also require the chain to end at this published head, `SEQ:HASH` (from GET /v1/audit/head),
        /// which detects records removed from the end.
        #[arg(long)]
        expect_head: Option<String>,
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
    },
    /// The first problem found.
    Broken(String),
}

/// Walks the chain in seq order.
pub async fn verify(store: &Store) -> anyhow::Result<Verdict> {
    let mut expected_seq = 1i64;
    let mut prev = chain::GENESIS.to_string();
    let mut records = 0u64;
    loop {
        let page = store.chain_page(expected_seq - 1, 5000).await?;
        if page.is_empty() {
            break;
        }
        for r in page {
            let what = format!("seq {} ({} id {})", r.seq, r.kind, r.id);
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
                return Ok(Verdict::Broken(format!("{what}: content does not match its chain link (record edited)")));
            }
            prev = r.chain_hash;
            expected_seq += 1;
            records += 1;
        }
    }
    let unchained = store.count_unchained().await?;
    if unchained > 0 {
        return Ok(Verdict::Broken(format!(
            "{unchained} stored record(s) carry no chain link (inserted outside friendhook?)"
        )));
    }
    Ok(Verdict::Intact { records, head_seq: expected_seq - 1, head_hash: prev })
}

/// Runs the command; returns the process exit code.
pub async fn run(args: AuditArgs) -> anyhow::Result<u8> {
    let AuditCommand::Verify { database_url, expect_head } = args.command;
    let store = Store::open_read_only(&database_url).await?;
    let verdict = verify(&store).await?;
    match verdict {
        Verdict::Intact { records, head_seq, head_hash } => {
            if let Some(expect) = expect_head {
                let want = format!("{head_seq}:{head_hash}");
                let matches = expect == want
                    || expect.split(':').next() == Some(&head_seq.to_string()) && expect.ends_with(&head_hash);
                if !matches {
                    println!(
                        "BROKEN: the chain is internally consistent but ends at {want}, not at the expected head {expect}"
                    );
                    return Ok(1);
                }
            }
            println!("intact: {records} records, head seq {head_seq} hash {head_hash}");
            Ok(0)
        }
        Verdict::Broken(msg) => {
            println!("BROKEN: {msg}");
            Ok(1)
        }
    }
}
