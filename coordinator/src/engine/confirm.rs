//! Confirm: the holder asks right before a destructive step (drain, update,
//! reboot) whether it may take it now.
//!
//! Guards are checked when the baton is granted, but a drain can take many
//! minutes, and an etcd member can fail, another control-plane node go
//! NotReady or the node facts go stale meanwhile. Confirm checks the
//! holder's token, renews its lease (a save, so the answer comes from a
//! replica whose write just went through, on the engine's one commit path),
//! and then re-runs the grant rule for the holder as if it were asking for
//! the baton now:
//! - with the holder itself taken out of the holders (it does not stand in
//!   its own way: "another etcd node holds the baton", "a control-plane
//!   node holds it" and the concurrency limit count only the others) and
//!   out of the unavailable nodes (its own planned NotReady is not an
//!   outage);
//! - with every guard (etcd quorum and health, node facts, NotReady
//!   control-plane nodes, stale facts) and the built-in limits;
//! - but not pause or maintenance windows: they decide when new
//!   maintenance starts, and a holder finishes what it started (pausing
//!   "stops granting; holders keep the baton and finish").
//!
//! Any reason the rule gives becomes "wait, with this reason"; the agent
//! keeps renewing and asks again after `retry_after`.
//!
//! Before the rule, the grant's control-plane backup: a grant that asked
//! for one waits until it was kept; a grant that should have asked for one
//! and carries no pairing (an older release's grant of a control-plane etcd
//! node, read during an upgrade in the middle of a maintenance) is released
//! and refused, so no step is ever confirmed on it and the node's next
//! grant asks for the backup.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{Engine, EngineError, Inner};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Policy, Waiter, decide};
use crate::state::{LeaseError, Phase};
use crate::store::Fence;
use crate::window::WindowSet;

/// The longest a holder told to wait is asked to wait before asking again
/// (guards refresh their data about once a second).
pub const CONFIRM_RETRY: StdDuration = StdDuration::from_secs(2);

/// The destructive step a holder is about to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Cordon and drain, or the pre-maintenance units.
    Drain,
    /// Apply the OS update.
    Update,
    /// Reboot the node.
    Reboot,
}

impl Step {
    /// The lowercase name for logs and reasons.
    pub fn name(self) -> &'static str {
        match self {
            Step::Drain => "drain",
            Step::Update => "update",
            Step::Reboot => "reboot",
        }
    }
}

/// The answer to a Confirm, true at the moment it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    /// `None`: take the step now. `Some(reason)`: wait, then ask again.
    pub wait: Option<String>,
    /// The lease was renewed: renew again before this time.
    pub overdue_at: DateTime<Utc>,
    /// When to ask again if told to wait.
    pub retry_after: StdDuration,
}

impl Engine {
    /// Checks that `token` is `node`'s current token (else
    /// [`crate::state::LeaseError`], FAILED_PRECONDITION), renews the lease
    /// and re-runs every guard for the holder as if granting it now.
    ///
    /// Guarantee: `wait` is `None` only if, at this moment and on this
    /// leader's state, the grant rule (with pause and windows left out)
    /// would grant the node the baton if it did not hold it.
    pub async fn confirm_step(
        &self,
        node: &NodeName,
        token: u64,
        step: Step,
    ) -> Result<Confirmation, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        self.commit(&mut inner, |s| {
            s.renew(node, token, now)?;
            // Asked before its update or reboot, its drain is done,
            // whatever its best-effort reports said (they may all have
            // been lost): no renewal or report releases it from now on.
            if step != Step::Drain
                && let Some(holding) = s.holders.get_mut(node)
            {
                holding.past_drain = true;
            }
            Ok(())
        })
        .await?;
        if inner.overdue_seen.remove(node) {
            info!(node = %node, token, "holder confirmed; no longer overdue");
            self.changed();
        }
        let control_plane = inner.state.holders[node].control_plane;
        let unpaired = self.lacks_its_backup_pairing(&inner, node);
        // Released only while nothing is known to have been done on the
        // node: a restarted agent (or one that lost its state file) asks
        // Confirm(drain) again, and the phase its reports left says whether
        // its update already ran.
        if unpaired && step == Step::Drain && inner.state.untouched(node) {
            return Err(self
                .release_unpaired(&mut inner, node, token, None, "its Confirm(drain)", now)
                .await);
        }
        // The backup first, checked here and not only by the agent, so
        // that an agent too old to send it is held, never drained.
        let wait = if unpaired {
            Some(past_its_drain_unpaired(node, token))
        } else {
            match inner.state.backup_missing(node) {
                Some(reason) => Some(reason),
                None => self.recheck(&inner, node, control_plane, now).err(),
            }
        };
        match &wait {
            None => {
                info!(node = %node, token, step = step.name(), "confirmed: the holder may proceed")
            }
            Some(reason) => {
                warn!(node = %node, token, step = step.name(), reason = %reason, "confirm: the holder must wait")
            }
        }
        let renew = self.config.renew_interval.to_std().unwrap_or(CONFIRM_RETRY);
        // Held for lacking its pairing, it waits for an operator: asked
        // again at its renewal pace, not a guard's.
        let retry_after = match unpaired {
            true => renew.max(CONFIRM_RETRY),
            false => renew.clamp(StdDuration::from_millis(100), CONFIRM_RETRY),
        };
        Ok(Confirmation {
            wait,
            overdue_at: now + self.config.overdue_after,
            retry_after,
        })
    }

    /// True when `node`'s grant carries no control-plane backup pairing
    /// (and kept no backup) while a guard's preparation would pair one
    /// with a grant of it now: a grant made by a release before backups
    /// (read from its state during an upgrade in the middle of a
    /// maintenance), or before the node was known to carry an etcd
    /// member. Confirming its steps would drain, update and reboot a
    /// control-plane etcd node without a backup. An operator's hold is
    /// the operator's; it is never judged here.
    pub(super) fn lacks_its_backup_pairing(&self, inner: &Inner, node: &NodeName) -> bool {
        let holding = &inner.state.holders[node];
        if holding.phase == Phase::Manual
            || holding.backup_kept.is_some()
            || inner.state.backup_snapshot(node).is_some()
        {
            return false;
        }
        let waiter = Waiter {
            node: node.clone(),
            control_plane: holding.control_plane,
            backs_up_control_plane: true,
        };
        self.guards.iter().any(|g| g.pairs_backup(&waiter))
    }

    /// At a call that comes before a drain (a report that it starts, an
    /// older agent's renewal), judged on the current state: releases
    /// `node`'s grant `token` if it is current, its reports went no further
    /// than its grant, ever, and it lacks its backup pairing; the error is
    /// the answer then. Anything else: `Ok`, and the call goes on (a stale
    /// token is refused by its own commit).
    pub(super) async fn release_if_unpaired(
        &self,
        inner: &mut Inner,
        node: &NodeName,
        token: u64,
        at: &str,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let fence = self.ensure_current(inner).await?;
        // A holder already draining renews and reports progress through
        // its drain: it is judged at its Confirm of the next step instead.
        let granted_only = inner
            .state
            .check_token(node, token)
            .is_ok_and(|h| h.phase == Phase::Granted && !h.past_drain);
        if !granted_only || !self.lacks_its_backup_pairing(inner, node) {
            return Ok(());
        }
        Err(self
            .release_unpaired(inner, node, token, Some(&fence), at, now)
            .await)
    }

    /// Releases `node`'s grant `token`, which lacks its backup pairing,
    /// `at` a point where nothing is known to have been touched on the
    /// node ([`Engine::release_if_unpaired`], or its Confirm(drain) while
    /// [`crate::state::LeaseState::untouched`]), onto the memory of
    /// `decided` when given (audited; its slot goes to the next waiter as
    /// after any release). Gives the error that tells its agent:
    /// FAILED_PRECONDITION, on which the agent gives the node back, holds
    /// back as after a lost baton, and asks again; the new grant pairs a
    /// snapshot and asks for the backup. An agent that cannot make one
    /// then waits with the guard's "upgrade baton-agent" reason instead.
    ///
    /// Never later: the node may be drained, its update running (a
    /// restarted agent confirms the update it follows) or its reboot
    /// requested, and a release would stop the update half-way or give
    /// back a node whose reboot is still to come. Those steps wait
    /// ([`past_its_drain_unpaired`]).
    pub(super) async fn release_unpaired(
        &self,
        inner: &mut Inner,
        node: &NodeName,
        token: u64,
        decided: Option<&Fence>,
        at: &str,
        now: DateTime<Utc>,
    ) -> EngineError {
        let started = std::time::Instant::now();
        let reason = format!(
            "released at {at}, before any step: the grant carries no control-plane backup pairing, which a grant of this etcd member needs; the node asks again, and its new grant asks for the backup (an agent that makes none waits for its upgrade)"
        );
        let released = self
            .commit_then(
                inner,
                decided,
                |s| s.force_release_token(node, token, "coordinator", &reason, now),
                |engine, inner, next| engine.grant_within(inner, next, now),
            )
            .await;
        match released {
            Ok((token, handed)) => {
                warn!(node = %node, token, "{reason}");
                self.metrics.unpaired_grants_released.inc();
                self.after_release(inner, node, started, handed, now);
                EngineError::Lease(LeaseError::UnpairedGrant {
                    node: node.clone(),
                    token,
                })
            }
            Err(e) => e,
        }
    }

    /// The grant rule for holder `node` as if it asked now: `Err` is the
    /// reason it would wait.
    fn recheck(
        &self,
        inner: &Inner,
        node: &NodeName,
        control_plane: bool,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let mut state = inner.state.without_audit();
        state.holders.remove(node);
        state.paused = None;
        let unavailable: Vec<NodeName> = inner
            .unavailable
            .iter()
            .filter(|n| *n != node)
            .cloned()
            .collect();
        let policy = Policy {
            windows: WindowSet::default(),
            ..(*self.policy()).clone()
        };
        let waiter = Waiter {
            node: node.clone(),
            control_plane,
            // What this grant needs was settled when it was made: a backup
            // it asked for is checked first (`backup_missing`), and a grant
            // that should have asked for one and did not was released
            // before this (`lacks_its_backup_pairing`).
            backs_up_control_plane: true,
        };
        let guards: Vec<&dyn GrantGuard> = self.guards.iter().map(|g| g.as_ref()).collect();
        let decision = decide(&state, &[waiter], &unavailable, &policy, &guards, now);
        if decision.grant.as_ref() == Some(node) {
            return Ok(());
        }
        Err(decision
            .reason_at(0)
            .map(|reason| reason.text.to_string())
            .unwrap_or_else(|| "the grant rule did not allow it".to_string()))
    }
}

/// Why a grant that lacks its backup pairing is held at its update or
/// reboot: past its drain nothing is released automatically (see
/// `Engine::release_unpaired`), and nothing is confirmed either.
fn past_its_drain_unpaired(node: &NodeName, token: u64) -> String {
    format!(
        "this grant carries no control-plane backup pairing (an older coordinator's grant, or one made before the node's etcd member was known) and the node is past its drain: no update or reboot is confirmed on it. An update already running goes on (unit baton-update-{token}.service); once it has ended, `batonctl force-release {node} --token {token} --reason 'no backup pairing'`: the agent gives the node back and asks again, and its new grant asks for the backup"
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;

    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::engine::{AcquireRequest, AcquireUpdate, EngineConfig};
    use crate::state::{LeaseError, LeaseState};
    use crate::store::memory::MemoryStore;

    /// A guard that says what the test tells it, and records whom it saw
    /// holding the baton.
    #[derive(Default)]
    struct Switch {
        refuse: Mutex<Option<String>>,
        holders_seen: Mutex<Vec<Vec<String>>>,
        /// Nodes whose grants this guard's preparation would pair a
        /// control-plane backup with (none unless a test says).
        pairs: Mutex<Vec<String>>,
    }

    impl GrantGuard for Switch {
        fn check(&self, _: &Waiter, state: &LeaseState, _: DateTime<Utc>) -> Result<(), String> {
            self.holders_seen
                .lock()
                .unwrap()
                .push(state.holders.keys().map(|n| n.to_string()).collect());
            match self.refuse.lock().unwrap().clone() {
                Some(reason) => Err(reason),
                None => Ok(()),
            }
        }

        fn pairs_backup(&self, candidate: &Waiter) -> bool {
            self.pairs
                .lock()
                .unwrap()
                .contains(&candidate.node.to_string())
        }
    }

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    async fn engine(max: u32, guard: Arc<Switch>) -> Arc<Engine> {
        let store = Arc::new(MemoryStore::new(Some(LeaseState::default())));
        let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        let config = EngineConfig {
            overdue_after: Duration::seconds(60),
            ..EngineConfig::new(
                Policy {
                    max_concurrent: max,
                    windows: WindowSet::default(),
                },
                "test",
            )
        };
        Engine::guarded(store, config, guard, now).await
    }

    async fn grant(engine: &Arc<Engine>, node: &str, control_plane: bool) -> u64 {
        let (_, mut events) = engine
            .acquire(AcquireRequest {
                node: n(node),
                control_plane,
                reason: "test".into(),
                manual: false,
                backs_up_control_plane: true,
            })
            .await
            .unwrap();
        loop {
            if let AcquireUpdate::Granted(g) = events.recv().await.unwrap().unwrap() {
                return g.fencing_token;
            }
        }
    }

    #[tokio::test]
    async fn proceeds_while_the_guards_allow_and_waits_with_their_reason() {
        let guard = Arc::new(Switch::default());
        let engine = engine(2, guard.clone()).await;
        let t1 = grant(&engine, "n1", true).await;
        let ok = engine
            .confirm_step(&n("n1"), t1, Step::Reboot)
            .await
            .unwrap();
        assert_eq!(ok.wait, None);
        // The holder is not in its own way: the guard saw no holders.
        assert_eq!(
            guard.holders_seen.lock().unwrap().last().unwrap(),
            &Vec::<String>::new()
        );

        *guard.refuse.lock().unwrap() = Some("etcd: member n2 unhealthy".into());
        let wait = engine
            .confirm_step(&n("n1"), t1, Step::Reboot)
            .await
            .unwrap();
        assert_eq!(wait.wait.as_deref(), Some("etcd: member n2 unhealthy"));
        assert!(wait.retry_after <= CONFIRM_RETRY);
        // It was renewed all the same, and it still holds the baton.
        assert_eq!(
            engine.snapshot().await.state.holders[&n("n1")].fencing_token,
            t1
        );
    }

    /// Agents ask Confirm before the drain too. A grant that asked for no
    /// backup (a worker, or a control-plane node with no etcd snapshot
    /// paired) may drain at once: the answer is the one its update's
    /// Confirm gets right after.
    #[tokio::test]
    async fn a_grant_that_needs_no_backup_may_drain_at_once() {
        let engine = engine(2, Arc::default()).await;
        for (node, control_plane) in [("w1", false), ("cp-1", true)] {
            let token = grant(&engine, node, control_plane).await;
            assert!(!engine.backup_required(&n(node)).await);
            for step in [Step::Drain, Step::Update] {
                let answer = engine.confirm_step(&n(node), token, step).await.unwrap();
                assert_eq!(answer.wait, None, "{node} {step:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_stale_token_is_refused_and_renews_nothing() {
        let engine = engine(1, Arc::default()).await;
        let t1 = grant(&engine, "n1", false).await;
        let err = engine
            .confirm_step(&n("n1"), t1 + 1, Step::Update)
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Lease(LeaseError::StaleToken { .. })),
            "{err}"
        );
        let err = engine
            .confirm_step(&n("n2"), t1, Step::Update)
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Lease(LeaseError::NotHolder { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn other_holders_and_outages_count_but_pause_does_not() {
        let engine = engine(2, Arc::default()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        let _t2 = grant(&engine, "w1", false).await;
        // A third node went down unexpectedly: with cp-1 and w1 that is
        // three out of a limit of two.
        engine.set_unavailable(vec![n("w9")]).await;
        let wait = engine
            .confirm_step(&n("cp-1"), t1, Step::Reboot)
            .await
            .unwrap();
        let reason = wait.wait.expect("must wait");
        assert!(
            reason.contains("concurrency limit: 2 of 2 in use"),
            "{reason}"
        );
        assert!(reason.contains("w9 is unavailable"), "{reason}");
        // Its own NotReady is planned and does not count.
        engine.set_unavailable(vec![n("cp-1")]).await;
        assert_eq!(
            engine
                .confirm_step(&n("cp-1"), t1, Step::Reboot)
                .await
                .unwrap()
                .wait,
            None
        );
        // Paused: holders still finish what they started.
        engine.pause("op", "freeze").await.unwrap();
        assert_eq!(
            engine
                .confirm_step(&n("cp-1"), t1, Step::Reboot)
                .await
                .unwrap()
                .wait,
            None
        );
    }

    /// As the etcd guard prepares control-plane node cp-1: out, a
    /// snapshot paired with its grant; then the grant. Its token, and when
    /// the snapshot was taken.
    /// The etcd guard's preparation of cp-1 (it goes out, a snapshot pairs
    /// with its grant), then the grant; `claims` is whether its agent says
    /// `--control-plane`.
    async fn granted_with_a_snapshot(engine: &Arc<Engine>, claims: bool) -> (u64, DateTime<Utc>) {
        engine.mark_returning(&n("cp-1"), "cp-1", 7).await.unwrap();
        let at = engine.now();
        engine
            .record_backup_snapshot(&n("cp-1"), "etcd-x-cp-2.db", at)
            .await
            .unwrap();
        (grant(engine, "cp-1", claims).await, at)
    }

    #[tokio::test]
    async fn a_grant_that_needs_a_backup_is_held_at_every_step_until_one_was_kept() {
        let engine = engine(1, Arc::default()).await;
        // The etcd guard's preparation: cp-1 goes out, a snapshot pairs
        // with its grant.
        let (t1, _) = granted_with_a_snapshot(&engine, true).await;
        for step in [Step::Drain, Step::Update, Step::Reboot] {
            let held = engine.confirm_step(&n("cp-1"), t1, step).await.unwrap();
            let reason = held.wait.expect("held until the backup is kept");
            assert!(reason.contains("control-plane backup"), "{reason}");
            assert!(reason.contains("upgrade the agent"), "{reason}");
        }
        // A backup kept for another token does not count.
        assert!(
            engine
                .record_backup_kept(
                    &n("cp-1"),
                    t1 + 1,
                    "etcd-x-cp-2.db.control-plane-cp-1.tar.gz"
                )
                .await
                .is_err()
        );
        assert!(
            engine
                .confirm_step(&n("cp-1"), t1, Step::Drain)
                .await
                .unwrap()
                .wait
                .is_some()
        );
        engine
            .record_backup_kept(&n("cp-1"), t1, "etcd-x-cp-2.db.control-plane-cp-1.tar.gz")
            .await
            .unwrap();
        assert_eq!(
            engine
                .confirm_step(&n("cp-1"), t1, Step::Drain)
                .await
                .unwrap()
                .wait,
            None
        );
    }

    #[tokio::test]
    async fn counting_a_holder_as_back_keeps_its_backup_pairing() {
        // The etcd guard read the holders before the grant and counts cp-1
        // as back; the grant commits before its mark_returned.
        let engine = engine(1, Arc::default()).await;
        let (t1, _) = granted_with_a_snapshot(&engine, true).await;
        engine.mark_returned(&n("cp-1")).await.unwrap();
        assert!(engine.backup_required(&n("cp-1")).await);
        assert_eq!(
            engine
                .backup_snapshot_for(&n("cp-1"), t1)
                .await
                .unwrap()
                .as_deref(),
            Some("etcd-x-cp-2.db")
        );
        // A holder is out, not back: its record stays.
        assert!(
            engine
                .snapshot()
                .await
                .state
                .returning
                .contains_key(&n("cp-1"))
        );
    }

    /// A node the guard judged a control-plane node by its label, whose
    /// agent does not say `--control-plane` (the flag's default), still
    /// needs its backup: the pairing exists only because the guard judged
    /// so.
    #[tokio::test]
    async fn a_control_plane_node_known_by_its_label_alone_still_needs_its_backup() {
        let engine = engine(1, Arc::default()).await;
        let (t1, _) = granted_with_a_snapshot(&engine, false).await;
        assert!(engine.backup_required(&n("cp-1")).await);
        for step in [Step::Drain, Step::Update, Step::Reboot] {
            let held = engine.confirm_step(&n("cp-1"), t1, step).await.unwrap();
            assert!(held.wait.is_some(), "{step:?} went ahead without a backup");
        }
    }

    #[tokio::test]
    async fn a_grant_takes_its_snapshot_pairing_and_a_later_preparation_reuses_nothing() {
        let engine = engine(1, Arc::default()).await;
        let (t1, at) = granted_with_a_snapshot(&engine, true).await;
        engine
            .release(&n("cp-1"), t1, "cp-1", "done")
            .await
            .unwrap();
        // cp-1 asks again before it counts as back: its next preparation
        // must take a new snapshot, not pair with the one taken before
        // this maintenance.
        assert_eq!(
            engine
                .recent_backup_snapshot(&n("cp-1"), at - Duration::hours(1))
                .await,
            None
        );
    }

    /// A grant of a control-plane etcd node made without a backup pairing
    /// (an older release's, read during an upgrade in the middle of a
    /// maintenance: its agent was told no backup is needed) is released at
    /// its Confirm(drain), before anything was touched, and never
    /// confirmed: its slot goes to the next waiter, and the node's next
    /// grant is prepared (and paired) like any other.
    #[tokio::test]
    async fn a_grant_that_lacks_its_backup_pairing_is_released_at_its_drain_never_confirmed() {
        let guard = Arc::new(Switch::default());
        let engine = engine(1, guard.clone()).await;
        // Granted as the previous release granted it: no pairing.
        let t1 = grant(&engine, "cp-1", true).await;
        assert!(!engine.backup_required(&n("cp-1")).await);
        let (_, mut next) = engine
            .acquire(AcquireRequest {
                node: n("w1"),
                control_plane: false,
                reason: "test".into(),
                manual: false,
                backs_up_control_plane: true,
            })
            .await
            .unwrap();
        // This release's guard would pair a backup with cp-1's grant.
        guard.pairs.lock().unwrap().push("cp-1".into());
        let err = engine
            .confirm_step(&n("cp-1"), t1, Step::Drain)
            .await
            .expect_err("confirmed a drain on a grant that lacks its backup pairing");
        assert_released_unpaired(&engine, &err, "cp-1", t1, "its Confirm(drain)").await;
        assert_eq!(engine.metrics().unpaired_grants_released.get(), 1);
        // Refused for good: the token is not current any more.
        assert!(
            engine
                .confirm_step(&n("cp-1"), t1, Step::Drain)
                .await
                .is_err()
        );
        // The slot went on.
        loop {
            if let AcquireUpdate::Granted(g) = next.recv().await.unwrap().unwrap() {
                assert!(g.fencing_token > t1);
                break;
            }
        }
    }

    /// Past its drain such a grant is neither released nor confirmed: the
    /// node may be drained, its update running (a restarted agent confirms
    /// the update it follows) or its reboot requested, and a release would
    /// stop the update half-way (the agent stops it on a lost baton) or
    /// give back a node whose reboot is still to come. Its update and
    /// reboot wait, with what to do, and it keeps the baton.
    #[tokio::test]
    async fn past_its_drain_a_grant_that_lacks_its_pairing_is_held_not_released() {
        let guard = Arc::new(Switch::default());
        let engine = engine(1, guard.clone()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        guard.pairs.lock().unwrap().push("cp-1".into());
        for step in [Step::Update, Step::Reboot] {
            let held = engine
                .confirm_step(&n("cp-1"), t1, step)
                .await
                .unwrap_or_else(|e| panic!("{step:?}: released past the drain: {e}"));
            let reason = held.wait.expect("confirmed without a backup");
            assert!(
                reason.contains("no control-plane backup pairing"),
                "{reason}"
            );
            assert!(reason.contains("batonctl force-release cp-1"), "{reason}");
        }
        assert_eq!(
            engine.snapshot().await.state.holders[&n("cp-1")].fencing_token,
            t1
        );
        assert_eq!(engine.metrics().unpaired_grants_released.get(), 0);
    }

    /// `err` refused `node`'s grant `token` for lacking its backup pairing
    /// (FAILED_PRECONDITION), and the grant was released: audited as the
    /// coordinator's, at the point named `at`.
    async fn assert_released_unpaired(
        engine: &Engine,
        err: &EngineError,
        node: &str,
        token: u64,
        at: &str,
    ) {
        assert!(
            matches!(err, EngineError::Lease(LeaseError::UnpairedGrant { token: t, .. }) if *t == token),
            "{err}"
        );
        assert_eq!(
            crate::status_map::code(err),
            tonic::Code::FailedPrecondition
        );
        let state = engine.snapshot().await.state;
        assert!(!state.holders.contains_key(&n(node)), "{node} still holds");
        let record = state
            .audit
            .iter()
            .find(|r| r.action == "force-release" && r.node == node)
            .expect("the release is audited");
        assert_eq!(
            (record.fencing_token, record.actor.as_str()),
            (token, "coordinator")
        );
        assert!(
            record.reason.contains("backup pairing"),
            "{}",
            record.reason
        );
        assert!(record.reason.contains(at), "{}", record.reason);
    }

    fn progress(phase: crate::state::Phase) -> crate::state::Progress {
        crate::state::Progress {
            phase,
            ..Default::default()
        }
    }

    /// An agent too old to ask Confirm before its drain reports that it
    /// starts draining, then renews, then drains: the report is where such
    /// a grant is released (current agents send it too, before anything is
    /// touched), and the renewal that follows is refused, so it never
    /// drains. A paired grant's and a worker's reports go through.
    #[tokio::test]
    async fn the_report_that_an_unpaired_grant_starts_draining_releases_it() {
        let guard = Arc::new(Switch::default());
        let engine = engine(3, guard.clone()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        let worker = grant(&engine, "w1", false).await;
        guard.pairs.lock().unwrap().push("cp-1".into());
        let err = engine
            .report(&n("cp-1"), t1, progress(Phase::Draining))
            .await
            .expect_err("an unpaired grant started its drain");
        assert_released_unpaired(
            &engine,
            &err,
            "cp-1",
            t1,
            "its report that it starts draining",
        )
        .await;
        assert!(engine.renew(&n("cp-1"), t1).await.is_err(), "renewed");
        assert_eq!(engine.metrics().unpaired_grants_released.get(), 1);
        engine
            .report(&n("w1"), worker, progress(Phase::Draining))
            .await
            .unwrap();
        engine
            .release(&n("w1"), worker, "w1", "done")
            .await
            .unwrap();
        let (paired, _) = granted_with_a_snapshot(&engine, true).await;
        engine
            .report(&n("cp-1"), paired, progress(Phase::Draining))
            .await
            .unwrap();
    }

    /// A holder whose reports say its update ran or runs (Updating and
    /// later) is never released at a Confirm(drain), which an agent that
    /// lost its state file asks again: it would be given back with its
    /// update still running. It waits like any step past the drain.
    /// Still at Granted or Draining (an agent restarted during its drain,
    /// the coordinator upgraded meanwhile), it is released: the node is
    /// given back, which costs capacity (a cordoned node until its agent
    /// uncordons it) and touches nothing else.
    #[tokio::test]
    async fn a_confirm_of_the_drain_releases_only_a_holder_whose_reports_say_nothing_ran() {
        for (reported, released) in [
            (Phase::Updating, false),
            (Phase::Rebooting, false),
            (Phase::Verifying, false),
            (Phase::Draining, true),
        ] {
            let guard = Arc::new(Switch::default());
            let engine = engine(1, guard.clone()).await;
            let t1 = grant(&engine, "cp-1", true).await;
            engine
                .report(&n("cp-1"), t1, progress(reported))
                .await
                .unwrap();
            guard.pairs.lock().unwrap().push("cp-1".into());
            let answer = engine.confirm_step(&n("cp-1"), t1, Step::Drain).await;
            if released {
                assert!(
                    matches!(
                        answer,
                        Err(EngineError::Lease(LeaseError::UnpairedGrant { .. }))
                    ),
                    "{reported:?}: {answer:?}"
                );
            } else {
                let held = answer.unwrap_or_else(|e| panic!("{reported:?}: released: {e}"));
                let reason = held.wait.expect("confirmed without a backup");
                assert!(reason.contains("baton-update-"), "{reason}");
                assert!(
                    reason.contains(&format!("batonctl force-release cp-1 --token {t1}")),
                    "{reason}"
                );
                // An operator's matter: asked again at the renewal pace.
                assert!(held.retry_after >= CONFIRM_RETRY);
            }
        }
    }

    /// An agent that lost its state file during its update resumes its
    /// grant and reports Granted, then Draining, again: the grant's record
    /// remembers that its reports went past the drain, so neither that
    /// report nor its Confirm(drain) releases the node with its update
    /// running; it is held like any step past the drain.
    #[tokio::test]
    async fn a_holder_whose_reports_went_past_the_drain_is_never_released_on_reporting_it_again() {
        let guard = Arc::new(Switch::default());
        let engine = engine(1, guard.clone()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        for phase in [Phase::Draining, Phase::Updating] {
            engine
                .report(&n("cp-1"), t1, progress(phase))
                .await
                .unwrap();
        }
        guard.pairs.lock().unwrap().push("cp-1".into());
        // The state file lost: it resumes the grant from Granted.
        for phase in [Phase::Granted, Phase::Draining] {
            engine
                .report(&n("cp-1"), t1, progress(phase))
                .await
                .unwrap_or_else(|e| panic!("{phase:?}: released with its update running: {e}"));
        }
        engine.renew(&n("cp-1"), t1).await.unwrap();
        let held = engine
            .confirm_step(&n("cp-1"), t1, Step::Drain)
            .await
            .expect("released with its update running");
        assert!(held.wait.is_some_and(|r| r.contains("past its drain")));
        let state = engine.snapshot().await.state;
        assert!(state.holders[&n("cp-1")].past_drain);
        assert_eq!(engine.metrics().unpaired_grants_released.get(), 0);
    }

    /// An older agent reports once, best effort, that it starts draining,
    /// then renews and drains. When the report did not release its
    /// unpaired grant (lost, or its save failed), the renewal does, so it
    /// never drains. A holder already draining renews through its drain
    /// and is not released by it (its next step is held instead).
    #[tokio::test]
    async fn the_renewal_before_an_older_agents_drain_releases_a_grant_its_report_did_not() {
        let guard = Arc::new(Switch::default());
        let engine = engine(2, guard.clone()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        // (One control-plane node at a time: the second is a node the
        // guard is told to pair.)
        let t2 = grant(&engine, "w2", false).await;
        engine
            .report(&n("w2"), t2, progress(Phase::Draining))
            .await
            .unwrap();
        guard
            .pairs
            .lock()
            .unwrap()
            .extend(["cp-1".into(), "w2".into()]);
        // cp-1's report was lost: its renewal is the last call before it
        // would drain.
        let err = engine.renew(&n("cp-1"), t1).await.unwrap_err();
        assert_released_unpaired(&engine, &err, "cp-1", t1, "its renewal before its drain").await;
        // w2 was draining already: renewed, and held at its update.
        engine.renew(&n("w2"), t2).await.unwrap();
        let held = engine
            .confirm_step(&n("w2"), t2, Step::Update)
            .await
            .unwrap();
        assert!(held.wait.is_some());
        assert!(engine.snapshot().await.state.holders.contains_key(&n("w2")));
    }

    /// A holder whose reports were all lost (best effort) asked Confirm
    /// before its update and was let through while its grant needed no
    /// pairing; then the node turns out to carry an etcd member. Its
    /// renewals during the update must not release it (the agent would
    /// stop the update half-way): asking Confirm(update) marked it past
    /// its drain. Its next step waits instead.
    #[tokio::test]
    async fn a_holder_that_asked_confirm_before_its_update_is_never_released_by_a_renewal() {
        let guard = Arc::new(Switch::default());
        let engine = engine(1, guard.clone()).await;
        let t1 = grant(&engine, "cp-1", true).await;
        for step in [Step::Drain, Step::Update] {
            let go = engine.confirm_step(&n("cp-1"), t1, step).await.unwrap();
            assert_eq!(go.wait, None, "{step:?}");
        }
        guard.pairs.lock().unwrap().push("cp-1".into());
        engine
            .renew(&n("cp-1"), t1)
            .await
            .expect("released during its update");
        engine
            .report(&n("cp-1"), t1, progress(Phase::Draining))
            .await
            .expect("released during its update");
        let held = engine
            .confirm_step(&n("cp-1"), t1, Step::Reboot)
            .await
            .unwrap();
        assert!(held.wait.is_some_and(|r| r.contains("past its drain")));
        assert_eq!(engine.metrics().unpaired_grants_released.get(), 0);
    }

    /// What is not released: a paired grant (held until its backup was
    /// kept, as before), a grant the guard would not pair (a worker, a
    /// control-plane node without an etcd member), and an operator's hold.
    #[tokio::test]
    async fn only_a_grant_that_should_carry_a_pairing_and_does_not_is_released() {
        let guard = Arc::new(Switch::default());
        let engine = engine(3, guard.clone()).await;
        let (paired, _) = granted_with_a_snapshot(&engine, true).await;
        let worker = grant(&engine, "w1", false).await;
        guard.pairs.lock().unwrap().push("cp-1".into());
        let held = engine
            .confirm_step(&n("cp-1"), paired, Step::Drain)
            .await
            .unwrap();
        assert!(
            held.wait
                .is_some_and(|r| r.contains("control-plane backup"))
        );
        let ok = engine
            .confirm_step(&n("w1"), worker, Step::Drain)
            .await
            .unwrap();
        assert_eq!(ok.wait, None);

        let (_, mut hold) = engine
            .acquire(AcquireRequest {
                node: n("w3"),
                control_plane: false,
                reason: "operator".into(),
                manual: true,
                backs_up_control_plane: false,
            })
            .await
            .unwrap();
        let token = loop {
            if let AcquireUpdate::Granted(g) = hold.recv().await.unwrap().unwrap() {
                break g.fencing_token;
            }
        };
        // (One control-plane node at a time: the hold is of a worker the
        // guard is told to pair, which only a hold can lack.)
        guard.pairs.lock().unwrap().push("w3".into());
        assert!(
            engine
                .confirm_step(&n("w3"), token, Step::Drain)
                .await
                .is_ok()
        );
        let state = engine.snapshot().await.state;
        for node in ["cp-1", "w1", "w3"] {
            assert!(state.holders.contains_key(&n(node)), "{node} was released");
        }
    }
}
