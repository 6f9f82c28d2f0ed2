//! Test servers that stand in for the real APIs on machines without a cloud or a cluster.
//!
//! Each module reproduces the REST semantics that one client depends on (status codes,
//! long-running operations, conflicts, throttling, limits), so that the real client — kube's,
//! or a cloud SDK's — is exercised over HTTP. They are used by the end-to-end tests of the
//! binary in `tests/e2e/` and by the crates' own integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod azure_arm;
pub mod faults;
pub mod gcp_compute;
pub mod kube_api;
