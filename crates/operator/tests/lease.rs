//! Leader election against the test API server, through kube's real HTTP client: writes are
//! fenced by the lease, write by write, and a standby judges the lease by its own clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nodeport_firewall::controller::gate::Gated;
use nodeport_firewall::controller::leader::{Elector, LeaseConfig};
use nodeport_firewall::controller::metrics::Metrics;
use nodeport_firewall::controller::{self};
use nodeport_firewall_e2e::kube_api::ApiServer;
use nodeport_firewall_provider::fence;
use nodeport_firewall_provider::{
    ApplyFailure, ApplyReport, CallStats, Error, MemoryProvider, Observation, OpKind, PoolTarget,
    PoolView, Provider, Render, Result, RetryPolicy, Target, TargetPlan,
};
use serde_json::json;

const NAMESPACE: &str = "ops";
const LEASE: &str = "npf";

fn client(server: &ApiServer) -> kube::Client {
    controller::install_crypto_provider();
    let config = kube::Config::new(server.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: NAMESPACE.into(),
        name: LEASE.into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_period: Duration::from_millis(300),
    }
}

fn op_kind(op: &str) -> OpKind {
    if op == "Put" {
        OpKind::Write
    } else {
        OpKind::Read
    }
}

/// A provider whose apply makes `writes` sequential cloud writes through the shared retry
/// policy, `gap` apart, as a slow Azure or GCP target does; it notes when each was sent.
struct SlowWriter {
    inner: MemoryProvider,
    stats: CallStats,
    writes: usize,
    gap: Duration,
    sent: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Provider for SlowWriter {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn renderer(&self) -> &dyn Render {
        self.inner.renderer()
    }
    async fn resolve(&self, pool: PoolView<'_>) -> Result<Vec<PoolTarget>> {
        self.inner.resolve(pool).await
    }
    async fn observe(&self, target: &Target) -> Result<Observation> {
        self.inner.observe(target).await
    }
    async fn owned_targets(&self, config: &nodeport_firewall_model::Config) -> Result<Vec<Target>> {
        self.inner.owned_targets(config).await
    }
    async fn apply(&self, _plan: &TargetPlan) -> std::result::Result<ApplyReport, ApplyFailure> {
        let mut report = ApplyReport::default();
        for _ in 0..self.writes {
            let sent = RetryPolicy::fast()
                .call(
                    &self.stats,
                    "Test",
                    "Put",
                    || {
                        self.sent.lock().unwrap().push(Instant::now());
                        std::future::ready(Ok(()))
                    },
                    |_, e: Error| e,
                )
                .await;
            if let Err(e) = sent {
                return Err(ApplyFailure::after(&report, e));
            }
            report.added += 1;
            tokio::time::sleep(self.gap).await;
        }
        Ok(report)
    }
}

fn empty_plan() -> TargetPlan {
    serde_json::from_value(json!({
        "target": {"provider": "memory", "id": "t"},
        "pools": [],
        "changes": [],
        "removeFirst": false,
        "usage": serde_json::to_value(nodeport_firewall_model::plan::Usage::default()).unwrap(),
    }))
    .unwrap()
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_stall_mid_apply_writes_nothing_after_its_lease() {
    let server = ApiServer::start().await;
    let elector = Elector::new(client(&server), lease_config("one"));
    let config = lease_config("one");
    let leadership = elector.leadership();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(elector.run(stop_rx));
    until("leadership", Duration::from_secs(10), || {
        leadership.is_leader()
    })
    .await;

    let writer = Arc::new(SlowWriter {
        inner: MemoryProvider::from_config("test", None).unwrap(),
        stats: CallStats::new(op_kind),
        writes: 40,
        gap: Duration::from_millis(100),
        sent: Mutex::new(Vec::new()),
    });
    let gated = Gated::new(
        writer.clone(),
        leadership.clone(),
        false,
        Arc::new(Metrics::new()),
    );
    let plan = empty_plan();
    let apply = gated.apply(&plan);
    let stall = async {
        // Mid-apply, the API server stops answering Lease requests: renewals stall.
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.set_lease_delay(Duration::MAX);
        Instant::now()
    };
    let (outcome, stalled_at) = tokio::join!(apply, stall);

    let failure = outcome.expect_err("the apply must stop");
    assert!(fence::is_lease_lost(&failure.error), "{failure:?}");
    assert!(
        failure.error.message.contains("lease lost: write refused"),
        "{failure}"
    );
    let sent = writer.sent.lock().unwrap().clone();
    assert!(sent.len() >= 5, "writes went while the lease was renewed");
    assert!(sent.len() < 40, "the apply was cut short");
    assert_eq!(failure.written.added, sent.len());
    // The last renewal that succeeded started before the stall: writes stop two thirds of
    // a lease after it, well before the lease ends for a standby.
    let last = *sent.last().unwrap();
    assert!(
        last < stalled_at + config.write_window(),
        "a write {:?} after the stall, window {:?}",
        last - stalled_at,
        config.write_window()
    );
    assert!(last < stalled_at + config.lease_duration);
    assert!(!leadership.is_leader());
    assert_eq!(writer.stats.writes(), sent.len());

    // A new apply is refused before its first write.
    let again = gated.apply(&plan).await.unwrap_err();
    assert!(fence::is_lease_lost(&again.error), "{again:?}");
    assert_eq!(writer.sent.lock().unwrap().len(), sent.len());

    server.set_lease_delay(Duration::ZERO);
    let _ = stop_tx.send(true);
    running.await.unwrap();
}

/// A Lease held by `holder`, whose `renewTime` is `skew` off the test's clock.
fn lease(holder: &str, renew_offset_secs: i64) -> serde_json::Value {
    let renew = k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(renew_offset_secs);
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": NAMESPACE},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 3,
            "renewTime": renew.to_string(),
            "acquireTime": renew.to_string(),
            "leaseTransitions": 0,
        }
    })
}

fn holder(server: &ApiServer) -> String {
    server.lease(NAMESPACE, LEASE).unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_a_skewed_clock_does_not_take_over_a_live_leader() {
    let server = ApiServer::start().await;
    // The leader's clock is 30 s behind the standby's (a standby 30 s ahead): every
    // renewTime it writes is 30 s in the past by the standby's clock, ten leases ago.
    server.put("Lease", lease("old", -30), "ADDED");
    let standby = Elector::new(client(&server), lease_config("two"));
    let last_renewal = Arc::new(Mutex::new(Instant::now()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let renewer = {
        let server = server.clone();
        let last_renewal = last_renewal.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(400)) => {}
                    _ = stop_rx.changed() => return,
                }
                server.put("Lease", lease("old", -30), "MODIFIED");
                *last_renewal.lock().unwrap() = Instant::now();
            }
        })
    };

    // Two lease durations of a live leader: the standby never takes over.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(6) {
        assert!(
            !standby.try_acquire_or_renew().await.unwrap(),
            "took over a live leader"
        );
        assert!(!standby.leadership().is_leader());
        assert_eq!(holder(&server), "old");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The leader dies: the standby takes over once a lease has passed on its own clock
    // since it last saw the record change, and not before.
    let _ = stop_tx.send(true);
    renewer.await.unwrap();
    let died = *last_renewal.lock().unwrap();
    let took_over = loop {
        if standby.try_acquire_or_renew().await.unwrap() {
            break Instant::now();
        }
        assert!(died.elapsed() < Duration::from_secs(10), "never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        took_over >= died + Duration::from_secs(3),
        "took over {:?} after the last renewal",
        took_over - died
    );
    assert_eq!(holder(&server), "two");
    assert!(standby.leadership().is_leader());
    let lease = server.lease(NAMESPACE, LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_with_a_clock_far_ahead_does_not_block_a_takeover() {
    let server = ApiServer::start().await;
    // Its last renewTime is an hour in the future by the standby's clock; it renews no more.
    server.put("Lease", lease("ahead", 3600), "ADDED");
    let standby = Elector::new(client(&server), lease_config("two"));
    let first = Instant::now();
    let took_over = loop {
        if standby.try_acquire_or_renew().await.unwrap() {
            break Instant::now();
        }
        assert!(first.elapsed() < Duration::from_secs(10), "never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A full lease after the standby first saw the record, whatever its renewTime says.
    assert!(took_over >= first + Duration::from_secs(3));
    assert_eq!(holder(&server), "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_at_once() {
    let server = ApiServer::start().await;
    let one = Elector::new(client(&server), lease_config("one"));
    assert!(one.try_acquire_or_renew().await.unwrap());
    let two = Elector::new(client(&server), lease_config("two"));
    assert!(!two.try_acquire_or_renew().await.unwrap());
    one.release().await;
    assert!(!one.leadership().is_leader());
    assert!(two.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&server), "two");
}
