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

use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{Engine, EngineError, Inner};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Policy, Waiter, decide};
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
        self.commit(&mut inner, |s| s.renew(node, token, now))
            .await?;
        if inner.overdue_seen.remove(node) {
            info!(node = %node, token, "holder confirmed; no longer overdue");
            self.changed();
        }
        let control_plane = inner.state.holders[node].control_plane;
        // The backup first, checked here and not only by the agent, so
        // that an agent too old to send it is held, never drained.
        let wait = match inner.state.backup_missing(node) {
            Some(reason) => Some(reason),
            None => self.recheck(&inner, node, control_plane, now).err(),
        };
        match &wait {
            None => {
                info!(node = %node, token, step = step.name(), "confirmed: the holder may proceed")
            }
            Some(reason) => {
                warn!(node = %node, token, step = step.name(), reason = %reason, "confirm: the holder must wait")
            }
        }
        let retry_after = self
            .config
            .renew_interval
            .to_std()
            .unwrap_or(CONFIRM_RETRY)
            .clamp(StdDuration::from_millis(100), CONFIRM_RETRY);
        Ok(Confirmation {
            wait,
            overdue_at: now + self.config.overdue_after,
            retry_after,
        })
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
            // it asked for is checked first (`backup_missing`); a grant
            // made without one (an older coordinator's) is not held for
            // its agent's age.
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
}
