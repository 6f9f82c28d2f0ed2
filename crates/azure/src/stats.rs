//! How ARM operations count in [`CallStats`]: listing and getting are reads (`List*`,
//! `Get*`), polling a long-running operation is neither (as for GCP), rule PUTs and DELETEs
//! are writes.

pub use nodeport_firewall_provider::stats::{CallStats, OpKind, OpStats};

/// The kind of an ARM operation.
pub fn kind(op: &str) -> OpKind {
    if op.starts_with("List") || op.starts_with("Get") {
        OpKind::Read
    } else if op.starts_with("Poll") {
        OpKind::Other
    } else {
        OpKind::Write
    }
}
