//! The command-line arguments, as clap reads them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::providers;

/// The name the binary answers to: `nodeport-firewall`, or, installed as the kubectl plugin
/// `kubectl-nodeport_firewall`, `kubectl nodeport-firewall` (in help and completions).
pub fn bin_name() -> &'static str {
    let invoked = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if invoked.starts_with("kubectl-") {
        "kubectl nodeport-firewall"
    } else {
        "nodeport-firewall"
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "nodeport-firewall",
    version,
    about = "Opens cloud firewall ports for Kubernetes NodePort Services, per node pool, and nothing else."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level or filter (e.g. `info`, `nodeport_firewall=debug`) [default: `info` for
    /// `run`, `warn` for the other commands, whose output is the plan].
    #[arg(long, global = true, env = "NPF_LOG")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, env = "NPF_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what would change, like `terraform plan`. Exit 0: no changes, 2: changes pending, 1: error.
    Plan(PlanCommand),
    /// Plan, confirm, and apply once (outside the cluster, or in CI).
    Apply(ApplyArgs),
    /// Permission preflight: which cloud permissions the credentials lack on each target,
    /// checked without changing anything (EC2 DryRun on AWS). Exit 0: all present, 1: missing.
    Check(CheckArgs),
    /// The in-cluster controller: watch Services and Nodes, keep every pool's firewall in sync.
    Run(RunArgs),
    /// Print the NodePortFirewallPolicy CustomResourceDefinition (YAML), as the Helm chart
    /// and the kustomize base ship it.
    Crd,
    /// The port register: one row per node port, whether it is managed and why not, the
    /// pools and sources asked for, where the cloud firewall opens it now, and problems.
    Ports(PortsArgs),
    /// One Service in plain words: its annotations as parsed, the policy, its pools and
    /// targets, the rules that carry its ports, and what blocks it, with the fix.
    /// Exit 0: fully open as asked, 2: something it asks for is not in place, 1: error.
    Explain(ExplainArgs),
    /// Print a shell completion script: `source <(nodeport-firewall completions bash)`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// What `plan`, `apply` and `check` read.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// Manifests (Nodes, Services, Namespaces, NodePortFirewallPolicies): YAML/JSON files or
    /// directories, `-` for standard input. Repeatable, or comma-separated.
    #[arg(short = 'f', long = "filename", value_delimiter = ',')]
    pub filenames: Vec<PathBuf>,
    /// Without -f: the kubeconfig of the cluster to read (default: $KUBECONFIG, then
    /// ~/.kube/config, then the in-cluster service account). Only list calls are made.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Without -f: the kubeconfig context to read.
    #[arg(long)]
    pub context: Option<String>,
    /// The operator config file (YAML).
    #[arg(long, env = "NPF_CONFIG")]
    pub config: PathBuf,
    /// Which cloud to read (and, for apply, write).
    #[arg(long, default_value = providers::MEMORY, env = "NPF_PROVIDER",
          value_parser = clap::builder::PossibleValuesParser::new(providers::names()))]
    pub provider: String,
    /// The in-memory provider's state file (JSON): read if it exists, written by apply.
    #[arg(long)]
    pub state: Option<PathBuf>,
}

/// Formats of `ports`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PortsFormat {
    Text,
    Json,
    Markdown,
}

#[derive(Debug, Args)]
pub struct PortsArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format: a table, JSON (docs/ports.md), or Markdown to commit as a register.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PortsFormat::Text)]
    pub output: PortsFormat,
    /// Only the ports opened on this pool.
    #[arg(long)]
    pub pool: Option<String>,
    /// Any problem (a duplicate or out-of-range nodePort, a port not open, a rule no
    /// Service claims) exits 1, after the register is printed.
    #[arg(long, env = "NPF_STRICT")]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The Service, as NAMESPACE/NAME.
    pub service: String,
    #[command(flatten)]
    pub input: InputArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Show unchanged rules and unmanaged Services with the reason.
    #[arg(short, long)]
    pub verbose: bool,
    /// Never colour the output (colour is used only on a terminal anyway; NO_COLOR works too).
    #[arg(long)]
    pub no_color: bool,
    /// Any warning (an invalid annotation, a closed Service, a Node without a pool, no Nodes
    /// in the input, …) exits 1, after the plan is printed; apply writes nothing.
    #[arg(long, env = "NPF_STRICT")]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct PlanCommand {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Also write the plan, with a fingerprint of the config and of every observation it was
    /// made from, to FILE: `apply FILE` applies exactly it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Apply without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// A plan saved by `plan --out FILE`: applied exactly as it was reviewed, without
    /// planning again, and refused if the config or a target changed since. No `-f` then.
    #[arg(value_name = "SAVED_PLAN")]
    pub saved: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The operator config file (YAML).
    #[arg(long, env = "NPF_CONFIG")]
    pub config: PathBuf,
    /// Which cloud to write.
    #[arg(long, default_value = providers::MEMORY, env = "NPF_PROVIDER",
          value_parser = clap::builder::PossibleValuesParser::new(providers::names()))]
    pub provider: String,
    /// The in-memory provider's state file (JSON): read at start if it exists, written after
    /// every apply and at shutdown.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Plan and report (logs, events, conditions marked as dry run); never write to the cloud.
    #[arg(long, env = "NPF_DRY_RUN")]
    pub dry_run: bool,
    /// Quiet time after a change before reconciling (e.g. `1500ms`, `2s`).
    #[arg(long, env = "NPF_DEBOUNCE", default_value = "1500ms", value_parser = parse_duration)]
    pub debounce: std::time::Duration,
    /// Reconcile this often without changes, re-reading the cloud to repair drift (e.g. `5m`).
    #[arg(long, env = "NPF_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: std::time::Duration,
    /// Elect a leader on a coordination.k8s.io Lease; only the leader writes.
    #[arg(long, env = "NPF_LEADER_ELECTION")]
    pub leader_election: bool,
    /// The Lease's name.
    #[arg(long, env = "NPF_LEASE_NAME", default_value = "nodeport-firewall")]
    pub lease_name: String,
    /// The Lease's namespace (default: $POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a Lease is valid without renewal; it is renewed every third of it.
    #[arg(long, env = "NPF_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NPF_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
}

/// Parses `250ms`, `1.5s`, `5m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use e.g. 1500ms, 2s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?}: use ms, s, m or h")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}
