//! The `NodeOps` boundary: what happens to the node around the update.
//!
//! In Kubernetes mode this is cordon, drain, readiness and uncordon
//! ([`crate::kubernetes::KubeNodeOps`]); [`AnyNodeOps`] picks one of the two
//! at startup. Standalone mode
//! ([`StandaloneNodeOps`]) runs the configured pre- and post-maintenance
//! units instead. Every operation must be idempotent: a restarted agent
//! repeats the operation of the phase it was in.

use crate::host::{HostError, HostOs, Job};
use crate::kubernetes::{KubeError, KubeNodeOps};
use crate::phase::Phase;
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
    /// A Kubernetes node operation failed (`--mode kubernetes`).
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
}

impl NodeOpsError {
    /// True when preparing gave up *and left the node in service* (a drain
    /// that timed out or was refused; the node was uncordoned unless it was
    /// cordoned before): the maintenance is aborted and the baton released
    /// instead of failing closed. See [`crate::phase::Event::PrepareAborted`].
    pub fn aborts_maintenance(&self) -> bool {
        matches!(
            self,
            NodeOpsError::Kubernetes(KubeError::DrainTimeout { .. } | KubeError::DrainRefused(_))
        )
    }
}

/// A phase change of the agent, as shown on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseChange {
    /// The phase before.
    pub from: Phase,
    /// The phase now.
    pub to: Phase,
    /// The fencing token held (None once the baton is given up).
    pub fencing_token: Option<u64>,
    /// What happened, as reported to the coordinator.
    pub message: String,
    /// The error, when the change is a failure or an abort.
    pub error: Option<String>,
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
    /// The maintenance ends early (the baton was lost, or preparing gave
    /// up): undo what can be undone. `reason` is recorded where the
    /// implementation shows errors.
    async fn abort(&self, reason: &str) -> Result<(), NodeOpsError>;
    /// Make a phase change visible where operators look (Kubernetes:
    /// annotations, the holding label, an Event). Best effort: failures are
    /// logged by the implementation and never fail the maintenance.
    async fn show_phase(&self, change: &PhaseChange) {
        let _ = change;
    }
    /// Reasons not to ask for the baton right now (Kubernetes: pods matching
    /// `--blocking-pod-selector` running on the node). Empty: nothing
    /// blocks. An error counts as blocked (fail closed).
    async fn blockers(&self) -> Result<Vec<String>, NodeOpsError> {
        Ok(Vec::new())
    }
    /// Show that the agent holds back its request because of `blockers`
    /// (empty: it no longer does). Best effort, like [`NodeOps::show_phase`].
    async fn show_waiting(&self, blockers: &[String]) {
        let _ = blockers;
    }
    /// The kubeadm configuration the cluster keeps (Kubernetes: the
    /// entries of the `kube-system/kubeadm-config` ConfigMap, key and
    /// value; none on a cluster without it), for the control-plane backup.
    async fn kubeadm_config(&self) -> Result<Vec<(String, String)>, NodeOpsError> {
        Ok(Vec::new())
    }
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

    async fn abort(&self, _reason: &str) -> Result<(), NodeOpsError> {
        // A preparation cut off (the lease ran out, the baton was lost)
        // leaves its unit running: stop it first, or it would go on taking
        // the node down after the node was given back and the baton passed
        // on. Stopping a unit that does not run is no error.
        if let Some(pre) = &self.pre_unit {
            self.host.stop(&Job::Unit(pre.clone())).await?;
        }
        // The post-maintenance unit is what brings the node back into
        // service, whether the maintenance finished or not.
        self.run_unit(&self.post_unit).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fakes::host::SimHost;
    use crate::fakes::{Faults, Sim, SimState, UnitKind};

    /// An aborted preparation's unit is stopped before the node is given
    /// back (red-team finding: after the lease ran out five times in
    /// Preparing, the agent released while the pre-maintenance unit still
    /// ran, so it went on taking the node down after the next grant).
    #[tokio::test]
    async fn abort_stops_the_preparation_before_giving_the_node_back() {
        let mut state = SimState::default();
        for unit in ["drain-workloads.service", "restore-workloads.service"] {
            state.known_units.insert(unit.into(), UnitKind::Oneshot);
        }
        let sim = Sim::new(state, Faults::None);
        let ops = StandaloneNodeOps::new(
            SimHost(sim.clone()),
            Some("drain-workloads.service".into()),
            Some("restore-workloads.service".into()),
            Duration::from_secs(60),
        );
        ops.abort("the lease ran out").await.unwrap();
        let state = sim.state();
        assert_eq!(state.stops, vec!["drain-workloads.service".to_string()]);
    }
}

/// The node operations chosen by `--mode` (enum dispatch keeps the agent
/// generic code monomorphic over one type).
#[derive(Clone)]
pub enum AnyNodeOps<H> {
    /// `--mode standalone`.
    Standalone(StandaloneNodeOps<H>),
    /// `--mode kubernetes` (boxed: the client and flags are large, and the
    /// value is made once).
    Kubernetes(Box<KubeNodeOps>),
}

impl<H: HostOs> NodeOps for AnyNodeOps<H> {
    async fn prepare(&self) -> Result<(), NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.prepare().await,
            AnyNodeOps::Kubernetes(ops) => ops.prepare().await,
        }
    }

    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.wait_ready_after_boot().await,
            AnyNodeOps::Kubernetes(ops) => ops.wait_ready_after_boot().await,
        }
    }

    async fn finish(&self) -> Result<(), NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.finish().await,
            AnyNodeOps::Kubernetes(ops) => ops.finish().await,
        }
    }

    async fn abort(&self, reason: &str) -> Result<(), NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.abort(reason).await,
            AnyNodeOps::Kubernetes(ops) => NodeOps::abort(ops.as_ref(), reason).await,
        }
    }

    async fn show_phase(&self, change: &PhaseChange) {
        match self {
            AnyNodeOps::Standalone(ops) => ops.show_phase(change).await,
            AnyNodeOps::Kubernetes(ops) => ops.show_phase(change).await,
        }
    }

    async fn blockers(&self) -> Result<Vec<String>, NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.blockers().await,
            AnyNodeOps::Kubernetes(ops) => ops.blockers().await,
        }
    }

    async fn show_waiting(&self, blockers: &[String]) {
        match self {
            AnyNodeOps::Standalone(ops) => ops.show_waiting(blockers).await,
            AnyNodeOps::Kubernetes(ops) => ops.show_waiting(blockers).await,
        }
    }

    async fn kubeadm_config(&self) -> Result<Vec<(String, String)>, NodeOpsError> {
        match self {
            AnyNodeOps::Standalone(ops) => ops.kubeadm_config().await,
            AnyNodeOps::Kubernetes(ops) => ops.kubeadm_config().await,
        }
    }
}
