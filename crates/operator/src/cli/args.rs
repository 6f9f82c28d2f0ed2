//! The command-line arguments, as clap reads them.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Quiet time after a change before reconciling (e.g. `1500ms`, `2s`): 0 to 1m, below
    /// --resync-interval.
    #[arg(long, env = "NPF_DEBOUNCE", default_value = "1500ms", value_parser = parse_debounce)]
    pub debounce: std::time::Duration,
    /// Reconcile this often without changes, re-reading the cloud to repair drift (e.g. `5m`):
    /// 1s to 24h.
    #[arg(long, env = "NPF_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_resync)]
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
    /// How long a Lease is valid without renewal (3s to 10m); it is renewed every third of
    /// it, and writes stop when two thirds of it have passed without a renewal.
    #[arg(long, env = "NPF_LEASE_DURATION", default_value = "15s", value_parser = parse_lease_duration)]
    pub lease_duration: std::time::Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NPF_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
}

impl RunArgs {
    /// The relations between flags that each flag's own bounds cannot see. The leader
    /// election's own relations (renew period below the write window) are checked by
    /// [`crate::controller::leader::LeaseConfig::validate`].
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.debounce >= self.resync_interval {
            return Err(format!(
                "--debounce {} must be shorter than --resync-interval {}",
                human(self.debounce),
                human(self.resync_interval)
            ));
        }
        Ok(())
    }
}

/// The longest `--debounce`: a change waits at most ten times this long.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(60);
/// The shortest `--resync-interval`: zero would reconcile without pause.
pub const MIN_RESYNC: Duration = Duration::from_secs(1);
/// The longest `--resync-interval`: drift is repaired at least daily.
pub const MAX_RESYNC: Duration = Duration::from_secs(24 * 3600);

/// `--debounce`: 0 (reconcile at once) to [`MAX_DEBOUNCE`].
pub fn parse_debounce(s: &str) -> std::result::Result<Duration, String> {
    parse_bounded(s, Duration::ZERO, MAX_DEBOUNCE)
}

/// `--resync-interval`: [`MIN_RESYNC`] to [`MAX_RESYNC`].
pub fn parse_resync(s: &str) -> std::result::Result<Duration, String> {
    parse_bounded(s, MIN_RESYNC, MAX_RESYNC)
}

/// `--lease-duration`: see [`crate::controller::leader::MIN_LEASE_DURATION`] and
/// [`crate::controller::leader::MAX_LEASE_DURATION`].
pub fn parse_lease_duration(s: &str) -> std::result::Result<Duration, String> {
    use crate::controller::leader::{MAX_LEASE_DURATION, MIN_LEASE_DURATION};
    parse_bounded(s, MIN_LEASE_DURATION, MAX_LEASE_DURATION)
}

fn parse_bounded(s: &str, min: Duration, max: Duration) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "{s:?} is out of range: must be between {} and {}",
            human(min),
            human(max)
        ));
    }
    Ok(d)
}

/// A duration as the flags take it: `0s`, `1500ms`, `15s`, `10m`, `24h`.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags_are_bounded() {
        // (parser, input, Ok(duration) or a part of the error)
        type Parser = fn(&str) -> std::result::Result<Duration, String>;
        let ms = Duration::from_millis;
        let cases: &[(&str, Parser, &str, std::result::Result<Duration, &str>)] = &[
            ("debounce", parse_debounce, "0s", Ok(Duration::ZERO)),
            ("debounce", parse_debounce, "1500ms", Ok(ms(1500))),
            ("debounce", parse_debounce, "1m", Ok(ms(60_000))),
            ("debounce", parse_debounce, "61s", Err("between 0s and 1m")),
            ("debounce", parse_debounce, "-1s", Err("\"-1s\"")),
            ("resync", parse_resync, "0s", Err("between 1s and 24h")),
            ("resync", parse_resync, "999ms", Err("between 1s and 24h")),
            ("resync", parse_resync, "5m", Ok(ms(300_000))),
            ("resync", parse_resync, "24h", Ok(ms(86_400_000))),
            ("resync", parse_resync, "25h", Err("between 1s and 24h")),
            ("resync", parse_resync, "1e300h", Err("1e300h")),
            (
                "lease",
                parse_lease_duration,
                "0s",
                Err("between 3s and 10m"),
            ),
            (
                "lease",
                parse_lease_duration,
                "2999ms",
                Err("between 3s and 10m"),
            ),
            ("lease", parse_lease_duration, "3s", Ok(ms(3000))),
            ("lease", parse_lease_duration, "15s", Ok(ms(15_000))),
            ("lease", parse_lease_duration, "10m", Ok(ms(600_000))),
            (
                "lease",
                parse_lease_duration,
                "11m",
                Err("between 3s and 10m"),
            ),
            (
                "lease",
                parse_lease_duration,
                "18446744073709551615",
                Err("18446744073709551615"),
            ),
            ("lease", parse_lease_duration, "nan", Err("nan")),
            ("lease", parse_lease_duration, "inf", Err("inf")),
        ];
        for (what, parse, input, want) in cases {
            match (parse(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{what} {input}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{what} {input}: {got}"),
                (got, want) => panic!("{what} {input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn debounce_must_be_shorter_than_the_resync() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["nodeport-firewall", "run", "--config", "c.yaml"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).unwrap().command {
                Command::Run(run) => run.validate(),
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), Ok(()));
        assert_eq!(
            parse(&["--debounce", "2s", "--resync-interval", "3s"]),
            Ok(())
        );
        let e = parse(&["--debounce", "30s", "--resync-interval", "30s"]).unwrap_err();
        assert_eq!(
            e,
            "--debounce 30s must be shorter than --resync-interval 30s"
        );
    }

    #[test]
    fn durations_read_back_as_flags() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(15), "15s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(86_400), "24h"),
        ];
        for (d, want) in cases {
            assert_eq!(human(d), want);
            assert_eq!(parse_duration(want), Ok(d));
        }
    }
}
