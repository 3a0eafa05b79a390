//! The rollout policy: what `--policy FILE` declares beyond the flags, and
//! the parts of the coordinator that carry it out.
//!
//! - [`schema`]: the file's serde types (unknown fields refused);
//! - [`load`], [`locate`]: checking a file and merging it with the flags,
//!   with the line of every error;
//! - [`reload`]: the policy in force ([`PolicyHandle`]), reloaded on SIGHUP
//!   and file changes;
//! - [`template`]: webhook body templates;
//! - [`rule`], [`canary`], [`labels`]: pools, zones, order and canaries,
//!   the policy's part of the grant rule, and the labels agents send;
//! - [`gate`], [`prometheus`], [`http`]: the health gate and the alert
//!   blockers (Prometheus, Alertmanager, nodes, disruption budgets);
//! - [`notify`]: webhooks; [`stuck`]: stuck locks; [`budget`]: the
//!   failure budget;
//! - [`observe`]: the task that follows the engine for all of them;
//!   [`report`] and [`metrics`]: what `batonctl status`, the metrics and
//!   Kubernetes Events show of the policy.
//!
//! Each part plugs into the engine from outside: through a
//! [`crate::policy::GrantGuard`] (hold a candidate with a reason), through
//! [`crate::engine::Engine::set_policy`], or by watching the engine's state
//! off its lock.

pub mod budget;
pub mod canary;
pub mod gate;
pub mod http;
pub mod labels;
pub mod load;
pub mod locate;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod prometheus;
pub mod reload;
pub mod report;
pub mod rule;
pub mod schema;
pub mod stuck;
pub mod template;

pub use load::{FlagDefaults, Loaded, PolicyError};
pub use reload::PolicyHandle;

/// Builders shared by this module's tests.
#[cfg(test)]
pub(crate) mod test_support {
    use chrono::{DateTime, Utc};

    use crate::engine::{QueueView, Snapshot};
    use crate::node::NodeName;
    use crate::state::LeaseState;
    use crate::store::Leadership;

    /// A leader's snapshot of `state` with `waiting` in the queue.
    pub fn snapshot(state: &LeaseState, waiting: &[&str], now: DateTime<Utc>) -> Snapshot {
        Snapshot {
            state: state.clone(),
            queue: waiting
                .iter()
                .map(|w| QueueView {
                    node: NodeName::new(*w).unwrap(),
                    control_plane: false,
                    since: now,
                    request_reason: String::new(),
                    reason: String::new(),
                })
                .collect(),
            queue_length: waiting.len(),
            overdue: Default::default(),
            window_open: true,
            leadership: Leadership {
                is_leader: true,
                ..Leadership::default()
            },
            now,
        }
    }
}
