//! The project's `FIREWALLS` quota and the room it leaves one target.
//!
//! Compute counts every VPC firewall rule of a project against one quota, whatever its
//! network, while a target (project/network) sees only its network's rules. So the room of
//! a target is the quota less the project's rules outside what the target observed, and
//! the plan runs against the lower of that and `gcp.ruleBudget`.
//!
//! Several targets of one project (pools on different networks) are planned each on its
//! own, from its own observation: each one alone would see the project's whole free room,
//! and together they could pass the quota. So the free room is split evenly between the
//! networks of the project that the config may write to, and a target plans with its own
//! rules plus its share. Shares never overlap, so a stale observation of one target stays
//! safe after another target of the project was written. Rules a target removes free room
//! for that target only (conservative: the other targets see them only once they are
//! gone).
//!
//! The quota is a cloud fact, read with `projects.get` (one read per project per plan,
//! kept [`QUOTA_CACHE_TTL`] at most, and forgotten at the start of each plan and after
//! each apply to the project); when it cannot be read the plan uses `ruleBudget` alone,
//! with one warning. The room itself is computed here, purely.

use std::time::Duration;

use google_cloud_compute_v1::model::{Quota, quota};

/// How long one read of a project's quota serves other targets of that project. The
/// cache is also cleared at the start of every plan and after every apply to the
/// project, so within one plan each project is read once, and our own writes are always
/// seen by the next read.
pub(crate) const QUOTA_CACHE_TTL: Duration = Duration::from_secs(10);

/// The project's `FIREWALLS` quota as `projects.get` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirewallQuota {
    pub limit: usize,
    pub usage: usize,
}

/// The `FIREWALLS` entry of a project's `quotas`, when it has a usable one. Compute sends
/// numbers as doubles: the limit is rounded down and the usage up, so that an odd value
/// can only make the room smaller.
pub(crate) fn firewalls_of(quotas: &[Quota]) -> Option<FirewallQuota> {
    let q = quotas
        .iter()
        .find(|q| matches!(q.metric, Some(quota::Metric::Firewalls)))?;
    Some(FirewallQuota {
        limit: count(q.limit?.floor())?,
        usage: count(q.usage.unwrap_or(0.0).ceil())?,
    })
}

/// A finite, non-negative double as a count (saturating above `usize::MAX`).
fn count(x: f64) -> Option<usize> {
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    // `as` saturates, it never panics; a quota near usize::MAX is no limit at all.
    Some(x as usize)
}

/// The rules a target may hold under `quota`, counting the `observed` rules of its
/// network, with the free room split between `sharing` networks of the project (at least
/// this one); and why, when the quota is tighter than `budget`. `None` for the reason:
/// `budget` applies.
pub(crate) fn max_rules(
    budget: usize,
    quota: FirewallQuota,
    observed: usize,
    sharing: usize,
) -> (usize, Option<String>) {
    let sharing = sharing.max(1);
    // Rules of the project the observation does not hold: other networks' rules. A usage
    // that lags behind the list (it is updated after the rules) never goes below zero.
    let outside = quota.usage.saturating_sub(observed);
    let used = outside + observed;
    let free = quota.limit.saturating_sub(used);
    let share = free / sharing;
    // A project over its quota (the quota was lowered) keeps what it has: removes and
    // patches need no quota, adds do.
    let by_quota = observed + share;
    if by_quota >= budget {
        return (budget, None);
    }
    let mut reason = format!(
        "the project's FIREWALLS quota: limit {}, {} used, {outside} of them outside this network",
        quota.limit, quota.usage
    );
    if sharing > 1 {
        reason.push_str(&format!(
            "; its {free} free rules are shared by the {sharing} networks of the project that the config writes to, {share} each"
        ));
    }
    (by_quota, Some(reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(limit: usize, usage: usize) -> FirewallQuota {
        FirewallQuota { limit, usage }
    }

    #[test]
    fn the_lower_of_quota_and_budget_applies() {
        let outside = |n: usize| format!("{n} of them outside this network");
        for (what, budget, quota, observed, sharing, want, reason) in [
            (
                "plenty of quota: the budget",
                100,
                q(1000, 10),
                10,
                1,
                100,
                None,
            ),
            (
                "one network: limit less the others",
                100,
                q(100, 97),
                7,
                1,
                10,
                Some(outside(90)),
            ),
            (
                "quota room equal to the budget",
                10,
                q(100, 90),
                0,
                1,
                10,
                None,
            ),
            ("full project", 100, q(100, 100), 4, 1, 4, Some(outside(96))),
            (
                "over the quota: keeps what it has",
                100,
                q(50, 80),
                5,
                1,
                5,
                Some(outside(75)),
            ),
            (
                "usage behind the list",
                100,
                q(10, 2),
                4,
                1,
                10,
                Some(outside(0)),
            ),
            (
                "two networks share 6 free rules",
                100,
                q(100, 94),
                4,
                2,
                7,
                Some(outside(90)),
            ),
            (
                "three networks share 2 free rules: none each",
                100,
                q(100, 98),
                0,
                3,
                0,
                Some(outside(98)),
            ),
            (
                "sharing 0 counts as 1",
                100,
                q(10, 0),
                0,
                0,
                10,
                Some(outside(0)),
            ),
        ] {
            let (max, why) = max_rules(budget, quota, observed, sharing);
            assert_eq!(max, want, "{what}");
            match (&why, &reason) {
                (None, None) => {}
                (Some(w), Some(r)) => {
                    assert!(
                        w.starts_with("the project's FIREWALLS quota: limit "),
                        "{what}: {w}"
                    );
                    assert!(w.contains(r), "{what}: {w}");
                    assert_eq!(w.contains("shared by"), sharing > 1, "{what}: {w}");
                }
                _ => panic!("{what}: {why:?}, want {reason:?}"),
            }
        }
        let (_, why) = max_rules(100, q(100, 97), 7, 1);
        assert_eq!(
            why.as_deref(),
            Some(
                "the project's FIREWALLS quota: limit 100, 97 used, 90 of them outside this network"
            )
        );
    }

    #[test]
    fn the_quota_entry_is_found_and_odd_numbers_make_it_smaller() {
        let entry = |metric: quota::Metric, limit: Option<f64>, usage: Option<f64>| {
            let mut q = Quota::new().set_metric(metric);
            q.limit = limit;
            q.usage = usage;
            q
        };
        let quotas = [
            entry(quota::Metric::Networks, Some(15.0), Some(1.0)),
            entry(quota::Metric::Firewalls, Some(100.0), Some(97.0)),
        ];
        assert_eq!(firewalls_of(&quotas), Some(q(100, 97)));
        assert_eq!(
            firewalls_of(&[entry(quota::Metric::Firewalls, Some(10.5), Some(2.2))]),
            Some(q(10, 3))
        );
        assert_eq!(
            firewalls_of(&[entry(quota::Metric::Firewalls, Some(10.0), None)]),
            Some(q(10, 0))
        );
        for bad in [
            entry(quota::Metric::Firewalls, None, Some(1.0)),
            entry(quota::Metric::Firewalls, Some(f64::NAN), Some(1.0)),
            entry(quota::Metric::Firewalls, Some(-1.0), Some(1.0)),
            entry(quota::Metric::Firewalls, Some(10.0), Some(f64::INFINITY)),
            entry(quota::Metric::Networks, Some(10.0), Some(1.0)),
        ] {
            assert_eq!(firewalls_of(std::slice::from_ref(&bad)), None, "{bad:?}");
        }
        assert_eq!(firewalls_of(&[]), None);
    }

    proptest! {
        /// Whatever the numbers: never above the budget; never below what the target holds
        /// unless the budget is; and the targets sharing a project, each growing to its
        /// limit, together stay within the quota whenever the project was within it.
        #[test]
        fn shares_never_pass_the_quota_together(
            budget in 1usize..300,
            limit in 0usize..300,
            observed in proptest::collection::vec(0usize..60, 1..5),
            foreign in 0usize..100,
        ) {
            let sharing = observed.len();
            let usage = foreign + observed.iter().sum::<usize>();
            let quota = q(limit, usage);
            let maxes: Vec<usize> = observed
                .iter()
                .map(|o| max_rules(budget, quota, *o, sharing).0)
                .collect();
            for (m, o) in maxes.iter().zip(&observed) {
                prop_assert!(*m <= budget);
                prop_assert!(*m >= (*o).min(budget));
            }
            if usage <= limit {
                prop_assert!(foreign + maxes.iter().sum::<usize>() <= limit);
            }
        }
    }
}
