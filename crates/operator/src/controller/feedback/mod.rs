//! Feedback on Services: Kubernetes Events and the `NodePortFirewallSynced` condition.
//!
//! In two halves: `decide.rs` works out, purely, what each Service is told after a reconcile
//! (from the plan, the apply outcomes and which Services carry our condition already), and
//! `publish.rs` sends it with the kube client, skipping what was already said.

mod decide;
mod publish;

pub use self::decide::{
    CONDITION_TYPE, ConditionState, CurrentCondition, MAX_MESSAGE, Outcome, Report,
    ServiceFeedback, current_condition, decide, error_kinds, fingerprint_condition,
};
pub(crate) use self::decide::{fingerprint, truncate};
pub use self::publish::{FIELD_MANAGER, PUBLISH_CONCURRENCY, Publisher};
