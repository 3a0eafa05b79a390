//! The state document's byte budget: whatever clients send, the encoded
//! lease state stays well under what every store takes in one object (a
//! Kubernetes ConfigMap holds at most 1 MiB; etcd takes requests up to
//! 1.5 MiB by default).
//!
//! Each text a client sends is bounded (see [`crate::text`]); what is left
//! unbounded by count alone is bounded here, in encoded bytes:
//! - the document (the audit is kept apart, see [`super`]): when it would
//!   exceed [`DOCUMENT_MAX_BYTES`] (many holders with long error reports),
//!   the longest holder texts are shortened (an error report keeps its end,
//!   where the failure is), each marked as cut;
//! - the audit, where a store keeps it beside the document in one object
//!   (the Kubernetes ConfigMap), within [`AUDIT_MAX_BYTES`]
//!   ([`newest_within`]).

use super::{Holding, LeaseState};

/// The most bytes the encoded audit may take.
pub const AUDIT_MAX_BYTES: usize = 128 * 1024;
/// The most bytes the encoded state document may take (the store adds a
/// few bytes of envelope).
pub const DOCUMENT_MAX_BYTES: usize = 768 * 1024;
/// What a shortened text starts (error) or ends (reason, message) with.
pub const CUT_MARK: &str = "[cut to fit the state budget]";

/// Why a state could not be brought within budget (nothing a client can
/// send causes it: texts are bounded; only a huge number of holders could).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lease state would be {size} bytes encoded, over its budget of {budget} bytes")]
pub struct OverBudget {
    /// The encoded size after every reduction.
    pub size: usize,
    /// The budget.
    pub budget: usize,
}

fn encoded_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

/// Which text of a holder to shorten.
#[derive(Clone, Copy)]
enum Field {
    Error,
    Message,
    Reason,
}

fn text(holding: &mut Holding, field: Field) -> &mut String {
    match field {
        Field::Error => &mut holding.error,
        Field::Message => &mut holding.message,
        Field::Reason => &mut holding.reason,
    }
}

/// `value` cut to about half, on character boundaries, marked.
fn halve(value: &str, keep_end: bool) -> String {
    let keep = value.len() / 2;
    if keep_end {
        let mut start = value.len() - keep;
        while !value.is_char_boundary(start) {
            start += 1;
        }
        format!("{CUT_MARK} {}", &value[start..])
    } else {
        format!("{} {CUT_MARK}", crate::text::truncate(value, keep))
    }
}

impl LeaseState {
    /// Brings the encoded document (the audit is not part of it) within
    /// [`DOCUMENT_MAX_BYTES`]; returns its encoded size.
    pub fn fit_budget(&mut self) -> Result<usize, OverBudget> {
        let mut size = encoded_len(self);
        // The longest holder texts, all of them at once, halving until the
        // document fits (a few rounds: each halves the longest).
        while size > DOCUMENT_MAX_BYTES {
            let fields = [Field::Error, Field::Message, Field::Reason];
            let longest = self
                .holders
                .values_mut()
                .flat_map(|h| fields.map(|f| text(h, f).len()))
                .max()
                .unwrap_or(0);
            if longest <= 2 * CUT_MARK.len() {
                return Err(OverBudget {
                    size,
                    budget: DOCUMENT_MAX_BYTES,
                });
            }
            for holding in self.holders.values_mut() {
                for field in fields {
                    let value = text(holding, field);
                    if value.len() > longest / 2 {
                        *value = halve(value, matches!(field, Field::Error));
                    }
                }
            }
            size = encoded_len(self);
        }
        Ok(size)
    }
}

/// How many of the newest `records` (oldest first) fit in `max` encoded
/// bytes as a JSON array.
pub fn newest_within<T: serde::Serialize>(records: &[T], max: usize) -> usize {
    let mut size = 2;
    let mut count = 0;
    for record in records.iter().rev() {
        // A record and the comma that separates it.
        size += encoded_len(record) + 1;
        if size > max {
            break;
        }
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::node::NodeName;
    use crate::state::Progress;

    #[test]
    fn worst_case_texts_stay_within_budget() {
        let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        let mut state = LeaseState::default();
        // JSON's worst allowed character: '"' and '\\' take 2 bytes each.
        let reason = "\"".repeat(crate::text::REASON_BYTES);
        for i in 0..24 {
            let node = NodeName::new(format!("node-{i}")).unwrap();
            let token = state.grant(&node, false, false, &reason, now).unwrap();
            state
                .report(
                    &node,
                    token,
                    Progress {
                        error: "\\".repeat(crate::text::ERROR_BYTES),
                        message: reason.clone(),
                        ..Progress::default()
                    },
                    now,
                )
                .unwrap();
            let size = state.fit_budget().unwrap();
            assert!(size <= DOCUMENT_MAX_BYTES, "{size}");
            assert_eq!(size, serde_json::to_vec(&state).unwrap().len());
        }
        // Twenty-four holders with full error reports do not fit: the
        // errors were cut, keeping their end.
        let cut = state
            .holders
            .values()
            .find(|h| h.error.starts_with(CUT_MARK));
        assert!(cut.unwrap().error.ends_with('\\'));
        for i in 0..24 {
            let node = NodeName::new(format!("node-{i}")).unwrap();
            let token = state.holders[&node].fencing_token;
            state.release(&node, token, "op", &reason, now).unwrap();
            assert!(state.fit_budget().unwrap() <= DOCUMENT_MAX_BYTES);
        }
        // The audit is not part of the document.
        assert!(!state.audit.is_empty());
        assert!(
            !String::from_utf8(serde_json::to_vec(&state).unwrap())
                .unwrap()
                .contains("\"audit\":")
        );
        // The newest records that fit the audit's own budget are kept.
        for _ in 0..100 {
            state.pause("op", &reason, now);
            state.resume("op", now);
        }
        let records: Vec<_> = state.audit.iter().cloned().collect();
        let kept = newest_within(&records, AUDIT_MAX_BYTES);
        assert!(kept > 0 && kept < records.len());
        assert!(encoded_len(&records[records.len() - kept..]) <= AUDIT_MAX_BYTES);
        assert!(encoded_len(&records[records.len() - kept - 1..]) > AUDIT_MAX_BYTES);
    }
}
