//! The lease state: who holds the baton, with which fencing token, and the
//! audit trail. Pure data with pure transitions (the clock is passed in); the
//! engine persists it after every change and the store loads it on start.
//!
//! Guarantees kept here:
//! - fencing tokens only grow: every grant takes `last_token + 1`, and
//!   `last_token` is persisted with the grant;
//! - a call carrying a token that is not the node's current one is refused
//!   and changes nothing;
//! - nothing here drops a holder because time passed: only [`LeaseState::release`]
//!   and [`LeaseState::force_release`] remove one.
//!
//! The audit is not part of the state document: a save writes the small
//! document (holders, pause, tokens) and appends the audit records the
//! change made to the store's audit, kept apart and bounded (see
//! [`crate::store::StateStore::save`]). In memory the state carries the
//! newest records; a change works on [`LeaseState::without_audit`], so
//! neither a call nor a save copies the whole audit.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::node::NodeName;

mod budget;

pub use budget::{AUDIT_MAX_BYTES, CUT_MARK, DOCUMENT_MAX_BYTES, OverBudget, newest_within};

/// How many audit records are kept at most (oldest dropped first), in
/// memory and in every store; each record is bounded in bytes (its texts
/// are cut to their limits), and the Kubernetes store, which keeps the
/// audit in the state's ConfigMap, also keeps it within [`AUDIT_MAX_BYTES`].
pub const AUDIT_KEEP: usize = 500;

/// The longest reason an automatic audit record keeps (a failed step's
/// error is cut to this, on a character boundary).
pub const AUDIT_REASON_MAX: usize = 1024;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where a holder is in its maintenance (mirrors `baton.v1.Phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Granted; nothing reported yet.
    #[default]
    Granted,
    /// Cordon and drain, or pre-maintenance units.
    Draining,
    /// Snapshot and leadership move of the node's etcd member.
    EtcdPrepare,
    /// Applying the OS update.
    Updating,
    /// Reboot requested.
    Rebooting,
    /// Back after boot; post-checks.
    Verifying,
    /// Uncordon and post-maintenance units.
    Uncordoning,
    /// A step failed; the holder keeps the baton (fail closed).
    Failed,
    /// Held by an operator for manual work.
    Manual,
}

impl Phase {
    /// True for the phases that come after a drain ended (an update, a
    /// reboot, what follows them, a failure): not Granted, Draining or an
    /// operator's Manual hold. See [`Holding::past_drain`].
    pub fn past_drain(self) -> bool {
        !matches!(self, Phase::Granted | Phase::Draining | Phase::Manual)
    }

    /// The lowercase name shown in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Granted => "granted",
            Phase::Draining => "draining",
            Phase::EtcdPrepare => "etcd-prepare",
            Phase::Updating => "updating",
            Phase::Rebooting => "rebooting",
            Phase::Verifying => "verifying",
            Phase::Uncordoning => "uncordoning",
            Phase::Failed => "failed",
            Phase::Manual => "manual",
        }
    }
}

/// A node's hold on the baton.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// The fencing token of this grant.
    pub fencing_token: u64,
    /// True for control-plane nodes.
    pub control_plane: bool,
    /// When the baton was granted.
    pub granted_at: DateTime<Utc>,
    /// When the holder last renewed (or was granted).
    pub last_renewed: DateTime<Utc>,
    /// The last reported phase.
    pub phase: Phase,
    /// When that phase was reported.
    pub phase_since: DateTime<Utc>,
    /// The last reported boot_id.
    #[serde(default)]
    pub boot_id: String,
    /// The last reported progress message.
    #[serde(default)]
    pub message: String,
    /// The last reported error.
    #[serde(default)]
    pub error: String,
    /// Why the node asked for the baton.
    #[serde(default)]
    pub reason: String,
    /// For a control-plane etcd node: the etcd snapshot taken for this
    /// grant (its file name), which the node's control-plane backup is
    /// kept beside. Copied from [`Returning`] at the grant, so that the
    /// grant keeps asking for its backup whatever happens to that record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_snapshot: Option<String>,
    /// The control-plane backup kept for this grant (its file name), when
    /// one was: Confirm holds a grant that needs one until it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_kept: Option<String>,
    /// Set for good once a report of this grant said, or replaced, a phase
    /// past the drain (updating, rebooting, verifying, uncordoning,
    /// failed): an agent that lost its state file reports Granted and
    /// Draining again for a grant whose update ran, and only this says so
    /// then. A grant that lacks its backup pairing is released only while
    /// it is unset (`Engine::release_unpaired`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub past_drain: bool,
}

impl Holding {
    /// True when the holder has not renewed within `overdue_after`.
    pub fn is_overdue(&self, now: DateTime<Utc>, overdue_after: Duration) -> bool {
        now - self.last_renewed > overdue_after
    }
}

/// Why granting is paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The operator's reason.
    pub reason: String,
    /// Who paused.
    pub actor: String,
    /// When.
    pub since: DateTime<Utc>,
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub time: DateTime<Utc>,
    /// What: grant, release, force-release, pause, resume, overdue.
    pub action: String,
    /// The node, if any.
    #[serde(default)]
    pub node: String,
    /// The fencing token, if any (0 = none).
    #[serde(default)]
    pub fencing_token: u64,
    /// Who: an authenticated identity or "coordinator".
    pub actor: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// The longest audit action kept (the actions are short fixed words).
const ACTION_BYTES: usize = 64;

/// `text` cut to `limit` bytes on a character boundary, its control
/// characters other than newline and tab replaced.
fn clean(text: &str, limit: usize) -> String {
    crate::text::truncate(text, limit)
        .chars()
        .map(|c| {
            if c.is_control() && !matches!(c, '\n' | '\t') {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

impl AuditEntry {
    /// Cuts this record's texts to the limits a new record gets (see
    /// [`LeaseState::record`]; the node to a node name's); true when
    /// anything changed. For records read back from a store, which may have
    /// been edited or written by something else: a record must not carry
    /// megabytes into Status, Watch and webhooks.
    pub fn fit_limits(&mut self) -> bool {
        let mut changed = false;
        for (text, limit) in [
            (&mut self.action, ACTION_BYTES),
            (&mut self.node, crate::node::MAX_NODE_NAME_LEN),
            (&mut self.actor, crate::text::ACTOR_BYTES),
            (&mut self.reason, crate::text::REASON_BYTES),
        ] {
            let cleaned = clean(text, limit);
            if cleaned != *text {
                *text = cleaned;
                changed = true;
            }
        }
        changed
    }
}

/// An etcd node that went out (it was granted the baton) and does not
/// count as back yet: the etcd guard holds other etcd nodes back until its
/// member, with this ID, votes and is healthy for several probe rounds in a
/// row after the release. Kept in the state so that a restart or a failover
/// does not forget it (the new leader counts its rounds from zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Returning {
    /// The node's etcd member's name.
    pub member: String,
    /// Its member ID when it went out.
    pub member_id: u64,
    /// For a control-plane node: the etcd snapshot taken for its grant,
    /// which its agent's control-plane backup is kept beside
    /// ([`crate::etcd::backup`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_snapshot: Option<PairedSnapshot>,
}

/// The etcd snapshot a control-plane node's backup pairs with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedSnapshot {
    /// Its file name in the snapshot directory.
    pub name: String,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// The persisted lease state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseState {
    /// Set while granting is paused.
    pub paused: Option<Pause>,
    /// The last fencing token handed out (0 = none yet).
    pub last_token: u64,
    /// Current holders.
    pub holders: BTreeMap<NodeName, Holding>,
    /// etcd nodes not verified back yet (see [`Returning`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub returning: BTreeMap<NodeName, Returning>,
    /// Recent audit records, oldest first, the last numbered
    /// `audit_seq`. Not written with the document (each store keeps the
    /// audit apart, appended); read from documents written before that.
    #[serde(default, skip_serializing)]
    pub audit: VecDeque<AuditEntry>,
    /// How many audit records were ever recorded: the number of the newest.
    #[serde(default)]
    pub audit_seq: u64,
}

/// Why a lease call was refused. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The node does not hold the baton.
    #[error("node {node} does not hold the baton")]
    NotHolder {
        /// The node.
        node: NodeName,
    },
    /// The token is not the node's current one (stale or another grant's).
    #[error(
        "fencing token {presented} is not the current token of node {node} (current: {current})"
    )]
    StaleToken {
        /// The node.
        node: NodeName,
        /// What the caller sent.
        presented: u64,
        /// The current token.
        current: u64,
    },
    /// An agent asked for a node an operator holds, or has a hold queued
    /// for (`batonctl hold`): an agent's request neither takes over nor
    /// replaces an operator's.
    #[error(
        "node {node} is held, or queued to be held, by an operator (batonctl hold): the agent's request neither takes it over nor replaces it; it is asked again once the hold is released"
    )]
    OperatorHold {
        /// The node.
        node: NodeName,
    },
    /// The node's grant needs a control-plane backup and the request comes
    /// from an agent that cannot make one (an older baton-agent).
    #[error(
        "node {node}'s grant needs a control-plane backup, which this agent cannot make: upgrade baton-agent on this node"
    )]
    BackupUnsupported {
        /// The node.
        node: NodeName,
    },
    /// The node's grant should carry a control-plane backup pairing and
    /// does not (made by a release before backups, or before the node was
    /// known to carry an etcd member): it was released at its Confirm, so
    /// that no step is taken on it and the node's next grant pairs one.
    #[error(
        "node {node}'s grant (token {token}) was made without the control-plane backup its etcd member needs (by an older coordinator, or before the member was known): it was released before any step; the agent asks again, and the new grant asks for the backup"
    )]
    UnpairedGrant {
        /// The node.
        node: NodeName,
        /// The released token.
        token: u64,
    },
    /// The node already holds the baton.
    #[error("node {node} already holds the baton (token {token})")]
    AlreadyHolder {
        /// The node.
        node: NodeName,
        /// Its token.
        token: u64,
    },
}

/// What a holder reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// The node's boot_id.
    pub boot_id: String,
    /// Progress message.
    pub message: String,
    /// Error, when failed.
    pub error: String,
}

impl LeaseState {
    /// The state of a new installation (`--initialize`). Its tokens start
    /// at the current time in milliseconds since the Unix epoch rather than
    /// at 1, so that a store initialized again after its state was lost still
    /// hands out tokens above every token handed out before (a node that
    /// kept a token from the lost state can never present a current one).
    pub fn initial(now: DateTime<Utc>, actor: &str) -> Self {
        let mut state = Self {
            last_token: u64::try_from(now.timestamp_millis()).unwrap_or(0),
            ..Self::default()
        };
        state.record(
            now,
            "initialize",
            "",
            0,
            actor,
            "--initialize: a new installation",
        );
        state
    }

    /// A copy without the audit records (the same `audit_seq`): what a
    /// change is applied to, so that the records it makes are exactly the
    /// ones to append when it is saved.
    pub fn without_audit(&self) -> Self {
        Self {
            paused: self.paused.clone(),
            last_token: self.last_token,
            holders: self.holders.clone(),
            returning: self.returning.clone(),
            audit: VecDeque::new(),
            audit_seq: self.audit_seq,
        }
    }

    /// The sequence number of `self.audit[i]`.
    pub fn audit_number(&self, i: usize) -> u64 {
        self.audit_seq + 1 + i as u64 - self.audit.len() as u64
    }

    /// Takes `newer` (the state a change made from [`LeaseState::without_audit`]
    /// of this one, now saved) as the current state, keeping this state's
    /// audit records followed by the new ones, the newest [`AUDIT_KEEP`].
    pub fn advance_to(&mut self, mut newer: LeaseState) {
        let fresh = std::mem::take(&mut newer.audit);
        newer.audit = std::mem::take(&mut self.audit);
        newer.audit.extend(fresh);
        while newer.audit.len() > AUDIT_KEEP {
            newer.audit.pop_front();
        }
        *self = newer;
    }

    /// Grants the baton to `node` with a new fencing token and returns it.
    /// The caller has decided (see [`crate::policy::decide`]) that the grant
    /// is allowed.
    pub fn grant(
        &mut self,
        node: &NodeName,
        control_plane: bool,
        manual: bool,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, LeaseError> {
        if let Some(h) = self.holders.get(node) {
            return Err(LeaseError::AlreadyHolder {
                node: node.clone(),
                token: h.fencing_token,
            });
        }
        self.last_token += 1;
        let token = self.last_token;
        // The pairing moves to the grant: one left in `returning` belongs
        // to a preparation not granted yet, never to an earlier grant. It
        // exists only because the etcd guard judged the node a
        // control-plane node (by its label or its agent's claim), so it is
        // not filtered again by the agent's claim alone.
        let backup_snapshot = self
            .returning
            .get_mut(node)
            .and_then(|r| r.control_plane_snapshot.take())
            .map(|p| p.name);
        let phase = if manual {
            Phase::Manual
        } else {
            Phase::Granted
        };
        self.holders.insert(
            node.clone(),
            Holding {
                fencing_token: token,
                control_plane,
                granted_at: now,
                last_renewed: now,
                phase,
                phase_since: now,
                boot_id: String::new(),
                message: String::new(),
                error: String::new(),
                reason: reason.to_string(),
                backup_snapshot,
                backup_kept: None,
                past_drain: false,
            },
        );
        self.record(now, "grant", node.as_str(), token, "coordinator", reason);
        Ok(token)
    }

    /// The etcd snapshot `node`'s current grant pairs its control-plane
    /// backup with (None: the grant needs no backup, or `node` holds
    /// nothing).
    pub fn backup_snapshot(&self, node: &NodeName) -> Option<&str> {
        let holding = self.holders.get(node)?;
        holding.backup_snapshot.as_deref().or_else(|| {
            // A grant recorded before the holder carried the pairing.
            self.returning
                .get(node)
                .and_then(|r| r.control_plane_snapshot.as_ref())
                .map(|p| p.name.as_str())
        })
    }

    /// Why `node`'s grant may not take a destructive step yet because of
    /// its control-plane backup (None: it needs none, or it was kept).
    pub fn backup_missing(&self, node: &NodeName) -> Option<String> {
        let snapshot = self.backup_snapshot(node)?;
        if self.holders.get(node)?.backup_kept.is_some() {
            return None;
        }
        Some(format!(
            "this grant needs a control-plane backup first (kept beside the etcd snapshot {snapshot}) and none was kept yet; the agent sends it before draining (an agent that does not: upgrade the agent)"
        ))
    }

    /// The holding of `node` if `token` is its current token.
    pub fn check_token(&self, node: &NodeName, token: u64) -> Result<&Holding, LeaseError> {
        let holding = self
            .holders
            .get(node)
            .ok_or_else(|| LeaseError::NotHolder { node: node.clone() })?;
        if holding.fencing_token != token {
            return Err(LeaseError::StaleToken {
                node: node.clone(),
                presented: token,
                current: holding.fencing_token,
            });
        }
        Ok(holding)
    }

    fn holding_mut(&mut self, node: &NodeName, token: u64) -> Result<&mut Holding, LeaseError> {
        self.check_token(node, token)?;
        Ok(self.holders.get_mut(node).expect("checked above"))
    }

    /// True while nothing is known to have been done on `node` under its
    /// grant: its reports went no further than the drain's start, ever.
    pub fn untouched(&self, node: &NodeName) -> bool {
        self.holders
            .get(node)
            .is_some_and(|h| !h.past_drain && !h.phase.past_drain())
    }

    /// Records that the holder is alive.
    pub fn renew(
        &mut self,
        node: &NodeName,
        token: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LeaseError> {
        self.holding_mut(node, token)?.last_renewed = now;
        Ok(())
    }

    /// Records the holder's progress (a report also counts as a renewal).
    pub fn report(
        &mut self,
        node: &NodeName,
        token: u64,
        progress: Progress,
        now: DateTime<Utc>,
    ) -> Result<(), LeaseError> {
        let holding = self.holding_mut(node, token)?;
        let newly_failed = progress.phase == Phase::Failed && holding.phase != Phase::Failed;
        holding.past_drain |= holding.phase.past_drain() || progress.phase.past_drain();
        if holding.phase != progress.phase {
            holding.phase_since = now;
        }
        holding.phase = progress.phase;
        if !progress.boot_id.is_empty() {
            holding.boot_id = progress.boot_id;
        }
        holding.message = progress.message;
        holding.error = progress.error;
        holding.last_renewed = now;
        if newly_failed {
            // A failure is audited (and so seen by webhooks even when the
            // node is released right after).
            let why = if holding.error.is_empty() {
                holding.message.clone()
            } else {
                holding.error.clone()
            };
            let why = truncate(&why, AUDIT_REASON_MAX).to_string();
            self.record(now, "failed", node.as_str(), token, node.as_str(), &why);
        }
        Ok(())
    }

    /// Gives the baton back.
    pub fn release(
        &mut self,
        node: &NodeName,
        token: u64,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LeaseError> {
        self.check_token(node, token)?;
        self.holders.remove(node);
        self.record(now, "release", node.as_str(), token, actor, reason);
        Ok(())
    }

    /// Takes the baton from `node` only if `expected` is its current token
    /// (a late force-release must not drop a newer grant of the same node);
    /// returns that token.
    pub fn force_release_token(
        &mut self,
        node: &NodeName,
        expected: u64,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, LeaseError> {
        self.check_token(node, expected)?;
        self.force_release(node, actor, reason, now)
    }

    /// Takes the baton from `node` whatever its token; returns that token.
    pub fn force_release(
        &mut self,
        node: &NodeName,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, LeaseError> {
        let holding = self
            .holders
            .remove(node)
            .ok_or_else(|| LeaseError::NotHolder { node: node.clone() })?;
        self.record(
            now,
            "force-release",
            node.as_str(),
            holding.fencing_token,
            actor,
            reason,
        );
        Ok(holding.fencing_token)
    }

    /// Stops granting. Returns false when already paused (nothing changes).
    pub fn pause(&mut self, actor: &str, reason: &str, now: DateTime<Utc>) -> bool {
        if self.paused.is_some() {
            return false;
        }
        self.paused = Some(Pause {
            reason: reason.to_string(),
            actor: actor.to_string(),
            since: now,
        });
        self.record(now, "pause", "", 0, actor, reason);
        true
    }

    /// Grants again. Returns false when not paused.
    pub fn resume(&mut self, actor: &str, now: DateTime<Utc>) -> bool {
        if self.paused.take().is_none() {
            return false;
        }
        self.record(now, "resume", "", 0, actor, "");
        true
    }

    /// Appends an audit record, dropping the oldest past [`AUDIT_KEEP`]. The
    /// actor (from a certificate or a TokenReview) and the reason are cut to
    /// their limits here too, whoever calls.
    pub fn record(
        &mut self,
        time: DateTime<Utc>,
        action: &str,
        node: &str,
        fencing_token: u64,
        actor: &str,
        reason: &str,
    ) {
        self.audit.push_back(AuditEntry {
            time,
            action: action.to_string(),
            node: node.to_string(),
            fencing_token,
            actor: clean(actor, crate::text::ACTOR_BYTES),
            reason: clean(reason, crate::text::REASON_BYTES),
        });
        self.audit_seq += 1;
        while self.audit.len() > AUDIT_KEEP {
            self.audit.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s).unwrap()
    }

    #[test]
    fn stale_and_foreign_tokens_change_nothing() {
        let now = Utc::now();
        let mut state = LeaseState::default();
        let t1 = state.grant(&n("a"), false, false, "", now).unwrap();
        state.release(&n("a"), t1, "a", "done", now).unwrap();
        let t2 = state.grant(&n("a"), false, false, "", now).unwrap();
        let t3 = state.grant(&n("b"), false, false, "", now).unwrap();
        assert!(t1 < t2 && t2 < t3);
        let before = state.clone();
        let later = now + Duration::seconds(5);
        assert!(matches!(
            state.renew(&n("a"), t1, later),
            Err(LeaseError::StaleToken { .. })
        ));
        assert!(matches!(
            state.release(&n("a"), t3, "a", "", later),
            Err(LeaseError::StaleToken { .. })
        ));
        assert!(matches!(
            state.report(&n("c"), t3, Progress::default(), later),
            Err(LeaseError::NotHolder { .. })
        ));
        assert!(matches!(
            state.grant(&n("b"), false, false, "", later),
            Err(LeaseError::AlreadyHolder { .. })
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn a_late_force_release_does_not_drop_a_newer_grant() {
        let now = Utc::now();
        let mut state = LeaseState::default();
        let t1 = state.grant(&n("a"), false, false, "", now).unwrap();
        state.release(&n("a"), t1, "a", "done", now).unwrap();
        let t2 = state.grant(&n("a"), false, false, "", now).unwrap();
        let before = state.clone();
        // The operator looked at status while a held t1.
        assert!(matches!(
            state.force_release_token(&n("a"), t1, "op", "stuck", now),
            Err(LeaseError::StaleToken { current, .. }) if current == t2
        ));
        assert_eq!(state, before);
        assert_eq!(
            state.force_release_token(&n("a"), t2, "op", "stuck", now),
            Ok(t2)
        );
        assert!(state.holders.is_empty());
    }

    #[test]
    fn audit_is_bounded() {
        let now = Utc::now();
        let mut state = LeaseState::default();
        for _ in 0..(AUDIT_KEEP + 10) {
            state.pause("op", "x", now);
            state.resume("op", now);
        }
        assert_eq!(state.audit.len(), AUDIT_KEEP);
    }
}
