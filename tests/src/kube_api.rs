//! A Kubernetes API server for tests: list and watch of Services, Nodes, Namespaces and
//! NodePortFirewallPolicies (cluster-scoped custom resources), server-side-apply patches of
//! Service and policy status, events.k8s.io/v1 Events and coordination.k8s.io/v1 Leases.
//!
//! What it reproduces, because kube's reflectors and our controller depend on it:
//! - every write bumps one global `resourceVersion`; lists carry it, watches resume from it;
//! - watches stream the history after the requested version, then live changes, with
//!   bookmarks when asked, and end after `timeoutSeconds`;
//! - [`ApiServer::compact`] forgets history: a watch that resumes from before it gets the
//!   `410 Gone` ERROR event a real server sends, and the client must re-list;
//! - [`ApiServer::set_list_delay`] makes lists slow, to test that nothing is planned before
//!   the caches have synced;
//! - Lease updates with a stale `resourceVersion` get 409 Conflict;
//!   [`ApiServer::set_lease_delay`] makes Lease requests slow or stall, as an overloaded or
//!   partitioned API server does, to test that a leader whose renewals stall stops writing.
//!
//! Start it in a test's runtime with [`ApiServer::start`], or on a thread of its own with
//! [`ApiServer::spawn`] (for tests that drive the real binary), and point a kubeconfig at
//! [`ApiServer::url`] ([`ApiServer::kubeconfig`] writes one).

use crate::faults::{Fault, Faults};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

type Body = BoxBody<Bytes, Infallible>;

/// One change, as a watcher sees it: (resourceVersion, kind, type, object).
type Change = (u64, String, String, Value);

#[derive(Default)]
struct State {
    rv: u64,
    /// History before this version is forgotten: watches from before it get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(String, String), Value>, // (kind, ns/name)
    history: Vec<Change>,
    events: Vec<Value>,
    status_patches: Vec<Value>,
    policy_status_patches: Vec<Value>,
    /// Armed faults, by resource (`namespaces`, `services`, …) or `*`.
    faults: Faults,
    list_delay: Duration,
    lease_delay: Duration,
    lists: BTreeMap<String, usize>,
    watches: BTreeMap<String, usize>,
    gone: usize,
}

/// A running test API server. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<Change>,
    /// Bumped to end every open watch (as an API server restart or a load balancer would).
    generation: Arc<watch::Sender<u64>>,
    /// Told when the Lease delay changes, so that waiting Lease requests look again.
    lease_delay_changed: Arc<watch::Sender<()>>,
    url: String,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("url", &self.url).finish()
    }
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    let name = m["name"].as_str().unwrap_or_default();
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn full(status: StatusCode, v: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":message,"reason":reason,"code":code})
}

fn status(code: u16, reason: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        status_object(code, reason, reason),
    )
}

fn kind_of(resource: &str) -> Option<&'static str> {
    match resource {
        "services" => Some("Service"),
        "nodes" => Some("Node"),
        "namespaces" => Some("Namespace"),
        _ => None,
    }
}

/// The group/version of our custom resources, and the one the policy kind is served at.
pub const POLICY_API_VERSION: &str = "nodeport-firewall.io/v1alpha1";
const POLICY_KIND: &str = "NodePortFirewallPolicy";
const POLICY_RESOURCE: &str = "nodeportfirewallpolicies";

impl ApiServer {
    /// Starts the server on the current tokio runtime.
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, _) = broadcast::channel(4096);
        let server = ApiServer {
            state: Arc::default(),
            tx,
            generation: Arc::new(watch::channel(0).0),
            lease_delay_changed: Arc::new(watch::channel(()).0),
            url,
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        server
    }

    /// Starts the server on a thread and runtime of its own, for tests without a runtime
    /// (those that drive the real binary). It lives as long as the test process.
    pub fn spawn() -> ApiServer {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tx.send(ApiServer::start().await).unwrap();
                std::future::pending::<()>().await;
            });
        });
        rx.recv().unwrap()
    }

    /// The server's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            self.url
        );
        std::fs::write(path, text).unwrap();
    }

    /// Stores an object (`ADDED`, `MODIFIED` or `DELETED`) and tells the watchers.
    pub fn put(&self, kind: &str, mut obj: Value, ty: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{}", key(&obj)));
        let k = (kind.to_string(), key(&obj));
        // metadata.generation counts changes of the spec, as the API server keeps it.
        let generation = match st.objects.get(&k) {
            None => 1,
            Some(old) => {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if old["spec"] == obj["spec"] { g } else { g + 1 }
            }
        };
        obj["metadata"]["generation"] = json!(generation);
        if ty == "DELETED" {
            st.objects.remove(&k);
        } else {
            st.objects.insert(k, obj.clone());
        }
        st.history.push((rv, kind.into(), ty.into(), obj.clone()));
        let _ = self.tx.send((rv, kind.into(), ty.into(), obj));
    }

    /// Stores many objects at once (as `ADDED`), without keeping them in the watch history:
    /// for big fixtures that are listed, not watched.
    pub fn load(&self, kind: &str, objects: impl IntoIterator<Item = Value>) {
        let mut st = self.state.lock().unwrap();
        for mut obj in objects {
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{}", key(&obj)));
            st.objects.insert((kind.to_string(), key(&obj)), obj);
        }
        st.compacted = st.rv;
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, key: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(kind.to_string(), key.to_string()))
            .cloned()
    }

    /// Forgets the watch history up to now: a watch resuming from an older version is
    /// answered with 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Ends every open watch, so that clients reconnect from their last version.
    pub fn drop_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Makes every list answer after `delay`.
    pub fn set_list_delay(&self, delay: Duration) {
        self.state.lock().unwrap().list_delay = delay;
    }

    /// Makes every Lease request answer after `delay` (`Duration::MAX`: never, until set
    /// again; a request waiting when the delay changes waits out the one it started with,
    /// unless it is shortened).
    pub fn set_lease_delay(&self, delay: Duration) {
        self.state.lock().unwrap().lease_delay = delay;
        self.lease_delay_changed.send_replace(());
    }

    /// The stored Lease `namespace/name`, if any.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get("Lease", &format!("{namespace}/{name}"))
    }

    /// Events created or patched so far, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// Server-side-apply patches of Service status received so far, oldest first.
    pub fn status_patches(&self) -> Vec<Value> {
        self.state.lock().unwrap().status_patches.clone()
    }

    /// Server-side-apply patches of NodePortFirewallPolicy status received so far.
    pub fn policy_status_patches(&self) -> Vec<Value> {
        self.state.lock().unwrap().policy_status_patches.clone()
    }

    /// Makes list and watch of `resource` ("namespaces", "nodeportfirewallpolicies", …)
    /// answer 403 Forbidden, as a missing RBAC rule would.
    pub fn forbid(&self, resource: &str) {
        self.inject(resource, usize::MAX, Fault::status(403));
    }

    /// Arms `fault` for the next `times` requests on `resource` (a path segment such as
    /// `namespaces` or `leases`, or `*`): the fault-injection API every test server shares
    /// ([`crate::faults`]). A 403 reads as RBAC's refusal, others as a plain status.
    pub fn inject(&self, resource: &str, times: usize, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .inject(resource, times, fault);
    }

    /// How many status patches were received.
    pub fn status_patch_count(&self) -> usize {
        self.state.lock().unwrap().status_patches.len()
    }

    /// How many lists of `resource` ("services", "nodes") were answered.
    pub fn lists(&self, resource: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.lists.get(resource).copied().unwrap_or(0)
    }

    /// How many watches were answered with 410 Gone.
    pub fn gone(&self) -> usize {
        self.state.lock().unwrap().gone
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let method = req.method().clone();
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return status(400, "BadRequest");
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let fault = self.state.lock().unwrap().faults.take_named(&parts);
        if let Some((resource, Fault::Status { status: code, .. })) = fault {
            if code == 403 {
                let message = format!(
                    "{resource} is forbidden: User \"system:serviceaccount:test:nodeport-firewall\" cannot list resource \"{resource}\" at the cluster scope"
                );
                return full(
                    StatusCode::FORBIDDEN,
                    status_object(403, "Forbidden", &message),
                );
            }
            let reason = if code == 429 {
                "TooManyRequests"
            } else {
                "InternalError"
            };
            return full(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                status_object(code, reason, "injected fault"),
            );
        }
        match (method, parts.as_slice()) {
            (Method::GET, ["apis", "nodeport-firewall.io", "v1alpha1", POLICY_RESOURCE]) => {
                if query.get("watch").is_some_and(|w| w == "1" || w == "true") {
                    self.watch(POLICY_RESOURCE, POLICY_KIND, &query)
                } else {
                    self.list(POLICY_RESOURCE, POLICY_KIND).await
                }
            }
            (
                Method::GET,
                [
                    "apis",
                    "nodeport-firewall.io",
                    "v1alpha1",
                    POLICY_RESOURCE,
                    name,
                ],
            ) => match self.get(POLICY_KIND, name) {
                Some(obj) => full(StatusCode::OK, obj),
                None => status(404, "NotFound"),
            },
            (
                Method::PATCH,
                [
                    "apis",
                    "nodeport-firewall.io",
                    "v1alpha1",
                    POLICY_RESOURCE,
                    name,
                    "status",
                ],
            ) => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return status(400, "BadRequest");
                };
                let Some(mut obj) = self.get(POLICY_KIND, name) else {
                    return status(404, "NotFound");
                };
                // The status subresource changes the status only.
                obj["status"] = patch["status"].clone();
                self.state.lock().unwrap().policy_status_patches.push(patch);
                self.put(POLICY_KIND, obj.clone(), "MODIFIED");
                full(StatusCode::OK, obj)
            }
            (Method::GET, ["api", "v1", resource]) => match kind_of(resource) {
                Some(kind) if query.get("watch").is_some_and(|w| w == "1" || w == "true") => {
                    self.watch(resource, kind, &query)
                }
                Some(kind) => self.list(resource, kind).await,
                None => status(404, "NotFound"),
            },
            (Method::GET, ["api", "v1", "namespaces", ns, "services", name]) => {
                match self.get("Service", &format!("{ns}/{name}")) {
                    Some(obj) => full(StatusCode::OK, obj),
                    None => status(404, "NotFound"),
                }
            }
            (Method::PATCH, ["api", "v1", "namespaces", ns, "services", name, "status"]) => {
                let patch: Option<Value> = serde_json::from_slice(&body).ok().or_else(|| {
                    yaml_serde::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| serde_json::to_value(v).ok())
                });
                let Some(patch) = patch else {
                    return status(400, "BadRequest");
                };
                let Some(mut obj) = self.get("Service", &format!("{ns}/{name}")) else {
                    return status(404, "NotFound");
                };
                obj["status"]["conditions"] = patch["status"]["conditions"].clone();
                self.state.lock().unwrap().status_patches.push(patch);
                self.put("Service", obj.clone(), "MODIFIED");
                full(StatusCode::OK, obj)
            }
            (m, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", ..]) => {
                let Ok(ev) = serde_json::from_slice::<Value>(&body) else {
                    return status(400, "BadRequest");
                };
                self.state.lock().unwrap().events.push(ev.clone());
                let code = if m == Method::POST {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                full(code, ev)
            }
            (
                m,
                [
                    "apis",
                    "coordination.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    "leases",
                    rest @ ..,
                ],
            ) => {
                self.lease_wait().await;
                self.lease_request(m, ns, rest.first().copied(), &body)
            }
            _ => status(404, "NotFound"),
        }
    }

    async fn list(&self, resource: &str, kind: &str) -> Response<Body> {
        let delay = self.state.lock().unwrap().list_delay;
        tokio::time::sleep(delay).await;
        let st = &mut *self.state.lock().unwrap();
        *st.lists.entry(resource.to_string()).or_default() += 1;
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|(_, v)| v)
            .collect();
        let api_version = if kind == POLICY_KIND {
            POLICY_API_VERSION
        } else {
            "v1"
        };
        full(
            StatusCode::OK,
            json!({"kind": format!("{kind}List"), "apiVersion": api_version,"metadata":{"resourceVersion": st.rv.to_string()},"items": items}),
        )
    }

    /// Waits out the Lease delay; a shorter delay set meanwhile ends the wait sooner.
    async fn lease_wait(&self) {
        let started = tokio::time::Instant::now();
        let mut changed = self.lease_delay_changed.subscribe();
        loop {
            let delay = self.state.lock().unwrap().lease_delay;
            let Some(remaining) = delay.checked_sub(started.elapsed()) else {
                return;
            };
            if remaining.is_zero() {
                return;
            }
            // A delay too long for a timer waits for the next change only.
            let sleep = tokio::time::sleep(remaining.min(Duration::from_secs(86_400)));
            tokio::select! {
                _ = sleep => {}
                _ = changed.changed() => {}
            }
        }
    }

    fn lease_request(
        &self,
        m: Method,
        ns: &str,
        name: Option<&str>,
        body: &[u8],
    ) -> Response<Body> {
        let mut st = self.state.lock().unwrap();
        match (m, name) {
            (Method::GET, Some(name)) => {
                match st
                    .objects
                    .get(&("Lease".to_string(), format!("{ns}/{name}")))
                {
                    Some(l) => full(StatusCode::OK, l.clone()),
                    None => status(404, "NotFound"),
                }
            }
            (Method::POST, None) | (Method::PUT, Some(_)) => {
                let Ok(mut l) = serde_json::from_slice::<Value>(body) else {
                    return status(400, "BadRequest");
                };
                l["metadata"]["namespace"] = json!(ns);
                let k = ("Lease".to_string(), key(&l));
                let existing = st.objects.get(&k);
                if name.is_none() && existing.is_some() {
                    return status(409, "AlreadyExists");
                }
                if let Some(e) = existing
                    && name.is_some()
                    && e["metadata"]["resourceVersion"] != l["metadata"]["resourceVersion"]
                {
                    return status(409, "Conflict");
                }
                st.rv += 1;
                l["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.objects.insert(k, l.clone());
                full(StatusCode::OK, l)
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }

    fn watch(
        &self,
        resource: &str,
        kind: &str,
        query: &BTreeMap<String, String>,
    ) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Bytes>();
        let line = |ty: &str, obj: &Value| {
            Bytes::from(format!("{}\n", json!({"type": ty, "object": obj})))
        };
        let mut rx = {
            let mut st = self.state.lock().unwrap();
            *st.watches.entry(resource.to_string()).or_default() += 1;
            if from < st.compacted {
                // What a real API server sends when the version is older than its history.
                st.gone += 1;
                let gone = status_object(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({})", st.compacted),
                );
                let _ = out_tx.send(line("ERROR", &gone));
                None
            } else {
                for (rv, k, ty, obj) in &st.history {
                    if *rv > from && k == kind {
                        let _ = out_tx.send(line(ty, obj));
                    }
                }
                Some(self.tx.subscribe())
            }
        };
        let kind = kind.to_string();
        let mut generation = self.generation.subscribe();
        generation.mark_unchanged();
        tokio::spawn(async move {
            let Some(rx) = rx.as_mut() else {
                return; // dropping out_tx ends the response after the ERROR event
            };
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = generation.changed() => break,
                    ev = rx.recv() => match ev {
                        Ok((rv, k, ty, obj)) if rv > from && k == kind => {
                            if out_tx.send(line(&ty, &obj)).is_err() { break; }
                            if bookmarks {
                                let bm = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
                                if out_tx.send(line("BOOKMARK", &bm)).is_err() { break; }
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        });
        let stream = futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// A Node in `pool` (label `pool`), with one InternalIP.
pub fn node(name: &str, pool: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":{"pool":pool}},
        "status":{"addresses":[{"type":"InternalIP","address":"10.0.0.1"}]}})
}

/// A Namespace with labels.
pub fn namespace(name: &str, labels: Value) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":name,"labels":labels}})
}

/// A NodePortFirewallPolicy with `spec`.
pub fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": POLICY_API_VERSION, "kind": POLICY_KIND, "metadata": {"name": name}, "spec": spec})
}

/// An opted-in NodePort Service `default/<name>` with one TCP port and an allowlist.
pub fn service(name: &str, node_port: u16, ranges: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Service","metadata":{"name":name,"namespace":"default",
        "annotations":{"nodeport-firewall.io/enabled":"true","nodeport-firewall.io/allowed-source-ranges":ranges}},
        "spec":{"type":"NodePort","ports":[{"name":"http","port":80,"protocol":"TCP","nodePort":node_port}]}})
}
