//! `sqlx::migrate!` embeds `migrations/` when the crate compiles, and cargo does not watch that
//! directory by itself: without this, adding a migration alone would not rebuild the binary that
//! should apply it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
