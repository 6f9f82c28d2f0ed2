//! The kube half of feedback: sends what `decide.rs` decided, with the kube client. An
//! Event is created unless the same one was already reported to the Service (a
//! `RulesUpdated` event always is: it reports a write); the condition is patched
//! (server-side apply on the status) only when it differs from the Service's and from what
//! was last set. At most [`PUBLISH_CONCURRENCY`] writes at a time, and none once
//! leadership is lost or shutdown begins.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource};
use nodeport_firewall_model::ServiceRef;
use serde_json::json;
use tracing::{debug, warn};

use super::decide::{
    CONDITION_TYPE, ConditionState, Report, ServiceFeedback, current_condition, fingerprint,
};

/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "nodeport-firewall";

/// Publishes feedback: events that were not already reported, conditions that changed.
pub struct Publisher {
    client: kube::Client,
    events: EventSink,
    /// Fingerprints of the last events reported per Service, to not repeat them on resyncs.
    reported: BTreeMap<ServiceRef, Vec<u64>>,
    /// Fingerprint of the last condition set per Service (the cache may lag behind our own
    /// patch).
    conditions: BTreeMap<ServiceRef, u64>,
}

/// Creates `events.k8s.io/v1` Events. kube's `Recorder` keeps every event it sent for six
/// minutes to fold repeats into a series: after a first start with 10,000 Services that is
/// 10,000 events in memory. The publisher never sends the same warning twice, so a plain
/// create is enough.
struct EventSink {
    client: kube::Client,
    instance: String,
}

impl EventSink {
    async fn publish(&self, report: &Report, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = K8sEvent {
            action: Some("Reconcile".into()),
            reason: Some(report.reason.clone()),
            note: Some(report.note.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            metadata: ObjectMeta {
                namespace: Some(namespace.clone()),
                // Unique per Service and instant, as kube's Recorder names them.
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(FIELD_MANAGER),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(FIELD_MANAGER.into()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(if report.warning { "Warning" } else { "Normal" }.into()),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("reported", &self.reported.len())
            .finish_non_exhaustive()
    }
}

/// Events and condition patches in flight at once: a first start with thousands of Services
/// sets thousands of conditions, and one at a time would take minutes.
pub const PUBLISH_CONCURRENCY: usize = 16;

/// One write to the Kubernetes API.
enum Write {
    Event {
        service: ServiceRef,
        report: Report,
        reference: Box<ObjectReference>,
    },
    Condition {
        service: ServiceRef,
        want: ConditionState,
        transition: Time,
        generation: Option<i64>,
    },
}

impl Publisher {
    pub fn new(client: kube::Client, instance: String) -> Self {
        Publisher {
            events: EventSink {
                client: client.clone(),
                instance,
            },
            client,
            reported: BTreeMap::new(),
            conditions: BTreeMap::new(),
        }
    }

    /// Forgets what was reported (on losing leadership: the next leader reports afresh).
    pub fn reset(&mut self) {
        self.reported.clear();
        self.conditions.clear();
    }

    /// Sends what changed, at most [`PUBLISH_CONCURRENCY`] writes at a time. Before each
    /// write `keep_going` is asked: it says no once leadership is lost or shutdown begins,
    /// and the rest is left for the next leader or run. Returns the number of API writes.
    pub async fn publish(
        &mut self,
        feedback: Vec<ServiceFeedback>,
        store: &Store<Service>,
        keep_going: &(dyn Fn() -> bool + Sync),
    ) -> usize {
        let mut writes = Vec::new();
        let mut seen = BTreeSet::new();
        for fb in feedback {
            seen.insert(fb.service.clone());
            let key = ObjectRef::<Service>::new(fb.service.name()).within(fb.service.namespace());
            let Some(obj) = store.get(&key) else {
                continue;
            };
            // Events: Normal change events always (they report a write); warnings only when
            // they differ from what was last reported.
            let last = self.reported.get(&fb.service).cloned().unwrap_or_default();
            let prints: Vec<u64> = fb.events.iter().map(fingerprint).collect();
            for (ev, print) in fb.events.into_iter().zip(&prints) {
                let repeated = last.contains(print);
                if repeated && (ev.warning || ev.reason != "RulesUpdated") {
                    continue;
                }
                writes.push(Write::Event {
                    service: fb.service.clone(),
                    report: ev,
                    reference: Box::new(obj.object_ref(&())),
                });
            }
            if prints.is_empty() {
                self.reported.remove(&fb.service);
            } else {
                self.reported.insert(fb.service.clone(), prints);
            }

            let Some(want) = fb.condition else {
                continue;
            };
            let current = current_condition(&obj);
            let print = want.fingerprint();
            if current.as_ref().map(|c| c.fingerprint) == Some(print)
                || self.conditions.get(&fb.service) == Some(&print)
            {
                continue;
            }
            let transition = match &current {
                Some(c) if c.status == want.status => c.last_transition.clone(),
                _ => Time(Timestamp::now()),
            };
            // The patch itself is built when it is sent: 10,000 JSON documents built up front
            // were most of the operator's peak memory on a first start.
            writes.push(Write::Condition {
                service: fb.service.clone(),
                want,
                transition,
                generation: obj.metadata.generation,
            });
        }

        let count = writes.len();
        let events = &self.events;
        let client = &self.client;
        let set: Vec<(ServiceRef, u64)> = stream::iter(writes)
            .map(|w| async move {
                if !keep_going() {
                    return None;
                }
                match w {
                    Write::Event {
                        service,
                        report,
                        reference,
                    } => {
                        if let Err(e) = events.publish(&report, &reference).await {
                            warn!(service = %service, reason = %report.reason, error = %e, "cannot publish event");
                        }
                        None
                    }
                    Write::Condition {
                        service,
                        want,
                        transition,
                        generation,
                    } => {
                        let patch = json!({
                            "apiVersion": "v1",
                            "kind": "Service",
                            "metadata": { "name": service.name(), "namespace": service.namespace() },
                            "status": { "conditions": [{
                                "type": CONDITION_TYPE,
                                "status": if want.status { "True" } else { "False" },
                                "reason": want.reason,
                                "message": want.message,
                                "lastTransitionTime": transition,
                                "observedGeneration": generation,
                            }]}
                        });
                        let api: Api<Service> =
                            Api::namespaced(client.clone(), service.namespace());
                        match api
                            .patch_status(
                                service.name(),
                                &PatchParams::apply(FIELD_MANAGER).force(),
                                &Patch::Apply(&patch),
                            )
                            .await
                        {
                            Ok(_) => {
                                debug!(service = %service, reason = %want.reason, "condition set");
                                Some((service, want.fingerprint()))
                            }
                            Err(e) => {
                                warn!(service = %service, error = %e, "cannot set the condition");
                                None
                            }
                        }
                    }
                }
            })
            .buffer_unordered(PUBLISH_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        self.conditions.extend(set);
        self.reported.retain(|k, _| seen.contains(k));
        self.conditions.retain(|k, _| seen.contains(k));
        count
    }
}
