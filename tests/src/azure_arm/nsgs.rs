//! The NSG list of the ARM test server: `GET .../networkSecurityGroups` per subscription or
//! resource group, each NSG with its `securityRules` and the six `defaultSecurityRules`,
//! in pages linked by `nextLink`, as ARM answers it.

use std::sync::Mutex;

use serde_json::{Value, json};

use super::{API_VERSION, Reply, State, StatusCode, arm_error, fastish_hash, reply, rule_json};

/// `GET /subscriptions/<s>[/resourceGroups/<rg>]/providers/Microsoft.Network/networkSecurityGroups`:
/// the NSGs of the scope with their rules, in pages of `page_size` (`nextLink`).
pub(super) fn list(
    state: &Mutex<State>,
    base: &str,
    path: &str,
    lower: &str,
    query: &str,
) -> Reply {
    let scope = lower.trim_end_matches("/providers/microsoft.network/networksecuritygroups");
    let parts: Vec<&str> = scope.trim_matches('/').split('/').collect();
    let valid = matches!(parts.as_slice(), ["subscriptions", s] if !s.is_empty())
        || matches!(parts.as_slice(), ["subscriptions", s, "resourcegroups", rg] if !s.is_empty() && !rg.is_empty());
    if !valid {
        return arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        );
    }
    let prefix = if parts.len() == 2 {
        format!("{scope}/resourcegroups/")
    } else {
        format!("{scope}/providers/microsoft.network/networksecuritygroups/")
    };
    let skip: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("$skiptoken="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let s = state.lock().unwrap();
    let all: Vec<Value> = s
        .nsgs
        .iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .map(|(key, rules)| {
            let id = s.nsg_ids.get(key).cloned().unwrap_or_else(|| key.clone());
            nsg_json(&id, rules.values().cloned().collect())
        })
        .collect();
    let page: Vec<Value> = all.iter().skip(skip).take(s.page_size).cloned().collect();
    let mut body = json!({"value": page});
    if skip + s.page_size < all.len() {
        body["nextLink"] = json!(format!(
            "{base}{path}?api-version={API_VERSION}&$skiptoken={}",
            skip + s.page_size
        ));
    }
    reply(StatusCode::OK, body, &[])
}

/// An NSG as ARM returns it, with its rules and the six default rules.
fn nsg_json(id: &str, rules: Vec<Value>) -> Value {
    let name = id.rsplit('/').next().unwrap_or("");
    let default =
        |name: &str, priority: i64, direction: &str, access: &str, src: &str, dst: &str| {
            let mut r = rule_json(
                id,
                name,
                json!({"protocol": "*", "sourcePortRange": "*", "destinationPortRange": "*",
                   "sourceAddressPrefix": src, "destinationAddressPrefix": dst,
                   "access": access, "priority": priority, "direction": direction,
                   "description": "default rule"}),
            );
            r["id"] = json!(format!("{id}/defaultSecurityRules/{name}"));
            r["type"] = json!("Microsoft.Network/networkSecurityGroups/defaultSecurityRules");
            r
        };
    json!({
        "id": id,
        "name": name,
        "type": "Microsoft.Network/networkSecurityGroups",
        "location": "westeurope",
        "etag": format!("W/\"{:x}\"", fastish_hash(&format!("{rules:?}"))),
        "properties": {
            "securityRules": rules,
            "defaultSecurityRules": [
                default("AllowVnetInBound", 65000, "Inbound", "Allow", "VirtualNetwork", "VirtualNetwork"),
                default("AllowAzureLoadBalancerInBound", 65001, "Inbound", "Allow", "AzureLoadBalancer", "*"),
                default("DenyAllInBound", 65500, "Inbound", "Deny", "*", "*"),
                default("AllowVnetOutBound", 65000, "Outbound", "Allow", "VirtualNetwork", "VirtualNetwork"),
                default("AllowInternetOutBound", 65001, "Outbound", "Allow", "*", "Internet"),
                default("DenyAllOutBound", 65500, "Outbound", "Deny", "*", "*"),
            ],
            "resourceGuid": format!("{:016x}", fastish_hash(id)),
            "provisioningState": "Succeeded",
        },
    })
}
