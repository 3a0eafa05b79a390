//! "Counts as back": an etcd node that held the baton stays out of service,
//! as far as the guard is concerned, until its member has the same ID as
//! before, is voting and passes the health check several rounds in a row
//! after the node released. Pure bookkeeping, advanced once per probe round;
//! which nodes are out is also kept in the lease state
//! ([`crate::state::Returning`]), so a restarted or new leader resumes them
//! (counting their rounds from zero).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::health::HealthSnapshot;
use super::rule::OutNode;
use crate::node::NodeName;

/// One etcd node that went out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Away {
    /// Its member's name.
    pub member: String,
    /// Its member's ID when it went out.
    pub member_id: u64,
    /// Healthy rounds in a row since it released.
    pub passes: u32,
    /// True while it holds the baton.
    pub holding: bool,
    /// True while it is being prepared for the baton (a snapshot, the
    /// leader moved away): not a holder yet, but going out, not back, so
    /// no pass counts (a slow snapshot must not make it "back" before its
    /// grant).
    pub preparing: bool,
    /// Rounds still to wait after a preparation that succeeded before any
    /// pass counts: its grant follows at once, unless the decision that
    /// follows grants another node (then it counts back after these).
    pub grace: u32,
}

/// How many probe rounds a node whose preparation succeeded counts no
/// pass while its grant is committed.
pub const GRACE_ROUNDS: u32 = 10;

/// The etcd nodes not verified back yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Returns {
    away: BTreeMap<NodeName, Away>,
}

impl Returns {
    /// Records that `node` (member `member`, ID `member_id`) is going out,
    /// being prepared until [`Returns::prepared`] or its grant. An
    /// existing record restarts its count.
    pub fn going_out(&mut self, node: &NodeName, member: &str, member_id: u64) {
        self.away.insert(
            node.clone(),
            Away {
                member: member.to_string(),
                member_id,
                passes: 0,
                holding: true,
                preparing: true,
                grace: 0,
            },
        );
    }

    /// Advances one probe round: holders' and prepared nodes' counts
    /// restart; others count a
    /// pass when their member has the same ID, votes and is healthy, and
    /// are dropped (back) after `needed` passes in a row. Returns the nodes
    /// that came back.
    pub fn advance(
        &mut self,
        holders: &BTreeSet<NodeName>,
        health: &HealthSnapshot,
        needed: u32,
    ) -> Vec<NodeName> {
        let mut back = Vec::new();
        for (node, away) in &mut self.away {
            if holders.contains(node) {
                away.holding = true;
                away.preparing = false;
                away.grace = 0;
                away.passes = 0;
                continue;
            }
            if away.preparing {
                away.passes = 0;
                continue;
            }
            if away.grace > 0 {
                away.grace -= 1;
                away.passes = 0;
                continue;
            }
            away.holding = false;
            let ok = health.unreadable.is_none()
                && health
                    .member(&away.member)
                    .is_some_and(|m| m.id == away.member_id && m.voting() && m.healthy());
            away.passes = if ok { away.passes + 1 } else { 0 };
            if away.passes >= needed {
                back.push(node.clone());
            }
        }
        for node in &back {
            self.away.remove(node);
        }
        back
    }

    /// The nodes still out, for the rule (`needed` is for the message).
    pub fn out(&self, health: &HealthSnapshot, needed: u32) -> Vec<OutNode> {
        self.away
            .iter()
            .map(|(node, a)| {
                let why = if a.preparing {
                    "is going out (being prepared for the baton)".to_string()
                } else if a.holding {
                    "holds the baton".to_string()
                } else {
                    match health.member(&a.member) {
                        Some(m) if m.id != a.member_id => format!(
                            "came back with member ID {:x} instead of {:x} (the member was replaced; an operator must check it)",
                            m.id, a.member_id
                        ),
                        _ => format!(
                            "is not verified back yet ({} of {needed} healthy checks in a row)",
                            a.passes
                        ),
                    }
                };
                OutNode {
                    node: node.to_string(),
                    member: a.member.clone(),
                    why,
                }
            })
            .collect()
    }

    /// Tracks `node` as out but not holding, with no pass counted: a
    /// persisted record this replica did not know (after a restart or a
    /// failover). An existing record is left alone.
    pub fn resume(&mut self, node: &NodeName, member: &str, member_id: u64) {
        self.away.entry(node.clone()).or_insert_with(|| Away {
            member: member.to_string(),
            member_id,
            passes: 0,
            holding: false,
            preparing: false,
            grace: 0,
        });
    }

    /// Ends `node`'s preparation: after a failure it counts passes from
    /// the next round; after a success (`ok`) only after
    /// [`GRACE_ROUNDS`] more, unless it holds the baton by then.
    pub fn prepared(&mut self, node: &NodeName, ok: bool) {
        if let Some(away) = self.away.get_mut(node) {
            away.preparing = false;
            away.grace = if ok { GRACE_ROUNDS } else { 0 };
        }
    }

    /// True when `node` is tracked.
    pub fn contains(&self, node: &NodeName) -> bool {
        self.away.contains_key(node)
    }
}

/// Runs `preparation` of `node` and ends the node's preparation in
/// `returns` however it ends: with its result, or as failed when its future
/// is dropped before it ended (the granter's prepare timeout drops it).
/// Otherwise a node cut off mid-preparation would stay "being prepared",
/// counting no pass, and hold every other etcd node back until a restart.
pub async fn preparing<T, E>(
    returns: &Mutex<Returns>,
    node: &NodeName,
    preparation: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    /// Ends the preparation when dropped: as failed unless `ok` was set.
    struct Ending<'a> {
        returns: &'a Mutex<Returns>,
        node: &'a NodeName,
        ok: bool,
    }
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            self.returns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .prepared(self.node, self.ok);
        }
    }
    let mut ending = Ending {
        returns,
        node,
        ok: false,
    };
    let result = preparation.await;
    ending.ok = result.is_ok();
    result
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::etcd::health::fixtures::{cluster, member};

    #[test]
    fn counts_back_only_after_passes_in_a_row_after_release() {
        let n1 = NodeName::new("n1").unwrap();
        let mut r = Returns::default();
        r.going_out(&n1, "n1", 1);
        let holders: BTreeSet<_> = [n1.clone()].into();
        let healthy = cluster(
            Utc::now(),
            vec![member(1, "n1"), member(2, "n2"), member(3, "n3")],
        );
        let down = cluster(
            Utc::now(),
            vec![
                member(1, "n1").down("refused"),
                member(2, "n2"),
                member(3, "n3"),
            ],
        );
        // Healthy while still holding does not count.
        for _ in 0..5 {
            assert!(r.advance(&holders, &healthy, 3).is_empty());
        }
        assert!(r.out(&healthy, 3)[0].why.contains("holds the baton"));
        let none = BTreeSet::new();
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert!(r.advance(&none, &down, 3).is_empty());
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert!(r.out(&healthy, 3)[0].why.contains("2 of 3"));
        assert_eq!(r.advance(&none, &healthy, 3), vec![n1.clone()]);
        assert!(!r.contains(&n1));
    }

    #[test]
    fn a_replaced_member_never_counts_back() {
        let n1 = NodeName::new("n1").unwrap();
        let mut r = Returns::default();
        r.going_out(&n1, "n1", 1);
        r.prepared(&n1, false);
        let replaced = cluster(
            Utc::now(),
            vec![member(9, "n1"), member(2, "n2"), member(3, "n3")],
        );
        for _ in 0..10 {
            assert!(r.advance(&BTreeSet::new(), &replaced, 3).is_empty());
        }
        assert!(r.out(&replaced, 3)[0].why.contains("replaced"));
    }

    /// The granter's prepare timeout drops a preparation mid-way (a
    /// snapshot that stalls): the node counts passes again, as after a
    /// failure, instead of staying "being prepared" for good.
    #[tokio::test]
    async fn a_preparation_cut_off_by_its_timeout_ends_as_failed() {
        let n1 = NodeName::new("n1").unwrap();
        let returns = Mutex::new(Returns::default());
        returns.lock().unwrap().going_out(&n1, "n1", 1);
        let stalled = preparing(&returns, &n1, std::future::pending::<Result<(), String>>());
        let cut = tokio::time::timeout(std::time::Duration::from_millis(5), stalled).await;
        assert!(cut.is_err(), "the preparation never ends by itself");
        let healthy = cluster(
            Utc::now(),
            vec![member(1, "n1"), member(2, "n2"), member(3, "n3")],
        );
        let none = BTreeSet::new();
        {
            let mut r = returns.lock().unwrap();
            assert!(r.advance(&none, &healthy, 3).is_empty());
            assert!(r.advance(&none, &healthy, 3).is_empty());
            assert_eq!(r.advance(&none, &healthy, 3), vec![n1.clone()]);
        }
        // A preparation that ends well still gets its grace.
        returns.lock().unwrap().going_out(&n1, "n1", 1);
        preparing(&returns, &n1, async { Ok::<(), String>(()) })
            .await
            .unwrap();
        let mut r = returns.lock().unwrap();
        for _ in 0..GRACE_ROUNDS + 2 {
            assert!(r.advance(&none, &healthy, 3).is_empty());
        }
        assert_eq!(r.advance(&none, &healthy, 3), vec![n1]);
    }

    #[test]
    fn a_node_being_prepared_counts_no_pass_until_its_preparation_ends() {
        // The preparation (a slow snapshot) outlasts several probe rounds:
        // the node is not a holder yet, but it is going out, not back.
        let n1 = NodeName::new("n1").unwrap();
        let mut r = Returns::default();
        r.going_out(&n1, "n1", 1);
        let healthy = cluster(
            Utc::now(),
            vec![member(1, "n1"), member(2, "n2"), member(3, "n3")],
        );
        let none = BTreeSet::new();
        for _ in 0..10 {
            assert!(r.advance(&none, &healthy, 3).is_empty());
        }
        assert!(r.contains(&n1));
        // The preparation succeeded but no grant followed (the decision
        // after it granted another node): it counts back, after a grace.
        r.prepared(&n1, true);
        for _ in 0..GRACE_ROUNDS {
            assert!(r.advance(&none, &healthy, 3).is_empty());
        }
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert_eq!(r.advance(&none, &healthy, 3), vec![n1.clone()]);
        // The preparation failed: it counts back as usual.
        r.going_out(&n1, "n1", 1);
        r.prepared(&n1, false);
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert!(r.advance(&none, &healthy, 3).is_empty());
        assert_eq!(r.advance(&none, &healthy, 3), vec![n1.clone()]);
    }
}
