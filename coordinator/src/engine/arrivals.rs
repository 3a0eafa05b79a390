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
//! What keeps it from losing an Acquire: the lock holder may be cancelled
//! (its client went away) while it awaits the confirmation; the Acquires it
//! took are then dropped unanswered and unqueued (nothing is queued before
//! the confirmation succeeded, and nothing is awaited from then until every
//! answer is sent), and their callers put them back on the list and try
//! again. A caller that gave up before its Acquire was answered is never
//! left in the queue: an answer that cannot be delivered withdraws the
//! request in the same hold.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::{AcquireRequest, AcquireUpdate, Engine, EngineError, Grant};

/// The most Acquires one hold of the lock answers: the rest are taken by
/// the next holder (one of their own callers), so a release never waits
/// behind more than this many.
pub(super) const BATCH_MAX: usize = 512;

/// The events of one Acquire stream.
pub type AcquireEvents = mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>;

/// What an Acquire is answered with: its ticket and its stream's events.
type Answer = Result<(u64, AcquireEvents), EngineError>;

/// An Acquire waiting for a confirmation.
pub(super) struct Arrival {
    request: AcquireRequest,
    answer: oneshot::Sender<Answer>,
}

/// The Acquires that arrived and were not taken yet.
#[derive(Default)]
pub(super) struct Arrivals(std::sync::Mutex<VecDeque<Arrival>>);

impl Arrivals {
    fn push(&self, arrival: Arrival) {
        self.list().push_back(arrival);
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
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    pub async fn acquire(&self, request: AcquireRequest) -> Answer {
        loop {
            let (tx, rx) = oneshot::channel();
            self.arrivals.push(Arrival {
                request: request.clone(),
                answer: tx,
            });
            {
                let mut inner = self.inner.lock().await;
                let batch = self.arrivals.take();
                if !batch.is_empty() {
                    self.answer_arrivals(&mut inner, batch).await;
                }
            }
            match rx.await {
                Ok(answer) => return answer,
                // The holder that took it was cancelled before answering:
                // it was not queued; ask again.
                Err(oneshot::error::RecvError { .. }) => continue,
            }
        }
    }

    /// Confirms once and answers every Acquire of `batch`, in this one hold
    /// of the lock.
    async fn answer_arrivals(&self, inner: &mut super::Inner, batch: Vec<Arrival>) {
        let confirmed = match self.ensure_current(inner).await {
            Ok(fence) => self.confirm(inner, &fence).await,
            Err(e) => Err(e),
        };
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
        // No await from here on: every answer goes out on the memory the
        // confirmation proved.
        let mut queued = false;
        for Arrival { request, answer } in batch {
            let (events, rx) = mpsc::unbounded_channel();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            if let Some(h) = inner.state.holders.get(&request.node) {
                info!(node = %request.node, token = h.fencing_token, "acquire: node already holds the baton");
                let _ = events.send(Ok(AcquireUpdate::Granted(Grant {
                    fencing_token: h.fencing_token,
                    granted_at: h.granted_at,
                    resumed: true,
                    phase: h.phase,
                })));
                let _ = answer.send(Ok((ticket, rx)));
                continue;
            }
            info!(node = %request.node, control_plane = request.control_plane, reason = %request.reason, "acquire: queued");
            let now = self.now();
            let node = request.node.clone();
            if let Some(old) = inner.queue.push(ticket, request, now, events) {
                let _ = old.events.send(Err(EngineError::Superseded(node.clone())));
            }
            if answer.send(Ok((ticket, rx))).is_err() {
                // Its caller gave up meanwhile: never leave it waiting.
                inner.queue.withdraw(&node, ticket);
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
