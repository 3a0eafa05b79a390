//! A history of what lease clients saw, and a checker of Baton's promises
//! over it (for fault-injection runs such as `tests/etcd_nemesis.rs`).
//!
//! Every call a client makes is one [`Op`]: when it was invoked, when it
//! completed, and what came back. An answer is either definite (a grant, an
//! OK, a FAILED_PRECONDITION refusal, a replica saying it does not lead) or
//! [`Outcome::Unknown`] (any other UNAVAILABLE, a timeout, a broken
//! connection): the call may or may not have taken effect.
//!
//! The checker ([`check`]) derives each client's holds from its own ops: a
//! hold starts when the client receives a grant and ends when the client
//! starts releasing (the invocation of its first release attempt), or when
//! a call tells it that it does not hold the baton. Those bounds lie inside
//! the coordinator's own (it commits a grant before the client hears of it,
//! and applies a release after the client sent it), so an overlap between
//! clients' holds is an overlap the coordinator allowed. It then checks:
//! - a token goes to one node only, and a fresh grant never repeats a token;
//! - tokens only grow: a grant received before another grant's Acquire was
//!   sent has the smaller token;
//! - at no instant do more clients hold the baton than the limit, nor more
//!   than one control-plane node;
//! - no holder is lost: a call that carries the current token of a client
//!   that holds (and nobody force-released it) is never refused, a release
//!   is refused only after an earlier attempt may have applied, and every
//!   client still holding at the end is a holder, with its token, in the
//!   final stored state.
//!
//! The checker is pure; its tests feed it small hand-made histories, one
//! per violation, so that it is known to catch each.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a client called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Acquire (the op completes with the grant).
    Acquire,
    /// Renew.
    Renew,
    /// Report.
    Report,
    /// Confirm.
    Confirm,
    /// Release.
    Release,
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acquire: granted with this token.
    Granted {
        /// The fencing token.
        token: u64,
        /// The node already held it.
        resumed: bool,
    },
    /// Any other call succeeded (a Confirm's answer is in the text).
    Ok(String),
    /// FAILED_PRECONDITION: definitely refused, nothing changed.
    Refused(String),
    /// UNAVAILABLE from a replica that says it does not lead: it did
    /// nothing (a coordinator that says so and did something anyway shows
    /// up as a later refusal that nothing explains).
    NotLeader(String),
    /// No definite answer: it may or may not have taken effect.
    Unknown(String),
}

/// One call as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client's node.
    pub node: String,
    /// True for a control-plane node.
    pub control_plane: bool,
    /// What it called.
    pub call: Call,
    /// The token it sent (0 for Acquire).
    pub token: u64,
    /// The coordinator it asked.
    pub coordinator: String,
    /// When it was invoked, since the run started.
    pub invoked: Duration,
    /// When it completed, since the run started.
    pub completed: Duration,
    /// What came back.
    pub outcome: Outcome,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>8.3}s..{:>8.3}s] {:<4} {:?}(token {}) at {} -> {:?}",
            self.invoked.as_secs_f64(),
            self.completed.as_secs_f64(),
            self.node,
            self.call,
            self.token,
            self.coordinator,
            self.outcome
        )
    }
}

/// Collects ops from many client tasks.
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records one op.
    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Every op so far, by invocation time.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ops.sort_by_key(|o| o.invoked);
        ops
    }
}

/// A broken promise, with the ops that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What was broken.
    pub what: String,
    /// The ops that show it.
    pub ops: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.what)?;
        for op in &self.ops {
            writeln!(f, "    {op}")?;
        }
        Ok(())
    }
}

/// One client's hold, as it saw it.
#[derive(Clone, Debug)]
struct Hold {
    node: String,
    control_plane: bool,
    token: u64,
    start: Duration,
    /// `None`: still holding at the end.
    end: Option<Duration>,
    grant: Op,
}

/// What the checker derived besides violations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Fresh grants seen.
    pub grants: usize,
    /// Resumed grants seen.
    pub resumed: usize,
    /// Definite releases.
    pub releases: usize,
    /// Calls without a definite answer.
    pub unknown: usize,
    /// The most holds at one instant.
    pub max_holds: usize,
    /// Clients holding at the end: node → token.
    pub holding_at_end: BTreeMap<String, u64>,
}

/// Checks `ops` (one client per node, any order) against the promises in
/// the module docs; `final_holders` is the stored state's holders (node →
/// token) after the run, with every fault healed.
pub fn check(
    ops: &[Op],
    max_concurrent: usize,
    final_holders: &BTreeMap<String, u64>,
) -> (Summary, Vec<Violation>) {
    let mut ops = ops.to_vec();
    ops.sort_by_key(|o| o.invoked);
    let mut violations = Vec::new();
    let mut summary = Summary::default();
    let holds = derive_holds(&ops, &mut summary, &mut violations);
    check_tokens(&ops, &mut violations);
    check_overlaps(&holds, max_concurrent, &mut summary, &mut violations);
    for hold in holds.iter().filter(|h| h.end.is_none()) {
        summary.holding_at_end.insert(hold.node.clone(), hold.token);
        if final_holders.get(&hold.node) != Some(&hold.token) {
            violations.push(Violation {
                what: format!(
                    "lost holder: {} still holds token {} as far as it knows, but the final state has {}",
                    hold.node,
                    hold.token,
                    final_holders
                        .get(&hold.node)
                        .map_or("no holding for it".to_string(), |t| format!("token {t}"))
                ),
                ops: vec![hold.grant.clone()],
            });
        }
    }
    (summary, violations)
}

/// Replays each node's ops into its holds; refusals of a holder's calls are
/// violations.
fn derive_holds(ops: &[Op], summary: &mut Summary, violations: &mut Vec<Violation>) -> Vec<Hold> {
    struct Client {
        hold: Option<Hold>,
        /// Set once a release attempt of the current hold may have applied.
        may_have_released: bool,
        releasing: bool,
        recent: Vec<Op>,
    }
    let mut clients: BTreeMap<&str, Client> = BTreeMap::new();
    let mut holds = Vec::new();
    for op in ops {
        let c = clients.entry(op.node.as_str()).or_insert(Client {
            hold: None,
            may_have_released: false,
            releasing: false,
            recent: Vec::new(),
        });
        c.recent.push(op.clone());
        if c.recent.len() > 6 {
            c.recent.remove(0);
        }
        if matches!(op.outcome, Outcome::Unknown(_)) {
            summary.unknown += 1;
        }
        match (&op.call, &op.outcome) {
            (Call::Acquire, Outcome::Granted { token, resumed }) => {
                if *resumed {
                    summary.resumed += 1;
                } else {
                    summary.grants += 1;
                }
                if let Some(mut old) = c.hold.take() {
                    // The client asked again while it believed it held: its
                    // hold ends at this Acquire (a well-behaved client does
                    // not do this, but the history must stay consistent).
                    old.end = Some(op.invoked);
                    holds.push(old);
                }
                c.hold = Some(Hold {
                    node: op.node.clone(),
                    control_plane: op.control_plane,
                    token: *token,
                    start: op.completed,
                    end: None,
                    grant: op.clone(),
                });
                c.may_have_released = false;
                c.releasing = false;
            }
            (Call::Renew | Call::Report | Call::Confirm, Outcome::Refused(why)) => {
                if let Some(mut hold) = c.hold.take()
                    && hold.token == op.token
                    && !c.releasing
                {
                    violations.push(Violation {
                        what: format!(
                            "lost holder: {:?} of {} with its current token {} was refused ({why}) though nobody released it",
                            op.call, op.node, op.token
                        ),
                        ops: c.recent.clone(),
                    });
                    hold.end = Some(op.invoked);
                    holds.push(hold);
                }
            }
            (Call::Release, outcome) => {
                if let Some(hold) = c.hold.as_mut()
                    && hold.token == op.token
                    && !c.releasing
                {
                    c.releasing = true;
                    hold.end = Some(op.invoked);
                }
                match outcome {
                    Outcome::Ok(_) => {
                        summary.releases += 1;
                        holds.extend(c.hold.take());
                    }
                    Outcome::Unknown(_) => c.may_have_released = true,
                    Outcome::Refused(why) => {
                        if !c.may_have_released {
                            violations.push(Violation {
                                what: format!(
                                    "lost holder: the release of {} with its current token {} was refused ({why}), and no earlier attempt can have applied",
                                    op.node, op.token
                                ),
                                ops: c.recent.clone(),
                            });
                        }
                        holds.extend(c.hold.take());
                    }
                    Outcome::Granted { .. } | Outcome::NotLeader(_) => {}
                }
            }
            _ => {}
        }
    }
    holds.extend(clients.into_values().filter_map(|c| c.hold));
    holds
}

/// A token names one node; fresh grants never repeat a token; a grant
/// received before another's Acquire was sent has the smaller token.
fn check_tokens(ops: &[Op], violations: &mut Vec<Violation>) {
    let grants: Vec<(&Op, u64, bool)> = ops
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::Granted { token, resumed } => Some((o, token, resumed)),
            _ => None,
        })
        .collect();
    let mut owner: BTreeMap<u64, &Op> = BTreeMap::new();
    let mut fresh: BTreeMap<u64, &Op> = BTreeMap::new();
    for (op, token, resumed) in &grants {
        if let Some(first) = owner.get(token)
            && first.node != op.node
        {
            violations.push(Violation {
                what: format!(
                    "token {token} was granted to two nodes, {} and {}",
                    first.node, op.node
                ),
                ops: vec![(*first).clone(), (*op).clone()],
            });
        }
        owner.entry(*token).or_insert(op);
        if !resumed {
            if let Some(first) = fresh.get(token) {
                violations.push(Violation {
                    what: format!("token {token} was granted afresh twice"),
                    ops: vec![(*first).clone(), (*op).clone()],
                });
            }
            fresh.entry(*token).or_insert(op);
        }
    }
    let fresh: Vec<&(&Op, u64, bool)> = grants.iter().filter(|g| !g.2).collect();
    for a in &fresh {
        for b in &fresh {
            if a.0.completed < b.0.invoked && a.1 >= b.1 {
                violations.push(Violation {
                    what: format!(
                        "tokens went back: {} got {} before {} asked, and {} got {}",
                        a.0.node, a.1, b.0.node, b.0.node, b.1
                    ),
                    ops: vec![a.0.clone(), b.0.clone()],
                });
            }
        }
    }
}

/// No more than `max_concurrent` holds, and one control-plane hold, at once.
fn check_overlaps(
    holds: &[Hold],
    max_concurrent: usize,
    summary: &mut Summary,
    violations: &mut Vec<Violation>,
) {
    // Sweep over hold boundaries; an end at the same instant as a start
    // comes first (the release was sent before the next grant arrived).
    let mut events: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, h) in holds.iter().enumerate() {
        if h.end.is_some_and(|end| end <= h.start) {
            continue;
        }
        events.push((h.start, true, i));
        if let Some(end) = h.end {
            events.push((end, false, i));
        }
    }
    events.sort_by_key(|(t, starts, _)| (*t, *starts));
    let mut open: Vec<usize> = Vec::new();
    let mut reported = false;
    for (_, starts, i) in events {
        if !starts {
            open.retain(|j| *j != i);
            continue;
        }
        open.push(i);
        summary.max_holds = summary.max_holds.max(open.len());
        let control_plane = open.iter().filter(|j| holds[**j].control_plane).count();
        if !reported && (open.len() > max_concurrent || control_plane > 1) {
            reported = true;
            violations.push(Violation {
                what: format!(
                    "{} nodes held the baton at once ({} control-plane), the limit is {max_concurrent} (one control-plane): {}",
                    open.len(),
                    control_plane,
                    open.iter()
                        .map(|j| format!("{} token {}", holds[*j].node, holds[*j].token))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ops: open.iter().map(|j| holds[*j].grant.clone()).collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: u64) -> Duration {
        Duration::from_millis(t)
    }

    fn op(node: &str, call: Call, token: u64, at: (u64, u64), outcome: Outcome) -> Op {
        Op {
            node: node.to_string(),
            control_plane: node.starts_with("cp"),
            call,
            token,
            coordinator: "c1".to_string(),
            invoked: ms(at.0),
            completed: ms(at.1),
            outcome,
        }
    }

    fn granted(node: &str, token: u64, at: (u64, u64)) -> Op {
        op(
            node,
            Call::Acquire,
            0,
            at,
            Outcome::Granted {
                token,
                resumed: false,
            },
        )
    }

    fn released(node: &str, token: u64, at: (u64, u64)) -> Op {
        op(node, Call::Release, token, at, Outcome::Ok(String::new()))
    }

    fn none() -> BTreeMap<String, u64> {
        BTreeMap::new()
    }

    fn whats(v: &[Violation]) -> Vec<String> {
        v.iter().map(|v| v.what.clone()).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = vec![
            granted("a", 1, (0, 10)),
            op("a", Call::Renew, 1, (20, 25), Outcome::Ok(String::new())),
            released("a", 1, (30, 35)),
            granted("b", 2, (5, 40)),
            op(
                "b",
                Call::Release,
                2,
                (50, 60),
                Outcome::Unknown("unavailable".into()),
            ),
            op(
                "b",
                Call::Release,
                2,
                (70, 75),
                Outcome::Refused("does not hold".into()),
            ),
            granted("a", 3, (40, 80)),
        ];
        let (summary, violations) = check(&ops, 1, &[("a".to_string(), 3)].into());
        assert_eq!(violations, Vec::new());
        assert_eq!(summary.grants, 3);
        assert_eq!(summary.holding_at_end, [("a".to_string(), 3)].into());
        assert_eq!(summary.max_holds, 1);
    }

    #[test]
    fn catches_a_token_given_to_two_nodes_and_a_repeated_token() {
        let ops = vec![
            granted("a", 1, (0, 10)),
            released("a", 1, (20, 25)),
            granted("b", 1, (30, 40)),
            released("b", 1, (50, 55)),
        ];
        let (_, v) = check(&ops, 1, &none());
        let w = whats(&v);
        assert!(
            w.iter()
                .any(|w| w.contains("token 1 was granted to two nodes")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("granted afresh twice")),
            "{w:?}"
        );
    }

    #[test]
    fn catches_tokens_going_back() {
        let ops = vec![
            granted("a", 5, (0, 10)),
            released("a", 5, (20, 25)),
            granted("b", 4, (30, 40)),
            released("b", 4, (50, 55)),
        ];
        let (_, v) = check(&ops, 1, &none());
        assert!(
            whats(&v).iter().any(|w| w.contains("tokens went back")),
            "{v:?}"
        );
        // Concurrent Acquires may be granted in either order.
        let ops = vec![granted("a", 5, (0, 40)), granted("b", 4, (10, 30))];
        let (_, v) = check(&ops, 2, &[("a".into(), 5), ("b".into(), 4)].into());
        assert_eq!(v, Vec::new());
    }

    #[test]
    fn catches_too_many_holds_and_two_control_plane_nodes() {
        let ops = vec![
            granted("a", 1, (0, 10)),
            granted("b", 2, (0, 20)),
            released("a", 1, (30, 35)),
            released("b", 2, (30, 35)),
        ];
        let (_, v) = check(&ops, 1, &none());
        assert!(
            whats(&v)
                .iter()
                .any(|w| w.contains("2 nodes held the baton at once")),
            "{v:?}"
        );
        assert!(check(&ops, 2, &none()).1.is_empty());
        let ops = vec![
            granted("cp1", 1, (0, 10)),
            granted("cp2", 2, (0, 20)),
            released("cp1", 1, (30, 35)),
            released("cp2", 2, (30, 35)),
        ];
        let (_, v) = check(&ops, 5, &none());
        assert!(
            whats(&v).iter().any(|w| w.contains("(2 control-plane)")),
            "{v:?}"
        );
        // A release sent before the next grant arrived is no overlap.
        let ops = vec![
            granted("a", 1, (0, 10)),
            released("a", 1, (20, 30)),
            granted("b", 2, (5, 25)),
        ];
        let (_, v) = check(&ops, 1, &[("b".into(), 2)].into());
        assert_eq!(v, Vec::new());
    }

    #[test]
    fn a_replica_that_does_not_lead_did_nothing() {
        // A follower declined, then the release was refused: nothing can
        // have released it, so the refusal came from stale memory.
        let ops = vec![
            granted("a", 1, (0, 10)),
            op(
                "a",
                Call::Release,
                1,
                (20, 25),
                Outcome::NotLeader("not the leader".into()),
            ),
            op(
                "a",
                Call::Release,
                1,
                (30, 35),
                Outcome::Refused("does not hold".into()),
            ),
        ];
        let (_, v) = check(&ops, 1, &none());
        assert!(
            whats(&v).iter().any(|w| w.contains("release of a")),
            "{v:?}"
        );
    }

    #[test]
    fn catches_lost_holders() {
        // A renew with the current token refused: the holder was dropped.
        let ops = vec![
            granted("a", 1, (0, 10)),
            op(
                "a",
                Call::Renew,
                1,
                (20, 25),
                Outcome::Refused("does not hold".into()),
            ),
        ];
        let (_, v) = check(&ops, 1, &none());
        assert!(whats(&v).iter().any(|w| w.contains("Renew of a")), "{v:?}");
        // A release refused on its first attempt (a stale replica's answer).
        let ops = vec![
            granted("a", 1, (0, 10)),
            op(
                "a",
                Call::Release,
                1,
                (20, 25),
                Outcome::Refused("does not hold".into()),
            ),
        ];
        let (_, v) = check(&ops, 1, &none());
        assert!(
            whats(&v).iter().any(|w| w.contains("release of a")),
            "{v:?}"
        );
        // Still holding at the end, but not in the final state.
        let ops = vec![granted("a", 1, (0, 10))];
        let (_, v) = check(&ops, 1, &none());
        assert!(
            whats(&v)
                .iter()
                .any(|w| w.contains("final state has no holding")),
            "{v:?}"
        );
        let (_, v) = check(&ops, 1, &[("a".into(), 2)].into());
        assert!(
            whats(&v)
                .iter()
                .any(|w| w.contains("final state has token 2")),
            "{v:?}"
        );
    }
}
