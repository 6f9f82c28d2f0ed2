//! One fault-injection API for every test server. A test arms faults for the next N
//! requests of an operation (`firewalls.insert`, `PutSecurityRule`, `write`, a Kubernetes
//! resource, or `*` for any); the server takes the first armed fault that matches a
//! request's operation names as it arrives, and acts it out. Each server's own helpers
//! (`fail_next`, `throttle_writes`, `forbid`) arm faults through this.

use std::sync::Mutex;

/// What a server does instead of (or besides) answering a request normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status, the cloud's error `code` if given, and a Retry-After
    /// of `retry_after` seconds if given; the request has no effect.
    Status {
        status: u16,
        code: Option<String>,
        retry_after: Option<u64>,
    },
    /// Carry out the write, then answer 503 as if the response was lost.
    LoseResponse,
    /// Accept the write; its long-running operation then ends with this error (and the
    /// write has no effect).
    FailOperation { code: String, message: String },
}

impl Fault {
    /// A plain HTTP status.
    pub fn status(status: u16) -> Self {
        Fault::Status {
            status,
            code: None,
            retry_after: None,
        }
    }
}

#[derive(Debug)]
struct Armed {
    operation: String,
    remaining: usize,
    fault: Fault,
}

/// The faults armed on one server.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<Armed>>,
}

impl Faults {
    /// Arms `fault` for the next `times` requests of `operation` (`usize::MAX`: for good).
    pub fn inject(&self, operation: &str, times: usize, fault: Fault) {
        if times == 0 {
            return;
        }
        self.armed.lock().unwrap().push(Armed {
            operation: operation.to_string(),
            remaining: times,
            fault,
        });
    }

    /// The fault for a request known by `names` (most specific first), if one is armed;
    /// counts it as used.
    pub fn take(&self, names: &[&str]) -> Option<Fault> {
        self.take_named(names).map(|(_, fault)| fault)
    }

    /// As [`Faults::take`], with the operation the fault was armed for.
    pub fn take_named(&self, names: &[&str]) -> Option<(String, Fault)> {
        let mut armed = self.armed.lock().unwrap();
        let i = armed
            .iter()
            .position(|a| a.operation == "*" || names.contains(&a.operation.as_str()))?;
        let taken = (armed[i].operation.clone(), armed[i].fault.clone());
        if armed[i].remaining != usize::MAX {
            armed[i].remaining -= 1;
            if armed[i].remaining == 0 {
                armed.remove(i);
            }
        }
        Some(taken)
    }

    /// Disarms everything.
    pub fn clear(&self) {
        self.armed.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_taken_in_order_by_operation_and_count() {
        let f = Faults::default();
        f.inject("firewalls.insert", 2, Fault::status(503));
        f.inject("write", 1, Fault::LoseResponse);
        f.inject("pods", usize::MAX, Fault::status(403));
        assert_eq!(f.take(&["firewalls.list"]), None);
        assert_eq!(
            f.take(&["firewalls.insert", "write"]),
            Some(Fault::status(503))
        );
        assert_eq!(
            f.take(&["firewalls.insert", "write"]),
            Some(Fault::status(503))
        );
        assert_eq!(
            f.take(&["firewalls.insert", "write"]),
            Some(Fault::LoseResponse)
        );
        assert_eq!(f.take(&["firewalls.insert", "write"]), None);
        for _ in 0..3 {
            assert_eq!(f.take(&["pods"]), Some(Fault::status(403)));
        }
        f.clear();
        assert_eq!(f.take(&["pods"]), None);
        f.inject("*", 1, Fault::status(500));
        assert_eq!(f.take(&["anything"]), Some(Fault::status(500)));
    }
}
