//! When this provider's writes may need someone else: in a Shared VPC the network (and its
//! firewall rules) belongs to the host project, and a write refused with 403 means the
//! credentials may not write there. Remembers which targets are in either case, and gives
//! the `gcloud` commands a network admin runs to carry out a plan's writes instead.

use std::collections::BTreeSet;

use nodeport_firewall_model::{Action, Change, ManualSteps, NodeSpec, Target, TargetPlan};

use crate::{GcpProvider, Scope, discovery};

/// Why a target's writes may need a network admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NetworkAdmin {
    /// The network is in another project than the pool's instances (Shared VPC).
    SharedVpc { service_projects: BTreeSet<String> },
    /// A write was refused with 403 since the last successful apply.
    Forbidden,
}

impl GcpProvider {
    /// Remembers a target whose network is in another project than the pool's instances:
    /// a Shared VPC, where writes usually need the host project's network admin.
    pub(crate) fn note_shared_vpc(&self, target: &Target, project: &str, nodes: &[NodeSpec]) {
        let service_projects: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| {
                n.provider_id
                    .as_deref()
                    .and_then(discovery::parse_provider_id)
            })
            .map(|(p, _, _)| p.to_string())
            .filter(|p| p != project)
            .collect();
        if service_projects.is_empty() {
            return;
        }
        if let Ok(mut n) = self.network_admin.lock() {
            match n.get_mut(&target.id) {
                Some(NetworkAdmin::Forbidden) => {}
                Some(NetworkAdmin::SharedVpc {
                    service_projects: known,
                }) => known.extend(service_projects),
                None => {
                    n.insert(
                        target.id.clone(),
                        NetworkAdmin::SharedVpc { service_projects },
                    );
                }
            }
        }
    }

    /// In a Shared VPC, or after a write was refused with 403, the `gcloud` commands the
    /// host project's network admin runs, as the GCE cloud provider prints them.
    pub(crate) fn network_admin_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        let why = self
            .network_admin
            .lock()
            .ok()?
            .get(&plan.target.id)
            .cloned()?;
        let (project, _) = Self::split_target(&plan.target).ok()?;
        let writes: Vec<&Change> = plan
            .changes
            .iter()
            .filter(|c| c.action.is_write())
            .collect();
        let commands = self.gcloud_commands(&plan.target, &writes);
        if commands.is_empty() {
            return None;
        }
        let reason = match why {
            NetworkAdmin::SharedVpc { service_projects } => format!(
                "Shared VPC: the network is in host project {project}, the nodes in {}. If these credentials may not write firewall rules in {project}, its network admin must run",
                service_projects.into_iter().collect::<Vec<_>>().join(", ")
            ),
            NetworkAdmin::Forbidden => format!(
                "writes to firewall rules of project {project} were refused (403) for these credentials; a network admin of {project} must run"
            ),
        };
        Some(ManualSteps { reason, commands })
    }

    /// The `gcloud` commands that carry out `changes` on `target`, for a network admin.
    pub fn gcloud_commands(&self, target: &Target, changes: &[&Change]) -> Vec<String> {
        let Ok((project, network)) = Self::split_target(target) else {
            return Vec::new();
        };
        changes
            .iter()
            .filter_map(|c| {
                let rule = &c.rule;
                let rules = rule
                    .content
                    .ports
                    .iter()
                    .map(|p| format!("{}:{p}", rule.content.protocol))
                    .collect::<Vec<_>>()
                    .join(",");
                let sources = rule.sources_text();
                let description = shell_quote(&self.description(rule));
                let name = c.id.clone().or_else(|| rule.name.clone())?;
                match c.action {
                    Action::Add => {
                        let scope = rule.content.scope.as_deref().and_then(Scope::decode)?;
                        Some(format!(
                            "gcloud compute firewall-rules create {name} --project={project} --network={network} --direction=INGRESS --priority={} --action=ALLOW --rules={rules} --source-ranges={sources} {} --description={description}",
                            self.config.priority,
                            scope.gcloud_flag()
                        ))
                    }
                    Action::Update => Some(format!(
                        "gcloud compute firewall-rules update {name} --project={project} --rules={rules} --source-ranges={sources} --description={description}"
                    )),
                    Action::Remove => Some(format!(
                        "gcloud compute firewall-rules delete {name} --project={project} --quiet"
                    )),
                    _ => None,
                }
            })
            .collect()
    }
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote(r#"{"a":"b"}"#), r#"'{"a":"b"}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
