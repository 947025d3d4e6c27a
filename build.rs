//! Two things the compiler cannot see for itself:
//! - `sqlx::migrate!` embeds `migrations/` when the crate compiles, and cargo does not watch that
//!   directory by itself: without this, adding a migration alone would not rebuild the binary that
//!   should apply it.
//! - The commit the binary was built from (`FRIENDHOOK_COMMIT`, shown by `--version`, the start-up
//!   log and `friendhook_build_info`): the version number alone does not tell two builds apart.
//!   `-dirty` after it when built from changed files; "unknown" outside a git checkout of this
//!   crate (a source tarball, a vendored copy).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=FRIENDHOOK_COMMIT");
    let commit = std::env::var("FRIENDHOOK_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=FRIENDHOOK_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}

/// The short hash of HEAD, with `-dirty` when the work tree differs from it; and the files
/// whose change means a new answer (watched, so a commit without a source change still gives the
/// next build its hash, and an edit its `-dirty`). `None` when the crate is not the top of a git
/// work tree: a copy vendored inside another repository must not take that one's hash.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let manifest_dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = std::path::PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
        return None;
    }
    // `--exclude=*`: the hash alone, whatever tags there are.
    let commit = git(&["describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"])?;
    // Watched only when they exist: cargo reruns a build script on every build for a path that
    // does not. `logs/HEAD` too: in a fresh clone the branch lives in `packed-refs`, and the first
    // commit writes a loose ref nobody watched yet, but every commit appends to the HEAD log.
    let refs = ["HEAD", "packed-refs", "logs/HEAD"]
        .map(|name| git(&["rev-parse", "--git-path", name]))
        .into_iter()
        .flatten()
        .chain(git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])));
    let sources = ["src", "Cargo.toml", "Cargo.lock", "build.rs"].map(String::from);
    for path in refs.chain(sources) {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
