//! Kubernetes label selectors (`matchLabels`, `matchExpressions`), validated once and then
//! matched against Namespace labels.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A validated label selector. An empty selector (`{}`) matches every namespace, as in
/// Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Validates `selector` as the API server does for `metav1.LabelSelector`: every key a
    /// qualified name, every `matchLabels` value a label value, `In`/`NotIn` with at least
    /// one value, `Exists`/`DoesNotExist` with none. All problems are reported.
    pub fn new(selector: &LabelSelector) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            check_key(k, &mut problems);
            if !valid_label_value(v) {
                problems.push(format!("matchLabels: {v:?} is not a valid label value"));
            }
            requirements.push(Requirement::In(k.clone(), [v.clone()].into()));
        }
        for e in selector.match_expressions.iter().flatten() {
            check_key(&e.key, &mut problems);
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            for v in &values {
                if !valid_label_value(v) {
                    problems.push(format!(
                        "matchExpressions[{}]: {v:?} is not a valid label value",
                        e.key
                    ));
                }
            }
            let key = e.key.clone();
            let r = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    problems.push(format!(
                        "matchExpressions[{key}]: operator {} needs at least one value",
                        e.operator
                    ));
                    continue;
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    problems.push(format!(
                        "matchExpressions[{key}]: operator {} takes no values",
                        e.operator
                    ));
                    continue;
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    problems.push(format!(
                        "matchExpressions[{key}]: unknown operator {other:?} (In, NotIn, Exists or DoesNotExist)"
                    ));
                    continue;
                }
            };
            requirements.push(r);
        }
        if problems.is_empty() {
            Ok(Selector { requirements })
        } else {
            Err(problems)
        }
    }

    /// Whether it looks at no label but the namespace's name, which is known even without
    /// the Namespace object.
    pub fn by_name_only(&self) -> bool {
        self.requirements.iter().all(|r| {
            let key = match r {
                Requirement::In(k, _)
                | Requirement::NotIn(k, _)
                | Requirement::Exists(k)
                | Requirement::DoesNotExist(k) => k,
            };
            key == super::NAMESPACE_NAME_LABEL
        })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

fn check_key(key: &str, problems: &mut Vec<String>) {
    if !valid_label_key(key) {
        problems.push(format!(
            "{key:?} is not a valid label key (an optional DNS prefix and '/', then 1-63 letters, digits, '-', '_' or '.')"
        ));
    }
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of 1-63 characters.
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(valid_dns_label));
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A label value: empty, or 1-63 letters, digits, `-`, `_` or `.`, starting and ending
/// with a letter or digit.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// An RFC 1123 label: what a Namespace name is.
pub fn valid_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && l.starts_with(|c: char| c.is_ascii_alphanumeric())
        && l.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matching_table() {
        let team_a = labels(&[("team", "a"), ("env", "prod")]);
        let team_b = labels(&[("team", "b")]);
        let bare = labels(&[]);
        // (selector, matches team_a, matches team_b, matches bare)
        let cases: Vec<(LabelSelector, [bool; 3])> = vec![
            (LabelSelector::default(), [true, true, true]),
            (
                LabelSelector {
                    match_labels: Some([("team".to_string(), "a".to_string())].into()),
                    ..Default::default()
                },
                [true, false, false],
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("team", "In", &["a", "b"])]),
                    ..Default::default()
                },
                [true, true, false],
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("team", "NotIn", &["a"])]),
                    ..Default::default()
                },
                [false, true, true],
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("env", "Exists", &[])]),
                    ..Default::default()
                },
                [true, false, false],
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("env", "DoesNotExist", &[])]),
                    ..Default::default()
                },
                [false, true, true],
            ),
            (
                LabelSelector {
                    match_labels: Some([("team".to_string(), "a".to_string())].into()),
                    match_expressions: Some(vec![expr("env", "In", &["dev"])]),
                },
                [false, false, false],
            ),
        ];
        for (sel, want) in cases {
            let s = Selector::new(&sel).unwrap();
            let got = [s.matches(&team_a), s.matches(&team_b), s.matches(&bare)];
            assert_eq!(got, want, "{sel:?}");
        }
    }

    #[test]
    fn invalid_selectors_table() {
        let cases: Vec<(LabelSelector, &str)> = vec![
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("team", "In", &[])]),
                    ..Default::default()
                },
                "needs at least one value",
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("team", "Exists", &["a"])]),
                    ..Default::default()
                },
                "takes no values",
            ),
            (
                LabelSelector {
                    match_expressions: Some(vec![expr("team", "Equals", &["a"])]),
                    ..Default::default()
                },
                "unknown operator",
            ),
            (
                LabelSelector {
                    match_labels: Some([("bad key!".to_string(), "a".to_string())].into()),
                    ..Default::default()
                },
                "not a valid label key",
            ),
            (
                LabelSelector {
                    match_labels: Some([("team".to_string(), "-a".to_string())].into()),
                    ..Default::default()
                },
                "not a valid label value",
            ),
        ];
        for (sel, want) in cases {
            let errs = Selector::new(&sel).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{sel:?}: {errs:?}");
        }
    }

    #[test]
    fn label_keys() {
        for (k, ok) in [
            ("team", true),
            ("kubernetes.io/metadata.name", true),
            ("example.com/team", true),
            ("/team", false),
            ("a/b/c", false),
            ("", false),
            ("Example.com/team", false),
            ("team_", false),
        ] {
            assert_eq!(valid_label_key(k), ok, "{k:?}");
        }
    }
}
