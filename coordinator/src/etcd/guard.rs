//! [`EtcdGuard`]: the etcd quorum guard as the engine sees it.
//!
//! - As a [`GrantGuard`] it answers from the last health snapshot only (cheap
//!   and synchronous); the snapshot is refreshed by [`EtcdGuard::run`], and a
//!   stale or missing snapshot answers no.
//! - As a [`GrantPreparer`] it runs before an etcd node is granted: it marks
//!   the node as out, takes and verifies a snapshot from a healthy member
//!   other than the candidate (the leader by preference), and moves etcd
//!   leadership away if the candidate leads. Any failure refuses the grant.
//! - With the Kubernetes node watch ([`EtcdGuard::map_by_internal_ip`]) it
//!   also maps nodes to members by InternalIP ([`super::mapping`]).
//! - After each probe round it advances the "counts as back" tracking
//!   ([`super::back`]) with the engine's current holders, and pokes the
//!   engine so waiters see fresh reasons at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tracing::{info, warn};

use super::back::Returns;
use super::health::HealthSnapshot;
use super::mapping::{EtcdRole, InternalIps, MemberMap, NodeAddresses};
use super::probe::Prober;
use super::rule::{QuorumSettings, may_take_down};
use super::snapshot::{SnapshotSettings, take};
use crate::engine::{Clock, Engine, GrantPreparer};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Waiter};
use crate::state::LeaseState;

/// The guard's settings.
#[derive(Clone, Debug)]
pub struct GuardSettings {
    /// Node → member mapping and exemptions.
    pub map: MemberMap,
    /// The quorum rule's settings.
    pub quorum: QuorumSettings,
    /// How often etcd is probed.
    pub probe_interval: Duration,
    /// Where snapshots go.
    pub snapshots: SnapshotSettings,
    /// Healthy rounds in a row before a node that went out counts as back.
    pub back_after: u32,
}

/// The etcd quorum guard and grant preparer.
pub struct EtcdGuard {
    settings: GuardSettings,
    prober: Prober,
    health: RwLock<Arc<HealthSnapshot>>,
    returns: Mutex<Returns>,
    engine: OnceLock<Weak<Engine>>,
    /// Nodes' InternalIPs, when nodes are watched (Kubernetes).
    addresses: OnceLock<Arc<dyn NodeAddresses>>,
    clock: Clock,
}

impl EtcdGuard {
    /// A guard that knows nothing yet (so it answers no until the first
    /// probe round).
    pub fn new(settings: GuardSettings, prober: Prober, clock: Clock) -> Arc<Self> {
        let never = HealthSnapshot::unreadable(DateTime::<Utc>::MIN_UTC, "not probed yet");
        Arc::new(Self {
            settings,
            prober,
            health: RwLock::new(Arc::new(never)),
            returns: Mutex::new(Returns::default()),
            engine: OnceLock::new(),
            addresses: OnceLock::new(),
            clock,
        })
    }

    /// Connects the guard to the engine it guards (to read holders and to
    /// wake the granter). Call once, before [`EtcdGuard::run`].
    pub fn attach(&self, engine: &Arc<Engine>) {
        let _ = self.engine.set(Arc::downgrade(engine));
    }

    /// Also maps nodes to members by the InternalIPs `addresses` knows (the
    /// Kubernetes node watch). Call once, before the engine first asks;
    /// later calls are ignored.
    pub fn map_by_internal_ip(&self, addresses: Arc<dyn NodeAddresses>) {
        let _ = self.addresses.set(addresses);
    }

    /// What `node` is to etcd in `health`; `Err` is why it waits.
    fn role(
        &self,
        node: &NodeName,
        control_plane: bool,
        health: &HealthSnapshot,
    ) -> Result<EtcdRole, String> {
        let ips = match self.addresses.get() {
            Some(addresses) => addresses.internal_ips(node),
            None => InternalIps::NotWatched,
        };
        self.settings.map.role(node, control_plane, &ips, health)
    }

    /// Replaces the last health snapshot (tests stand in for a probe round).
    #[cfg(test)]
    fn set_health(&self, health: HealthSnapshot) {
        *self.health.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(health);
    }

    /// The last health snapshot.
    pub fn health(&self) -> Arc<HealthSnapshot> {
        self.health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Probes etcd every interval until the engine is gone.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_summary = String::new();
        loop {
            tick.tick().await;
            let clock = self.clock.clone();
            let health = Arc::new(self.prober.probe(move || clock()).await);
            let summary = summarize(&health);
            if summary != last_summary {
                info!(health = %summary, "etcd health changed");
                last_summary = summary;
            }
            *self.health.write().unwrap_or_else(|e| e.into_inner()) = health.clone();
            let engine = match self.engine.get().map(Weak::upgrade) {
                Some(Some(engine)) => engine,
                Some(None) => return,
                None => continue,
            };
            let voting = health.members.iter().filter(|m| m.voting());
            let metrics = engine.metrics();
            metrics
                .etcd_voting_members
                .set(voting.clone().count() as i64);
            metrics
                .etcd_healthy_voting_members
                .set(voting.filter(|m| m.healthy()).count() as i64);
            let state = engine.snapshot().await.state;
            let holders: BTreeSet<NodeName> = state.holders.keys().cloned().collect();
            self.track(&holders, &health, &state);
            engine.poke();
        }
    }

    /// Adds etcd holders not yet tracked (e.g. after a failover) and advances
    /// the "counts as back" bookkeeping.
    fn track(&self, holders: &BTreeSet<NodeName>, health: &HealthSnapshot, state: &LeaseState) {
        let mut returns = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        for (node, holding) in &state.holders {
            if returns.contains(node) {
                continue;
            }
            if let Ok(EtcdRole::Member(member)) = self.role(node, holding.control_plane, health)
                && let Some(m) = health.member(&member)
            {
                returns.going_out(node, &member, m.id);
            }
        }
        for node in returns.advance(holders, health, self.settings.back_after) {
            info!(node = %node, passes = self.settings.back_after, "etcd node counts as back: its member is voting and healthy again");
        }
    }

    async fn prepare_member(&self, candidate: &Waiter) -> Result<(), String> {
        let health = self.health();
        let member = match self.role(&candidate.node, candidate.control_plane, &health)? {
            EtcdRole::Member(m) => m,
            EtcdRole::NotEtcd | EtcdRole::Exempt => return Ok(()),
        };
        let target = health
            .member(&member)
            .cloned()
            .ok_or_else(|| format!("etcd: member {member} is not in the member list"))?;
        // Out from now on: a failure below still leaves it tracked, which
        // only delays other etcd nodes until it is verified healthy.
        self.returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .going_out(&candidate.node, &member, target.id);

        let voting: Vec<_> = health.members.iter().filter(|m| m.voting()).collect();
        let leader = health.agreed_leader().ok().map(|m| m.id);
        let source = if voting.len() == 1 {
            Some(&target)
        } else {
            voting
                .iter()
                .filter(|m| m.id != target.id && m.healthy())
                .max_by_key(|m| (Some(m.id) == leader, m.applied_index))
                .copied()
        }
        .ok_or_else(|| {
            format!(
                "etcd: no healthy member other than {member} to take a snapshot from; not granting"
            )
        })?;
        let now = (self.clock)();
        let taken = match self.prober.client(&source.endpoint).await {
            Ok(mut client) => take(&mut client, &source.name, &self.settings.snapshots, now).await,
            Err(e) => Err(format!("cannot reach it: {e}")),
        };
        if let Some(engine) = self.engine.get().and_then(Weak::upgrade) {
            engine.metrics().etcd_snapshot(taken.is_ok());
        }
        let taken = taken.map_err(|e| {
            format!(
                "etcd: snapshot from member {} failed ({e}); not granting {}",
                source.name, candidate.node
            )
        })?;
        info!(
            node = %candidate.node,
            source = %source.name,
            path = %taken.path.display(),
            size = taken.size,
            sha256 = %taken.sha256,
            "etcd snapshot taken and verified"
        );
        if voting.len() > 1 {
            super::leader::move_away(&self.prober, &health, &target)
                .await
                .map_err(|e| format!("etcd: {e}; not granting {}", candidate.node))?;
        }
        Ok(())
    }
}

/// One line for logs: "n1 ok, n2 connection refused; alarms: none".
fn summarize(health: &HealthSnapshot) -> String {
    if let Some(reason) = &health.unreadable {
        return format!("unreadable: {reason}");
    }
    let members: Vec<String> = health
        .members
        .iter()
        .map(|m| format!("{} {}", m.label(), m.problem.as_deref().unwrap_or("ok")))
        .collect();
    let alarms: Vec<&str> = health.alarms.iter().map(|a| a.kind.as_str()).collect();
    format!(
        "{}; alarms: {}",
        members.join(", "),
        if alarms.is_empty() {
            "none".to_string()
        } else {
            alarms.join(", ")
        }
    )
}

impl GrantGuard for EtcdGuard {
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let health = self.health();
        let member = match self.role(&candidate.node, candidate.control_plane, &health)? {
            EtcdRole::Member(m) => m,
            EtcdRole::NotEtcd | EtcdRole::Exempt => return Ok(()),
        };
        let mut out = self
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .out(&health, self.settings.back_after);
        for (node, holding) in &state.holders {
            if out.iter().any(|o| o.node == node.as_str()) {
                continue;
            }
            if let Ok(EtcdRole::Member(m)) = self.role(node, holding.control_plane, &health) {
                out.push(super::rule::OutNode {
                    node: node.to_string(),
                    member: m,
                    why: "holds the baton".to_string(),
                });
            }
        }
        may_take_down(
            &health,
            candidate.node.as_str(),
            &member,
            &out,
            &self.settings.quorum,
            now,
        )
    }
}

impl GrantPreparer for EtcdGuard {
    fn prepare<'a>(&'a self, candidate: &'a Waiter) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let result = self.prepare_member(candidate).await;
            if let Err(reason) = &result {
                warn!(node = %candidate.node, reason = %reason, "etcd preparation failed");
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::etcd::health::fixtures::{cluster, member};
    use crate::etcd::probe::ProbeSettings;

    /// Node addresses as the Kubernetes node watch would report them.
    struct Addresses(BTreeMap<&'static str, IpAddr>);

    impl NodeAddresses for Addresses {
        fn internal_ips(&self, node: &NodeName) -> InternalIps {
            InternalIps::Known(self.0.get(node.as_str()).copied().into_iter().collect())
        }
    }

    fn guard(now: DateTime<Utc>) -> Arc<EtcdGuard> {
        let settings = GuardSettings {
            map: MemberMap::default(),
            quorum: Default::default(),
            probe_interval: Duration::from_secs(1),
            snapshots: SnapshotSettings {
                dir: std::env::temp_dir(),
                keep: 1,
                stall_timeout: Duration::from_secs(1),
            },
            back_after: 1,
        };
        let prober = Prober::new(ProbeSettings {
            endpoints: Vec::new(),
            tls: None,
            timeout: Duration::from_secs(1),
            max_apply_lag: 10,
            read_key: "probe".to_string(),
        });
        EtcdGuard::new(settings, prober, Arc::new(move || now))
    }

    fn waiter(node: &str) -> Waiter {
        Waiter {
            node: NodeName::new(node).unwrap(),
            control_plane: false,
        }
    }

    #[test]
    fn workers_carrying_a_member_by_internal_ip_are_guarded() {
        let now = Utc::now();
        let health = |third_down: bool| {
            let third = member(3, "etcd-3").advertising(&["https://10.0.0.3:2380"], &[]);
            cluster(
                now,
                vec![
                    member(1, "etcd-1").advertising(&["https://10.0.0.1:2380"], &[]),
                    member(2, "etcd-2").advertising(&[], &["https://[fd00::2]:2379"]),
                    if third_down {
                        third.down("connection refused")
                    } else {
                        third
                    },
                ],
            )
        };
        let addresses = Addresses(
            [
                ("w1", "10.0.0.1".parse().unwrap()),
                ("w2", "fd00::2".parse().unwrap()),
                ("w9", "10.0.0.9".parse().unwrap()),
            ]
            .into(),
        );
        let guard = guard(now);
        guard.set_health(health(true));
        let state = LeaseState::default();
        // Without node addresses, w1 looks like a plain worker.
        assert_eq!(guard.check(&waiter("w1"), &state, now), Ok(()));

        guard.map_by_internal_ip(Arc::new(addresses));
        let reason = guard.check(&waiter("w1"), &state, now).unwrap_err();
        assert!(reason.contains("etcd-3"), "{reason}");
        // baton_etcd_blocked_waiters counts waiters by this prefix.
        assert!(crate::etcd::is_guard_reason(&reason), "{reason}");
        assert_eq!(guard.check(&waiter("w9"), &state, now), Ok(()));

        // All healthy: w1 may go; while it holds the baton, w2 (etcd-2 by
        // its IPv6 address) is held back, and w9 (no member) is not.
        guard.set_health(health(false));
        assert_eq!(guard.check(&waiter("w1"), &state, now), Ok(()));
        let mut state = LeaseState::default();
        state
            .grant(&NodeName::new("w1").unwrap(), false, false, "test", now)
            .unwrap();
        let reason = guard.check(&waiter("w2"), &state, now).unwrap_err();
        assert!(reason.contains("w1"), "{reason}");
        assert_eq!(guard.check(&waiter("w9"), &state, now), Ok(()));
    }
}
