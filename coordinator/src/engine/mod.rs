//! The engine: the one writer of the lease state.
//!
//! Every call (acquire, renew, report, release, pause, ...) is applied to a
//! copy of the state, saved through the [`StateStore`], and only then made
//! current and answered: what a caller was told is always on disk. A
//! separate granter task runs the grant rule ([`crate::policy::decide`])
//! whenever something changed, prepares the chosen node (guards such as the
//! etcd snapshot run without the lock held), re-checks the rule and grants.
//! Waiters hear about their position and reason, then their grant, over the
//! channel behind their Acquire stream; the wait queue (module `queue`) keeps
//! that bookkeeping independent of the queue's length, so a handoff costs
//! the same with ten waiters or thirty thousand.
//!
//! The engine only grants while its store says this replica leads; on
//! gaining leadership it reloads the state, on losing it drops its waiters
//! (they reconnect to the new leader).

mod granter;
mod queue;
mod ranks;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::node::NodeName;
use crate::policy::{GrantGuard, Policy, Waiter};
use crate::state::{LeaseError, LeaseState, Progress};
use crate::store::{Leadership, StateStore, StoreError};

/// The clock the engine reads; tests pass their own.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Work that must succeed before a node is granted (e.g. an etcd snapshot
/// and a leadership move). Runs without the engine's lock; the grant rule is
/// checked again afterwards.
pub trait GrantPreparer: Send + Sync {
    /// Prepares `candidate`; an error is the reason it keeps waiting.
    fn prepare<'a>(&'a self, candidate: &'a Waiter) -> BoxFuture<'a, Result<(), String>>;
}

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The grant rule's settings.
    pub policy: Policy,
    /// How often holders should renew.
    pub renew_interval: Duration,
    /// A holder that has not renewed for this long is overdue.
    pub overdue_after: Duration,
    /// This replica's id.
    pub coordinator_id: String,
    /// How long a node whose preparation failed waits before it is tried again.
    pub prepare_retry: Duration,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The lease refused the call (stale token, not the holder).
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The store could not save; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another replica leads.
    #[error("this coordinator is not the leader{}", leader.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_default())]
    NotLeader {
        /// The leader, if known.
        leader: Option<String>,
    },
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A newer Acquire for the same node replaced this one.
    #[error("superseded by a newer Acquire for node {0}")]
    Superseded(NodeName),
}

/// A grant as delivered to the waiter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token.
    pub fencing_token: u64,
    /// When the baton was granted.
    pub granted_at: DateTime<Utc>,
    /// True when the node already held it.
    pub resumed: bool,
    /// The phase last reported.
    pub phase: crate::state::Phase,
}

/// What an Acquire stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireUpdate {
    /// Waiting at `position` (1-based) of `queue_length`, for `reason`.
    Queued {
        /// 1-based position.
        position: u32,
        /// Waiters in all.
        queue_length: u32,
        /// Why not granted now.
        reason: String,
    },
    /// Granted; the stream ends after this.
    Granted(Grant),
}

/// A request to acquire.
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    /// The node.
    pub node: NodeName,
    /// True for control-plane nodes.
    pub control_plane: bool,
    /// Why maintenance is needed.
    pub reason: String,
    /// Operator hold (phase starts as Manual).
    pub manual: bool,
}

/// How many waiters a [`Snapshot`] (and so Status and Watch) lists: the
/// head of the queue; a snapshot costs the same however many wait.
pub const SNAPSHOT_QUEUE_HEAD: usize = 100;

/// A read-only copy of what status shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The lease state.
    pub state: LeaseState,
    /// The first [`SNAPSHOT_QUEUE_HEAD`] waiters in FIFO order.
    pub queue: Vec<QueueView>,
    /// How many wait in all.
    pub queue_length: usize,
    /// Holders that are overdue now.
    pub overdue: BTreeSet<NodeName>,
    /// True when the windows allow a grant now.
    pub window_open: bool,
    /// The current leadership.
    pub leadership: Leadership,
    /// When it was taken.
    pub now: DateTime<Utc>,
}

/// One waiter as status shows it.
#[derive(Clone, Debug)]
pub struct QueueView {
    /// The node.
    pub node: NodeName,
    /// True for control-plane nodes.
    pub control_plane: bool,
    /// When it started waiting.
    pub since: DateTime<Utc>,
    /// Why it asked.
    pub request_reason: String,
    /// Why it waits.
    pub reason: String,
}

struct Inner {
    state: LeaseState,
    queue: queue::WaitQueue,
    next_ticket: u64,
    /// Holders already reported overdue (so it is logged once).
    overdue_seen: BTreeSet<NodeName>,
    /// When a release left waiters behind: the start of a handoff.
    handoff_started: Option<Instant>,
    /// Nodes down without holding the baton (count against the limit).
    unavailable: Vec<NodeName>,
    /// Nodes whose preparation failed: the reason and when to retry.
    prepare_failed: HashMap<NodeName, (String, DateTime<Utc>)>,
    /// True once the state was loaded as leader.
    leading: bool,
    shutting_down: bool,
}

/// The lease engine. Cheap to share (`Arc`).
pub struct Engine {
    inner: Mutex<Inner>,
    store: Arc<dyn StateStore>,
    config: EngineConfig,
    guards: Vec<Arc<dyn GrantGuard>>,
    preparers: Vec<Arc<dyn GrantPreparer>>,
    clock: Clock,
    metrics: Metrics,
    /// Wakes the granter.
    wake: Notify,
    /// Bumped on every visible change (drives Watch streams).
    changes: watch::Sender<u64>,
    leadership: watch::Receiver<Leadership>,
}

impl Engine {
    /// Builds an engine over `store` and loads its state when this replica
    /// leads. Fails when the stored state cannot be read.
    pub async fn new(
        store: Arc<dyn StateStore>,
        config: EngineConfig,
        guards: Vec<Arc<dyn GrantGuard>>,
        preparers: Vec<Arc<dyn GrantPreparer>>,
        clock: Clock,
        metrics: Metrics,
    ) -> Result<Arc<Self>, StoreError> {
        let leadership = store.leadership();
        let engine = Arc::new(Self {
            inner: Mutex::new(Inner {
                state: LeaseState::default(),
                queue: queue::WaitQueue::default(),
                next_ticket: 1,
                overdue_seen: BTreeSet::new(),
                handoff_started: None,
                unavailable: Vec::new(),
                prepare_failed: HashMap::new(),
                leading: false,
                shutting_down: false,
            }),
            store,
            config,
            guards,
            preparers,
            clock,
            metrics,
            wake: Notify::new(),
            changes: watch::channel(0).0,
            leadership,
        });
        if engine.leadership.borrow().is_leader {
            engine.take_leadership().await?;
        }
        Ok(engine)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Current leadership.
    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    /// Loads the stored state and starts granting.
    async fn take_leadership(&self) -> Result<(), StoreError> {
        let loaded = self.store.load().await?.unwrap_or_default();
        let mut inner = self.inner.lock().await;
        info!(
            holders = loaded.holders.len(),
            last_token = loaded.last_token,
            store = self.store.kind(),
            "leading: lease state loaded"
        );
        inner.state = loaded;
        inner.leading = true;
        self.metrics.is_leader.set(1);
        self.refresh_gauges(&inner);
        drop(inner);
        self.changed();
        Ok(())
    }

    /// Stops granting and drops waiters: another replica leads now.
    async fn lose_leadership(&self) {
        let mut inner = self.inner.lock().await;
        if !inner.leading {
            return;
        }
        warn!("lost leadership: not granting; waiters are sent to the new leader");
        inner.leading = false;
        let leader = self.leadership.borrow().leader.clone();
        for q in inner.queue.drain() {
            let _ = q.events.send(Err(EngineError::NotLeader {
                leader: leader.clone(),
            }));
        }
        self.metrics.is_leader.set(0);
        drop(inner);
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever status would.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    fn ensure_leading(&self, inner: &Inner) -> Result<(), EngineError> {
        if inner.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if !inner.leading {
            return Err(EngineError::NotLeader {
                leader: self.leadership.borrow().leader.clone(),
            });
        }
        Ok(())
    }

    /// Applies `change` to a copy of the state, saves it, then makes it
    /// current. On any error nothing changes.
    async fn commit<T>(
        &self,
        inner: &mut Inner,
        change: impl FnOnce(&mut LeaseState) -> Result<T, LeaseError>,
    ) -> Result<T, EngineError> {
        self.ensure_leading(inner)?;
        let mut next = inner.state.clone();
        let out = change(&mut next)?;
        if let Err(e) = self.store.save(&next).await {
            warn!(error = %e, "state save failed; the change was not applied");
            self.metrics.store_errors.inc();
            return Err(e.into());
        }
        inner.state = next;
        self.refresh_gauges(inner);
        Ok(out)
    }

    fn refresh_gauges(&self, inner: &Inner) {
        let now = self.now();
        self.metrics.holders.set(inner.state.holders.len() as i64);
        self.metrics.queue_length.set(inner.queue.len() as i64);
        let overdue = inner
            .state
            .holders
            .values()
            .filter(|h| h.is_overdue(now, self.config.overdue_after))
            .count();
        self.metrics.overdue.set(overdue as i64);
        self.metrics
            .paused
            .set(i64::from(inner.state.paused.is_some()));
        self.metrics.last_token.set(inner.state.last_token as i64);
    }

    /// Queues `request` and returns the channel its progress arrives on, and
    /// a ticket to withdraw it with. A node that already holds the baton gets
    /// its grant at once (resumed). A node already waiting replaces its older
    /// request (that stream ends with [`EngineError::Superseded`]).
    pub async fn acquire(
        &self,
        request: AcquireRequest,
    ) -> Result<
        (
            u64,
            mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>,
        ),
        EngineError,
    > {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner.lock().await;
        self.ensure_leading(&inner)?;
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        if let Some(h) = inner.state.holders.get(&request.node) {
            info!(node = %request.node, token = h.fencing_token, "acquire: node already holds the baton");
            let _ = tx.send(Ok(AcquireUpdate::Granted(Grant {
                fencing_token: h.fencing_token,
                granted_at: h.granted_at,
                resumed: true,
                phase: h.phase,
            })));
            return Ok((ticket, rx));
        }
        info!(node = %request.node, control_plane = request.control_plane, reason = %request.reason, "acquire: queued");
        let now = self.now();
        let node = request.node.clone();
        if let Some(old) = inner.queue.push(ticket, request, now, tx) {
            let _ = old.events.send(Err(EngineError::Superseded(node)));
        }
        self.metrics.queue_length.set(inner.queue.len() as i64);
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok((ticket, rx))
    }

    /// Withdraws a waiting request (its stream was closed). Does nothing if it
    /// was granted or replaced meanwhile.
    pub async fn withdraw(&self, node: &NodeName, ticket: u64) {
        let mut inner = self.inner.lock().await;
        if inner.queue.withdraw(node, ticket) {
            info!(node = %node, "acquire withdrawn");
            self.metrics.queue_length.set(inner.queue.len() as i64);
            drop(inner);
            self.wake.notify_one();
            self.changed();
        }
    }

    /// Records that the holder is alive; returns when it becomes overdue.
    pub async fn renew(&self, node: &NodeName, token: u64) -> Result<DateTime<Utc>, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        self.commit(&mut inner, |s| s.renew(node, token, now))
            .await?;
        if inner.overdue_seen.remove(node) {
            info!(node = %node, token, "holder renewed again; no longer overdue");
            self.changed();
        }
        Ok(now + self.config.overdue_after)
    }

    /// Records the holder's progress.
    pub async fn report(
        &self,
        node: &NodeName,
        token: u64,
        progress: Progress,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let phase = progress.phase;
        let error = progress.error.clone();
        self.commit(&mut inner, |s| s.report(node, token, progress, now))
            .await?;
        inner.overdue_seen.remove(node);
        if error.is_empty() {
            info!(node = %node, token, phase = phase.name(), "holder reported");
        } else {
            warn!(node = %node, token, phase = phase.name(), error = %error, "holder reported an error");
        }
        drop(inner);
        self.changed();
        Ok(())
    }

    /// Gives the baton back; the next eligible waiter is granted at once.
    pub async fn release(
        &self,
        node: &NodeName,
        token: u64,
        actor: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        self.commit(&mut inner, |s| s.release(node, token, actor, reason, now))
            .await?;
        info!(node = %node, token, reason, "released");
        self.after_release(&mut inner, node);
        Ok(())
    }

    /// Takes the baton from `node` (audited); returns the released token.
    pub async fn force_release(
        &self,
        node: &NodeName,
        actor: &str,
        reason: &str,
    ) -> Result<u64, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let token = self
            .commit(&mut inner, |s| s.force_release(node, actor, reason, now))
            .await?;
        warn!(node = %node, token, actor, reason, "force-released by an operator");
        self.after_release(&mut inner, node);
        Ok(token)
    }

    fn after_release(&self, inner: &mut Inner, node: &NodeName) {
        inner.overdue_seen.remove(node);
        self.metrics.releases.inc();
        if !inner.queue.is_empty() && inner.handoff_started.is_none() {
            inner.handoff_started = Some(Instant::now());
        }
        self.wake.notify_one();
        self.changed();
    }

    /// Stops granting (holders keep the baton). Returns false when already paused.
    pub async fn pause(&self, actor: &str, reason: &str) -> Result<bool, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let changed = self
            .commit(&mut inner, |s| Ok(s.pause(actor, reason, now)))
            .await?;
        if changed {
            warn!(actor, reason, "granting paused");
        }
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok(changed)
    }

    /// Grants again. Returns false when not paused.
    pub async fn resume(&self, actor: &str) -> Result<bool, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let changed = self
            .commit(&mut inner, |s| Ok(s.resume(actor, now)))
            .await?;
        if changed {
            info!(actor, "granting resumed");
        }
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok(changed)
    }

    /// Sets the nodes that are down without holding the baton (from the
    /// Kubernetes node watch); they count against the concurrency limit.
    pub async fn set_unavailable(&self, nodes: Vec<NodeName>) {
        let mut inner = self.inner.lock().await;
        if inner.unavailable != nodes {
            inner.unavailable = nodes;
            drop(inner);
            self.wake.notify_one();
            self.changed();
        }
    }

    /// Wakes the granter (e.g. a guard's health data changed).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// A copy of everything status shows.
    pub async fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let inner = self.inner.lock().await;
        Snapshot {
            state: inner.state.clone(),
            queue: inner
                .queue
                .head(SNAPSHOT_QUEUE_HEAD)
                .map(|(_, q, reason)| QueueView {
                    node: q.request.node.clone(),
                    control_plane: q.request.control_plane,
                    since: q.since,
                    request_reason: q.request.reason.clone(),
                    reason: reason.map(|r| r.text.to_string()).unwrap_or_default(),
                })
                .collect(),
            queue_length: inner.queue.len(),
            overdue: inner
                .state
                .holders
                .iter()
                .filter(|(_, h)| h.is_overdue(now, self.config.overdue_after))
                .map(|(n, _)| n.clone())
                .collect(),
            window_open: self.config.policy.windows.check(now).is_ok(),
            leadership: self.leadership.borrow().clone(),
            now,
        }
    }

    /// Ends every waiter's stream and stops granting; the state is saved one
    /// last time.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        inner.shutting_down = true;
        for q in inner.queue.drain() {
            let _ = q.events.send(Err(EngineError::ShuttingDown));
        }
        if inner.leading
            && let Err(e) = self.store.save(&inner.state).await
        {
            warn!(error = %e, "final state save failed (the last committed state is on disk)");
        }
        drop(inner);
        self.wake.notify_one();
        self.changed();
    }

    /// True once shutdown began.
    pub async fn is_shutting_down(&self) -> bool {
        self.inner.lock().await.shutting_down
    }
}

#[cfg(test)]
mod tests;
