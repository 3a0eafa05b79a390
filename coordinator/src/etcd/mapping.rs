//! Which etcd member a node carries.
//!
//! A node's member is the member named like the node, unless
//! `--etcd-member-map node=member` says otherwise. A node is exempt from the
//! guard only when `--etcd-exempt-node` names it; a node for which no member
//! is found is never exempt by accident:
//! - a node explicitly mapped to a member that is not in the member list
//!   waits (the map is wrong or the member was removed);
//! - a control-plane node with no member found waits, with a reason that
//!   says how to map or exempt it (control-plane nodes are where etcd runs);
//! - a worker with no member found is not an etcd node, and etcd does not
//!   hold it back;
//! - while etcd cannot be read, nobody can tell whether a node carries a
//!   member, so every node that is not exempt waits (fail closed).

use std::collections::{BTreeMap, BTreeSet};

use super::health::HealthSnapshot;
use crate::node::NodeName;

/// How nodes map to etcd members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberMap {
    /// Explicit node → member-name entries.
    pub overrides: BTreeMap<NodeName, String>,
    /// Nodes the guard does not look at.
    pub exempt: BTreeSet<NodeName>,
}

/// Why a `node=member` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberMapError {
    /// Not of the form `node=member`.
    #[error("member map entry {0:?} is not of the form node=member")]
    Malformed(String),
    /// The node part is not a valid node name.
    #[error("member map entry {entry:?}: {source}")]
    Node {
        /// The entry.
        entry: String,
        /// The error.
        source: crate::node::NodeNameError,
    },
}

/// What a node is, as far as etcd is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtcdRole {
    /// The node carries the member with this name.
    Member(String),
    /// The node carries no member (a worker).
    NotEtcd,
    /// The node is exempt by configuration.
    Exempt,
}

impl MemberMap {
    /// Builds a map from `node=member` entries and exempt node names.
    pub fn new(entries: &[String], exempt: &[NodeName]) -> Result<Self, MemberMapError> {
        let mut overrides = BTreeMap::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (node, member) = entry
                .split_once('=')
                .filter(|(n, m)| !n.is_empty() && !m.is_empty())
                .ok_or_else(|| MemberMapError::Malformed(entry.to_string()))?;
            let node = NodeName::new(node).map_err(|source| MemberMapError::Node {
                entry: entry.to_string(),
                source,
            })?;
            overrides.insert(node, member.to_string());
        }
        Ok(Self {
            overrides,
            exempt: exempt.iter().cloned().collect(),
        })
    }

    /// The member name `node` would carry.
    pub fn member_name<'a>(&'a self, node: &'a NodeName) -> &'a str {
        self.overrides
            .get(node)
            .map(String::as_str)
            .unwrap_or(node.as_str())
    }

    /// What `node` is, given the member list in `health`; `Err` is the
    /// reason it must wait.
    pub fn role(
        &self,
        node: &NodeName,
        control_plane: bool,
        health: &HealthSnapshot,
    ) -> Result<EtcdRole, String> {
        if self.exempt.contains(node) {
            return Ok(EtcdRole::Exempt);
        }
        if let Some(reason) = &health.unreadable {
            return Err(format!(
                "etcd: cannot read the cluster ({reason}), so cannot tell whether node {node} carries a member"
            ));
        }
        let name = self.member_name(node);
        if health.member(name).is_some() {
            return Ok(EtcdRole::Member(name.to_string()));
        }
        if self.overrides.contains_key(node) {
            return Err(format!(
                "etcd: node {node} is mapped to member {name}, which is not in the member list"
            ));
        }
        if control_plane {
            return Err(format!(
                "etcd: no member named {name} found for control-plane node {node}; map it with --etcd-member-map {node}=MEMBER or exempt it with --etcd-exempt-node {node}"
            ));
        }
        Ok(EtcdRole::NotEtcd)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::etcd::health::fixtures::{cluster, member};

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn maps_by_name_override_and_exemption() {
        let map = MemberMap::new(&["cp-a=etcd-1".to_string()], &[n("cp-x")]).unwrap();
        let health = cluster(Utc::now(), vec![member(1, "etcd-1"), member(2, "cp-b")]);
        assert_eq!(
            map.role(&n("cp-a"), true, &health),
            Ok(EtcdRole::Member("etcd-1".into()))
        );
        assert_eq!(
            map.role(&n("cp-b"), true, &health),
            Ok(EtcdRole::Member("cp-b".into()))
        );
        assert_eq!(map.role(&n("cp-x"), true, &health), Ok(EtcdRole::Exempt));
        assert_eq!(map.role(&n("w1"), false, &health), Ok(EtcdRole::NotEtcd));
        assert!(
            map.role(&n("cp-c"), true, &health)
                .unwrap_err()
                .contains("no member named cp-c")
        );
        let bad = MemberMap::new(&["w1=gone".to_string()], &[]).unwrap();
        assert!(
            bad.role(&n("w1"), false, &health)
                .unwrap_err()
                .contains("mapped to member gone")
        );
    }

    #[test]
    fn unreadable_etcd_holds_back_everyone_not_exempt() {
        let map = MemberMap::new(&[], &[n("cp-x")]).unwrap();
        let health = HealthSnapshot::unreadable(Utc::now(), "connection refused");
        assert!(map.role(&n("w1"), false, &health).is_err());
        assert_eq!(map.role(&n("cp-x"), true, &health), Ok(EtcdRole::Exempt));
    }

    #[test]
    fn refuses_malformed_entries() {
        for bad in ["x", "=m", "n=", "N=m"] {
            assert!(MemberMap::new(&[bad.to_string()], &[]).is_err(), "{bad}");
        }
    }
}
