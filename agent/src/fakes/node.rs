//! The simulated node operations: cordon and a drain that takes time,
//! uncordon, blockers, and what is shown on the node.

use super::{Injected, Point, Rec, Sim};
use crate::kubernetes::KubeError;
use crate::node_ops::{NodeOps, NodeOpsError, PhaseChange};
use std::sync::Arc;
use std::time::Duration;

/// How long a hung node operation takes to fail.
const HANG: Duration = Duration::from_secs(600);

/// How the simulated `prepare` ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// Drained.
    #[default]
    Ok,
    /// A drain timeout (the node was given back, as the Kubernetes node
    /// operations do).
    DrainTimeout,
    /// Any other error (the node stays cordoned).
    Error,
}

/// The node operations of a [`Sim`].
#[derive(Clone)]
pub struct SimNode(pub Arc<Sim>);

fn node_error(what: &str, e: Injected) -> NodeOpsError {
    NodeOpsError::UnitFailed {
        unit: what.to_string(),
        detail: format!("injected {e:?}"),
    }
}

fn lost(what: &str) -> NodeOpsError {
    NodeOpsError::UnitFailed {
        unit: what.to_string(),
        detail: "injected: the answer was lost".into(),
    }
}

impl SimNode {
    fn cordon(&self, cordoned: bool) {
        let mut state = self.0.state();
        if state.cordoned != cordoned {
            state.cordoned = cordoned;
            state
                .log
                .push(if cordoned { Rec::Cordon } else { Rec::Uncordon });
        }
    }
}

impl NodeOps for SimNode {
    async fn prepare(&self) -> Result<(), NodeOpsError> {
        let fault = self
            .0
            .enter(Point::Prepare, HANG)
            .await
            .map_err(|e| node_error("prepare", e))?;
        self.0.node_call("prepare");
        let (outcome, drain, pending) = {
            let mut state = self.0.state();
            let inc = state.incarnation;
            state.log.push(Rec::Prepare(inc));
            if state.outage_on_drain {
                state.coordinator_down = true;
            }
            (
                state.prepare,
                state.drain_duration,
                state.drain_pending.clone(),
            )
        };
        self.cordon(true);
        tokio::time::sleep(drain).await;
        let answer = match outcome {
            super::PrepareOutcome::Ok => Ok(()),
            super::PrepareOutcome::DrainTimeout => {
                self.cordon(false);
                Err(KubeError::DrainTimeout {
                    timeout: drain,
                    pending,
                }
                .into())
            }
            super::PrepareOutcome::Error => Err(KubeError::NodeMissing("n1".into()).into()),
        };
        self.0.leave(fault, answer, lost("prepare")).await
    }

    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError> {
        let fault = self
            .0
            .enter(Point::WaitReady, HANG)
            .await
            .map_err(|e| node_error("ready", e))?;
        self.0.node_call("ready");
        self.0.leave(fault, Ok(()), lost("ready")).await
    }

    async fn finish(&self) -> Result<(), NodeOpsError> {
        let fault = self
            .0
            .enter(Point::Finish, HANG)
            .await
            .map_err(|e| node_error("finish", e))?;
        self.0.node_call("finish");
        self.cordon(false);
        self.0.leave(fault, Ok(()), lost("finish")).await
    }

    async fn abort(&self, _reason: &str) -> Result<(), NodeOpsError> {
        let fault = self
            .0
            .enter(Point::Abort, HANG)
            .await
            .map_err(|e| node_error("abort", e))?;
        self.0.node_call("abort");
        self.cordon(false);
        self.0.leave(fault, Ok(()), lost("abort")).await
    }

    async fn show_phase(&self, change: &PhaseChange) {
        self.0.enter_quiet(Point::ShowPhase, HANG).await;
        self.0.state().shown.push(change.clone());
    }

    async fn blockers(&self) -> Result<Vec<String>, NodeOpsError> {
        let fault = self
            .0
            .enter(Point::Blockers, HANG)
            .await
            .map_err(|e| node_error("blockers", e))?;
        let answer = Ok(self.0.state().blockers.clone());
        self.0.leave(fault, answer, lost("blockers")).await
    }

    async fn show_waiting(&self, blockers: &[String]) {
        self.0.enter_quiet(Point::ShowWaiting, HANG).await;
        self.0.state().waiting_shown.push(blockers.to_vec());
    }
}
