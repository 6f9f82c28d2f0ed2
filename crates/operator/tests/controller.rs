//! The controller against an in-process test API server, through kube's real HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nodeport_firewall::controller::{self, Context, Settings};
use nodeport_firewall_model::Config;
use nodeport_firewall_provider::MemoryProvider;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(String, String), Value>, // (kind, ns/name)
    history: Vec<(u64, String, String, Value)>, // rv, kind, type, object
    events: Vec<Value>,
    status_patches: Vec<Value>,
    list_delay: Duration,
    lists: usize,
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    tx: broadcast::Sender<(u64, String, String, Value)>,
    url: String,
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap()),
        None => m["name"].as_str().unwrap().to_string(),
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

fn status(code: u16, reason: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind":"Status","apiVersion":"v1","status":"Failure","message":reason,"reason":reason,"code":code}),
    )
}

impl Server {
    async fn start() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, _) = broadcast::channel(1024);
        let server = Server {
            state: Arc::default(),
            tx,
            url,
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
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

    fn client(&self) -> kube::Client {
        controller::install_crypto_provider();
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Stores an object and tells the watchers.
    fn put(&self, kind: &str, mut obj: Value, ty: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["metadata"]["uid"] = json!(format!("uid-{}", key(&obj)));
        let k = (kind.to_string(), key(&obj));
        if ty == "DELETED" {
            st.objects.remove(&k);
        } else {
            st.objects.insert(k, obj.clone());
        }
        st.history.push((rv, kind.into(), ty.into(), obj.clone()));
        let _ = self.tx.send((rv, kind.into(), ty.into(), obj));
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
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, parts.as_slice()) {
            (Method::GET, ["api", "v1", kind @ ("services" | "nodes")]) => {
                let kind = if *kind == "services" {
                    "Service"
                } else {
                    "Node"
                };
                if query.get("watch").is_some_and(|w| w == "1" || w == "true") {
                    self.watch(kind, &query)
                } else {
                    let delay = self.state.lock().unwrap().list_delay;
                    tokio::time::sleep(delay).await;
                    let st = &mut *self.state.lock().unwrap();
                    st.lists += 1;
                    let items: Vec<Value> = st
                        .objects
                        .iter()
                        .filter(|((k, _), _)| k == kind)
                        .map(|(_, v)| v.clone())
                        .collect();
                    full(
                        StatusCode::OK,
                        json!({"kind": format!("{kind}List"), "apiVersion":"v1","metadata":{"resourceVersion": st.rv.to_string()},"items": items}),
                    )
                }
            }
            (Method::PATCH, ["api", "v1", "namespaces", ns, "services", name, "status"]) => {
                let patch: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                    serde_json::to_value(serde_yaml::from_slice::<Value>(&body).unwrap()).unwrap()
                });
                let k = ("Service".to_string(), format!("{ns}/{name}"));
                let obj = self.state.lock().unwrap().objects.get(&k).cloned();
                let Some(mut obj) = obj else {
                    return status(404, "NotFound");
                };
                obj["status"]["conditions"] = patch["status"]["conditions"].clone();
                self.state.lock().unwrap().status_patches.push(patch);
                self.put("Service", obj.clone(), "MODIFIED");
                full(StatusCode::OK, obj)
            }
            (m, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", ..]) => {
                let ev: Value = serde_json::from_slice(&body).unwrap();
                self.state.lock().unwrap().events.push(ev.clone());
                full(
                    if m == Method::POST {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    ev,
                )
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
            ) => self.lease(m, ns, rest.first().copied(), &body),
            _ => status(404, "NotFound"),
        }
    }

    fn lease(&self, m: Method, ns: &str, name: Option<&str>, body: &[u8]) -> Response<Body> {
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
                let mut l: Value = serde_json::from_slice(body).unwrap();
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

    fn watch(&self, kind: &str, query: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Bytes>();
        let line = |ty: &str, obj: &Value| {
            Bytes::from(format!("{}\n", json!({"type": ty, "object": obj})))
        };
        let mut rx = {
            let st = self.state.lock().unwrap();
            for (rv, k, ty, obj) in &st.history {
                if *rv > from && k == kind {
                    let _ = out_tx.send(line(ty, obj));
                }
            }
            self.tx.subscribe()
        };
        let kind = kind.to_string();
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
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

    fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }
}

fn node(name: &str, pool: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":{"pool":pool}},
        "status":{"addresses":[{"type":"InternalIP","address":"10.0.0.1"}]}})
}

fn service(name: &str, node_port: u16, ranges: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Service","metadata":{"name":name,"namespace":"default",
        "annotations":{"nodeport-firewall.io/enabled":"true","nodeport-firewall.io/allowed-source-ranges":ranges}},
        "spec":{"type":"NodePort","ports":[{"name":"http","port":80,"protocol":"TCP","nodePort":node_port}]}})
}

fn config() -> Config {
    Config::from_yaml("clusterName: test\npoolLabels: [pool]\n").unwrap()
}

fn settings() -> Settings {
    Settings {
        debounce: Duration::from_millis(100),
        resync: Duration::from_secs(3600),
        ..Settings::default()
    }
}

/// Rules on every target: target -> sorted (ports, sources) texts of rules we own.
fn rules(p: &MemoryProvider) -> BTreeMap<String, Vec<String>> {
    p.snapshot()
        .unwrap()
        .targets
        .into_iter()
        .map(|(t, rules)| {
            let mut r: Vec<String> = rules
                .iter()
                .filter(|r| r.owner.as_deref() == Some("test"))
                .map(|r| format!("{} {}", r.rule.ports_text(), r.rule.sources_text()))
                .collect();
            r.sort();
            (t, r)
        })
        .collect()
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn spawn(server: &Server, provider: Arc<MemoryProvider>, settings: Settings) -> Running {
    let ctx = Context::new(server.client(), provider, config(), settings);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::task::spawn_local(controller::run(ctx, async move {
        let _ = rx.await;
    }));
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The controller's futures are run on a LocalSet, as the binary runs them with block_on.
async fn local<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

fn memory() -> Arc<MemoryProvider> {
    Arc::new(MemoryProvider::from_config("test", None).unwrap())
}

#[tokio::test]
async fn converges_then_removes_a_deleted_services_rules() {
    local(async {
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        server.put("Service", service("api", 30090, "10.2.0.0/16"), "ADDED");
        let p = memory();
        let run = spawn(&server, p.clone(), settings());
        eventually("two rules", || {
            rules(&p).get("a").is_some_and(|r| r.len() == 2)
        })
        .await;
        assert_eq!(
            rules(&p)["a"],
            vec![
                "30080 10.1.0.0/16".to_string(),
                "30090 10.2.0.0/16".to_string()
            ]
        );
        server.put("Service", service("api", 30090, "10.2.0.0/16"), "DELETED");
        eventually("one rule", || rules(&p)["a"].len() == 1).await;
        assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
        // Feedback: a Normal event and a True condition.
        let events = server.events();
        assert!(
            events
                .iter()
                .any(|e| e["reason"] == "RulesUpdated" && e["type"] == "Normal")
        );
        let patches = server.state.lock().unwrap().status_patches.clone();
        assert!(patches.iter().any(|p| p["status"]["conditions"][0]["type"]
            == "NodePortFirewallSynced"
            && p["status"]["conditions"][0]["status"] == "True"));
        run.stop().await;
    })
    .await;
}

#[tokio::test]
async fn nothing_is_planned_before_the_caches_sync() {
    local(async {
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        server.state.lock().unwrap().list_delay = Duration::from_millis(1500);
        let p = memory();
        // A rule of ours for a Service the slow list will show: an empty view would delete it.
        let run = spawn(&server, p.clone(), settings());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            p.calls.resolves.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(p.calls.applies.load(std::sync::atomic::Ordering::SeqCst), 0);
        eventually("the rule", || {
            rules(&p).get("a").is_some_and(|r| r.len() == 1)
        })
        .await;
        run.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_annotation_warns_and_keeps_rules() {
    local(async {
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        let p = memory();
        let run = spawn(&server, p.clone(), settings());
        eventually("the rule", || {
            rules(&p).get("a").is_some_and(|r| r.len() == 1)
        })
        .await;
        server.put("Service", service("web", 30080, "not-a-cidr"), "MODIFIED");
        eventually("a warning", || {
            server
                .events()
                .iter()
                .any(|e| e["type"] == "Warning" && e["reason"] == "InvalidAnnotation")
        })
        .await;
        let patches = server.state.lock().unwrap().status_patches.clone();
        let last = patches.last().unwrap();
        assert_eq!(last["status"]["conditions"][0]["status"], "False");
        assert_eq!(
            last["status"]["conditions"][0]["reason"],
            "InvalidAnnotation"
        );
        assert_eq!(rules(&p)["a"], vec!["30080 10.1.0.0/16".to_string()]);
        run.stop().await;
    })
    .await;
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    local(async {
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        let p = memory();
        let run = spawn(
            &server,
            p.clone(),
            Settings {
                dry_run: true,
                ..settings()
            },
        );
        eventually("a dry-run event", || {
            server
                .events()
                .iter()
                .any(|e| e["reason"] == "DryRunChangesPending")
        })
        .await;
        assert_eq!(p.calls.applies.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(rules(&p).values().all(|r| r.is_empty()));
        let patches = server.state.lock().unwrap().status_patches.clone();
        assert!(
            patches[0]["status"]["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("[dry run]")
        );
        run.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_resync_without_changes_is_silent() {
    local(async {
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        let p = memory();
        let run = spawn(
            &server,
            p.clone(),
            Settings {
                resync: Duration::from_millis(300),
                ..settings()
            },
        );
        eventually("the rule", || {
            rules(&p).get("a").is_some_and(|r| r.len() == 1)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let events = server.events().len();
        let patches = server.state.lock().unwrap().status_patches.len();
        let applies = p.calls.applies.load(std::sync::atomic::Ordering::SeqCst);
        let observes = p.calls.observes.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            p.calls.observes.load(std::sync::atomic::Ordering::SeqCst) > observes,
            "resyncs re-observe"
        );
        assert_eq!(server.events().len(), events);
        assert_eq!(server.state.lock().unwrap().status_patches.len(), patches);
        assert_eq!(
            p.calls.applies.load(std::sync::atomic::Ordering::SeqCst),
            applies
        );
        run.stop().await;
    })
    .await;
}

#[tokio::test]
async fn only_the_lease_holder_writes() {
    local(async {
        use nodeport_firewall::controller::leader::LeaseConfig;
        let server = Server::start().await;
        server.put("Node", node("n1", "a"), "ADDED");
        server.put("Service", service("web", 30080, "10.1.0.0/16"), "ADDED");
        let lease = |id: &str| LeaseConfig {
            namespace: "ops".into(),
            name: "npf".into(),
            identity: id.into(),
            lease_duration: Duration::from_secs(3),
            renew_period: Duration::from_millis(500),
        };
        let p1 = memory();
        let r1 = spawn(
            &server,
            p1.clone(),
            Settings {
                lease: Some(lease("one")),
                ..settings()
            },
        );
        eventually("leader writes", || {
            rules(&p1).get("a").is_some_and(|r| r.len() == 1)
        })
        .await;
        let p2 = memory();
        let r2 = spawn(
            &server,
            p2.clone(),
            Settings {
                lease: Some(lease("two")),
                ..settings()
            },
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            p2.calls.applies.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(
            p2.calls.observes.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        // The first releases the lease on shutdown; the second takes over and writes.
        r1.stop().await;
        eventually("the follower takes over", || {
            rules(&p2).get("a").is_some_and(|r| r.len() == 1)
        })
        .await;
        r2.stop().await;
    })
    .await;
}
