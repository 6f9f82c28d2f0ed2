//! Leader election on a `coordination.k8s.io/v1` Lease, judged by local clocks only.
//!
//! The holder renews every `renew_period`. A standby never compares the holder's
//! `renewTime` with its own wall clock (a skew of seconds would let it take over a live
//! leader): as client-go does, it notes the local [`Instant`] at which it last saw the Lease
//! record change (holder, renewTime, resourceVersion, ...) and takes over only when
//! `leaseDurationSeconds` has passed on its own monotonic clock with no change, or when the
//! Lease names no holder (released). The leader's own right to write is bounded by local
//! time too: it ends [`LeaseConfig::write_window`] (two thirds of the lease) after the start
//! of its last successful renewal, even when the renewal loop hangs, so that its writes stop
//! a third of a lease before any standby may start. [`Leadership`] is the controller's
//! write fence ([`nodeport_firewall_provider::fence`]): it is asked before every cloud
//! write, not once per target.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use nodeport_firewall_provider::fence::{self, WriteFence};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cli::human;

/// The shortest lease: `leaseDurationSeconds` is whole seconds, and a third of it is the
/// margin in which a write in flight must land.
pub const MIN_LEASE_DURATION: Duration = Duration::from_secs(3);
/// The longest lease: a replica that dies holding it blocks every write this long.
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(600);

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

    /// True while the lease is held and its last successful renewal started less than
    /// [`LeaseConfig::write_window`] ago (local monotonic time).
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

/// The controller's write fence: a write may start only while this instance leads.
impl WriteFence for Leadership {
    fn may_write(&self) -> nodeport_firewall_provider::Result<()> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(fence::lease_lost(
                "not the leader, or the lease was not renewed in time",
            ))
        }
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

impl LeaseConfig {
    /// How long after the start of a successful renewal this instance may still start
    /// writes: two thirds of the lease. The last third is the margin for a write already
    /// sent to land, and for clocks that run at slightly different rates, before a standby
    /// (which counts a full lease from when it saw that renewal) may take over.
    pub fn write_window(&self) -> Duration {
        self.lease_duration.saturating_sub(self.lease_duration / 3)
    }

    /// Refuses durations the elector cannot work with: a lease outside
    /// [`MIN_LEASE_DURATION`]..=[`MAX_LEASE_DURATION`], a zero renew period (it would spin),
    /// or one not shorter than the write window (writes would stop between renewals).
    pub fn validate(&self) -> Result<(), String> {
        let d = self.lease_duration;
        if !(MIN_LEASE_DURATION..=MAX_LEASE_DURATION).contains(&d) {
            return Err(format!(
                "--lease-duration {}: must be between {} and {}",
                human(d),
                human(MIN_LEASE_DURATION),
                human(MAX_LEASE_DURATION)
            ));
        }
        if self.renew_period.is_zero() || self.renew_period >= self.write_window() {
            return Err(format!(
                "lease renew period {}: must be above zero and below {} (two thirds of the lease duration {})",
                human(self.renew_period),
                human(self.write_window()),
                human(d)
            ));
        }
        Ok(())
    }

    /// `leaseDurationSeconds`, rounded up: a standby waits at least as long as we assume.
    fn duration_secs(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// The Lease record as a standby last saw it, and when (local monotonic time).
#[derive(Debug)]
struct Seen {
    record: String,
    at: Instant,
}

/// One elector: drives a [`Leadership`] from a Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Leadership,
    seen: Mutex<Option<Seen>>,
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
            seen: Mutex::new(None),
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    fn duration_secs(&self) -> i32 {
        self.config.duration_secs()
    }

    /// How long, on the local monotonic clock, the Lease record has been as it is now: the
    /// time since this instance first saw it so. Any write to the Lease (a renewal, a new
    /// holder) changes its resourceVersion, and starts the count again.
    fn unchanged_for(&self, lease: &Lease) -> Duration {
        let record = serde_json::to_string(&(&lease.metadata.resource_version, &lease.spec))
            .unwrap_or_default();
        let now = Instant::now();
        let Ok(mut seen) = self.seen.lock() else {
            return Duration::ZERO;
        };
        match seen.as_ref() {
            Some(s) if s.record == record => now.saturating_duration_since(s.at),
            _ => {
                *seen = Some(Seen { record, at: now });
                Duration::ZERO
            }
        }
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
        let (holder, their_duration) = lease.spec.as_ref().map_or((None, None), |spec| {
            (
                spec.holder_identity.clone().filter(|h| !h.is_empty()),
                spec.lease_duration_seconds,
            )
        });
        let mine = holder.as_deref() == Some(me.as_str());
        let takeover = !mine;
        if takeover {
            // Someone else's record: whatever we held has ended, and a takeover below starts
            // afresh (the controller then re-reads every target).
            self.lost();
            // The holder's own duration, as client-go judges it; never its renewTime, which
            // is the holder's wall clock.
            let duration = their_duration
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(self.config.lease_duration, Duration::from_secs);
            let unchanged = self.unchanged_for(&lease);
            if holder.is_some() && unchanged < duration {
                return Ok(false);
            }
            if let Some(h) = &holder {
                info!(lease = %self.config.name, holder = %h, unchanged_seconds = unchanged.as_secs(), "the lease holder stopped renewing: taking over");
            }
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if takeover {
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
        // Counted from before the request: a standby sees the renewal no earlier than that,
        // and counts a full lease from when it sees it.
        match started.checked_add(self.config.write_window()) {
            Some(until) => {
                self.leadership.set(Some(until));
                true
            }
            None => self.lost(),
        }
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
            // A round that hangs (an API server that stalls) is cut off when our writes
            // would stop anyway; the fence has stopped them by then in any case.
            let round =
                tokio::time::timeout(self.config.write_window(), self.try_acquire_or_renew()).await;
            match round {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    // A failed renewal ends leadership at once: better idle than two writers.
                    warn!(lease = %self.config.name, error = %e, "lease renewal failed");
                    self.lost();
                }
                Err(_) => {
                    warn!(lease = %self.config.name, "lease renewal timed out");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: Duration, renew: Duration) -> LeaseConfig {
        LeaseConfig {
            namespace: "ops".into(),
            name: "npf".into(),
            identity: "me".into(),
            lease_duration: lease,
            renew_period: renew,
        }
    }

    #[test]
    fn lease_settings_are_validated() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // (lease, renew, Ok or a part of the error)
        let cases = [
            (s(15), s(5), Ok(())),
            (s(3), ms(500), Ok(())),
            (s(600), s(200), Ok(())),
            (
                s(0),
                s(0),
                Err("--lease-duration 0s: must be between 3s and 10m"),
            ),
            (ms(2999), ms(500), Err("between 3s and 10m")),
            (s(601), s(5), Err("between 3s and 10m")),
            (s(u64::MAX), s(5), Err("between 3s and 10m")),
            (s(15), s(0), Err("must be above zero and below 10s")),
            (
                s(15),
                s(10),
                Err("below 10s (two thirds of the lease duration 15s)"),
            ),
        ];
        for (lease, renew, want) in cases {
            match (config(lease, renew).validate(), want) {
                (Ok(()), Ok(())) => {}
                (Err(got), Err(want)) => assert!(got.contains(want), "{lease:?}/{renew:?}: {got}"),
                (got, want) => panic!("{lease:?}/{renew:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn writes_stop_a_third_of_a_lease_early_and_the_lease_rounds_up() {
        let c = config(Duration::from_secs(15), Duration::from_secs(5));
        assert_eq!(c.write_window(), Duration::from_secs(10));
        assert_eq!(c.duration_secs(), 15);
        let c = config(Duration::from_millis(3500), Duration::from_secs(1));
        assert_eq!(c.duration_secs(), 4, "a standby waits at least as long");
    }

    #[test]
    fn leadership_is_the_write_fence_and_ends_by_local_time() {
        let l = Leadership::elected();
        assert!(fence::is_lease_lost(&l.may_write().unwrap_err()));
        l.set(Some(Instant::now() + Duration::from_secs(60)));
        assert_eq!(l.may_write(), Ok(()));
        // Past its deadline without a renewal: refused, with no one telling it.
        l.set(Some(Instant::now()));
        let e = l.may_write().unwrap_err();
        assert!(e.message.starts_with("lease lost: write refused"), "{e}");
        assert_eq!(Leadership::always().may_write(), Ok(()));
    }
}
