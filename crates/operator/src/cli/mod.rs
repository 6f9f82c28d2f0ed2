//! The command line: `plan`, `apply`, `check` and `run`. The arguments are in `args`,
//! `apply` (with its progress and saved plans) in `apply`; this file reads the inputs and
//! runs the other commands.

mod apply;
mod args;

pub use args::*;

use std::io::{IsTerminal, Write};

use nodeport_firewall_model::{
    Config, NamespaceSpec, NodeSpec, ServiceSpec, Tenancy, Warning, WarningKind, desired_with,
};
use nodeport_firewall_provider::engine;
use serde_json::json;

use crate::output::{self, Style};
use crate::providers;
use crate::{Error, Result};

/// Exit status: no changes pending.
pub const EXIT_NO_CHANGES: u8 = 0;
/// Exit status: an error (bad input, a target that cannot be planned or applied).
pub const EXIT_ERROR: u8 = 1;
/// Exit status of `plan`: changes pending.
pub const EXIT_CHANGES: u8 = 2;

/// Sets up logging on stderr; stdout is for the plan.
pub fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    // The AWS SDK logs a warning, with debug structs, for every credential provider it tries
    // in vain; our error says it in one line. Shown with an explicit --log-level.
    let default = match default {
        "warn" => "warn,aws_config=error,aws_runtime=error,aws_smithy_runtime=error",
        other => other,
    };
    let level = cli.log_level.as_deref().unwrap_or(default);
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs a command; returns the exit status.
pub async fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Plan(args) => plan(args).await,
        Command::Apply(args) => apply::apply(args).await,
        Command::Check(args) => check(args).await,
        Command::Run(args) => run_controller(args).await,
        Command::Ports(args) => ports(args).await,
        Command::Explain(args) => explain(args).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            let name = args::bin_name();
            // kubectl completes its plugins through a `kubectl_complete-<name>` script; the
            // binary's own name is what the shell completes.
            let bin = if name.starts_with("kubectl") {
                "kubectl-nodeport_firewall"
            } else {
                name
            };
            clap_complete::generate(shell, &mut command, bin, &mut std::io::stdout());
            Ok(EXIT_NO_CHANGES)
        }
        Command::Crd => {
            print!("{}", crate::policy::crd_yaml().map_err(Error::Io)?);
            Ok(EXIT_NO_CHANGES)
        }
    }
}

struct Prepared {
    config: Config,
    /// The config file's bytes, for a saved plan's fingerprint.
    config_bytes: Vec<u8>,
    backend: providers::Backend,
    plan: nodeport_firewall_model::Plan,
    /// The Services read (for `ports`).
    services: Vec<ServiceSpec>,
    /// What the plan was made from, target by target.
    observed: engine::Observed,
    style: Style,
}

fn style(no_color: bool) -> Style {
    Style {
        color: !no_color
            && std::env::var_os("NO_COLOR").is_none()
            && std::io::stdout().is_terminal(),
    }
}

/// Reads and validates the operator config file.
fn load_config(path: &std::path::Path) -> Result<Config> {
    load_config_bytes(path).map(|(c, _)| c)
}

/// The config, and the bytes it was read from.
fn load_config_bytes(path: &std::path::Path) -> Result<(Config, Vec<u8>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Io(format!("cannot read config {}: {e}", path.display())))?;
    let config =
        Config::from_yaml(&text, &crate::providers::names()).map_err(|source| Error::Config {
            path: path.display().to_string(),
            source,
        })?;
    Ok((config, text.into_bytes()))
}

async fn prepare(args: &InputArgs, no_color: bool) -> Result<Prepared> {
    let from_cluster = args.filenames.is_empty();
    if !from_cluster && (args.kubeconfig.is_some() || args.context.is_some()) {
        return Err(Error::Usage(
            "give -f (manifests) or --kubeconfig/--context (the cluster), not both".into(),
        ));
    }
    let (config, config_bytes) = load_config_bytes(&args.config)?;
    let manifests = if from_cluster {
        let client =
            crate::cluster::client(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        crate::cluster::load(&client).await?
    } else {
        crate::manifests::load(&args.filenames)?
    };
    let mut services = Vec::with_capacity(manifests.services.len());
    for s in &manifests.services {
        services.push(ServiceSpec::from_k8s(s).map_err(|e| Error::Manifest {
            path: "Service".into(),
            message: e.to_string(),
        })?);
    }
    let mut nodes = Vec::with_capacity(manifests.nodes.len());
    for n in &manifests.nodes {
        nodes.push(
            NodeSpec::from_k8s(n, &config.pool_labels).map_err(|e| Error::Manifest {
                path: "Node".into(),
                message: e.to_string(),
            })?,
        );
    }
    let policies: Vec<_> = manifests
        .policies
        .iter()
        .map(crate::policy::source)
        .collect();
    let namespaces: Vec<NamespaceSpec> = manifests
        .namespaces
        .iter()
        .filter_map(NamespaceSpec::from_k8s)
        .collect();
    let tenancy = Tenancy::new(&policies, &namespaces);
    let backend = providers::build(&args.provider, &config, args.state.as_deref()).await?;
    let d = desired_with(&config, &services, &nodes, &tenancy);
    let mut observed = engine::Observed::default();
    let mut plan = engine::plan_with_cache(backend.provider(), &config, &d, &mut observed).await;
    plan.warnings
        .extend(manifests.skipped.iter().map(|(place, why)| {
            Warning::new(
                WarningKind::InputSkipped,
                Some(place.clone()),
                format!("{place}: skipped: {why}"),
            )
        }));
    Ok(Prepared {
        config,
        config_bytes,
        backend,
        plan,
        services,
        observed,
        style: style(no_color),
    })
}

/// `plan --out FILE`: the plan and what it was made from.
fn save_plan(p: &Prepared, path: &std::path::Path) -> Result<()> {
    let observations = p
        .plan
        .targets
        .iter()
        .filter_map(|t| {
            p.observed
                .get(&t.target)
                .map(|o| (t.target.to_string(), crate::saved::fingerprint(o)))
        })
        .collect();
    let saved = crate::saved::SavedPlan::new(&p.config_bytes, observations, p.plan.clone());
    let text = serde_json::to_string_pretty(&saved).map_err(|e| Error::Io(e.to_string()))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))
}

/// `apply FILE`: the saved plan, once the config and every target it writes to are as they
/// were when it was made.
async fn prepare_saved(args: &ApplyArgs, file: &std::path::Path) -> Result<Prepared> {
    if !args.plan.input.filenames.is_empty() {
        return Err(Error::Usage(
            "apply SAVED_PLAN takes no -f: the saved plan is applied as it was reviewed".into(),
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", file.display())))?;
    let saved = crate::saved::SavedPlan::parse(&text)
        .map_err(|e| Error::Io(format!("{}: {e}", file.display())))?;
    let (config, config_bytes) = load_config_bytes(&args.plan.input.config)?;
    if crate::saved::digest(&config_bytes) != saved.config {
        return Err(Error::Io(format!(
            "{}: the config {} changed since this plan was made; nothing was written: plan again",
            file.display(),
            args.plan.input.config.display()
        )));
    }
    let input = &args.plan.input;
    let backend = providers::build(&input.provider, &config, input.state.as_deref()).await?;
    if backend.provider().name() != saved.plan.provider {
        return Err(Error::Usage(format!(
            "{}: the plan is for provider {}, not {}",
            file.display(),
            saved.plan.provider,
            backend.provider().name()
        )));
    }
    let mut changed = Vec::new();
    let mut plan = saved.plan;
    for tp in plan.targets.iter_mut().filter(|t| t.has_writes()) {
        let observation = backend.provider().observe(&tp.target).await.ok();
        let now = observation.as_ref().map(crate::saved::fingerprint);
        if now.as_ref() != saved.observations.get(&tp.target.to_string()) {
            changed.push(tp.target.to_string());
        }
        // The guard checks the writes against this read, the one the plan still matches.
        tp.observed = observation.map(std::sync::Arc::new);
    }
    if !changed.is_empty() {
        return Err(Error::Io(format!(
            "{}: {} changed since this plan was made; nothing was written: plan again",
            file.display(),
            changed.join(", ")
        )));
    }
    Ok(Prepared {
        config,
        config_bytes,
        backend,
        plan,
        services: Vec::new(),
        observed: engine::Observed::default(),
        style: style(args.plan.no_color),
    })
}

fn print_plan(p: &Prepared, args: &PlanArgs) -> Result<()> {
    let text = match args.output {
        OutputFormat::Json => {
            serde_json::to_string_pretty(&p.plan).map_err(|e| Error::Io(e.to_string()))? + "\n"
        }
        OutputFormat::Text => output::text(&p.plan, args.verbose, p.style),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .map_err(|e| Error::Io(e.to_string()))?;
    stdout.flush().map_err(|e| Error::Io(e.to_string()))
}

/// `--strict` and warnings: says why on stderr.
fn strict_refuses(args: &PlanArgs, plan: &nodeport_firewall_model::Plan) -> bool {
    if !args.strict || plan.warnings.is_empty() {
        return false;
    }
    eprintln!(
        "error: --strict: the plan has {} warning(s)",
        plan.warnings.len()
    );
    true
}

async fn plan(cmd: PlanCommand) -> Result<u8> {
    let args = cmd.plan;
    let p = prepare(&args.input, args.no_color).await?;
    print_plan(&p, &args)?;
    if let Some(out) = &cmd.out {
        save_plan(&p, out)?;
    }
    Ok(if p.plan.has_errors() || strict_refuses(&args, &p.plan) {
        EXIT_ERROR
    } else if p.plan.has_changes() {
        EXIT_CHANGES
    } else {
        EXIT_NO_CHANGES
    })
}

async fn ports(args: PortsArgs) -> Result<u8> {
    let p = prepare(&args.input, true).await?;
    let register = crate::ports::register(&p.config, &p.services, &p.plan, args.pool.as_deref());
    let text = match args.output {
        PortsFormat::Text => crate::ports::text(&register),
        PortsFormat::Markdown => crate::ports::markdown(&register),
        PortsFormat::Json => {
            serde_json::to_string_pretty(&register).map_err(|e| Error::Io(e.to_string()))? + "\n"
        }
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| Error::Io(e.to_string()))?;
    Ok(if args.strict && register.problems() > 0 {
        EXIT_ERROR
    } else {
        EXIT_NO_CHANGES
    })
}

async fn explain(args: ExplainArgs) -> Result<u8> {
    if !args.service.contains('/') {
        return Err(Error::Usage(format!(
            "explain takes NAMESPACE/NAME, not {:?}",
            args.service
        )));
    }
    let p = prepare(&args.input, true).await?;
    let Some(e) = crate::explain::explain(&p.config, &p.services, &p.plan, &args.service) else {
        return Err(Error::Io(format!(
            "no Service {} in the input",
            args.service
        )));
    };
    std::io::stdout()
        .write_all(e.text.as_bytes())
        .map_err(|e| Error::Io(e.to_string()))?;
    Ok(if e.in_place {
        EXIT_NO_CHANGES
    } else {
        EXIT_CHANGES
    })
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Io(e.to_string()))? + "\n";
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .map_err(|e| Error::Io(e.to_string()))?;
    stdout.flush().map_err(|e| Error::Io(e.to_string()))
}

async fn check(args: CheckArgs) -> Result<u8> {
    let p = prepare(&args.input, false).await?;
    let mut targets: Vec<_> = p
        .plan
        .pools
        .iter()
        .flat_map(|pool| pool.targets.iter().map(|t| t.target.clone()))
        .collect();
    targets.sort();
    targets.dedup();
    let mut failed = false;
    let mut out = String::new();
    let mut report = Vec::new();
    for pool in p.plan.pools.iter().filter(|pool| pool.error.is_some()) {
        failed = true;
        let error = pool.error.as_deref().unwrap_or("");
        out.push_str(&format!(
            "pool {}: cannot resolve its target: {error}\n",
            pool.name
        ));
        report.push(json!({"pool": pool.name, "error": error}));
    }
    for target in &targets {
        match p.backend.provider().preflight(target).await {
            Ok(missing) if missing.is_empty() => {
                out.push_str(&format!("{target}: all permissions present\n"));
                report.push(json!({"target": target, "missing": []}));
            }
            Ok(missing) => {
                failed = true;
                out.push_str(&format!("{target}: missing permissions:\n"));
                for m in &missing {
                    out.push_str(&format!("  - {m}\n"));
                }
                report.push(json!({"target": target, "missing": missing}));
            }
            Err(e) => {
                failed = true;
                out.push_str(&format!("{target}: check failed: {e}\n"));
                report.push(json!({"target": target, "error": e.to_string()}));
            }
        }
    }
    if targets.is_empty() && !failed {
        out.push_str("no targets to check (no managed pool resolved)\n");
    }
    match args.output {
        OutputFormat::Json => print_json(&json!({"ok": !failed, "checks": report}))?,
        OutputFormat::Text => print!("{out}"),
    }
    Ok(if failed { EXIT_ERROR } else { EXIT_NO_CHANGES })
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nodeport-firewall".to_string())
}

async fn run_controller(args: RunArgs) -> Result<u8> {
    use crate::controller::{self, Context, Settings, leader::LeaseConfig};
    use std::sync::Arc;

    // Usage errors first, before anything is read or connected to.
    args.validate().map_err(Error::Usage)?;
    let identity = identity();
    let lease = if args.leader_election {
        let namespace = args.lease_namespace.clone().ok_or_else(|| {
            Error::Usage("--leader-election needs --lease-namespace or $POD_NAMESPACE".into())
        })?;
        let lease = LeaseConfig {
            namespace,
            name: args.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: args.lease_duration,
            renew_period: args.lease_duration / 3,
        };
        lease.validate().map_err(Error::Usage)?;
        Some(lease)
    } else {
        None
    };
    let config = load_config(&args.config)?;
    let backend = Arc::new(providers::build(&args.provider, &config, args.state.as_deref()).await?);
    controller::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Io(format!("cannot build a Kubernetes client: {e}")))?;
    let settings = Settings {
        debounce: args.debounce,
        resync: args.resync_interval,
        dry_run: args.dry_run,
        identity,
        lease,
        http_addr: Some(args.metrics_addr),
        ..Settings::default()
    };
    let provider = Arc::new(controller::backend::Shared(
        backend.clone(),
        args.state.clone(),
    ));
    let ctx = Context::new(client, provider, config, settings);
    let stats = backend.clone();
    ctx.metrics.set_cloud_source(
        args.provider.as_str(),
        Box::new(move || controller::backend::cloud_calls(&stats).unwrap_or_default()),
    );
    controller::run(ctx, shutdown_signal())
        .await
        .map_err(Error::Io)?;
    backend.save_state(args.state.as_deref())?;
    Ok(EXIT_NO_CHANGES)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutdown requested");
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
