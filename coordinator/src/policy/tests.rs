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
        backs_up_control_plane: true,
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
    assert_eq!(d.judged[0].0, n("cp-2"));
    assert_eq!(d.judged[0].1.kind, ReasonKind::ControlPlaneHeld);
    assert!(
        d.judged[0]
            .1
            .text
            .contains("control-plane node cp-1 holds the baton"),
        "{:?}",
        d.judged
    );
    // w-2, behind the grant, was not judged: it shares one reason.
    assert_eq!(d.judged.len(), 1);
    assert_eq!(
        d.reason_at(2).map(|r| r.kind),
        Some(ReasonKind::AnotherGranted)
    );
    assert_eq!(d.reason_at(1), None, "the granted node has no reason");
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
        &*d.reason_at(0).unwrap().text,
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
    assert_eq!(&*d.reason_at(1).unwrap().text, "paused: kernel regression");
    assert!(
        d.judged.is_empty(),
        "a pause holds every waiter back unjudged"
    );
    state.resume("op", t0());

    policy.windows = WindowSet {
        windows: vec!["daily 22:00-04:00".parse::<MaintenanceWindow>().unwrap()],
        min_remaining: Duration::minutes(30),
    };
    let d = decide(&state, &queue, &[], &policy, &[], t0());
    assert!(
        d.reason_at(0)
            .unwrap()
            .text
            .starts_with("outside maintenance windows"),
        "{:?}",
        d
    );
    let night = t0() + Duration::hours(11);
    let d = decide(&state, &queue, &[], &policy, &[&Deny("a")], night);
    assert_eq!(d.grant, Some(n("b")));
    assert_eq!(
        d.judged,
        vec![(
            n("a"),
            Reason {
                kind: ReasonKind::Guard,
                text: "etcd: a would break quorum".into()
            }
        )]
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
                        queue.push(Waiter { node: name, control_plane, backs_up_control_plane: true });
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
                    // save, decode and validate on load, and give the
                    // loaded document its audit, kept apart.
                    state.fit_budget().unwrap();
                    let saved = state.clone();
                    let bytes = crate::store::encode(&state);
                    state = crate::store::decode("restart", &bytes).unwrap();
                    prop_assert_eq!(&state, &saved.without_audit());
                    crate::store::attach_audit(&mut state, crate::store::numbered(&saved));
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

/// The grant rule written the straightforward way (as it was before reasons
/// were shared and the queue read lazily): every waiter judged in queue
/// order, with a reason string of its own.
fn reference_decide(
    state: &LeaseState,
    queue: &[Waiter],
    unavailable: &[NodeName],
    policy: &Policy,
    guards: &[&dyn GrantGuard],
    now: DateTime<Utc>,
) -> (Option<NodeName>, Vec<Option<String>>) {
    let global = if let Some(pause) = &state.paused {
        Some(if pause.reason.is_empty() {
            "paused".to_string()
        } else {
            format!("paused: {}", pause.reason)
        })
    } else if let Err(reason) = policy.windows.check(now) {
        Some(reason)
    } else {
        let down: Vec<&NodeName> = unavailable
            .iter()
            .filter(|n| !state.holders.contains_key(*n))
            .collect();
        let in_use = state.holders.len() + down.len();
        let limit = policy.max_concurrent.max(1) as usize;
        (in_use >= limit).then(|| {
            let mut who: Vec<String> = state
                .holders
                .keys()
                .map(|n| format!("{n} holds it"))
                .collect();
            who.extend(down.iter().map(|n| format!("{n} is unavailable")));
            format!(
                "concurrency limit: {in_use} of {limit} in use ({})",
                who.join(", ")
            )
        })
    };
    let mut grant = None;
    let mut reasons = Vec::new();
    for waiter in queue {
        let verdict = match &global {
            Some(reason) => Err(reason.clone()),
            None if grant.is_some() => Err("another node is being granted the baton".to_string()),
            None => {
                let cp = state.holders.iter().find(|(_, h)| h.control_plane);
                match cp {
                    Some((other, _)) if waiter.control_plane => Err(format!(
                        "control-plane node {other} holds the baton; only one control-plane node at a time"
                    )),
                    _ => guards.iter().try_for_each(|g| g.check(waiter, state, now)),
                }
            }
        };
        match verdict {
            Ok(()) => {
                grant = Some(waiter.node.clone());
                reasons.push(None);
            }
            Err(reason) => reasons.push(Some(reason)),
        }
    }
    (grant, reasons)
}

const POOL: usize = 12;

/// Like [`Deny`], for a node chosen at run time.
struct DenyNode(NodeName);

impl GrantGuard for DenyNode {
    fn check(&self, candidate: &Waiter, _: &LeaseState, _: DateTime<Utc>) -> Result<(), String> {
        if candidate.node == self.0 {
            Err(format!("etcd: {} would break quorum", self.0))
        } else {
            Ok(())
        }
    }
}

fn pool(i: usize) -> NodeName {
    n(&format!("n{i}"))
}

/// A random grant-rule input.
#[derive(Clone, Debug)]
struct Input {
    holders: Vec<(usize, bool)>,
    queue: Vec<(usize, bool)>,
    unavailable: Vec<usize>,
    max: u32,
    paused: Option<bool>,
    window: bool,
    minutes: i64,
    denied: Vec<usize>,
}

fn input() -> impl Strategy<Value = Input> {
    (
        proptest::collection::vec((0..POOL, any::<bool>()), 0..4),
        proptest::collection::vec((0..POOL, any::<bool>()), 0..POOL),
        proptest::collection::vec(0..POOL, 0..3),
        1u32..5,
        proptest::option::of(any::<bool>()),
        any::<bool>(),
        0i64..1440,
        proptest::collection::vec(0..POOL, 0..4),
    )
        .prop_map(
            |(holders, queue, unavailable, max, paused, window, minutes, denied)| Input {
                holders,
                queue,
                unavailable,
                max,
                paused,
                window,
                minutes,
                denied,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The fast rule (shared reasons, queue read only as far as needed)
    /// grants the same node and gives every waiter the same reason as the
    /// straightforward one, on any input.
    #[test]
    fn fast_decide_agrees_with_the_reference(input in input()) {
        let now = t0() + Duration::minutes(input.minutes);
        let mut state = LeaseState::default();
        for (i, control_plane) in &input.holders {
            let _ = state.grant(&pool(*i), *control_plane, false, "", t0());
        }
        if let Some(with_reason) = input.paused {
            state.pause("op", if with_reason { "cve" } else { "" }, t0());
        }
        let mut queue: Vec<Waiter> = Vec::new();
        for (i, control_plane) in &input.queue {
            let node = pool(*i);
            if !state.holders.contains_key(&node) && !queue.iter().any(|w| w.node == node) {
                queue.push(Waiter { node, control_plane: *control_plane, backs_up_control_plane: true });
            }
        }
        let unavailable: Vec<NodeName> = input.unavailable.iter().map(|i| pool(*i)).collect();
        let mut policy = Policy { max_concurrent: input.max, ..Policy::default() };
        if input.window {
            policy.windows = WindowSet {
                windows: vec!["daily 22:00-04:00".parse::<MaintenanceWindow>().unwrap()],
                min_remaining: Duration::minutes(30),
            };
        }
        let denies: Vec<DenyNode> = input.denied.iter().map(|i| DenyNode(pool(*i))).collect();
        let guards: Vec<&dyn GrantGuard> = denies.iter().map(|g| g as &dyn GrantGuard).collect();

        let (grant, reasons) = reference_decide(&state, &queue, &unavailable, &policy, &guards, now);
        let fast = decide(&state, &queue, &unavailable, &policy, &guards, now);
        prop_assert_eq!(&fast.grant, &grant);
        for (i, expected) in reasons.iter().enumerate() {
            let got = fast.reason_at(i).map(|r| r.text.to_string());
            prop_assert_eq!(&got, expected, "waiter {} ({})", i, queue[i].node);
        }
        prop_assert!(fast.judged.len() <= queue.len());
    }
}

#[test]
fn decide_reads_no_waiter_while_all_wait_and_none_past_the_grant() {
    let mut state = LeaseState::default();
    state.grant(&n("h"), false, false, "", t0()).unwrap();
    let queue: Vec<Waiter> = (0..1000).map(|i| waiter(&format!("w{i}"), false)).collect();
    let read = std::cell::Cell::new(0);
    let counted = || queue.iter().inspect(|_| read.set(read.get() + 1));

    let d = decide(&state, counted(), &[], &Policy::default(), &[], t0());
    assert_eq!(d.grant, None);
    assert_eq!(read.get(), 0, "the limit holds every waiter back unread");
    assert_eq!(d.reason_at(999).unwrap().kind, ReasonKind::ConcurrencyLimit);

    let policy = Policy {
        max_concurrent: 2,
        ..Policy::default()
    };
    let deny = Deny("w0");
    let d = decide(&state, counted(), &[], &policy, &[&deny], t0());
    assert_eq!(d.grant, Some(n("w1")));
    assert_eq!(read.get(), 2, "read up to the grant, no further");
}
