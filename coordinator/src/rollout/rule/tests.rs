use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::policy::{Policy, decide};

/// A fixed directory of nodes and labels.
struct Directory(BTreeMap<NodeName, Labels>);

impl NodeDirectory for Directory {
    fn labels(&self, node: &NodeName) -> Option<Labels> {
        self.0.get(node).cloned()
    }
    fn all(&self) -> Vec<(NodeName, Labels)> {
        self.0.iter().map(|(n, l)| (n.clone(), l.clone())).collect()
    }
}

/// The rule as a guard, with the canaries' phases given.
struct Rule<'a>(&'a PolicyFile, &'a Directory, Canaries);

impl<'a> Rule<'a> {
    fn new(p: &'a PolicyFile, d: &'a Directory) -> Self {
        Rule(p, d, Canaries::new())
    }
}

impl GrantGuard for Rule<'_> {
    fn check(&self, c: &Waiter, s: &LeaseState, now: DateTime<Utc>) -> Result<(), String> {
        self.check_in_queue(c, &[], s, now)
    }
    fn wants_queue(&self) -> bool {
        true
    }
    fn check_in_queue(
        &self,
        c: &Waiter,
        q: &[Waiter],
        s: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        check(self.0, self.1, &self.2, c, q, s, now)
    }
}

fn n(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(yaml: &str) -> PolicyFile {
    serde_norway::from_str(yaml).unwrap()
}

fn waiter(name: &str, cp: bool) -> Waiter {
    Waiter {
        node: n(name),
        control_plane: cp,
        backs_up_control_plane: true,
    }
}

/// Grants what the rule allows (as the engine does: decide, grant, again).
fn grant_all(
    state: &mut LeaseState,
    queue: &mut Vec<Waiter>,
    max: u32,
    p: &PolicyFile,
    d: &Directory,
    now: DateTime<Utc>,
) -> Vec<NodeName> {
    let rule = Rule::new(p, d);
    let global = Policy {
        max_concurrent: max,
        ..Policy::default()
    };
    let mut granted = Vec::new();
    while let Some(node) = decide(state, queue.iter(), &[], &global, &[&rule], now).grant {
        let i = queue.iter().position(|w| w.node == node).unwrap();
        let w = queue.remove(i);
        state.grant(&node, w.control_plane, false, "", now).unwrap();
        granted.push(node);
    }
    granted
}

const POOLS: &str = r#"
pools:
  - name: a
    selector: {matchLabels: {pool: a}}
    maxUnavailable: 1
  - name: b
    selector: {matchLabels: {pool: b}}
    maxUnavailable: "50%"
  - name: c
    selector: {nodeNames: ["c-*"]}
    maxUnavailable: 2
topology:
  maxZonesInMaintenance: 1
"#;

#[test]
fn pools_run_in_parallel_within_their_limits() {
    let p = policy(
        "pools:\n  - name: a\n    selector: {matchLabels: {pool: a}}\n  - name: b\n    selector: {matchLabels: {pool: b}}\n    maxUnavailable: \"50%\"\n",
    );
    let d = Directory(
        [
            (n("a1"), labels(&[("pool", "a")])),
            (n("a2"), labels(&[("pool", "a")])),
            (n("b1"), labels(&[("pool", "b")])),
            (n("b2"), labels(&[("pool", "b")])),
            (n("b3"), labels(&[("pool", "b")])),
            (n("b4"), labels(&[("pool", "b")])),
        ]
        .into(),
    );
    let mut state = LeaseState::default();
    let mut queue: Vec<Waiter> = ["a1", "a2", "b1", "b2", "b3"]
        .iter()
        .map(|x| waiter(x, false))
        .collect();
    let now = Utc::now();
    let granted = grant_all(&mut state, &mut queue, 10, &p, &d, now);
    assert_eq!(granted, [n("a1"), n("b1"), n("b2")]);
    let rule = Rule::new(&p, &d);
    let reason = rule
        .check_in_queue(&queue[0], &queue, &state, now)
        .unwrap_err();
    assert_eq!(reason, "pool a: 1 of 1 in maintenance (a1)");
}

#[test]
fn unknown_labels_hold_the_waiter_and_count_a_holder_everywhere() {
    let p = policy(POOLS);
    let d = Directory(
        [(
            n("a1"),
            labels(&[("pool", "a"), ("topology.kubernetes.io/zone", "z1")]),
        )]
        .into(),
    );
    let now = Utc::now();
    let mut state = LeaseState::default();
    let rule = Rule::new(&p, &d);
    assert!(
        rule.check_in_queue(&waiter("x", false), &[], &state, now)
            .unwrap_err()
            .contains("not known")
    );
    state.grant(&n("ghost"), false, false, "", now).unwrap();
    let reason = rule
        .check_in_queue(&waiter("a1", false), &[], &state, now)
        .unwrap_err();
    assert!(reason.contains("ghost (labels unknown)"), "{reason}");
}

#[test]
fn control_plane_first_then_by_label_then_fifo() {
    let p = policy("order:\n  controlPlaneFirst: true\n  byLabel: batch\n");
    let d = Directory(
        [
            (
                n("cp1"),
                labels(&[("node-role.kubernetes.io/control-plane", "")]),
            ),
            (n("w1"), labels(&[("batch", "10")])),
            (n("w2"), labels(&[("batch", "9")])),
            (n("w3"), labels(&[])),
        ]
        .into(),
    );
    let now = Utc::now();
    let mut state = LeaseState::default();
    let mut queue = vec![
        waiter("w3", false),
        waiter("w1", false),
        waiter("cp1", false),
        waiter("w2", false),
    ];
    // cp1 first (its label says control plane, though its agent did not).
    assert_eq!(
        grant_all(&mut state, &mut queue, 1, &p, &d, now),
        [n("cp1")]
    );
    let rule = Rule::new(&p, &d);
    let reason = rule
        .check_in_queue(&queue[0], &queue, &state, now)
        .unwrap_err();
    assert_eq!(reason, "control-plane nodes first: cp1 holds the baton");
    let mut order = Vec::new();
    for _ in 0..3 {
        let holder = state.holders.keys().next().unwrap().clone();
        let t = state.holders[&holder].fencing_token;
        state.release(&holder, t, "x", "", now).unwrap();
        order.extend(grant_all(&mut state, &mut queue, 1, &p, &d, now));
    }
    // 9 < 10 numerically; no label last.
    assert_eq!(order, [n("w2"), n("w1"), n("w3")]);
}

#[test]
fn pools_in_order_and_pool_windows() {
    let p = policy(
        "pools:\n  - name: canaries\n    selector: {nodeNames: [\"c-*\"]}\n    order: -1\n  - name: rest\n    selector: {nodeNames: [\"*\"]}\n    maxUnavailable: 5\n    windows: [\"Sat 00:00-23:59 UTC\"]\n",
    );
    let d = Directory([(n("c-1"), Labels::new()), (n("w-1"), Labels::new())].into());
    let now: DateTime<Utc> = "2026-11-21T12:00:00Z".parse().unwrap(); // a Saturday
    let mut state = LeaseState::default();
    let mut queue = vec![waiter("w-1", false), waiter("c-1", false)];
    assert_eq!(
        grant_all(&mut state, &mut queue, 5, &p, &d, now),
        [n("c-1")]
    );
    let rule = Rule::new(&p, &d);
    let reason = rule
        .check_in_queue(&queue[0], &queue, &state, now)
        .unwrap_err();
    assert!(
        reason.starts_with("pool rest goes after pool canaries"),
        "{reason}"
    );
    let t = state.holders[&n("c-1")].fencing_token;
    state.release(&n("c-1"), t, "x", "", now).unwrap();
    let monday: DateTime<Utc> = "2026-11-23T12:00:00Z".parse().unwrap();
    let reason = rule
        .check_in_queue(&queue[0], &queue, &state, monday)
        .unwrap_err();
    assert!(
        reason.starts_with("pool rest: outside maintenance windows"),
        "{reason}"
    );
    assert_eq!(
        grant_all(&mut state, &mut queue, 5, &p, &d, now),
        [n("w-1")]
    );
}

#[test]
fn finish_a_zone_before_the_next() {
    let p = policy("topology:\n  maxZonesInMaintenance: 2\n  finishZoneFirst: true\n");
    let z = |zone: &str| labels(&[("topology.kubernetes.io/zone", zone)]);
    let d = Directory([(n("a1"), z("a")), (n("b1"), z("b")), (n("a2"), z("a"))].into());
    let now = Utc::now();
    let mut state = LeaseState::default();
    let mut queue = vec![
        waiter("a1", false),
        waiter("b1", false),
        waiter("a2", false),
    ];
    // a1 goes; b1 waits while a2 (zone a) waits, though two zones are allowed.
    assert_eq!(grant_all(&mut state, &mut queue, 1, &p, &d, now), [n("a1")]);
    let t = state.holders[&n("a1")].fencing_token;
    state.release(&n("a1"), t, "x", "", now).unwrap();
    assert_eq!(
        grant_all(&mut state, &mut queue, 3, &p, &d, now),
        [n("a2"), n("b1")]
    );
}

/// A random cluster: nodes with a pool label, a zone, some control-plane.
fn cluster() -> impl Strategy<Value = Vec<(u8, u8, bool)>> {
    prop::collection::vec((0u8..4, 0u8..3, prop::bool::weighted(0.2)), 4..14)
}

#[derive(Clone, Debug)]
enum Step {
    Ask(usize),
    Release(usize),
    Grant(u32),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (0usize..14).prop_map(Step::Ask),
            (0usize..14).prop_map(Step::Release),
            (1u32..6).prop_map(Step::Grant),
        ],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the order of requests, grants and releases: never more
    /// than a pool's limit, never two control-plane nodes, never two zones
    /// when the limit says one.
    #[test]
    fn pool_zone_and_control_plane_limits_always_hold(nodes in cluster(), steps in steps(), cp_first in any::<bool>()) {
        let mut yaml = POOLS.to_string();
        if cp_first {
            yaml.push_str("order:\n  controlPlaneFirst: true\n");
        }
        let p = policy(&yaml);
        let names: Vec<NodeName> = nodes.iter().enumerate().map(|(i, (pool, _, _))| {
            // Pool c selects by name.
            if *pool == 2 { n(&format!("c-{i}")) } else { n(&format!("n-{i}")) }
        }).collect();
        let d = Directory(nodes.iter().zip(&names).map(|((pool, zone, cp), name)| {
            let mut l = labels(&[("topology.kubernetes.io/zone", ["z1", "z2", "z3"][*zone as usize])]);
            match pool { 0 => { l.insert("pool".into(), "a".into()); } 1 => { l.insert("pool".into(), "b".into()); } _ => {} }
            if *cp { l.insert("node-role.kubernetes.io/control-plane".into(), String::new()); }
            (name.clone(), l)
        }).collect());
        let now = Utc::now();
        let mut state = LeaseState::default();
        let mut queue: Vec<Waiter> = Vec::new();
        for step in steps {
            match step {
                Step::Ask(i) => {
                    let Some(node) = names.get(i) else { continue };
                    if !state.holders.contains_key(node) && !queue.iter().any(|w| &w.node == node) {
                        queue.push(Waiter { node: node.clone(), control_plane: false, backs_up_control_plane: true });
                    }
                }
                Step::Release(i) => {
                    if let Some(node) = state.holders.keys().nth(i % state.holders.len().max(1)).cloned() {
                        let t = state.holders[&node].fencing_token;
                        state.release(&node, t, "x", "", now).unwrap();
                    }
                }
                Step::Grant(max) => { grant_all(&mut state, &mut queue, max, &p, &d, now); }
            }
            let held: Vec<&Labels> = state.holders.keys().map(|h| &d.0[h]).collect();
            let sizes: Vec<usize> = (0..3).map(|i| d.0.iter().filter(|(n, l)| pool_of(&p, n.as_str(), l) == Some(i)).count()).collect();
            for (i, pool) in p.pools.iter().enumerate() {
                let count = state.holders.keys().filter(|h| pool_of(&p, h.as_str(), &d.0[*h]) == Some(i)).count();
                prop_assert!(count <= pool.max_unavailable.limit(sizes[i].max(1)), "pool {} has {count} holders", pool.name);
            }
            let cps = held.iter().filter(|l| l.contains_key("node-role.kubernetes.io/control-plane")).count();
            prop_assert!(cps <= 1, "{cps} control-plane nodes hold the baton");
            let zones: BTreeSet<&String> = held.iter().filter_map(|l| l.get("topology.kubernetes.io/zone")).collect();
            prop_assert!(zones.len() <= 1, "zones {zones:?} in maintenance");
        }
    }
}

mod canaries {
    use super::*;
    use crate::rollout::canary::{CanaryPhase, CanaryTracker, NO_POOL};
    use crate::rollout::test_support::snapshot as snap;

    #[test]
    fn the_first_goes_alone_then_the_rest_after_the_soak_and_a_new_rollout_starts_over() {
        let p = policy("canary:\n  soak: 10m\n");
        let d = Directory(
            [
                (n("a"), Labels::new()),
                (n("b"), Labels::new()),
                (n("c"), Labels::new()),
            ]
            .into(),
        );
        let t0 = Utc::now();
        let mut tracker = CanaryTracker::default();
        let mut state = LeaseState::default();
        let mut queue = vec![waiter("a", false), waiter("b", false), waiter("c", false)];
        let grant = |state: &mut LeaseState,
                     queue: &mut Vec<Waiter>,
                     tracker: &CanaryTracker,
                     now| {
            let rule = Rule(&p, &d, tracker.phases().clone());
            let global = Policy {
                max_concurrent: 5,
                ..Policy::default()
            };
            let mut out = Vec::new();
            while let Some(node) = decide(state, queue.iter(), &[], &global, &[&rule], now).grant {
                queue.retain(|w| w.node != node);
                state.grant(&node, false, false, "", now).unwrap();
                out.push(node);
            }
            out
        };
        tracker.observe(&snap(&state, &[], t0), &p, &d);
        // Idle: only one goes, even before the tracker saw the grant.
        assert_eq!(grant(&mut state, &mut queue, &tracker, t0), [n("a")]);
        tracker.observe(&snap(&state, &["b", "c"], t0), &p, &d);
        assert!(matches!(
            tracker.phases().phases[NO_POOL],
            CanaryPhase::Running { .. }
        ));
        let t = state.holders[&n("a")].fencing_token;
        state.release(&n("a"), t, "a", "done", t0).unwrap();
        // The tracker has not seen the release yet: still nobody.
        assert!(grant(&mut state, &mut queue, &tracker, t0).is_empty());
        tracker.observe(&snap(&state, &["b", "c"], t0), &p, &d);
        assert!(matches!(
            tracker.phases().phases[NO_POOL],
            CanaryPhase::Soaking { .. }
        ));
        assert!(
            grant(
                &mut state,
                &mut queue,
                &tracker,
                t0 + chrono::Duration::minutes(9)
            )
            .is_empty()
        );
        let later = t0 + chrono::Duration::minutes(10);
        assert_eq!(
            grant(&mut state, &mut queue, &tracker, later),
            [n("b"), n("c")]
        );
        // Everyone done: the next rollout starts with a canary again.
        for node in ["b", "c"] {
            let t = state.holders[&n(node)].fencing_token;
            state.release(&n(node), t, node, "done", later).unwrap();
        }
        tracker.observe(&snap(&state, &[], later), &p, &d);
        assert!(tracker.phases().phases.is_empty());
    }

    #[test]
    fn a_canary_that_came_and_went_between_snapshots_is_not_missed() {
        let p = policy("canary:\n  soak: 1m\n");
        let d = Directory([(n("a"), Labels::new()), (n("b"), Labels::new())].into());
        let now = Utc::now();
        let mut tracker = CanaryTracker::default();
        let mut state = LeaseState::default();
        tracker.observe(&snap(&state, &[], now), &p, &d);
        let t = state.grant(&n("a"), false, false, "", now).unwrap();
        state.release(&n("a"), t, "a", "done", now).unwrap();
        tracker.observe(&snap(&state, &["b"], now), &p, &d);
        assert!(
            matches!(
                tracker.phases().phases[NO_POOL],
                CanaryPhase::Soaking { .. }
            ),
            "{:?}",
            tracker.phases()
        );
    }

    #[test]
    fn a_force_released_canary_proves_nothing() {
        let p = policy("canary:\n  nodes: [b]\n");
        let d = Directory([(n("a"), Labels::new()), (n("b"), Labels::new())].into());
        let now = Utc::now();
        let mut tracker = CanaryTracker::default();
        let mut state = LeaseState::default();
        tracker.observe(&snap(&state, &[], now), &p, &d);
        // a waits for the listed canary b.
        let rule = Rule(&p, &d, tracker.phases().clone());
        let queue = vec![waiter("a", false), waiter("b", false)];
        assert_eq!(
            rule.check_in_queue(&queue[0], &queue, &state, now)
                .unwrap_err(),
            "canary of (no pool): b goes first"
        );
        state.grant(&n("b"), false, false, "", now).unwrap();
        tracker.observe(&snap(&state, &["a"], now), &p, &d);
        state.force_release(&n("b"), "op", "gone", now).unwrap();
        tracker.observe(&snap(&state, &["a"], now), &p, &d);
        assert_eq!(tracker.phases().phases[NO_POOL], CanaryPhase::Idle);
    }
}
