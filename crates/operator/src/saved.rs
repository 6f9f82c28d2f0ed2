//! Saved plans, as `terraform plan -out`: `plan --out FILE` writes the plan with a
//! fingerprint of the config and of every observation it was made from; `apply FILE`
//! applies exactly that plan, and refuses when the config or any target it writes to has
//! changed since. What was reviewed is what gets applied.

use std::collections::BTreeMap;

use nodeport_firewall_model::{Observation, Plan};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `kind` of a saved plan file.
pub const KIND: &str = "NodePortFirewallSavedPlan";
/// The version of the saved plan format (docs/plan-format.md). A file of another version is
/// refused.
pub const VERSION: u32 = 1;

/// A saved plan file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedPlan {
    pub kind: String,
    pub version: u32,
    /// `sha256:<hex>` of the config file's bytes.
    pub config: String,
    /// `sha256:<hex>` of each target's observation, by target (`provider:id`).
    pub observations: BTreeMap<String, String>,
    pub plan: Plan,
}

impl SavedPlan {
    pub fn new(config_bytes: &[u8], observations: BTreeMap<String, String>, plan: Plan) -> Self {
        SavedPlan {
            kind: KIND.into(),
            version: VERSION,
            config: digest(config_bytes),
            observations,
            plan,
        }
    }

    /// Reads a saved plan; says what is wrong with a file that is not one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a saved plan (JSON): {e}"))?;
        if value["kind"] != KIND {
            return Err(format!(
                "not a saved plan: kind is {}, not {KIND} (write one with `plan --out FILE`)",
                value["kind"]
            ));
        }
        if value["version"] != VERSION {
            return Err(format!(
                "saved plan version {} is not supported (this is version {VERSION}): plan again",
                value["version"]
            ));
        }
        serde_json::from_value(value).map_err(|e| format!("not a valid saved plan: {e}"))
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The fingerprint of what was observed on a target: its rules (in a canonical order, so
/// that the same rules listed in another order are the same) and its limits.
pub fn fingerprint(observation: &Observation) -> String {
    let mut rules: Vec<String> = observation
        .rules
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_default())
        .collect();
    rules.sort();
    let limits = serde_json::to_string(&observation.limits).unwrap_or_default();
    digest(format!("{}\n{limits}", rules.join("\n")).as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refuses_what_is_not_a_saved_plan_of_this_version() {
        let cases = [
            ("{", "not a saved plan (JSON)"),
            ("{\"kind\": \"Plan\"}", "kind is \"Plan\""),
            (
                "{\"kind\": \"NodePortFirewallSavedPlan\", \"version\": 9}",
                "version 9 is not supported",
            ),
            (
                "{\"kind\": \"NodePortFirewallSavedPlan\", \"version\": 1}",
                "not a valid saved plan",
            ),
        ];
        for (text, want) in cases {
            let e = SavedPlan::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_order_of_observed_rules_does_not_matter() {
        let a: Observation = serde_json::from_str(
            r#"{"rules": [
                {"id": "r1", "scope": null, "family": "ipv4", "protocol": "tcp", "ports": [{"from": 1, "to": 1}], "sources": ["10.0.0.0/8"], "services": [], "pools": [], "owned": true},
                {"id": "r2", "scope": null, "family": "ipv4", "protocol": "tcp", "ports": [{"from": 2, "to": 2}], "sources": ["10.0.0.0/8"], "services": [], "pools": [], "owned": false}
            ], "limits": {}}"#,
        )
        .unwrap();
        let mut b = a.clone();
        b.rules.reverse();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.rules.pop();
        assert_ne!(fingerprint(&a), fingerprint(&b));
    }
}
