//! The permission preflight on GCP: which Compute firewall permissions the credentials
//! lack on a target, found without writing. Listing shows `compute.firewalls.list`; the
//! write permissions are asked of `firewalls.testIamPermissions` on a rule of the network
//! that carries our name prefix when there is one: the recommended IAM condition
//! (docs/gcp.md) grants writes only on rules named `npf-<cluster>-*`, so asked of another
//! rule they read as missing. `compute.projects.get` (the project's quota) shows as missing
//! when the observation could not read the quota for want of it.

use nodeport_firewall_model::Target;
use nodeport_firewall_provider::{ErrorKind, Result};

use crate::GcpProvider;

impl GcpProvider {
    /// `compute.firewalls.list` by listing; the write permissions by
    /// `firewalls.testIamPermissions` on a rule of the network, one with our name prefix if
    /// any (else any rule: without an IAM condition they inherit the project's policy). A
    /// network without rules cannot be checked for writes.
    pub(crate) async fn missing_permissions(&self, target: &Target) -> Result<Vec<String>> {
        let (obs, quota_denied) = match self.observe_target(target).await {
            Ok(o) => o,
            Err(e) if e.kind == ErrorKind::PermissionDenied => {
                return Ok(vec!["compute.firewalls.list".to_string()]);
            }
            Err(e) => return Err(e),
        };
        // A rule of ours by name first: the recommended IAM condition grants writes on our
        // names only, so asked of another rule they would read as missing.
        let prefix = crate::marker::name_prefix(&self.cluster);
        let ids = || obs.rules.iter().filter_map(|r| r.id.clone());
        let mut missing: Vec<String> = quota_denied
            .then(|| "compute.projects.get".to_string())
            .into_iter()
            .collect();
        let Some(probe) = ids()
            .find(|n| n.starts_with(&prefix))
            .or_else(|| ids().next())
        else {
            return Ok(missing);
        };
        let (project, _) = Self::split_target(target)?;
        let wanted: Vec<String> = [
            "compute.firewalls.get",
            "compute.firewalls.create",
            "compute.firewalls.update",
            "compute.firewalls.delete",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let granted = self.granted_permissions(project, &probe, &wanted).await?;
        missing.extend(wanted.into_iter().filter(|w| !granted.contains(w)));
        Ok(missing)
    }
}
