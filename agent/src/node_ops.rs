//! The `NodeOps` boundary: what happens to the node around the update.
//!
//! In Kubernetes mode this is cordon, drain, readiness and uncordon (a later
//! issue plugs that implementation in here). Standalone mode
//! ([`StandaloneNodeOps`]) runs the configured pre- and post-maintenance
//! units instead. Every operation must be idempotent: a restarted agent
//! repeats the operation of the phase it was in.

use crate::host::{HostError, HostOs, Job};
use std::time::Duration;

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
pub enum NodeOpsError {
    /// A unit could not be run.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A unit ran and failed.
    #[error("{unit} failed: {detail}")]
    UnitFailed {
        /// The unit.
        unit: String,
        /// How it failed.
        detail: String,
    },
}

/// Operations on the node around its maintenance.
#[allow(async_fn_in_trait)] // used with generics only, never boxed
pub trait NodeOps {
    /// Make the node ready to go down (cordon and drain, or the
    /// pre-maintenance unit).
    async fn prepare(&self) -> Result<(), NodeOpsError>;
    /// After the boot (or the update without reboot): wait until the node
    /// serves again.
    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError>;
    /// Undo `prepare` (uncordon, or the post-maintenance unit).
    async fn finish(&self) -> Result<(), NodeOpsError>;
    /// The baton was lost mid-maintenance: undo what can be undone.
    async fn abort(&self) -> Result<(), NodeOpsError>;
}

/// Standalone mode: pre- and post-maintenance systemd units.
#[derive(Debug, Clone)]
pub struct StandaloneNodeOps<H> {
    host: H,
    pre_unit: Option<String>,
    post_unit: Option<String>,
    timeout: Duration,
}

impl<H: HostOs> StandaloneNodeOps<H> {
    /// Node operations that start `pre_unit` before and `post_unit` after
    /// maintenance (each optional), waiting at most `timeout` for each.
    pub fn new(
        host: H,
        pre_unit: Option<String>,
        post_unit: Option<String>,
        timeout: Duration,
    ) -> Self {
        StandaloneNodeOps {
            host,
            pre_unit,
            post_unit,
            timeout,
        }
    }

    async fn run_unit(&self, unit: &Option<String>) -> Result<(), NodeOpsError> {
        let Some(unit) = unit else { return Ok(()) };
        let outcome = self
            .host
            .run(&Job::Unit(unit.clone()), self.timeout)
            .await?;
        if outcome.success {
            Ok(())
        } else {
            Err(NodeOpsError::UnitFailed {
                unit: unit.clone(),
                detail: outcome.detail,
            })
        }
    }
}

impl<H: HostOs> NodeOps for StandaloneNodeOps<H> {
    async fn prepare(&self) -> Result<(), NodeOpsError> {
        self.run_unit(&self.pre_unit).await
    }

    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError> {
        // Without Kubernetes there is no readiness to wait for: systemd has
        // started the agent, and post-checks are the agent's own step.
        Ok(())
    }

    async fn finish(&self) -> Result<(), NodeOpsError> {
        self.run_unit(&self.post_unit).await
    }

    async fn abort(&self) -> Result<(), NodeOpsError> {
        // The post-maintenance unit is what brings the node back into
        // service, whether the maintenance finished or not.
        self.run_unit(&self.post_unit).await
    }
}
