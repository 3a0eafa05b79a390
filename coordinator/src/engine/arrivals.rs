//! Acquires that arrive together share one store confirmation.
//!
//! An Acquire is answered from memory (queued, or a resumed grant), so the
//! store must first confirm that memory is the latest state and that this
//! replica still leads. When a whole fleet asks at once, one confirmation
//! per Acquire, one after another under the engine's lock, costs a store
//! round trip per node before anybody is answered (and halves what an etcd
//! store can grant). Instead, each Acquire is put on the arrivals list and
//! whoever holds the engine's lock next takes the whole list (up to
//! [`BATCH_MAX`]), confirms once, and answers every Acquire it took, all in
//! that one hold of the lock.
//!
//! What keeps this from answering from stale memory: an Acquire is answered
//! only by a confirmation that *started after it arrived* (the list is taken
//! before the confirmation begins, and nothing that arrives later is
//! answered by it), and with no change of memory in between (the answers go
//! out in the same hold of the lock, without awaiting anything after the
//! confirmation). So it is exactly as fresh as a confirmation of its own. A
//! confirmation already in flight, or one made before the caller arrived,
//! never answers it.
//!
//! What keeps it from losing an Acquire, or queueing one nobody waits for:
//! - the confirmation and the answers of a batch run in a task of their
//!   own, which holds the lock: the caller that took the batch may be
//!   cancelled (its deadline, its client) without throwing away the others'
//!   answers (a chain of holders each cancelled at its deadline would
//!   otherwise answer nobody while arrivals stay dense); were that task
//!   dropped (the runtime shutting down), the Acquires it took go back to
//!   the front of the list, unanswered and unqueued (nothing is queued
//!   before the confirmation succeeded, and nothing is awaited from then
//!   until every answer is sent);
//! - a caller waits for its answer and for the lock at once, and leaves as
//!   soon as its answer came: a caller already answered never holds up the
//!   lock's line (so a release waits behind at most the holds that answer
//!   the Acquires that arrived before it, [`BATCH_MAX`] per hold);
//! - an answer is handed over before its request is queued, and only if its
//!   caller still waits: a caller that gave up changes nothing (it does not
//!   supersede its node's live request);
//! - a caller that gives up after its answer was handed over, before it
//!   read it, leaves its ticket on the departed list, which the next batch
//!   or the granter's next pass withdraws (meanwhile it is never granted:
//!   its stream is closed, and grants skip closed streams);
//! - entries of callers that gave up before their batch are pruned as the
//!   list grows, not only when taken.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::node::NodeName;
use crate::state::{LeaseError, Phase};

use super::{AcquireRequest, AcquireUpdate, Engine, EngineError, Grant, Inner};

/// The most Acquires one hold of the lock answers: the rest are taken by
/// the next holder (one of their own callers, which wait for the lock until
/// answered).
pub(super) const BATCH_MAX: usize = 512;

/// The arrivals list's length from which entries of callers that gave up
/// are pruned (at each power of two).
const PRUNE_AT: usize = 1024;

/// The events of one Acquire stream.
pub type AcquireEvents = mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>;

/// What an Acquire is answered with: its ticket and its stream's events.
type Answer = Result<(u64, AcquireEvents), EngineError>;

/// An Acquire waiting for a confirmation.
pub(super) struct Arrival {
    request: AcquireRequest,
    answer: oneshot::Sender<Answer>,
}

/// The Acquires that arrived and were not taken yet, and the tickets of
/// callers that left with their answer unread.
#[derive(Default)]
pub(super) struct Arrivals {
    list: std::sync::Mutex<VecDeque<Arrival>>,
    departed: std::sync::Mutex<Vec<(NodeName, u64)>>,
}

impl Arrivals {
    fn push(&self, arrival: Arrival) {
        let mut list = self.list();
        if list.len() >= PRUNE_AT && list.len().is_power_of_two() {
            // Callers that gave up while the lock was busy (and nobody took
            // the list since): at every doubling, so amortized O(1).
            list.retain(|a| !a.answer.is_closed());
        }
        list.push_back(arrival);
    }

    /// Puts back, at the front and in their order, arrivals a cancelled
    /// holder took.
    fn put_back(&self, batch: Vec<Arrival>) {
        let mut list = self.list();
        for arrival in batch.into_iter().rev() {
            list.push_front(arrival);
        }
    }

    /// Takes the oldest [`BATCH_MAX`] arrivals whose callers still wait.
    fn take(&self) -> Vec<Arrival> {
        let mut list = self.list();
        let mut taken = Vec::new();
        while taken.len() < BATCH_MAX {
            let Some(arrival) = list.pop_front() else {
                break;
            };
            if !arrival.answer.is_closed() {
                taken.push(arrival);
            }
        }
        taken
    }

    /// How many arrived and were not taken yet.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.list().len()
    }

    fn list(&self) -> std::sync::MutexGuard<'_, VecDeque<Arrival>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many callers left with their answer unread, not withdrawn yet.
    #[cfg(test)]
    pub(super) fn departed_len(&self) -> usize {
        self.departed().len()
    }

    fn departed(&self) -> std::sync::MutexGuard<'_, Vec<(NodeName, u64)>> {
        self.departed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The arrivals a holder took, until answered: if the holder is cancelled
/// first, they go back to the list for the next one.
struct Taken<'a> {
    arrivals: &'a Arrivals,
    batch: Vec<Arrival>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.batch.is_empty() {
            self.arrivals.put_back(std::mem::take(&mut self.batch));
        }
    }
}

/// A caller's wait for its answer: if it gives up after the answer was
/// handed over but before reading it, its request is withdrawn.
struct Waiting<'a> {
    engine: &'a Engine,
    node: NodeName,
    answer: oneshot::Receiver<Answer>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.answer.close();
        if let Ok(Ok((ticket, _))) = self.answer.try_recv() {
            self.engine
                .arrivals
                .departed()
                .push((self.node.clone(), ticket));
            self.engine.wake.notify_one();
        }
    }
}

/// Why `request` may be neither handed its node's grant nor queued:
/// - an agent's request (not `manual`) never takes over an operator's hold
///   (a resumed grant would send the agent to drain, update and reboot the
///   node during the operator's work, or to release the hold when its need
///   went away), nor replaces an operator's queued hold;
/// - an agent that cannot make control-plane backups is never handed a
///   grant that still needs one (it would drain without it): the guard
///   never grants it one, and this keeps it from resuming one made for a
///   hold or for a current agent.
fn refusal(inner: &Inner, request: &AcquireRequest) -> Option<LeaseError> {
    if request.manual {
        return None;
    }
    let node = &request.node;
    if let Some(h) = inner.state.holders.get(node) {
        if h.phase == Phase::Manual {
            return Some(LeaseError::OperatorHold { node: node.clone() });
        }
        if !request.backs_up_control_plane && inner.state.backup_missing(node).is_some() {
            return Some(LeaseError::BackupUnsupported { node: node.clone() });
        }
    } else if inner.queue.get(node).is_some_and(|q| q.request.manual) {
        return Some(LeaseError::OperatorHold { node: node.clone() });
    }
    None
}

impl EngineError {
    /// The same answer for another caller held up by the same failure
    /// (a store error keeps its message, and its gRPC code).
    fn for_another_caller(&self) -> EngineError {
        match self {
            EngineError::Lease(e) => EngineError::Lease(e.clone()),
            EngineError::Store(e) => EngineError::StoreFailed(e.to_string()),
            EngineError::StoreFailed(e) => EngineError::StoreFailed(e.clone()),
            EngineError::Refused(r) => EngineError::Refused(r.clone()),
            EngineError::NotLeader { leader } => EngineError::NotLeader {
                leader: leader.clone(),
            },
            EngineError::ShuttingDown => EngineError::ShuttingDown,
            EngineError::Superseded(node) => EngineError::Superseded(node.clone()),
            EngineError::Moved => EngineError::Moved,
        }
    }
}

impl Engine {
    /// Queues `request` and returns the channel its progress arrives on, and
    /// a ticket to withdraw it with. A node that already holds the baton gets
    /// its grant at once (resumed). A node already waiting replaces its older
    /// request (that stream ends with [`EngineError::Superseded`]). Answered
    /// only after a store confirmation that started after it arrived (see
    /// the module's docs), shared with the Acquires that arrived with it.
    pub async fn acquire(self: &Arc<Self>, request: AcquireRequest) -> Answer {
        'ask: loop {
            let (tx, rx) = oneshot::channel();
            self.arrivals.push(Arrival {
                request: request.clone(),
                answer: tx,
            });
            let mut waiting = Waiting {
                engine: self,
                node: request.node.clone(),
                answer: rx,
            };
            loop {
                // The answer first: a caller answered by another holder
                // leaves the lock's line at once.
                tokio::select! {
                    biased;
                    answer = &mut waiting.answer => match answer {
                        Ok(answer) => return answer,
                        // Unreachable while the engine lives (a cancelled
                        // holder puts its batch back): ask again.
                        Err(oneshot::error::RecvError { .. }) => continue 'ask,
                    },
                    mut inner = self.inner.clone().lock_owned() => {
                        // Answered meanwhile (by a holder on another
                        // thread): no hold of its own.
                        if let Ok(answer) = waiting.answer.try_recv() {
                            return answer;
                        }
                        let batch = self.arrivals.take();
                        if !batch.is_empty() {
                            // The confirmation and the answers run to the
                            // end even if this caller goes away (its
                            // deadline, its client): a caller's
                            // cancellation never throws away the answers
                            // of the others.
                            let engine = self.clone();
                            let answering = tokio::spawn(async move {
                                engine.answer_arrivals(&mut inner, batch).await;
                            });
                            let _ = answering.await;
                        }
                    }
                }
            }
        }
    }

    /// Withdraws the requests of callers that left with their answer
    /// unread (see [`Waiting`]).
    pub(super) fn withdraw_departed(&self, inner: &mut Inner) {
        let departed = std::mem::take(&mut *self.arrivals.departed());
        let mut withdrawn = false;
        for (node, ticket) in departed {
            if inner.queue.withdraw(&node, ticket) {
                info!(node = %node, "acquire withdrawn: its caller left before reading the answer");
                withdrawn = true;
            }
        }
        if withdrawn {
            self.metrics.queue_length.set(inner.queue.len() as i64);
            self.changed();
        }
    }

    /// Confirms once and answers every Acquire of `batch`, in this one hold
    /// of the lock.
    async fn answer_arrivals(&self, inner: &mut Inner, batch: Vec<Arrival>) {
        let mut taken = Taken {
            arrivals: &self.arrivals,
            batch,
        };
        self.withdraw_departed(inner);
        let confirmed = match self.ensure_current(inner).await {
            Ok(fence) => self.confirm(inner, &fence).await,
            Err(e) => Err(e),
        };
        // No await from here on: every answer goes out on the memory the
        // confirmation proved, and the batch can no longer be put back.
        let batch = std::mem::take(&mut taken.batch);
        if let Err(e) = confirmed {
            let mut batch = batch.into_iter();
            let first = batch.next().map(|a| a.answer);
            for arrival in batch {
                let _ = arrival.answer.send(Err(e.for_another_caller()));
            }
            if let Some(first) = first {
                let _ = first.send(Err(e));
            }
            return;
        }
        let mut queued = false;
        for Arrival { request, answer } in batch {
            let (events, rx) = mpsc::unbounded_channel();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            if let Some(refusal) = refusal(inner, &request) {
                let _ = answer.send(Err(refusal.into()));
                continue;
            }
            if let Some(h) = inner.state.holders.get(&request.node) {
                let grant = Grant {
                    fencing_token: h.fencing_token,
                    granted_at: h.granted_at,
                    resumed: true,
                    phase: h.phase,
                };
                let _ = events.send(Ok(AcquireUpdate::Granted(grant)));
                if answer.send(Ok((ticket, rx))).is_ok() {
                    info!(node = %request.node, token = h.fencing_token, "acquire: node already holds the baton");
                }
                continue;
            }
            // Handed over before it is queued: a caller that gave up
            // changes nothing (in particular it does not supersede its
            // node's live request).
            if answer.send(Ok((ticket, rx))).is_err() {
                continue;
            }
            info!(node = %request.node, control_plane = request.control_plane, reason = %request.reason, "acquire: queued");
            let now = self.now();
            let node = request.node.clone();
            if let Some(old) = inner.queue.push(ticket, request, now, events) {
                let _ = old.events.send(Err(EngineError::Superseded(node)));
            }
            queued = true;
        }
        self.metrics.queue_length.set(inner.queue.len() as i64);
        if queued {
            self.wake.notify_one();
            self.changed();
        }
    }
}
