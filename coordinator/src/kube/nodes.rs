//! Node facts from a watch on the cluster's Nodes.
//!
//! - A node whose Ready condition is not True (False or Unknown), and that
//!   does not hold the baton, is an unplanned outage: it is fed to
//!   `Engine::set_unavailable` and counts against the concurrency limit, so
//!   the rollout waits (unless `--ignore-notready-nodes`).
//! - A node labelled `node-role.kubernetes.io/control-plane` (or the older
//!   `.../master`) is a control-plane node whatever its agent says: only one
//!   holds the baton at a time, and none is granted while another
//!   control-plane node is NotReady ([`NodeGuard`]); an agent's own claim
//!   can only add to that, never take away. The etcd guard reads the same
//!   facts ([`NodeAddresses`]).
//! - A node the API does not know, or any node before the first list, is
//!   not granted (fail closed).
//! - Facts expire: a view that was not confirmed by a successful list or
//!   watch event within `--node-facts-max-age` is unknown, and unknown holds
//!   every grant back (with the age and the last error as the reason). The
//!   watch is restarted with a fresh list well within that age.
//! - InternalIPs are kept so the etcd guard can map members to nodes by the
//!   addresses in their peer and client URLs ([`NodeAddresses`]).
//!
//! - Facts and the unavailable set change as one step under the engine's
//!   lock ([`publish_facts`]), so no decision sees one new and the other old.
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
use tokio::time::Instant;
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

/// The facts of every node, and when they were last confirmed.
#[derive(Debug)]
pub struct NodeFacts {
    known: RwLock<Known>,
    max_age: Duration,
}

#[derive(Debug, Default)]
struct Known {
    /// `None` until the first list succeeded.
    nodes: Option<BTreeMap<String, NodeFact>>,
    /// When a list or a watch event last confirmed `nodes`.
    confirmed_at: Option<Instant>,
    /// Why the last list or watch failed, if it did.
    last_error: Option<String>,
}

/// The facts as a decision may use them.
#[derive(Debug)]
pub enum FactsView<'a> {
    /// Nothing was listed yet.
    NotListed,
    /// Listed, but not confirmed for longer than the limit: unknown.
    Stale {
        /// How long ago they were confirmed.
        age: Duration,
        /// The limit.
        max_age: Duration,
        /// The last list or watch error, if any.
        error: Option<&'a str>,
    },
    /// Current.
    Fresh(&'a BTreeMap<String, NodeFact>),
}

impl FactsView<'_> {
    /// The reason a decision that needs node facts waits, unless fresh.
    pub fn unknown_reason(&self) -> Option<String> {
        match self {
            FactsView::NotListed => {
                Some("the Node list has not been read from the Kubernetes API yet".to_string())
            }
            FactsView::Stale {
                age,
                max_age,
                error,
            } => Some(format!(
                "node facts are unknown: the Node list was last read {}s ago (limit {}s){}; not granting until it is read again",
                age.as_secs(),
                max_age.as_secs(),
                error
                    .map(|e| format!(", the last attempt failed: {e}"))
                    .unwrap_or_default()
            )),
            FactsView::Fresh(_) => None,
        }
    }
}

impl Default for NodeFacts {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_AGE)
    }
}

/// How long node facts stay usable without a successful list or watch event.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(120);

impl NodeFacts {
    /// No facts yet; once listed they are usable for `max_age` after each
    /// confirmation.
    pub fn new(max_age: Duration) -> Self {
        Self {
            known: RwLock::new(Known::default()),
            max_age,
        }
    }

    /// How long the watch may run before it is restarted with a fresh list,
    /// so that a quiet but healthy watch confirms the facts in time.
    pub fn relist_every(&self) -> Duration {
        (self.max_age / 2).clamp(Duration::from_secs(1), Duration::from_secs(290))
    }

    fn write(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, NodeFact>),
    ) -> BTreeMap<String, NodeFact> {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        known.confirmed_at = Some(Instant::now());
        known.last_error = None;
        let map = known.nodes.get_or_insert_with(BTreeMap::new);
        change(map);
        map.clone()
    }

    /// Records that a list or watch failed (the facts keep aging).
    fn failed(&self, error: String) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(error);
    }

    /// Runs `read` over the facts as a decision may use them now.
    pub fn with_view<T>(&self, read: impl FnOnce(FactsView<'_>) -> T) -> T {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let view = match (&known.nodes, known.confirmed_at) {
            (Some(nodes), Some(at)) if at.elapsed() <= self.max_age => FactsView::Fresh(nodes),
            (Some(_), Some(at)) => FactsView::Stale {
                age: at.elapsed(),
                max_age: self.max_age,
                error: known.last_error.as_deref(),
            },
            _ => FactsView::NotListed,
        };
        read(view)
    }

    /// A copy of the facts, `None` before the first list.
    pub fn snapshot(&self) -> Option<BTreeMap<String, NodeFact>> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .clone()
    }
}

impl NodeAddresses for NodeFacts {
    /// Not listed before the first list, stale once the facts are too old;
    /// no addresses for a node the API does not know.
    fn internal_ips(&self, node: &NodeName) -> InternalIps {
        self.with_view(|view| match view {
            FactsView::NotListed => InternalIps::NotListed,
            FactsView::Stale { .. } => InternalIps::Stale,
            FactsView::Fresh(nodes) => InternalIps::Known(
                nodes
                    .get(node.as_str())
                    .map(|f| f.internal_ips.clone())
                    .unwrap_or_default(),
            ),
        })
    }

    /// The node's control-plane label, when the facts are fresh. Unknown
    /// nodes and unknown facts say false here: they are held back by
    /// [`NodeGuard`] and by [`InternalIps::NotListed`]/[`InternalIps::Stale`].
    fn control_plane(&self, node: &NodeName) -> bool {
        self.with_view(|view| match view {
            FactsView::Fresh(nodes) => nodes.get(node.as_str()).is_some_and(|f| f.control_plane),
            _ => false,
        })
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
    /// Holds `candidate` back while the facts are unknown or stale, while
    /// the API does not know it, and, when it is a control-plane node (by
    /// label, or by its agent's claim: a claim can only make it stricter),
    /// while another control-plane node holds the baton or is NotReady.
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        _now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.facts.with_view(|view| {
            if let Some(reason) = view.unknown_reason() {
                return Err(reason);
            }
            let FactsView::Fresh(nodes) = view else {
                unreachable!("only fresh facts have no unknown reason")
            };
            let Some(fact) = nodes.get(candidate.node.as_str()) else {
                return Err(format!("{} is not a Node of this cluster", candidate.node));
            };
            if !(fact.control_plane || candidate.control_plane) {
                return Ok(());
            }
            let other = state.holders.iter().find(|(name, h)| {
                h.control_plane || nodes.get(name.as_str()).is_some_and(|f| f.control_plane)
            });
            if let Some((other, _)) = other {
                return Err(format!(
                    "control-plane node {other} holds the baton; only one control-plane node at a time"
                ));
            }
            // A control-plane node that is down without the baton (a crash,
            // a partition) already takes an etcd member and an API server
            // out: taking a second one down could break quorum.
            let down = nodes.iter().find(|(name, f)| {
                f.control_plane
                    && !f.ready
                    && name.as_str() != candidate.node.as_str()
                    && !state.holders.keys().any(|h| h.as_str() == name.as_str())
            });
            if let Some((down, _)) = down {
                return Err(format!(
                    "control-plane node {down} is NotReady; no other control-plane node goes down until it is Ready again"
                ));
            }
            Ok(())
        })
    }
}

/// One change to the node facts, as a watch event brings it.
type FactsChange = dyn FnOnce(&mut BTreeMap<String, NodeFact>) + Send;

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
    let relist = facts.relist_every().as_secs().max(1) as u32;
    loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "listing nodes failed; retrying (the facts expire meanwhile)");
                facts.failed(format!("listing nodes: {e}"));
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
        publish_facts(&engine, &facts, |m| *m = map, ignore_notready).await;
        let version = list.metadata.resource_version.unwrap_or_default();
        let stream = match api
            .watch(&WatchParams::default().timeout(relist), &version)
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "watching nodes failed; listing again");
                facts.failed(format!("watching nodes: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let change: Box<FactsChange> = match event {
                Ok(WatchEvent::Added(n) | WatchEvent::Modified(n)) => {
                    let Some(name) = n.metadata.name.clone() else {
                        continue;
                    };
                    let fact = fact_of(&n);
                    Box::new(move |m| {
                        m.insert(name, fact);
                    })
                }
                Ok(WatchEvent::Deleted(n)) => {
                    let Some(name) = n.metadata.name.clone() else {
                        continue;
                    };
                    Box::new(move |m| {
                        m.remove(&name);
                    })
                }
                Ok(WatchEvent::Bookmark(_)) => continue,
                // 410 Gone and friends: start over from a fresh list.
                Ok(WatchEvent::Error(e)) => {
                    warn!(error = %e, "node watch error; listing again");
                    facts.failed(format!("watching nodes: {e}"));
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "node watch failed; listing again");
                    facts.failed(format!("watching nodes: {e}"));
                    break;
                }
            };
            publish_facts(&engine, &facts, change, ignore_notready).await;
        }
    }
}

/// Applies `change` to `facts` and feeds the nodes that are down to
/// `engine`, as one step for the grant rule ([`Engine::update_node_facts`]):
/// a decision sees either the old facts and the old unavailable set, or
/// both new.
pub async fn publish_facts(
    engine: &Engine,
    facts: &NodeFacts,
    change: impl FnOnce(&mut BTreeMap<String, NodeFact>),
    ignore_notready: bool,
) {
    engine
        .update_node_facts(|| unavailable(&facts.write(change), ignore_notready))
        .await;
    engine.poke();
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
            backs_up_control_plane: true,
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
    fn waiting(node: &str, control_plane: bool) -> Waiter {
        Waiter {
            node: NodeName::new(node).unwrap(),
            control_plane,
            backs_up_control_plane: true,
        }
    }

    #[test]
    fn a_not_ready_control_plane_node_holds_back_every_other_control_plane_grant() {
        let facts = Arc::new(NodeFacts::default());
        let guard = NodeGuard::new(facts.clone());
        facts.write(|m| {
            m.insert("cp-1".into(), fact_of(&node("cp-1", "True", true)));
            m.insert("cp-2".into(), fact_of(&node("cp-2", "Unknown", true)));
            m.insert("w1".into(), fact_of(&node("w1", "True", false)));
        });
        let state = LeaseState::default();
        let reason = guard
            .check(&waiting("cp-1", false), &state, Utc::now())
            .unwrap_err();
        assert!(
            reason.contains("control-plane node cp-2 is NotReady"),
            "{reason}"
        );
        // A worker that claims to be control-plane is held back like one (a
        // claim only ever makes a node stricter) ...
        assert!(
            guard
                .check(&waiting("w1", true), &state, Utc::now())
                .is_err()
        );
        // ... and a worker that does not is not held back by it.
        assert_eq!(
            guard.check(&waiting("w1", false), &state, Utc::now()),
            Ok(())
        );
        // While cp-2 itself holds the baton, its NotReady is planned, and the
        // one-at-a-time rule is what holds cp-1 back.
        let mut holding = LeaseState::default();
        holding
            .grant(
                &NodeName::new("cp-2").unwrap(),
                true,
                false,
                "t",
                Utc::now(),
            )
            .unwrap();
        let reason = guard
            .check(&waiting("cp-1", false), &holding, Utc::now())
            .unwrap_err();
        assert!(reason.contains("cp-2 holds the baton"), "{reason}");
        // Ready again: cp-1 may go.
        facts.write(|m| {
            m.insert("cp-2".into(), fact_of(&node("cp-2", "True", true)));
        });
        assert_eq!(
            guard.check(&waiting("cp-1", false), &state, Utc::now()),
            Ok(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn facts_not_confirmed_in_time_are_unknown_and_hold_every_grant_back() {
        let facts = Arc::new(NodeFacts::new(Duration::from_secs(60)));
        let guard = NodeGuard::new(facts.clone());
        facts.write(|m| {
            m.insert("w1".into(), fact_of(&node("w1", "True", false)));
        });
        let state = LeaseState::default();
        let w1 = NodeName::new("w1").unwrap();
        assert_eq!(
            guard.check(&waiting("w1", false), &state, Utc::now()),
            Ok(())
        );
        assert!(matches!(facts.internal_ips(&w1), InternalIps::Known(_)));
        // The API stops answering: the old view ages, then is unknown.
        facts.failed("listing nodes: connection refused".to_string());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            guard.check(&waiting("w1", false), &state, Utc::now()),
            Ok(())
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let reason = guard
            .check(&waiting("w1", false), &state, Utc::now())
            .unwrap_err();
        assert!(reason.contains("last read 61s ago (limit 60s)"), "{reason}");
        assert!(reason.contains("connection refused"), "{reason}");
        assert_eq!(facts.internal_ips(&w1), InternalIps::Stale);
        // A successful read makes them current again.
        facts.write(|_| {});
        assert_eq!(
            guard.check(&waiting("w1", false), &state, Utc::now()),
            Ok(())
        );
        assert!(facts.relist_every() <= Duration::from_secs(30));
    }
}
