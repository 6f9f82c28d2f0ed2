//! When this provider's writes may need someone else: in a Shared VPC the network (and its
//! firewall rules) belongs to the host project, and a write refused with 403 means the
//! credentials may not write there. Resolving finds the first case and the plan carries it;
//! this gives the `gcloud` commands a network admin runs to carry out a plan's writes.

use std::collections::BTreeSet;

use nodeport_firewall_model::{Action, Change, ManualSteps, NodeSpec, Target, TargetPlan};

use crate::{GcpProvider, Scope, discovery};

/// The payload a pool target carries when its network is in another project than the
/// pool's instances (a Shared VPC, where writes usually need the host project's network
/// admin): `shared-vpc:<service project>,...`. `None` otherwise.
pub(crate) fn shared_vpc(project: &str, nodes: &[NodeSpec]) -> Option<String> {
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
    (!service_projects.is_empty()).then(|| {
        format!(
            "{SHARED_VPC}{}",
            service_projects.into_iter().collect::<Vec<_>>().join(",")
        )
    })
}

const SHARED_VPC: &str = "shared-vpc:";

impl GcpProvider {
    /// In a Shared VPC (as resolving found and the plan carries), the `gcloud` commands the
    /// host project's network admin runs, as the GCE cloud provider prints them. Pure: a
    /// write refused with 403 says the same in its error, and is not remembered.
    pub(crate) fn network_admin_steps(&self, plan: &TargetPlan) -> Option<ManualSteps> {
        let service_projects: BTreeSet<&str> = plan
            .resolved
            .iter()
            .filter_map(|p| p.strip_prefix(SHARED_VPC))
            .flat_map(|list| list.split(','))
            .filter(|p| !p.is_empty())
            .collect();
        if service_projects.is_empty() {
            return None;
        }
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
        let reason = format!(
            "Shared VPC: the network is in host project {project}, the nodes in {}. If these credentials may not write firewall rules in {project}, its network admin must run",
            service_projects.into_iter().collect::<Vec<_>>().join(", ")
        );
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
