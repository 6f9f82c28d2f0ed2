//! Source ranges: parsing, canonicalisation and merging of IPv4/IPv6 CIDRs.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The IP family of a range. Clouds never mix families in one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[serde(rename = "ipv4")]
    V4,
    #[serde(rename = "ipv6")]
    V6,
}

impl IpFamily {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        })
    }
}

/// A canonical, sorted, merged set of source CIDRs. Shared behind an `Arc` because many
/// Services and pools use the same set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceSet(Arc<[IpNet]>);

impl SourceSet {
    /// Builds a set from already parsed networks: clears host bits, merges overlapping and
    /// adjacent networks, and sorts (IPv4 before IPv6).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
        let mut merged = IpNet::aggregate(&nets);
        merged.sort();
        SourceSet(merged.into())
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The networks that open to the whole Internet of their family.
    pub fn world_open(&self) -> Vec<IpNet> {
        self.0
            .iter()
            .filter(|n| n.prefix_len() == 0)
            .copied()
            .collect()
    }

    /// The subset of one family, in order.
    pub fn family(&self, family: IpFamily) -> Vec<IpNet> {
        self.0
            .iter()
            .filter(|n| IpFamily::of(n) == family)
            .copied()
            .collect()
    }
}

impl fmt::Display for SourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for n in self.0.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// The result of parsing a list of ranges as a user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRanges {
    pub set: SourceSet,
    /// Non-fatal remarks, e.g. host bits that were cleared.
    pub warnings: Vec<String>,
}

/// Parses CIDRs separated by commas and/or whitespace. A bare address is read as a single
/// host (`/32` or `/128`). Host bits are cleared with a warning. Every token that is not an
/// address or CIDR is reported; no partial result is returned when any token is bad, because
/// a half-read allowlist must not be applied (fail closed).
pub fn parse_ranges(text: &str) -> Result<ParsedRanges, Vec<String>> {
    let mut nets = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    for token in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
    {
        match parse_one(token) {
            Ok(net) => {
                let canonical = net.trunc();
                if canonical != net {
                    warnings.push(format!("{token} has host bits set; using {canonical}"));
                }
                nets.push(canonical);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ParsedRanges {
        set: SourceSet::new(nets),
        warnings,
    })
}

fn parse_one(token: &str) -> Result<IpNet, String> {
    if let Ok(net) = token.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(addr) = token.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!(
        "{token:?} is not an IPv4/IPv6 address or CIDR (example: 203.0.113.0/24, 2001:db8::/32)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> Vec<String> {
        parse_ranges(s)
            .unwrap()
            .set
            .nets()
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn parsing_table() {
        // (input, canonical output, number of warnings)
        let cases: &[(&str, &[&str], usize)] = &[
            ("10.0.0.0/8", &["10.0.0.0/8"], 0),
            (
                "10.0.0.0/8,192.168.0.0/16",
                &["10.0.0.0/8", "192.168.0.0/16"],
                0,
            ),
            (
                "10.0.0.0/8 192.168.0.0/16",
                &["10.0.0.0/8", "192.168.0.0/16"],
                0,
            ),
            (
                " 10.0.0.0/8 ,\n\t192.168.0.0/16 ,, ",
                &["10.0.0.0/8", "192.168.0.0/16"],
                0,
            ),
            ("10.1.2.3/16", &["10.1.0.0/16"], 1),
            ("10.0.0.0/8,10.1.0.0/16", &["10.0.0.0/8"], 0),
            ("10.0.0.0/25,10.0.0.128/25", &["10.0.0.0/24"], 0),
            ("10.0.0.0/24,10.0.0.0/24", &["10.0.0.0/24"], 0),
            ("203.0.113.7", &["203.0.113.7/32"], 0),
            ("2001:db8::1", &["2001:db8::1/128"], 0),
            (
                "2001:db8::/32,10.0.0.0/8",
                &["10.0.0.0/8", "2001:db8::/32"],
                0,
            ),
            ("2001:db8:0:1::5/64", &["2001:db8:0:1::/64"], 1),
            ("0.0.0.0/1,128.0.0.0/1", &["0.0.0.0/0"], 0),
            ("", &[], 0),
        ];
        for (input, want, warnings) in cases {
            let parsed = parse_ranges(input).unwrap();
            let got: Vec<String> = parsed.set.nets().iter().map(|n| n.to_string()).collect();
            assert_eq!(&got, want, "input {input:?}");
            assert_eq!(
                parsed.warnings.len(),
                *warnings,
                "warnings for {input:?}: {:?}",
                parsed.warnings
            );
        }
    }

    #[test]
    fn invalid_tokens_are_all_reported() {
        let cases: &[(&str, usize)] = &[
            ("10.0.0.0/33", 1),
            ("foo", 1),
            ("10.0.0.0/8;192.168.0.0/16", 1),
            ("300.1.1.1, bar, 10.0.0.0/8", 2),
            ("2001:db8::/129", 1),
            ("10.0.0.0/-1", 1),
        ];
        for (input, n) in cases {
            let errors = parse_ranges(input).unwrap_err();
            assert_eq!(errors.len(), *n, "{input:?}: {errors:?}");
        }
    }

    #[test]
    fn world_open_is_detected_after_merging() {
        assert_eq!(set("0.0.0.0/1, 128.0.0.0/1"), vec!["0.0.0.0/0"]);
        assert_eq!(parse_ranges("::/0").unwrap().set.world_open().len(), 1);
        assert!(
            parse_ranges("10.0.0.0/8")
                .unwrap()
                .set
                .world_open()
                .is_empty()
        );
    }
}
