//! The state document's byte budget: whatever clients send, the encoded
//! lease state stays well under what every store takes in one object (a
//! Kubernetes ConfigMap holds at most 1 MiB; etcd takes requests up to
//! 1.5 MiB by default).
//!
//! Each text a client sends is bounded (see [`crate::text`]); what is left
//! unbounded by count alone is bounded here, in encoded bytes:
//! - the audit keeps its newest records within [`AUDIT_MAX_BYTES`] (and
//!   [`super::AUDIT_KEEP`] records);
//! - when the whole document would still exceed [`DOCUMENT_MAX_BYTES`]
//!   (many holders with long error reports), older audit records go first,
//!   then the longest holder texts are shortened (an error report keeps its
//!   end, where the failure is), each marked as cut.

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
    /// Brings the encoded state within [`DOCUMENT_MAX_BYTES`] (and the
    /// audit within [`AUDIT_MAX_BYTES`]); returns the encoded size.
    pub fn fit_budget(&mut self) -> Result<usize, OverBudget> {
        let mut size = encoded_len(self);
        if size <= AUDIT_MAX_BYTES {
            // The usual case: the audit is part of a document that fits.
            return Ok(size);
        }
        self.fit_audit(AUDIT_MAX_BYTES);
        size = encoded_len(self);
        if size <= DOCUMENT_MAX_BYTES {
            return Ok(size);
        }
        // Older audit records give way to the holders' current reports.
        let audit = encoded_len(&self.audit);
        self.fit_audit(audit.saturating_sub(size - DOCUMENT_MAX_BYTES));
        size = encoded_len(self);
        // Then the longest holder texts, all of them at once, halving until
        // the document fits (a few rounds: each halves the longest).
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

    /// Drops the oldest audit records until the encoded audit takes at most
    /// `max` bytes.
    fn fit_audit(&mut self, max: usize) {
        let mut size = encoded_len(&self.audit);
        while size > max {
            let Some(oldest) = self.audit.pop_front() else {
                return;
            };
            // A record and the comma that separated it.
            size = size.saturating_sub(encoded_len(&oldest) + 1);
        }
    }
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
        // Twenty-four holders with full error reports do not fit beside the
        // audit: the audit gave way, then the errors were cut, keeping
        // their end.
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
        assert!(encoded_len(&state.audit) <= AUDIT_MAX_BYTES);
        // The newest records are the ones kept.
        assert_eq!(state.audit.back().unwrap().node, "node-23");
        assert_eq!(state.audit.back().unwrap().action, "release");
    }
}
