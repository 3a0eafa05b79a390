//! The wait queue over random histories: what waiters were told stays true
//! enough (every waiter knows the kind of its reason, a position that moved
//! by a quarter is sent or held back by the rate limit, never lost), and a
//! handoff looks at a few waiters, not all.

use std::time::{Duration, Instant};

use chrono::Utc;
use proptest::prelude::*;
use tokio::sync::mpsc;

use super::*;

fn node(i: usize) -> NodeName {
    NodeName::new(format!("w{i}")).unwrap()
}

fn request(i: usize) -> AcquireRequest {
    AcquireRequest {
        node: node(i),
        control_plane: false,
        reason: String::new(),
        manual: false,
        backs_up_control_plane: true,
    }
}

fn reason(kind: ReasonKind, text: &str) -> Reason {
    Reason {
        kind,
        text: text.into(),
    }
}

/// The decision while `holder` holds the only slot.
fn limit(holder: usize) -> Decision {
    Decision {
        grant: None,
        judged: Vec::new(),
        rest: Some(reason(
            ReasonKind::ConcurrencyLimit,
            &format!("concurrency limit: 1 of 1 in use (w{holder} holds it)"),
        )),
    }
}

type Receiver = mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>;

struct Fixture {
    queue: WaitQueue,
    receivers: std::collections::HashMap<usize, Receiver>,
    next_ticket: u64,
}

impl Fixture {
    fn new() -> Self {
        Self {
            queue: WaitQueue::default(),
            receivers: Default::default(),
            next_ticket: 1,
        }
    }

    fn join(&mut self, i: usize) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue
            .push(self.next_ticket, request(i), Utc::now(), tx);
        self.next_ticket += 1;
        self.receivers.insert(i, rx);
    }

    /// Queued updates received since the last call, per waiter.
    fn drain(&mut self) -> usize {
        let mut count = 0;
        for rx in self.receivers.values_mut() {
            while let Ok(Ok(AcquireUpdate::Queued { .. })) = rx.try_recv() {
                count += 1;
            }
        }
        count
    }

    fn first(&self) -> Option<NodeName> {
        self.queue.waiters().next().map(|w| w.node.clone())
    }
}

#[test]
fn a_handoff_tells_and_looks_at_a_few_waiters_not_all() {
    let waiters = 10_000;
    let mut f = Fixture::new();
    for i in 0..waiters {
        f.join(i);
    }
    let start = Instant::now();
    let told = f.queue.tell(&limit(999_999), start);
    assert_eq!(told.sent, waiters, "everyone hears its first reason");
    f.drain();
    let handoffs = 2_000;
    let mut sent = 0;
    for h in 0..handoffs {
        let first = f.first().unwrap();
        f.queue.take(&first);
        // Handoffs every 5 ms: the rate limit lets positions through.
        let now = start + Duration::from_millis(5 * (h as u64 + 1));
        sent += f.queue.tell(&limit(h), now).sent;
    }
    let per_handoff = sent as f64 / handoffs as f64;
    // Telling every waiter whose position moved would be ~9,000 per
    // handoff; positions by quarters with a rate limit are a few dozen.
    assert!(
        per_handoff < 40.0,
        "{per_handoff} Queued updates per handoff"
    );
    assert_eq!(f.drain(), sent);
    // Once the rate limit allows, the waiter now first hears that it is.
    let later = start + Duration::from_secs(60);
    f.queue.tell(&limit(handoffs), later);
    let first = f.queue.get(&f.first().unwrap()).unwrap();
    assert_eq!(first.told.as_ref().unwrap().position, 1);
}

#[test]
fn a_new_kind_of_reason_reaches_every_waiter_at_once() {
    let mut f = Fixture::new();
    for i in 0..50 {
        f.join(i);
    }
    let now = Instant::now();
    f.queue.tell(&limit(99), now);
    f.drain();
    let paused = Decision {
        grant: None,
        judged: Vec::new(),
        rest: Some(reason(ReasonKind::Paused, "paused: kernel regression")),
    };
    // Within the rate limit: a new cause is not held back.
    assert_eq!(f.queue.tell(&paused, now).sent, 50);
    // The holder's name changing is no new cause: nobody is told at once.
    f.drain();
    f.queue.tell(&limit(98), now);
    assert_eq!(f.queue.tell(&limit(97), now).sent, 0);
}

#[test]
fn a_waiter_judged_alone_hears_every_change_of_its_reason() {
    let mut f = Fixture::new();
    for i in 0..3 {
        f.join(i);
    }
    let now = Instant::now();
    let guard = |text: &str| Decision {
        grant: None,
        judged: vec![
            (node(0), reason(ReasonKind::Guard, text)),
            (node(1), reason(ReasonKind::Guard, "fine")),
            (node(2), reason(ReasonKind::Guard, "fine")),
        ],
        rest: None,
    };
    assert_eq!(f.queue.tell(&guard("etcd: n2 is behind"), now).sent, 3);
    let told = f.queue.tell(&guard("etcd: n3 is behind"), now);
    assert_eq!(told.sent, 1);
    assert_eq!(told.new_reasons[0].0, node(0));
    // Back under the shared limit: all three hear it (they were judged).
    assert_eq!(f.queue.tell(&limit(9), now).sent, 3);
}

#[test]
fn gone_streams_leave_the_queue_when_told() {
    let mut f = Fixture::new();
    for i in 0..3 {
        f.join(i);
    }
    drop(f.receivers.remove(&1));
    f.queue.tell(&limit(9), Instant::now());
    assert_eq!(f.queue.len(), 2);
    assert!(f.queue.get(&node(1)).is_none());
}

#[derive(Clone, Debug)]
enum Op {
    Join(usize),
    GrantFirst,
    Withdraw(usize),
    Tell {
        kind: u8,
        holder: usize,
        millis: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..40usize).prop_map(Op::Join),
        3 => Just(Op::GrantFirst),
        1 => (0..40usize).prop_map(Op::Withdraw),
        4 => (0..3u8, 0..3usize, 0..1500u64).prop_map(|(kind, holder, millis)| Op::Tell { kind, holder, millis }),
    ]
}

proptest! {
    /// After every round of telling: each waiter has heard a reason of the
    /// kind it has now; its position as told is never below the truth
    /// (positions only fall); and when the truth has fallen by its gap,
    /// an update is on its way (sent or held back until the rate limit
    /// allows it). Queue positions always match FIFO order.
    #[test]
    fn what_waiters_were_told_stays_true(ops in proptest::collection::vec(op(), 1..120)) {
        let mut f = Fixture::new();
        let mut now = Instant::now();
        for op in ops {
            match op {
                Op::Join(i) => f.join(i),
                Op::GrantFirst => {
                    if let Some(first) = f.first() {
                        f.queue.take(&first);
                    }
                }
                Op::Withdraw(i) => {
                    if let Some(t) = f.queue.get(&node(i)).map(|q| q.ticket) {
                        prop_assert!(f.queue.withdraw(&node(i), t));
                        prop_assert!(!f.queue.withdraw(&node(i), t));
                    }
                }
                Op::Tell { kind, holder, millis } => {
                    now += Duration::from_millis(millis);
                    let rest = match kind {
                        0 => reason(ReasonKind::ConcurrencyLimit, &format!("limit (w{holder} holds it)")),
                        1 => reason(ReasonKind::Paused, "paused"),
                        _ => reason(ReasonKind::OutsideWindows, "outside maintenance windows"),
                    };
                    let decision = Decision { grant: None, judged: Vec::new(), rest: Some(rest.clone()) };
                    f.queue.tell(&decision, now);
                    let waiters: Vec<NodeName> = f.queue.waiters().map(|w| w.node.clone()).collect();
                    for (i, name) in waiters.iter().enumerate() {
                        let q = f.queue.get(name).unwrap();
                        let position = i as u32 + 1;
                        prop_assert_eq!(f.queue.ranks.rank(q.slot) as u32, position);
                        let told = q.told.as_ref().expect("every waiter was told");
                        prop_assert_eq!(told.reason.kind, rest.kind);
                        prop_assert!(told.position >= position, "told {} < {}", told.position, position);
                        if position + gap(told.position) as u32 <= told.position {
                            prop_assert!(
                                q.deferred_until.is_some_and(|t| t > now),
                                "{} moved from {} to {} and nothing is on its way", name, told.position, position
                            );
                        }
                    }
                }
            }
        }
    }
}
