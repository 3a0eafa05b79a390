//! Group commit of concurrent holder changes (renewals and reports).
//!
//! With many holders at once (`--max-concurrent 50`) every renewal and
//! report was a durable save of its own, made one after another under the
//! engine's lock, and a release waited behind all of them. Now a change
//! first joins a list of pending changes, then waits for the lock; whoever
//! gets the lock takes every change pending by then and commits them
//! together: each is applied in turn to one copy of the state, and the copy
//! is saved once. The rules of a single commit hold for each change:
//! - a caller is answered only after the save that holds its change (or,
//!   for a refusal, after the store proved the memory it was decided on:
//!   that save, or a confirmation when nothing in the group changed);
//! - a change the lease refuses (a stale token, not the holder) or that
//!   would not fit the state's budget is left out of the copy; the others
//!   go on;
//! - when the save fails (refused or an unknown outcome) nothing is
//!   applied, every caller of the group gets the error, and the memory is
//!   reloaded before the next answer (as for any failed save);
//! - the group is committed under the fence its memory is current under,
//!   like any change decided at commit time (these changes carry no
//!   decision made earlier, unlike a grant: see
//!   [`super::Engine::commit_under`]);
//! - a caller that gave up before its change was taken into a group is
//!   left out (nobody waits for that answer); once taken, its change is
//!   saved or not with the group, as a single commit would be.

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Engine, EngineError, Inner};
use crate::node::NodeName;
use crate::state::{LeaseError, LeaseState, Progress};
use crate::store::StoreError;

/// A holder's change waiting to be committed with others.
pub(super) struct Pending {
    node: NodeName,
    token: u64,
    change: HolderChange,
    now: DateTime<Utc>,
    answer: oneshot::Sender<Result<(), EngineError>>,
}

/// What a holder changes.
pub(super) enum HolderChange {
    /// A renewal.
    Renew,
    /// A progress report.
    Report(Progress),
}

impl HolderChange {
    fn apply(
        &self,
        state: &mut LeaseState,
        node: &NodeName,
        token: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LeaseError> {
        match self {
            HolderChange::Renew => state.renew(node, token, now),
            HolderChange::Report(progress) => state.report(node, token, progress.clone(), now),
        }
    }
}

/// What became of one change in a group, before the save.
enum Applied {
    /// In the copy.
    Changed,
    /// Left out: refused by the lease.
    Refused(LeaseError),
    /// Left out: the state would not fit its budget with it.
    TooLarge { size: usize, budget: usize },
}

impl Engine {
    /// Commits `change` of `node`'s holding (token `token`) together with
    /// the other holders' changes pending at the same time (see the module
    /// documentation); returns once the save that holds it is done.
    pub(super) async fn commit_holder_change(
        &self,
        node: &NodeName,
        token: u64,
        change: HolderChange,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let (answer, answered) = oneshot::channel();
        self.pending_changes().push(Pending {
            node: node.clone(),
            token,
            change,
            now,
            answer,
        });
        {
            let mut inner = self.inner.lock().await;
            // Everything pending now: this change, unless a caller that got
            // the lock first took it into its group (then it is answered).
            let group = std::mem::take(&mut *self.pending_changes());
            if !group.is_empty() {
                self.commit_group(&mut inner, group).await;
            }
        }
        match answered.await {
            Ok(result) => result,
            Err(_) => {
                // The caller that took this change into its group went away
                // during the save: its outcome is unknown, so the memory is
                // reloaded before the next answer.
                self.inner.lock().await.fence = None;
                Err(StoreError::Backend(
                    "the save holding this change was abandoned; its outcome is unknown"
                        .to_string(),
                )
                .into())
            }
        }
    }

    pub(super) fn pending_changes(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `group` to one copy of the state, saves it once and answers
    /// every caller.
    async fn commit_group(&self, inner: &mut Inner, group: Vec<Pending>) {
        // Callers that gave up are left out: nobody would hear the answer.
        let group: Vec<Pending> = group
            .into_iter()
            .filter(|p| !p.answer.is_closed())
            .collect();
        if group.is_empty() {
            return;
        }
        let fence = match self.ensure_current(inner).await {
            Ok(fence) => fence,
            Err(e) => return answer_all_with(group, &e),
        };
        let mut next = inner.state.without_audit();
        let mut applied = Vec::with_capacity(group.len());
        for p in &group {
            let before = next.clone();
            let outcome = match p.change.apply(&mut next, &p.node, p.token, p.now) {
                Err(refusal) => Applied::Refused(refusal),
                Ok(()) => match next.fit_budget() {
                    Ok(_) => Applied::Changed,
                    Err(e) => Applied::TooLarge {
                        size: e.size,
                        budget: e.budget,
                    },
                },
            };
            if !matches!(outcome, Applied::Changed) {
                // Left out whole: the copy is as if it never came.
                next = before;
            }
            applied.push(outcome);
        }
        let proven = if applied.iter().any(|a| matches!(a, Applied::Changed)) {
            self.save_copy(inner, next, &fence).await
        } else {
            // Only refusals: answered from memory the store confirms.
            self.confirm(inner, &fence).await
        };
        if let Err(e) = proven {
            return answer_all_with(group, &e);
        }
        let mut changed = false;
        for (p, outcome) in group.into_iter().zip(applied) {
            let result = match outcome {
                Applied::Changed => {
                    changed = true;
                    self.after_holder_change(inner, &p);
                    Ok(())
                }
                Applied::Refused(refusal) => Err(refusal.into()),
                Applied::TooLarge { size, budget } => {
                    warn!(node = %p.node, size, budget, "the change would not fit the state budget; not applied");
                    Err(StoreError::TooLarge { size, budget }.into())
                }
            };
            let _ = p.answer.send(result);
        }
        if changed {
            self.changed();
        }
    }

    /// What a saved renewal or report means beyond the state: the holder
    /// is no longer overdue, and the log says what happened.
    fn after_holder_change(&self, inner: &mut Inner, p: &Pending) {
        let was_overdue = inner.overdue_seen.remove(&p.node);
        match &p.change {
            HolderChange::Renew => {
                if was_overdue {
                    info!(node = %p.node, token = p.token, "holder renewed again; no longer overdue");
                }
            }
            HolderChange::Report(progress) => {
                let phase = progress.phase.name();
                if progress.error.is_empty() {
                    info!(node = %p.node, token = p.token, phase, "holder reported");
                } else {
                    warn!(node = %p.node, token = p.token, phase, error = %progress.error, "holder reported an error");
                }
            }
        }
    }
}

/// Answers every caller of `group` with `e` (each its own copy).
fn answer_all_with(group: Vec<Pending>, e: &EngineError) {
    for p in group {
        let _ = p.answer.send(Err(copy_error(e)));
    }
}

/// A copy of `e` for another caller (the errors are not `Clone`: an i/o
/// error is copied by its kind and message).
fn copy_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::Lease(l) => EngineError::Lease(l.clone()),
        EngineError::Store(s) => EngineError::Store(copy_store_error(s)),
        EngineError::Refused(r) => EngineError::Refused(r.clone()),
        EngineError::NotLeader { leader } => EngineError::NotLeader {
            leader: leader.clone(),
        },
        EngineError::ShuttingDown => EngineError::ShuttingDown,
        EngineError::Superseded(n) => EngineError::Superseded(n.clone()),
        EngineError::Moved => EngineError::Moved,
    }
}

fn copy_store_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Io { path, source } => StoreError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        StoreError::Corrupt { path, detail } => StoreError::Corrupt {
            path: path.clone(),
            detail: detail.clone(),
        },
        StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
        StoreError::NotLeader(s) => StoreError::NotLeader(s.clone()),
        StoreError::Conflict(s) => StoreError::Conflict(s.clone()),
        StoreError::Missing { location } => StoreError::Missing {
            location: location.clone(),
        },
        StoreError::AlreadyInitialized {
            location,
            last_token,
            holders,
        } => StoreError::AlreadyInitialized {
            location: location.clone(),
            last_token: *last_token,
            holders: *holders,
        },
        StoreError::TooLarge { size, budget } => StoreError::TooLarge {
            size: *size,
            budget: *budget,
        },
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
    }
}
