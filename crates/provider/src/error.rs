//! The provider-neutral error: [`nodeport_firewall_model::failure::Failure`], under the
//! name providers use. It keeps its kind and its source across every crate boundary.

pub use nodeport_firewall_model::failure::{ErrorKind, Failure as Error};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined with ": ", as SDK errors hide the cause in the chain.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
