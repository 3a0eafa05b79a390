//! The engine: the one writer of the lease state.
//!
//! Every call (acquire, renew, report, release, pause, ...) is applied to a
//! copy of the state, saved through the [`StateStore`], and only then made
//! current and answered: what a caller was told is always stored. A
//! separate granter task runs the grant rule ([`crate::policy::decide`])
//! whenever something changed, prepares the chosen node (guards such as the
//! etcd snapshot run without the lock held, bounded by a timeout), decides
//! again and grants. Waiters hear about their position and reason, then
//! their grant, over the channel behind their Acquire stream; the wait queue
//! (module `queue`) keeps that bookkeeping independent of the queue's
//! length, so a handoff costs the same with ten waiters or thirty thousand.
//!
//! Answers come only from the confirmed leader. The engine's memory is
//! current only under a [`Fence`] (the leadership term it was loaded in and
//! the state's revision in the store):
//! - every save is a compare-and-swap on that fence, so a write decided from
//!   stale memory is never stored;
//! - every answer that is not a fresh save (a refusal, a resumed grant,
//!   status) is given only after the store confirmed the fence (one
//!   linearizable read);
//! - a failed or refused save, or a change of leadership term (read on every
//!   call, so a missed notification cannot hide it), drops the fence, and the
//!   state is reloaded before anything is answered again; a new term also
//!   sends the waiters of the old one away (they reconnect);
//! - a replica that does not lead answers UNAVAILABLE naming the leader.
//!
//! Missing state is not empty state: a store that holds no state is refused
//! (the process stops, see [`Engine::refused`]) unless this process was told
//! to initialize it ([`EngineConfig::initialize`]); a process told so refuses
//! to start when the store holds state (checked at start, leading or not),
//! and the first leader among those started while it was empty creates it.
//!
//! Holders confirm right before a destructive step ([`Engine::confirm_step`],
//! in `confirm.rs`): the guards run again for them as if granting now.

mod arrivals;
mod backup;
mod confirm;
mod granter;
mod plan;
mod queue;
mod ranks;

pub use arrivals::AcquireEvents;
pub use plan::{Plan, PlanEntry};

pub use confirm::{CONFIRM_RETRY, Confirmation, Step};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use tokio::sync::{Mutex, Notify, watch};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::node::NodeName;
use crate::policy::{GrantGuard, Policy, Waiter};
use crate::state::{LeaseError, LeaseState, Phase, Progress};
use crate::store::{Fence, Leadership, StateStore, StoreError};

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

    /// True only when `candidate` certainly needs no preparation (e.g. it
    /// carries no etcd member): then its grant may be saved in the same
    /// write as the release that freed its slot. When unsure, false: the
    /// granter prepares it first, as for any grant.
    fn nothing_to_prepare(&self, _candidate: &Waiter) -> bool {
        false
    }
}

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The grant rule's settings at start (see [`Engine::set_policy`]).
    pub policy: Policy,
    /// How often holders should renew.
    pub renew_interval: Duration,
    /// A holder that has not renewed for this long is overdue.
    pub overdue_after: Duration,
    /// This replica's id.
    pub coordinator_id: String,
    /// How long a node whose preparation failed waits before it is tried again.
    pub prepare_retry: Duration,
    /// The longest a grant's preparation (e.g. an etcd snapshot) may take;
    /// past it the node keeps waiting with that reason.
    pub prepare_timeout: std::time::Duration,
    /// The longest one store call (load, save, confirmation) may take; past
    /// it the call failed, and a save's outcome is unknown.
    pub store_timeout: std::time::Duration,
    /// Create the state when the store holds none (a new installation).
    /// Without it an empty store is refused; with it a store that holds
    /// state when the engine starts is refused.
    pub initialize: bool,
}

impl EngineConfig {
    /// Settings with the defaults for everything but the grant rule.
    pub fn new(policy: Policy, coordinator_id: &str) -> Self {
        Self {
            policy,
            renew_interval: Duration::seconds(10),
            overdue_after: Duration::minutes(15),
            coordinator_id: coordinator_id.to_string(),
            prepare_retry: Duration::seconds(10),
            prepare_timeout: std::time::Duration::from_secs(300),
            store_timeout: std::time::Duration::from_secs(10),
            initialize: false,
        }
    }
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
    /// The store failed a call that another caller's answer waited for
    /// too (Acquires that share one confirmation); its message.
    #[error("{0}")]
    StoreFailed(String),
    /// This replica refuses to run at all (see [`Engine::refused`]).
    #[error("this coordinator refuses to run: {0}")]
    Refused(String),
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
    /// The memory a change was decided from was replaced (a reload) before
    /// it could be saved; it must be decided again.
    #[error("the lease state was reloaded after this change was decided; deciding again")]
    Moved,
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
    /// The requester makes and sends a control-plane backup when a grant
    /// asks for one (`AcquireRequest.backs_up_control_plane`).
    pub backs_up_control_plane: bool,
}

/// How many waiters a [`Snapshot`] (and so Status and Watch) lists: the
/// head of the queue; a snapshot costs the same however many wait.
pub const SNAPSHOT_QUEUE_HEAD: usize = 100;

/// How many audit records a [`Snapshot`] carries: the newest (the whole
/// audit stays in the store; a snapshot costs the same however long it is).
pub const SNAPSHOT_AUDIT_TAIL: usize = 50;

/// A read-only copy of what status shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The lease state, with the newest [`SNAPSHOT_AUDIT_TAIL`] audit records.
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
    /// What `state` is known to match in the store. `None` when it is not
    /// known to be current (not loaded yet, a save failed, a confirmation
    /// failed, leadership lost): the state is reloaded before anything is
    /// answered.
    fence: Option<Fence>,
    /// The term of the last load: waiters of an older term are sent away.
    loaded_term: Option<u64>,
    /// `--initialize` not used up yet.
    initialize: bool,
    /// A reload happened whose stored grants were not yet resumed (see
    /// [`Engine::resume_stored_grants`]); set until that succeeds, so a
    /// call cancelled in between cannot skip it.
    resume_pending: bool,
    /// The last reload error logged (so a store that stays down is logged
    /// once, not every second).
    reload_error: Option<String>,
    /// When `baton_waiters_without_backup_support` was last counted (see
    /// `Engine::count_waiters_without_backup_support`).
    backup_support_counted: Option<Instant>,
    shutting_down: bool,
}

/// The lease engine. Cheap to share (`Arc`).
pub struct Engine {
    /// Shared so that a batch of Acquires can be answered by a task of its
    /// own (see `arrivals`).
    inner: Arc<Mutex<Inner>>,
    store: Arc<dyn StateStore>,
    config: EngineConfig,
    /// The grant rule's settings in force (starts as `config.policy`; a
    /// policy reload replaces it).
    policy: std::sync::RwLock<Arc<Policy>>,
    guards: Vec<Arc<dyn GrantGuard>>,
    preparers: Vec<Arc<dyn GrantPreparer>>,
    clock: Clock,
    metrics: Metrics,
    /// Acquires waiting for a confirmation (see `arrivals`).
    arrivals: arrivals::Arrivals,
    /// Wakes the granter.
    wake: Notify,
    /// Bumped on every visible change (drives Watch streams).
    changes: watch::Sender<u64>,
    leadership: watch::Receiver<Leadership>,
    /// Set when this replica refuses to run (see [`Engine::refused`]).
    refusal: watch::Sender<Option<String>>,
}

impl Engine {
    /// For tests: an engine over `store` with the default policy, no
    /// guards or preparers, the system clock and its own metrics.
    #[cfg(test)]
    pub(crate) async fn over(store: Arc<dyn StateStore>, id: &str) -> Arc<Engine> {
        Self::new(
            store,
            EngineConfig::new(Policy::default(), id),
            Vec::new(),
            Vec::new(),
            system_clock(),
            Metrics::new(),
        )
        .await
        .expect("an engine over a readable store")
    }

    /// For tests: an engine over `store` with `config`, one `guard`, a
    /// clock stopped at `now` and its own metrics; its granter runs.
    #[cfg(test)]
    pub(crate) async fn guarded(
        store: Arc<dyn StateStore>,
        config: EngineConfig,
        guard: Arc<dyn GrantGuard>,
        now: DateTime<Utc>,
    ) -> Arc<Engine> {
        let engine = Self::new(
            store,
            config,
            vec![guard],
            Vec::new(),
            Arc::new(move || now),
            Metrics::new(),
        )
        .await
        .expect("an engine over a readable store");
        tokio::spawn(engine.clone().run_granter());
        engine
    }

    /// Builds an engine over `store` and loads its state when this replica
    /// leads. Fails when the stored state cannot be read, is missing (and
    /// `initialize` is not set) or exists (and `initialize` is set).
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
            inner: Arc::new(Mutex::new(Inner {
                state: LeaseState::default(),
                queue: queue::WaitQueue::default(),
                next_ticket: 1,
                overdue_seen: BTreeSet::new(),
                handoff_started: None,
                unavailable: Vec::new(),
                prepare_failed: HashMap::new(),
                fence: None,
                loaded_term: None,
                initialize: config.initialize,
                resume_pending: false,
                reload_error: None,
                backup_support_counted: None,
                shutting_down: false,
            })),
            store,
            policy: std::sync::RwLock::new(Arc::new(config.policy.clone())),
            config,
            guards,
            preparers,
            clock,
            metrics,
            arrivals: arrivals::Arrivals::default(),
            wake: Notify::new(),
            changes: watch::channel(0).0,
            leadership,
            refusal: watch::channel(None).0,
        });
        if engine.config.initialize {
            // Whether or not this replica leads yet: --initialize is for a
            // store that holds no state now, never for one that does.
            let loaded = engine.timed(engine.store.load()).await?;
            if let Some(state) = loaded.state {
                return Err(StoreError::AlreadyInitialized {
                    location: engine.store.location(),
                    last_token: state.last_token,
                    holders: state.holders.len(),
                });
            }
        }
        let term = {
            let claim = engine.leadership.borrow();
            claim.is_leader.then_some(claim.term)
        };
        if let Some(term) = term {
            let mut inner = engine.inner.lock().await;
            engine.reload(&mut inner, term).await?;
        }
        Ok(engine)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The metrics this engine updates (guards count their own events here).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The grant rule's settings in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts new grant rule settings in force (a policy reload) and runs
    /// the rule again.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.wake.notify_one();
        self.changed();
    }

    /// Current leadership, as the store last published it (it may lag; every
    /// answer is confirmed against the store itself).
    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    /// Becomes `Some(reason)` when this replica refuses to run at all: the
    /// store holds no state and `--initialize` was not given, or it was given
    /// and the store holds state, or the state is corrupt. The process should
    /// stop (so another replica, or an operator, takes over); every call
    /// answers UNAVAILABLE meanwhile.
    pub fn refused(&self) -> watch::Receiver<Option<String>> {
        self.refusal.subscribe()
    }

    /// True while this replica leads and its memory was loaded in the
    /// current term (it may answer, after confirming).
    pub async fn is_current(&self) -> bool {
        let term = self.leadership.borrow().term;
        let inner = self.inner.lock().await;
        inner.fence.as_ref().is_some_and(|f| f.term == term)
    }

    /// Runs one store call with the store timeout.
    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.store_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Backend(format!(
                "no answer from the {} store within {}ms",
                self.store.kind(),
                self.config.store_timeout.as_millis()
            ))),
        }
    }

    /// Loads the stored state as the memory of `term` (creating it under
    /// `--initialize`). Missing, existing-under-initialize and corrupt state
    /// make this replica refuse to run.
    async fn reload(&self, inner: &mut Inner, term: u64) -> Result<Fence, StoreError> {
        let result = self.load_fenced(inner, term).await;
        match &result {
            Ok(fence) => {
                let (holders, last_token) = (inner.state.holders.len(), inner.state.last_token);
                info!(holders, last_token, term, revision = %fence.revision, store = self.store.kind(), "leading: lease state loaded");
                inner.fence = Some(fence.clone());
                inner.loaded_term = Some(term);
                inner.reload_error = None;
                self.metrics.is_leader.set(1);
                self.refresh_gauges(inner);
                self.changed();
            }
            Err(
                e @ (StoreError::Missing { .. }
                | StoreError::AlreadyInitialized { .. }
                | StoreError::Corrupt { .. }
                | StoreError::NewerFormat { .. }),
            ) => {
                let reason = e.to_string();
                tracing::error!(reason = %reason, "refusing to run");
                self.refusal.send_replace(Some(reason));
                self.metrics.is_leader.set(0);
            }
            Err(e) => {
                let message = e.to_string();
                if inner.reload_error.as_ref() != Some(&message) {
                    warn!(error = %message, "leading, but the state could not be loaded; not answering");
                    inner.reload_error = Some(message);
                }
            }
        }
        result
    }

    /// After a reload: a waiter whose node holds the baton in the stored
    /// state is sent that grant (resumed, with the stored token and phase)
    /// and leaves the queue. This happens when a grant's save landed but its
    /// answer was lost (an error after the write, or the store timeout):
    /// the waiter would otherwise stay queued, the grant rule would pick it
    /// again and be refused (it already holds), and the node would never
    /// learn it holds the baton while everybody else waits behind it.
    /// Like every answer not from a fresh save, the grants go out only
    /// after the store confirmed the reloaded memory.
    async fn resume_stored_grants(
        &self,
        inner: &mut Inner,
        fence: &Fence,
    ) -> Result<(), EngineError> {
        // The holders are few (the concurrency limit); the queue may be
        // long: look the holders up in it, never walk it.
        let resumable: Vec<NodeName> = inner
            .state
            .holders
            .keys()
            .filter(|node| inner.queue.get(node).is_some())
            .cloned()
            .collect();
        if resumable.is_empty() {
            inner.resume_pending = false;
            return Ok(());
        }
        self.confirm(inner, fence).await?;
        inner.resume_pending = false;
        let Inner { state, queue, .. } = inner;
        for node in resumable {
            let (Some(h), Some(q)) = (state.holders.get(&node), queue.take(&node)) else {
                continue;
            };
            info!(node = %node, token = h.fencing_token, "the reloaded state holds a grant for a waiter (its save's answer was lost): resuming it");
            let _ = q.events.send(Ok(AcquireUpdate::Granted(Grant {
                fencing_token: h.fencing_token,
                granted_at: h.granted_at,
                resumed: true,
                phase: h.phase,
            })));
        }
        self.metrics.queue_length.set(queue.len() as i64);
        self.changed();
        Ok(())
    }

    async fn load_fenced(&self, inner: &mut Inner, term: u64) -> Result<Fence, StoreError> {
        let loaded = self.timed(self.store.load()).await?;
        let location = || self.store.location();
        match loaded.state {
            Some(mut state) => {
                // Under --initialize: another replica initialized the store
                // after this one started (it was empty then, see `new`).
                inner.initialize = false;
                if inner.loaded_term.is_some() && state.last_token < inner.state.last_token {
                    // The store went back (a restored backup, a rolled-back
                    // volume): whatever else it forgot, tokens this process
                    // saw handed out are never handed out again.
                    warn!(
                        stored = state.last_token,
                        seen = inner.state.last_token,
                        store = %location(),
                        "the stored last fencing token is behind one this coordinator saw; tokens go on from the higher one"
                    );
                    state.last_token = inner.state.last_token;
                }
                inner.state = state;
                Ok(Fence {
                    term,
                    revision: loaded.revision,
                })
            }
            None if inner.initialize => {
                let state = LeaseState::initial(self.now(), &self.config.coordinator_id);
                let fence = Fence {
                    term,
                    revision: loaded.revision,
                };
                let revision = self.timed(self.store.save(&state, &fence)).await?;
                warn!(store = %location(), first_token = state.last_token + 1, "initialized the lease state (--initialize); remove --initialize now");
                inner.initialize = false;
                inner.state = state;
                Ok(Fence { term, revision })
            }
            None => Err(StoreError::Missing {
                location: location(),
            }),
        }
    }

    /// Stops answering and drops waiters: another replica leads (or nobody).
    fn step_down(&self, inner: &mut Inner) {
        if inner.fence.is_none() && inner.queue.is_empty() {
            return;
        }
        warn!("not leading: not granting; waiters are sent to the new leader");
        inner.fence = None;
        let leader = self.leadership.borrow().leader.clone();
        for q in inner.queue.drain() {
            let _ = q.events.send(Err(EngineError::NotLeader {
                leader: leader.clone(),
            }));
        }
        self.metrics.is_leader.set(0);
        self.metrics.queue_length.set(0);
        self.changed();
    }

    /// Makes sure `inner.state` is the store's latest state for the current
    /// leadership term, reloading it when it is not known to be (a new
    /// term, or a failed save); returns the fence it is current under. Only
    /// the store's [`StateStore::save`] or [`StateStore::confirm`] proves it
    /// still is at the moment of an answer.
    async fn ensure_current(&self, inner: &mut Inner) -> Result<Fence, EngineError> {
        if inner.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(reason) = self.refusal.borrow().clone() {
            return Err(EngineError::Refused(reason));
        }
        let claim = self.leadership.borrow().clone();
        if !claim.is_leader {
            self.step_down(inner);
            return Err(EngineError::NotLeader {
                leader: claim.leader,
            });
        }
        if let Some(fence) = inner.fence.clone()
            && fence.term == claim.term
        {
            if inner.resume_pending {
                self.resume_stored_grants(inner, &fence).await?;
            }
            return Ok(fence);
        }
        if inner.loaded_term.is_some_and(|t| t != claim.term) && !inner.queue.is_empty() {
            // Another replica may have led in between: what these waiters
            // were told may be stale. They reconnect and ask again.
            info!(
                term = claim.term,
                "leading in a new term: waiters of the old term ask again"
            );
            for q in inner.queue.drain() {
                let _ = q.events.send(Err(EngineError::NotLeader {
                    leader: claim.leader.clone(),
                }));
            }
        }
        inner.fence = None;
        inner.resume_pending = true;
        let fence = self.reload(inner, claim.term).await?;
        self.resume_stored_grants(inner, &fence).await?;
        Ok(fence)
    }

    /// Proves with the store that the memory under `fence` is still the
    /// latest state and this replica still leads; forgets the fence if not.
    async fn confirm(&self, inner: &mut Inner, fence: &Fence) -> Result<(), EngineError> {
        if let Err(e) = self.timed(self.store.confirm(fence)).await {
            warn!(error = %e, "could not confirm leadership and state; not answering");
            inner.fence = None;
            return Err(e.into());
        }
        Ok(())
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

    /// Applies `change` to a copy of the state and saves it (a
    /// compare-and-swap on the fence), then makes it current. A refusal by
    /// `change` is answered only after the store confirmed the memory it was
    /// decided from. On any error nothing changes.
    async fn commit<T>(
        &self,
        inner: &mut Inner,
        change: impl FnOnce(&mut LeaseState) -> Result<T, LeaseError>,
    ) -> Result<T, EngineError> {
        self.commit_under(inner, None, change).await
    }

    /// [`Engine::commit`], but with `decided`, only onto the memory of that
    /// fence: a change decided from one memory (a grant the rule chose) is
    /// never applied to another that a reload brought in meanwhile (a new
    /// term), since nothing decided it there. Then the answer is
    /// [`EngineError::Moved`] and nothing changes.
    async fn commit_under<T>(
        &self,
        inner: &mut Inner,
        decided: Option<&Fence>,
        change: impl FnOnce(&mut LeaseState) -> Result<T, LeaseError>,
    ) -> Result<T, EngineError> {
        let (out, ()) = self
            .commit_then(inner, decided, change, |_, _, _| ())
            .await?;
        Ok(out)
    }

    /// Like [`Engine::commit_under`], and once `change` succeeded, `then`
    /// may add what follows from it to the same copy (the grants a release
    /// makes possible at once): both are saved in one durable write, or
    /// neither. What `then` returns is acted on (told) only after that write.
    async fn commit_then<T, U>(
        &self,
        inner: &mut Inner,
        decided: Option<&Fence>,
        change: impl FnOnce(&mut LeaseState) -> Result<T, LeaseError>,
        then: impl FnOnce(&Self, &mut Inner, &mut LeaseState) -> U,
    ) -> Result<(T, U), EngineError> {
        let fence = self.ensure_current(inner).await?;
        if decided.is_some_and(|d| d != &fence) {
            return Err(EngineError::Moved);
        }
        // The audit stays where it is: the copy collects only the records
        // this change makes, which the save appends.
        let mut next = inner.state.without_audit();
        let out = match change(&mut next) {
            Ok(out) => out,
            Err(refusal) => {
                self.confirm(inner, &fence).await?;
                return Err(refusal.into());
            }
        };
        let more = then(self, inner, &mut next);
        // Whatever clients sent, the document stays within its budget.
        if let Err(e) = next.fit_budget() {
            warn!(error = %e, "the change would not fit the state budget; not applied");
            return Err(StoreError::TooLarge {
                size: e.size,
                budget: e.budget,
            }
            .into());
        }
        match self.timed(self.store.save(&next, &fence)).await {
            Ok(revision) => {
                inner.state.advance_to(next);
                inner.fence = Some(Fence {
                    term: fence.term,
                    revision,
                });
                self.refresh_gauges(inner);
                Ok((out, more))
            }
            Err(e) => {
                // Refused, or an unknown outcome: either way the memory may
                // not be the stored state any more.
                warn!(error = %e, "state save failed; the change was not applied and the state is reloaded before the next answer");
                self.metrics.store_errors.inc();
                inner.fence = None;
                Err(e.into())
            }
        }
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
        self.metrics
            .window_open
            .set(i64::from(self.policy().windows.check(now).is_ok()));
        self.metrics.set_holder_phases(
            inner
                .state
                .holders
                .iter()
                .map(|(node, h)| (node.as_str(), h.phase.name())),
        );
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
        // An agent too old to ask Confirm before its drain reports once,
        // best effort, then renews and drains: a grant that lacks its
        // backup pairing is released at that renewal if the report did
        // not release it (lost, or its save failed).
        self.release_if_unpaired(&mut inner, node, token, "its renewal before its drain", now)
            .await?;
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
        // The report that a grant starts its drain comes before anything
        // is touched, from current agents and from those too old to ask
        // Confirm before their drain: a grant that lacks its backup
        // pairing is released there (see `confirm`), judged on the
        // current state.
        if phase == Phase::Draining {
            self.release_if_unpaired(
                &mut inner,
                node,
                token,
                "its report that it starts draining",
                now,
            )
            .await?;
        }
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
        let started = Instant::now();
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let ((), handed) = self
            .commit_then(
                &mut inner,
                None,
                |s| s.release(node, token, actor, reason, now),
                |engine, inner, next| engine.grant_within(inner, next, now),
            )
            .await?;
        info!(node = %node, token, reason, "released");
        self.after_release(&mut inner, node, started, handed, now);
        Ok(())
    }

    /// Takes the baton from `node` (audited); returns the released token.
    /// With `expected`, only if that is the node's current token (else
    /// [`LeaseError::StaleToken`] and nothing changes); `None` takes
    /// whatever it holds.
    pub async fn force_release(
        &self,
        node: &NodeName,
        expected: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<u64, EngineError> {
        let started = Instant::now();
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let (token, handed) = self
            .commit_then(
                &mut inner,
                None,
                |s| match expected {
                    Some(token) => s.force_release_token(node, token, actor, reason, now),
                    None => s.force_release(node, actor, reason, now),
                },
                |engine, inner, next| engine.grant_within(inner, next, now),
            )
            .await?;
        warn!(node = %node, token, actor, reason, "force-released by an operator");
        self.after_release(&mut inner, node, started, handed, now);
        Ok(token)
    }

    /// Takes the baton from `node` (audited) only if its holding, as it is
    /// at the moment of the write, still satisfies `still` (e.g. "token 7
    /// and still overdue"): a policy's automatic release never hits a
    /// holder that renewed or was granted again meanwhile. `None` when it
    /// no longer applies.
    pub async fn force_release_if(
        &self,
        node: &NodeName,
        actor: &str,
        reason: &str,
        still: impl FnOnce(&crate::state::Holding, DateTime<Utc>) -> bool,
    ) -> Result<Option<u64>, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        // Judged on the current state: memory whose fence was dropped (a
        // failed save, a new term) is reloaded first, so a holder that
        // renewed through another leader is not taken on what was stale.
        let started = Instant::now();
        let fence = self.ensure_current(&mut inner).await?;
        let applies = inner.state.holders.get(node).is_some_and(|h| still(h, now));
        if !applies {
            return Ok(None);
        }
        let (token, handed) = self
            .commit_then(
                &mut inner,
                Some(&fence),
                |s| s.force_release(node, actor, reason, now),
                |engine, inner, next| engine.grant_within(inner, next, now),
            )
            .await?;
        warn!(node = %node, token, actor, reason, "force-released by policy");
        self.after_release(&mut inner, node, started, handed, now);
        Ok(Some(token))
    }

    /// After a release was saved: tells the waiters granted in the same
    /// write, and wakes the granter for whatever is left (a waiter that
    /// needs preparing first, a guard's fresh answer).
    fn after_release(
        &self,
        inner: &mut Inner,
        node: &NodeName,
        started: Instant,
        handed: Vec<granter::PlannedGrant>,
        now: DateTime<Utc>,
    ) {
        inner.overdue_seen.remove(node);
        self.metrics.releases.inc();
        let handed_on = !handed.is_empty();
        for planned in handed {
            self.deliver(inner, planned, now, Some(started));
        }
        if !handed_on && !inner.queue.is_empty() && inner.handoff_started.is_none() {
            inner.handoff_started = Some(started);
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

    /// Records that `node`'s etcd member `member` (ID `member_id`) goes out
    /// (the etcd guard, before the grant): it stays out for the guard, across
    /// restarts and failovers, until [`Engine::mark_returned`]. Nothing is
    /// written when the same record exists.
    pub async fn mark_returning(
        &self,
        node: &NodeName,
        member: &str,
        member_id: u64,
    ) -> Result<(), EngineError> {
        let mut inner = self.inner.lock().await;
        self.ensure_current(&mut inner).await?;
        // The same member going out again keeps the snapshot recorded for
        // it (see `backup.rs`: a preparation decided again reuses it).
        let record = crate::state::Returning {
            member: member.to_string(),
            member_id,
            control_plane_snapshot: inner
                .state
                .returning
                .get(node)
                .filter(|r| r.member == member && r.member_id == member_id)
                .and_then(|r| r.control_plane_snapshot.clone()),
        };
        if inner.state.returning.get(node) == Some(&record) {
            return Ok(());
        }
        self.commit(&mut inner, |s| {
            s.returning.insert(node.clone(), record);
            Ok(())
        })
        .await?;
        drop(inner);
        self.changed();
        Ok(())
    }

    /// Records that `node` counts as back (its member passed the guard's
    /// rounds). A node that holds the baton now is out, not back (the
    /// guard may have counted its rounds from holders read before a grant
    /// committed): its record stays.
    pub async fn mark_returned(&self, node: &NodeName) -> Result<(), EngineError> {
        let mut inner = self.inner.lock().await;
        self.ensure_current(&mut inner).await?;
        if !inner.state.returning.contains_key(node) || inner.state.holders.contains_key(node) {
            return Ok(());
        }
        self.commit(&mut inner, |s| {
            s.returning.remove(node);
            Ok(())
        })
        .await?;
        drop(inner);
        self.wake.notify_one();
        self.changed();
        Ok(())
    }

    /// Sets the nodes that are down without holding the baton; they count
    /// against the concurrency limit. (The node watch goes through
    /// [`Engine::update_node_facts`], so its facts and this set change
    /// together.)
    pub async fn set_unavailable(&self, nodes: Vec<NodeName>) {
        self.update_node_facts(|| nodes).await;
    }

    /// Changes node facts and the unavailable nodes they imply as one step
    /// for the grant rule: `update` runs under the engine's lock (every
    /// decision and confirmation runs under it too), writes the facts the
    /// guards read and returns the nodes that are down without the baton.
    /// So no decision sees new facts with the old unavailable set: fresh
    /// facts after a stale spell lift the "facts unknown" hold only
    /// together with the outages they report. `update` must not block.
    pub async fn update_node_facts(&self, update: impl FnOnce() -> Vec<NodeName>) {
        let mut inner = self.inner.lock().await;
        let nodes = update();
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

    /// A copy of everything status shows, as this replica's memory holds it
    /// now, unconfirmed: for the coordinator's own tasks (guards, metrics),
    /// never to answer a client (see [`Engine::confirmed_snapshot`]).
    pub async fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().await;
        self.view(&inner)
    }

    /// The audit records numbered after `after` and before `before`, oldest
    /// first, as far as this replica's memory still holds them (the newest
    /// [`crate::state::AUDIT_KEEP`]). For observers: a snapshot carries only
    /// the newest [`SNAPSHOT_AUDIT_TAIL`], so records made between two of
    /// their looks are read here (a failure, a canary's release).
    pub async fn audit_between(&self, after: u64, before: u64) -> Vec<crate::state::AuditEntry> {
        let inner = self.inner.lock().await;
        let state = &inner.state;
        state
            .audit
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let n = state.audit_number(*i);
                n > after && n < before
            })
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// A copy of everything status shows, answered only while this replica
    /// leads and the store confirmed its memory is the latest state.
    pub async fn confirmed_snapshot(&self) -> Result<Snapshot, EngineError> {
        let mut inner = self.inner.lock().await;
        let fence = self.ensure_current(&mut inner).await?;
        match self.confirm(&mut inner, &fence).await {
            Ok(()) => {}
            // The store has moved on from this memory (another writer, or a
            // save whose answer was lost): a read may load the store's
            // state afresh and answer from that, once it is confirmed too.
            Err(EngineError::Store(StoreError::Conflict(_))) => {
                let fence = self.ensure_current(&mut inner).await?;
                self.confirm(&mut inner, &fence).await?;
            }
            Err(e) => return Err(e),
        }
        Ok(self.view(&inner))
    }

    fn view(&self, inner: &Inner) -> Snapshot {
        let now = self.now();
        Snapshot {
            state: {
                let mut state = inner.state.without_audit();
                let skip = inner.state.audit.len().saturating_sub(SNAPSHOT_AUDIT_TAIL);
                state.audit = inner.state.audit.iter().skip(skip).cloned().collect();
                state
            },
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
            window_open: self.policy().windows.check(now).is_ok(),
            leadership: self.leadership.borrow().clone(),
            now,
        }
    }

    /// Ends every waiter's stream and stops granting. Nothing is left to
    /// save: every change was saved before it was answered.
    pub async fn shutdown(&self) {
        let mut inner = self.inner.lock().await;
        inner.shutting_down = true;
        inner.fence = None;
        for q in inner.queue.drain() {
            let _ = q.events.send(Err(EngineError::ShuttingDown));
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
