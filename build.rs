//! Two things the compiler cannot see for itself:
//! - `sqlx::migrate!` embeds `migrations/` when the crate compiles, and cargo does not watch that
//!   directory by itself: without this, adding a migration alone would not rebuild the binary that
//!   should apply it.
//! - The commit the binary was built from (`FRIENDHOOK_COMMIT`, shown by `--version`, the start-up
//!   log and `friendhook_build_info`): the version number alone does not tell two builds apart.
//!   "unknown" outside a git checkout (a source tarball, a vendored copy).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=FRIENDHOOK_COMMIT");
    let commit = std::env::var("FRIENDHOOK_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=FRIENDHOOK_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}

/// The short hash of HEAD, and the files whose change means a new HEAD (watched, so a commit
/// without a source change still gives the next build its hash).
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Watched only when they exist: cargo reruns a build script on every build for a path that
    // does not.
    for path in [git(&["rev-parse", "--git-path", "HEAD"]), git(&["rev-parse", "--git-path", "packed-refs"])]
        .into_iter()
        .flatten()
        .chain(git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])))
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
