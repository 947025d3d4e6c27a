//! The embedded Easemob REST client. STUB: being written.
