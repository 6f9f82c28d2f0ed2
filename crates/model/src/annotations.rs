//! The `nodeport-firewall.io/` annotations of a Service, and the decision whether and how a
//! Service is managed.

use std::collections::BTreeSet;

use crate::config::{Config, LoadBalancerSourceRanges};
use crate::net::{ParsedRanges, SourceSet, parse_ranges};
use crate::node::PoolName;
use crate::rule::Protocol;
use crate::service::{ServiceRef, ServiceSpec, ServiceType};

/// The pools a Service asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolSelector {
    /// Every managed pool (the default).
    All,
    Named(BTreeSet<PoolName>),
}

pub use crate::service::ANNOTATION_PREFIX;
/// `true`/`false`: explicit opt-in or opt-out.
pub const ENABLED: &str = "nodeport-firewall.io/enabled";
/// IPv4/IPv6 CIDRs separated by commas and/or whitespace.
pub const ALLOWED_SOURCE_RANGES: &str = "nodeport-firewall.io/allowed-source-ranges";
/// Pool names whose firewalls get the ports. Default: all managed pools.
pub const NODE_POOLS: &str = "nodeport-firewall.io/node-pools";
/// A subset of the Service's ports, by name or port number. Default: all.
pub const PORTS: &str = "nodeport-firewall.io/ports";

const KNOWN: &[&str] = &[ENABLED, ALLOWED_SOURCE_RANGES, NODE_POOLS, PORTS];

/// What the operator will do for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Managed: its ports are opened as the intent says.
    Managed(ServiceIntent),
    /// Not managed; its rules, if any, are removed.
    Unmanaged { reason: String },
    /// Managed, but its annotations are invalid: its existing rules are kept exactly as they
    /// are until it is fixed (fail closed).
    Invalid {
        errors: Vec<String>,
        warnings: Vec<String>,
    },
}

/// A valid managed Service's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIntent {
    pub service: ServiceRef,
    /// (protocol, node port), sorted and unique.
    pub ports: Vec<(Protocol, u16)>,
    pub sources: SourceSet,
    pub pools: PoolSelector,
    /// Non-fatal remarks shown in the plan and as events.
    pub warnings: Vec<String>,
}

pub use crate::node::valid_pool_name;

fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
}

/// Parsed `allowed-source-ranges` values, by their text: most Services of a cluster share a
/// handful of allowlists, so each distinct text is parsed once per plan.
pub type RangeCache = rustc_hash::FxHashMap<String, Result<ParsedRanges, Vec<String>>>;

/// Decides whether `svc` is managed, and validates its annotations if it is.
pub fn admit(svc: &ServiceSpec, config: &Config) -> Admission {
    admit_cached(svc, config, &mut RangeCache::default())
}

/// [`admit`], with a cache of parsed ranges shared across Services.
pub fn admit_cached(svc: &ServiceSpec, config: &Config, cache: &mut RangeCache) -> Admission {
    let get = |key: &str| svc.annotations.get(key).map(String::as_str);
    let enabled = match get(ENABLED).map(str::trim) {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("true") => Some(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Some(false),
        Some(v) => {
            if matches!(svc.service_type, ServiceType::Other(_)) {
                return Admission::Unmanaged {
                    reason: format!("type {} has no node ports", svc.service_type),
                };
            }
            return Admission::Invalid {
                errors: vec![format!("{ENABLED}: {v:?} is not true or false")],
                warnings: Vec::new(),
            };
        }
    };
    if let ServiceType::Other(ref t) = svc.service_type {
        return Admission::Unmanaged {
            reason: format!("type {t} has no node ports"),
        };
    }
    // A typo under our prefix is an error on every Service with node ports, managed or not:
    // `nodeport-firewall.io/enable: "true"` must not silently leave a Service unmanaged.
    let unknown = unknown_annotations(svc);
    if !unknown.is_empty() {
        return Admission::Invalid {
            errors: unknown,
            warnings: Vec::new(),
        };
    }
    match svc.service_type {
        ServiceType::Other(_) => {}
        ServiceType::LoadBalancer if enabled != Some(true) => {
            return Admission::Unmanaged {
                reason: format!("type LoadBalancer is managed only with {ENABLED}=true"),
            };
        }
        ServiceType::NodePort if enabled == Some(false) => {
            return Admission::Unmanaged {
                reason: format!("opted out with {ENABLED}=false"),
            };
        }
        ServiceType::NodePort if enabled.is_none() && !config.manage_all_node_port_services => {
            return Admission::Unmanaged {
                reason: format!(
                    "not opted in: set {ENABLED}=true, or manageAllNodePortServices in the config"
                ),
            };
        }
        _ => {}
    }

    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    // Which ports.
    let selected: Vec<&crate::service::ServicePort> = match get(PORTS) {
        None => svc.ports.iter().collect(),
        Some(value) => {
            let mut chosen = Vec::new();
            let wanted: Vec<&str> = tokens(value).collect();
            if wanted.is_empty() {
                errors.push(format!(
                    "{PORTS}: empty; list port names or numbers, or remove it"
                ));
            }
            for w in wanted {
                let matches: Vec<_> = svc
                    .ports
                    .iter()
                    .filter(|p| {
                        p.name.as_deref() == Some(w) || w.parse::<i32>().is_ok_and(|n| n == p.port)
                    })
                    .collect();
                if matches.is_empty() {
                    let available: Vec<String> = svc
                        .ports
                        .iter()
                        .map(|p| match &p.name {
                            Some(n) => format!("{n}({})", p.port),
                            None => p.port.to_string(),
                        })
                        .collect();
                    errors.push(format!(
                        "{PORTS}: {w:?} matches no port of the Service (its ports: {})",
                        if available.is_empty() {
                            "none".to_string()
                        } else {
                            available.join(", ")
                        }
                    ));
                }
                chosen.extend(matches);
            }
            chosen
        }
    };
    let mut ports = Vec::with_capacity(selected.len());
    for p in selected {
        let label = || p.name.clone().unwrap_or_else(|| p.port.to_string());
        let protocol = match p.protocol.parse::<Protocol>() {
            Ok(proto) => proto,
            Err(e) => {
                errors.push(format!("port {}: {e}", label()));
                continue;
            }
        };
        match p.node_port {
            None | Some(0) => {
                warnings.push(format!("port {} has no nodePort yet; skipped", label()))
            }
            Some(n) => match u16::try_from(n) {
                Ok(n) if n > 0 => {
                    if !config.node_port_range.contains(n) {
                        warnings.push(format!(
                            "port {}: nodePort {n} is outside the cluster's node-port range {} (nodePortRange in the config)",
                            label(),
                            config.node_port_range
                        ));
                    }
                    ports.push((protocol, n));
                }
                _ => errors.push(format!("port {}: nodePort {n} is outside 1-65535", label())),
            },
        }
    }

    // From where. A LoadBalancer Service's own spec.loadBalancerSourceRanges, unless the
    // config says to ignore them.
    let lb_ranges = match (svc.service_type.clone(), config.load_balancer_source_ranges) {
        (_, LoadBalancerSourceRanges::Ignore) => None,
        (ServiceType::LoadBalancer, _) if !svc.load_balancer_source_ranges.is_empty() => Some(
            cached_ranges(cache, &svc.load_balancer_source_ranges.join(",")),
        ),
        _ => None,
    };
    let sources = match get(ALLOWED_SOURCE_RANGES) {
        Some(value) => match cached_ranges(cache, value) {
            Ok(parsed) => {
                warnings.extend(
                    parsed
                        .warnings
                        .into_iter()
                        .map(|w| format!("{ALLOWED_SOURCE_RANGES}: {w}")),
                );
                if parsed.set.is_empty() {
                    errors.push(format!(
                        "{ALLOWED_SOURCE_RANGES}: empty; list CIDRs such as 203.0.113.0/24, or remove it to use the default"
                    ));
                }
                if config.load_balancer_source_ranges == LoadBalancerSourceRanges::RequireMatch
                    && let Some(Ok(lb)) = &lb_ranges
                    && lb.set != parsed.set
                {
                    errors.push(format!(
                        "{ALLOWED_SOURCE_RANGES}: {} differs from spec.loadBalancerSourceRanges {} (loadBalancerSourceRanges: requireMatch in the config): make them the same, or remove the annotation",
                        parsed.set, lb.set
                    ));
                }
                // What the sources may be is the policy's to judge (crate::policy): a
                // refusal closes the Service, while a parse error here keeps its rules.
                parsed.set
            }
            Err(bad) => {
                errors.extend(
                    bad.into_iter()
                        .map(|e| format!("{ALLOWED_SOURCE_RANGES}: {e}")),
                );
                SourceSet::default()
            }
        },
        None if lb_ranges.is_some() => match lb_ranges {
            Some(Ok(parsed)) => parsed.set,
            Some(Err(bad)) => {
                errors.extend(
                    bad.into_iter()
                        .map(|e| format!("spec.loadBalancerSourceRanges: {e}")),
                );
                SourceSet::default()
            }
            None => SourceSet::default(),
        },
        None => {
            if config.default_sources.is_empty() {
                warnings.push(format!(
                    "no {ALLOWED_SOURCE_RANGES} and no defaultSourceRanges in the operator config: nothing is opened"
                ));
            }
            config.default_sources.clone()
        }
    };

    // Where.
    let pools = match get(NODE_POOLS) {
        None => PoolSelector::All,
        Some(value) => {
            let mut names = BTreeSet::new();
            for t in tokens(value) {
                if valid_pool_name(t) {
                    names.insert(PoolName::new(t));
                } else {
                    errors.push(format!("{NODE_POOLS}: {t:?} is not a valid pool name"));
                }
            }
            if names.is_empty() && errors.is_empty() {
                errors.push(format!(
                    "{NODE_POOLS}: empty; list pool names, or remove it for all managed pools"
                ));
            }
            PoolSelector::Named(names)
        }
    };

    if !errors.is_empty() {
        return Admission::Invalid { errors, warnings };
    }
    if ports.is_empty() {
        warnings.push("no node ports to open".to_string());
    }
    Admission::Managed(ServiceIntent {
        service: svc.service.clone(),
        ports: {
            ports.sort_unstable();
            ports.dedup();
            ports
        },
        sources,
        pools,
        warnings,
    })
}

/// Every annotation under our prefix that is not one of ours, with a did-you-mean.
fn unknown_annotations(svc: &ServiceSpec) -> Vec<String> {
    svc.annotations
        .keys()
        .filter(|key| key.starts_with(ANNOTATION_PREFIX) && !KNOWN.contains(&key.as_str()))
        .map(|key| {
            let hint = KNOWN
                .iter()
                .find(|k| similar(k, key))
                .map(|k| format!("; did you mean {k}?"))
                .unwrap_or_default();
            format!("unknown annotation {key}{hint}")
        })
        .collect()
}

fn cached_ranges(cache: &mut RangeCache, text: &str) -> Result<ParsedRanges, Vec<String>> {
    if let Some(hit) = cache.get(text) {
        return hit.clone();
    }
    let parsed = parse_ranges(text);
    cache.insert(text.to_string(), parsed.clone());
    parsed
}

pub use crate::suggest::similar;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("test")
    }

    fn web() -> ServiceSpec {
        ServiceSpec::nodeport("default", "web")
            .with_port("http", "TCP", 80, 30080)
            .enabled()
    }

    fn errors(a: Admission) -> Vec<String> {
        match a {
            Admission::Invalid { errors, .. } => errors,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    fn intent(a: Admission) -> ServiceIntent {
        match a {
            Admission::Managed(i) => i,
            other => panic!("expected managed, got {other:?}"),
        }
    }

    #[test]
    fn which_services_are_managed() {
        let mut all = cfg();
        all.manage_all_node_port_services = true;
        let np = ServiceSpec::nodeport("d", "s")
            .with_port("", "TCP", 80, 30080)
            .with_ranges("10.0.0.0/8");
        let lb = np.clone().with_type(ServiceType::LoadBalancer);
        let cip = np.clone().with_type(ServiceType::Other("ClusterIP".into()));
        // (service, manage all?, managed?)
        let cases = [
            (np.clone(), false, false),
            (np.clone(), true, true),
            (np.clone().enabled(), false, true),
            (np.clone().with_annotation("enabled", "false"), true, false),
            (np.clone().with_annotation("enabled", "FALSE"), false, false),
            (lb.clone(), true, false),
            (lb.clone().enabled(), false, true),
            (cip.clone().enabled(), true, false),
        ];
        for (svc, manage_all, managed) in cases {
            let c = if manage_all { all.clone() } else { cfg() };
            let a = admit(&svc, &c);
            assert_eq!(
                matches!(a, Admission::Managed(_)),
                managed,
                "{svc:?} manage_all={manage_all}: {a:?}"
            );
        }
    }

    #[test]
    fn invalid_annotations_table() {
        let cases: &[(ServiceSpec, &str)] = &[
            (
                web().with_annotation("enabled", "yes"),
                "is not true or false",
            ),
            (
                web().with_ranges("10.0.0.0/33"),
                "not an IPv4/IPv6 address or CIDR",
            ),
            (web().with_ranges(" , "), "empty"),
            (web().with_annotation("ports", "https"), "matches no port"),
            (web().with_annotation("ports", ""), "empty"),
            (
                web().with_annotation("node-pools", "bad_pool!"),
                "not a valid pool name",
            ),
            (web().with_annotation("node-pools", ","), "empty"),
            (
                web().with_annotation("allowed-source-range", "10.0.0.0/8"),
                "did you mean nodeport-firewall.io/allowed-source-ranges",
            ),
            (web().with_annotation("colour", "x"), "unknown annotation"),
            (
                web()
                    .with_ranges("10.0.0.0/8")
                    .with_port("q", "ICMP", 1, 30001),
                "unsupported protocol",
            ),
            (
                web()
                    .with_ranges("10.0.0.0/8")
                    .with_port("q", "TCP", 1, 70000),
                "outside 1-65535",
            ),
        ];
        for (svc, want) in cases {
            let errs = errors(admit(svc, &cfg()));
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{:?}: {errs:?} should contain {want:?}",
                svc.annotations
            );
        }
    }

    #[test]
    fn policy_refusals_are_not_parse_errors() {
        // World-open and too many ranges are the policy's to refuse (they close the
        // Service); the annotation itself reads fine.
        for ranges in ["0.0.0.0/0", "::/0", "0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3"] {
            let i = intent(admit(&web().with_ranges(ranges), &cfg()));
            assert!(!i.sources.is_empty(), "{ranges}");
        }
    }

    #[test]
    fn a_typo_under_our_prefix_is_an_error_on_unmanaged_services_too() {
        // Not opted in (manageAllNodePortServices is off): still an error, with a hint.
        let cases = [
            (
                "nodeport-firewall.io/enable",
                "did you mean nodeport-firewall.io/enabled?",
            ),
            (
                "nodeport-firewall.io/Enabled",
                "did you mean nodeport-firewall.io/enabled?",
            ),
            (
                "nodeport-firewall.io/node-pool",
                "did you mean nodeport-firewall.io/node-pools?",
            ),
        ];
        for (key, hint) in cases {
            let svc = ServiceSpec::nodeport("d", "s")
                .with_port("", "TCP", 80, 30080)
                .with_annotation(key, "true");
            let errs = errors(admit(&svc, &cfg()));
            assert!(errs[0].contains(hint), "{key}: {errs:?}");
        }
        // A ClusterIP Service has no node ports: nothing to manage, nothing to report.
        let cip = ServiceSpec::nodeport("d", "s")
            .with_type(ServiceType::Other("ClusterIP".into()))
            .with_annotation("nodeport-firewall.io/enable", "true");
        assert!(matches!(admit(&cip, &cfg()), Admission::Unmanaged { .. }));
    }

    #[test]
    fn load_balancer_source_ranges_by_config() {
        let mut lb = ServiceSpec::nodeport("d", "lb")
            .with_type(ServiceType::LoadBalancer)
            .with_port("", "TCP", 80, 30080)
            .enabled();
        lb.load_balancer_source_ranges = vec!["10.0.0.0/8".into()];
        let mut c = cfg();
        c.default_sources = crate::net::parse_ranges("192.0.2.0/24").unwrap().set;
        // (mode, annotation, sources or error)
        let cases = [
            (LoadBalancerSourceRanges::Default, None, Ok("10.0.0.0/8")),
            (
                LoadBalancerSourceRanges::Default,
                Some("172.16.0.0/12"),
                Ok("172.16.0.0/12"),
            ),
            (LoadBalancerSourceRanges::Ignore, None, Ok("192.0.2.0/24")),
            (
                LoadBalancerSourceRanges::RequireMatch,
                None,
                Ok("10.0.0.0/8"),
            ),
            (
                LoadBalancerSourceRanges::RequireMatch,
                Some("10.0.0.0/8"),
                Ok("10.0.0.0/8"),
            ),
            (
                LoadBalancerSourceRanges::RequireMatch,
                Some("172.16.0.0/12"),
                Err("differs from spec.loadBalancerSourceRanges 10.0.0.0/8"),
            ),
        ];
        for (mode, annotation, want) in cases {
            c.load_balancer_source_ranges = mode;
            let svc = match annotation {
                Some(a) => lb.clone().with_ranges(a),
                None => lb.clone(),
            };
            match (admit(&svc, &c), want) {
                (Admission::Managed(i), Ok(s)) => assert_eq!(i.sources.to_string(), s, "{mode:?}"),
                (Admission::Invalid { errors, .. }, Err(e)) => {
                    assert!(errors[0].contains(e), "{mode:?}: {errors:?}")
                }
                (other, want) => panic!("{mode:?} {annotation:?}: {other:?}, want {want:?}"),
            }
        }
        lb.load_balancer_source_ranges = vec!["nope".into()];
        let errs = errors(admit(&lb, &cfg()));
        assert!(
            errs[0].starts_with("spec.loadBalancerSourceRanges: \"nope\""),
            "{errs:?}"
        );
    }

    #[test]
    fn valid_service_intent() {
        let svc = ServiceSpec::nodeport("default", "dns")
            .with_port("dns-udp", "UDP", 53, 30053)
            .with_port("dns-tcp", "TCP", 53, 30053)
            .with_port("metrics", "TCP", 9100, 30910)
            .enabled()
            .with_ranges("10.1.2.3/16, 2001:db8::/48")
            .with_annotation("ports", "dns-udp 53")
            .with_annotation("node-pools", "edge, core");
        let i = intent(admit(&svc, &cfg()));
        assert_eq!(
            i.ports,
            vec![(Protocol::Tcp, 30053), (Protocol::Udp, 30053)]
        );
        assert_eq!(i.sources.to_string(), "10.1.0.0/16,2001:db8::/48");
        assert_eq!(
            i.pools,
            PoolSelector::Named([PoolName::new("core"), PoolName::new("edge")].into())
        );
        assert_eq!(i.warnings.len(), 1, "host bits warning: {:?}", i.warnings);
    }

    #[test]
    fn no_allowlist_opens_nothing_with_a_warning() {
        let svc = ServiceSpec::nodeport("d", "s")
            .with_port("", "TCP", 80, 30080)
            .enabled();
        let i = intent(admit(&svc, &cfg()));
        assert!(i.sources.is_empty());
        assert!(i.warnings[0].contains("nothing is opened"));
        let mut c = cfg();
        c.default_sources = crate::net::parse_ranges("192.0.2.0/24").unwrap().set;
        let i = intent(admit(&svc, &c));
        assert_eq!(i.sources.to_string(), "192.0.2.0/24");
        assert!(i.warnings.is_empty());
    }

    #[test]
    fn port_without_node_port_is_skipped_with_a_warning() {
        let mut svc = web().with_ranges("10.0.0.0/8");
        svc.ports[0].node_port = None;
        let i = intent(admit(&svc, &cfg()));
        assert!(i.ports.is_empty());
        assert!(i.warnings.iter().any(|w| w.contains("no nodePort")));
    }
}
