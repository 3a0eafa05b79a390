//! The failure budget: after `failureBudget.maxFailedNodes` nodes failed,
//! the rollout pauses itself, with the reason (an audited pause, as an
//! operator's). Failed nodes keep the baton either way (fail closed); the
//! budget stops the others before they use the remaining slots.
//!
//! Failures count from the start (or the last resume): an operator who
//! resumes has looked at them, and the next ones count afresh.

use std::collections::BTreeSet;

use tracing::warn;

use super::reload::PolicyHandle;
use crate::engine::{Engine, Snapshot};
use crate::node::NodeName;
use crate::state::Phase;

/// Who the pause is audited as.
pub const ACTOR: &str = "coordinator (failure budget)";

/// Counts failed grants between snapshots.
#[derive(Debug, Default)]
pub struct FailureBudget {
    /// Failed grants (node, token) counted against the budget.
    counted: BTreeSet<(NodeName, u64)>,
    /// Failed grants an operator already resumed past.
    forgiven: BTreeSet<(NodeName, u64)>,
    was_paused: bool,
}

impl FailureBudget {
    /// Looks at `snap`; returns the reason to pause when the budget of
    /// `max_failed` is spent and the rollout is not paused yet.
    pub fn observe(&mut self, snap: &Snapshot, max_failed: Option<u32>) -> Option<String> {
        let paused = snap.state.paused.is_some();
        if self.was_paused && !paused {
            // Resumed: what failed so far was seen by an operator.
            self.forgiven.append(&mut self.counted);
        }
        self.was_paused = paused;
        for (node, h) in &snap.state.holders {
            let key = (node.clone(), h.fencing_token);
            if h.phase == Phase::Failed && !self.forgiven.contains(&key) {
                self.counted.insert(key);
            }
        }
        let max = max_failed? as usize;
        if paused || self.counted.len() < max.max(1) {
            return None;
        }
        let names: Vec<String> = self.counted.iter().map(|(n, _)| n.to_string()).collect();
        Some(format!(
            "failure budget spent: {} node(s) failed ({}), the policy allows {max}; resume after looking at them",
            self.counted.len(),
            names.join(", ")
        ))
    }
}

impl FailureBudget {
    /// The failed grants counted against the budget now.
    pub fn counted(&self) -> impl Iterator<Item = &(NodeName, u64)> {
        self.counted.iter()
    }

    /// Pauses `engine` when `snap` (a leader's) shows the budget spent.
    pub async fn on_snapshot(&mut self, snap: &Snapshot, policy: &PolicyHandle, engine: &Engine) {
        let max = policy
            .current()
            .effective
            .failure_budget
            .as_ref()
            .map(|b| b.max_failed_nodes);
        if let Some(reason) = self.observe(snap, max) {
            warn!(reason = %reason, "pausing the rollout");
            if let Err(e) = engine.pause(ACTOR, &reason).await {
                warn!(error = %e, "pausing for the failure budget failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::rollout::test_support::snapshot;
    use crate::state::{LeaseState, Progress};

    fn snap(state: &LeaseState) -> Snapshot {
        snapshot(state, &[], Utc::now())
    }

    fn fail(state: &mut LeaseState, node: &str) {
        let now = Utc::now();
        let node = NodeName::new(node).unwrap();
        let t = state.grant(&node, false, false, "", now).unwrap();
        let failed = Progress {
            phase: Phase::Failed,
            ..Default::default()
        };
        state.report(&node, t, failed, now).unwrap();
    }

    #[test]
    fn pauses_once_the_budget_is_spent_and_counts_afresh_after_a_resume() {
        let mut b = FailureBudget::default();
        let mut state = LeaseState::default();
        fail(&mut state, "n1");
        assert_eq!(b.observe(&snap(&state), Some(2)), None);
        assert_eq!(b.observe(&snap(&state), None), None, "no budget, no pause");
        fail(&mut state, "n2");
        let reason = b.observe(&snap(&state), Some(2)).unwrap();
        assert!(reason.contains("2 node(s) failed (n1, n2)"), "{reason}");
        state.pause(ACTOR, &reason, Utc::now());
        assert_eq!(b.observe(&snap(&state), Some(2)), None, "already paused");
        state.resume("op", Utc::now());
        // n1 and n2 still hold the baton, failed: they were forgiven.
        assert_eq!(b.observe(&snap(&state), Some(2)), None);
        fail(&mut state, "n3");
        assert_eq!(b.observe(&snap(&state), Some(2)), None);
        fail(&mut state, "n4");
        assert!(b.observe(&snap(&state), Some(2)).is_some());
    }
}
