//! Which audit keys a save of the etcd store puts and deletes, decided over
//! plain numbers (no etcd here): [`plan`] gives the operations as
//! [`AuditOp`]s, which the store turns into its transaction's operations in
//! one place, and where live audit keys can be once the save is committed.
//!
//! Keys are named by the number of the newest record of their batch, so
//! they sort by number; an [`Edge`] is a point in that order, a [`Span`] a
//! half-open range of it.
//!
//! Why the ranges are narrow (etcd keeps a deleted key in its index until a
//! compaction, and a range delete walks every such key in its range, live
//! or not: a range from the start of the prefix grows by one key per save
//! and never shrinks while nobody compacts):
//! - what a save must leave is fixed by its own state and batch: its batch's
//!   key, and the keys named in `[first_kept, first)` (the newest
//!   [`AUDIT_KEEP`] numbers up to its `audit_seq`, below its batch), nothing
//!   else under the prefix;
//! - so it only has to delete the keys that may be live outside that: the
//!   [`Span`] where the save that wrote the state it starts from left live
//!   keys. That save's own plan computed it ([`AuditPlan::live_after`]), and
//!   it still holds when this save commits, because the transaction commits
//!   only while the state key is still at that save's revision: no save
//!   since, and only saves write audit keys.
//! - Only the replica that made that save knows its span (the store keeps it
//!   with the revision the save answered). A save from any other state
//!   assumes keys may be live anywhere ([`Span::ALL`]) and deletes from the
//!   start of the prefix to its end: the first save from another leader's
//!   state (a new term), from a `state` key restored from a backup (whose
//!   window the abandoned history deleted, and under which another
//!   history's keys can lie below the window or past it), from a format-1
//!   document, a new document (`--initialize`), or a state whose save's
//!   answer was lost.
//! - A load forgets the span: it is good only along an unbroken chain of
//!   this replica's own saves. After an etcd snapshot restore, revisions
//!   repeat, so a state key found at the remembered revision may be
//!   another history's, with keys the span does not cover (found by a
//!   red-team review; `the_first_save_after_a_load_deletes_what_the_span_does_not_cover_at_the_same_revision`).
//! - The bound cannot be taken from the save's own numbers (its batch's
//!   first number minus [`AUDIT_KEEP`]): a change that made more records
//!   than the window holds carries only the newest of them, so its batch
//!   starts past the previous window; and a restored `state` key can lie
//!   above another history's keys (the tests keep both cases).
//!
//! What each save walks is therefore bounded: in a run of saves by one
//! leader, every range lies within the previous save's span, which is at
//! most its window ([`AUDIT_KEEP`] numbers); the deletes of a save whose
//! batch is `b` records long remove the `b` numbers that fell out of the
//! window (at most the whole previous window), however long the history and
//! however long since etcd compacted. The range past the batch (a restored
//! `state` key's abandoned future, whose deleted keys stay in etcd's index
//! until a compaction) is walked by the first save from the restored state
//! only: that save leaves nothing past its batch, so the next ones have
//! nothing to delete there. A replica walks the whole prefix once for each
//! state it starts from that it did not write, as the load of that state
//! reads the prefix too. (Keys put under the prefix by hand, by no save,
//! are deleted by that first save only.)

use crate::state::AUDIT_KEEP;

/// A point in the order of the audit keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Edge {
    /// The start of the audit prefix, below every key under it.
    Start,
    /// The key of the batch whose newest record has this number.
    Key(u64),
    /// The end of the audit prefix, past every key under it.
    End,
}

impl Edge {
    /// The edge just past the key of `number`.
    fn past(number: u64) -> Edge {
        number.checked_add(1).map_or(Edge::End, Edge::Key)
    }
}

/// The audit keys from `from` up to, not including, `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// The first edge in the range.
    pub(crate) from: Edge,
    /// The first edge past the range.
    pub(crate) to: Edge,
}

impl Span {
    /// Every key under the audit prefix.
    pub(crate) const ALL: Span = Span {
        from: Edge::Start,
        to: Edge::End,
    };

    /// No key.
    const NONE: Span = Span {
        from: Edge::Start,
        to: Edge::Start,
    };

    fn new(from: Edge, to: Edge) -> Span {
        Span { from, to }
    }

    fn is_empty(self) -> bool {
        self.from >= self.to
    }

    /// The keys in both spans.
    fn within(self, other: Span) -> Span {
        Span {
            from: self.from.max(other.from),
            to: self.to.min(other.to),
        }
    }
}

/// One audit operation of a save's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuditOp {
    /// Put the save's batch as the key of its newest record, this number.
    Put(u64),
    /// Delete the keys in the span (never the put's key: etcd refuses a
    /// transaction that puts and deletes one key).
    Delete(Span),
}

/// What a save does to the audit keys, and where live keys can be after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuditPlan {
    /// The operations, in the save's transaction.
    pub(crate) ops: Vec<AuditOp>,
    /// Once the transaction is committed, no audit key outside this span is
    /// live (given that none was outside `live` before it).
    pub(crate) live_after: Span,
}

/// The audit operations of a save of a state numbered up to `audit_seq`
/// whose batch holds the records `first..=newest` (none: `None`), from a
/// state under which no audit key outside `live` is live ([`Span::ALL`]
/// when that is not known). A `new_document` (no state key yet) keeps
/// nothing but its own batch.
///
/// The save leaves its batch's key and the keys named in
/// `[first_kept, first)`, where `first_kept` is the number of the oldest of
/// the newest [`AUDIT_KEEP`] up to `audit_seq`: a batch only partly past the
/// window stays (a load keeps the newest records), and keys in
/// `[first, newest)` go (the batch's numbers are this state's now: a
/// retried save replaces its records, a restored state's numbers replace
/// the abandoned history's). Every other key in `live` is deleted, and only
/// what is in `live` is walked. A save without records writes and deletes
/// nothing (a new document: deletes every key an earlier installation left).
pub(crate) fn plan(
    audit_seq: u64,
    new_document: bool,
    batch: Option<(u64, u64)>,
    live: Span,
) -> AuditPlan {
    let Some((first, newest)) = batch else {
        return if new_document {
            AuditPlan {
                ops: Some(live)
                    .filter(|live| !live.is_empty())
                    .map(AuditOp::Delete)
                    .into_iter()
                    .collect(),
                live_after: Span::NONE,
            }
        } else {
            AuditPlan {
                ops: Vec::new(),
                live_after: live,
            }
        };
    };
    let first_kept = if new_document {
        newest
    } else {
        (audit_seq + 1).saturating_sub(AUDIT_KEEP as u64)
    };
    let keep = Span::new(Edge::Key(first_kept.min(first)), Edge::Key(first));
    let mut ops = vec![AuditOp::Put(newest)];
    ops.extend(
        [
            Span::new(Edge::past(newest), Edge::End),
            Span::new(Edge::Start, keep.from),
            Span::new(Edge::Key(first), Edge::Key(newest)),
        ]
        .into_iter()
        .map(|span| span.within(live))
        .filter(|span| !span.is_empty())
        .map(AuditOp::Delete),
    );
    let kept = keep.within(live);
    let live_after = Span::new(
        if kept.is_empty() {
            Edge::Key(newest)
        } else {
            kept.from
        },
        Edge::past(newest),
    );
    AuditPlan { ops, live_after }
}

#[cfg(test)]
mod tests;
