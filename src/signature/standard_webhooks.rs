//! Standard Webhooks signatures. STUB.
