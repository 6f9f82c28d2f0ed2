//! The shipped IAM policy (`deploy/iam/aws-policy.json`) and the SCP example of
//! docs/aws.md, evaluated against the requests that matter, with IAM's documented rules for
//! the condition operators they use: `ForAllValues` is true when the request has no value
//! for the key, `ForAnyValue` is false then, a negated operator is true for a missing key,
//! keys within one operator and operators within one condition must all hold. Also: every
//! EC2 and Service Quotas call the provider makes is allowed by the policy.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn policy() -> Value {
    serde_json::from_str(&read("deploy/iam/aws-policy.json")).expect("aws-policy.json is JSON")
}

/// The first JSON block after `heading` in docs/aws.md.
fn documented(heading: &str) -> Value {
    let doc = read("docs/aws.md");
    let block = doc
        .split(heading)
        .nth(1)
        .and_then(|s| s.split("```json\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap_or_else(|| panic!("docs/aws.md: no JSON block after {heading:?}"));
    serde_json::from_str(block).unwrap_or_else(|e| panic!("{heading}: {e}"))
}

const RULE: &str = "arn:aws:ec2:eu-west-1:111122223333:security-group-rule/sgr-0abc";
const GROUP: &str = "arn:aws:ec2:eu-west-1:111122223333:security-group/sg-0abc";
const OPERATOR: &str = "arn:aws:iam::111122223333:role/nodeport-firewall";
const SOMEONE: &str = "arn:aws:iam::111122223333:role/developer";
const CLUSTER: &str = "CLUSTER";

/// One request as IAM sees it: its action, resource, principal and request context.
#[derive(Debug, Clone)]
struct Request {
    action: &'static str,
    resource: &'static str,
    principal: &'static str,
    /// `aws:TagKeys`; `None` when the request names no tags at all.
    tag_keys: Option<Vec<&'static str>>,
    request_tags: BTreeMap<&'static str, &'static str>,
    resource_tags: BTreeMap<&'static str, &'static str>,
    create_action: Option<&'static str>,
}

fn request(action: &'static str, principal: &'static str) -> Request {
    Request {
        action,
        resource: RULE,
        principal,
        tag_keys: None,
        request_tags: BTreeMap::new(),
        resource_tags: BTreeMap::new(),
        create_action: None,
    }
}

impl Request {
    fn on_our_rule(mut self) -> Self {
        self.resource_tags = [
            ("nodeport-firewall.io/managed-by", "nodeport-firewall"),
            ("nodeport-firewall.io/cluster", CLUSTER),
        ]
        .into();
        self
    }

    fn keys(mut self, keys: &[&'static str]) -> Self {
        self.tag_keys = Some(keys.to_vec());
        self.request_tags = keys.iter().map(|k| (*k, "")).collect();
        self
    }

    fn values(&self, key: &str) -> Option<Vec<String>> {
        let one = |v: Option<&&str>| v.map(|v| vec![v.to_string()]);
        if key == "aws:TagKeys" {
            return self
                .tag_keys
                .as_ref()
                .map(|k| k.iter().map(|s| s.to_string()).collect());
        }
        if let Some(k) = key.strip_prefix("aws:RequestTag/") {
            return one(self.request_tags.get(k));
        }
        if let Some(k) = key.strip_prefix("aws:ResourceTag/") {
            return one(self.resource_tags.get(k));
        }
        match key {
            "aws:PrincipalArn" => Some(vec![self.principal.to_string()]),
            "ec2:CreateAction" => self.create_action.map(|a| vec![a.to_string()]),
            other => panic!("the evaluator does not know condition key {other}"),
        }
    }
}

/// IAM's wildcard match: `*` any run, `?` one character (case-sensitive).
fn like(pattern: &str, value: &str) -> bool {
    fn go(p: &[char], v: &[char]) -> bool {
        match (p.first(), v.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], v) || (!v.is_empty() && go(p, &v[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &v[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &v[1..]),
            _ => false,
        }
    }
    go(
        &pattern.chars().collect::<Vec<_>>(),
        &value.chars().collect::<Vec<_>>(),
    )
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        other => panic!("not a string or list: {other}"),
    }
}

fn condition_holds(operator: &str, key: &str, wanted: &[String], req: &Request) -> bool {
    let present = req.values(key);
    if operator == "Null" {
        let absent = present.as_ref().is_none_or(Vec::is_empty);
        return match wanted {
            [w] if w == "true" => absent,
            [w] if w == "false" => !absent,
            _ => panic!("Null takes \"true\" or \"false\""),
        };
    }
    let (set, base) = match operator.split_once(':') {
        Some((set, base)) => (Some(set), base),
        None => (None, operator),
    };
    let (negated, base) = match base {
        "StringNotEquals" => (true, "StringEquals"),
        "StringNotLike" => (true, "StringLike"),
        "ArnNotEquals" => (true, "ArnEquals"),
        "ArnNotLike" => (true, "ArnLike"),
        b => (false, b),
    };
    let matches_one = |value: &str| {
        wanted.iter().any(|w| match base {
            "StringEquals" | "ArnEquals" => w == value,
            "StringLike" | "ArnLike" => like(w, value),
            other => panic!("the evaluator does not know operator {other}"),
        }) != negated
    };
    let values = present.unwrap_or_default();
    match set {
        Some("ForAllValues") => values.iter().all(|v| matches_one(v)),
        Some("ForAnyValue") => values.iter().any(|v| matches_one(v)),
        Some(other) => panic!("unknown set operator {other}"),
        // A single-valued key: missing is a mismatch, except for negated operators.
        None if values.is_empty() => negated,
        None => values.iter().any(|v| matches_one(v)),
    }
}

fn statement_applies(s: &Value, req: &Request) -> bool {
    let actions = strings(&s["Action"]);
    let resources = strings(&s["Resource"]);
    if !actions.iter().any(|a| like(a, req.action))
        || !resources.iter().any(|r| like(r, req.resource))
    {
        return false;
    }
    let Some(conditions) = s.get("Condition").and_then(Value::as_object) else {
        return true;
    };
    conditions.iter().all(|(op, keys)| {
        keys.as_object()
            .unwrap()
            .iter()
            .all(|(key, wanted)| condition_holds(op, key, &strings(wanted), req))
    })
}

fn statements(policy: &Value) -> &Vec<Value> {
    policy["Statement"].as_array().expect("Statement is a list")
}

/// Whether `policy` (identity policy: an Allow and no Deny) allows `req`.
fn allows(policy: &Value, req: &Request) -> bool {
    let applying: Vec<&Value> = statements(policy)
        .iter()
        .filter(|s| statement_applies(s, req))
        .collect();
    applying.iter().any(|s| s["Effect"] == "Allow")
        && !applying.iter().any(|s| s["Effect"] == "Deny")
}

/// Whether a Deny of `policy` (an SCP) refuses `req`.
fn denies(policy: &Value, req: &Request) -> bool {
    statements(policy)
        .iter()
        .any(|s| s["Effect"] == "Deny" && statement_applies(s, req))
}

#[test]
fn the_policy_lets_the_operator_delete_only_its_list_tags() {
    let p = policy();
    let op = || request("ec2:DeleteTags", OPERATOR).on_our_rule();
    for (req, allowed, why) in [
        (
            op(),
            false,
            "no tag keys: DeleteTags would delete every tag",
        ),
        (op().keys(&[]), false, "an empty key list is no key either"),
        (
            op().keys(&["nodeport-firewall.io/services"]),
            true,
            "a list tag",
        ),
        (
            op().keys(&[
                "nodeport-firewall.io/services.3",
                "nodeport-firewall.io/pools.1",
            ]),
            true,
            "list continuations",
        ),
        (
            op().keys(&["nodeport-firewall.io/cluster"]),
            false,
            "an ownership tag",
        ),
        (
            op().keys(&["nodeport-firewall.io/services", "Name"]),
            false,
            "a foreign tag among ours",
        ),
        (
            request("ec2:DeleteTags", OPERATOR).keys(&["nodeport-firewall.io/services"]),
            false,
            "a rule not ours",
        ),
    ] {
        assert_eq!(allows(&p, &req), allowed, "{why}: {req:?}");
    }
}

#[test]
fn every_for_all_values_on_tag_keys_has_a_null_guard() {
    let p = policy();
    for s in statements(&p) {
        let Some(c) = s.get("Condition").and_then(Value::as_object) else {
            continue;
        };
        let guarded = c
            .get("Null")
            .and_then(|n| n.get("aws:TagKeys"))
            .is_some_and(|v| v == "false");
        for (op, keys) in c {
            if op.starts_with("ForAllValues:") && keys.get("aws:TagKeys").is_some() {
                assert!(
                    guarded,
                    "statement {} needs \"Null\": {{\"aws:TagKeys\": \"false\"}}",
                    s["Sid"]
                );
            }
        }
    }
}

#[test]
fn the_policy_writes_only_rules_of_ours() {
    let p = policy();
    let mut create = request("ec2:AuthorizeSecurityGroupIngress", OPERATOR);
    create.request_tags = [
        ("nodeport-firewall.io/managed-by", "nodeport-firewall"),
        ("nodeport-firewall.io/cluster", CLUSTER),
    ]
    .into();
    assert!(allows(&p, &create), "create a tagged rule");
    assert!(
        !allows(&p, &request("ec2:AuthorizeSecurityGroupIngress", OPERATOR)),
        "an untagged rule"
    );
    let mut on_create = request("ec2:CreateTags", OPERATOR).keys(&["nodeport-firewall.io/cluster"]);
    on_create.create_action = Some("AuthorizeSecurityGroupIngress");
    assert!(allows(&p, &on_create), "tags at creation");
    for action in [
        "ec2:RevokeSecurityGroupIngress",
        "ec2:ModifySecurityGroupRules",
    ] {
        assert!(
            allows(&p, &request(action, OPERATOR).on_our_rule()),
            "{action} on ours"
        );
        assert!(
            !allows(&p, &request(action, OPERATOR)),
            "{action} on a foreign rule"
        );
        let mut group = request(action, OPERATOR);
        group.resource = GROUP;
        assert!(allows(&p, &group), "{action} on the group");
    }
}

/// Every operation the provider calls (`self.call("Op", ...)` for EC2 and
/// `self.quota_call("Op", ...)` for Service Quotas, in crates/aws/src) is in an Allow
/// statement of the policy.
#[test]
fn the_policy_allows_every_call_the_provider_makes() {
    let p = policy();
    let allowed: Vec<String> = statements(&p)
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| strings(&s["Action"]))
        .collect();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut ops = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (call, service) in [(".call(\"", "ec2"), (".quota_call(\"", "servicequotas")] {
            for part in text.split(call).skip(1) {
                let op = part.split('"').next().unwrap();
                ops.insert(format!("{service}:{}", op.trim_start_matches("DryRun:")));
            }
        }
    }
    for op in [
        "ec2:DescribeNetworkInterfaces",
        "servicequotas:GetServiceQuota",
        "servicequotas:GetAWSDefaultServiceQuota",
    ] {
        assert!(ops.contains(op), "{op} not found in {ops:?}");
    }
    for op in &ops {
        assert!(
            allowed.contains(op),
            "{op} is not in deploy/iam/aws-policy.json"
        );
    }
}

#[test]
fn the_documented_policy_is_the_shipped_one() {
    assert_eq!(documented("### Least-privilege IAM policy"), policy());
}

/// The SCP of docs/aws.md: nobody but the operator's role sets or removes our tag keys,
/// nor strips every tag off a rule of ours; other tagging stays possible.
#[test]
fn the_documented_scp_protects_the_ownership_tags() {
    let scp = documented("### Protecting the ownership tags");
    let our_key = "nodeport-firewall.io/cluster";
    let mut on_create = request("ec2:CreateTags", SOMEONE).keys(&[our_key]);
    on_create.create_action = Some("AuthorizeSecurityGroupIngress");
    for (req, denied, why) in [
        (
            request("ec2:CreateTags", SOMEONE).keys(&[our_key]),
            true,
            "spoofing our tag",
        ),
        (
            request("ec2:CreateTags", SOMEONE).keys(&["Name", "nodeport-firewall.io/managed-by"]),
            true,
            "ours among others",
        ),
        (on_create, true, "our tags at creation"),
        (
            request("ec2:DeleteTags", SOMEONE)
                .on_our_rule()
                .keys(&[our_key]),
            true,
            "removing our tag",
        ),
        (
            request("ec2:DeleteTags", SOMEONE).on_our_rule(),
            true,
            "removing every tag of our rule",
        ),
        (
            request("ec2:CreateTags", SOMEONE).keys(&["Name"]),
            false,
            "other tags",
        ),
        (
            request("ec2:DeleteTags", SOMEONE),
            false,
            "untagging a foreign rule",
        ),
        (
            request("ec2:DeleteTags", SOMEONE)
                .on_our_rule()
                .keys(&["Name"]),
            false,
            "another tag of our rule",
        ),
        (
            request("ec2:CreateTags", OPERATOR).keys(&[our_key]),
            false,
            "the operator",
        ),
        (
            request("ec2:DeleteTags", OPERATOR)
                .on_our_rule()
                .keys(&["nodeport-firewall.io/services"]),
            false,
            "the operator",
        ),
    ] {
        assert_eq!(denies(&scp, &req), denied, "{why}: {req:?}");
    }
}
