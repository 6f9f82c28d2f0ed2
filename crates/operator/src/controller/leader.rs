//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! The holder renews every `renew_period`; a Lease whose `renewTime + leaseDurationSeconds`
//! has passed (or that names no holder) may be taken over. Leadership is also bounded
//! locally: it ends `lease_duration` after the last successful renewal even if the renewal
//! loop hangs, so writes stop at the latest when another replica may take over.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// Whether this instance may write. Cheap to clone; shared by the gate and the loop.
#[derive(Clone, Debug)]
pub struct Leadership {
    inner: Arc<Mutex<Option<Instant>>>,
    tx: Arc<watch::Sender<bool>>,
    always: bool,
}

impl Leadership {
    /// Leadership without election: always the leader.
    pub fn always() -> Self {
        let (tx, _) = watch::channel(true);
        Leadership {
            inner: Arc::new(Mutex::new(None)),
            tx: Arc::new(tx),
            always: true,
        }
    }

    fn elected() -> Self {
        let (tx, _) = watch::channel(false);
        Leadership {
            inner: Arc::new(Mutex::new(None)),
            tx: Arc::new(tx),
            always: false,
        }
    }

    /// True while the lease is held and was renewed less than a lease duration ago.
    pub fn is_leader(&self) -> bool {
        if self.always {
            return true;
        }
        match self.inner.lock() {
            Ok(g) => g.is_some_and(|until| Instant::now() < until),
            Err(_) => false,
        }
    }

    /// Changes of leadership.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    fn set(&self, until: Option<Instant>) {
        if let Ok(mut g) = self.inner.lock() {
            *g = until;
        }
        let now = until.is_some();
        self.tx.send_if_modified(|v| {
            let changed = *v != now;
            *v = now;
            changed
        });
    }
}

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_period: Duration,
}

/// One elector: drives a [`Leadership`] from a Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Leadership,
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            leadership: Leadership::elected(),
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: acquire or renew. Ok(true) when this instance holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let me = &self.config.identity;
        let existing = self.api.get_opt(&self.config.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(self.held(started)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.lost()),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(me.as_str());
        if !mine {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(self.duration_secs()));
            let expired = match &spec.renew_time {
                Some(MicroTime(t)) => *t + SignedDuration::from_secs(duration) < Timestamp::now(),
                None => true,
            };
            if holder.is_some() && !expired {
                return Ok(self.lost());
            }
            spec.acquire_time = Some(micro_now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(me.clone());
        spec.lease_duration_seconds = Some(self.duration_secs());
        spec.renew_time = Some(micro_now());
        // resourceVersion from the read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(self.held(started)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.lost()),
            Err(e) => Err(e),
        }
    }

    fn held(&self, started: Instant) -> bool {
        if !self.leadership.is_leader() {
            info!(lease = %self.config.name, identity = %self.config.identity, "acquired the leader lease");
        }
        // Counted from before the request: the server's renewTime is no earlier than that.
        self.leadership
            .set(Some(started + self.config.lease_duration));
        true
    }

    fn lost(&self) -> bool {
        if self.leadership.is_leader() {
            warn!(lease = %self.config.name, "lost the leader lease: writes stop");
        }
        self.leadership.set(None);
        false
    }

    /// Runs until `stop` fires, then releases the lease if held.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(_) => {}
                Err(e) => {
                    // A failed renewal ends leadership at once: better idle than two writers.
                    warn!(lease = %self.config.name, error = %e, "lease renewal failed");
                    self.lost();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.renew_period) => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
        self.release().await;
    }

    /// Gives the lease up, so that another replica takes over without waiting for expiry.
    pub async fn release(&self) {
        let was = self.leadership.is_leader();
        self.leadership.set(None);
        if !was {
            return;
        }
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(micro_now());
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.config.name, "released the leader lease"),
            Err(e) => warn!(lease = %self.config.name, error = %e, "cannot release the lease"),
        }
    }
}
