//! Unit and property tests of the grant rule together with the lease state.

use std::collections::BTreeSet;

use chrono::{Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::window::MaintenanceWindow;

fn n(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

fn waiter(s: &str, control_plane: bool) -> Waiter {
    Waiter {
        node: n(s),
        control_plane,
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
}

struct Deny(&'static str);
impl GrantGuard for Deny {
    fn check(&self, candidate: &Waiter, _: &LeaseState, _: DateTime<Utc>) -> Result<(), String> {
        if candidate.node.as_str() == self.0 {
            Err(format!("etcd: {} would break quorum", self.0))
        } else {
            Ok(())
        }
    }
}

#[test]
fn first_eligible_waiter_wins() {
    let mut state = LeaseState::default();
    state.grant(&n("cp-1"), true, false, "", t0()).unwrap();
    let policy = Policy {
        max_concurrent: 2,
        ..Policy::default()
    };
    let queue = [
        waiter("cp-2", true),
        waiter("w-1", false),
        waiter("w-2", false),
    ];
    let d = decide(&state, &queue, &[], &policy, &[], t0());
    assert_eq!(d.grant, Some(n("w-1")));
    assert_eq!(d.waiting[0].0, n("cp-2"));
    assert!(
        d.waiting[0]
            .1
            .contains("control-plane node cp-1 holds the baton"),
        "{:?}",
        d.waiting
    );
}

#[test]
fn limit_counts_failed_overdue_and_unavailable_nodes() {
    let mut state = LeaseState::default();
    state.grant(&n("a"), false, false, "", t0()).unwrap();
    let policy = Policy {
        max_concurrent: 2,
        ..Policy::default()
    };
    let queue = [waiter("b", false)];
    // "a" has not renewed for a day: it still counts.
    let later = t0() + Duration::days(1);
    assert_eq!(
        decide(&state, &queue, &[], &policy, &[], later).grant,
        Some(n("b"))
    );
    let d = decide(&state, &queue, &[n("c")], &policy, &[], later);
    assert_eq!(d.grant, None);
    assert_eq!(
        d.waiting[0].1,
        "concurrency limit: 2 of 2 in use (a holds it, c is unavailable)"
    );
}

#[test]
fn pause_window_and_guards_give_their_reasons() {
    let mut state = LeaseState::default();
    let queue = [waiter("a", false), waiter("b", false)];
    let mut policy = Policy::default();
    state.pause("op", "kernel regression", t0());
    let d = decide(&state, &queue, &[], &policy, &[], t0());
    assert_eq!(d.grant, None);
    assert_eq!(d.waiting[1].1, "paused: kernel regression");
    state.resume("op", t0());

    policy.windows = WindowSet {
        windows: vec!["daily 22:00-04:00".parse::<MaintenanceWindow>().unwrap()],
        min_remaining: Duration::minutes(30),
    };
    let d = decide(&state, &queue, &[], &policy, &[], t0());
    assert!(
        d.waiting[0].1.starts_with("outside maintenance windows"),
        "{:?}",
        d
    );
    let night = t0() + Duration::hours(11);
    let d = decide(&state, &queue, &[], &policy, &[&Deny("a")], night);
    assert_eq!(d.grant, Some(n("b")));
    assert_eq!(
        d.waiting,
        vec![(n("a"), "etcd: a would break quorum".to_string())]
    );
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Op {
    Acquire {
        node: usize,
        control_plane: bool,
    },
    Withdraw {
        node: usize,
    },
    Release {
        node: usize,
    },
    Renew {
        node: usize,
    },
    /// A call with a token that is not the node's current one: one it held
    /// before, another node's, or one never handed out.
    WrongToken {
        node: usize,
        pick: usize,
        release: bool,
    },
    Advance {
        seconds: i64,
    },
    Pause,
    Resume,
    /// The coordinator restarts: the state goes through the store's save and
    /// load path; waiters are lost and ask again.
    Restart,
    ForceRelease {
        node: usize,
    },
    /// A node goes down (NotReady) without holding the baton, or comes back.
    Down {
        node: usize,
    },
    Up {
        node: usize,
    },
}

const NODES: [&str; 6] = ["cp-1", "cp-2", "cp-3", "w-1", "w-2", "w-3"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NODES.len()).prop_map(|node| Op::Acquire { node, control_plane: node < 3 }),
        1 => (0..NODES.len()).prop_map(|node| Op::Withdraw { node }),
        3 => (0..NODES.len()).prop_map(|node| Op::Release { node }),
        2 => (0..NODES.len()).prop_map(|node| Op::Renew { node }),
        3 => (0..NODES.len(), any::<usize>(), any::<bool>())
            .prop_map(|(node, pick, release)| Op::WrongToken { node, pick, release }),
        2 => (1..100_000i64).prop_map(|seconds| Op::Advance { seconds }),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
        1 => Just(Op::Restart),
        1 => (0..NODES.len()).prop_map(|node| Op::ForceRelease { node }),
        1 => (0..NODES.len()).prop_map(|node| Op::Down { node }),
        1 => (0..NODES.len()).prop_map(|node| Op::Up { node }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The safety invariants hold over any history: never more nodes out
    /// (holders and unavailable nodes) than the limit at a grant, never two
    /// control-plane holders, tokens strictly increase, no grant while
    /// paused, a holder is never dropped by time or a restart, a token that
    /// is not the node's current one changes nothing, and FIFO order is
    /// kept among eligible waiters.
    #[test]
    fn safety_invariants_hold(ops in proptest::collection::vec(op(), 1..80), max in 1u32..4, deny in proptest::option::of(0..NODES.len())) {
        let policy = Policy { max_concurrent: max, ..Policy::default() };
        let deny_guard = deny.map(|i| Deny(NODES[i]));
        let guards: Vec<&dyn GrantGuard> = deny_guard.iter().map(|g| g as &dyn GrantGuard).collect();
        let mut state = LeaseState::default();
        let mut queue: Vec<Waiter> = Vec::new();
        let mut unavailable: Vec<NodeName> = Vec::new();
        // Every token handed out, to present stale and foreign ones.
        let mut handed_out: Vec<u64> = Vec::new();
        let mut now = t0();
        let mut last_token = 0;
        let overdue_after = Duration::seconds(60);

        for op in ops {
            let holders_before: BTreeSet<NodeName> = state.holders.keys().cloned().collect();
            let snapshot = state.clone();
            match op {
                Op::Acquire { node, control_plane } => {
                    let name = n(NODES[node]);
                    if !state.holders.contains_key(&name) && !queue.iter().any(|w| w.node == name) {
                        queue.push(Waiter { node: name, control_plane });
                    }
                }
                Op::Withdraw { node } => queue.retain(|w| w.node.as_str() != NODES[node]),
                Op::WrongToken { node, pick, release } => {
                    let name = n(NODES[node]);
                    let current = state.holders.get(&name).map(|h| h.fencing_token);
                    let candidates: Vec<u64> = handed_out
                        .iter()
                        .copied()
                        .chain([last_token + 1])
                        .filter(|t| Some(*t) != current)
                        .collect();
                    let token = candidates[pick % candidates.len()];
                    let refused = if release {
                        state.release(&name, token, "x", "", now).is_err()
                    } else {
                        state.renew(&name, token, now).is_err()
                    };
                    prop_assert!(refused, "token {} of {} accepted (current {:?})", token, name, current);
                    prop_assert_eq!(&state, &snapshot, "a refused call changed the state");
                }
                Op::Release { node } => {
                    let name = n(NODES[node]);
                    if let Some(token) = state.holders.get(&name).map(|h| h.fencing_token) {
                        state.release(&name, token, NODES[node], "done", now).unwrap();
                    }
                }
                Op::Renew { node } => {
                    let name = n(NODES[node]);
                    if let Some(token) = state.holders.get(&name).map(|h| h.fencing_token) {
                        state.renew(&name, token, now).unwrap();
                        prop_assert!(!state.holders[&name].is_overdue(now, overdue_after));
                    }
                }
                Op::Advance { seconds } => {
                    now += Duration::seconds(seconds);
                }
                Op::Pause => { state.pause("op", "test", now); }
                Op::Resume => { state.resume("op", now); }
                Op::Restart => {
                    // What every store does: fit the budget and encode on
                    // save, decode and validate on load.
                    state.fit_budget().unwrap();
                    let saved = state.clone();
                    let bytes = crate::store::encode(&state);
                    state = crate::store::decode("restart", &bytes).unwrap();
                    prop_assert_eq!(&state, &saved);
                    queue.clear();
                }
                Op::ForceRelease { node } => { let _ = state.force_release(&n(NODES[node]), "op", "gone", now); }
                Op::Down { node } => {
                    let name = n(NODES[node]);
                    if !unavailable.contains(&name) {
                        unavailable.push(name);
                    }
                }
                Op::Up { node } => unavailable.retain(|u| u.as_str() != NODES[node]),
            }
            if matches!(op, Op::Advance { .. } | Op::Restart | Op::Pause | Op::Resume | Op::Acquire { .. } | Op::Withdraw { .. } | Op::Down { .. } | Op::Up { .. }) {
                let after: BTreeSet<NodeName> = state.holders.keys().cloned().collect();
                prop_assert!(holders_before.is_subset(&after), "a holder was dropped without a release");
            }

            // The engine's grant loop.
            loop {
                let decision = decide(&state, &queue, &unavailable, &policy, &guards, now);
                let Some(node) = decision.grant else { break };
                prop_assert!(state.paused.is_none(), "granted while paused");
                let down = unavailable.iter().filter(|u| !state.holders.contains_key(*u)).count();
                prop_assert!(
                    state.holders.len() + down < max as usize,
                    "granted {} with {} holders and {} nodes down, limit {}",
                    node, state.holders.len(), down, max
                );
                let pos = queue.iter().position(|w| w.node == node).unwrap();
                let w = queue.remove(pos);
                // FIFO: everyone ahead was ineligible for a reason of its own.
                for ahead in &queue[..pos] {
                    let denied = deny.is_some_and(|i| NODES[i] == ahead.node.as_str());
                    let cp_blocked = ahead.control_plane && state.holders.values().any(|h| h.control_plane);
                    prop_assert!(denied || cp_blocked, "{} was skipped for {}", ahead.node, node);
                }
                prop_assert!(deny.is_none_or(|i| NODES[i] != node.as_str()), "guard ignored");
                let token = state.grant(&node, w.control_plane, false, "", now).unwrap();
                prop_assert!(token > last_token, "token {} after {}", token, last_token);
                last_token = token;
                handed_out.push(token);
            }
            prop_assert!(state.holders.len() <= max as usize);
            prop_assert!(state.holders.values().filter(|h| h.control_plane).count() <= 1);
            prop_assert_eq!(state.last_token, last_token);
        }
    }
}
