//! Reflectors for Services, Nodes, Namespaces and policies, stripped to what the planner
//! needs.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeSpec as K8sNodeSpec, NodeStatus, Service,
};
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nodeport_firewall_model::ANNOTATION_PREFIX;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::feedback::{CONDITION_TYPE, fingerprint_condition};
use crate::policy::NodePortFirewallPolicy;

/// The operator's view of the cluster: one store per kind.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
    pub policies: Store<NodePortFirewallPolicy>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("services", &self.services.len())
            .field("nodes", &self.nodes.len())
            .field("namespaces", &self.namespaces.len())
            .field("policies", &self.policies.len())
            .finish()
    }
}

impl Caches {
    /// Waits until every store has seen its initial list: a plan from a partial view of
    /// the policies could open what they forbid. Errors when a reflector stopped.
    pub async fn wait_until_ready(&self) -> Result<(), String> {
        self.services
            .wait_until_ready()
            .await
            .map_err(|e| format!("service reflector stopped: {e}"))?;
        self.nodes
            .wait_until_ready()
            .await
            .map_err(|e| format!("node reflector stopped: {e}"))?;
        self.namespaces
            .wait_until_ready()
            .await
            .map_err(|e| format!("namespace reflector stopped: {e}"))?;
        self.policies
            .wait_until_ready()
            .await
            .map_err(|e| format!("NodePortFirewallPolicy reflector stopped: {e}"))
    }
}

/// Drops everything of a Service the operator does not read: managedFields, labels,
/// unrelated annotations, most of the spec, and every status condition but ours, whose
/// message is replaced by its fingerprint.
pub fn strip_service(svc: &mut Service) {
    let meta = &mut svc.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k.starts_with(ANNOTATION_PREFIX));
    }
    if let Some(spec) = svc.spec.as_mut() {
        let kept = k8s_openapi::api::core::v1::ServiceSpec {
            type_: spec.type_.take(),
            load_balancer_source_ranges: spec.load_balancer_source_ranges.take(),
            external_traffic_policy: spec.external_traffic_policy.take(),
            health_check_node_port: spec.health_check_node_port.take(),
            ports: spec.ports.take().map(|ports| {
                ports
                    .into_iter()
                    .map(|mut p| {
                        p.app_protocol = None;
                        p.target_port = None;
                        p
                    })
                    .collect()
            }),
            ..Default::default()
        };
        *spec = kept;
    }
    if let Some(status) = svc.status.as_mut() {
        status.load_balancer = None;
        if let Some(c) = status.conditions.as_mut() {
            c.retain(|c| c.type_ == CONDITION_TYPE);
            c.iter_mut().for_each(fingerprint_condition);
        }
    }
}

/// Keeps of a Node only its pool labels, providerID and InternalIP addresses.
pub fn strip_node(node: &mut Node, pool_labels: &[String]) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(l) = meta.labels.as_mut() {
        l.retain(|k, _| pool_labels.iter().any(|p| p == k));
    }
    let provider_id = node.spec.as_mut().and_then(|s| s.provider_id.take());
    node.spec = Some(K8sNodeSpec {
        provider_id,
        ..Default::default()
    });
    let addresses: Option<Vec<NodeAddress>> = node
        .status
        .as_mut()
        .and_then(|s| s.addresses.take())
        .map(|a| a.into_iter().filter(|a| a.type_ == "InternalIP").collect());
    node.status = Some(NodeStatus {
        addresses,
        ..Default::default()
    });
}

/// Starts the reflectors of Services, Nodes, Namespaces and NodePortFirewallPolicies. Every
/// change that reaches a store notifies `changed`. The returned tasks run until aborted.
pub fn start(
    client: kube::Client,
    pool_labels: Vec<String>,
    changed: Arc<Notify>,
) -> (Caches, Vec<tokio::task::JoinHandle<()>>) {
    let (services, svc_writer) = reflector::store::<Service>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (policies, policy_writer) = reflector::store::<NodePortFirewallPolicy>();
    let tasks = vec![
        reflect(
            Api::all(client.clone()),
            strip_service,
            svc_writer,
            changed.clone(),
        ),
        reflect(
            Api::all(client.clone()),
            move |n: &mut Node| strip_node(n, &pool_labels),
            node_writer,
            changed.clone(),
        ),
        reflect(
            Api::all(client.clone()),
            strip_namespace,
            ns_writer,
            changed.clone(),
        ),
        reflect(Api::all(client), strip_policy, policy_writer, changed),
    ];
    (
        Caches {
            services,
            nodes,
            namespaces,
            policies,
        },
        tasks,
    )
}

/// One reflector: lists and watches `api`, strips each object with `strip`, keeps them in
/// the store behind `writer`, and notifies `changed` on every change to the store.
fn reflect<K>(
    api: Api<K>,
    strip: impl FnMut(&mut K) + Send + 'static,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    tokio::spawn(async move {
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(strip)
            .reflect(writer)
            .for_each(|ev| {
                match ev {
                    Ok(ev) => {
                        if is_change(&ev) {
                            changed.notify_one();
                        }
                    }
                    Err(e) => {
                        // A policy list that is not found means the CRD is not installed.
                        let hint = if kind == "NodePortFirewallPolicy" {
                            "; nothing is planned until it lists: is the CRD installed (`nodeport-firewall crd | kubectl apply -f -`) and may the operator list it?"
                        } else {
                            "; nothing is planned until it lists"
                        };
                        warn!(kind = %kind, error = %e, "watch failed; retrying{hint}")
                    }
                }
                futures::future::ready(())
            })
            .await;
        debug!(kind = %kind, "reflector stopped");
    })
}

/// Keeps of a Namespace only its name and labels: what policies select by.
pub fn strip_namespace(ns: &mut Namespace) {
    let meta = &mut ns.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    ns.spec = None;
    ns.status = None;
}

/// Keeps of a policy its spec, generation and status (ours: small, and it tells when the
/// condition last changed). Only the spec is an input of the plan.
pub fn strip_policy(p: &mut NodePortFirewallPolicy) {
    let meta = &mut p.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
}

/// Events that change a store's content: objects applied or deleted, and the end of a
/// (re-)list. The start of a re-list and the objects streamed during it are not: the store
/// swaps them in at once when the list is done.
fn is_change<K>(ev: &watcher::Event<K>) -> bool {
    matches!(
        ev,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
    )
}
