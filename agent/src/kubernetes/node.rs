//! Cordon, uncordon, annotations, the holding label and waiting for Ready.
//!
//! Whether the node was cordoned before Baton touched it is remembered on
//! the node itself (annotation `baton.dev/cordoned`: `baton` when Baton
//! cordoned it, `before-baton` when it already was), written in the same
//! resourceVersion-guarded patch as the cordon, so it survives agent
//! restarts and reboots and is never lost to a race with another writer.
//! Uncordon only undoes a cordon Baton made.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{KubeError, KubeNodeOps, retrying, status_code};

/// Remembers who cordoned the node.
pub const CORDONED_ANNOTATION: &str = "baton.dev/cordoned";
/// The phase the agent last reported.
pub const PHASE_ANNOTATION: &str = "baton.dev/phase";
/// The fencing token of the baton the node holds or last held.
pub const TOKEN_ANNOTATION: &str = "baton.dev/fencing-token";
/// When the last maintenance finished.
pub const LAST_MAINTENANCE_ANNOTATION: &str = "baton.dev/last-maintenance";
/// The last error, removed when a maintenance succeeds.
pub const LAST_ERROR_ANNOTATION: &str = "baton.dev/last-error";
/// Set to "true" while the node holds the baton (to silence alerts).
pub const HOLDING_LABEL: &str = "baton.dev/holding";

const CORDONED_BY_BATON: &str = "baton";
const CORDONED_BEFORE: &str = "before-baton";
/// How often a conflicting node update is re-read and retried.
const CONFLICT_RETRIES: usize = 5;

/// What `cordon` found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CordonOutcome {
    /// Baton cordoned the node.
    Cordoned,
    /// The node was already cordoned by someone else; it stays so afterwards.
    AlreadyCordoned,
    /// Baton had cordoned it before (a repeated step).
    Unchanged,
}

/// What `uncordon` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UncordonOutcome {
    /// The node is schedulable again.
    Uncordoned,
    /// The node was cordoned before Baton touched it; it stays cordoned.
    LeftCordoned,
    /// Baton had not cordoned it; nothing was changed.
    NotCordonedByBaton,
}

/// Annotation updates; `None` leaves an annotation as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAnnotations {
    /// The agent's phase.
    pub phase: Option<String>,
    /// The fencing token.
    pub fencing_token: Option<u64>,
    /// When the last maintenance finished.
    pub last_maintenance: Option<DateTime<Utc>>,
    /// `Some(Some(e))` records an error, `Some(None)` clears it.
    pub last_error: Option<Option<String>>,
}

impl NodeAnnotations {
    /// The merge patch of `metadata.annotations` these updates make.
    pub fn to_patch(&self) -> Value {
        let mut annotations = serde_json::Map::new();
        if let Some(phase) = &self.phase {
            annotations.insert(PHASE_ANNOTATION.into(), json!(phase));
        }
        if let Some(token) = self.fencing_token {
            annotations.insert(TOKEN_ANNOTATION.into(), json!(token.to_string()));
        }
        if let Some(at) = self.last_maintenance {
            annotations.insert(LAST_MAINTENANCE_ANNOTATION.into(), json!(at.to_rfc3339()));
        }
        if let Some(error) = &self.last_error {
            annotations.insert(LAST_ERROR_ANNOTATION.into(), json!(error));
        }
        json!({ "metadata": { "annotations": annotations } })
    }
}

/// The node's Ready condition status ("True", "False", "Unknown") and message.
pub fn ready_condition(node: &Node) -> (String, String) {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()))
        .unwrap_or_else(|| {
            (
                "Unknown".to_string(),
                "no Ready condition reported".to_string(),
            )
        })
}

fn is_unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

impl KubeNodeOps {
    async fn get_node(&self) -> Result<Node, KubeError> {
        retrying(&self.node, "reading the node", || {
            self.nodes.get_opt(&self.node)
        })
        .await
        .map_err(KubeError::api(format!("reading node {}", self.node)))?
        .ok_or_else(|| KubeError::NodeMissing(self.node.clone()))
    }

    /// Reads the node, computes a patch from it and applies it guarded by
    /// the resourceVersion read; a conflict re-reads and re-decides.
    async fn update_node(
        &self,
        action: &str,
        decide: impl Fn(&Node) -> Option<Value>,
    ) -> Result<Option<Node>, KubeError> {
        for _ in 0..CONFLICT_RETRIES {
            let node = self.get_node().await?;
            let Some(mut patch) = decide(&node) else {
                return Ok(None);
            };
            patch["metadata"]["resourceVersion"] = json!(node.metadata.resource_version);
            let params = PatchParams::default();
            let merge = Patch::Merge(&patch);
            match retrying(&self.node, action, || {
                self.nodes.patch(&self.node, &params, &merge)
            })
            .await
            {
                Ok(node) => return Ok(Some(node)),
                Err(e) if status_code(&e) == Some(409) => {
                    warn!(node = %self.node, action, "node changed while updating it; re-reading");
                }
                Err(e) => return Err(KubeError::api(format!("{action} node {}", self.node))(e)),
            }
        }
        Err(KubeError::Conflict(self.node.clone()))
    }

    /// Marks the node unschedulable, remembering whether it already was.
    pub async fn cordon(&self) -> Result<CordonOutcome, KubeError> {
        let mut outcome = CordonOutcome::Unchanged;
        let updated = self
            .update_node("cordoning", |node| {
                let unschedulable = is_unschedulable(node);
                match annotation(node, CORDONED_ANNOTATION) {
                    // Repeated step: make sure it is still cordoned.
                    Some(_) if unschedulable => None,
                    Some(_) => Some(json!({ "spec": { "unschedulable": true } })),
                    None => {
                        let who = if unschedulable {
                            CORDONED_BEFORE
                        } else {
                            CORDONED_BY_BATON
                        };
                        Some(json!({
                            "metadata": { "annotations": { CORDONED_ANNOTATION: who } },
                            "spec": { "unschedulable": true },
                        }))
                    }
                }
            })
            .await?;
        if let Some(node) = updated {
            outcome = match annotation(&node, CORDONED_ANNOTATION) {
                Some(CORDONED_BEFORE) => CordonOutcome::AlreadyCordoned,
                _ => CordonOutcome::Cordoned,
            };
        }
        info!(node = %self.node, ?outcome, "cordon");
        Ok(outcome)
    }

    /// Undoes Baton's cordon. A node that was cordoned before Baton touched
    /// it stays cordoned; a node Baton did not cordon is left alone.
    pub async fn uncordon(&self) -> Result<UncordonOutcome, KubeError> {
        let node = self.get_node().await?;
        let outcome = match annotation(&node, CORDONED_ANNOTATION) {
            Some(CORDONED_BY_BATON) => UncordonOutcome::Uncordoned,
            Some(_) => UncordonOutcome::LeftCordoned,
            None => UncordonOutcome::NotCordonedByBaton,
        };
        self.update_node("uncordoning", |node| {
            match annotation(node, CORDONED_ANNOTATION) {
                Some(CORDONED_BY_BATON) => Some(json!({
                    "metadata": { "annotations": { CORDONED_ANNOTATION: null } },
                    "spec": { "unschedulable": false },
                })),
                Some(_) => {
                    Some(json!({ "metadata": { "annotations": { CORDONED_ANNOTATION: null } } }))
                }
                None => None,
            }
        })
        .await?;
        info!(node = %self.node, ?outcome, "uncordon");
        Ok(outcome)
    }

    /// Ends a maintenance that cannot go on (e.g. the drain timed out):
    /// records `reason` as the last error and uncordons, unless the node was
    /// cordoned before Baton touched it. Releasing the baton is the caller's.
    pub async fn abort(&self, reason: &str) -> Result<UncordonOutcome, KubeError> {
        warn!(node = %self.node, reason, "aborting maintenance");
        self.annotate(&NodeAnnotations {
            last_error: Some(Some(reason.to_string())),
            ..NodeAnnotations::default()
        })
        .await?;
        self.uncordon().await
    }

    /// Applies annotation updates.
    pub async fn annotate(&self, updates: &NodeAnnotations) -> Result<(), KubeError> {
        let (params, patch) = (PatchParams::default(), updates.to_patch());
        let merge = Patch::Merge(&patch);
        retrying(&self.node, "annotating", || {
            self.nodes.patch(&self.node, &params, &merge)
        })
        .await
        .map_err(KubeError::api(format!("annotating node {}", self.node)))?;
        Ok(())
    }

    /// Sets (`true`) or removes the label that marks the holder.
    pub async fn set_holding(&self, holding: bool) -> Result<(), KubeError> {
        let value = if holding { json!("true") } else { Value::Null };
        let patch = json!({ "metadata": { "labels": { HOLDING_LABEL: value } } });
        let params = PatchParams::default();
        let merge = Patch::Merge(&patch);
        retrying(&self.node, "labelling", || {
            self.nodes.patch(&self.node, &params, &merge)
        })
        .await
        .map_err(KubeError::api(format!("labelling node {}", self.node)))?;
        Ok(())
    }

    /// Waits until the node's Ready condition is True and, when
    /// `boot_id` is given, the kubelet reports that boot (so a Ready status
    /// left over from before the reboot is not mistaken for the new one).
    /// Fails after `timeout` (e.g. `--node-ready-timeout`).
    pub async fn wait_ready(
        &self,
        boot_id: Option<&str>,
        timeout: Duration,
    ) -> Result<(), KubeError> {
        let mut last = String::from("not observed yet");
        let node_name = self.node.clone();
        let wait = async {
            loop {
                // Within the readiness timeout every API error but a
                // missing node is waited out.
                let node = match self.get_node().await {
                    Ok(node) => node,
                    Err(e @ KubeError::NodeMissing(_)) => return Err(e),
                    Err(e) => {
                        last = format!("cannot read the node: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if self.ready_for(&node, boot_id, &mut last) {
                    return Ok::<(), KubeError>(());
                }
                let rv = node.metadata.resource_version.clone().unwrap_or_default();
                let params = WatchParams::default()
                    .fields(&format!("metadata.name={node_name}"))
                    .timeout(60);
                let stream = self.nodes.watch(&params, &rv).await;
                let Ok(stream) = stream else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(WatchEvent::Added(node) | WatchEvent::Modified(node)) => {
                            if self.ready_for(&node, boot_id, &mut last) {
                                return Ok(());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        };
        let result = tokio::time::timeout(timeout, wait).await;
        match result {
            Ok(done) => done,
            Err(_) => Err(KubeError::NotReady {
                node: self.node.clone(),
                timeout,
                detail: last,
            }),
        }
    }

    fn ready_for(&self, node: &Node, boot_id: Option<&str>, last: &mut String) -> bool {
        let (status, message) = ready_condition(node);
        let reported_boot = node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.as_str());
        let boot_ok = boot_id.is_none_or(|b| reported_boot == Some(b));
        *last = format!(
            "Ready={status} ({message}); kubelet boot id {}",
            reported_boot.unwrap_or("unknown")
        );
        status == "True" && boot_ok
    }
}
