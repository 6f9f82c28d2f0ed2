//! `nodeport-firewall apply`: confirm, write target by target with progress, total what was
//! written (failed targets included).

use std::io::{IsTerminal, Write};

use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use serde_json::json;

use super::*;
use crate::output;

pub(super) async fn apply(args: ApplyArgs) -> Result<u8> {
    let p = match &args.saved {
        Some(file) => prepare_saved(&args, file).await?,
        None => prepare(&args.plan.input, args.plan.no_color).await?,
    };
    let json = args.plan.output == OutputFormat::Json;
    if !json {
        print_plan(&p, &args.plan)?;
    }
    if strict_refuses(&args.plan, &p.plan) {
        if json {
            print_json(&json!({"plan": &p.plan, "applied": []}))?;
        }
        return Ok(EXIT_ERROR);
    }
    let refused: Vec<_> = p
        .plan
        .targets
        .iter()
        .filter(|t| t.error.is_some() && t.has_writes())
        .collect();
    if !p.plan.has_changes() {
        // Nothing to write, or changes pending only on targets whose plan has an error.
        let code = if p.plan.has_errors() || !refused.is_empty() {
            EXIT_ERROR
        } else {
            EXIT_NO_CHANGES
        };
        if json {
            print_json(&json!({"plan": &p.plan, "applied": []}))?;
        } else if refused.is_empty() {
            println!("No changes to apply.");
        } else {
            for t in refused {
                let error = t
                    .error
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                println!("{}: not applied: {error}", t.target);
            }
        }
        return Ok(code);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Usage(
                "apply needs confirmation: run it on a terminal, or pass --yes".into(),
            ));
        }
        print!(
            "Apply these changes to cluster {}? Only 'yes' is accepted: ",
            p.config.cluster_name
        );
        std::io::stdout()
            .flush()
            .map_err(|e| Error::Io(e.to_string()))?;
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(|e| Error::Io(e.to_string()))?;
        if answer.trim() != "yes" {
            println!("Apply cancelled.");
            return Ok(EXIT_ERROR);
        }
    }
    let outcomes = apply_with_progress(&p, json).await?;
    p.backend.save_state(args.plan.input.state.as_deref())?;
    if json {
        print_json(&json!({"plan": &p.plan, "applied": applied_json(&outcomes)}))?;
    } else {
        print!("{}", output::applied_total(&outcomes));
    }
    let failed = outcomes.iter().any(|(_, o)| {
        matches!(
            o,
            ApplyOutcome::Failed { .. } | ApplyOutcome::Refused { .. }
        )
    });
    Ok(if failed || p.plan.has_errors() {
        EXIT_ERROR
    } else {
        EXIT_NO_CHANGES
    })
}

/// Applies target by target, telling each one as it finishes (on a terminal, also which one
/// is being written). A target's writes are still batched by its provider.
async fn apply_with_progress(
    p: &Prepared,
    json: bool,
) -> Result<Vec<(nodeport_firewall_provider::Target, ApplyOutcome)>> {
    let terminal = !json && std::io::stdout().is_terminal();
    let mut outcomes = Vec::new();
    for tp in &p.plan.targets {
        if !tp.has_writes() && tp.error.is_none() {
            continue;
        }
        if terminal {
            print!("{}: applying…", tp.target);
            std::io::stdout()
                .flush()
                .map_err(|e| Error::Io(e.to_string()))?;
        }
        let started = std::time::Instant::now();
        let one = nodeport_firewall_model::Plan {
            targets: vec![tp.clone()],
            ..p.plan.clone()
        };
        let mut done = engine::apply(p.backend.provider(), &one).await;
        let seconds = started.elapsed().as_secs_f64();
        if terminal {
            print!("\r\x1b[2K");
        }
        for (target, outcome) in &done {
            if !json {
                print!(
                    "{}",
                    output::applied_target(target, outcome, seconds, p.style)
                );
            }
        }
        outcomes.append(&mut done);
    }
    Ok(outcomes)
}

/// What was applied, per target, for `apply -o json`.
fn applied_json(
    outcomes: &[(nodeport_firewall_provider::Target, ApplyOutcome)],
) -> serde_json::Value {
    serde_json::Value::Array(
        outcomes
            .iter()
            .map(|(t, o)| json!({"target": t, "result": o}))
            .collect(),
    )
}
