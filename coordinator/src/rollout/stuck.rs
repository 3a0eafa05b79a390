//! Stuck locks: holders that will never give the baton back.
//!
//! - In Kubernetes, a holder whose Node object was deleted (and stayed
//!   deleted for the grace time: a kubelet that still runs registers its
//!   Node again) is released, audited (`stuckLocks.releaseDeletedNodes`,
//!   on by default).
//! - A holder that has not renewed for `stuckLocks.forceReleaseOverdueAfter`
//!   is force-released, audited. Off unless the policy sets it: time alone
//!   never hands the baton on otherwise.
//!
//! [`stuck_holders`] decides (pure); [`StuckLocks::run`] acts through
//! [`Engine::force_release_if`], which re-checks under the engine's lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::warn;

use super::reload::PolicyHandle;
use super::schema::StuckLocksSpec;
use crate::engine::{Engine, Snapshot};
use crate::kube::nodes::{NodeFact, NodeFacts};
use crate::node::NodeName;
use crate::state::LeaseState;

/// Who the automatic releases are audited as.
pub const ACTOR: &str = "coordinator (stuck-lock policy)";

/// Why a holder is to be released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stuck {
    /// Its Node object is gone.
    Deleted {
        /// The token it holds.
        token: u64,
        /// Since when it is missing.
        since: DateTime<Utc>,
    },
    /// It has not renewed for the policy's limit.
    Overdue {
        /// The token it holds.
        token: u64,
        /// When it last renewed.
        last_renewed: DateTime<Utc>,
    },
}

/// The holders to release now. `missing_since` remembers when each holder
/// was first seen without its Node (updated here); `nodes` is `None`
/// before the node watch listed (nothing is deleted then).
pub fn stuck_holders(
    state: &LeaseState,
    nodes: Option<&BTreeMap<String, NodeFact>>,
    missing_since: &mut HashMap<NodeName, DateTime<Utc>>,
    spec: &StuckLocksSpec,
    now: DateTime<Utc>,
) -> Vec<(NodeName, Stuck)> {
    missing_since.retain(|n, _| state.holders.contains_key(n));
    let grace =
        chrono::Duration::from_std(spec.deleted_node_grace.0).unwrap_or(chrono::Duration::MAX);
    let overdue = spec
        .force_release_overdue_after
        .map(|d| chrono::Duration::from_std(d.0).unwrap_or(chrono::Duration::MAX));
    let mut out = Vec::new();
    for (node, h) in &state.holders {
        let gone = spec.release_deleted_nodes
            && nodes.is_some_and(|facts| !facts.contains_key(node.as_str()));
        if gone {
            let since = *missing_since.entry(node.clone()).or_insert(now);
            if now - since >= grace {
                out.push((
                    node.clone(),
                    Stuck::Deleted {
                        token: h.fencing_token,
                        since,
                    },
                ));
                continue;
            }
        } else {
            missing_since.remove(node);
        }
        if let Some(limit) = overdue
            && now - h.last_renewed > limit
        {
            out.push((
                node.clone(),
                Stuck::Overdue {
                    token: h.fencing_token,
                    last_renewed: h.last_renewed,
                },
            ));
        }
    }
    out
}

/// The task that releases stuck holders.
pub struct StuckLocks {
    policy: Arc<PolicyHandle>,
    nodes: Option<Arc<NodeFacts>>,
    missing_since: HashMap<NodeName, DateTime<Utc>>,
}

impl StuckLocks {
    /// Over the policy in force and, in a cluster, the node watch.
    pub fn new(policy: Arc<PolicyHandle>, nodes: Option<Arc<NodeFacts>>) -> Self {
        Self {
            policy,
            nodes,
            missing_since: HashMap::new(),
        }
    }

    /// Releases the holders that are stuck as of `snap` (a leader's).
    pub async fn on_snapshot(&mut self, snap: &Snapshot, engine: &Engine) {
        let missing_since = &mut self.missing_since;
        {
            let spec = self
                .policy
                .current()
                .effective
                .stuck_locks
                .clone()
                .unwrap_or_default();
            let facts = self.nodes.as_ref().and_then(|n| n.snapshot());
            for (node, stuck) in
                stuck_holders(&snap.state, facts.as_ref(), missing_since, &spec, snap.now)
            {
                let (token, reason) = match &stuck {
                    Stuck::Deleted { token, since } => (
                        *token,
                        format!(
                            "its Node object was deleted (missing since {}); released by the stuck-lock policy",
                            since.format("%Y-%m-%dT%H:%M:%SZ")
                        ),
                    ),
                    Stuck::Overdue {
                        token,
                        last_renewed,
                    } => (
                        *token,
                        format!(
                            "no renewal since {} (stuckLocks.forceReleaseOverdueAfter); force-released by the stuck-lock policy",
                            last_renewed.format("%Y-%m-%dT%H:%M:%SZ")
                        ),
                    ),
                };
                // Re-checked under the engine's lock: the same grant, and
                // (for overdue) still not renewed.
                let limit = spec
                    .force_release_overdue_after
                    .map(|d| chrono::Duration::from_std(d.0).unwrap_or(chrono::Duration::MAX));
                let still = |h: &crate::state::Holding, now: DateTime<Utc>| {
                    h.fencing_token == token
                        && match &stuck {
                            Stuck::Deleted { .. } => true,
                            Stuck::Overdue { .. } => {
                                limit.is_some_and(|l| now - h.last_renewed > l)
                            }
                        }
                };
                match engine.force_release_if(&node, ACTOR, &reason, still).await {
                    Ok(Some(_)) => {
                        missing_since.remove(&node);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(node = %node, error = %e, "releasing a stuck holder failed; will retry")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::schema::HumanDuration;
    use std::time::Duration;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn deleted_nodes_go_after_the_grace_and_come_back_resets_it() {
        let t0 = Utc::now();
        let mut state = LeaseState::default();
        let token = state.grant(&n("a"), false, false, "", t0).unwrap();
        state.grant(&n("b"), false, false, "", t0).unwrap();
        let spec = StuckLocksSpec::default();
        let with_b: BTreeMap<String, NodeFact> = [("b".to_string(), NodeFact::default())].into();
        let with_a_b: BTreeMap<String, NodeFact> = [
            ("a".to_string(), NodeFact::default()),
            ("b".to_string(), NodeFact::default()),
        ]
        .into();
        let mut missing = HashMap::new();
        // Before the first list nothing counts as deleted.
        assert!(stuck_holders(&state, None, &mut missing, &spec, t0).is_empty());
        assert!(stuck_holders(&state, Some(&with_b), &mut missing, &spec, t0).is_empty());
        let t1 = t0 + chrono::Duration::seconds(10);
        // Back within the grace: forgotten.
        assert!(stuck_holders(&state, Some(&with_a_b), &mut missing, &spec, t1).is_empty());
        assert!(missing.is_empty());
        assert!(stuck_holders(&state, Some(&with_b), &mut missing, &spec, t1).is_empty());
        let t2 = t1 + chrono::Duration::seconds(30);
        assert_eq!(
            stuck_holders(&state, Some(&with_b), &mut missing, &spec, t2),
            [(n("a"), Stuck::Deleted { token, since: t1 })]
        );
        let off = StuckLocksSpec {
            release_deleted_nodes: false,
            ..spec
        };
        assert!(stuck_holders(&state, Some(&with_b), &mut HashMap::new(), &off, t2).is_empty());
    }

    #[test]
    fn overdue_holders_are_released_only_when_the_policy_says_so() {
        let t0 = Utc::now();
        let mut state = LeaseState::default();
        let token = state.grant(&n("a"), false, false, "", t0).unwrap();
        let later = t0 + chrono::Duration::days(30);
        let off = StuckLocksSpec::default();
        assert!(stuck_holders(&state, None, &mut HashMap::new(), &off, later).is_empty());
        let on = StuckLocksSpec {
            force_release_overdue_after: Some(HumanDuration(Duration::from_secs(3600))),
            ..off
        };
        assert!(
            stuck_holders(
                &state,
                None,
                &mut HashMap::new(),
                &on,
                t0 + chrono::Duration::minutes(59)
            )
            .is_empty()
        );
        assert_eq!(
            stuck_holders(&state, None, &mut HashMap::new(), &on, later),
            [(
                n("a"),
                Stuck::Overdue {
                    token,
                    last_renewed: t0
                }
            )]
        );
    }
}
