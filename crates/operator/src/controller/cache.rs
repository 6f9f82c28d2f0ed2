//! Reflectors for Services and Nodes, stripped to what the planner needs.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec as K8sNodeSpec, NodeStatus, Service};
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nodeport_firewall_model::ANNOTATION_PREFIX;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::feedback::{CONDITION_TYPE, fingerprint_condition};

/// The operator's view of the cluster: one store per kind.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    pub nodes: Store<Node>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("services", &self.services.len())
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Caches {
    /// Waits until both stores have seen their initial list. Errors when a reflector stopped.
    pub async fn wait_until_ready(&self) -> Result<(), String> {
        self.services
            .wait_until_ready()
            .await
            .map_err(|e| format!("service reflector stopped: {e}"))?;
        self.nodes
            .wait_until_ready()
            .await
            .map_err(|e| format!("node reflector stopped: {e}"))
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

/// Starts the Service and Node reflectors. Every change that reaches a store notifies
/// `changed`. The returned tasks run until aborted.
pub fn start(
    client: kube::Client,
    pool_labels: Vec<String>,
    changed: Arc<Notify>,
) -> (Caches, Vec<tokio::task::JoinHandle<()>>) {
    let (services, svc_writer) = reflector::store::<Service>();
    let (nodes, node_writer) = reflector::store::<Node>();

    let svc_api: Api<Service> = Api::all(client.clone());
    let svc_changed = changed.clone();
    let svc_task = tokio::spawn(async move {
        watcher(svc_api, watcher::Config::default())
            .default_backoff()
            .modify(strip_service)
            .reflect(svc_writer)
            .for_each(|ev| {
                match ev {
                    Ok(ev) => {
                        if is_change(&ev) {
                            svc_changed.notify_one();
                        }
                    }
                    Err(e) => warn!(kind = "Service", error = %e, "watch failed; retrying"),
                }
                futures::future::ready(())
            })
            .await;
        debug!(kind = "Service", "reflector stopped");
    });

    let node_api: Api<Node> = Api::all(client);
    let node_task = tokio::spawn(async move {
        watcher(node_api, watcher::Config::default())
            .default_backoff()
            .modify(move |n| strip_node(n, &pool_labels))
            .reflect(node_writer)
            .for_each(|ev| {
                match ev {
                    Ok(ev) => {
                        if is_change(&ev) {
                            changed.notify_one();
                        }
                    }
                    Err(e) => warn!(kind = "Node", error = %e, "watch failed; retrying"),
                }
                futures::future::ready(())
            })
            .await;
        debug!(kind = "Node", "reflector stopped");
    });

    (Caches { services, nodes }, vec![svc_task, node_task])
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
