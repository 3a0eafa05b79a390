//! Where the lease state lives, and who may write it.
//!
//! [`StateStore`] is the one boundary between the engine and durable storage.
//! Implementations: [`file::FileStore`] (embedded, the default: one JSON file
//! under `--data-dir`); [`etcd::EtcdStore`] (`--store etcd`: the state in
//! etcd, leader-elected replicas, every write guarded by the leader's
//! election key); a Kubernetes store plugs in the same way. A store also says who leads: only the leader's engine grants, and a
//! store must refuse a save from a replica that no longer leads.

pub mod etcd;
pub mod file;
pub mod memory;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::state::LeaseState;

/// The version of the persisted document; a newer one is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Who leads the coordinators sharing a store.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Leadership {
    /// True while this replica leads and may grant.
    pub is_leader: bool,
    /// The leader's id, when known.
    pub leader: Option<String>,
    /// Grows with every change of leader, so a stale claim can be told apart.
    pub term: u64,
}

/// Why the store failed. The engine treats every error as "nothing was
/// written": the change is not applied and the caller is told.
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
        "state in {path} is corrupt ({detail}); it was left untouched: restore it from a backup, or move it aside to start empty (that forgets every holder and fencing token)"
    )]
    Corrupt {
        /// Where it is.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Another coordinator process uses the same data directory.
    #[error(
        "data directory {path} is in use by another coordinator (lock held on {path}/lock): stop that one, or give this one its own --data-dir"
    )]
    Locked {
        /// The directory.
        path: String,
    },
    /// This replica does not lead (any more): it must not write.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// A backend-specific failure (etcd, Kubernetes).
    #[error("state store backend: {0}")]
    Backend(String),
}

/// Durable storage of the lease state.
pub trait StateStore: Send + Sync + 'static {
    /// The last saved state, `None` when nothing was ever saved. A state that
    /// cannot be read is [`StoreError::Corrupt`], never silently replaced.
    fn load(&self) -> BoxFuture<'_, Result<Option<LeaseState>, StoreError>>;

    /// Saves `state` atomically: after an error the stored state is the old
    /// one, after success the new one, whatever crashes in between.
    fn save<'a>(&'a self, state: &'a LeaseState) -> BoxFuture<'a, Result<(), StoreError>>;

    /// This replica's leadership, kept current by the store.
    fn leadership(&self) -> watch::Receiver<Leadership>;

    /// A short name for logs and status ("file", "etcd").
    fn kind(&self) -> &'static str;
}

/// The persisted document: the state plus a format version.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Document {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// The lease state.
    pub state: LeaseState,
}

/// Encodes `state` as a [`Document`].
pub fn encode(state: &LeaseState) -> Vec<u8> {
    let doc = serde_json::json!({ "format": FORMAT_VERSION, "state": state });
    serde_json::to_vec(&doc).expect("lease state serializes")
}

/// Decodes a [`Document`] read from `path`.
pub fn decode(path: &str, bytes: &[u8]) -> Result<LeaseState, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_string(),
        detail,
    };
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if doc.format != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} is not {FORMAT_VERSION}, the one this coordinator understands",
            doc.format
        )));
    }
    let state = doc.state;
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
    Ok(state)
}
