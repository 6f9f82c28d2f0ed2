//! End-to-end tests of the `nodeport-firewall` binary. This library is empty on purpose:
//! the tests are the single test binary in `tests/e2e/`, which runs the real binary built
//! from `crates/operator` (see `tests/e2e/cli.rs` for how it is found and kept fresh).
