//! An Azure Resource Manager stand-in for network security groups and their security rules,
//! plus an Entra ID token endpoint.
//!
//! It reproduces what the Azure provider depends on, with the real API's shapes (the
//! `azure_mgmt_network` models are the reference):
//! - `GET .../networkSecurityGroups/<nsg>/securityRules` lists rules in pages (`nextLink`);
//! - `PUT .../securityRules/<name>` answers 201 (200 on update) with an
//!   `Azure-AsyncOperation` URL that reports `InProgress`, then `Succeeded`;
//! - `DELETE .../securityRules/<name>` answers 202 with a `Location` URL that answers 202
//!   while running, then 204; the rule disappears when the operation completes;
//! - a rule is `provisioningState: Updating` (`Deleting`) while its operation runs, and
//!   `Succeeded` when it is done; a failed operation (`Fault::FailOperation`) leaves the
//!   rule `Failed`, its properties as the PUT wrote them (a DELETE leaves it in place), as
//!   ARM does, until another PUT restores it;
//! - `GET .../networkSecurityGroups` per subscription or resource group lists the NSGs,
//!   each with its `securityRules` and `defaultSecurityRules`, in pages (`nextLink`);
//! - `access` must be `Allow` or `Deny` and `direction` `Inbound` or `Outbound`; a
//!   priority held by another rule of the same direction gives 400 `SecurityRuleConflict`;
//! - IPv4 mixed with IPv6, bad names, priorities or descriptions, both singular and plural
//!   fields, and exceeded NSG limits (rules, source and destination prefixes) are refused;
//! - 429 with `Retry-After` can be injected, with or without
//!   `RetryableErrorDueToAnotherOperation`, and 409 `AnotherOperationInProgress`; latency
//!   can be injected per write;
//! - every ARM request needs `Authorization: Bearer <token>`: [`ArmServer::STATIC_TOKEN`]
//!   or one issued by `POST /<tenant>/oauth2/v2.0/token` (client-assertion flow), whose
//!   assertions are recorded.
//!
//! The server runs on its own thread, so sync and async tests can use it alike.

mod nsgs;

use crate::faults::{Fault, Faults};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const API_VERSION: &str = "2024-03-01";
/// The VMSS network interface operations are on an older API version in the spec.
const VMSS_API_VERSION: &str = "2018-10-01";
const RULE_TYPE: &str = "Microsoft.Network/networkSecurityGroups/securityRules";

/// NSG limits enforced by the server (Azure's defaults).
#[derive(Debug, Clone, Copy)]
pub struct NsgLimits {
    pub rules: usize,
    pub source_prefixes: usize,
    pub destination_prefixes: usize,
}

impl Default for NsgLimits {
    fn default() -> Self {
        NsgLimits {
            rules: 1000,
            source_prefixes: 4000,
            destination_prefixes: 4000,
        }
    }
}

#[derive(Debug)]
struct Operation {
    polls_left: u32,
    /// The rule (NSG path, lower-cased name) whose state the operation ends.
    rule: Option<(String, String)>,
    /// A delete: the rule goes when the operation succeeds.
    delete: bool,
    /// How the operation ends instead of succeeding: (code, message).
    fail: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct State {
    /// Lower-cased NSG path -> rules by lower-cased name (ARM names are case-insensitive).
    nsgs: BTreeMap<String, BTreeMap<String, Value>>,
    /// Lower-cased NSG path -> its id as first spelled.
    nsg_ids: BTreeMap<String, String>,
    operations: HashMap<String, Operation>,
    next_op: u64,
    tokens: Vec<String>,
    assertions: Vec<String>,
    token_lifetime: u64,
    faults: Faults,
    steal_priorities: usize,
    write_latency: Duration,
    polls_per_operation: u32,
    page_size: usize,
    limits: NsgLimits,
    log: Vec<(String, String)>,
    /// Writes being answered now, per NSG, and the most ever seen at once.
    in_flight: HashMap<String, usize>,
    max_in_flight: usize,
    /// Lower-cased VMSS path -> its NICs.
    vmss_nics: BTreeMap<String, Vec<Value>>,
    /// Lower-cased subnet id -> (id, address prefix, NSG id).
    subnets: BTreeMap<String, (String, String, Option<String>)>,
}

/// A running ARM test server.
#[derive(Debug, Clone)]
pub struct ArmServer {
    /// `http://127.0.0.1:<port>`: the ARM endpoint and the authority host.
    pub url: String,
    state: Arc<Mutex<State>>,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value, headers: &[(&str, String)]) -> Reply {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    b.body(Full::new(Bytes::from(text))).unwrap()
}

fn arm_error(status: StatusCode, code: &str, message: &str) -> Reply {
    reply(
        status,
        json!({"error": {"code": code, "message": message}}),
        &[("x-ms-error-code", code.to_string())],
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// The prefixes of a rule's `<field>AddressPrefix(es)`.
fn prefixes(p: &Value, field: &str) -> Vec<String> {
    let mut out: Vec<String> = p
        .get(format!("{field}AddressPrefixes"))
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if let Some(s) = p
        .get(format!("{field}AddressPrefix"))
        .and_then(|v| v.as_str())
    {
        out.push(s.to_string());
    }
    out
}

/// The IP family of a prefix: Some(true) for IPv6, None for tags like `*` or `Internet`.
fn family(prefix: &str) -> Option<bool> {
    let addr = prefix.split('/').next().unwrap_or(prefix);
    addr.parse::<IpAddr>().ok().map(|a| a.is_ipv6())
}

fn has(p: &Value, k: &str) -> bool {
    match p.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// Checks a rule's properties as ARM does; returns (code, message) when refused.
fn validate(name: &str, p: &Value) -> Result<(), (&'static str, String)> {
    if name.is_empty() || name.len() > 80 {
        return Err((
            "InvalidResourceName",
            format!("rule name {name:?} is invalid"),
        ));
    }
    if p.get("description")
        .and_then(|d| d.as_str())
        .is_some_and(|d| d.chars().count() > 140)
    {
        return Err((
            "SecurityRuleInvalidDescription",
            "description longer than 140 characters".into(),
        ));
    }
    let priority = p.get("priority").and_then(|v| v.as_i64()).unwrap_or(0);
    if !(100..=4096).contains(&priority) {
        return Err((
            "SecurityRuleInvalidPriority",
            format!("priority {priority} is not within 100-4096"),
        ));
    }
    let access = p.get("access").and_then(|v| v.as_str()).unwrap_or("");
    if !["Allow", "Deny"].contains(&access) {
        return Err((
            "SecurityRuleInvalidAccess",
            format!("access {access:?} is invalid: Allow or Deny"),
        ));
    }
    let direction = p.get("direction").and_then(|v| v.as_str()).unwrap_or("");
    if !["Inbound", "Outbound"].contains(&direction) {
        return Err((
            "SecurityRuleInvalidDirection",
            format!("direction {direction:?} is invalid: Inbound or Outbound"),
        ));
    }
    let protocol = p.get("protocol").and_then(|v| v.as_str()).unwrap_or("");
    if !["Tcp", "Udp", "Icmp", "Esp", "Ah", "*"].contains(&protocol) {
        return Err((
            "SecurityRuleInvalidProtocol",
            format!("protocol {protocol:?} is invalid"),
        ));
    }
    for (one, many) in [
        ("sourceAddressPrefix", "sourceAddressPrefixes"),
        ("destinationAddressPrefix", "destinationAddressPrefixes"),
        ("sourcePortRange", "sourcePortRanges"),
        ("destinationPortRange", "destinationPortRanges"),
    ] {
        if has(p, one) && has(p, many) {
            return Err((
                "SecurityRuleParameterContainsBothSingularAndPluralProperties",
                format!("{one} and {many} are both set"),
            ));
        }
        let destination_asg =
            one.starts_with("destinationAddress") && has(p, "destinationApplicationSecurityGroups");
        if !(has(p, one) || has(p, many) || destination_asg) {
            return Err((
                "InvalidRequestFormat",
                format!("{one} or {many} is required"),
            ));
        }
    }
    let families: Vec<bool> = prefixes(p, "source")
        .iter()
        .chain(prefixes(p, "destination").iter())
        .filter_map(|s| family(s))
        .collect();
    if families.windows(2).any(|w| w[0] != w[1]) {
        return Err((
            "ResourceCannotContainAddressPrefixesFromDifferentAddressFamilies",
            "a security rule cannot mix IPv4 and IPv6 prefixes".into(),
        ));
    }
    for p in prefixes(p, "source")
        .iter()
        .chain(prefixes(p, "destination").iter())
    {
        if p.contains('/') && family(p).is_none() {
            return Err((
                "InvalidAddressPrefixFormat",
                format!("{p:?} is not a prefix"),
            ));
        }
    }
    Ok(())
}

impl ArmServer {
    /// A token every ARM request may use.
    pub const STATIC_TOKEN: &'static str = "static-test-token";

    /// Starts a server on 127.0.0.1 on its own thread.
    pub fn start() -> ArmServer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", std_listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            token_lifetime: 3600,
            polls_per_operation: 1,
            page_size: 50,
            tokens: vec![Self::STATIC_TOKEN.to_string()],
            ..State::default()
        }));
        let server = ArmServer {
            url: url.clone(),
            state: state.clone(),
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    let url = url.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let state = state.clone();
                            let url = url.clone();
                            async move { Ok::<_, Infallible>(handle(&state, &url, req).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        server
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// The resource id of an NSG.
    pub fn nsg_id(subscription: &str, resource_group: &str, name: &str) -> String {
        format!(
            "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network/networkSecurityGroups/{name}"
        )
    }

    /// Creates an empty NSG; returns its id.
    pub fn create_nsg(&self, subscription: &str, resource_group: &str, name: &str) -> String {
        let id = Self::nsg_id(subscription, resource_group, name);
        self.with(|s| {
            s.nsgs.entry(id.to_ascii_lowercase()).or_default();
            s.nsg_ids
                .entry(id.to_ascii_lowercase())
                .or_insert_with(|| id.clone());
        });
        id
    }

    /// Sets a rule's `provisioningState` (`Failed`, `Updating`...) as an operation ARM
    /// never finished would leave it.
    pub fn set_provisioning_state(&self, nsg_id: &str, name: &str, state: &str) {
        self.with(|s| {
            if let Some(r) = s
                .nsgs
                .get_mut(&nsg_id.to_ascii_lowercase())
                .and_then(|rules| rules.get_mut(&name.to_ascii_lowercase()))
            {
                r["properties"]["provisioningState"] = json!(state);
            }
        });
    }

    /// The next `n` writes (PUT or DELETE) answer 409 `AnotherOperationInProgress`, as ARM
    /// does while another operation holds the NSG or a resource it depends on, with
    /// `Retry-After: <secs>`.
    pub fn busy_writes(&self, n: usize, retry_after_secs: u64) {
        self.inject(
            "write",
            n,
            Fault::Status {
                status: 409,
                code: Some("AnotherOperationInProgress".to_string()),
                retry_after: Some(retry_after_secs),
            },
        );
    }

    /// The long-running operations of the next `n` rule PUTs fail with `code`: each rule
    /// is left `provisioningState: Failed`.
    pub fn fail_next_put_operations(&self, n: usize, code: &str) {
        self.inject(
            "PutSecurityRule",
            n,
            Fault::FailOperation {
                code: code.to_string(),
                message: "The operation failed inside the network resource provider.".into(),
            },
        );
    }

    /// Writes a rule directly, as another tool would, bypassing every check.
    /// `properties` is the ARM `properties` object.
    pub fn seed_rule(&self, nsg_id: &str, name: &str, properties: Value) {
        let rule = rule_json(nsg_id, name, properties);
        self.with(|s| {
            s.nsg_ids
                .entry(nsg_id.to_ascii_lowercase())
                .or_insert_with(|| nsg_id.to_string());
            s.nsgs
                .entry(nsg_id.to_ascii_lowercase())
                .or_default()
                .insert(name.to_ascii_lowercase(), rule);
        });
    }

    /// The rules of an NSG as ARM would return them, by name.
    pub fn rules(&self, nsg_id: &str) -> Vec<Value> {
        self.with(|s| {
            s.nsgs
                .get(&nsg_id.to_ascii_lowercase())
                .map(|r| r.values().cloned().collect())
                .unwrap_or_default()
        })
    }

    /// The next `n` writes (PUT or DELETE) answer 429 with `Retry-After: <secs>` and the
    /// given error code.
    pub fn throttle_writes(&self, n: usize, code: Option<&str>, retry_after_secs: u64) {
        self.inject(
            "write",
            n,
            Fault::Status {
                status: 429,
                code: Some(code.unwrap_or("TooManyRequests").to_string()),
                retry_after: Some(retry_after_secs),
            },
        );
    }

    /// Arms `fault` for the next `times` requests of `operation` (`PutSecurityRule`,
    /// `DeleteSecurityRule`, `write` for either, or `*`): the fault-injection API every test
    /// server shares ([`crate::faults`]). Status faults are answered as ARM errors.
    pub fn inject(&self, operation: &str, times: usize, fault: Fault) {
        self.with(|s| s.faults.inject(operation, times, fault));
    }

    /// The next `n` rule PUTs find their priority just taken by another writer: the server
    /// inserts a foreign rule at that priority and answers 400 `SecurityRuleConflict`.
    pub fn steal_next_priorities(&self, n: usize) {
        self.with(|s| s.steal_priorities += n);
    }

    /// Latency added to every write (PUT or DELETE) before it answers.
    pub fn set_write_latency(&self, latency: Duration) {
        self.with(|s| s.write_latency = latency);
    }

    /// How many polls of an operation answer "in progress" before it completes.
    pub fn set_polls_per_operation(&self, n: u32) {
        self.with(|s| s.polls_per_operation = n);
    }

    /// Lifetime of issued access tokens, in seconds.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.with(|s| s.token_lifetime = secs);
    }

    pub fn set_page_size(&self, n: usize) {
        self.with(|s| s.page_size = n.max(1));
    }

    pub fn set_limits(&self, limits: NsgLimits) {
        self.with(|s| s.limits = limits);
    }

    /// The client assertions presented to the token endpoint, in order.
    pub fn assertions(&self) -> Vec<String> {
        self.with(|s| s.assertions.clone())
    }

    /// The most writes (PUT or DELETE) one NSG was answering at the same time.
    pub fn max_concurrent_writes(&self) -> usize {
        self.with(|s| s.max_in_flight)
    }

    /// Requests received, as (method, path).
    pub fn log(&self) -> Vec<(String, String)> {
        self.with(|s| s.log.clone())
    }

    /// Requests of `method` whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.with(|s| {
            s.log
                .iter()
                .filter(|(m, p)| m == method && p.contains(part))
                .count()
        })
    }

    /// A subnet id.
    pub fn subnet_id(subscription: &str, resource_group: &str, vnet: &str, name: &str) -> String {
        format!(
            "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{name}"
        )
    }

    /// Creates a subnet with one address prefix and optionally an NSG; its IP
    /// configurations are those of the NICs added with it.
    pub fn add_subnet(&self, id: &str, prefix: &str, nsg: Option<&str>) {
        self.with(|s| {
            s.subnets.insert(
                id.to_ascii_lowercase(),
                (id.to_string(), prefix.to_string(), nsg.map(str::to_string)),
            );
        });
    }

    /// Adds the NIC of VMSS instance `index`, with its primary IP configuration in
    /// `subnet`, optionally its own NSG and application security groups.
    #[allow(clippy::too_many_arguments)]
    pub fn add_vmss_nic(
        &self,
        subscription: &str,
        resource_group: &str,
        vmss: &str,
        index: u32,
        ip: &str,
        subnet: &str,
        nsg: Option<&str>,
        asgs: &[&str],
    ) {
        let vmss_path = format!(
            "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}"
        );
        let nic_id = format!("{vmss_path}/virtualMachines/{index}/networkInterfaces/{vmss}");
        let mut props = json!({
            "primary": true,
            "ipConfigurations": [{
                "id": format!("{nic_id}/ipConfigurations/ipconfig1"),
                "name": "ipconfig1",
                "properties": {
                    "primary": true,
                    "privateIPAddress": ip,
                    "privateIPAllocationMethod": "Dynamic",
                    "subnet": {"id": subnet},
                    "applicationSecurityGroups": asgs.iter().map(|a| json!({"id": a})).collect::<Vec<_>>(),
                    "provisioningState": "Succeeded",
                },
            }],
            "provisioningState": "Succeeded",
        });
        if let Some(n) = nsg {
            props["networkSecurityGroup"] = json!({"id": n});
        }
        let nic = json!({"id": nic_id, "name": vmss, "type": "Microsoft.Network/networkInterfaces", "properties": props});
        self.with(|s| {
            s.vmss_nics
                .entry(vmss_path.to_ascii_lowercase())
                .or_default()
                .push(nic);
        });
    }

    pub fn clear_log(&self) {
        self.with(|s| s.log.clear());
    }
}

fn rule_json(nsg_id: &str, name: &str, mut properties: Value) -> Value {
    if let Some(o) = properties.as_object_mut() {
        o.insert("provisioningState".into(), json!("Succeeded"));
        o.entry("sourcePortRange").or_insert(json!("*"));
        o.entry("access").or_insert(json!("Allow"));
        o.entry("direction").or_insert(json!("Inbound"));
    }
    json!({
        "id": format!("{nsg_id}/securityRules/{name}"),
        "name": name,
        "etag": format!("W/\"{:x}\"", fastish_hash(&properties.to_string())),
        "type": RULE_TYPE,
        "properties": properties,
    })
}

fn fastish_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

async fn handle(state: &Mutex<State>, base: &str, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    state
        .lock()
        .unwrap()
        .log
        .push((method.to_string(), path.clone()));

    // Entra ID token endpoint: /<tenant>/oauth2/v2.0/token
    if method == Method::POST && path.ends_with("/oauth2/v2.0/token") {
        let f = form(&String::from_utf8_lossy(&body));
        let (Some(assertion), Some(_client)) = (f.get("client_assertion"), f.get("client_id"))
        else {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "client_assertion and client_id are required",
            );
        };
        let mut s = state.lock().unwrap();
        s.assertions.push(assertion.clone());
        let token = format!("issued-{}", s.tokens.len());
        s.tokens.push(token.clone());
        let life = s.token_lifetime;
        return reply(
            StatusCode::OK,
            json!({"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": token}),
            &[],
        );
    }

    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    if token.is_empty() || !state.lock().unwrap().tokens.iter().any(|t| t == token) {
        return arm_error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        );
    }
    let lower = path.to_ascii_lowercase();
    let vmss_route =
        lower.contains("/virtualmachinescalesets/") && lower.ends_with("/networkinterfaces");
    let want_version = if vmss_route {
        VMSS_API_VERSION
    } else {
        API_VERSION
    };
    if !query.contains(&format!("api-version={want_version}")) {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            &format!("The api-version query parameter (?api-version={want_version}) is required."),
        );
    }
    if method == Method::GET && vmss_route {
        let key = lower.trim_end_matches("/networkinterfaces").to_string();
        let s = state.lock().unwrap();
        return match s.vmss_nics.get(&key) {
            Some(nics) => reply(StatusCode::OK, json!({"value": nics}), &[]),
            None => arm_error(
                StatusCode::NOT_FOUND,
                "ResourceNotFound",
                &format!("The Resource '{path}' was not found."),
            ),
        };
    }
    if method == Method::GET && lower.contains("/virtualnetworks/") && lower.contains("/subnets/") {
        let s = state.lock().unwrap();
        let Some((id, prefix, nsg)) = s.subnets.get(&lower).cloned() else {
            return arm_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("subnet {path} not found"),
            );
        };
        // Every IP configuration in the subnet, as ARM lists them.
        let configs: Vec<Value> = s
            .vmss_nics
            .values()
            .flatten()
            .flat_map(|nic| {
                nic["properties"]["ipConfigurations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|c| {
                c["properties"]["subnet"]["id"]
                    .as_str()
                    .map(str::to_ascii_lowercase)
                    == Some(lower.clone())
            })
            .map(|c| json!({"id": c["id"]}))
            .collect();
        let mut props = json!({"addressPrefix": prefix, "ipConfigurations": configs, "provisioningState": "Succeeded"});
        if let Some(n) = nsg {
            props["networkSecurityGroup"] = json!({"id": n});
        }
        let name = id.rsplit('/').next().unwrap_or("").to_string();
        return reply(
            StatusCode::OK,
            json!({"id": id, "name": name, "type": "Microsoft.Network/virtualNetworks/subnets", "properties": props}),
            &[],
        );
    }

    // Operation status: .../locations/<loc>/operations/<id> or operationResults/<id>
    if method == Method::GET && lower.contains("/providers/microsoft.network/locations/") {
        let id = path.rsplit('/').next().unwrap_or("").to_string();
        let results = lower.contains("/operationresults/");
        let mut s = state.lock().unwrap();
        let Some(op) = s.operations.get_mut(&id) else {
            return arm_error(StatusCode::NOT_FOUND, "NotFound", "no such operation");
        };
        if op.polls_left > 0 {
            op.polls_left -= 1;
            return if results {
                reply(
                    StatusCode::ACCEPTED,
                    Value::Null,
                    &[
                        ("location", format!("{base}{path}?{query}")),
                        ("retry-after", "0".into()),
                    ],
                )
            } else {
                reply(
                    StatusCode::OK,
                    json!({"status": "InProgress"}),
                    &[("retry-after", "0".into())],
                )
            };
        }
        let (rule, delete, fail) = (op.rule.take(), op.delete, op.fail.clone());
        if let Some((nsg, name)) = rule
            && let Some(rules) = s.nsgs.get_mut(&nsg)
        {
            match (&fail, delete) {
                (None, true) => {
                    rules.remove(&name);
                }
                (fail, _) => {
                    if let Some(r) = rules.get_mut(&name) {
                        let state = if fail.is_some() {
                            "Failed"
                        } else {
                            "Succeeded"
                        };
                        r["properties"]["provisioningState"] = json!(state);
                    }
                }
            }
        }
        return match (fail, results) {
            (None, true) => reply(StatusCode::NO_CONTENT, Value::Null, &[]),
            (None, false) => reply(StatusCode::OK, json!({"status": "Succeeded"}), &[]),
            (Some((code, message)), true) => arm_error(StatusCode::BAD_REQUEST, &code, &message),
            (Some((code, message)), false) => reply(
                StatusCode::OK,
                json!({"status": "Failed", "error": {"code": code, "message": message}}),
                &[],
            ),
        };
    }

    if method == Method::GET
        && lower.ends_with("/providers/microsoft.network/networksecuritygroups")
    {
        return nsgs::list(state, base, &path, &lower, &query);
    }

    let Some(at) = lower.find("/securityrules") else {
        return arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        );
    };
    let nsg_path = lower[..at].to_string();
    let nsg_id = path[..at].to_string();
    let rest = &path[at + "/securityRules".len()..];
    let name = rest.trim_start_matches('/').to_string();
    let sub_loc = |op: &str, id: &str| {
        let sub = path.split('/').nth(2).unwrap_or("");
        format!(
            "{base}/subscriptions/{sub}/providers/Microsoft.Network/locations/westeurope/{op}/{id}?api-version={API_VERSION}"
        )
    };

    if !state.lock().unwrap().nsgs.contains_key(&nsg_path) {
        return arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("The Resource '{nsg_id}' was not found."),
        );
    }

    match (method.clone(), name.is_empty()) {
        (Method::GET, true) => {
            let skip: usize = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("$skiptoken="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let s = state.lock().unwrap();
            let rules: Vec<Value> = s.nsgs[&nsg_path].values().cloned().collect();
            let page: Vec<Value> = rules.iter().skip(skip).take(s.page_size).cloned().collect();
            let mut body = json!({"value": page});
            if skip + s.page_size < rules.len() {
                body["nextLink"] = json!(format!(
                    "{base}{path}?api-version={API_VERSION}&$skiptoken={}",
                    skip + s.page_size
                ));
            }
            reply(StatusCode::OK, body, &[])
        }
        (Method::GET, false) => {
            let s = state.lock().unwrap();
            match s.nsgs[&nsg_path].get(&name.to_ascii_lowercase()) {
                Some(r) => reply(StatusCode::OK, r.clone(), &[]),
                None => arm_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("rule {name} not found"),
                ),
            }
        }
        (Method::PUT, false) | (Method::DELETE, false) => {
            let operation = if method == Method::PUT {
                "PutSecurityRule"
            } else {
                "DeleteSecurityRule"
            };
            let (fault, latency) = {
                let s = state.lock().unwrap();
                (s.faults.take(&[operation, "write"]), s.write_latency)
            };
            let fail = match &fault {
                Some(Fault::FailOperation { code, message }) => {
                    Some((code.clone(), message.clone()))
                }
                _ => None,
            };
            if let Some(Fault::Status {
                status,
                code,
                retry_after,
            }) = fault
            {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                let code = code.unwrap_or_else(|| "TooManyRequests".to_string());
                let mut r = arm_error(status, &code, "Retry the operation later.");
                if let Some(after) = retry_after {
                    r.headers_mut()
                        .insert("retry-after", after.to_string().parse().unwrap());
                }
                return r;
            }
            {
                let mut s = state.lock().unwrap();
                let n = s.in_flight.entry(nsg_path.clone()).or_default();
                *n += 1;
                let n = *n;
                s.max_in_flight = s.max_in_flight.max(n);
            }
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            if let Some(n) = state.lock().unwrap().in_flight.get_mut(&nsg_path) {
                *n -= 1;
            }
            if method == Method::DELETE {
                let mut s = state.lock().unwrap();
                let key = name.to_ascii_lowercase();
                if !s.nsgs[&nsg_path].contains_key(&key) {
                    return reply(StatusCode::NO_CONTENT, Value::Null, &[]);
                }
                s.next_op += 1;
                let id = format!("del-{}", s.next_op);
                let polls = s.polls_per_operation;
                if let Some(r) = s.nsgs.get_mut(&nsg_path).and_then(|r| r.get_mut(&key)) {
                    r["properties"]["provisioningState"] = json!("Deleting");
                }
                s.operations.insert(
                    id.clone(),
                    Operation {
                        polls_left: polls,
                        rule: Some((nsg_path.clone(), key)),
                        delete: true,
                        fail,
                    },
                );
                let loc = sub_loc("operationResults", &id);
                return reply(
                    StatusCode::ACCEPTED,
                    Value::Null,
                    &[("location", loc), ("retry-after", "0".into())],
                );
            }
            put_rule(state, &nsg_path, &nsg_id, &name, &body, &sub_loc, fail)
        }
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported",
        ),
    }
}

fn put_rule(
    state: &Mutex<State>,
    nsg_path: &str,
    nsg_id: &str,
    name: &str,
    body: &[u8],
    sub_loc: &dyn Fn(&str, &str) -> String,
    fail: Option<(String, String)>,
) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                &e.to_string(),
            );
        }
    };
    let Some(props) = v.get("properties").cloned().filter(|p| p.is_object()) else {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "properties are required",
        );
    };
    if let Err((code, message)) = validate(name, &props) {
        return arm_error(StatusCode::BAD_REQUEST, code, &message);
    }
    let mut s = state.lock().unwrap();
    let key = name.to_ascii_lowercase();
    let priority = props["priority"].as_i64().unwrap_or(0);
    let direction = props
        .get("direction")
        .and_then(|d| d.as_str())
        .unwrap_or("Inbound")
        .to_string();
    if s.steal_priorities > 0 {
        s.steal_priorities -= 1;
        let thief = format!("someone-else-{priority}");
        let stolen = rule_json(
            nsg_id,
            &thief,
            json!({"protocol": "Tcp", "sourceAddressPrefix": "192.0.2.1", "destinationAddressPrefix": "*",
                   "destinationPortRange": "22", "priority": priority, "direction": direction,
                   "description": "written by another tool meanwhile"}),
        );
        s.nsgs
            .get_mut(nsg_path)
            .unwrap()
            .insert(thief.to_ascii_lowercase(), stolen);
    }
    let limits = s.limits;
    let rules = s.nsgs.get_mut(nsg_path).unwrap();
    let clash = rules.iter().find(|(k, r)| {
        **k != key
            && r["properties"]["priority"].as_i64() == Some(priority)
            && r["properties"]["direction"].as_str() == Some(direction.as_str())
    });
    if let Some((other, _)) = clash {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "SecurityRuleConflict",
            &format!(
                "Security rule {name} conflicts with rule {other}. Rules cannot have the same Priority and Direction."
            ),
        );
    }
    let existed = rules.contains_key(&key);
    let after = |field: &str| -> usize {
        rules
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, r)| prefixes(&r["properties"], field).len())
            .sum::<usize>()
            + prefixes(&props, field).len()
    };
    let count = rules.len() + usize::from(!existed);
    if count > limits.rules {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "SecurityRulesLimitExceeded",
            &format!("more than {} rules", limits.rules),
        );
    }
    if after("source") > limits.source_prefixes {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "SecurityRuleSourceAddressPrefixesLimitExceeded",
            "too many source prefixes",
        );
    }
    if after("destination") > limits.destination_prefixes {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "SecurityRuleDestinationAddressPrefixesLimitExceeded",
            "too many destination prefixes",
        );
    }
    let mut rule = rule_json(nsg_id, name, props);
    // Updating until its operation ends, as ARM reports a rule being written.
    rule["properties"]["provisioningState"] = json!("Updating");
    rules.insert(key.clone(), rule.clone());
    s.next_op += 1;
    let id = format!("put-{}", s.next_op);
    let polls = s.polls_per_operation;
    s.operations.insert(
        id.clone(),
        Operation {
            polls_left: polls,
            rule: Some((nsg_path.to_string(), key)),
            delete: false,
            fail,
        },
    );
    let body = rule;
    reply(
        if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        body,
        &[
            ("azure-asyncoperation", sub_loc("operations", &id)),
            ("retry-after", "0".into()),
        ],
    )
}

/// Properties of a rule the AKS cloud provider writes for a LoadBalancer Service.
pub fn aks_lb_rule(priority: i64, port: u16) -> Value {
    json!({
        "protocol": "Tcp", "sourceAddressPrefix": "Internet", "sourcePortRange": "*",
        "destinationAddressPrefix": "20.50.60.70", "destinationPortRange": port.to_string(),
        "access": "Allow", "priority": priority, "direction": "Inbound"
    })
}

#[cfg(test)]
mod tests;
