//! How ARM operations count in [`CallStats`]: listing rules and polling operations are
//! reads (`List*`, `Get*`, `Poll*`); rule PUTs and DELETEs are writes.

pub use nodeport_firewall_provider::stats::{CallStats, OpKind, OpStats};

/// The kind of an ARM operation.
pub fn kind(op: &str) -> OpKind {
    if op.starts_with("List") || op.starts_with("Get") || op.starts_with("Poll") {
        OpKind::Read
    } else {
        OpKind::Write
    }
}
