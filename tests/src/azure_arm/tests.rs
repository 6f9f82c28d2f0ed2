//! The ARM test server's own checks: Deny rules accepted, priorities unique per
//! direction, `access` and `direction` validated, a written rule `Updating` until its
//! operation ends.

use super::*;

fn put(state: &Mutex<State>, name: &str, props: Value) -> (StatusCode, Value) {
    let nsg =
        "/subscriptions/s/resourcegroups/rg/providers/microsoft.network/networksecuritygroups/n";
    let body = serde_json::to_vec(&json!({"properties": props})).unwrap();
    let r = put_rule(
        state,
        nsg,
        nsg,
        name,
        &body,
        &|op, id| format!("http://x/{op}/{id}"),
        None,
    );
    let status = r.status();
    let bytes = futures_body(r);
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn futures_body(r: Reply) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async { r.into_body().collect().await.unwrap().to_bytes().to_vec() })
}

fn rule(access: &str, direction: &str, priority: i64) -> Value {
    json!({"protocol": "*", "sourcePortRange": "*", "sourceAddressPrefix": "*",
           "destinationAddressPrefix": "*", "destinationPortRange": "*",
           "access": access, "direction": direction, "priority": priority})
}

#[test]
fn denies_are_accepted_and_priorities_are_unique_per_direction() {
    let state = Mutex::new(State::default());
    state.lock().unwrap().nsgs.insert(
        "/subscriptions/s/resourcegroups/rg/providers/microsoft.network/networksecuritygroups/n"
            .into(),
        BTreeMap::new(),
    );
    state.lock().unwrap().limits = NsgLimits::default();
    let cases = [
        ("deny-in", rule("Deny", "Inbound", 3000), 201, None),
        (
            "allow-in",
            rule("Allow", "Inbound", 3000),
            400,
            Some("SecurityRuleConflict"),
        ),
        ("deny-out", rule("Deny", "Outbound", 3000), 201, None),
        ("deny-in", rule("Deny", "Inbound", 3001), 200, None),
        ("allow-in", rule("Allow", "Inbound", 3000), 201, None),
        (
            "blocked",
            rule("Block", "Inbound", 3002),
            400,
            Some("SecurityRuleInvalidAccess"),
        ),
        (
            "sideways",
            rule("Allow", "Sideways", 3003),
            400,
            Some("SecurityRuleInvalidDirection"),
        ),
    ];
    for (name, props, status, code) in cases {
        let (got, body) = put(&state, name, props);
        assert_eq!(got.as_u16(), status, "{name}: {body}");
        assert_eq!(body["error"]["code"].as_str(), code, "{name}: {body}");
        if status < 300 {
            assert_eq!(
                body["properties"]["provisioningState"], "Updating",
                "{name}"
            );
        }
    }
    let s = state.lock().unwrap();
    let rules = s.nsgs.values().next().unwrap();
    assert_eq!(rules["deny-in"]["properties"]["access"], "Deny");
    assert_eq!(rules["deny-in"]["properties"]["priority"], 3001);
}
