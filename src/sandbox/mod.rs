//! The embedded Easemob-compatible sandbox. STUB: being written.
