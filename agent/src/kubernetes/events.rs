//! What people see in `kubectl`: a Kubernetes Event on the Node for every
//! transition, and the pods that keep the agent from asking for the baton.

use chrono::Utc;
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tracing::warn;

use super::{KubeError, KubeNodeOps, retrying};

/// The component name Events are reported under.
pub const COMPONENT: &str = "baton-agent";

/// A transition worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// A CamelCase reason, e.g. `BatonGranted`, `BatonDrainTimedOut`.
    pub reason: String,
    /// A human sentence.
    pub message: String,
    /// True for Warning events (failures, aborts).
    pub warning: bool,
}

impl Transition {
    /// A Normal transition.
    pub fn normal(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
            warning: false,
        }
    }

    /// A Warning transition.
    pub fn warning(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            ..Self::normal(reason, message)
        }
    }
}

impl KubeNodeOps {
    /// Records `transition` as an Event on the Node.
    pub async fn record_event(&self, transition: &Transition) -> Result<(), KubeError> {
        let node_uid = self
            .nodes
            .get_opt(&self.node)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.uid);
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": { "generateName": format!("{}.baton.", self.node) },
            "involvedObject": { "apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node_uid },
            "reason": transition.reason,
            "message": transition.message,
            "type": if transition.warning { "Warning" } else { "Normal" },
            "source": { "component": COMPONENT, "host": self.node },
            "reportingComponent": format!("baton.dev/{COMPONENT}"),
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let event: Event = serde_json::from_value(event)
            .map_err(|e| KubeError::Config(format!("building an event: {e}")))?;
        self.events
            .create(&PostParams::default(), &event)
            .await
            .map_err(KubeError::api(format!(
                "recording event {} on node {}",
                transition.reason, self.node
            )))?;
        Ok(())
    }

    /// Pods on the node matching a `--blocking-pod-selector` that have not
    /// finished, each as "namespace/name (matches SELECTOR)". While any is
    /// listed the agent does not ask for the baton.
    pub async fn blocking_pods(&self) -> Result<Vec<String>, KubeError> {
        let mut blocking = Vec::new();
        for selector in self
            .args
            .blocking_pod_selectors
            .iter()
            .filter(|s| !s.trim().is_empty())
        {
            let params = ListParams::default()
                .fields(&format!(
                    "spec.nodeName={},status.phase!=Succeeded,status.phase!=Failed",
                    self.node
                ))
                .labels(selector);
            let api = self.all_pods();
            let pods = retrying(&self.node, "listing blocking pods", || api.list(&params))
                .await
                .map_err(KubeError::api(format!(
                    "listing blocking pods ({selector}) on node {}",
                    self.node
                )))?;
            for pod in pods.items {
                let name = format!(
                    "{}/{}",
                    pod.metadata.namespace.unwrap_or_default(),
                    pod.metadata.name.unwrap_or_default()
                );
                blocking.push(format!("{name} (matches {selector})"));
            }
        }
        if !blocking.is_empty() {
            warn!(node = %self.node, pods = ?blocking, "blocking pods run on the node");
        }
        Ok(blocking)
    }
}
