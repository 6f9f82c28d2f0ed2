//! A Compute Engine test server: the `firewalls`, `globalOperations` and `instances` REST
//! resources that the GCP provider uses, over plain HTTP on 127.0.0.1, for the real
//! `google-cloud-compute-v1` client.
//!
//! What it reproduces, with the real API's field names and JSON types (uint64 ids as
//! decimal strings, `IPProtocol`, `nextPageToken`, the `{"error": {...}}` body):
//! - insert / patch (JSON merge patch) / delete return a global Operation that goes
//!   PENDING -> RUNNING -> DONE across polls; an injected failure ends DONE with `error`;
//! - a duplicate name gives 409 `alreadyExists`; an unknown one 404 `notFound`;
//! - rules are checked as Compute checks them ([`rules`]): exactly one of `allowed` and
//!   `denied`, known protocols (ports only for tcp/udp/sctp), `priority` an integer within
//!   0-65535 (default 1000), a boolean `disabled`, no mixed IPv4/IPv6 source ranges, not too
//!   many ports or ranges, tags and service accounts never mixed; an invalid one is a 400.
//!   The real API also accepts an allow without targets, which then applies to every
//!   instance; the server refuses it so that a provider bug cannot hide (a Deny without
//!   targets is accepted);
//! - a per-project rule quota (`FIREWALLS`, over every network of the project; 1000 unless
//!   a test sets it) gives 403 `quotaExceeded` (`Quota 'FIREWALLS' exceeded`) with an
//!   ErrorInfo `QUOTA_EXCEEDED` and a Help link in `details`, as Compute does, and
//!   `projects.get` reports it in `quotas[]` with its usage ([`project`]); a project can
//!   refuse `projects.get` (403, `compute.projects.get` missing);
//! - a project can forbid writes (403 `forbidden`), standing in for a Shared VPC host
//!   project;
//! - 429 / 5xx can be injected, and a response can be lost after the write was made; an
//!   injected `Fault::Status` with a `code` answers with that reason, and the codes
//!   `quotaExceeded`, `QuotaFailure` and (on a 403) `rateLimitExceeded` with Compute's
//!   quota and rate-limit bodies, `details` included ([`errors::injected`]);
//! - a `requestId` (a UUID) is honoured: a write repeated with the same id returns the
//!   first write's Operation and changes nothing;
//! - `list` pages with `maxResults` / `pageToken` and filters ([`filter`]) with
//!   `field = "value"` / `!=`, or `field eq "regex"` / `ne` matching the whole field, alone
//!   or as conjunctions in parentheses;
//! - `instances.aggregatedList` and `instances.get` for discovery;
//! - `firewalls.testIamPermissions` grants every permission asked, less the write ones on
//!   a project that forbids writes.
//!
//! Every request is counted per method and project, for call-count measurements.

use crate::faults::{Fault, Faults};
use errors::{bad, error, not_found};
use rules::{RuleLimits, strings, validate};

mod errors;
mod filter;
mod project;
mod rules;

pub use rules::valid_name;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};

const URL: &str = "https://www.googleapis.com/compute/v1/";

type Reply = Response<Full<Bytes>>;

#[derive(Debug, Clone)]
struct Op {
    id: u64,
    name: String,
    kind: String,
    target_link: String,
    target_id: u64,
    polls: u32,
    error: Option<(String, String, u16)>,
}

#[derive(Debug, Default)]
struct Project {
    firewalls: BTreeMap<String, Value>,
    /// The `FIREWALLS` limit; `None`: [`project::DEFAULT_FIREWALL_QUOTA`].
    quota: Option<usize>,
    forbid_writes: bool,
    forbid_project_get: bool,
    operations: HashMap<String, Op>,
    request_ids: HashMap<String, String>,
    /// zone -> name -> instance
    instances: BTreeMap<String, BTreeMap<String, Value>>,
}

#[derive(Debug, Default)]
struct State {
    projects: BTreeMap<String, Project>,
    next_id: u64,
    polls_to_done: u32,
    max_ports: usize,
    max_sources: usize,
    faults: Faults,
    /// (method, project) -> requests
    calls: BTreeMap<(String, String), usize>,
    replayed_request_ids: usize,
    writes_without_request_id: usize,
    log: Vec<String>,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        // Large, like real ids, and beyond i64 for some: they must stay strings.
        9_000_000_000_000_000_000u64.wrapping_add(self.next_id * 7919)
    }

    fn rule_limits(&self) -> RuleLimits {
        RuleLimits {
            max_ports: self.max_ports,
            max_sources: self.max_sources,
        }
    }

    fn project(&mut self, p: &str) -> &mut Project {
        self.projects.entry(p.to_string()).or_default()
    }
}

/// The Compute test server, on its own thread; stopped when the process ends.
#[derive(Clone)]
pub struct ComputeServer {
    url: String,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ComputeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeServer")
            .field("url", &self.url)
            .finish()
    }
}

impl ComputeServer {
    /// Starts a server on 127.0.0.1.
    pub fn start() -> ComputeServer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", std_listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            polls_to_done: 2,
            max_ports: 100,
            max_sources: 256,
            ..State::default()
        }));
        let st = state.clone();
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
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(&st, req).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        ComputeServer { url, state }
    }

    /// `http://127.0.0.1:PORT`: the provider's `endpoint`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Adds an instance with network tags and service accounts.
    pub fn add_instance(
        &self,
        project: &str,
        zone: &str,
        name: &str,
        tags: &[&str],
        service_accounts: &[&str],
    ) {
        self.with(|s| {
            let id = s.id();
            let inst = json!({
                "kind": "compute#instance",
                "id": id.to_string(),
                "name": name,
                "zone": format!("{URL}projects/{project}/zones/{zone}"),
                "status": "RUNNING",
                "machineType": format!("{URL}projects/{project}/zones/{zone}/machineTypes/e2-standard-4"),
                "tags": {"items": tags, "fingerprint": "42WmSpB8rSM="},
                "serviceAccounts": service_accounts.iter().map(|e| json!({
                    "email": e, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]
                })).collect::<Vec<_>>(),
                "networkInterfaces": [{
                    "kind": "compute#networkInterface",
                    "name": "nic0",
                    "network": format!("{URL}projects/{project}/global/networks/default"),
                    "networkIP": format!("10.128.{}.{}", (id >> 8) & 0xff, id & 0xff),
                }],
                "labels": {"goog-k8s-node-pool-name": "unknown"},
                "creationTimestamp": "2026-01-01T00:00:00.000-08:00",
                "selfLink": format!("{URL}projects/{project}/zones/{zone}/instances/{name}"),
            });
            s.project(project)
                .instances
                .entry(zone.to_string())
                .or_default()
                .insert(name.to_string(), inst);
        });
    }

    /// Writes a rule directly (as another tool would), validated like an insert.
    pub fn seed_firewall(&self, project: &str, body: Value) -> Result<(), String> {
        self.with(|s| {
            let fw = new_firewall(s, project, body).map_err(|(_, m)| m.to_string())?;
            let name = fw["name"].as_str().unwrap_or_default().to_string();
            s.project(project).firewalls.insert(name, fw);
            Ok(())
        })
    }

    /// The rules of a project, by name.
    pub fn firewalls(&self, project: &str) -> BTreeMap<String, Value> {
        self.with(|s| s.project(project).firewalls.clone())
    }

    /// The project's `FIREWALLS` quota: the rules it may hold over all its networks, as
    /// inserts and `projects.get` see it (`None`: the default, 1000).
    pub fn set_quota(&self, project: &str, quota: Option<usize>) {
        self.with(|s| s.project(project).quota = quota);
    }

    /// `projects.get` on `project` gets 403: the credentials lack `compute.projects.get`.
    pub fn forbid_project_get(&self, project: &str, forbid: bool) {
        self.with(|s| s.project(project).forbid_project_get = forbid);
    }

    /// Writes to `project` get 403 `forbidden`, as in a Shared VPC host project.
    pub fn forbid_writes(&self, project: &str, forbid: bool) {
        self.with(|s| s.project(project).forbid_writes = forbid);
    }

    /// Polls an Operation takes to be DONE (default 2: PENDING, RUNNING, DONE).
    pub fn set_polls_to_done(&self, polls: u32) {
        self.with(|s| s.polls_to_done = polls);
    }

    /// The next `times` requests of `method` (`firewalls.insert`, `firewalls.list`, ...)
    /// get HTTP `status` (429, 500, 503, ...) and have no effect.
    pub fn fail_next(&self, method: &str, times: usize, status: u16) {
        self.inject(method, times, Fault::status(status));
    }

    /// Arms `fault` for the next `times` requests of `operation` (a Compute method such as
    /// `firewalls.insert`, `write` for any firewall write, or `*`): the fault-injection API
    /// every test server shares ([`crate::faults`]).
    pub fn inject(&self, operation: &str, times: usize, fault: Fault) {
        self.with(|s| s.faults.inject(operation, times, fault));
    }

    /// The next `times` writes of `method` are made, but the client gets a 503.
    pub fn lose_next_responses(&self, method: &str, times: usize) {
        self.inject(method, times, Fault::LoseResponse);
    }

    /// The next write of `method` is accepted, and its Operation ends DONE with `code`.
    pub fn fail_next_operation(&self, method: &str, code: &str, message: &str) {
        self.inject(
            method,
            1,
            Fault::FailOperation {
                code: code.to_string(),
                message: message.to_string(),
            },
        );
    }

    /// Requests per method (all projects).
    pub fn calls(&self) -> BTreeMap<String, usize> {
        self.with(|s| {
            let mut out = BTreeMap::new();
            for ((m, _), n) in &s.calls {
                *out.entry(m.clone()).or_default() += n;
            }
            out
        })
    }

    /// Requests of one method on one project.
    pub fn calls_on(&self, method: &str, project: &str) -> usize {
        self.with(|s| {
            s.calls
                .get(&(method.to_string(), project.to_string()))
                .copied()
                .unwrap_or(0)
        })
    }

    pub fn reset_calls(&self) {
        self.with(|s| s.calls.clear());
    }

    /// Writes that repeated an earlier `requestId` and were answered with its Operation.
    pub fn replayed_request_ids(&self) -> usize {
        self.with(|s| s.replayed_request_ids)
    }

    /// Writes sent without a `requestId`.
    pub fn writes_without_request_id(&self) -> usize {
        self.with(|s| s.writes_without_request_id)
    }

    /// Operation statuses as clients saw them, `<operation> <status>`, in order.
    pub fn log(&self) -> Vec<String> {
        self.with(|s| s.log.clone())
    }
}

fn reply(status: StatusCode, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=UTF-8");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn error_reply(answer: (u16, Value)) -> Reply {
    let retry_after = (answer.0 == 429).then_some(0);
    error_reply_after(answer, retry_after)
}

fn error_reply_after((status, body): (u16, Value), retry_after: Option<u64>) -> Reply {
    let after = retry_after.map(|s| s.to_string());
    let headers: Vec<(&str, &str)> = after.iter().map(|a| ("retry-after", a.as_str())).collect();
    reply(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
        &headers,
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &hyper::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn valid_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn network_url(project: &str, network: &str) -> Option<String> {
    // Accepts a name, `global/networks/N`, `projects/P/global/networks/N`, or a URL.
    let rest = network.strip_prefix(URL).unwrap_or(network);
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [n] if valid_name(n) => Some(format!("{URL}projects/{project}/global/networks/{n}")),
        ["global", "networks", n] => Some(format!("{URL}projects/{project}/global/networks/{n}")),
        ["projects", p, "global", "networks", n] => {
            Some(format!("{URL}projects/{p}/global/networks/{n}"))
        }
        _ => None,
    }
}

/// A new rule from an insert body: validated, with output-only fields set.
fn new_firewall(s: &mut State, project: &str, body: Value) -> Result<Value, (u16, Value)> {
    let Value::Object(mut m) = body else {
        return Err(bad("The request body is not a firewall".to_string()));
    };
    for k in ["id", "selfLink", "creationTimestamp", "kind"] {
        m.remove(k);
    }
    let network = m
        .get("network")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let Some(url) = network_url(project, &network) else {
        return Err(bad(format!(
            "Invalid value for field 'resource.network': '{network}'"
        )));
    };
    m.insert("network".into(), json!(url));
    let fw = validate(s.rule_limits(), Value::Object(m))?;
    let name = fw["name"].as_str().unwrap_or_default().to_string();
    let mut fw = fw;
    let id = s.id();
    fw["kind"] = json!("compute#firewall");
    fw["id"] = json!(id.to_string());
    fw["creationTimestamp"] = json!("2026-01-01T00:00:00.000-08:00");
    fw["selfLink"] = json!(format!("{URL}projects/{project}/global/firewalls/{name}"));
    if fw.get("disabled").is_none() {
        fw["disabled"] = json!(false);
    }
    fw["logConfig"] = json!({"enable": false});
    Ok(fw)
}

fn op_json(project: &str, op: &Op, polls_to_done: u32) -> Value {
    let status = match op.polls {
        0 => "PENDING",
        n if n < polls_to_done => "RUNNING",
        _ => "DONE",
    };
    let mut v = json!({
        "kind": "compute#operation",
        "id": op.id.to_string(),
        "name": op.name,
        "operationType": op.kind,
        "targetLink": op.target_link,
        "targetId": op.target_id.to_string(),
        "status": status,
        "user": "nodeport-firewall@test.iam.gserviceaccount.com",
        "progress": if status == "DONE" { 100 } else { 0 },
        "insertTime": "2026-01-01T00:00:00.000-08:00",
        "selfLink": format!("{URL}projects/{project}/global/operations/{}", op.name),
    });
    if status != "PENDING" {
        v["startTime"] = json!("2026-01-01T00:00:00.100-08:00");
    }
    if status == "DONE" {
        v["endTime"] = json!("2026-01-01T00:00:01.000-08:00");
        if let Some((code, message, http)) = &op.error {
            v["error"] = json!({"errors": [{"code": code, "message": message}]});
            v["httpErrorStatusCode"] = json!(http);
            v["httpErrorMessage"] = json!(if *http == 403 {
                "FORBIDDEN"
            } else {
                "BAD REQUEST"
            });
        }
    }
    v
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let q = query(&uri);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error_reply(bad(format!("Invalid JSON payload received. {e}"))),
        }
    };
    let path = uri.path().to_string();
    let Some(rest) = path.strip_prefix("/compute/v1/projects/") else {
        return error_reply(error(404, "notFound", "global", "Not Found"));
    };
    let parts: Vec<String> = rest.split('/').map(percent_decode).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut s = state.lock().unwrap();
    let (op_name, project) = match (method.clone(), parts.as_slice()) {
        (Method::GET, [p]) => ("projects.get", *p),
        (Method::GET, [p, "global", "firewalls"]) => ("firewalls.list", *p),
        (Method::POST, [p, "global", "firewalls"]) => ("firewalls.insert", *p),
        (Method::GET, [p, "global", "firewalls", _]) => ("firewalls.get", *p),
        (Method::PATCH, [p, "global", "firewalls", _]) => ("firewalls.patch", *p),
        (Method::DELETE, [p, "global", "firewalls", _]) => ("firewalls.delete", *p),
        (Method::GET, [p, "global", "operations", _]) => ("globalOperations.get", *p),
        (Method::POST, [p, "global", "firewalls", _, "testIamPermissions"]) => {
            ("firewalls.testIamPermissions", *p)
        }
        (Method::GET, [p, "aggregated", "instances"]) => ("instances.aggregatedList", *p),
        (Method::GET, [p, "zones", _, "instances", _]) => ("instances.get", *p),
        _ => return error_reply(error(404, "notFound", "global", "Not Found")),
    };
    let project = project.to_string();
    *s.calls
        .entry((op_name.to_string(), project.clone()))
        .or_default() += 1;
    let is_write = matches!(
        op_name,
        "firewalls.insert" | "firewalls.patch" | "firewalls.delete"
    );
    let fault = s
        .faults
        .take(&[op_name, if is_write { "write" } else { "read" }]);
    if let Some(Fault::Status {
        status,
        code,
        retry_after,
    }) = &fault
    {
        let answer = errors::injected(*status, code.as_deref(), &project);
        return match retry_after {
            Some(_) => error_reply_after(answer, *retry_after),
            None => error_reply(answer),
        };
    }
    match (op_name, parts.as_slice()) {
        ("projects.get", _) => {
            let id = s.id();
            let p = s.project(&project);
            if p.forbid_project_get {
                return error_reply(project::forbidden(&project));
            }
            let limit = p.quota.unwrap_or(project::DEFAULT_FIREWALL_QUOTA);
            let body = project::project_json(&project, id, limit, p.firewalls.len());
            reply(StatusCode::OK, &body, &[])
        }
        ("firewalls.list", _) => {
            let Some(filter) = filter::parse(q.get("filter").map(String::as_str).unwrap_or(""))
            else {
                return error_reply(bad("Invalid list filter expression.".to_string()));
            };
            let max = q
                .get("maxResults")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(500)
                .clamp(1, 500);
            let start = q
                .get("pageToken")
                .and_then(|t| t.strip_prefix("page-"))
                .and_then(|t| t.parse::<usize>().ok())
                .unwrap_or(0);
            let all: Vec<Value> = s
                .project(&project)
                .firewalls
                .values()
                .filter(|fw| filter::passes(&filter, fw))
                .cloned()
                .collect();
            let page: Vec<Value> = all.iter().skip(start).take(max).cloned().collect();
            let mut v = json!({
                "kind": "compute#firewallList",
                "id": format!("projects/{project}/global/firewalls"),
                "selfLink": format!("{URL}projects/{project}/global/firewalls"),
            });
            if !page.is_empty() {
                v["items"] = json!(page);
            }
            if start + max < all.len() {
                v["nextPageToken"] = json!(format!("page-{}", start + max));
            }
            reply(StatusCode::OK, &v, &[])
        }
        ("firewalls.get", [_, _, _, name]) => match s.project(&project).firewalls.get(*name) {
            Some(fw) => reply(StatusCode::OK, fw, &[]),
            None => error_reply(not_found(&project, name)),
        },
        ("firewalls.testIamPermissions", [_, _, _, name, _]) => {
            let p = s.project(&project);
            if !p.firewalls.contains_key(*name) {
                return error_reply(not_found(&project, name));
            }
            let forbid = p.forbid_writes;
            let granted: Vec<String> = strings(&body["permissions"])
                .into_iter()
                .filter(|perm| {
                    !forbid
                        || ![
                            "compute.firewalls.create",
                            "compute.firewalls.update",
                            "compute.firewalls.delete",
                        ]
                        .contains(&perm.as_str())
                })
                .collect();
            let mut v = json!({});
            if !granted.is_empty() {
                v["permissions"] = json!(granted);
            }
            reply(StatusCode::OK, &v, &[])
        }
        ("globalOperations.get", [_, _, _, name]) => {
            let polls_to_done = s.polls_to_done;
            let Some(op) = s.project(&project).operations.get_mut(*name) else {
                return error_reply(error(
                    404,
                    "notFound",
                    "global",
                    &format!(
                        "The resource 'projects/{project}/global/operations/{name}' was not found"
                    ),
                ));
            };
            op.polls += 1;
            let op = op.clone();
            let v = op_json(&project, &op, polls_to_done);
            let status = v["status"].as_str().unwrap_or_default().to_string();
            s.log.push(format!("{} {status}", op.name));
            reply(StatusCode::OK, &v, &[])
        }
        ("instances.aggregatedList", _) => {
            let max = q
                .get("maxResults")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(500)
                .clamp(1, 500);
            let start = q
                .get("pageToken")
                .and_then(|t| t.strip_prefix("page-"))
                .and_then(|t| t.parse::<usize>().ok())
                .unwrap_or(0);
            let flat: Vec<(String, Value)> = s
                .project(&project)
                .instances
                .iter()
                .flat_map(|(z, m)| m.values().map(move |i| (z.clone(), i.clone())))
                .collect();
            let mut items = Map::new();
            for (zone, inst) in flat.iter().skip(start).take(max) {
                let entry = items
                    .entry(format!("zones/{zone}"))
                    .or_insert_with(|| json!({"instances": []}));
                if let Some(a) = entry["instances"].as_array_mut() {
                    a.push(inst.clone());
                }
            }
            // Zones without instances come with a warning, as in the real API.
            items.insert(
                "zones/antarctica-south1-a".into(),
                json!({"warning": {
                    "code": "NO_RESULTS_ON_PAGE",
                    "message": "There are no results for scope 'zones/antarctica-south1-a' on this page.",
                    "data": [{"key": "scope", "value": "zones/antarctica-south1-a"}],
                }}),
            );
            let mut v = json!({
                "kind": "compute#instanceAggregatedList",
                "id": format!("projects/{project}/aggregated/instances"),
                "items": items,
                "selfLink": format!("{URL}projects/{project}/aggregated/instances"),
            });
            if start + max < flat.len() {
                v["nextPageToken"] = json!(format!("page-{}", start + max));
            }
            reply(StatusCode::OK, &v, &[])
        }
        ("instances.get", [_, _, zone, _, name]) => {
            match s
                .project(&project)
                .instances
                .get(*zone)
                .and_then(|m| m.get(*name))
            {
                Some(i) => reply(StatusCode::OK, i, &[]),
                None => error_reply(error(
                    404,
                    "notFound",
                    "global",
                    &format!(
                        "The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found"
                    ),
                )),
            }
        }
        _ if is_write => {
            let polls_to_done = s.polls_to_done;
            let request_id = q.get("requestId").cloned();
            match &request_id {
                None => s.writes_without_request_id += 1,
                Some(id) if !valid_uuid(id) => {
                    return error_reply(bad(format!(
                        "Invalid value for field 'requestId': '{id}'. Must be a valid UUID."
                    )));
                }
                Some(id) => {
                    let replay = s.project(&project).request_ids.get(id).cloned();
                    if let Some(op_name) = replay {
                        s.replayed_request_ids += 1;
                        let op = s.project(&project).operations.get(&op_name).cloned();
                        if let Some(op) = op {
                            return reply(
                                StatusCode::OK,
                                &op_json(&project, &op, polls_to_done),
                                &[],
                            );
                        }
                    }
                }
            }
            let result = write(&mut s, op_name, &project, &parts, body, &fault);
            match result {
                Ok(op) => {
                    let v = op_json(&project, &op, polls_to_done);
                    if let Some(id) = request_id {
                        s.project(&project).request_ids.insert(id, op.name.clone());
                    }
                    s.project(&project).operations.insert(op.name.clone(), op);
                    if matches!(fault, Some(Fault::LoseResponse)) {
                        return error_reply(errors::injected(503, None, &project));
                    }
                    reply(StatusCode::OK, &v, &[])
                }
                Err(e) => error_reply(e),
            }
        }
        _ => error_reply(error(404, "notFound", "global", "Not Found")),
    }
}

/// Carries out one write; returns its Operation.
fn write(
    s: &mut State,
    method: &str,
    project: &str,
    parts: &[&str],
    body: Value,
    fault: &Option<Fault>,
) -> Result<Op, (u16, Value)> {
    let name = match (method, parts) {
        ("firewalls.insert", _) => body["name"].as_str().unwrap_or_default().to_string(),
        (_, [_, _, _, name]) => name.to_string(),
        _ => String::new(),
    };
    if s.project(project).forbid_writes {
        let perm = match method {
            "firewalls.insert" => "compute.firewalls.create",
            "firewalls.patch" => "compute.firewalls.update",
            _ => "compute.firewalls.delete",
        };
        return Err(error(
            403,
            "forbidden",
            "global",
            &format!(
                "Required '{perm}' permission for 'projects/{project}/global/firewalls/{name}'"
            ),
        ));
    }
    let failed_op = match fault {
        Some(Fault::FailOperation { code, message }) => Some((code.clone(), message.clone())),
        _ => None,
    };
    let target_id;
    match method {
        "firewalls.insert" => {
            let fw = new_firewall(s, project, body)?;
            if s.project(project).firewalls.contains_key(&name) {
                return Err(error(
                    409,
                    "alreadyExists",
                    "global",
                    &format!(
                        "The resource 'projects/{project}/global/firewalls/{name}' already exists"
                    ),
                ));
            }
            let p = s.project(project);
            let quota = p.quota.unwrap_or(project::DEFAULT_FIREWALL_QUOTA);
            if p.firewalls.len() >= quota {
                return Err(errors::quota_exceeded(project, quota));
            }
            target_id = fw["id"].as_str().and_then(|i| i.parse().ok()).unwrap_or(0);
            if failed_op.is_none() {
                s.project(project).firewalls.insert(name.clone(), fw);
            }
        }
        "firewalls.patch" => {
            let Some(old) = s.project(project).firewalls.get(&name).cloned() else {
                return Err(not_found(project, &name));
            };
            let Value::Object(patch) = body else {
                return Err(bad("The request body is not a firewall".to_string()));
            };
            if patch
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n != name)
            {
                return Err(bad(
                    "The name of a firewall rule cannot be changed".to_string()
                ));
            }
            let mut merged = old.clone();
            for (k, v) in patch {
                if ["id", "selfLink", "creationTimestamp", "kind", "network"].contains(&k.as_str())
                {
                    continue;
                }
                if v.is_null() {
                    if let Some(o) = merged.as_object_mut() {
                        o.remove(&k);
                    }
                } else {
                    merged[k.as_str()] = v;
                }
            }
            let merged = validate(s.rule_limits(), merged)?;
            target_id = merged["id"]
                .as_str()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            if failed_op.is_none() {
                s.project(project).firewalls.insert(name.clone(), merged);
            }
        }
        _ => {
            let Some(old) = s.project(project).firewalls.get(&name).cloned() else {
                return Err(not_found(project, &name));
            };
            target_id = old["id"].as_str().and_then(|i| i.parse().ok()).unwrap_or(0);
            if failed_op.is_none() {
                s.project(project).firewalls.remove(&name);
            }
        }
    }
    let id = s.id();
    let kind = method.trim_start_matches("firewalls.").to_string();
    Ok(Op {
        id,
        name: format!("operation-{id}-{kind}"),
        kind,
        target_link: format!("{URL}projects/{project}/global/firewalls/{name}"),
        target_id,
        polls: 0,
        error: failed_op.map(|(code, message)| {
            let http = if code == "QUOTA_EXCEEDED" { 403 } else { 400 };
            (code, message, http)
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_helpers() {
        assert_eq!(percent_decode("a+%3D+%22b%22"), "a = \"b\"");
        assert!(valid_uuid("123e4567-e89b-42d3-a456-426614174000"));
        assert!(!valid_uuid("not-a-uuid"));
    }
}
