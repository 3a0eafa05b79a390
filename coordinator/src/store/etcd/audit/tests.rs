use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

const KEEP: u64 = AUDIT_KEEP as u64;

/// How many record numbers the deletes of `plan` span; `None` when one
/// reaches the start or the end of the prefix.
fn deleted_numbers(plan: &AuditPlan) -> Option<u64> {
    plan.ops.iter().try_fold(0, |sum, op| match op {
        AuditOp::Put(_) => Some(sum),
        AuditOp::Delete(Span {
            from: Edge::Key(from),
            to: Edge::Key(to),
        }) => Some(sum + (to - from)),
        AuditOp::Delete(_) => None,
    })
}

/// The batch a change of `records` records from `audit_seq` carries: the
/// state keeps only the newest AUDIT_KEEP of them.
fn carried(audit_seq: u64, records: u64) -> (u64, u64) {
    let newest = audit_seq + records;
    (
        (audit_seq + 1).max((newest + 1).saturating_sub(KEEP)),
        newest,
    )
}

/// A run of saves by one leader: the first after its load, then saves of
/// `sizes` records each, each from the span the one before left.
fn run(audit_seq: u64, sizes: &[u64]) -> Vec<AuditPlan> {
    let mut live = Span::ALL;
    let mut seq = audit_seq;
    let mut plans = Vec::new();
    for &size in sizes {
        let batch = (size > 0).then(|| carried(seq, size));
        seq += size;
        let plan = plan(seq, false, batch, live);
        live = plan.live_after;
        plans.push(plan);
    }
    plans
}

/// The fix: an ordinary save (one record, or a few, after a long history)
/// deletes the numbers that fell out of the window and walks nothing else,
/// not a range from the start of the prefix that grows with every save
/// until etcd compacts. Before the fix, every save deleted from the start
/// of the prefix.
#[test]
fn an_ordinary_save_deletes_a_bounded_range_however_long_the_history() {
    for audit_seq in [1_000, 1_000_000, u64::MAX / 2] {
        let plans = run(audit_seq, &[1, 1, 3, 1, 2]);
        let [_, second, third, ..] = plans.as_slice() else {
            unreachable!("five saves")
        };
        // The second save: record s + 2; the window loses the number that
        // fell out of it, nothing past the batch is walked.
        let newest = audit_seq + 2;
        assert_eq!(
            second.ops,
            [
                AuditOp::Put(newest),
                AuditOp::Delete(Span::new(
                    Edge::Key(newest - KEEP),
                    Edge::Key(newest + 1 - KEEP)
                )),
            ],
            "audit_seq {audit_seq}"
        );
        assert_eq!(
            third.ops,
            [
                AuditOp::Put(newest + 3),
                AuditOp::Delete(Span::new(
                    Edge::Key(newest + 1 - KEEP),
                    Edge::Key(newest + 4 - KEEP)
                )),
            ],
            "audit_seq {audit_seq}"
        );
        for (i, plan) in plans.iter().enumerate().skip(1) {
            let spanned = deleted_numbers(plan);
            assert!(
                spanned.is_some_and(|n| n <= 3),
                "save {i} after audit_seq {audit_seq}: {:?}",
                plan.ops
            );
        }
    }
}

/// A change that made more records than the window holds carries only the
/// newest AUDIT_KEEP of them (so its batch starts past the previous save's
/// newest plus one: a range from there minus AUDIT_KEEP would miss the
/// previous window), and replaces the whole previous window: the range is
/// the previous span, still not the prefix.
#[test]
fn a_batch_longer_than_the_window_deletes_the_previous_window_only() {
    let plans = run(1_000_000, &[1, 2 * KEEP]);
    let newest = 1_000_001 + 2 * KEEP;
    assert_eq!(
        plans[1].ops,
        [
            AuditOp::Put(newest),
            AuditOp::Delete(Span::new(Edge::Key(1_000_002 - KEEP), Edge::Key(1_000_002))),
        ]
    );
    assert_eq!(
        plans[1].live_after,
        Span::new(Edge::Key(newest), Edge::Key(newest + 1))
    );
}

/// A save from a state this replica did not write (after a load) cannot
/// know where keys are: it deletes from the start of the prefix to its end.
#[test]
fn a_save_after_a_load_deletes_from_the_start_to_the_end_of_the_prefix() {
    let after_load = plan(1_000_000, false, Some((1_000_000, 1_000_000)), Span::ALL);
    assert_eq!(
        after_load.ops,
        [
            AuditOp::Put(1_000_000),
            AuditOp::Delete(Span::new(Edge::Key(1_000_001), Edge::End)),
            AuditOp::Delete(Span::new(Edge::Start, Edge::Key(1_000_001 - KEEP))),
        ]
    );
    let new_document = plan_new(7);
    assert_eq!(
        new_document.ops,
        [
            AuditOp::Put(7),
            AuditOp::Delete(Span::new(Edge::Key(8), Edge::End)),
            AuditOp::Delete(Span::new(Edge::Start, Edge::Key(1))),
            AuditOp::Delete(Span::new(Edge::Key(1), Edge::Key(7))),
        ]
    );
    let empty = plan(0, true, None, Span::ALL);
    assert_eq!(empty.ops, [AuditOp::Delete(Span::ALL)]);
}

fn plan_new(records: u64) -> AuditPlan {
    plan(records, true, Some((1, records)), Span::ALL)
}

/// A key under the audit prefix, in key order: one sorting before every
/// numbered key (`<prefix>/audit/` itself), numbered keys, and one sorting
/// after them (a name that is not a number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Below,
    Number(u64),
    Above,
}

impl Key {
    fn in_span(self, span: Span) -> bool {
        let at_or_past_from = match (self, span.from) {
            (_, Edge::Start) => true,
            (Key::Below, _) => false,
            (Key::Number(n), Edge::Key(from)) => n >= from,
            (Key::Above, Edge::Key(_)) => true,
            (_, Edge::End) => false,
        };
        let before_to = match (self, span.to) {
            (_, Edge::Start) => false,
            (Key::Below, _) => true,
            (Key::Number(n), Edge::Key(to)) => n < to,
            (Key::Number(_), Edge::End) => true,
            (Key::Above, Edge::Key(_)) => false,
            (Key::Above, Edge::End) => true,
        };
        at_or_past_from && before_to
    }
}

/// The live keys after `plan`'s operations, applied as etcd would.
fn apply(keys: &BTreeSet<Key>, plan: &AuditPlan) -> BTreeSet<Key> {
    let mut after = keys.clone();
    for op in &plan.ops {
        match op {
            AuditOp::Put(n) => {
                assert!(
                    !plan.ops.iter().any(|op| matches!(
                        op, AuditOp::Delete(span) if Key::Number(*n).in_span(*span)
                    )),
                    "etcd refuses a put and a delete of one key: {:?}",
                    plan.ops
                );
                after.insert(Key::Number(*n));
            }
            AuditOp::Delete(span) => after.retain(|k| !k.in_span(*span)),
        }
    }
    after
}

/// What happens to the history, step by step.
#[derive(Clone, Debug)]
enum Step {
    /// A save of this many records by the leader.
    Save(u64),
    /// The leader loads again (a new term, a reload after a failed save).
    Load,
    /// The `state` key is put back with this `audit_seq` (behind or ahead of
    /// the keys), and loaded.
    Restore(u64),
    /// `--initialize`: a new document, saved with this many records.
    Initialize(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop_oneof![6 => 0..4u64, 1 => 4..700u64].prop_map(Step::Save),
        1 => Just(Step::Load),
        1 => (0..4_000u64).prop_map(Step::Restore),
        1 => (0..3u64).prop_map(Step::Initialize),
    ]
}

proptest! {
    /// The narrow ranges leave exactly the keys the whole-prefix deletes
    /// leave, in any history: runs of saves of any size (longer than the
    /// window too), reloads, `state` keys restored behind or ahead of the
    /// keys, `--initialize` over an earlier installation's keys (and keys
    /// that are not numbers). No live key ever lies outside the span a plan
    /// says, and after every save with records none lies outside its
    /// window and batch.
    #[test]
    fn narrow_ranges_leave_what_deleting_the_whole_prefix_leaves(
        old in proptest::collection::btree_set(0..3_000u64, 0..40),
        junk in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let mut keys: BTreeSet<Key> = old.into_iter().map(Key::Number).collect();
        if junk {
            keys.extend([Key::Below, Key::Above]);
        }
        let mut audit_seq = 0u64;
        // The span the leader's last save left; None after a load.
        let mut written: Option<Span> = None;
        for step in steps {
            let (records, new_document) = match step {
                Step::Load => {
                    written = None;
                    continue;
                }
                Step::Restore(seq) => {
                    audit_seq = seq;
                    written = None;
                    continue;
                }
                Step::Save(records) => (records, false),
                Step::Initialize(records) => {
                    audit_seq = 0;
                    written = None;
                    (records, true)
                }
            };
            let batch = (records > 0).then(|| carried(audit_seq, records));
            audit_seq += records;
            let live = written.unwrap_or(Span::ALL);
            prop_assert!(keys.iter().all(|k| k.in_span(live)), "{keys:?} outside {live:?}");
            let narrow = plan(audit_seq, new_document, batch, live);
            let whole = plan(audit_seq, new_document, batch, Span::ALL);
            let after = apply(&keys, &narrow);
            prop_assert_eq!(&after, &apply(&keys, &whole), "{:?} from {:?}", narrow.ops, live);
            prop_assert!(after.iter().all(|k| k.in_span(narrow.live_after)));
            if let Some((first, newest)) = batch {
                let first_kept = if new_document {
                    newest
                } else {
                    (audit_seq + 1).saturating_sub(KEEP)
                };
                prop_assert!(
                    after.iter().all(|k| matches!(
                        k, Key::Number(n) if (first_kept.min(first)..first).contains(n) || *n == newest
                    )),
                    "{after:?} after a save of {first}..={newest}"
                );
            }
            keys = after;
            written = Some(narrow.live_after);
        }
    }
}
