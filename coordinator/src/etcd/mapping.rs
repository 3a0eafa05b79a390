//! Which etcd member a node carries.
//!
//! A node's member is found by, in this order (the first that applies
//! decides):
//! 1. an explicit `--etcd-member-map node=member` entry;
//! 2. the member named like the node;
//! 3. with the Kubernetes node watch, the member whose peer or client URLs
//!    use one of the node's InternalIPs as their host. Only IP literals
//!    count (`https://10.0.0.5:2380`, `https://[fd00::5]:2379`); host names
//!    are never resolved, and IPv4-mapped IPv6 addresses equal their IPv4
//!    form. If the node's InternalIPs appear in the URLs of more than one
//!    member, nobody can tell which one it carries, so the node waits until
//!    it is mapped explicitly.
//!
//! A node is exempt from the guard only when `--etcd-exempt-node` names it;
//! a node for which no member is found is never exempt by accident:
//! - a node explicitly mapped to a member that is not in the member list
//!   waits (the map is wrong or the member was removed);
//! - a node whose InternalIP is in the URLs of a member that was added but
//!   has not started waits (it is joining the cluster);
//! - a control-plane node with no member found waits, with a reason that
//!   says how to map or exempt it (control-plane nodes are where etcd runs).
//!   Whether a node is control-plane comes from its Node's role label when
//!   nodes are watched; the agent's own claim can only add to that (a claim
//!   makes a node stricter, never looser);
//! - without the node watch (standalone), nothing but names and the map
//!   says where a member runs: a voting member is placed by a map entry, or
//!   on a known node named like it (one that asked for or held the baton,
//!   or is in the map or exempt). A voting member that is not placed could
//!   be on any node, so the guard holds back every node that is not exempt
//!   and not matched to a member of its own, with a reason naming the
//!   member and the flags that settle it ([`MemberMap::unplaced_members`]);
//! - otherwise a worker with no member found is not an etcd node, and etcd
//!   does not hold it back (a worker whose InternalIP matches a member is an
//!   etcd node, and is held back like one);
//! - while etcd cannot be read, or while the node watch has not listed the
//!   Nodes yet (or its facts are too old), nobody can tell whether a node
//!   carries a member, so every node that is not exempt (or matched by
//!   override or name) waits (fail closed).
//!
//! Assumption: a node carries at most one member (one etcd process per
//! host), so a node matched to one member cannot be carrying another.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::health::{HealthSnapshot, MemberHealth};
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

/// A node's InternalIPs, as far as the mapping knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InternalIps {
    /// Nodes are not watched (no Kubernetes): members map by override and
    /// name only.
    NotWatched,
    /// Nodes are watched but not listed yet, so a node's addresses are
    /// unknown.
    NotListed,
    /// Nodes are watched but the facts are too old to use: unknown.
    Stale,
    /// The node's InternalIPs (none for a node the watch does not know).
    Known(Vec<IpAddr>),
}

/// Where the etcd guard learns a node's InternalIPs and role: the
/// Kubernetes node watch. Read synchronously on every decision, so
/// implementations answer from memory.
pub trait NodeAddresses: Send + Sync {
    /// The InternalIPs of `node`.
    fn internal_ips(&self, node: &NodeName) -> InternalIps;

    /// True when the cluster says `node` is a control-plane node (its role
    /// label). False for unknown nodes and unknown facts: those are held
    /// back by [`InternalIps::NotListed`] and [`InternalIps::Stale`].
    fn control_plane(&self, node: &NodeName) -> bool;
}

/// The IP address a URL's host names, when the host is an IP literal:
/// `http://10.0.0.5:2380` and `https://[fd00::5]:2379` give an address;
/// host names, unix sockets, IPv6 addresses with a zone and anything
/// malformed give `None`.
pub fn url_ip(url: &str) -> Option<IpAddr> {
    let (_scheme, rest) = url.trim().split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_userinfo, host)| host);
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return host.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let host = host_port
        .split_once(':')
        .map_or(host_port, |(host, _port)| host);
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The first of `ips` that `member` advertises in a peer or client URL.
fn advertised_ip(member: &MemberHealth, ips: &[IpAddr]) -> Option<IpAddr> {
    member
        .urls()
        .filter_map(url_ip)
        .map(|ip| ip.to_canonical())
        .find(|ip| ips.iter().any(|n| n.to_canonical() == *ip))
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

    /// Standalone (no node watch): the voting members in `health` that no
    /// known node carries. A member is placed when a map entry names it, or
    /// when a node named like it is known (`seen`: it asked or held the
    /// baton; or it is in the map or exempt) and not mapped to another
    /// member. Any other voting member could be on any node, so every node
    /// that is not exempt and not matched to a member of its own must wait
    /// while this is not empty.
    pub fn unplaced_members<'a>(
        &self,
        health: &'a HealthSnapshot,
        seen: &BTreeSet<NodeName>,
    ) -> Vec<&'a str> {
        let placed = |member: &str| {
            self.overrides.values().any(|m| m == member)
                || NodeName::new(member).is_ok_and(|node| {
                    !self.overrides.contains_key(&node)
                        && (seen.contains(&node) || self.exempt.contains(&node))
                })
        };
        health
            .members
            .iter()
            .filter(|m| m.voting() && !placed(&m.name))
            .map(|m| m.name.as_str())
            .collect()
    }

    /// What `node` is, given its InternalIPs `ips` and the member list in
    /// `health`; `Err` is the reason it must wait. `control_plane` is true
    /// when the cluster's facts or the node's agent say so.
    ///
    /// Safety: an etcd node must never be taken for a worker, so every case
    /// in which the member cannot be told for sure (etcd unreadable, node
    /// addresses not listed yet, an explicit mapping to a missing member, an
    /// InternalIP in the URLs of several members or of an unstarted member,
    /// a control-plane node without a member) is an `Err`, never
    /// [`EtcdRole::NotEtcd`]. See the module docs for the order of the
    /// matches.
    pub fn role(
        &self,
        node: &NodeName,
        control_plane: bool,
        ips: &InternalIps,
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
        let ips = match ips {
            InternalIps::NotWatched => None,
            InternalIps::NotListed => {
                return Err(format!(
                    "etcd: the Kubernetes Node list has not been read yet, so cannot tell whether node {node} carries a member by its InternalIP"
                ));
            }
            InternalIps::Stale => {
                return Err(format!(
                    "etcd: the Kubernetes Node list is too old to use, so cannot tell whether node {node} carries a member by its InternalIP"
                ));
            }
            InternalIps::Known(ips) => Some(ips.as_slice()),
        };
        if let Some(ips) = ips {
            let matched: Vec<(&MemberHealth, IpAddr)> = health
                .members
                .iter()
                .filter_map(|m| advertised_ip(m, ips).map(|ip| (m, ip)))
                .collect();
            match matched.as_slice() {
                [] => {}
                [(member, _)] if member.started() => {
                    return Ok(EtcdRole::Member(member.name.clone()));
                }
                [(member, ip)] => {
                    return Err(format!(
                        "etcd: node {node}'s InternalIP {ip} is in the URLs of member {}, which has not started yet",
                        member.label()
                    ));
                }
                several => {
                    let found: Vec<String> = several
                        .iter()
                        .map(|(m, ip)| format!("{} ({ip})", m.label()))
                        .collect();
                    return Err(format!(
                        "etcd: node {node}'s InternalIPs are in the URLs of several members: {}; cannot tell which it carries, map it with --etcd-member-map {node}=MEMBER",
                        found.join(", ")
                    ));
                }
            }
        }
        if control_plane {
            let by_ip = match ips {
                Some([]) => " (and it has no InternalIP)".to_string(),
                Some(ips) => format!(
                    " (nor one whose URLs use its InternalIP {})",
                    ips.iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
                None => String::new(),
            };
            return Err(format!(
                "etcd: no member named {name} found for control-plane node {node}{by_ip}; map it with --etcd-member-map {node}=MEMBER or exempt it with --etcd-exempt-node {node}"
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

    const NONE: InternalIps = InternalIps::NotWatched;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    fn ips(list: &[&str]) -> InternalIps {
        InternalIps::Known(list.iter().map(|ip| ip.parse().unwrap()).collect())
    }

    #[test]
    fn maps_by_name_override_and_exemption() {
        let map = MemberMap::new(&["cp-a=etcd-1".to_string()], &[n("cp-x")]).unwrap();
        let health = cluster(Utc::now(), vec![member(1, "etcd-1"), member(2, "cp-b")]);
        assert_eq!(
            map.role(&n("cp-a"), true, &NONE, &health),
            Ok(EtcdRole::Member("etcd-1".into()))
        );
        assert_eq!(
            map.role(&n("cp-b"), true, &NONE, &health),
            Ok(EtcdRole::Member("cp-b".into()))
        );
        assert_eq!(
            map.role(&n("cp-x"), true, &NONE, &health),
            Ok(EtcdRole::Exempt)
        );
        assert_eq!(
            map.role(&n("w1"), false, &NONE, &health),
            Ok(EtcdRole::NotEtcd)
        );
        assert!(
            map.role(&n("cp-c"), true, &NONE, &health)
                .unwrap_err()
                .contains("no member named cp-c")
        );
        let bad = MemberMap::new(&["w1=gone".to_string()], &[]).unwrap();
        assert!(
            bad.role(&n("w1"), false, &NONE, &health)
                .unwrap_err()
                .contains("mapped to member gone")
        );
    }

    #[test]
    fn unreadable_etcd_holds_back_everyone_not_exempt() {
        let map = MemberMap::new(&[], &[n("cp-x")]).unwrap();
        let health = HealthSnapshot::unreadable(Utc::now(), "connection refused");
        assert!(map.role(&n("w1"), false, &NONE, &health).is_err());
        assert_eq!(
            map.role(&n("cp-x"), true, &NONE, &health),
            Ok(EtcdRole::Exempt)
        );
    }

    #[test]
    fn refuses_malformed_entries() {
        for bad in ["x", "=m", "n=", "N=m"] {
            assert!(MemberMap::new(&[bad.to_string()], &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_ip_reads_ip_literals_only() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        for (url, want) in [
            ("http://10.0.0.5:2380", Some(v4)),
            ("https://10.0.0.5", Some(v4)),
            ("https://10.0.0.5:2379/", Some(v4)),
            ("https://user@10.0.0.5:2379/x?y#z", Some(v4)),
            (" https://10.0.0.5:2379 ", Some(v4)),
            ("https://[fd00::5]:2379", Some(v6)),
            ("https://[FD00:0::5]", Some(v6)),
            ("https://[fd00::5]x", None),
            ("https://[fe80::1%25eth0]:2380", None),
            ("https://fd00::5:2379", None),
            ("https://cp-1.example.com:2380", None),
            ("unix://localhost:2379", None),
            ("10.0.0.5:2379", None),
            ("http://10.0.0.500:2379", None),
            ("", None),
        ] {
            assert_eq!(url_ip(url), want, "{url}");
        }
    }

    #[test]
    fn maps_by_internal_ip_in_peer_or_client_urls() {
        let map = MemberMap::new(&[], &[]).unwrap();
        let health = cluster(
            Utc::now(),
            vec![
                member(1, "etcd-a")
                    .advertising(&["https://10.0.0.1:2380"], &["https://10.0.0.1:2379"]),
                // Only the client URL names the address.
                member(2, "etcd-b")
                    .advertising(&["https://etcd-b:2380"], &["https://10.0.0.2:2379"]),
                member(3, "etcd-c").advertising(&["https://[fd00::3]:2380"], &[]),
                member(4, "etcd-d").advertising(&["https://[::ffff:10.0.0.4]:2380"], &[]),
            ],
        );
        for (node, ip, want) in [
            ("cp-1", "10.0.0.1", "etcd-a"),
            ("cp-2", "10.0.0.2", "etcd-b"),
            ("cp-3", "fd00::3", "etcd-c"),
            ("cp-4", "10.0.0.4", "etcd-d"),
        ] {
            assert_eq!(
                map.role(&n(node), true, &ips(&[ip]), &health),
                Ok(EtcdRole::Member(want.into())),
                "{node}"
            );
        }
        // Dual stack: either address may be the one etcd advertises.
        assert_eq!(
            map.role(&n("cp-3"), true, &ips(&["10.9.9.9", "fd00::3"]), &health),
            Ok(EtcdRole::Member("etcd-c".into()))
        );
        // Nothing matches: a control-plane node waits, a worker is no etcd node.
        let reason = map
            .role(&n("cp-9"), true, &ips(&["10.0.0.9"]), &health)
            .unwrap_err();
        assert!(reason.contains("no member named cp-9"), "{reason}");
        assert!(reason.contains("10.0.0.9"), "{reason}");
        assert_eq!(
            map.role(&n("w9"), false, &ips(&["10.0.0.9"]), &health),
            Ok(EtcdRole::NotEtcd)
        );
        // Without the node watch the addresses are not used (whether a
        // member named like no node holds w1 back is the guard's business:
        // see `unplaced_members`).
        assert_eq!(
            map.role(&n("w1"), false, &NONE, &health),
            Ok(EtcdRole::NotEtcd)
        );
    }

    #[test]
    fn standalone_members_are_placed_only_on_known_nodes_or_by_the_map() {
        let health = cluster(
            Utc::now(),
            vec![
                member(1, "etcd-a"),
                member(2, "n2"),
                member(3, "n3"),
                member(4, "etcd-l").learner(),
            ],
        );
        let seen = |names: &[&str]| names.iter().map(|s| n(s)).collect::<BTreeSet<_>>();
        let plain = MemberMap::new(&[], &[n("n3")]).unwrap();
        // Nobody asked yet: n3 is exempt (so known), the rest could be
        // anywhere. Learners do not vote and are never in the way.
        assert_eq!(
            plain.unplaced_members(&health, &seen(&[])),
            ["etcd-a", "n2"]
        );
        // n2 asked: its member is on it.
        assert_eq!(
            plain.unplaced_members(&health, &seen(&["n2", "w1"])),
            ["etcd-a"]
        );
        // The map places etcd-a.
        let mapped = MemberMap::new(&["w1=etcd-a".to_string()], &[n("n3")]).unwrap();
        assert!(mapped.unplaced_members(&health, &seen(&["n2"])).is_empty());
        // A node mapped away from its namesake member leaves that member
        // unplaced: n2 carries etcd-a here, so who carries n2?
        let moved = MemberMap::new(&["n2=etcd-a".to_string()], &[n("n3")]).unwrap();
        assert_eq!(moved.unplaced_members(&health, &seen(&["n2"])), ["n2"]);
        // An identity entry declares an etcd node before it ever asks.
        let declared =
            MemberMap::new(&["n2=n2".to_string(), "w1=etcd-a".to_string()], &[]).unwrap();
        assert_eq!(declared.unplaced_members(&health, &seen(&[])), ["n3"]);
    }

    #[test]
    fn override_beats_name_beats_internal_ip() {
        let health = cluster(
            Utc::now(),
            vec![
                member(1, "cp-1").advertising(&["https://10.0.0.2:2380"], &[]),
                member(2, "etcd-2").advertising(&["https://10.0.0.1:2380"], &[]),
                member(3, "etcd-3").advertising(&["https://10.0.0.3:2380"], &[]),
            ],
        );
        let plain = MemberMap::new(&[], &[]).unwrap();
        // cp-1's address is in etcd-2's URLs, but the name wins.
        assert_eq!(
            plain.role(&n("cp-1"), true, &ips(&["10.0.0.1"]), &health),
            Ok(EtcdRole::Member("cp-1".into()))
        );
        let mapped = MemberMap::new(&["cp-1=etcd-3".to_string()], &[]).unwrap();
        assert_eq!(
            mapped.role(&n("cp-1"), true, &ips(&["10.0.0.1"]), &health),
            Ok(EtcdRole::Member("etcd-3".into()))
        );
        // An override to a missing member waits even if the address matches.
        let wrong = MemberMap::new(&["cp-1=gone".to_string()], &[]).unwrap();
        assert!(
            wrong
                .role(&n("cp-1"), true, &ips(&["10.0.0.1"]), &health)
                .unwrap_err()
                .contains("mapped to member gone")
        );
    }

    #[test]
    fn an_address_in_several_members_urls_waits() {
        let map = MemberMap::new(&[], &[]).unwrap();
        let health = cluster(
            Utc::now(),
            vec![
                member(1, "etcd-a").advertising(&["https://10.0.0.1:2380"], &[]),
                member(2, "etcd-b").advertising(&[], &["https://[fd00::1]:2379"]),
            ],
        );
        for control_plane in [true, false] {
            let reason = map
                .role(
                    &n("n1"),
                    control_plane,
                    &ips(&["10.0.0.1", "fd00::1"]),
                    &health,
                )
                .unwrap_err();
            assert!(reason.contains("several members"), "{reason}");
            assert!(reason.contains("etcd-a (10.0.0.1)"), "{reason}");
            assert!(reason.contains("etcd-b (fd00::1)"), "{reason}");
            assert!(reason.contains("--etcd-member-map n1=MEMBER"), "{reason}");
        }
        // An explicit mapping settles it.
        let mapped = MemberMap::new(&["n1=etcd-b".to_string()], &[]).unwrap();
        assert_eq!(
            mapped.role(&n("n1"), false, &ips(&["10.0.0.1", "fd00::1"]), &health),
            Ok(EtcdRole::Member("etcd-b".into()))
        );
    }

    #[test]
    fn unknown_addresses_and_unstarted_members_hold_back() {
        let map = MemberMap::new(&[], &[n("w-x")]).unwrap();
        let health = cluster(
            Utc::now(),
            vec![
                member(1, "cp-1"),
                member(2, "etcd-new")
                    .advertising(&["https://10.0.0.7:2380"], &[])
                    .unstarted(),
            ],
        );
        let not_listed = InternalIps::NotListed;
        assert!(
            map.role(&n("w1"), false, &not_listed, &health)
                .unwrap_err()
                .contains("has not been read yet")
        );
        // Name matches and exemptions need no addresses.
        assert_eq!(
            map.role(&n("cp-1"), true, &not_listed, &health),
            Ok(EtcdRole::Member("cp-1".into()))
        );
        assert_eq!(
            map.role(&n("w-x"), false, &not_listed, &health),
            Ok(EtcdRole::Exempt)
        );
        // A worker joining etcd (its member added, not started) waits.
        let reason = map
            .role(&n("w7"), false, &ips(&["10.0.0.7"]), &health)
            .unwrap_err();
        assert!(reason.contains("has not started"), "{reason}");
    }

    #[test]
    fn a_worker_whose_address_matches_a_member_is_an_etcd_node() {
        let map = MemberMap::new(&[], &[]).unwrap();
        let health = cluster(
            Utc::now(),
            vec![member(1, "etcd-1").advertising(&["https://10.0.0.1:2380"], &[])],
        );
        // Not labelled control-plane, yet its address says it runs etcd-1
        // (the guard then applies the quorum rule to it).
        assert_eq!(
            map.role(&n("w1"), false, &ips(&["10.0.0.1"]), &health),
            Ok(EtcdRole::Member("etcd-1".into()))
        );
    }
}
