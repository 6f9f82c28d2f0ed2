//! `nodeport-firewall ports`: the port register. One row per node port of every Service:
//! who asked for it, whether it is managed and why not, the pools and sources asked for,
//! where the cloud firewall opens it now (our rules and others'), and what is wrong. Pure:
//! built from the inputs and a plan (whose targets carry their observations).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use nodeport_firewall_model::annotations::{ALLOWED_SOURCE_RANGES, Admission, admit};
use nodeport_firewall_model::desired::ServiceStatus;
use nodeport_firewall_model::{Config, Plan, Protocol, ServiceSpec};
use serde::Serialize;

/// The version of the JSON register (docs/ports.md).
pub const PORTS_FORMAT_VERSION: u32 = 1;

/// Where a port is open now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenAt {
    /// `provider:id` of the target.
    pub target: String,
    /// The rule's id (or name).
    pub rule: String,
    /// Whether the rule is this cluster's (else someone else's: a foreign rule).
    pub ours: bool,
}

/// One node port of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRow {
    /// `namespace/name`.
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub node_port: u16,
    /// `managed`, `unmanaged`, `invalid` or `closed`.
    pub status: String,
    /// Why it is not managed, or what closed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The pools it is opened on (managed Services), sorted.
    pub pools: Vec<String>,
    /// The allowlist asked for, as annotated (or `default` for the config's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<String>,
    /// Where it is open now; empty: not open.
    pub open: Vec<OpenAt>,
    /// What is wrong with it, in words.
    pub problems: Vec<String>,
}

/// A rule of ours that no Service given claims any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Orphan {
    pub target: String,
    pub rule: String,
    pub protocol: String,
    pub ports: String,
}

/// The whole register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Register {
    pub format_version: u32,
    pub cluster: String,
    pub provider: String,
    /// Whether the cloud was read: without it, `open` says nothing.
    pub observed: bool,
    pub ports: Vec<PortRow>,
    pub orphans: Vec<Orphan>,
}

impl Register {
    pub fn problems(&self) -> usize {
        self.ports.iter().map(|r| r.problems.len()).sum::<usize>() + self.orphans.len()
    }
}

/// Builds the register of `services` from `plan`. `pool`: only ports opened on that pool.
pub fn register(
    config: &Config,
    services: &[ServiceSpec],
    plan: &Plan,
    pool: Option<&str>,
) -> Register {
    let reports: BTreeMap<String, &nodeport_firewall_model::ServiceReport> = plan
        .services
        .iter()
        .map(|r| (r.service.to_string(), r))
        .collect();
    // (protocol, nodePort) -> the Services that hold it.
    let mut holders: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    for s in services {
        for p in s.ports.iter() {
            if let Some(np) = p.node_port {
                holders
                    .entry((p.protocol.to_ascii_lowercase(), np))
                    .or_default()
                    .push(s.service.to_string());
            }
        }
    }
    let observed = plan.targets.iter().any(|t| t.observed.is_some());
    let mut rows = Vec::new();
    for s in services {
        let name = s.service.to_string();
        let report = reports.get(&name);
        let pools: Vec<String> = report
            .map(|r| r.pools.iter().map(|p| p.as_str().to_string()).collect())
            .unwrap_or_default();
        if let Some(only) = pool
            && !pools.iter().any(|p| p == only)
        {
            continue;
        }
        let (status, reason) = match report {
            Some(r) => {
                let status = match r.status {
                    ServiceStatus::Managed => "managed",
                    ServiceStatus::Unmanaged => "unmanaged",
                    ServiceStatus::Invalid => "invalid",
                    ServiceStatus::Closed => "closed",
                };
                let reason = match r.status {
                    ServiceStatus::Invalid => Some(r.errors.join("; ")).filter(|e| !e.is_empty()),
                    _ => r.reason.clone(),
                };
                (status, reason)
            }
            None => (
                "unmanaged",
                Some("not a Service with node ports".to_string()),
            ),
        };
        // What the Service asks for: its ports (all, or those of the `ports` annotation) and
        // its sources after merging.
        let intent = match admit(s, config) {
            Admission::Managed(intent) => Some(intent),
            _ => None,
        };
        let sources = match &intent {
            Some(i) => Some(i.sources.to_string()),
            None => s.annotations.get(ALLOWED_SOURCE_RANGES).cloned(),
        };
        for p in &s.ports {
            let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            let protocol = p.protocol.to_ascii_lowercase();
            let open = open_at(plan, &pools, &protocol, np);
            let asked = match (&intent, protocol_of(&protocol)) {
                (Some(i), Some(proto)) => i.ports.contains(&(proto, np)),
                _ => true,
            };
            let (status, reason) = if status == "managed" && !asked {
                (
                    "unmanaged",
                    Some("not listed in nodeport-firewall.io/ports".to_string()),
                )
            } else {
                (status, reason.clone())
            };
            let mut problems = Vec::new();
            if let Some(others) = holders.get(&(protocol.clone(), i32::from(np)))
                && others.len() > 1
            {
                let others: Vec<&str> = others
                    .iter()
                    .filter(|o| **o != name)
                    .map(String::as_str)
                    .collect();
                problems.push(format!(
                    "nodePort {np}/{protocol} is also given to {}",
                    others.join(", ")
                ));
            }
            if !config.node_port_range.contains(np) {
                problems.push(format!(
                    "nodePort {np} is outside the cluster's node-port range {} (nodePortRange)",
                    config.node_port_range
                ));
            }
            if observed && open.is_empty() {
                problems.push(match status {
                    "managed" => "exposed on its nodes but not open in the cloud firewall yet: run apply (or see the plan)".to_string(),
                    _ => "exposed on its nodes but not open anywhere".to_string(),
                });
            }
            if status != "managed" && open.iter().any(|o| o.ours) {
                problems.push(format!(
                    "open by a rule of ours although the Service is {status}"
                ));
            }
            rows.push(PortRow {
                service: name.clone(),
                port_name: p.name.clone().filter(|n| !n.is_empty()),
                protocol,
                node_port: np,
                status: status.to_string(),
                reason,
                pools: pools.clone(),
                sources: sources.clone(),
                open,
                problems,
            });
        }
    }
    rows.sort_by(|a, b| {
        (a.node_port, &a.protocol, &a.service).cmp(&(b.node_port, &b.protocol, &b.service))
    });
    Register {
        format_version: PORTS_FORMAT_VERSION,
        cluster: plan.cluster.clone(),
        provider: plan.provider.clone(),
        observed,
        ports: rows,
        orphans: orphans(services, plan),
    }
}

fn protocol_of(p: &str) -> Option<Protocol> {
    p.parse().ok()
}

/// The observed rules that open `port` of `protocol` on targets of `pools` (every target
/// when the Service has no pools).
fn open_at(plan: &Plan, pools: &[String], protocol: &str, port: u16) -> Vec<OpenAt> {
    let Some(protocol) = protocol_of(protocol) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for tp in &plan.targets {
        if !pools.is_empty()
            && !tp
                .pools
                .iter()
                .any(|p| pools.iter().any(|q| q == p.as_str()))
        {
            continue;
        }
        let Some(observation) = tp.observed.as_deref() else {
            continue;
        };
        for r in &observation.rules {
            let c = &r.rule.content;
            if c.protocol == protocol && c.ports.iter().any(|p| p.contains(port)) {
                out.push(OpenAt {
                    target: tp.target.to_string(),
                    rule: r
                        .id
                        .clone()
                        .or_else(|| r.rule.name.clone())
                        .unwrap_or_default(),
                    ours: r.owned,
                });
            }
        }
    }
    out.sort_by(|a, b| (!a.ours, &a.target, &a.rule).cmp(&(!b.ours, &b.target, &b.rule)));
    out.dedup();
    out
}

/// Rules of ours whose marker names no Service given (and holds no digest that might).
fn orphans(services: &[ServiceSpec], plan: &Plan) -> Vec<Orphan> {
    let known: BTreeSet<String> = services.iter().map(|s| s.service.to_string()).collect();
    let mut out = Vec::new();
    for tp in &plan.targets {
        let Some(observation) = tp.observed.as_deref() else {
            continue;
        };
        for r in observation
            .rules
            .iter()
            .filter(|r| r.owned && r.fully_listed())
        {
            if r.rule
                .services
                .iter()
                .all(|s| !known.contains(&s.to_string()))
            {
                out.push(Orphan {
                    target: tp.target.to_string(),
                    rule: r
                        .id
                        .clone()
                        .or_else(|| r.rule.name.clone())
                        .unwrap_or_default(),
                    protocol: r.rule.content.protocol.to_string(),
                    ports: r.rule.ports_text(),
                });
            }
        }
    }
    out
}

fn open_text(row: &PortRow, observed: bool) -> String {
    if !observed {
        return "(not read)".to_string();
    }
    if row.open.is_empty() {
        return "not open".to_string();
    }
    row.open
        .iter()
        .map(|o| {
            let who = if o.ours { "" } else { "foreign " };
            format!("{who}{} {}", o.target, o.rule)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn status_text(row: &PortRow) -> String {
    match &row.reason {
        Some(r) => format!("{} ({r})", row.status),
        None => row.status.clone(),
    }
}

/// The register as a text table, then the problems.
pub fn text(reg: &Register) -> String {
    let header = [
        "SERVICE", "PORT", "NODEPORT", "STATUS", "POOLS", "SOURCES", "OPEN NOW",
    ];
    let rows: Vec<[String; 7]> = reg
        .ports
        .iter()
        .map(|r| {
            [
                r.service.clone(),
                r.port_name.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}", r.node_port, r.protocol),
                r.status.clone(),
                if r.pools.is_empty() {
                    "-".into()
                } else {
                    r.pools.join(",")
                },
                r.sources.clone().unwrap_or_else(|| "-".into()),
                open_text(r, reg.observed),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let n = cells.len();
        for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    let problems = problem_lines(reg);
    if !problems.is_empty() {
        out.push_str("\nProblems:\n");
        for p in problems {
            let _ = writeln!(out, "  ! {p}");
        }
    }
    out
}

fn problem_lines(reg: &Register) -> Vec<String> {
    let mut out = Vec::new();
    for r in &reg.ports {
        for p in &r.problems {
            out.push(format!("{} {}/{}: {p}", r.service, r.node_port, r.protocol));
        }
        if r.status != "managed"
            && let Some(reason) = &r.reason
            && r.status != "unmanaged"
        {
            out.push(format!(
                "{} {}/{}: {}: {reason}",
                r.service, r.node_port, r.protocol, r.status
            ));
        }
    }
    for o in &reg.orphans {
        out.push(format!(
            "rule {} on {} ({} {}) is ours, but no Service claims it any more",
            o.rule, o.target, o.protocol, o.ports
        ));
    }
    out
}

fn md(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The register as Markdown, to commit as a team's port register.
pub fn markdown(reg: &Register) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Node ports of cluster {}\n", md(&reg.cluster));
    let _ = writeln!(
        out,
        "Written by `nodeport-firewall ports -o markdown` (provider {}). One row per node port.\n",
        md(&reg.provider)
    );
    out.push_str("| Service | Port | Node port | Status | Pools | Sources | Open now |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for r in &reg.ports {
        let _ = writeln!(
            out,
            "| {} | {} | {}/{} | {} | {} | {} | {} |",
            md(&r.service),
            md(r.port_name.as_deref().unwrap_or("-")),
            r.node_port,
            r.protocol,
            md(&status_text(r)),
            md(&if r.pools.is_empty() {
                "-".to_string()
            } else {
                r.pools.join(", ")
            }),
            md(r.sources.as_deref().unwrap_or("-")),
            md(&open_text(r, reg.observed)),
        );
    }
    let problems = problem_lines(reg);
    out.push_str("\n## Problems\n\n");
    if problems.is_empty() {
        out.push_str("None.\n");
    }
    for p in problems {
        let _ = writeln!(out, "- {}", md(&p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeport_firewall_model::{desired, plan};

    fn svc(name: &str, node_port: i32) -> ServiceSpec {
        ServiceSpec::nodeport("shop", name)
            .with_port("http", "TCP", 80, node_port)
            .enabled()
            .with_ranges("10.0.0.0/8")
    }

    #[test]
    fn duplicate_and_out_of_range_node_ports_are_problems() {
        let config = Config::new("c");
        let services = [
            svc("a", 30080),
            svc("b", 30080),
            svc("c", 40000),
            svc("d", 30081),
        ];
        let d = desired(&config, &services, &[]);
        let p = plan(
            &d,
            "memory",
            &Default::default(),
            &Default::default(),
            &nodeport_firewall_model::ShapeRenderer::unnamed(),
        );
        let reg = register(&config, &services, &p, None);
        let problems: BTreeMap<(String, u16), Vec<String>> = reg
            .ports
            .iter()
            .map(|r| ((r.service.clone(), r.node_port), r.problems.clone()))
            .collect();
        let cases = [
            ("shop/a", 30080, Some("also given to shop/b")),
            ("shop/b", 30080, Some("also given to shop/a")),
            (
                "shop/c",
                40000,
                Some("outside the cluster's node-port range 30000-32767"),
            ),
            ("shop/d", 30081, None),
        ];
        for (service, port, want) in cases {
            let got = &problems[&(service.to_string(), port)];
            match want {
                Some(w) => assert!(got.iter().any(|p| p.contains(w)), "{service}: {got:?}"),
                // Nothing was read (no pool resolved): "not open" is not claimed.
                None => assert!(got.is_empty(), "{service}: {got:?}"),
            }
        }
        assert!(!reg.observed);
        assert!(text(&reg).contains("(not read)"));
        assert!(markdown(&reg).starts_with("# Node ports of cluster c"));
    }
}
