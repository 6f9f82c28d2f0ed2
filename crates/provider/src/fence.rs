//! Write fencing: whether this process may still send a cloud write, asked right before
//! every write attempt, not once per target.
//!
//! A target's apply can take minutes (Azure and GCP writes are sequential and each waits
//! for its long-running operation), far longer than a leader's lease. So the controller runs
//! every apply inside [`scoped`] with a fence backed by its lease, and
//! [`crate::retry::RetryPolicy::call`] asks [`check_write`] before each attempt (and each
//! retry) of an operation its [`crate::stats::CallStats`] classifies as a write. The memory
//! provider, which makes no cloud calls, asks [`check_write`] itself before each change.
//!
//! The fence lives in a tokio task-local, so it reaches every future polled inside the
//! scope (`buffer_unordered`, `join_all`, `select!`), but NOT a task started with
//! `tokio::spawn`: a write made on a spawned task is not fenced. No provider spawns today.
//! Outside any scope (the CLI's `apply`, which holds no lease) every write may go.

use std::future::Future;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// The cloud error code of a write refused by the fence, beside its kind
/// ([`ErrorKind::Conflict`]: another replica may be writing the target; the next leader
/// re-reads it and converges). Not retryable.
pub const LEASE_LOST: &str = "LeaseLost";

/// Decides whether a write may start now.
pub trait WriteFence: Send + Sync {
    /// Ok while this process may start a cloud write; else the error to fail the write with
    /// (see [`lease_lost`]).
    fn may_write(&self) -> Result<()>;
}

/// The error of a write refused because the lease is lost or about to be: kind
/// [`ErrorKind::Conflict`], code [`LEASE_LOST`], so it is never retried.
pub fn lease_lost(why: &str) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!("lease lost: write refused ({why})"),
    )
    .with_code(LEASE_LOST)
}

/// Whether `e` is a write the fence refused.
pub fn is_lease_lost(e: &Error) -> bool {
    e.code.as_deref() == Some(LEASE_LOST)
}

tokio::task_local! {
    static FENCE: Arc<dyn WriteFence>;
}

/// Runs `fut` with `fence` asked before every write made while it is polled (on this task).
pub async fn scoped<F: Future>(fence: Arc<dyn WriteFence>, fut: F) -> F::Output {
    FENCE.scope(fence, fut).await
}

/// Ok when a write may start now: no fence is installed, or the installed one allows it.
/// Call it right before sending each write.
pub fn check_write() -> Result<()> {
    FENCE.try_with(|f| f.may_write()).unwrap_or(Ok(()))
}

/// Whether a fence is installed for the current task.
pub fn is_fenced() -> bool {
    FENCE.try_with(|_| ()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Flag(AtomicBool);

    impl WriteFence for Flag {
        fn may_write(&self) -> Result<()> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(lease_lost("test"))
            }
        }
    }

    #[tokio::test]
    async fn the_fence_is_asked_inside_its_scope_and_only_there() {
        let flag = Arc::new(Flag(AtomicBool::new(true)));
        assert_eq!(check_write(), Ok(()));
        assert!(!is_fenced());
        let f = flag.clone();
        scoped(flag.clone(), async move {
            assert!(is_fenced());
            assert_eq!(check_write(), Ok(()));
            f.0.store(false, Ordering::SeqCst);
            let e = check_write().unwrap_err();
            assert!(is_lease_lost(&e), "{e:?}");
            assert_eq!(e.kind, ErrorKind::Conflict);
            assert!(!e.is_retryable());
            assert!(e.message.starts_with("lease lost: write refused"), "{e}");
            // Futures polled inside the scope see it too.
            let inner = futures::future::join(async { check_write() }, async { check_write() });
            let (a, b) = inner.await;
            assert!(a.is_err() && b.is_err());
        })
        .await;
        // Outside the scope again: no fence.
        assert_eq!(check_write(), Ok(()));
    }
}
