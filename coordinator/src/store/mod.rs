//! Where the lease state lives, and who may write it.
//!
//! [`StateStore`] is the one boundary between the engine and durable storage.
//! Implementations: [`file::FileStore`] (embedded, the default: one JSON file
//! under `--data-dir`, leadership is the directory's lock);
//! [`etcd::EtcdStore`] (`--store etcd`: leader-elected replicas, the state
//! under one key); the Kubernetes store (a ConfigMap, leadership from a
//! Lease); [`memory::MemoryStore`] (tests and the simulation, as strict as
//! the others).
//!
//! The contract every store keeps, and the engine relies on:
//! - a replica's memory is *current* only for a [`Fence`]: the leadership
//!   term it loaded under and the revision of the state document it last
//!   read or wrote;
//! - [`StateStore::save`] is a compare-and-swap: it writes only while this
//!   replica leads in the fence's term **and** the stored revision is still
//!   the fence's, so nothing another leader wrote is ever overwritten;
//! - [`StateStore::confirm`] is the same check without the write, as a
//!   linearizable read: the engine calls it before it answers anything it
//!   did not just write (refusals, reads), so a deposed replica never answers
//!   from stale memory;
//! - a save that fails for any reason may or may not have happened; the
//!   engine then forgets its fence and reloads before it answers again;
//! - the audit lives apart from the state document and is appended to: a
//!   save writes the (small) document and the audit records its change
//!   made, and the store keeps the newest [`AUDIT_KEEP`] records. etcd: one
//!   key per save holding its records, in the save's transaction;
//!   Kubernetes: a second key of the ConfigMap (written whole anyway,
//!   bounded in bytes); embedded: a short tail inside the document, moved
//!   to `audit.jsonl` in batches, appended and fsynced before the document
//!   that drops them is written (a record appended for a save that never
//!   happened is numbered past the stored `audit_seq` and ignored).
//!   A save never rewrites the whole audit. A load reads only the records
//!   that belong to the document (numbered up to its `audit_seq`).
//! - a document of an older [`FORMAT_VERSION`] is read; the audit records a
//!   format-1 document carried inside are moved to the store's audit by the
//!   first save after it, atomically with it (or, in the embedded store,
//!   durably before it). A newer format is refused
//!   ([`StoreError::NewerFormat`]).

pub mod etcd;
pub mod file;
pub mod memory;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::state::{AUDIT_KEEP, AuditEntry, LeaseState};

/// The version of the persisted document; a newer one is refused with
/// [`StoreError::NewerFormat`].
///
/// - 1: the previous release; the audit inside the state (`state.audit`).
/// - 2: the audit kept apart (see the module documentation); `state.audit`
///   is written empty, so that a release that reads only format 1 gets as
///   far as the format check and refuses the document as a newer format,
///   instead of failing on a missing field.
///
/// Every format up to this one is read; records a format-1 document
/// carries are moved to the store's audit by the first save after it.
pub const FORMAT_VERSION: u32 = 2;

/// Who leads the coordinators sharing a store.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Leadership {
    /// True while this replica leads and may grant.
    pub is_leader: bool,
    /// The leader's id, when known.
    pub leader: Option<String>,
    /// Grows with every change of leader, so a stale claim can be told apart.
    /// A replica that leads again after losing leadership leads in a new
    /// term, and reloads the state before it answers anything.
    pub term: u64,
}

/// The version of the state document in its store, opaque to the engine:
/// etcd's mod_revision of the state key, the ConfigMap's resourceVersion,
/// the embedded file's generation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Revision {
    /// No state document exists.
    #[default]
    Absent,
    /// The store's version of the document.
    At(String),
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Revision::Absent => f.write_str("absent"),
            Revision::At(r) => f.write_str(r),
        }
    }
}

/// What the engine's memory is known to match: the leadership term it was
/// loaded in and the revision of the state document it last read or wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The [`Leadership::term`] the state was loaded in.
    pub term: u64,
    /// The state document's revision.
    pub revision: Revision,
}

/// The state as loaded, with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The state; `None` when the store holds none.
    pub state: Option<LeaseState>,
    /// Its revision ([`Revision::Absent`] when there is none).
    pub revision: Revision,
}

/// Why the store failed. After an error from [`StateStore::save`] the write
/// may or may not have happened: the engine reloads before answering again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the medium failed.
    #[error(
        "state store i/o on {path}: {source} (check --data-dir: it must be writable by this user, on a disk with room)"
    )]
    Io {
        /// The file or key.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The stored state cannot be read. It is left in place untouched.
    #[error(
        "state in {path} is corrupt ({detail}); it was left untouched: restore it from a backup (starting empty would forget every holder)"
    )]
    Corrupt {
        /// Where it is.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The stored state was written by a newer Baton, in a format this one
    /// does not know. It is left in place untouched.
    #[error(
        "state in {path} was written by a newer Baton (format {format}; this coordinator reads formats up to {FORMAT_VERSION}); it was left untouched: run the newer release again (a downgrade is only possible to a release that reads format {format}, or by restoring a backup taken before the upgrade)"
    )]
    NewerFormat {
        /// Where it is.
        path: String,
        /// The format it was written in.
        format: u32,
    },
    /// Another coordinator process uses the same data directory.
    #[error(
        "data directory {path} is in use by another coordinator (lock held on {path}/lock): stop that one, or give this one its own --data-dir"
    )]
    Locked {
        /// The directory.
        path: String,
    },
    /// This replica does not lead (any more), or leads in another term than
    /// the one its memory was loaded in: it must not write.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The state changed under this replica (another writer, or a deposed
    /// replica's memory): nothing was written; it reloads before answering.
    #[error("the state changed under this coordinator: {0}")]
    Conflict(String),
    /// The store holds no state although this is not a new installation as
    /// far as anyone said.
    #[error(
        "no lease state in {location}: either this is a new installation, or the state was lost (a deleted ConfigMap, a wrong --data-dir, a new --etcd-prefix, a switched --store). Starting empty would forget every holder and could hand a node down while another is still under maintenance, so the coordinator refuses to run. If the state was lost, restore it (or point the flags back at it); if this is a new installation, start one coordinator once with --initialize"
    )]
    Missing {
        /// Where the state was looked for.
        location: String,
    },
    /// `--initialize` was given but the store already holds state.
    #[error(
        "--initialize was given but {location} already holds lease state (last fencing token {last_token}, {holders} holder(s)): remove --initialize, it is only for a new installation and never replaces existing state"
    )]
    AlreadyInitialized {
        /// Where the state is.
        location: String,
        /// Its last fencing token.
        last_token: u64,
        /// How many nodes hold the baton.
        holders: usize,
    },
    /// The state document would exceed the store's size budget.
    #[error("the state document would be {size} bytes, over the budget of {budget} bytes")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The budget.
        budget: usize,
    },
    /// The etcd key prefix lies among the audit keys of an installation at
    /// a shorter prefix, whose saves delete every key there.
    #[error(
        "--etcd-prefix {prefix} lies under {audit}, where the installation at prefix \"{owner}\" keeps its audit and deletes every other key: choose a prefix without an \"audit\" path component"
    )]
    NestedPrefix {
        /// The refused prefix.
        prefix: String,
        /// The audit key space it lies in.
        audit: String,
        /// The prefix whose audit that is.
        owner: String,
    },
    /// A backend-specific failure (etcd, Kubernetes), or no answer in time.
    #[error("state store backend: {0}")]
    Backend(String),
}

/// Durable storage of the lease state, shared by the replicas of one
/// installation. See the module documentation for the contract.
pub trait StateStore: Send + Sync + 'static {
    /// The latest stored state and its revision, read linearizably (what
    /// any write completed before the call made), with the newest
    /// [`AUDIT_KEEP`] audit records. A state that cannot be read is
    /// [`StoreError::Corrupt`], never silently replaced.
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>>;

    /// Writes `state` atomically if this replica leads in `fence.term` and
    /// the stored revision is `fence.revision` ([`Revision::Absent`]: only if
    /// there is none); returns the new revision. Refused with
    /// [`StoreError::NotLeader`] or [`StoreError::Conflict`] otherwise, and
    /// then nothing was written. Any other error: the outcome is unknown.
    ///
    /// `state.audit` holds the records to append (the ones the saved change
    /// made, numbered up to `state.audit_seq`, see [`numbered`]); they are
    /// written in the same atomic write. A record whose number is already
    /// stored replaces it (a retried save does not double it).
    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>>;

    /// Confirms, with a linearizable read, that this replica leads in
    /// `fence.term` and that the stored revision is still `fence.revision`:
    /// memory loaded under that fence is the latest state right now.
    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>>;

    /// This replica's leadership, kept current by the store. It may lag
    /// behind the truth; [`StateStore::save`] and [`StateStore::confirm`]
    /// never do.
    fn leadership(&self) -> watch::Receiver<Leadership>;

    /// A short name for logs and status ("file", "etcd").
    fn kind(&self) -> &'static str;

    /// Where the state lives, for messages ("etcd key /baton/state").
    fn location(&self) -> String;
}

/// The persisted document: the state plus a format version (and, in the
/// embedded store, a generation that grows with every save).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Document {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// The embedded store's generation (its [`Revision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The lease state (its audit written empty since format 2; a format-1
    /// document's records are read from here).
    pub state: LeaseState,
    /// The embedded store's newest audit records not yet moved to its audit
    /// file (a few: see [`file`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit_tail: Vec<Numbered>,
}

/// Encodes `state` as a [`Document`].
pub fn encode(state: &LeaseState) -> Vec<u8> {
    encode_generation(state, None)
}

/// Encodes `state` as a [`Document`] with a generation.
pub fn encode_generation(state: &LeaseState, generation: Option<u64>) -> Vec<u8> {
    encode_document(state, generation, &[])
}

/// Encodes `state` as a [`Document`] with a generation and an audit tail.
pub fn encode_document(
    state: &LeaseState,
    generation: Option<u64>,
    audit_tail: &[Numbered],
) -> Vec<u8> {
    /// The state with an empty `audit` (see [`FORMAT_VERSION`]).
    #[derive(serde::Serialize)]
    struct StateRef<'a> {
        #[serde(flatten)]
        state: &'a LeaseState,
        audit: &'a [AuditEntry],
    }
    #[derive(serde::Serialize)]
    struct DocumentRef<'a> {
        format: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        state: StateRef<'a>,
        #[serde(skip_serializing_if = "<[Numbered]>::is_empty")]
        audit_tail: &'a [Numbered],
    }
    serde_json::to_vec(&DocumentRef {
        format: FORMAT_VERSION,
        generation,
        state: StateRef { state, audit: &[] },
        audit_tail,
    })
    .expect("lease state serializes")
}

/// Decodes a [`Document`] read from `path`.
pub fn decode(path: &str, bytes: &[u8]) -> Result<LeaseState, StoreError> {
    decode_document(path, bytes).map(|d| d.state)
}

/// Decodes a [`Document`] read from `path`, with its generation.
pub fn decode_document(path: &str, bytes: &[u8]) -> Result<Document, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_string(),
        detail,
    };
    // The format first, alone: a newer document may not have the shape
    // this coordinator knows, and must be refused as newer, not as corrupt.
    #[derive(serde::Deserialize)]
    struct Format {
        format: u32,
    }
    let Format { format } =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("no format version: {e}")))?;
    if format > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_string(),
            format,
        });
    }
    if format == 0 {
        return Err(corrupt("format version 0 was never written".to_string()));
    }
    let mut doc: Document = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    // A document written while the audit was part of it (format 1): its
    // records are the newest ones there are.
    let audited = doc.state.audit.len() as u64;
    if doc.state.audit_seq < audited {
        doc.state.audit_seq = audited;
    }
    let state = &doc.state;
    if let Some((node, h)) = state
        .holders
        .iter()
        .find(|(_, h)| h.fencing_token > state.last_token)
    {
        return Err(corrupt(format!(
            "holder {node} has token {} above the last token {}",
            h.fencing_token, state.last_token
        )));
    }
    Ok(doc)
}

/// An audit record with its number, as stores keep the audit apart from
/// the document.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Numbered {
    /// Its number (the first record ever is 1).
    pub number: u64,
    /// The record.
    #[serde(flatten)]
    pub record: AuditEntry,
}

/// The audit records `state` carries, with their numbers.
pub fn numbered(state: &LeaseState) -> impl Iterator<Item = Numbered> + '_ {
    state.audit.iter().enumerate().map(|(i, record)| Numbered {
        number: state.audit_number(i),
        record: record.clone(),
    })
}

/// Gives a loaded `state` its audit: the newest [`AUDIT_KEEP`] of
/// `records` (in any order; of two with one number, the later wins) that
/// belong to it (numbered up to its `audit_seq`: a record of a save that
/// did not happen is not).
///
/// A document that carries records itself (format 1, written before the
/// audit was kept apart) is authoritative for its range: its records are
/// kept and stored records numbered at or below its newest are ignored.
/// The previous release numbered its records 1..len, so stored records
/// with those numbers (a leftover etcd key or `audit.json` from the time
/// after an upgrade, when this document was put back by a downgrade or a
/// restored backup) are other records, not these.
pub fn attach_audit(state: &mut LeaseState, records: impl IntoIterator<Item = Numbered>) {
    let mut all: std::collections::BTreeMap<u64, AuditEntry> =
        numbered(state).map(|n| (n.number, n.record)).collect();
    let embedded_to = all.last_key_value().map_or(0, |(number, _)| *number);
    for n in records.into_iter().filter(|n| n.number > embedded_to) {
        all.insert(n.number, n.record);
    }
    let newest = state.audit_seq;
    state.audit = all
        .range(newest.saturating_sub(AUDIT_KEEP as u64 - 1)..=newest)
        .map(|(_, record)| record.clone())
        .collect();
    // Numbers are contiguous up to `audit_seq`; a gap (records lost) would
    // misnumber the rest, so only the contiguous newest run is kept.
    let mut expected = newest;
    let mut contiguous = 0;
    for (number, _) in all.range(..=newest).rev() {
        if *number != expected || contiguous == AUDIT_KEEP {
            break;
        }
        contiguous += 1;
        expected = expected.saturating_sub(1);
    }
    while state.audit.len() > contiguous {
        state.audit.pop_front();
    }
    // Records read back are held to the limits they were written under.
    let cut = state
        .audit
        .iter_mut()
        .map(|record| usize::from(record.fit_limits()))
        .sum::<usize>();
    if cut > 0 {
        tracing::warn!(
            records = cut,
            "audit records read back had texts over their limits; cut to them"
        );
    }
}
