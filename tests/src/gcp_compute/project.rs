//! `projects.get`: the project resource with its `quotas[]`, as Compute answers it. The
//! `FIREWALLS` entry's `usage` is the number of firewall rules of the project, over every
//! network, and its `limit` the quota that inserts are held to; the other metrics are
//! there so that a client must pick the right one (one of them a name the SDK does not
//! know, as new quota metrics appear).

use serde_json::{Value, json};

use super::URL;
use super::errors::{Answer, error};

/// The `FIREWALLS` limit of a project no test set one for (a raised quota: the default
/// of new projects is lower, but tests that do not care should not meet it).
pub(super) const DEFAULT_FIREWALL_QUOTA: usize = 1000;

/// The body of `projects.get` for `project`, whose `FIREWALLS` quota is `limit` with
/// `firewalls` rules.
pub(super) fn project_json(project: &str, id: u64, limit: usize, firewalls: usize) -> Value {
    // Compute sends quota numbers as doubles.
    let quota = |metric: &str, limit: f64, usage: f64| json!({"metric": metric, "limit": limit, "usage": usage});
    json!({
        "kind": "compute#project",
        "id": id.to_string(),
        "creationTimestamp": "2026-01-01T00:00:00.000-08:00",
        "name": project,
        "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": "n5ZAE8Gzbbk="},
        "quotas": [
            quota("SNAPSHOTS", 5000.0, 0.0),
            quota("NETWORKS", 15.0, 1.0),
            quota("FIREWALLS", limit as f64, firewalls as f64),
            quota("SOME_FUTURE_QUOTA_METRIC", 10.0, 0.0),
            quota("ROUTES", 250.0, 2.0),
        ],
        "selfLink": format!("{URL}projects/{project}"),
        "defaultServiceAccount": "123456789-compute@developer.gserviceaccount.com",
        "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS",
        "defaultNetworkTier": "PREMIUM",
    })
}

/// The answer when the credentials lack `compute.projects.get`.
pub(super) fn forbidden(project: &str) -> Answer {
    error(
        403,
        "forbidden",
        "global",
        &format!("Required 'compute.projects.get' permission for 'projects/{project}'"),
    )
}
