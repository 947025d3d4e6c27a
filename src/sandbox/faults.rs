//! Faults a test forces on the API: "answer the next N requests whose path contains X with
//! status S". This is the deterministic counterpart of the random callback faults, meant for
//! client tests such as "401 once, then success" or "429, then success".

use std::collections::VecDeque;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

/// Body of `POST /_sandbox/faults` and argument of `SandboxHandle::inject_faults`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct InjectedFault {
    /// HTTP status to answer with (Easemob's error body for it: 401 `unauthorized`,
    /// 429 `reach_limit`, 500/503 generic, ...).
    pub status: u16,
    /// How many matching requests get the fault.
    pub count: u32,
    /// Only requests whose path contains this substring match; `None` matches every API
    /// request, including `/token`.
    #[serde(default)]
    pub path_contains: Option<String>,
    /// Easemob's error type for the body (`resource_limited`, say); `None`: the documented one
    /// for the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Pending injected faults, oldest first.
#[derive(Debug, Default)]
pub struct FaultQueue {
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    status: StatusCode,
    remaining: u32,
    path_contains: Option<String>,
    error: Option<String>,
}

impl FaultQueue {
    /// Queues a fault. An invalid status is refused so that it cannot become a panic later.
    pub fn push(&mut self, fault: InjectedFault) -> Result<(), String> {
        let status = StatusCode::from_u16(fault.status).map_err(|_| format!("invalid HTTP status {}", fault.status))?;
        if !(status.is_client_error() || status.is_server_error()) {
            return Err(format!("status {} is not an error status", fault.status));
        }
        if fault.count > 0 {
            self.pending.push_back(Pending {
                status,
                remaining: fault.count,
                path_contains: fault.path_contains,
                error: fault.error,
            });
        }
        Ok(())
    }

    /// The status (and error type, if the fault names one) to force on a request to `path`, if
    /// a queued fault matches it. When several match, the oldest one is used up first.
    pub fn take(&mut self, path: &str) -> Option<(StatusCode, Option<String>)> {
        let index = self.pending.iter().position(|fault| match &fault.path_contains {
            Some(part) => path.contains(part.as_str()),
            None => true,
        })?;
        let fault = self.pending.get_mut(index)?;
        fault.remaining -= 1;
        let forced = (fault.status, fault.error.clone());
        if fault.remaining == 0 {
            self.pending.remove(index);
        }
        Some(forced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(status: u16, count: u32, path_contains: Option<&str>) -> InjectedFault {
        InjectedFault { status, count, path_contains: path_contains.map(str::to_owned), error: None }
    }

    #[test]
    fn a_fault_applies_count_times_then_disappears() {
        let mut queue = FaultQueue::default();
        queue.push(fault(429, 2, None)).expect("valid");
        assert_eq!(queue.take("/o/a/users").map(|(s, _)| s), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(queue.take("/o/a/token").map(|(s, _)| s), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(queue.take("/o/a/users").map(|(s, _)| s), None);
    }

    #[test]
    fn only_matching_paths_use_up_a_fault() {
        let mut queue = FaultQueue::default();
        queue.push(fault(401, 1, Some("/contacts/"))).expect("valid");
        assert_eq!(queue.take("/o/a/token").map(|(s, _)| s), None);
        assert_eq!(queue.take("/o/a/users/x/contacts/users/y").map(|(s, _)| s), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(queue.take("/o/a/users/x/contacts/users/y").map(|(s, _)| s), None);
    }

    #[test]
    fn older_faults_are_used_first() {
        let mut queue = FaultQueue::default();
        queue.push(fault(500, 1, None)).expect("valid");
        queue.push(fault(503, 1, None)).expect("valid");
        assert_eq!(queue.take("/x").map(|(s, _)| s), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(queue.take("/x").map(|(s, _)| s), Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn invalid_or_non_error_statuses_are_refused() {
        let mut queue = FaultQueue::default();
        assert!(queue.push(fault(99, 1, None)).is_err());
        assert!(queue.push(fault(200, 1, None)).is_err());
        assert!(queue.push(fault(1000, 1, None)).is_err());
    }
}
