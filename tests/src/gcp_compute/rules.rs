//! A firewall rule checked as Compute checks it on insert and patch, with the API's defaults
//! filled in (`direction: INGRESS`, `priority: 1000`, `sourceRanges: ["0.0.0.0/0"]` for an
//! ingress rule without sources).

use serde_json::{Value, json};

use super::errors::{Answer, bad};

/// The per-rule limits the server enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct RuleLimits {
    pub max_ports: usize,
    pub max_sources: usize,
}

/// RFC 1035, 1-63 characters.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

pub(super) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a source range is IPv6; `None` when it is not an address or CIDR.
pub(super) fn range_is_v6(r: &str) -> Option<bool> {
    let (addr, len) = r.split_once('/').unwrap_or((r, ""));
    let v6 = addr.parse::<std::net::IpAddr>().ok()?.is_ipv6();
    if !len.is_empty() {
        let n: u8 = len.parse().ok()?;
        if n > if v6 { 128 } else { 32 } {
            return None;
        }
    }
    Some(v6)
}

pub(super) fn valid_port(p: &str) -> bool {
    let ok = |x: &str| x.parse::<u16>().is_ok();
    match p.split_once('-') {
        Some((a, b)) => ok(a) && ok(b) && a.parse::<u16>().ok() <= b.parse::<u16>().ok(),
        None => ok(p),
    }
}

/// The protocols a rule may name: the well-known names, `all`, or an IP protocol number.
fn valid_protocol(p: &str) -> bool {
    ["tcp", "udp", "icmp", "esp", "ah", "sctp", "ipip", "all"].contains(&p)
        || p.parse::<u8>().is_ok()
}

/// An int32 field: a JSON number or a decimal string (proto3 JSON accepts both).
fn int_field(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn check_entries(kind: &str, entries: &[Value], limits: RuleLimits) -> Result<(), Answer> {
    for (i, entry) in entries.iter().enumerate() {
        let proto = entry["IPProtocol"].as_str().unwrap_or_default();
        if proto.is_empty() {
            return Err(bad(format!(
                "Required field 'resource.{kind}[{i}].IPProtocol' not specified"
            )));
        }
        if !valid_protocol(proto) {
            return Err(bad(format!(
                "Invalid value for field 'resource.{kind}[{i}].IPProtocol': '{proto}'. Must be one of [tcp, udp, icmp, esp, ah, sctp, ipip, all] or an IP protocol number."
            )));
        }
        let ports = strings(&entry["ports"]);
        if !ports.is_empty() && !["tcp", "udp", "sctp", "6", "17", "132"].contains(&proto) {
            return Err(bad(format!("Ports are not allowed for protocol '{proto}'")));
        }
        if ports.len() > limits.max_ports {
            return Err(bad(format!(
                "Invalid value for field 'resource.{kind}[{i}].ports': too many ports ({} > {})",
                ports.len(),
                limits.max_ports
            )));
        }
        if let Some(p) = ports.iter().find(|p| !valid_port(p)) {
            return Err(bad(format!(
                "Invalid value for field 'resource.{kind}[{i}].ports[]': '{p}'"
            )));
        }
    }
    Ok(())
}

/// Checks a whole rule as the API would; returns it with defaults filled in.
pub(super) fn validate(limits: RuleLimits, mut fw: Value) -> Result<Value, Answer> {
    let name = fw["name"].as_str().unwrap_or_default().to_string();
    if !valid_name(&name) {
        return Err(bad(format!(
            "Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'"
        )));
    }
    let direction = fw["direction"].as_str().unwrap_or("INGRESS").to_string();
    if direction != "INGRESS" && direction != "EGRESS" {
        return Err(bad(format!(
            "Invalid value for field 'resource.direction': '{direction}'"
        )));
    }
    fw["direction"] = json!(direction);
    let priority = match fw.get("priority") {
        None | Some(Value::Null) => 1000,
        Some(v) => int_field(v).ok_or_else(|| {
            bad(format!(
                "Invalid value for field 'resource.priority': '{v}'. Must be an integer."
            ))
        })?,
    };
    if !(0..=65535).contains(&priority) {
        return Err(bad(format!(
            "Invalid value for field 'resource.priority': '{priority}'. Must be within 0-65535."
        )));
    }
    fw["priority"] = json!(priority);
    if let Some(d) = fw
        .get("disabled")
        .filter(|d| !d.is_null() && !d.is_boolean())
    {
        return Err(bad(format!(
            "Invalid value for field 'resource.disabled': '{d}'"
        )));
    }
    let allowed = fw["allowed"].as_array().cloned().unwrap_or_default();
    let denied = fw["denied"].as_array().cloned().unwrap_or_default();
    if allowed.is_empty() == denied.is_empty() {
        return Err(bad(
            "Exactly one of 'allowed' or 'denied' must be specified".to_string(),
        ));
    }
    check_entries("allowed", &allowed, limits)?;
    check_entries("denied", &denied, limits)?;
    let mut sources = strings(&fw["sourceRanges"]);
    let source_tags = strings(&fw["sourceTags"]);
    let source_sas = strings(&fw["sourceServiceAccounts"]);
    let tags = strings(&fw["targetTags"]);
    let sas = strings(&fw["targetServiceAccounts"]);
    if !source_tags.is_empty() && !source_sas.is_empty() {
        return Err(bad(
            "sourceTags and sourceServiceAccounts cannot be used in the same firewall rule"
                .to_string(),
        ));
    }
    if (!source_tags.is_empty() && !sas.is_empty()) || (!source_sas.is_empty() && !tags.is_empty())
    {
        return Err(bad(
            "Network tags and service accounts cannot be mixed between the sources and targets of a firewall rule"
                .to_string(),
        ));
    }
    if direction == "INGRESS"
        && sources.is_empty()
        && source_tags.is_empty()
        && source_sas.is_empty()
    {
        // The API's default: from anywhere.
        sources.push("0.0.0.0/0".to_string());
        fw["sourceRanges"] = json!(sources);
    }
    let mut families = Vec::new();
    for r in &sources {
        match range_is_v6(r) {
            Some(v6) => families.push(v6),
            None => {
                return Err(bad(format!(
                    "Invalid value for field 'resource.sourceRanges[]': '{r}'. Must be a valid IPV4 or IPV6 CIDR."
                )));
            }
        }
    }
    if families.iter().any(|f| *f) && families.iter().any(|f| !*f) {
        return Err(bad(
            "Invalid value for field 'resource.sourceRanges': IPv4 and IPv6 source ranges cannot be mixed in one firewall rule."
                .to_string(),
        ));
    }
    if sources.len() > limits.max_sources {
        return Err(bad(format!(
            "Invalid value for field 'resource.sourceRanges': too many source ranges ({} > {})",
            sources.len(),
            limits.max_sources
        )));
    }
    if !tags.is_empty() && !sas.is_empty() {
        return Err(bad(
            "targetTags and targetServiceAccounts cannot be used in the same firewall rule"
                .to_string(),
        ));
    }
    // The real API accepts an allow without targets, which then opens every instance of
    // the network: refused here so that a provider bug cannot hide. A Deny without targets
    // (network-wide) is common, and accepted.
    if tags.is_empty() && sas.is_empty() && denied.is_empty() {
        return Err(bad(format!(
            "test server: rule '{name}' has no targetTags or targetServiceAccounts and would apply to every instance of the network; refused"
        )));
    }
    if let Some(t) = tags
        .iter()
        .chain(source_tags.iter())
        .find(|t| !valid_name(t))
    {
        return Err(bad(format!(
            "Invalid value for field 'resource.targetTags[]': '{t}'"
        )));
    }
    if fw["description"].as_str().is_some_and(|d| d.len() > 2048) {
        return Err(bad(
            "Invalid value for field 'resource.description': longer than 2048 characters"
                .to_string(),
        ));
    }
    Ok(fw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RuleLimits = RuleLimits {
        max_ports: 100,
        max_sources: 256,
    };

    #[test]
    fn validation_helpers() {
        assert_eq!(range_is_v6("10.0.0.0/8"), Some(false));
        assert_eq!(range_is_v6("2001:db8::/32"), Some(true));
        assert_eq!(range_is_v6("10.0.0.0/33"), None);
        assert!(valid_port("30000-30010"));
        assert!(!valid_port("30010-30000"));
    }

    #[test]
    fn rules_are_checked_like_compute() {
        let base = || {
            json!({"name": "r", "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}],
                   "sourceRanges": ["10.0.0.0/8"], "targetTags": ["web"]})
        };
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b
        };
        let deny = json!([{"IPProtocol": "all"}]);
        let ok = validate(LIMITS, base()).unwrap();
        assert_eq!(ok["priority"], json!(1000));
        assert_eq!(ok["direction"], json!("INGRESS"));
        for (what, body, accepted) in [
            ("priority 0", with("priority", json!(0)), true),
            ("priority 65535", with("priority", json!(65535)), true),
            ("priority as a string", with("priority", json!("900")), true),
            ("priority 65536", with("priority", json!(65536)), false),
            ("priority -1", with("priority", json!(-1)), false),
            ("priority 1.5", with("priority", json!(1.5)), false),
            ("priority true", with("priority", json!(true)), false),
            ("disabled \"yes\"", with("disabled", json!("yes")), false),
            ("allowed and denied", with("denied", deny.clone()), false),
            (
                "neither allowed nor denied",
                with("allowed", json!([])),
                false,
            ),
            (
                "a deny alone, network-wide",
                json!({"name": "d", "denied": deny.clone(), "priority": 900}),
                true,
            ),
            (
                "an allow without targets",
                json!({"name": "a", "allowed": [{"IPProtocol": "tcp"}]}),
                false,
            ),
            (
                "an unknown protocol",
                with("allowed", json!([{"IPProtocol": "tcpp"}])),
                false,
            ),
            (
                "a protocol number",
                with("allowed", json!([{"IPProtocol": "47"}])),
                true,
            ),
            (
                "ports on all",
                with("allowed", json!([{"IPProtocol": "all", "ports": ["22"]}])),
                false,
            ),
            (
                "ports on icmp, in a deny",
                json!({"name": "d", "denied": [{"IPProtocol": "icmp", "ports": ["1"]}]}),
                false,
            ),
            (
                "source tags and source service accounts",
                json!({"name": "d", "denied": deny.clone(), "sourceTags": ["a"],
                       "sourceServiceAccounts": ["x@p.iam.gserviceaccount.com"]}),
                false,
            ),
            (
                "source tags to target service accounts",
                json!({"name": "d", "denied": deny.clone(), "sourceTags": ["a"],
                       "targetServiceAccounts": ["x@p.iam.gserviceaccount.com"]}),
                false,
            ),
        ] {
            assert_eq!(validate(LIMITS, body).is_ok(), accepted, "{what}");
        }
        let d = validate(LIMITS, json!({"name": "d", "denied": deny})).unwrap();
        assert_eq!(
            d["sourceRanges"],
            json!(["0.0.0.0/0"]),
            "the API's default source"
        );
    }
}
