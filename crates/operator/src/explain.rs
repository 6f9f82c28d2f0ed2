//! `nodeport-firewall explain NAMESPACE/NAME`: one Service in plain words. Its annotations
//! as parsed, the policy that admits or closes it, its pools and their targets, the rules
//! that carry each of its ports, and every blocker with its fix. Pure: from the inputs and
//! a plan whose targets carry their observations.

use std::fmt::Write as _;

use nodeport_firewall_model::annotations::{Admission, admit};
use nodeport_firewall_model::desired::ServiceStatus;
use nodeport_firewall_model::{Action, Config, Plan, ServiceSpec};

/// What `explain` found: the text, and whether everything the Service asks for is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub text: String,
    pub in_place: bool,
}

/// Explains `service` (`namespace/name`); `None` when no Service of that name was read.
pub fn explain(
    config: &Config,
    services: &[ServiceSpec],
    plan: &Plan,
    service: &str,
) -> Option<Explanation> {
    let spec = services.iter().find(|s| s.service.to_string() == service)?;
    let report = plan.services.iter().find(|r| r.service == spec.service);
    let mut out = String::new();
    let mut blockers: Vec<(String, String)> = Vec::new();
    let _ = writeln!(out, "Service {service} ({:?})", spec.service_type);
    let node_ports: Vec<String> = spec
        .ports
        .iter()
        .filter_map(|p| {
            p.node_port.map(|n| {
                format!(
                    "{}/{} ({})",
                    n,
                    p.protocol.to_ascii_lowercase(),
                    p.name.as_deref().unwrap_or("-")
                )
            })
        })
        .collect();
    let _ = writeln!(out, "  node ports: {}", list(&node_ports));
    let ours: Vec<String> = spec
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with(nodeport_firewall_model::ANNOTATION_PREFIX))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(out, "  annotations: {}", list(&ours));

    let intent = match admit(spec, config) {
        Admission::Managed(intent) => {
            let _ = writeln!(
                out,
                "  parsed: ports {}; sources {}; pools {}",
                list(
                    &intent
                        .ports
                        .iter()
                        .map(|(p, n)| format!("{n}/{p}"))
                        .collect::<Vec<_>>()
                ),
                intent.sources,
                match &intent.pools {
                    nodeport_firewall_model::PoolSelector::All => "all managed pools".to_string(),
                    nodeport_firewall_model::PoolSelector::Named(p) => {
                        p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                    }
                }
            );
            Some(intent)
        }
        Admission::Unmanaged { reason } => {
            blockers.push((
                format!("not managed: {reason}"),
                "annotate it nodeport-firewall.io/enabled: \"true\" (or set manageAllNodePortServices)".into(),
            ));
            None
        }
        Admission::Invalid { errors, .. } => {
            for e in errors {
                blockers.push((
                    format!("invalid annotation: {e}"),
                    "fix the annotation; until then its existing rules are kept as they are".into(),
                ));
            }
            None
        }
    };

    if let Some(r) = report {
        match (&r.status, &r.policy) {
            (ServiceStatus::Managed, Some(p)) => {
                let _ = writeln!(out, "  policy: admitted by {p}");
            }
            (ServiceStatus::Managed, None) => {
                let _ = writeln!(
                    out,
                    "  policy: admitted by the operator's floor (no namespace policy selects it)"
                );
            }
            (ServiceStatus::Closed, by) => blockers.push((
                format!(
                    "closed by the policy{}: {}",
                    by.as_deref().map(|b| format!(" {b}")).unwrap_or_default(),
                    r.reason.as_deref().unwrap_or("refused")
                ),
                "ask for what the policy permits, or widen the policy (docs/policy.md)".into(),
            )),
            _ => {}
        }
    }

    let pools: Vec<&str> = report
        .map(|r| r.pools.iter().map(|p| p.as_str()).collect())
        .unwrap_or_default();
    let mut in_place =
        intent.is_some() && report.is_some_and(|r| r.status == ServiceStatus::Managed);
    if in_place && pools.is_empty() {
        blockers.push((
            "no managed pool to open it on".into(),
            "name existing pools in nodeport-firewall.io/node-pools, or check the Nodes' pool labels".into(),
        ));
        in_place = false;
    }
    for pool in &pools {
        let Some(pr) = plan.pools.iter().find(|p| p.name.as_str() == *pool) else {
            continue;
        };
        if let Some(e) = &pr.error {
            blockers.push((
                format!("pool {pool} could not be resolved: {e}"),
                "fix the pool's provider config or its Nodes' provider IDs; its rules are kept meanwhile".into(),
            ));
            in_place = false;
            continue;
        }
        for pt in &pr.targets {
            let _ = writeln!(
                out,
                "  pool {pool} -> {}{}",
                pt.target,
                pt.scope
                    .as_deref()
                    .map(|s| format!(" (scope {s})"))
                    .unwrap_or_default()
            );
            let tp = plan.targets.iter().find(|t| t.target == pt.target);
            if let Some(e) = tp.and_then(|t| t.error.as_ref()) {
                blockers.push((
                    format!("{}: {e}", pt.target),
                    "raise the target's limit, or open fewer ports or source ranges".into(),
                ));
                in_place = false;
            }
            let Some(intent) = &intent else { continue };
            for (protocol, port) in &intent.ports {
                let carried = tp.into_iter().flat_map(|t| t.changes.iter()).find(|c| {
                    c.rule.content.scope == pt.scope
                        && c.rule.content.protocol == *protocol
                        && c.rule.content.ports.iter().any(|r| r.contains(*port))
                        && c.rule.services.contains(&spec.service)
                });
                let id = |c: &nodeport_firewall_model::Change| {
                    c.id.clone()
                        .or_else(|| c.rule.name.clone())
                        .unwrap_or_else(|| "?".into())
                };
                match carried.map(|c| (c.action, c)) {
                    Some((Action::Unchanged | Action::Keep, c)) => {
                        let _ = writeln!(out, "    {port}/{protocol}: open by rule {}", id(c));
                    }
                    Some((Action::SatisfiedByForeign, c)) => {
                        let _ = writeln!(
                            out,
                            "    {port}/{protocol}: open by {}, a rule nodeport-firewall does not own",
                            id(c)
                        );
                    }
                    Some((Action::Add | Action::Update, c)) => {
                        blockers.push((
                            format!(
                                "{port}/{protocol} on {}: not in place yet (the plan {}s rule {})",
                                pt.target,
                                format!("{:?}", c.action).to_lowercase(),
                                id(c)
                            ),
                            "run apply (the controller does it at its next reconcile)".into(),
                        ));
                        in_place = false;
                    }
                    _ => {
                        blockers.push((
                            format!("{port}/{protocol} on {}: no rule carries it", pt.target),
                            "see `plan -v` for this target".into(),
                        ));
                        in_place = false;
                    }
                }
            }
        }
    }
    if blockers.is_empty() {
        out.push_str("\nIn place: every port is open as asked.\n");
    } else {
        in_place = false;
        out.push_str("\nBlocked:\n");
        for (what, fix) in &blockers {
            let _ = writeln!(out, "  ! {what}\n    fix: {fix}");
        }
    }
    Some(Explanation {
        text: out,
        in_place,
    })
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
