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

    /// The families whose public unicast space this set covers entirely: opening a port to
    /// them is opening it to the whole Internet, however the set is split into pieces
    /// (`0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3` is as world-open as `0.0.0.0/0`).
    pub fn world_open(&self) -> Vec<IpFamily> {
        [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .filter(|f| covers_public(&self.family(*f), *f))
            .collect()
    }

    /// Whether every address of `net` lies inside this set.
    pub fn contains_net(&self, net: &IpNet) -> bool {
        // The set is aggregated: its networks are disjoint and no two of them merge, so a
        // CIDR inside their union lies inside one of them.
        self.0.iter().any(|n| n.contains(net))
    }
}

/// The address blocks of a family that are not reachable from the public Internet
/// (RFC 6890 special-purpose registries): private, shared, loopback, link-local,
/// documentation, benchmarking, multicast and reserved space. What is left is the public
/// unicast space a world-open allowlist covers.
const NOT_PUBLIC_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 public unicast is the global unicast block; its documentation prefix is not
/// routed.
const PUBLIC_V6: &str = "2000::/3";
const NOT_PUBLIC_V6: &[&str] = &["2001:db8::/32"];

/// An inclusive range of addresses as integers, both families in one type.
type Span = (u128, u128);

fn span(net: &IpNet) -> Span {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn spans(texts: &[&str]) -> Vec<Span> {
    texts
        .iter()
        .filter_map(|t| t.parse::<IpNet>().ok())
        .map(|n| span(&n))
        .collect()
}

/// The public unicast space of a family, as sorted disjoint spans.
fn public_spans(family: IpFamily) -> Vec<Span> {
    let (whole, holes) = match family {
        IpFamily::V4 => ((0, u128::from(u32::MAX)), spans(NOT_PUBLIC_V4)),
        IpFamily::V6 => match spans(&[PUBLIC_V6]).first() {
            Some(s) => (*s, spans(NOT_PUBLIC_V6)),
            None => return Vec::new(),
        },
    };
    subtract(whole, holes)
}

/// `whole` minus `holes`, as sorted disjoint spans.
fn subtract(whole: Span, mut holes: Vec<Span>) -> Vec<Span> {
    holes.sort_unstable();
    let mut out = Vec::new();
    let mut next = whole.0;
    let mut done = false;
    for (lo, hi) in holes {
        if done || hi < next || lo > whole.1 {
            continue;
        }
        if lo > next {
            out.push((next, lo - 1));
        }
        match hi.checked_add(1) {
            Some(n) if hi < whole.1 => next = next.max(n),
            _ => done = true,
        }
    }
    if !done && next <= whole.1 {
        out.push((next, whole.1));
    }
    out
}

/// Whether `nets` (one family) together cover all of that family's public unicast space.
fn covers_public(nets: &[IpNet], family: IpFamily) -> bool {
    // Computed once: every managed Service is judged on every plan.
    static PUBLIC: std::sync::OnceLock<[Vec<Span>; 2]> = std::sync::OnceLock::new();
    if nets.is_empty() {
        return false;
    }
    let public = PUBLIC.get_or_init(|| [public_spans(IpFamily::V4), public_spans(IpFamily::V6)]);
    let need = match family {
        IpFamily::V4 => &public[0],
        IpFamily::V6 => &public[1],
    };
    let mut have: Vec<Span> = nets.iter().map(span).collect();
    have.sort_unstable();
    need.iter().all(|n| covered(&have, *n))
}

/// Whether the sorted spans `have` cover `need` without a gap.
fn covered(have: &[Span], need: Span) -> bool {
    let mut next = need.0;
    for &(lo, hi) in have {
        if lo > next {
            break;
        }
        if hi >= next {
            match hi.checked_add(1) {
                Some(n) if hi < need.1 => next = n,
                _ => return true,
            }
        }
    }
    false
}

impl SourceSet {
    /// The networks of this set whose prefix is shorter than `min` for their family.
    pub fn wider_than(&self, min_v4: u8, min_v6: u8) -> Vec<IpNet> {
        self.0
            .iter()
            .filter(|n| {
                n.prefix_len()
                    < match IpFamily::of(n) {
                        IpFamily::V4 => min_v4,
                        IpFamily::V6 => min_v6,
                    }
            })
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
    fn world_open_is_judged_by_coverage_of_public_space() {
        assert_eq!(set("0.0.0.0/1, 128.0.0.0/1"), vec!["0.0.0.0/0"]);
        let v4 = &[IpFamily::V4][..];
        let v6 = &[IpFamily::V6][..];
        let both = &[IpFamily::V4, IpFamily::V6][..];
        let none: &[IpFamily] = &[];
        // (ranges, world-open families)
        let cases: &[(&str, &[IpFamily])] = &[
            ("0.0.0.0/0", v4),
            ("::/0", v6),
            ("0.0.0.0/0, ::/0", both),
            // All of unicast IPv4 without multicast and reserved space.
            ("0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3", v4),
            // Public space only: private ranges are not needed to cover it.
            (
                "1.0.0.0/8 2.0.0.0/7 4.0.0.0/6 8.0.0.0/7 11.0.0.0/8 12.0.0.0/6 16.0.0.0/4 \
                 32.0.0.0/3 64.0.0.0/3 96.0.0.0/4 112.0.0.0/5 120.0.0.0/6 124.0.0.0/7 \
                 126.0.0.0/8 128.0.0.0/3 160.0.0.0/5 168.0.0.0/6 172.0.0.0/12 172.32.0.0/11 \
                 172.64.0.0/10 172.128.0.0/9 173.0.0.0/8 174.0.0.0/7 176.0.0.0/4 \
                 192.0.0.0/2",
                v4,
            ),
            // One public /32 missing (8.8.8.8) is not the whole Internet.
            (
                "0.0.0.0/5, 8.0.0.0/13, 8.8.0.0/21, 8.8.8.0/29, 8.8.8.9/32, 8.8.8.10/31, 8.8.8.12/30, 8.8.8.16/28, 8.8.8.32/27, 8.8.8.64/26, 8.8.8.128/25, 8.8.9.0/24, 8.8.10.0/23, 8.8.12.0/22, 8.8.16.0/20, 8.8.32.0/19, 8.8.64.0/18, 8.8.128.0/17, 8.9.0.0/16, 8.10.0.0/15, 8.12.0.0/14, 8.16.0.0/12, 8.32.0.0/11, 8.64.0.0/10, 8.128.0.0/9, 9.0.0.0/8, 10.0.0.0/7, 12.0.0.0/6, 16.0.0.0/4, 32.0.0.0/3, 64.0.0.0/2, 128.0.0.0/1",
                none,
            ),
            ("0.0.0.0/1", none),
            ("128.0.0.0/1", none),
            ("10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16", none),
            ("::/1", v6),
            ("2000::/3", v6),
            ("2000::/4, 3000::/4", v6),
            ("2000::/4", none),
            ("fc00::/7", none),
            ("8000::/1", none),
            ("::/1, 0.0.0.0/1", v6),
        ];
        for (input, want) in cases {
            let got = parse_ranges(input).unwrap().set.world_open();
            assert_eq!(&got, want, "{input:?}");
        }
    }

    #[test]
    fn containment_and_width() {
        let allowed = parse_ranges("10.0.0.0/9, 10.128.0.0/9, 2001:db8::/32")
            .unwrap()
            .set;
        let cases = [
            ("10.0.0.0/8", true),
            ("10.1.2.3/32", true),
            ("11.0.0.0/8", false),
            ("0.0.0.0/0", false),
            ("2001:db8:1::/48", true),
            ("2001:db9::/48", false),
        ];
        for (net, want) in cases {
            let net: IpNet = net.parse().unwrap();
            assert_eq!(allowed.contains_net(&net), want, "{net}");
        }
        let set = parse_ranges("0.0.0.0/1, 10.0.0.0/8, ::/1, fd00::/8")
            .unwrap()
            .set;
        let wide: Vec<String> = set.wider_than(8, 8).iter().map(|n| n.to_string()).collect();
        assert_eq!(wide, vec!["0.0.0.0/1", "::/1"]);
    }

    #[test]
    fn subtract_edges() {
        assert_eq!(subtract((0, 10), vec![]), vec![(0, 10)]);
        assert_eq!(subtract((0, 10), vec![(0, 10)]), vec![]);
        assert_eq!(
            subtract((0, 10), vec![(3, 4), (0, 1)]),
            vec![(2, 2), (5, 10)]
        );
        assert_eq!(subtract((0, 10), vec![(8, 20)]), vec![(0, 7)]);
        assert_eq!(subtract((0, u128::MAX), vec![(5, u128::MAX)]), vec![(0, 4)]);
        assert!(covered(&[(0, 3), (4, 9)], (1, 8)));
        assert!(!covered(&[(0, 3), (5, 9)], (1, 8)));
        assert!(covered(&[(0, u128::MAX)], (0, u128::MAX)));
    }
}
