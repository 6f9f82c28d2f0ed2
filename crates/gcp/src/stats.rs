//! How Compute operations count in [`CallStats`]: `*.list`, `*.get` and `*.aggregatedList`
//! are reads, `firewalls.insert`/`.patch`/`.delete` writes; Operation polls are neither.

pub use nodeport_firewall_provider::stats::{CallStats, OpKind, OpStats};

/// The name under which Operation polls are counted.
pub const OPERATION_GET: &str = "globalOperations.get";

/// The kind of a Compute operation.
pub fn kind(op: &str) -> OpKind {
    if op == OPERATION_GET {
        OpKind::Other
    } else if op.ends_with(".insert") || op.ends_with(".patch") || op.ends_with(".delete") {
        OpKind::Write
    } else if op.ends_with(".list") || op.ends_with(".get") || op.ends_with(".aggregatedList") {
        OpKind::Read
    } else {
        OpKind::Other
    }
}

/// Operation polls counted in `stats`.
pub fn polls(stats: &CallStats) -> usize {
    stats.calls(OPERATION_GET)
}
