//! Counts of cloud API calls by operation, for metrics and for tests. Every provider counts
//! its SDK calls here; only the naming of operations (which are reads, which are writes)
//! differs per cloud, and each provider passes its own [`OpKind`] classifier.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// Calls, retries and failures of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpStats {
    /// HTTP attempts sent, retries included.
    pub calls: usize,
    /// Attempts that were retried after a throttled or transient failure.
    pub retries: usize,
    /// Calls that finally failed.
    pub errors: usize,
}

/// What an operation is, for [`CallStats::reads`] and [`CallStats::writes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Reads the cloud's state (lists, gets, describes).
    Read,
    /// Changes the cloud's state.
    Write,
    /// Neither: operation polls, permission checks.
    Other,
}

/// API calls by operation name, as the provider names them (`DescribeSecurityGroupRules`,
/// `firewalls.insert`, `PutSecurityRule`, ...).
#[derive(Debug)]
pub struct CallStats {
    inner: Mutex<BTreeMap<String, OpStats>>,
    kind: fn(&str) -> OpKind,
}

impl CallStats {
    /// Counts calls; `kind` tells reads from writes.
    pub fn new(kind: fn(&str) -> OpKind) -> Self {
        CallStats {
            inner: Mutex::default(),
            kind,
        }
    }

    /// What `op` is: [`crate::retry::RetryPolicy::call`] asks the write fence
    /// ([`crate::fence`]) before every attempt of a write.
    pub fn kind(&self, op: &str) -> OpKind {
        (self.kind)(op)
    }

    fn with(&self, op: &str, f: impl FnOnce(&mut OpStats)) {
        if let Ok(mut m) = self.inner.lock() {
            f(m.entry(op.to_string()).or_default());
        }
    }

    /// One attempt of `op` was sent.
    pub fn call(&self, op: &str) {
        self.with(op, |s| s.calls += 1);
    }

    /// An attempt of `op` is retried.
    pub fn retry(&self, op: &str) {
        self.with(op, |s| s.retries += 1);
    }

    /// `op` finally failed.
    pub fn error(&self, op: &str) {
        self.with(op, |s| s.errors += 1);
    }

    /// Every operation's counts.
    pub fn snapshot(&self) -> BTreeMap<String, OpStats> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Attempts of one operation.
    pub fn calls(&self, op: &str) -> usize {
        self.snapshot().get(op).map_or(0, |s| s.calls)
    }

    fn sum(&self, kind: OpKind) -> usize {
        self.snapshot()
            .iter()
            .filter(|(op, _)| (self.kind)(op) == kind)
            .map(|(_, s)| s.calls)
            .sum()
    }

    /// Attempts of read operations.
    pub fn reads(&self) -> usize {
        self.sum(OpKind::Read)
    }

    /// Attempts of write operations.
    pub fn writes(&self) -> usize {
        self.sum(OpKind::Write)
    }

    /// Forgets every count.
    pub fn reset(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(op: &str) -> OpKind {
        match op {
            "list" => OpKind::Read,
            "put" => OpKind::Write,
            _ => OpKind::Other,
        }
    }

    #[test]
    fn counts_by_operation_and_kind() {
        let s = CallStats::new(kind);
        for op in ["list", "list", "put", "poll"] {
            s.call(op);
        }
        s.retry("put");
        s.error("put");
        assert_eq!((s.reads(), s.writes(), s.calls("poll")), (2, 1, 1));
        assert_eq!(
            ["list", "put", "poll"].map(|op| s.kind(op)),
            [OpKind::Read, OpKind::Write, OpKind::Other]
        );
        assert_eq!(
            s.snapshot()["put"],
            OpStats {
                calls: 1,
                retries: 1,
                errors: 1
            }
        );
        s.reset();
        assert_eq!(s.reads() + s.writes(), 0);
    }
}
