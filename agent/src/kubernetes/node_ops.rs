//! [`KubeNodeOps`] as the agent's [`NodeOps`] (`--mode kubernetes`):
//! prepare = cordon and drain, wait_ready_after_boot = the node Ready with
//! the kubelet reporting this boot, finish = uncordon, abort = uncordon
//! unless the node was cordoned before Baton touched it. Each step also
//! records a Kubernetes Event and the phase annotation; failing to record
//! them is logged, never fatal.
//!
//! A drain that times out or is refused gives the node back (uncordoned
//! unless it was cordoned before) and fails `prepare` with
//! [`NodeOpsError::Kubernetes`] carrying [`KubeError::DrainTimeout`] or
//! [`KubeError::DrainRefused`]; with `--force-reboot-on-drain-timeout` a
//! timeout is logged and the maintenance goes on.

use tracing::warn;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::visibility::{self, WAITING_ANNOTATION};
use super::{KubeError, KubeNodeOps, NodeAnnotations, Transition};
use crate::node_ops::{NodeOps, NodeOpsError, PhaseChange};

/// Where the kernel publishes this boot's id (the kubelet reports the same).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

impl KubeNodeOps {
    /// Records an Event and the phase annotation; failures are only logged
    /// (visibility must not stop a maintenance).
    async fn show(&self, phase: &str, transition: Transition) {
        let annotations = NodeAnnotations {
            phase: Some(phase.to_string()),
            ..NodeAnnotations::default()
        };
        if let Err(error) = self.annotate(&annotations).await {
            warn!(node = %self.node, %error, "could not annotate the node");
        }
        if let Err(error) = self.record_event(&transition).await {
            warn!(node = %self.node, %error, "could not record an event");
        }
    }

    async fn give_back(&self, error: KubeError) -> NodeOpsError {
        self.show(
            "Aborted",
            Transition::warning("BatonMaintenanceAborted", error.to_string()),
        )
        .await;
        if let Err(undo) = self.abort(&error.to_string()).await {
            warn!(node = %self.node, error = %undo, "could not uncordon after the failed drain");
        }
        NodeOpsError::Kubernetes(error)
    }
}

impl NodeOps for KubeNodeOps {
    async fn prepare(&self) -> Result<(), NodeOpsError> {
        self.set_holding(true).await?;
        self.cordon().await?;
        self.show(
            "Draining",
            Transition::normal("BatonDraining", "cordoned; draining"),
        )
        .await;
        match self.drain().await {
            Ok(report) => {
                let message = format!(
                    "drained: {} pods evicted, {} left running",
                    report.evicted.len(),
                    report.skipped.len()
                );
                self.show("Drained", Transition::normal("BatonDrained", message))
                    .await;
                Ok(())
            }
            Err(error @ KubeError::DrainTimeout { .. })
                if self.args.force_reboot_on_drain_timeout =>
            {
                warn!(node = %self.node, %error, "drain timed out; going on (--force-reboot-on-drain-timeout)");
                self.show(
                    "Drained",
                    Transition::warning(
                        "BatonDrainTimedOut",
                        format!("{error}; going on as forced"),
                    ),
                )
                .await;
                Ok(())
            }
            Err(error @ (KubeError::DrainTimeout { .. } | KubeError::DrainRefused(_))) => {
                Err(self.give_back(error).await)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError> {
        let boot_id = std::fs::read_to_string(BOOT_ID_PATH)
            .ok()
            .map(|b| b.trim().to_string());
        self.wait_ready(boot_id.as_deref(), self.args.node_ready_timeout)
            .await?;
        self.show(
            "Ready",
            Transition::normal("BatonNodeReady", "node Ready after maintenance"),
        )
        .await;
        Ok(())
    }

    async fn finish(&self) -> Result<(), NodeOpsError> {
        self.uncordon().await?;
        self.annotate(&NodeAnnotations {
            phase: Some("Done".to_string()),
            last_maintenance: Some(chrono::Utc::now()),
            last_error: Some(None),
            ..NodeAnnotations::default()
        })
        .await?;
        self.set_holding(false).await?;
        if let Err(error) = self
            .record_event(&Transition::normal(
                "BatonMaintenanceDone",
                "uncordoned; maintenance done",
            ))
            .await
        {
            warn!(node = %self.node, %error, "could not record an event");
        }
        Ok(())
    }

    async fn abort(&self, reason: &str) -> Result<(), NodeOpsError> {
        KubeNodeOps::abort(self, reason).await?;
        self.set_holding(false).await?;
        Ok(())
    }

    async fn show_phase(&self, change: &PhaseChange) {
        if change.from.holds_baton() != change.to.holds_baton()
            && let Err(error) = self.set_holding(change.to.holds_baton()).await
        {
            warn!(node = %self.node, %error, "could not set the holding label");
        }
        if let Err(error) = self.annotate(&visibility::annotations(change)).await {
            warn!(node = %self.node, %error, "could not annotate the node");
        }
        if let Err(error) = self.record_event(&visibility::transition(change)).await {
            warn!(node = %self.node, %error, "could not record an event");
        }
    }

    async fn blockers(&self) -> Result<Vec<String>, NodeOpsError> {
        Ok(self.blocking_pods().await?)
    }

    /// The `kube-system/kubeadm-config` ConfigMap's entries (kubeadm keeps
    /// the ClusterConfiguration there); none when the cluster has no such
    /// ConfigMap (not a kubeadm cluster). Any other error fails the backup.
    async fn kubeadm_config(&self) -> Result<Vec<(String, String)>, NodeOpsError> {
        let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(self.client.clone(), "kube-system");
        let map = maps
            .get_opt("kubeadm-config")
            .await
            .map_err(|source| KubeError::Api {
                action: "reading the ConfigMap kube-system/kubeadm-config".into(),
                source,
            })?;
        Ok(map
            .and_then(|m| m.data)
            .map(|data| data.into_iter().collect())
            .unwrap_or_default())
    }

    async fn show_waiting(&self, blockers: &[String]) {
        let reason = visibility::waiting_reason(blockers);
        if reason.is_none() {
            // Nothing to clear (the agent shows "nothing blocks" once per
            // start, in case an earlier process left the annotation).
            let shown = self
                .nodes
                .get_opt(&self.node)
                .await
                .ok()
                .flatten()
                .is_some_and(|n| {
                    n.metadata
                        .annotations
                        .is_some_and(|a| a.contains_key(WAITING_ANNOTATION))
                });
            if !shown {
                return;
            }
        }
        let patch = json!({ "metadata": { "annotations": { WAITING_ANNOTATION: reason } } });
        if let Err(error) = self
            .nodes
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(node = %self.node, %error, "could not annotate the node");
        }
        let event = match &reason {
            Some(why) => {
                Transition::normal("BatonBlocked", format!("not asking for the baton: {why}"))
            }
            None => Transition::normal("BatonUnblocked", "no blocking pods any more"),
        };
        if let Err(error) = self.record_event(&event).await {
            warn!(node = %self.node, %error, "could not record an event");
        }
    }
}
