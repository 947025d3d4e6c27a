//! Whether checkpoints keep up: the writer's check, every [`CHECK_EVERY_MS`] while it writes.
//!
//! SQLite checkpoints the WAL by itself at the end of a commit that took it past 1,000 pages, and
//! says nothing when that cannot finish: a reader holding an old snapshot (a `sqlite3` shell left
//! inside `BEGIN`, a long backup) keeps every later frame in the WAL, and a checkpoint that hits a
//! full disk fails in silence. The WAL then grows for as long as it lasts, and every read walks
//! it. So the writer runs a `PASSIVE` checkpoint of its own now and then (it never waits for a
//! reader or a lock, and copies what SQLite's would have copied), exports how far it got
//! (`friendhook_checkpoint_lag_frames`) and logs when it falls behind, fails, and catches up.

use sqlx::SqliteConnection;

use crate::metrics::{LogThrottle, WriterMetrics};

/// How often, at most, the writer checks (only after a commit: a writer with nothing to write
/// does not grow the WAL).
pub(super) const CHECK_EVERY_MS: i64 = 10_000;

/// WAL frames left behind by a checkpoint past which the writer warns: with SQLite's 4 KiB pages,
/// 64 MiB, the WAL size the write connection asks SQLite to cut back to (`journal_size_limit`).
/// In normal running a check leaves a few frames at most; SQLite checkpoints at 1,000.
pub(super) const LAG_WARN_FRAMES: i64 = 16_384;

/// How often a lag that lasts is logged again, with its figure then.
const LAG_REPEAT_MS: i64 = 300_000;

/// The writer's state between checks.
#[derive(Debug)]
pub(super) struct CheckpointWatch {
    checked_at_ms: Option<i64>,
    /// Frames past which it warns ([`LAG_WARN_FRAMES`]; lower in tests).
    pub warn_frames: i64,
    /// When the lag was last logged, while it lasts.
    lagging_since_log_ms: Option<i64>,
    failures: LogThrottle,
}

impl Default for CheckpointWatch {
    fn default() -> Self {
        Self {
            checked_at_ms: None,
            warn_frames: LAG_WARN_FRAMES,
            lagging_since_log_ms: None,
            failures: LogThrottle::new(60_000),
        }
    }
}

/// What a check found, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Past the threshold: first time, or again after [`LAG_REPEAT_MS`].
    Behind,
    /// Back under it after being past it.
    CaughtUp,
}

impl CheckpointWatch {
    fn due(&self, now_ms: i64) -> bool {
        // A clock set back counts as due: waiting for it to pass `at` again could stop checks for
        // as long as it was set back.
        self.checked_at_ms.is_none_or(|at| !(0..CHECK_EVERY_MS).contains(&(now_ms - at)))
    }

    fn observe(&mut self, lag: i64, now_ms: i64) -> Option<Change> {
        // Caught up only under half the threshold: a lag that hovers around it (a reader that
        // comes and goes) would otherwise log a WARN and an INFO at every check.
        let threshold = if self.lagging_since_log_ms.is_some() { self.warn_frames / 2 } else { self.warn_frames };
        if lag < threshold {
            return self.lagging_since_log_ms.take().map(|_| Change::CaughtUp);
        }
        match self.lagging_since_log_ms {
            Some(logged) if (0..LAG_REPEAT_MS).contains(&(now_ms - logged)) => None,
            _ => {
                self.lagging_since_log_ms = Some(now_ms);
                Some(Change::Behind)
            }
        }
    }

    /// Whether the last check found checkpoints behind.
    #[cfg(test)]
    pub fn behind(&self) -> bool {
        self.lagging_since_log_ms.is_some()
    }

    /// Checks if [`CHECK_EVERY_MS`] have passed since the last check. Never fails a request: a
    /// failed checkpoint is counted and logged (at most once a minute), and tried again at the
    /// next check.
    pub async fn maybe_check(&mut self, conn: &mut SqliteConnection, metrics: &WriterMetrics, now_ms: i64) {
        if !self.due(now_ms) {
            return;
        }
        self.checked_at_ms = Some(now_ms);
        // One row: (1 if it could not run, frames in the WAL, frames copied). SQLite answers
        // (1, -1, -1), not an error, when another connection's checkpoint is running (a `sqlite3`
        // shell's, say), and -1s outside WAL mode, which friendhook always sets: no figure then,
        // and this one is tried again at the next check.
        let result: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut *conn).await;
        match result {
            Ok((_, frames, copied)) if frames < 0 || copied < 0 => {
                tracing::debug!("checkpoint skipped: another connection's was running");
            }
            Ok((_, frames, copied)) => {
                let lag = (frames - copied).max(0);
                metrics.checkpoint_lag_frames.set(lag);
                match self.observe(lag, now_ms) {
                    Some(Change::Behind) => tracing::warn!(
                        frames_behind = lag,
                        wal_frames = frames,
                        "checkpoints cannot keep up: about {} MiB of the WAL is not in the database file yet. \
                         Something holds a read transaction open on the database (a sqlite3 shell inside BEGIN, a \
                         long backup or export): the WAL, and the time every read takes, grow until it ends",
                        lag * 4096 / (1024 * 1024)
                    ),
                    Some(Change::CaughtUp) => {
                        tracing::info!(frames_behind = lag, "checkpoints caught up again")
                    }
                    None => {}
                }
            }
            Err(err) => {
                metrics.checkpoint_failures.inc();
                if let Some(failures) = self.failures.hit(now_ms) {
                    tracing::warn!(error = %err, failures_since_last_line = failures,
                        "a checkpoint of the WAL failed (is the disk full?); the WAL keeps growing until one succeeds");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lag_is_logged_when_it_starts_every_five_minutes_while_it_lasts_and_when_it_ends() {
        let mut watch = CheckpointWatch { warn_frames: 100, ..CheckpointWatch::default() };
        assert!(watch.due(0), "the first commit is checked");
        assert_eq!(watch.observe(99, 0), None, "under the threshold: nothing to say");
        assert_eq!(watch.observe(100, 10_000), Some(Change::Behind));
        assert_eq!(watch.observe(5_000, 20_000), None, "said once");
        assert_eq!(watch.observe(5_000, 10_000 + LAG_REPEAT_MS), Some(Change::Behind), "said again with its figure");
        assert_eq!(watch.observe(99, 10_000 + LAG_REPEAT_MS + 5_000), None, "just under the threshold: still behind");
        assert_eq!(watch.observe(50, 10_000 + LAG_REPEAT_MS + 7_000), None, "half of it: still behind");
        assert_eq!(watch.observe(0, 10_000 + LAG_REPEAT_MS + 10_000), Some(Change::CaughtUp));
        assert_eq!(watch.observe(0, 10_000 + LAG_REPEAT_MS + 20_000), None, "said once");
    }

    #[test]
    fn a_clock_set_back_neither_stalls_checks_nor_the_repeated_warning() {
        let mut watch = CheckpointWatch { warn_frames: 100, ..CheckpointWatch::default() };
        watch.checked_at_ms = Some(1_000_000);
        assert!(!watch.due(1_000_000 + CHECK_EVERY_MS - 1));
        assert!(watch.due(1_000_000 + CHECK_EVERY_MS));
        assert!(watch.due(1_000), "set back by about 17 minutes: checked now, not in 17 minutes");
        assert_eq!(watch.observe(500, 1_000_000), Some(Change::Behind));
        assert_eq!(watch.observe(500, 1_000), Some(Change::Behind), "set back: the figure is said again");
        assert_eq!(watch.observe(500, 2_000), None);
    }
}
