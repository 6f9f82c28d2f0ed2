//! What a Compute `denied` rule may block, as a neutral [`Denial`], for the planner's
//! shadowing check: an Allow behind an enabled ingress Deny of higher (or, on GCP, equal)
//! priority does not let its traffic through.
//!
//! Every field is filled never narrower than the cloud's rule: what cannot be said exactly
//! becomes "every". A Denial too wide can only make the planner write a rule of ours that
//! was not strictly needed (or refuse with a plan error naming the Deny); one too narrow
//! would leave a port blocked while the plan says it is open.

use google_cloud_compute_v1::model::{Firewall, firewall};
use ipnet::IpNet;
use nodeport_firewall_model::{Denial, PortRange, Protocol};

/// What one `denied[].IPProtocol` may match of the traffic our rules allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Matches {
    /// `all`, a missing protocol or one we cannot read: every protocol.
    Every,
    One(Protocol),
    /// A protocol our rules never allow (icmp, esp, ah, ipip, another number): none of it.
    Unrelated,
}

fn matches_of(ip_protocol: Option<&str>) -> Matches {
    let Some(p) = ip_protocol.map(|p| p.trim().to_ascii_lowercase()) else {
        return Matches::Every;
    };
    match p.as_str() {
        "tcp" | "6" => Matches::One(Protocol::Tcp),
        "udp" | "17" => Matches::One(Protocol::Udp),
        "sctp" | "132" => Matches::One(Protocol::Sctp),
        "icmp" | "esp" | "ah" | "ipip" => Matches::Unrelated,
        n => match n.parse::<u8>() {
            Ok(_) => Matches::Unrelated,
            // `all`, empty, or a name we do not know.
            Err(_) => Matches::Every,
        },
    }
}

/// Whether the rule is enforced on ingress traffic: enabled and INGRESS (the default).
/// Disabled rules and EGRESS rules never block a connection to our nodes.
pub(crate) fn enforced_on_ingress(fw: &Firewall) -> bool {
    fw.disabled != Some(true)
        && fw
            .direction
            .as_ref()
            .is_none_or(|d| *d == firewall::Direction::Ingress)
}

/// What an enforced ingress rule with `denied` entries may block; `None` when it is not
/// such a rule, or blocks only protocols our rules never allow.
pub(crate) fn denial_of(fw: &Firewall) -> Option<Denial> {
    if fw.denied.is_empty() || !enforced_on_ingress(fw) {
        return None;
    }
    let mut protocols: Vec<Protocol> = Vec::new();
    let mut every_protocol = false;
    let mut ports: Vec<PortRange> = Vec::new();
    let mut every_port = false;
    let mut related = false;
    for entry in &fw.denied {
        let m = matches_of(entry.ip_protocol.as_deref());
        match m {
            Matches::Unrelated => continue,
            Matches::Every => every_protocol = true,
            Matches::One(p) => protocols.push(p),
        }
        related = true;
        if entry.ports.is_empty() {
            every_port = true;
        }
        for p in &entry.ports {
            match p.trim().parse::<PortRange>() {
                Ok(r) => ports.push(r),
                // A port we cannot read may be any port.
                Err(_) => every_port = true,
            }
        }
    }
    if !related {
        return None;
    }
    protocols.sort();
    protocols.dedup();
    // Several protocols, each with its own ports, are widened to every protocol on the
    // union of the ports: wider, never narrower.
    let protocol = match (every_protocol, protocols.as_slice()) {
        (false, [one]) => Some(*one),
        _ => None,
    };
    if every_port {
        ports.clear();
    } else {
        ports.sort();
        ports.dedup();
    }
    Some(Denial {
        protocol,
        ports,
        sources: denied_sources(fw),
        // Always the whole network: a Deny on another target tag still applies to our
        // nodes when they carry that tag too (an instance may carry many tags, and the
        // pool's tag is only one of them), and a Deny on a service account to every node
        // using it. We cannot know every tag of every node from here, so a Deny is never
        // narrowed to its targets.
        scopes: Vec::new(),
    })
}

/// The sources a Deny may match: its `sourceRanges`, or every source when it also (or
/// only) matches by source tag or service account (those are instances with any address),
/// when it names no source at all (the API's default is `0.0.0.0/0`), or when a range
/// cannot be read.
fn denied_sources(fw: &Firewall) -> Vec<IpNet> {
    if !fw.source_tags.is_empty()
        || !fw.source_service_accounts.is_empty()
        || fw.source_ranges.is_empty()
    {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(fw.source_ranges.len());
    for r in &fw.source_ranges {
        let r = r.trim();
        let net = r
            .parse::<IpNet>()
            .or_else(|_| r.parse::<std::net::IpAddr>().map(IpNet::from));
        match net {
            Ok(n) => out.push(n.trunc()),
            Err(_) => return Vec::new(),
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(protocols: &[(&str, &[&str])]) -> Firewall {
        Firewall::new().set_denied(protocols.iter().map(|(p, ports)| {
            firewall::Denied::new()
                .set_ip_protocol(*p)
                .set_ports(ports.iter().map(|s| s.to_string()))
        }))
    }

    fn range(from: u16, to: u16) -> PortRange {
        PortRange { from, to }
    }

    #[test]
    fn denials_are_never_narrower_than_the_rule() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let cases: Vec<(&str, Firewall, Option<Denial>)> = vec![
            (
                "one protocol, its ports, its ranges",
                deny(&[("tcp", &["30080", "30000-30010"])])
                    .set_source_ranges(["10.1.2.3/16", "192.0.2.7"]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ports: vec![range(30000, 30010), range(30080, 30080)],
                    sources: vec![net("10.1.0.0/16"), net("192.0.2.7/32")],
                    scopes: vec![],
                }),
            ),
            (
                "all: every protocol and port",
                deny(&[("all", &[])]).set_source_ranges(["0.0.0.0/0"]),
                Some(Denial {
                    sources: vec![net("0.0.0.0/0")],
                    ..Denial::default()
                }),
            ),
            (
                "two protocols: every protocol on the union of ports",
                deny(&[("tcp", &["22"]), ("udp", &["53"])]),
                Some(Denial {
                    ports: vec![range(22, 22), range(53, 53)],
                    ..Denial::default()
                }),
            ),
            (
                "a protocol without ports: every port",
                deny(&[("tcp", &["22"]), ("17", &[])]),
                Some(Denial::default()),
            ),
            (
                "the same protocol twice stays one protocol",
                deny(&[("tcp", &["22"]), ("TCP", &["80"])]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ports: vec![range(22, 22), range(80, 80)],
                    ..Denial::default()
                }),
            ),
            (
                "an unreadable port is every port",
                deny(&[("tcp", &["22", "x"])]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ..Denial::default()
                }),
            ),
            (
                "an unknown protocol name is every protocol",
                deny(&[("gre-ish", &[])]),
                Some(Denial::default()),
            ),
            (
                "a missing protocol is every protocol",
                Firewall::new().set_denied([firewall::Denied::new()]),
                Some(Denial::default()),
            ),
            (
                "icmp only blocks nothing we allow",
                deny(&[("icmp", &[]), ("50", &[])]),
                None,
            ),
            (
                "icmp and udp: udp",
                deny(&[("icmp", &[]), ("udp", &["53"])]),
                Some(Denial {
                    protocol: Some(Protocol::Udp),
                    ports: vec![range(53, 53)],
                    ..Denial::default()
                }),
            ),
            (
                "source tags besides ranges: every source",
                deny(&[("tcp", &[])])
                    .set_source_ranges(["10.0.0.0/8"])
                    .set_source_tags(["bastion"]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ..Denial::default()
                }),
            ),
            (
                "source service accounts: every source",
                deny(&[("tcp", &[])]).set_source_service_accounts(["a@p.iam.gserviceaccount.com"]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ..Denial::default()
                }),
            ),
            (
                "an unreadable range: every source",
                deny(&[("tcp", &[])]).set_source_ranges(["10.0.0.0/8", "nonsense"]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ..Denial::default()
                }),
            ),
            (
                "target tags never narrow the scope",
                deny(&[("tcp", &[])]).set_target_tags(["other-pool"]),
                Some(Denial {
                    protocol: Some(Protocol::Tcp),
                    ..Denial::default()
                }),
            ),
            (
                "disabled: not enforced",
                deny(&[("all", &[])]).set_disabled(true),
                None,
            ),
            (
                "egress: not enforced on ingress",
                deny(&[("all", &[])]).set_direction(firewall::Direction::Egress),
                None,
            ),
            (
                "an allow is no denial",
                Firewall::new().set_allowed([firewall::Allowed::new().set_ip_protocol("tcp")]),
                None,
            ),
        ];
        for (what, fw, want) in cases {
            assert_eq!(denial_of(&fw), want, "{what}");
        }
    }
}
