//! Plan and apply output: text that reads like `terraform plan`, or stable JSON.

use std::fmt::Write as _;

use nodeport_firewall_model::desired::ServiceStatus;
use nodeport_firewall_model::{Action, Change, Plan, Rule, WarningKind};
use nodeport_firewall_provider::ApplyOutcome;
use nodeport_firewall_provider::model::Target;

/// ANSI colours, only when writing to a terminal.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn green(&self, t: &str) -> String {
        self.paint("32", t)
    }
    fn red(&self, t: &str) -> String {
        self.paint("31", t)
    }
    fn yellow(&self, t: &str) -> String {
        self.paint("33", t)
    }
    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
}

fn describe(rule: &Rule) -> String {
    let mut s = format!(
        "{} {} from {}",
        rule.content.protocol,
        rule.ports_text(),
        rule.sources_text()
    );
    if let Some(scope) = &rule.content.scope {
        let _ = write!(s, " to {scope}");
    }
    if !rule.services.is_empty() {
        let _ = write!(s, "  [{}]", rule.services_text());
    }
    if let Some(name) = &rule.name {
        let _ = write!(s, "  ({name})");
    }
    s
}

fn line(change: &Change, style: Style, verbose: bool) -> Option<String> {
    let id = change
        .id
        .as_deref()
        .map(|i| format!(" {{{i}}}"))
        .unwrap_or_default();
    let text = match change.action {
        Action::Add => {
            // Where rules are ordered by priority (Azure), the plan chose it: show it.
            let priority = change
                .priority
                .map(|p| format!(" (priority {p})"))
                .unwrap_or_default();
            style.green(&format!("  + {}{priority}", describe(&change.rule)))
        }
        Action::Remove => match &change.note {
            Some(note) => style.red(&format!("  - {}{id}  -- {note}", describe(&change.rule))),
            None => style.red(&format!("  - {}{id}", describe(&change.rule))),
        },
        Action::Update => {
            let mut s = style.yellow(&format!("  ~ {}{id}", describe(&change.rule)));
            if let Some(prev) = &change.previous {
                let _ = write!(s, "\n      was: {}", describe(prev));
            }
            if let Some(note) = &change.note {
                let _ = write!(s, "\n      -- {note}");
            }
            s
        }
        Action::Keep => style.yellow(&format!(
            "  ! {}{id}  -- {}",
            describe(&change.rule),
            change.note.as_deref().unwrap_or("kept")
        )),
        Action::SatisfiedByForeign => format!(
            "  = {}  -- already allowed by rule{id} not owned by nodeport-firewall",
            describe(&change.rule)
        ),
        Action::Unchanged if verbose => style.dim(&format!("    {}{id}", describe(&change.rule))),
        Action::Unchanged => return None,
    };
    Some(text)
}

/// Renders the plan as text.
pub fn text(plan: &Plan, verbose: bool, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "nodeport-firewall plan: cluster {}, provider {}",
            plan.cluster, plan.provider
        ))
    );
    let _ = writeln!(out);
    for pool in &plan.pools {
        let nodes = format!(
            "{} node{}",
            pool.nodes,
            if pool.nodes == 1 { "" } else { "s" }
        );
        if !pool.managed {
            let _ = writeln!(out, "pool {} ({nodes}): not managed", pool.name);
        } else if let Some(e) = &pool.error
            && pool.nodes == 0
        {
            let _ = writeln!(
                out,
                "{}",
                style.yellow(&format!(
                    "pool {} (no nodes): target unknown ({e}); its rules are kept",
                    pool.name
                ))
            );
        } else if let Some(e) = &pool.error {
            let _ = writeln!(
                out,
                "{}",
                style.red(&format!("pool {} ({nodes}): ERROR {e}", pool.name))
            );
        } else {
            let targets: Vec<String> = pool
                .targets
                .iter()
                .map(|t| match &t.scope {
                    Some(s) => format!("{} (scope {s})", t.target),
                    None => t.target.to_string(),
                })
                .collect();
            let _ = writeln!(
                out,
                "pool {} ({nodes}) -> {}",
                pool.name,
                targets.join(", ")
            );
        }
    }
    for t in &plan.targets {
        let _ = writeln!(out);
        let pools: Vec<String> = t.pools.iter().map(|p| p.to_string()).collect();
        let usage = match t.usage.limit {
            Some(limit) => format!(
                "{} of ours + {} others / limit {limit}, headroom {}",
                t.usage.ours,
                t.usage.foreign,
                t.usage.headroom.unwrap_or(0)
            ),
            None => format!("{} of ours + {} others", t.usage.ours, t.usage.foreign),
        };
        let _ = writeln!(
            out,
            "{}",
            style.bold(&format!(
                "{} (pools: {}; rules after: {usage})",
                t.target,
                pools.join(", ")
            ))
        );
        if let Some(e) = &t.error {
            let _ = writeln!(
                out,
                "{}",
                style.red(&format!(
                    "  ERROR: {e}; nothing will be written to this target"
                ))
            );
        }
        if t.remove_first {
            let _ = writeln!(
                out,
                "  note: removes run before adds to stay within the rule quota"
            );
        }
        let mut shown = 0;
        for c in &t.changes {
            if let Some(l) = line(c, style, verbose) {
                let _ = writeln!(out, "{l}");
                shown += 1;
            }
        }
        if let Some(m) = &t.manual {
            let _ = writeln!(out, "{}", style.yellow(&format!("  {}:", m.reason)));
            for c in &m.commands {
                let _ = writeln!(out, "    {c}");
            }
        }
        let unchanged = t.count(Action::Unchanged);
        if !verbose && unchanged > 0 {
            let _ = writeln!(
                out,
                "{}",
                style.dim(&format!("    ({unchanged} unchanged; -v shows them)"))
            );
        } else if shown == 0 && t.error.is_none() {
            let _ = writeln!(out, "    (no rules)");
        }
    }

    let warnings: Vec<String> = plan
        .warnings
        .iter()
        .map(|w| match w.kind {
            WarningKind::InvalidAnnotation
            | WarningKind::ClosedByPolicy
            | WarningKind::InvalidPolicy => style.red(&w.to_string()),
            _ => w.to_string(),
        })
        .collect();
    if !warnings.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", style.yellow("Warnings:"));
        for w in warnings {
            let _ = writeln!(out, "  ! {w}");
        }
    }
    let unmanaged: Vec<_> = plan
        .services
        .iter()
        .filter(|s| s.status == ServiceStatus::Unmanaged)
        .collect();
    if verbose && !unmanaged.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Unmanaged Services:");
        for s in unmanaged {
            let _ = writeln!(
                out,
                "  {}: {}",
                s.service,
                s.reason.as_deref().unwrap_or("")
            );
        }
    } else if !unmanaged.is_empty() {
        let _ = writeln!(out);
        let n = unmanaged.len();
        let _ = writeln!(
            out,
            "{n} Service{} not managed (-v lists {} with the reason).",
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "them" }
        );
    }

    if verbose && !plan.policies.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Policies:");
        for p in &plan.policies {
            let _ = writeln!(
                out,
                "  {}: {}, {} Service(s) admitted, {} refused",
                p.name,
                if p.accepted { "accepted" } else { "INVALID" },
                p.admitted,
                p.refused
            );
        }
    }

    let _ = writeln!(out);
    let s = plan.summary;
    let mut closing = format!("Plan: {} to add, ", s.add);
    if s.update > 0 {
        let _ = write!(closing, "{} to change, ", s.update);
    }
    let _ = write!(closing, "{} to remove, {} unchanged", s.remove, s.unchanged);
    if s.keep > 0 {
        let _ = write!(closing, ", {} kept", s.keep);
    }
    closing.push('.');
    let _ = writeln!(out, "{}", style.bold(&closing));
    if s.errors > 0 {
        let _ = writeln!(
            out,
            "{}",
            style.red(&format!(
                "{} error(s): the targets concerned will not be changed.",
                s.errors
            ))
        );
    }
    out
}

/// One target's apply, as it finishes: what was written, and how long it took.
pub fn applied_target(
    target: &Target,
    outcome: &ApplyOutcome,
    seconds: f64,
    style: Style,
) -> String {
    let mut out = String::new();
    match outcome {
        ApplyOutcome::NoChanges => {}
        ApplyOutcome::Applied { report } => {
            let _ = writeln!(
                out,
                "{}",
                style.green(&format!(
                    "{target}: {} added, {} changed, {} removed ({seconds:.1} s)",
                    report.added, report.updated, report.removed
                ))
            );
            for n in &report.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        ApplyOutcome::Refused { error } => {
            let _ = writeln!(
                out,
                "{}",
                style.red(&format!("{target}: not applied: {error}"))
            );
        }
        ApplyOutcome::Failed { error, report } => {
            let _ = writeln!(
                out,
                "{}",
                style.red(&format!(
                    "{target}: FAILED after {seconds:.1} s, having written {} added, {} changed, {} removed: {error}",
                    report.added, report.updated, report.removed
                ))
            );
            for n in &report.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
    }
    out
}

/// The closing line of an apply: every write made, on failed targets too.
pub fn applied_total(outcomes: &[(Target, ApplyOutcome)]) -> String {
    let (mut added, mut removed, mut updated) = (0, 0, 0);
    for report in outcomes.iter().filter_map(|(_, o)| o.written()) {
        added += report.added;
        removed += report.removed;
        updated += report.updated;
    }
    let failed = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, ApplyOutcome::Failed { .. }))
        .count();
    if failed > 0 {
        format!(
            "Apply failed on {failed} target(s): {added} added, {updated} changed, {removed} removed.\n"
        )
    } else {
        format!("Apply complete: {added} added, {updated} changed, {removed} removed.\n")
    }
}
