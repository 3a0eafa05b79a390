//! An in-memory store for tests and the simulation, as strict as the real
//! ones: one [`MemoryBackend`] stands for the shared medium (etcd, the API
//! server, the data directory), and each replica talks to it through its own
//! [`MemoryStore`].
//!
//! What it enforces, like the real stores:
//! - a save or a confirmation succeeds only while this replica leads *in the
//!   fence's term* and the stored revision is the fence's (compare-and-swap);
//! - the document goes through the real encoding (so a state that does not
//!   decode, or is over the byte budget, fails here as it would there);
//! - leadership as a replica sees it ([`StateStore::leadership`]) can lag
//!   behind the truth: [`MemoryBackend::elect_quietly`] and
//!   [`MemoryBackend::depose_quietly`] change the truth without telling, as
//!   a lease that expired while its holder was frozen does.
//!
//! Faults: saves that fail without writing, saves that write but whose
//! answer is lost, failing confirmations and loads, and latency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    Fence, Leadership, Loaded, Numbered, Revision, StateStore, StoreError, attach_audit, decode,
    encode, numbered,
};
use crate::state::{AUDIT_KEEP, AuditEntry, LeaseState};

/// Faults to inject into the next calls (each count is used up one call at a
/// time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Saves that fail without writing.
    pub fail_saves: usize,
    /// Saves that write, then fail (the answer is lost on the way back).
    pub lose_save_answers: usize,
    /// Confirmations that fail (no answer).
    pub fail_confirms: usize,
    /// Loads that fail.
    pub fail_loads: usize,
}

#[derive(Debug, Default)]
struct Truth {
    document: Option<Vec<u8>>,
    /// `document` decoded (for checkers, which read it after every step);
    /// without its audit, which is kept apart.
    decoded: Option<LeaseState>,
    /// The audit, apart from the document, by number: the newest
    /// [`AUDIT_KEEP`] records.
    audit: BTreeMap<u64, AuditEntry>,
    /// Grows with every write and delete (like etcd's revision).
    revision: u64,
    /// The revision of the current document (0 when there is none).
    document_revision: u64,
    leader: Option<String>,
    term: u64,
    faults: Faults,
    latency: Duration,
    budget: Option<usize>,
    views: BTreeMap<String, watch::Sender<Leadership>>,
    oracle: Oracle,
}

/// What every write ever stored, for checkers: which node each token was
/// stored for, and any write that broke the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Oracle {
    /// Token → the node it was first stored for.
    pub tokens: BTreeMap<u64, String>,
    /// The highest `last_token` ever stored.
    pub last_token: u64,
    /// Broken rules, in the order they happened (a token stored for two
    /// nodes, a `last_token` that went back).
    pub violations: Vec<String>,
}

impl Oracle {
    fn record(&mut self, revision: u64, state: &LeaseState) {
        if state.last_token < self.last_token {
            self.violations.push(format!(
                "revision {revision}: last_token went back from {} to {}",
                self.last_token, state.last_token
            ));
        }
        self.last_token = self.last_token.max(state.last_token);
        for (node, holding) in &state.holders {
            let first = self
                .tokens
                .entry(holding.fencing_token)
                .or_insert_with(|| node.to_string());
            if first != node.as_str() {
                self.violations.push(format!(
                    "revision {revision}: token {} stored for {node}, earlier for {first}",
                    holding.fencing_token
                ));
            }
        }
    }
}

impl Truth {
    fn leadership_of(&self, id: &str) -> Leadership {
        Leadership {
            is_leader: self.leader.as_deref() == Some(id),
            leader: self.leader.clone(),
            term: self.term,
        }
    }

    fn publish(&self, id: &str) {
        if let Some(view) = self.views.get(id) {
            let next = self.leadership_of(id);
            view.send_if_modified(|l| {
                let changed = *l != next;
                *l = next;
                changed
            });
        }
    }

    /// Appends `state`'s audit records (the ones its change made) and
    /// forgets those past [`AUDIT_KEEP`].
    fn append_audit(&mut self, state: &LeaseState) {
        for n in numbered(state) {
            self.audit.insert(n.number, n.record);
        }
        let first_kept = (state.audit_seq + 1).saturating_sub(AUDIT_KEEP as u64);
        self.audit = self.audit.split_off(&first_kept);
    }

    /// The stored state with its audit.
    fn with_audit(&self) -> Option<LeaseState> {
        let mut state = self.decoded.clone()?;
        attach_audit(
            &mut state,
            self.audit.iter().map(|(number, record)| Numbered {
                number: *number,
                record: record.clone(),
            }),
        );
        Some(state)
    }

    fn revision(&self) -> Revision {
        match self.document {
            Some(_) => Revision::At(self.document_revision.to_string()),
            None => Revision::Absent,
        }
    }

    /// The fence check shared by save and confirm.
    fn check(&self, id: &str, fence: &Fence) -> Result<(), StoreError> {
        if self.leader.as_deref() != Some(id) {
            return Err(StoreError::NotLeader(format!(
                "replica {id} does not lead (leader: {})",
                self.leader.as_deref().unwrap_or("none")
            )));
        }
        if self.term != fence.term {
            return Err(StoreError::NotLeader(format!(
                "replica {id} leads in term {}, its memory is from term {}",
                self.term, fence.term
            )));
        }
        let current = self.revision();
        if current != fence.revision {
            return Err(StoreError::Conflict(format!(
                "the state is at revision {current}, this replica's memory at {}",
                fence.revision
            )));
        }
        Ok(())
    }
}

/// The shared medium of the replicas of one installation.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    truth: Mutex<Truth>,
}

impl MemoryBackend {
    /// An empty medium: no state, no leader.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn truth(&self) -> std::sync::MutexGuard<'_, Truth> {
        self.truth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A replica's view of this medium.
    pub fn replica(self: &Arc<Self>, id: &str) -> MemoryStore {
        let mut truth = self.truth();
        let view = watch::channel(truth.leadership_of(id)).0;
        truth.views.insert(id.to_string(), view.clone());
        MemoryStore {
            backend: self.clone(),
            id: id.to_string(),
            view,
        }
    }

    /// Makes `id` the leader in a new term and tells every replica. Returns
    /// the term.
    pub fn elect(&self, id: &str) -> u64 {
        let term = self.elect_quietly(id);
        self.publish_all();
        term
    }

    /// Makes `id` the leader in a new term without telling anyone yet.
    pub fn elect_quietly(&self, id: &str) -> u64 {
        let mut truth = self.truth();
        truth.term += 1;
        truth.leader = Some(id.to_string());
        truth.term
    }

    /// Nobody leads any more (the leader's lease expired); tells everyone.
    pub fn depose(&self) {
        self.depose_quietly();
        self.publish_all();
    }

    /// Nobody leads any more, and nobody has noticed yet.
    pub fn depose_quietly(&self) {
        self.truth().leader = None;
    }

    /// Tells replica `id` the truth about leadership.
    pub fn publish(&self, id: &str) {
        self.truth().publish(id);
    }

    /// Tells every replica the truth about leadership.
    pub fn publish_all(&self) {
        let truth = self.truth();
        for id in truth.views.keys() {
            truth.publish(id);
        }
    }

    /// The leader and its term, as they really are.
    pub fn leader(&self) -> (Option<String>, u64) {
        let truth = self.truth();
        (truth.leader.clone(), truth.term)
    }

    /// The stored state with its audit, if any.
    pub fn stored(&self) -> Option<LeaseState> {
        self.truth().with_audit()
    }

    /// Looks at the stored state (without its audit) without copying it.
    pub fn inspect<T>(&self, look: impl FnOnce(Option<&LeaseState>) -> T) -> T {
        look(self.truth().decoded.as_ref())
    }

    /// How many writes (and deletes) the medium took so far, like etcd's
    /// revision: a test counts durable writes with it.
    pub fn writes(&self) -> u64 {
        self.truth().revision
    }

    /// The stored document's size in bytes (0 when there is none).
    pub fn stored_bytes(&self) -> usize {
        self.truth().document.as_ref().map_or(0, Vec::len)
    }

    /// Writes `state` as another writer would (an operator, a restore).
    pub fn put(&self, state: &LeaseState) {
        let mut truth = self.truth();
        truth.revision += 1;
        truth.document_revision = truth.revision;
        truth.document = Some(encode(state));
        truth.decoded = Some(state.without_audit());
        // A restored state brings its audit along.
        truth.audit.clear();
        truth.append_audit(state);
        let revision = truth.revision;
        truth.oracle.record(revision, state);
    }

    /// What every write stored so far.
    pub fn oracle(&self) -> Oracle {
        self.truth().oracle.clone()
    }

    /// Deletes the state (it is lost).
    pub fn delete(&self) {
        let mut truth = self.truth();
        truth.revision += 1;
        truth.document = None;
        truth.decoded = None;
        truth.audit.clear();
        truth.document_revision = 0;
    }

    /// Adds faults to the next calls.
    pub fn inject(&self, faults: Faults) {
        let mut truth = self.truth();
        truth.faults.fail_saves += faults.fail_saves;
        truth.faults.lose_save_answers += faults.lose_save_answers;
        truth.faults.fail_confirms += faults.fail_confirms;
        truth.faults.fail_loads += faults.fail_loads;
    }

    /// Drops every fault not used up yet (the store is healthy again).
    pub fn clear_faults(&self) {
        self.truth().faults = Faults::default();
    }

    /// Every call takes this long (virtual time under a paused clock).
    pub fn set_latency(&self, latency: Duration) {
        self.truth().latency = latency;
    }

    /// Refuses documents larger than `bytes` (as the API server refuses a
    /// ConfigMap over 1 MiB).
    pub fn set_budget(&self, bytes: Option<usize>) {
        self.truth().budget = bytes;
    }

    async fn pause(&self) {
        let latency = self.truth().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
}

fn take(count: &mut usize) -> bool {
    match count.checked_sub(1) {
        Some(left) => {
            *count = left;
            true
        }
        None => false,
    }
}

/// One replica's store over a [`MemoryBackend`].
#[derive(Debug)]
pub struct MemoryStore {
    backend: Arc<MemoryBackend>,
    id: String,
    view: watch::Sender<Leadership>,
}

impl Default for MemoryStore {
    /// A single replica that leads, over an initialized empty state.
    fn default() -> Self {
        Self::new(Some(LeaseState::default()))
    }
}

impl MemoryStore {
    /// A single replica ("memory") that leads (term 1) over `initial` (`None`:
    /// the store holds no state).
    pub fn new(initial: Option<LeaseState>) -> Self {
        let backend = MemoryBackend::new();
        if let Some(state) = &initial {
            backend.put(state);
        }
        let store = backend.replica("memory");
        backend.elect("memory");
        store
    }

    /// The medium this replica talks to.
    pub fn backend(&self) -> &Arc<MemoryBackend> {
        &self.backend
    }

    /// The last saved state.
    pub fn saved(&self) -> Option<LeaseState> {
        self.backend.stored()
    }

    /// Makes the next `n` saves fail (without writing).
    pub fn fail_next_saves(&self, n: usize) {
        self.backend.inject(Faults {
            fail_saves: n,
            ..Faults::default()
        });
    }
}

impl StateStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            self.backend.pause().await;
            let mut truth = self.backend.truth();
            if take(&mut truth.faults.fail_loads) {
                return Err(StoreError::Backend("injected load failure".to_string()));
            }
            let state = match &truth.document {
                Some(d) => {
                    let mut state = decode("memory", d)?;
                    attach_audit(
                        &mut state,
                        truth.audit.iter().map(|(number, record)| Numbered {
                            number: *number,
                            record: record.clone(),
                        }),
                    );
                    Some(state)
                }
                None => None,
            };
            Ok(Loaded {
                state,
                revision: truth.revision(),
            })
        })
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            self.backend.pause().await;
            let mut truth = self.backend.truth();
            if take(&mut truth.faults.fail_saves) {
                return Err(StoreError::Backend("injected save failure".to_string()));
            }
            truth.check(&self.id, fence)?;
            let document = encode(state);
            if let Some(budget) = truth.budget
                && document.len() > budget
            {
                return Err(StoreError::TooLarge {
                    size: document.len(),
                    budget,
                });
            }
            truth.revision += 1;
            truth.document_revision = truth.revision;
            truth.document = Some(document);
            truth.decoded = Some(state.without_audit());
            truth.append_audit(state);
            let revision = truth.revision;
            truth.oracle.record(revision, state);
            if take(&mut truth.faults.lose_save_answers) {
                return Err(StoreError::Backend(
                    "injected: the save happened but its answer was lost".to_string(),
                ));
            }
            Ok(truth.revision())
        })
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.backend.pause().await;
            let mut truth = self.backend.truth();
            if take(&mut truth.faults.fail_confirms) {
                return Err(StoreError::Backend(
                    "injected confirmation failure".to_string(),
                ));
            }
            truth.check(&self.id, fence)
        })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.view.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn location(&self) -> String {
        "the memory store".to_string()
    }
}
