//! How EC2 and Service Quotas operations count in [`CallStats`]: `Describe*` and `Get*` are
//! reads; permission checks (`DryRun:<operation>`) are neither reads nor writes.

pub use nodeport_firewall_provider::stats::{CallStats, OpKind, OpStats};

/// The kind of an EC2 operation.
pub fn kind(op: &str) -> OpKind {
    if op.starts_with("Describe") || op.starts_with("Get") {
        OpKind::Read
    } else if op.starts_with("DryRun:") {
        OpKind::Other
    } else {
        OpKind::Write
    }
}
