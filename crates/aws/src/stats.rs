//! Counts of EC2 API calls by operation, for metrics and for tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// Calls, retries and failures of one EC2 operation.
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

/// EC2 API calls by operation name (`DescribeSecurityGroupRules`, ...). Permission checks are
/// counted as `DryRun:<operation>`.
#[derive(Debug, Default)]
pub struct CallStats {
    inner: Mutex<BTreeMap<String, OpStats>>,
}

impl CallStats {
    fn with(&self, op: &str, f: impl FnOnce(&mut OpStats)) {
        if let Ok(mut m) = self.inner.lock() {
            f(m.entry(op.to_string()).or_default());
        }
    }

    pub(crate) fn call(&self, op: &str) {
        self.with(op, |s| s.calls += 1);
    }

    pub(crate) fn retry(&self, op: &str) {
        self.with(op, |s| s.retries += 1);
    }

    pub(crate) fn error(&self, op: &str) {
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

    /// Attempts of read operations (`Describe*`).
    pub fn reads(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|(op, _)| is_read(op))
            .map(|(_, s)| s.calls)
            .sum()
    }

    /// Attempts of write operations (dry runs excluded).
    pub fn writes(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|(op, _)| !is_read(op) && !op.starts_with("DryRun:"))
            .map(|(_, s)| s.calls)
            .sum()
    }

    pub fn reset(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.clear();
        }
    }
}

fn is_read(op: &str) -> bool {
    op.starts_with("Describe")
}
