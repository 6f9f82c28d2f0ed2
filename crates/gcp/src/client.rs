//! The Compute calls this provider makes, and nothing else: each goes through
//! [`GcpProvider::call`] (counted, retried with the shared policy, errors mapped), lists are
//! read to their last page, and writes carry a fresh `requestId` and wait for their
//! Operation to be DONE. Requests are built from and answered with SDK types; turning them
//! into neutral rules is `wire`'s job.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use google_cloud_compute_v1::model::{Firewall, Operation, operation};
use nodeport_firewall_provider::{Error, ErrorKind, Result};

use crate::{GcpProvider, discovery, error, invalid, stats};

impl GcpProvider {
    /// Runs one Compute call: counted, retried when throttled or transient, errors mapped.
    pub(crate) async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, google_cloud_gax::error::Error>>,
    {
        self.retry
            .call(&self.stats, "Compute", op, f, |op, e| {
                error::map_sdk_error(op, &e)
            })
            .await
    }

    /// Every instance of `project` (one paginated aggregated list), by `project/zone/name`.
    pub(crate) async fn project_instances(
        &self,
        project: &str,
    ) -> Result<BTreeMap<discovery::InstanceKey, discovery::InstanceInfo>> {
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let page = self
                .call("instances.aggregatedList", || {
                    self.instances
                        .aggregated_list()
                        .set_project(project)
                        .set_max_results(500u32)
                        .set_page_token(token.clone())
                        .send()
                })
                .await?;
            for (scope, list) in &page.items {
                let zone = scope.strip_prefix("zones/").unwrap_or(scope);
                for i in &list.instances {
                    let Some(name) = i.name.as_deref() else {
                        continue;
                    };
                    let zone = i
                        .zone
                        .as_deref()
                        .and_then(|z| z.rsplit('/').next())
                        .unwrap_or(zone);
                    out.insert(
                        format!("{project}/{zone}/{name}"),
                        discovery::InstanceInfo {
                            tags: i.tags.as_ref().map(|t| t.items.clone()).unwrap_or_default(),
                            service_accounts: i
                                .service_accounts
                                .iter()
                                .filter_map(|s| s.email.clone())
                                .collect(),
                        },
                    );
                }
            }
            token = page.next_page_token.clone().unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    /// Every firewall rule of `project` that matches `filter`, over all pages.
    pub(crate) async fn list_firewalls(
        &self,
        project: &str,
        filter: &str,
    ) -> Result<Vec<Firewall>> {
        let mut token = String::new();
        let mut out = Vec::new();
        loop {
            let page = self
                .call("firewalls.list", || {
                    self.firewalls
                        .list()
                        .set_project(project)
                        .set_filter(filter)
                        .set_max_results(500u32)
                        .set_page_token(token.clone())
                        .send()
                })
                .await?;
            out.extend(page.items);
            token = page.next_page_token.unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    /// Which of `wanted` the credentials hold on the firewall rule `resource` of `project`.
    pub(crate) async fn granted_permissions(
        &self,
        project: &str,
        resource: &str,
        wanted: &[String],
    ) -> Result<Vec<String>> {
        let granted = self
            .call("firewalls.testIamPermissions", || {
                self.firewalls
                    .test_iam_permissions()
                    .set_project(project)
                    .set_resource(resource)
                    .set_body(
                        google_cloud_compute_v1::model::TestPermissionsRequest::new()
                            .set_permissions(wanted.to_vec()),
                    )
                    .send()
            })
            .await?;
        Ok(granted.permissions)
    }

    /// Inserts `body` (a whole rule: name, network and direction included) into `project`.
    pub(crate) async fn insert_firewall(&self, project: &str, body: Firewall) -> Result<()> {
        let request_id = request_id();
        let op = self
            .call("firewalls.insert", || {
                self.firewalls
                    .insert()
                    .set_project(project)
                    .set_request_id(request_id.clone())
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.insert", op).await
    }

    /// Patches the rule `name` of `project` with the fields set in `body`.
    pub(crate) async fn patch_firewall(
        &self,
        project: &str,
        name: &str,
        body: Firewall,
    ) -> Result<()> {
        let request_id = request_id();
        let op = self
            .call("firewalls.patch", || {
                self.firewalls
                    .patch()
                    .set_project(project)
                    .set_firewall(name)
                    .set_request_id(request_id.clone())
                    .set_body(body.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.patch", op).await
    }

    /// Deletes the rule `name` of `project`.
    pub(crate) async fn delete_firewall(&self, project: &str, name: &str) -> Result<()> {
        let request_id = request_id();
        let op = self
            .call("firewalls.delete", || {
                self.firewalls
                    .delete()
                    .set_project(project)
                    .set_firewall(name)
                    .set_request_id(request_id.clone())
                    .send()
            })
            .await?;
        self.wait(project, "firewalls.delete", op).await
    }

    /// Waits for a write's Operation to be DONE and checks its error.
    async fn wait(&self, project: &str, what: &str, mut op: Operation) -> Result<()> {
        let timeout = Duration::from_secs(self.config.operation_timeout_seconds);
        let deadline = Instant::now().checked_add(timeout);
        let mut pause = Duration::from_millis(self.config.operation_poll_millis.max(1));
        loop {
            if op.status == Some(operation::Status::Done) {
                return match &op.error {
                    Some(e) if !e.errors.is_empty() => {
                        let errors: Vec<error::OperationError> = e
                            .errors
                            .iter()
                            .map(|x| error::OperationError {
                                code: x.code.clone(),
                                message: x.message.clone(),
                                reasons: x
                                    .error_details
                                    .iter()
                                    .filter_map(|d| d.error_info.as_ref()?.reason.clone())
                                    .collect(),
                                quota_info: x.error_details.iter().any(|d| d.quota_info.is_some()),
                            })
                            .collect();
                        Err(error::map_operation_error(
                            what,
                            op.http_error_status_code,
                            &errors,
                        ))
                    }
                    _ => Ok(()),
                };
            }
            let name =
                op.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                    invalid(format!("Compute {what}: an Operation without a name"))
                })?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    ErrorKind::Transient,
                    format!(
                        "Compute {what}: operation {name} not DONE after {}s",
                        self.config.operation_timeout_seconds
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause.mul_f64(1.5)).min(Duration::from_secs(5));
            op = self
                .call(stats::OPERATION_GET, || {
                    self.firewalls
                        .get_operation()
                        .set_project(project)
                        .set_operation(name.clone())
                        .send()
                })
                .await?;
        }
    }
}

/// A random UUID (version 4) for a write's `requestId`: the same on every retry of that
/// write, so that Compute applies it once.
fn request_id() -> String {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuids() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }
}
