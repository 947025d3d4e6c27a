//! The embedded Easemob REST client: app-token cache, client-side rate limiter, retries, and
//! typed bodies.
//!
//! What it owns: talking to one App Key's REST API (`{base_url}/{org}/{app}/...`) for the calls
//! friendhook needs (add, delete and list friends; register and get users; list and re-send the
//! exception cache), and deciding what an answer means ([`ApiSuccess`], or
//! [`ApiFailure::Rejected`] vs [`ApiFailure::Failed`] vs [`ApiFailure::NoToken`]). What it does
//! not own: recording calls, receiving callbacks, or deciding whether to call at all.
//!
//! Map:
//! - `client`: the endpoints and the attempt loop (401 renewal, 429/5xx/transport retries).
//! - `token`: when the app token is reused, refreshed or fetched; single flight; failure cooldown.
//! - `pacer`: the per-App-Key rate limiter (evenly spaced, no burst).
//! - `backoff`: the retry schedule (exponential, equal jitter, seeded).
//! - `body`, `error`, `config`, `username`: the types the API is made of.
//!
//! Secrets: the client secret lives in a [`Secret`](crate::secret::Secret) and only leaves it
//! for the token request body; the token likewise only leaves it for the `Authorization` header.
//! Neither is logged, and `Debug` of the client or its config shows neither.

mod backoff;
mod body;
mod client;
mod config;
mod error;
mod pacer;
mod token;
mod username;

pub use body::{ApiSuccess, Entity, Envelope, ErrorBody, NewUser};
pub use client::{BeforeFirstSend, CacheBucket, EasemobClient, MAX_USERS_PER_REGISTER, Sending};
pub use config::ClientConfig;
pub use error::{ApiFailure, ClientError};
pub use pacer::Lane;
pub use token::TokenHealth;
pub use username::{MAX_USERNAME_BYTES, validate_username};
