//! One task follows the engine for every part of the policy that acts on
//! what happened (webhooks, the failure budget, canaries, stuck locks, the
//! gate's "check again after a release"): one status snapshot per change,
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
use super::rule::PolicyRule;
use super::stuck::StuckLocks;
use crate::engine::Engine;

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
        loop {
            {
                let Some(engine) = weak.upgrade() else { return };
                if engine.is_shutting_down().await {
                    return;
                }
                let snap = engine.snapshot().await;
                self.rule.observe_canaries(&snap);
                if snap.leadership.is_leader {
                    self.releases.send_if_modified(|t| {
                        let last = last_release(&snap.state);
                        std::mem::replace(t, last) != last
                    });
                    self.notifier.on_snapshot(&snap);
                    self.budget.on_snapshot(&snap, &self.policy, &engine).await;
                    self.stuck.on_snapshot(&snap, &engine).await;
                } else {
                    self.notifier.reset();
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
