//! Domain vocabulary shared by the store, the HTTP layer and reconciliation: what a call is and
//! how it ended. No I/O.

use serde::{Deserialize, Serialize};

/// What a triggered call asked Easemob to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOp {
    /// `POST /{org}/{app}/users/{owner}/contacts/users/{friend}`; expects a roster `add` callback.
    Add,
    /// `DELETE` of the same path; expects a roster `remove` callback.
    Remove,
}

impl CallOp {
    /// Stored and serialised name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOp::Add => "add",
            CallOp::Remove => "remove",
        }
    }

    /// The roster `payload.operation` this call should cause.
    pub fn expected_callback_operation(self) -> &'static str {
        self.as_str()
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "add" => Some(CallOp::Add),
            "remove" => Some(CallOp::Remove),
            _ => None,
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Easemob answered 2xx.
    Succeeded,
    /// Easemob answered a final 4xx (e.g. `exceed_limit`, `service_resource_not_found`).
    Rejected,
    /// Retries exhausted (429/5xx) or a transport error.
    Failed,
    /// The process stopped between recording the intent and the outcome; whether Easemob
    /// acted is not known.
    Unknown,
    /// Intent recorded, outcome not yet (the call is running now).
    InFlight,
}

impl Outcome {
    /// Stored and serialised name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Unknown => "unknown",
            Outcome::InFlight => "in_flight",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => Outcome::Succeeded,
            "rejected" => Outcome::Rejected,
            "failed" => Outcome::Failed,
            "unknown" => Outcome::Unknown,
            "in_flight" => Outcome::InFlight,
            _ => return None,
        })
    }
}
