//! Easemob's post-send callback signature. STUB.
