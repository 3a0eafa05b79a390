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
//!   engine so waiters see fresh reasons at once. Which nodes are out is
//!   kept in the lease state ([`crate::state::Returning`]): recorded before
//!   the grant, removed once the node counts as back, resumed (from zero
//!   passes) by a restarted or new leader.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tracing::{debug, info, warn};

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

/// How old a snapshot recorded for a node's preparation may be and still
/// be reused when the granter prepares the node again right away.
const REUSE_SNAPSHOT_WITHIN: chrono::Duration = chrono::Duration::seconds(60);

/// The most node names the standalone guard remembers.
pub const SEEN_MAX: usize = 10_000;

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

/// An etcd node going out: the node, its member's name and ID.
type GoingOut = (NodeName, String, u64);

/// The etcd quorum guard and grant preparer.
pub struct EtcdGuard {
    settings: GuardSettings,
    prober: Prober,
    health: RwLock<Arc<HealthSnapshot>>,
    returns: Mutex<Returns>,
    engine: OnceLock<Weak<Engine>>,
    /// Nodes' InternalIPs, when nodes are watched (Kubernetes).
    addresses: OnceLock<Arc<dyn NodeAddresses>>,
    /// Standalone: the nodes known to exist (they asked for or held the
    /// baton since this process started), which places the members named
    /// like them. At most [`SEEN_MAX`]; past that, new names are not
    /// remembered, which only holds more grants back.
    seen: Mutex<BTreeSet<NodeName>>,
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
            seen: Mutex::new(BTreeSet::new()),
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

    /// What `node` is to etcd in `health`; `Err` is why it waits. With the
    /// node watch, the node's role label makes it a control-plane node; the
    /// agent's `claimed_control_plane` can only add to that. Without it
    /// (standalone), a node that matches no member is no etcd node only
    /// while every voting member is placed on a known node.
    fn role(
        &self,
        node: &NodeName,
        claimed_control_plane: bool,
        health: &HealthSnapshot,
    ) -> Result<EtcdRole, String> {
        let Some(addresses) = self.addresses.get() else {
            let role = self.settings.map.role(
                node,
                claimed_control_plane,
                &InternalIps::NotWatched,
                health,
            );
            if role != Ok(EtcdRole::NotEtcd) {
                return role;
            }
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let unplaced = self.settings.map.unplaced_members(health, &seen);
            return match unplaced.as_slice() {
                [] => role,
                [one] => Err(format!(
                    "etcd: voting member {one} is on no known node (no --etcd-member-map entry names it, and no node named {one} has asked), so node {node} might carry it; map it with --etcd-member-map NODE={one} (list every etcd node so, even one named like its member), or exempt node {node} with --etcd-exempt-node {node} if it carries no member"
                )),
                several => Err(format!(
                    "etcd: voting members {} are on no known node (no --etcd-member-map entry names them, and no nodes so named have asked), so node {node} might carry one; map each with --etcd-member-map NODE=MEMBER (list every etcd node so, even one named like its member), or exempt node {node} with --etcd-exempt-node {node} if it carries no member",
                    several.join(", ")
                )),
            };
        };
        let labelled = addresses.control_plane(node);
        self.settings.map.role(
            node,
            claimed_control_plane || labelled,
            &addresses.internal_ips(node),
            health,
        )
    }

    /// The one judgement of which grants pair a control-plane backup
    /// (used by the check, the preparation and Confirm's
    /// [`GrantGuard::pairs_backup`]): a node in `role` carrying an etcd
    /// member that is a control-plane node.
    fn pairs_backup_as(&self, role: &EtcdRole, candidate: &Waiter) -> bool {
        matches!(role, EtcdRole::Member(_))
            && self.is_control_plane(&candidate.node, candidate.control_plane)
    }

    /// True for a control-plane node: labelled so (with the node watch)
    /// or claimed by its agent.
    fn is_control_plane(&self, node: &NodeName, claimed: bool) -> bool {
        claimed || self.addresses.get().is_some_and(|a| a.control_plane(node))
    }

    /// Remembers that these nodes exist (standalone member placement).
    fn remember<'a>(&self, nodes: impl IntoIterator<Item = &'a NodeName>) {
        if self.addresses.get().is_some() {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for node in nodes {
            if seen.len() >= SEEN_MAX {
                return;
            }
            if !seen.contains(node) {
                seen.insert(node.clone());
            }
        }
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
            let (going, back) = self.track(&holders, &health, &state);
            // Persist what changed (only the leader can; a follower's calls
            // are refused, and it resumes from the state once it leads).
            for (node, member, id) in going {
                if let Err(e) = engine.mark_returning(&node, &member, id).await {
                    debug!(node = %node, error = %e, "could not record that an etcd node is out");
                }
            }
            for node in back {
                if let Err(e) = engine.mark_returned(&node).await {
                    // The record stays: the node is resumed from zero passes
                    // next round, which only delays other etcd nodes.
                    debug!(node = %node, error = %e, "could not record that an etcd node is back");
                }
            }
            engine.poke();
        }
    }

    /// Tracks etcd nodes that are out: holders not tracked yet, and records
    /// in the state this replica did not know (after a restart or a
    /// failover, from zero passes); advances the "counts as back"
    /// bookkeeping. Returns the nodes to record as out and those back.
    fn track(
        &self,
        holders: &BTreeSet<NodeName>,
        health: &HealthSnapshot,
        state: &LeaseState,
    ) -> (Vec<GoingOut>, Vec<NodeName>) {
        let mut returns = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        for (node, record) in &state.returning {
            if !returns.contains(node) {
                info!(node = %node, member = %record.member, "etcd node not verified back yet (from the lease state): counting its rounds from zero");
                returns.resume(node, &record.member, record.member_id);
            }
        }
        let mut going = Vec::new();
        for (node, holding) in &state.holders {
            if returns.contains(node) {
                continue;
            }
            if let Ok(EtcdRole::Member(member)) = self.role(node, holding.control_plane, health)
                && let Some(m) = health.member(&member)
            {
                returns.going_out(node, &member, m.id);
                going.push((node.clone(), member, m.id));
            }
        }
        let back = returns.advance(holders, health, self.settings.back_after);
        for node in &back {
            info!(node = %node, passes = self.settings.back_after, "etcd node counts as back: its member is voting and healthy again");
        }
        (going, back)
    }

    /// Takes and verifies a snapshot from `source` for `candidate`'s grant;
    /// for a control-plane node, records it as the one its backup pairs
    /// with.
    async fn snapshot_for(
        &self,
        engine: &Engine,
        candidate: &Waiter,
        source: &super::health::MemberHealth,
        control_plane: bool,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
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
        if control_plane {
            // Its agent's backup of the certificates and kubeadm
            // configuration is kept beside this snapshot; the pairing is
            // saved before the grant says so.
            let name = taken.path.file_name().unwrap_or_default().to_string_lossy();
            // Stamped when it was taken and verified, not when asked for:
            // a slow snapshot is still reused by the decision that follows.
            engine
                .record_backup_snapshot(&candidate.node, &name, (self.clock)())
                .await
                .map_err(|e| {
                    format!(
                        "etcd: could not record the snapshot for {}'s backup ({e}); not granting",
                        candidate.node
                    )
                })?;
        }
        Ok(())
    }

    /// Prepares `candidate`'s etcd member for its grant (see
    /// [`EtcdGuard::prepare_member_out`]); once that ends the node counts
    /// passes like any node out that does not hold (after a success, only
    /// after a grace of a few rounds while its grant is committed).
    async fn prepare_member(&self, candidate: &Waiter) -> Result<(), String> {
        super::back::preparing(
            &self.returns,
            &candidate.node,
            self.prepare_member_out(candidate),
        )
        .await
    }

    /// Records the member as out, takes (or reuses) the snapshot and moves
    /// etcd's leader away from it.
    async fn prepare_member_out(&self, candidate: &Waiter) -> Result<(), String> {
        let health = self.health();
        let role = self.role(&candidate.node, candidate.control_plane, &health)?;
        let control_plane = self.pairs_backup_as(&role, candidate);
        let EtcdRole::Member(member) = role else {
            return Ok(());
        };
        let target = health
            .member(&member)
            .cloned()
            .ok_or_else(|| format!("etcd: member {member} is not in the member list"))?;
        // Out from now on: a failure below still leaves it tracked, which
        // only delays other etcd nodes until it is verified healthy. It is
        // recorded in the lease state before the grant, so no restart or
        // failover forgets it.
        self.returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .going_out(&candidate.node, &member, target.id);
        let engine = self
            .engine
            .get()
            .and_then(Weak::upgrade)
            .ok_or("etcd: the guard is not attached to the engine; not granting")?;
        engine
            .mark_returning(&candidate.node, &member, target.id)
            .await
            .map_err(|e| {
                format!(
                    "etcd: could not record that {} goes out ({e}); not granting",
                    candidate.node
                )
            })?;

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
        // The granter decides again after this preparation changed the
        // state (the pairing recorded below): the snapshot it just took is
        // reused, so that the second preparation changes nothing and the
        // grant goes through.
        let reused = match control_plane {
            true => engine
                .recent_backup_snapshot(&candidate.node, now - REUSE_SNAPSHOT_WITHIN)
                .await
                .filter(|name| self.settings.snapshots.dir.join(name).is_file()),
            false => None,
        };
        if let Some(name) = reused {
            debug!(node = %candidate.node, snapshot = %name, "etcd snapshot of this preparation reused");
        } else {
            self.snapshot_for(&engine, candidate, source, control_plane, now)
                .await?;
        }
        if voting.len() > 1 {
            super::leader::move_away(&self.prober, &health, &target)
                .await
                .map_err(|e| format!("etcd: {e}; not granting {}", candidate.node))?;
        }
        Ok(())
    }
}

/// The reason a control-plane etcd node waits when its agent makes no
/// backups. It starts with [`super::NO_BACKUP_SUPPORT`]
/// (`baton_waiters_without_backup_support` counts such waiters from the
/// queue, whatever reason they are told).
fn no_backup_support(node: &NodeName, member: &str) -> String {
    format!(
        "{}; upgrade baton-agent on this node (control-plane node {node} carries etcd member {member}: its grant needs a control-plane backup kept beside the etcd snapshot, and this request says its agent cannot make one; for manual work use batonctl hold)",
        super::NO_BACKUP_SUPPORT
    )
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
        _now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.remember(std::iter::once(&candidate.node).chain(state.holders.keys()));
        let health = self.health();
        let role = self.role(&candidate.node, candidate.control_plane, &health)?;
        // Its grant would ask for a control-plane backup (the preparation
        // pairs a snapshot with it): an agent that cannot make one would
        // drain the node without it. Checked before the quorum, so the
        // reason shown is the one that lasts until the agent is upgraded.
        let pairs = self.pairs_backup_as(&role, candidate);
        let EtcdRole::Member(member) = role else {
            return Ok(());
        };
        if pairs && !candidate.backs_up_control_plane {
            return Err(no_backup_support(&candidate.node, &member));
        }
        let mut out = self
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .out(&health, self.settings.back_after);
        // Out in the lease state but not tracked here yet (the first probe
        // round after a restart or failover has not run): out, no pass yet.
        for (node, record) in &state.returning {
            if !out.iter().any(|o| o.node == node.as_str()) {
                out.push(super::rule::OutNode {
                    node: node.to_string(),
                    member: record.member.clone(),
                    why: format!(
                        "is not verified back yet (0 of {} healthy checks in a row)",
                        self.settings.back_after
                    ),
                });
            }
        }
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
            health.age(),
        )
    }

    /// What [`EtcdGuard::prepare_member_out`] decides: a snapshot is paired
    /// with the grant when the node carries an etcd member and is a
    /// control-plane node (by its label or its agent's claim). Not known
    /// (the member list unread): false; Confirm's re-check then holds the
    /// step on the guard's own reason, and asks this again next time.
    fn pairs_backup(&self, candidate: &Waiter) -> bool {
        self.role(&candidate.node, candidate.control_plane, &self.health())
            .is_ok_and(|role| self.pairs_backup_as(&role, candidate))
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

    /// Nodes that carry no etcd member (or are exempt) need no snapshot
    /// and no leadership move. A node whose role cannot be told now is
    /// prepared (and so judged) the usual way.
    fn nothing_to_prepare(&self, candidate: &Waiter) -> bool {
        let health = self.health();
        matches!(
            self.role(&candidate.node, candidate.control_plane, &health),
            Ok(EtcdRole::NotEtcd | EtcdRole::Exempt)
        )
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

        /// Nodes named `cp-*` carry the control-plane label.
        fn control_plane(&self, node: &NodeName) -> bool {
            node.as_str().starts_with("cp-")
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

    /// An engine on a memory store, its clock stopped at `now`, whose only
    /// guard is `guard`, with `max_concurrent` holders at most; its
    /// granter runs.
    async fn engine_guarded_by(
        guard: &Arc<EtcdGuard>,
        max_concurrent: u32,
        now: DateTime<Utc>,
    ) -> Arc<Engine> {
        use crate::engine::EngineConfig;
        use crate::policy::Policy;
        use crate::store::memory::MemoryStore;

        let policy = Policy {
            max_concurrent,
            ..Policy::default()
        };
        Engine::guarded(
            Arc::new(MemoryStore::default()),
            EngineConfig::new(policy, "test"),
            guard.clone(),
            now,
        )
        .await
    }

    /// A waiter whose agent claims nothing and makes backups (every
    /// current agent).
    fn waiter(node: &str) -> Waiter {
        Waiter {
            node: NodeName::new(node).unwrap(),
            control_plane: false,
            backs_up_control_plane: true,
        }
    }

    /// A guard whose last probe saw three healthy members, etcd-1..3,
    /// advertising peer URLs on 10.0.0.1..3.
    fn guard_of_three_by_ip(now: DateTime<Utc>) -> Arc<EtcdGuard> {
        let guard = guard(now);
        guard.set_health(cluster(
            now,
            vec![
                member(1, "etcd-1").advertising(&["https://10.0.0.1:2380"], &[]),
                member(2, "etcd-2").advertising(&["https://10.0.0.2:2380"], &[]),
                member(3, "etcd-3").advertising(&["https://10.0.0.3:2380"], &[]),
            ],
        ));
        guard
    }

    /// [`guard_of_three_by_ip`], the members known to the node watch as
    /// `cp-1` (10.0.0.1, labelled control-plane), `w2` (10.0.0.2, a worker
    /// carrying a member) and `w9` (10.0.0.9, no member).
    fn labelled_cluster(now: DateTime<Utc>) -> Arc<EtcdGuard> {
        let guard = guard_of_three_by_ip(now);
        guard.map_by_internal_ip(Arc::new(Addresses(
            [
                ("cp-1", "10.0.0.1".parse().unwrap()),
                ("w2", "10.0.0.2".parse().unwrap()),
                ("w9", "10.0.0.9".parse().unwrap()),
            ]
            .into(),
        )));
        guard
    }

    /// A node whose grant would ask for a control-plane backup (a
    /// control-plane node, by its label or its agent's claim, carrying an
    /// etcd member) is never let through for an agent that cannot make
    /// one; nodes whose grants ask for none are not held back by it.
    #[test]
    fn an_agent_without_backups_never_passes_for_a_control_plane_etcd_node() {
        let now = Utc::now();
        let guard = labelled_cluster(now);
        let state = LeaseState::default();
        let old = |node: &str, claims: bool| Waiter {
            control_plane: claims,
            backs_up_control_plane: false,
            ..waiter(node)
        };
        // Labelled control-plane, whatever its agent claims.
        for claims in [false, true] {
            let reason = guard.check(&old("cp-1", claims), &state, now).unwrap_err();
            assert!(
                reason.starts_with(
                    "agent does not support control-plane backups; upgrade baton-agent on this node"
                ),
                "{reason}"
            );
            assert!(reason.contains("etcd-1"), "{reason}");
            assert!(
                !crate::etcd::is_guard_reason(&reason),
                "not an etcd outage: {reason}"
            );
        }
        assert_eq!(guard.check(&waiter("cp-1"), &state, now), Ok(()));
        // A worker carrying a member is a control-plane node by its
        // agent's claim alone.
        assert!(guard.check(&old("w2", true), &state, now).is_err());
        // No backup is asked for a worker's grant, whether it carries a
        // member or not.
        assert_eq!(guard.check(&old("w2", false), &state, now), Ok(()));
        assert_eq!(guard.check(&old("w9", false), &state, now), Ok(()));
    }

    /// Waits (bounded) until `baton_waiters_without_backup_support` reads
    /// `want` (it is counted every few seconds, or at once on
    /// `count_backup_support_now`).
    async fn wait_for_gauge(engine: &Engine, want: i64) {
        let gauge = &engine.metrics().waiters_without_backup_support;
        for _ in 0..200 {
            if gauge.get() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "baton_waiters_without_backup_support is {}, not {want}",
            gauge.get()
        );
    }

    /// Confirm releases a grant that lacks the pairing this says it needs
    /// (`Engine::confirm_step`): it names exactly the grants the
    /// preparation pairs, which are the ones an agent without backups is
    /// refused for, and nothing while the member list is unread.
    #[test]
    fn the_grants_that_pair_a_backup_are_the_ones_an_agent_without_backups_is_refused() {
        let now = Utc::now();
        let labelled = labelled_cluster(now);
        let state = LeaseState::default();
        for (node, claims, pairs) in [
            ("cp-1", false, true),
            ("cp-1", true, true),
            ("w2", true, true),
            ("w2", false, false),
            // Its agent says control-plane and etcd-3 (10.0.0.3) is on no
            // known node: whether it carries it is not known, so no pairing
            // is judged; the guard holds it with that reason.
            ("w9", true, false),
            ("w9", false, false),
        ] {
            let candidate = Waiter {
                control_plane: claims,
                ..waiter(node)
            };
            assert_eq!(labelled.pairs_backup(&candidate), pairs, "{node} {claims}");
            let without_backups = Waiter {
                backs_up_control_plane: false,
                ..candidate.clone()
            };
            let refused = labelled.check(&without_backups, &state, now).err();
            assert_eq!(
                refused
                    .as_deref()
                    .is_some_and(|r| r.starts_with(super::super::NO_BACKUP_SUPPORT)),
                pairs,
                "{node} {claims}: {refused:?}"
            );
        }
        // Unread: not known to pair (Confirm's re-check holds the step on
        // the guard's own reason meanwhile).
        let unread = guard(now);
        assert!(!unread.pairs_backup(&Waiter {
            control_plane: true,
            ..waiter("cp-1")
        }));
    }

    /// The engine with the guard: an older agent's Acquire for cp-1 is
    /// never granted and waits with the reason, while a node queued behind
    /// it is granted; cp-1 asking again with the capability is granted. An
    /// operator's hold (`batonctl hold`) runs no agent steps and is not
    /// held back by it.
    #[tokio::test]
    async fn an_older_agent_waits_for_its_upgrade_and_holds_nobody_back() {
        use crate::engine::{AcquireRequest, AcquireUpdate};

        let now = Utc::now();
        let guard = labelled_cluster(now);
        let engine = engine_guarded_by(&guard, 3, now).await;
        let ask = |node: &str, backs_up: bool, manual: bool| {
            let engine = engine.clone();
            let node = NodeName::new(node).unwrap();
            async move {
                engine
                    .acquire(AcquireRequest {
                        node,
                        control_plane: false,
                        reason: "test".into(),
                        manual,
                        backs_up_control_plane: backs_up,
                    })
                    .await
                    .unwrap()
                    .1
            }
        };
        type Events =
            tokio::sync::mpsc::UnboundedReceiver<Result<AcquireUpdate, crate::engine::EngineError>>;
        async fn next(events: &mut Events) -> AcquireUpdate {
            tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("an answer in time")
                .unwrap()
                .unwrap()
        }
        let mut cp1 = ask("cp-1", false, false).await;
        let mut w9 = ask("w9", false, false).await;
        assert!(matches!(next(&mut w9).await, AcquireUpdate::Granted(_)));
        let reason = loop {
            match next(&mut cp1).await {
                AcquireUpdate::Queued { reason, .. } if !reason.is_empty() => break reason,
                AcquireUpdate::Queued { .. } => {}
                AcquireUpdate::Granted(g) => panic!("an older agent was granted cp-1: {g:?}"),
            }
        };
        assert!(
            reason.contains("upgrade baton-agent on this node"),
            "{reason}"
        );
        let status = engine.snapshot().await;
        assert!(
            !status
                .state
                .holders
                .contains_key(&NodeName::new("cp-1").unwrap())
        );
        assert_eq!(status.queue[0].reason, reason, "status shows why");
        engine.count_backup_support_now().await;
        wait_for_gauge(&engine, 1).await;
        // Paused, cp-1 is told the pause (it applies to every waiter), and
        // it is still counted: the alert does not wait for the pause.
        engine.pause("op", "freeze").await.unwrap();
        let paused = loop {
            match next(&mut cp1).await {
                AcquireUpdate::Queued { reason, .. } if reason.contains("paused") => break reason,
                AcquireUpdate::Queued { .. } => {}
                AcquireUpdate::Granted(g) => panic!("an older agent was granted cp-1: {g:?}"),
            }
        };
        assert!(!paused.contains("upgrade baton-agent"), "{paused}");
        // Counted again while paused (the -1 shows it was).
        engine.metrics().waiters_without_backup_support.set(-1);
        engine.count_backup_support_now().await;
        wait_for_gauge(&engine, 1).await;
        engine.resume("op").await.unwrap();

        // Upgraded: the same node asks again, saying it backs up.
        let mut cp1 = ask("cp-1", true, false).await;
        let token = loop {
            if let AcquireUpdate::Granted(g) = next(&mut cp1).await {
                break g.fencing_token;
            }
        };
        let cp1_name = NodeName::new("cp-1").unwrap();
        engine
            .release(&cp1_name, token, "cp-1", "done")
            .await
            .unwrap();
        // An operator's hold on the control-plane etcd node is granted as
        // before: no agent steps run under it.
        let mut held = ask("cp-1", false, true).await;
        loop {
            if let AcquireUpdate::Granted(_) = next(&mut held).await {
                break;
            }
        }
    }

    #[test]
    fn nodes_out_in_the_lease_state_hold_etcd_nodes_back_after_a_restart() {
        let now = Utc::now();
        let guard = guard(now);
        let healthy = cluster(now, vec![member(1, "n1"), member(2, "n2"), member(3, "n3")]);
        guard.set_health(healthy.clone());
        // A new process: nothing in memory, n1 out according to the state.
        let mut state = LeaseState::default();
        state.returning.insert(
            NodeName::new("n1").unwrap(),
            crate::state::Returning {
                member: "n1".to_string(),
                member_id: 1,
                control_plane_snapshot: None,
            },
        );
        let reason = guard.check(&waiter("n2"), &state, now).unwrap_err();
        assert!(
            reason.contains("n1 (member n1) is not verified back yet (0 of 1"),
            "{reason}"
        );
        // The first round resumes it from zero passes and counts one.
        let (going, back) = guard.track(&BTreeSet::new(), &healthy, &state);
        assert!(going.is_empty());
        assert_eq!(back, vec![NodeName::new("n1").unwrap()]);
    }

    /// Red-team finding on issue 9 (5): the Confirm re-check must not hold
    /// a holder back by its own "out" records (it holds the baton, and its
    /// member is recorded as not back yet, in memory and in the state),
    /// while another etcd node's record still counts.
    #[tokio::test]
    async fn confirm_does_not_count_the_holders_own_out_records_against_it() {
        use crate::engine::{AcquireRequest, AcquireUpdate, Step};

        let now = Utc::now();
        let guard = guard(now);
        let healthy = cluster(now, vec![member(1, "n1"), member(2, "n2"), member(3, "n3")]);
        guard.set_health(healthy.clone());
        let engine = engine_guarded_by(&guard, 1, now).await;
        let n1 = NodeName::new("n1").unwrap();
        let (_, mut events) = engine
            .acquire(AcquireRequest {
                node: n1.clone(),
                control_plane: false,
                reason: "test".into(),
                manual: false,
                backs_up_control_plane: true,
            })
            .await
            .unwrap();
        let token = loop {
            if let AcquireUpdate::Granted(g) = events.recv().await.unwrap().unwrap() {
                break g.fencing_token;
            }
        };
        // n1 is out: recorded in the state (as the preparer does) and
        // tracked in memory (as the probe round does).
        engine.mark_returning(&n1, "n1", 1).await.unwrap();
        let state = engine.snapshot().await.state;
        let holders: BTreeSet<NodeName> = state.holders.keys().cloned().collect();
        guard.track(&holders, &healthy, &state);
        let confirmed = engine.confirm_step(&n1, token, Step::Reboot).await.unwrap();
        assert_eq!(confirmed.wait, None, "held back by its own record");

        // Another etcd node not verified back yet does hold it back.
        engine
            .mark_returning(&NodeName::new("n2").unwrap(), "n2", 2)
            .await
            .unwrap();
        let wait = engine.confirm_step(&n1, token, Step::Reboot).await.unwrap();
        let reason = wait.wait.expect("n2 is not back yet");
        assert!(reason.contains("node n2 (member n2)"), "{reason}");
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
        // Without node addresses, nothing says which node carries etcd-1..3:
        // w1 might, so it waits rather than pass for a plain worker.
        let reason = guard.check(&waiter("w1"), &state, now).unwrap_err();
        assert!(
            reason.contains("voting members etcd-1, etcd-2, etcd-3 are on no known node"),
            "{reason}"
        );

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

    #[test]
    fn the_control_plane_label_decides_not_the_agents_claim() {
        let now = Utc::now();
        let guard = guard_of_three_by_ip(now);
        // cp-9's member advertises a host name, so no InternalIP matches.
        guard.map_by_internal_ip(Arc::new(Addresses(
            [("cp-9", "10.0.0.9".parse().unwrap())].into(),
        )));
        let state = LeaseState::default();
        // Its agent does not say it is control-plane; the label does.
        let reason = guard.check(&waiter("cp-9"), &state, now).unwrap_err();
        assert!(reason.contains("control-plane node cp-9"), "{reason}");
        assert!(reason.contains("--etcd-member-map cp-9=MEMBER"), "{reason}");
        // A worker that claims control-plane is held back the same way.
        let claimed = Waiter {
            control_plane: true,
            ..waiter("w9")
        };
        assert!(guard.check(&claimed, &state, now).is_err());
        assert_eq!(guard.check(&waiter("w9"), &state, now), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn health_ages_on_the_monotonic_clock_whatever_the_wall_clock_says() {
        // The wall clock stands still (or was set back): the data must
        // still go stale as real time passes.
        let now = Utc::now();
        let guard = guard(now);
        guard.set_health(cluster(
            now,
            vec![member(1, "n1"), member(2, "n2"), member(3, "n3")],
        ));
        let state = LeaseState::default();
        assert_eq!(guard.check(&waiter("n1"), &state, now), Ok(()));
        tokio::time::advance(Duration::from_secs(6)).await;
        let reason = guard.check(&waiter("n1"), &state, now).unwrap_err();
        assert!(
            reason.contains("health data is 6.0s old (limit 5s)"),
            "{reason}"
        );
    }

    #[test]
    fn standalone_a_member_on_no_known_node_holds_back_every_node_that_might_carry_it() {
        let now = Utc::now();
        let guard = guard(now);
        guard.set_health(cluster(
            now,
            vec![member(1, "etcd-a"), member(2, "n2"), member(3, "n3")],
        ));
        let state = LeaseState::default();
        // n2 and n3 asked (their members are theirs); etcd-a is on nobody
        // known, so a node that claims nothing might be carrying it.
        assert_eq!(guard.check(&waiter("n2"), &state, now), Ok(()));
        assert_eq!(guard.check(&waiter("n3"), &state, now), Ok(()));
        let reason = guard.check(&waiter("w1"), &state, now).unwrap_err();
        assert!(
            reason.contains("voting member etcd-a is on no known node"),
            "{reason}"
        );
        assert!(reason.contains("--etcd-member-map NODE=etcd-a"), "{reason}");
        assert!(reason.contains("--etcd-exempt-node w1"), "{reason}");
    }
}
