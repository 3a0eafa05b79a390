//! One task follows the engine for every part of the policy that acts on
//! what happened (webhooks, the failure budget, canaries, stuck locks, the
//! gate's "check again after a release", and what status, metrics and
//! Kubernetes Events show): one status snapshot per change,
//! at most one every [`COALESCE`], taken off the engine's lock, so a burst
//! of changes (a thousand waiters being told their place) costs a bounded
//! number of snapshots, and nothing here can delay a grant.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::budget::FailureBudget;
use super::gate::last_release;
use super::notify::Notifier;
use super::reload::PolicyHandle;
use super::report::Reporter;
use super::rule::PolicyRule;
use super::stuck::StuckLocks;
use crate::engine::{Engine, Snapshot};

/// The least time between two snapshots.
pub const COALESCE: Duration = Duration::from_millis(50);
/// Snapshots are also taken this often without a change (soaks end, stuck
/// holders' grace times pass).
pub const TICK: Duration = Duration::from_secs(1);

/// The parts that act on snapshots.
pub struct Observers {
    /// The policy in force.
    pub policy: Arc<PolicyHandle>,
    /// Webhooks.
    pub notifier: Notifier,
    /// The failure budget.
    pub budget: FailureBudget,
    /// Canaries (inside the rule).
    pub rule: Arc<PolicyRule>,
    /// Stuck locks.
    pub stuck: StuckLocks,
    /// The time of the last release, for the health gate.
    pub releases: watch::Sender<Option<DateTime<Utc>>>,
    /// Status, metrics and Kubernetes Events.
    pub reporter: Reporter,
}

impl Observers {
    /// Follows `engine` until it shuts down.
    pub async fn run(mut self, engine: Arc<Engine>) {
        let mut changes = engine.subscribe();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Only a weak handle between snapshots: a stopped engine (and its
        // store, whose lock a restart needs) is not kept alive by a wait.
        let weak = Arc::downgrade(&engine);
        drop(engine);
        // The number of the newest audit record the last snapshot showed.
        let mut seen = None;
        loop {
            {
                let Some(engine) = weak.upgrade() else { return };
                if engine.is_shutting_down().await {
                    return;
                }
                let mut snap = engine.snapshot().await;
                fill_skipped_audit(&mut snap, &mut seen, &engine).await;
                self.rule.observe_canaries(&snap);
                if snap.leadership.is_leader {
                    self.releases.send_if_modified(|t| {
                        let last = last_release(&snap.state);
                        std::mem::replace(t, last) != last
                    });
                    self.notifier.on_snapshot(&snap);
                    self.budget.on_snapshot(&snap, &self.policy, &engine).await;
                    self.stuck.on_snapshot(&snap, &engine).await;
                    self.reporter.on_snapshot(&snap, &self.budget);
                } else {
                    self.notifier.reset();
                    self.reporter.reset();
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return; },
                _ = tick.tick() => {}
            }
            tokio::time::sleep(COALESCE).await;
        }
    }
}

/// A snapshot carries only the newest audit records; the ones made since
/// the previous snapshot that its tail does not show are read from the
/// engine and put in front, so every observer sees every record (a failure
/// for the webhooks, a canary's grant and release) however many came in
/// between two looks (up to what the engine keeps).
async fn fill_skipped_audit(snap: &mut Snapshot, seen: &mut Option<u64>, engine: &Engine) {
    let state = &mut snap.state;
    let first = (state.audit_seq + 1).saturating_sub(state.audit.len() as u64);
    if let Some(after) = *seen
        && after < state.audit_seq
        && first > after + 1
    {
        let older = engine.audit_between(after, first).await;
        for record in older.into_iter().rev() {
            state.audit.push_front(record);
        }
    }
    *seen = Some(state.audit_seq);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::SNAPSHOT_AUDIT_TAIL;
    use crate::rollout::notify::Observer;
    use crate::rollout::schema::EventKind;
    use crate::store::memory::MemoryStore;

    /// More records between two looks than a snapshot carries: every one
    /// still reaches the webhooks (a failure older than the tail would
    /// otherwise never be sent).
    #[tokio::test]
    async fn records_beyond_the_snapshot_tail_reach_the_observers() {
        let engine = Engine::over(Arc::new(MemoryStore::default()), "test").await;
        let (mut seen, mut filled, mut bare) = (None, Observer::default(), Observer::default());
        let mut snap = engine.snapshot().await;
        fill_skipped_audit(&mut snap, &mut seen, &engine).await;
        assert!(filled.observe(&snap).is_empty() && bare.observe(&snap).is_empty());

        let pairs = SNAPSHOT_AUDIT_TAIL;
        for _ in 0..pairs {
            engine.pause("op", "test").await.unwrap();
            engine.resume("op").await.unwrap();
        }
        let bare_snap = engine.snapshot().await;
        let mut snap = bare_snap.clone();
        assert_eq!(snap.state.audit.len(), SNAPSHOT_AUDIT_TAIL);
        fill_skipped_audit(&mut snap, &mut seen, &engine).await;
        let events = filled.observe(&snap);
        let paused = events
            .iter()
            .filter(|e| e.kind == EventKind::Paused)
            .count();
        assert_eq!((events.len(), paused), (2 * pairs, pairs));
        // Without the filling, the older half would be lost.
        assert_eq!(bare.observe(&bare_snap).len(), SNAPSHOT_AUDIT_TAIL);
    }
}
