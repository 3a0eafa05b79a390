//! Node facts from a watch on the cluster's Nodes.
//!
//! - A node whose Ready condition is not True (False or Unknown), and that
//!   does not hold the baton, is an unplanned outage: it is fed to
//!   `Engine::set_unavailable` and counts against the concurrency limit, so
//!   the rollout waits (unless `--ignore-notready-nodes`).
//! - A node labelled `node-role.kubernetes.io/control-plane` (or the older
//!   `.../master`) is a control-plane node whatever its agent says: only one
//!   holds the baton at a time ([`NodeGuard`]).
//! - A node the API does not know, or any node before the first list, is
//!   not granted (fail closed).
//! - InternalIPs are kept so the etcd guard can map members to nodes by the
//!   addresses in their peer and client URLs ([`NodeAddresses`]).
//!
//! [`fact_of`] and [`unavailable`] are pure; [`watch_nodes`] does the I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::kube::api::{ListParams, WatchEvent, WatchParams};
use ::kube::{Api, Client};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use tracing::{info, warn};

use crate::engine::Engine;
use crate::etcd::mapping::{InternalIps, NodeAddresses};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Waiter};
use crate::state::LeaseState;

/// Labels that mark a control-plane node.
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// What the coordinator knows about one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFact {
    /// The Ready condition is True.
    pub ready: bool,
    /// Carries a control-plane role label.
    pub control_plane: bool,
    /// Every InternalIP address (two on a dual-stack node), in the order
    /// the Node lists them.
    pub internal_ips: Vec<IpAddr>,
    /// The Node's labels (the rollout policy's pools and zones).
    pub labels: BTreeMap<String, String>,
}

/// The facts of every node; `None` until the first list succeeded.
#[derive(Debug, Default)]
pub struct NodeFacts {
    nodes: RwLock<Option<BTreeMap<String, NodeFact>>>,
}

impl NodeFacts {
    fn write(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, NodeFact>),
    ) -> BTreeMap<String, NodeFact> {
        let mut guard = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(BTreeMap::new);
        change(map);
        map.clone()
    }

    /// A copy of the facts, `None` before the first list.
    pub fn snapshot(&self) -> Option<BTreeMap<String, NodeFact>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl NodeAddresses for NodeFacts {
    /// Not listed before the first list; no addresses for a node the API
    /// does not know.
    fn internal_ips(&self, node: &NodeName) -> InternalIps {
        let guard = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            None => InternalIps::NotListed,
            Some(nodes) => InternalIps::Known(
                nodes
                    .get(node.as_str())
                    .map(|f| f.internal_ips.clone())
                    .unwrap_or_default(),
            ),
        }
    }
}

/// The facts of `node`.
pub fn fact_of(node: &Node) -> NodeFact {
    let labels = node.metadata.labels.as_ref();
    let status = node.status.as_ref();
    NodeFact {
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True"),
        control_plane: labels
            .is_some_and(|l| CONTROL_PLANE_LABELS.iter().any(|k| l.contains_key(*k))),
        // The API server validates InternalIPs; anything unparsable is
        // skipped rather than trusted.
        internal_ips: status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect(),
        labels: labels.cloned().unwrap_or_default(),
    }
}

/// The nodes that count as unavailable: not Ready (the grant rule leaves out
/// those holding the baton), none with `ignore_notready`. Names Kubernetes
/// allows but Baton cannot represent are skipped with a warning.
pub fn unavailable(facts: &BTreeMap<String, NodeFact>, ignore_notready: bool) -> Vec<NodeName> {
    if ignore_notready {
        return Vec::new();
    }
    facts
        .iter()
        .filter(|(_, f)| !f.ready)
        .filter_map(|(name, _)| match NodeName::new(name.as_str()) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!(node = %name, error = %e, "ignoring a NotReady node with an unusable name");
                None
            }
        })
        .collect()
}

/// Grant guard from the node facts: unknown nodes wait, control-plane
/// nodes (by label) go one at a time.
pub struct NodeGuard {
    facts: Arc<NodeFacts>,
}

impl NodeGuard {
    /// A guard over `facts`.
    pub fn new(facts: Arc<NodeFacts>) -> Self {
        Self { facts }
    }
}

impl GrantGuard for NodeGuard {
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        _now: DateTime<Utc>,
    ) -> Result<(), String> {
        let guard = self.facts.nodes.read().unwrap_or_else(|e| e.into_inner());
        let Some(nodes) = guard.as_ref() else {
            return Err("the Node list has not been read from the Kubernetes API yet".to_string());
        };
        let Some(fact) = nodes.get(candidate.node.as_str()) else {
            return Err(format!("{} is not a Node of this cluster", candidate.node));
        };
        if fact.control_plane || candidate.control_plane {
            let other = state.holders.iter().find(|(name, h)| {
                h.control_plane || nodes.get(name.as_str()).is_some_and(|f| f.control_plane)
            });
            if let Some((other, _)) = other {
                return Err(format!(
                    "control-plane node {other} holds the baton; only one control-plane node at a time"
                ));
            }
        }
        Ok(())
    }
}

/// Keeps `facts` current from a list and watch of Nodes and feeds the
/// unavailable nodes to `engine`. Runs until the process ends; errors are
/// retried (a stale view only ever holds grants back: the guard and the
/// unavailable set were built from the last successful read).
pub async fn watch_nodes(
    client: Client,
    facts: Arc<NodeFacts>,
    engine: Arc<Engine>,
    ignore_notready: bool,
) {
    let api: Api<Node> = Api::all(client);
    let publish = |map: BTreeMap<String, NodeFact>| {
        let engine = engine.clone();
        async move {
            engine
                .set_unavailable(unavailable(&map, ignore_notready))
                .await;
            engine.poke();
        }
    };
    loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "listing nodes failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let map: BTreeMap<String, NodeFact> = list
            .items
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, fact_of(n))))
            .collect();
        info!(
            nodes = map.len(),
            not_ready = map.values().filter(|f| !f.ready).count(),
            "node list read"
        );
        publish(facts.write(|m| *m = map)).await;
        let version = list.metadata.resource_version.unwrap_or_default();
        let stream = match api
            .watch(&WatchParams::default().timeout(290), &version)
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "watching nodes failed; listing again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let map = match event {
                Ok(WatchEvent::Added(n) | WatchEvent::Modified(n)) => {
                    let Some(name) = n.metadata.name.clone() else {
                        continue;
                    };
                    let fact = fact_of(&n);
                    facts.write(|m| {
                        m.insert(name, fact);
                    })
                }
                Ok(WatchEvent::Deleted(n)) => {
                    let Some(name) = n.metadata.name.clone() else {
                        continue;
                    };
                    facts.write(|m| {
                        m.remove(&name);
                    })
                }
                Ok(WatchEvent::Bookmark(_)) => continue,
                // 410 Gone and friends: start over from a fresh list.
                Ok(WatchEvent::Error(e)) => {
                    warn!(error = %e, "node watch error; listing again");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "node watch failed; listing again");
                    break;
                }
            };
            publish(map).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, ready: &str, control_plane: bool) -> Node {
        let mut labels = json!({});
        if control_plane {
            labels["node-role.kubernetes.io/control-plane"] = json!("");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {
                "conditions": [{"type": "Ready", "status": ready}],
                "addresses": [
                    {"type": "Hostname", "address": name},
                    {"type": "InternalIP", "address": "10.1.0.7"},
                    {"type": "InternalIP", "address": "fd00::7"},
                ],
            },
        }))
        .expect("valid node")
    }

    #[test]
    fn facts_from_labels_conditions_and_addresses() {
        let f = fact_of(&node("cp-1", "True", true));
        assert_eq!(
            f,
            NodeFact {
                ready: true,
                control_plane: true,
                internal_ips: vec!["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
                labels: [(
                    "node-role.kubernetes.io/control-plane".to_string(),
                    String::new()
                )]
                .into(),
            }
        );
        assert!(!fact_of(&node("w", "Unknown", false)).ready);
    }

    #[test]
    fn not_ready_nodes_are_unavailable_unless_ignored() {
        let facts: BTreeMap<String, NodeFact> = [
            ("a".to_string(), fact_of(&node("a", "True", false))),
            ("b".to_string(), fact_of(&node("b", "False", false))),
        ]
        .into();
        assert_eq!(
            unavailable(&facts, false),
            vec![NodeName::new("b").unwrap()]
        );
        assert!(unavailable(&facts, true).is_empty());
    }

    #[test]
    fn guard_fails_closed_and_limits_control_plane_nodes() {
        let facts = Arc::new(NodeFacts::default());
        let guard = NodeGuard::new(facts.clone());
        let waiter = |n: &str| Waiter {
            node: NodeName::new(n).unwrap(),
            control_plane: false,
        };
        let state = LeaseState::default();
        assert!(
            guard.check(&waiter("cp-2"), &state, Utc::now()).is_err(),
            "no list yet"
        );
        let cp_1 = NodeName::new("cp-1").unwrap();
        assert_eq!(facts.internal_ips(&cp_1), InternalIps::NotListed);
        facts.write(|m| {
            m.insert("cp-1".into(), fact_of(&node("cp-1", "True", true)));
            m.insert("cp-2".into(), fact_of(&node("cp-2", "True", true)));
        });
        assert!(guard.check(&waiter("cp-2"), &state, Utc::now()).is_ok());
        assert!(
            guard
                .check(&waiter("ghost"), &state, Utc::now())
                .unwrap_err()
                .contains("not a Node")
        );
        let mut state = LeaseState::default();
        // cp-1 holds it, though its agent did not say it is a control-plane node.
        state
            .grant(
                &NodeName::new("cp-1").unwrap(),
                false,
                false,
                "test",
                Utc::now(),
            )
            .unwrap();
        let reason = guard
            .check(&waiter("cp-2"), &state, Utc::now())
            .unwrap_err();
        assert!(reason.contains("cp-1"), "{reason}");
        assert_eq!(
            facts.internal_ips(&cp_1),
            InternalIps::Known(vec![
                "10.1.0.7".parse().unwrap(),
                "fd00::7".parse().unwrap()
            ])
        );
        assert_eq!(
            facts.internal_ips(&NodeName::new("ghost").unwrap()),
            InternalIps::Known(Vec::new())
        );
    }
}
