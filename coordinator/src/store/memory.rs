//! An in-memory store for tests and embedding: leads from the start, and can
//! be told to fail its next saves (to show that a failed save changes
//! nothing).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Leadership, StateStore, StoreError};
use crate::state::LeaseState;

/// State kept in memory.
#[derive(Debug)]
pub struct MemoryStore {
    saved: Mutex<Option<LeaseState>>,
    fail_saves: AtomicUsize,
    leadership: watch::Sender<Leadership>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(None)
    }
}

impl MemoryStore {
    /// A store holding `initial`, leading.
    pub fn new(initial: Option<LeaseState>) -> Self {
        Self {
            saved: Mutex::new(initial),
            fail_saves: AtomicUsize::new(0),
            leadership: watch::channel(Leadership {
                is_leader: true,
                leader: Some("memory".to_string()),
                term: 1,
            })
            .0,
        }
    }

    /// The last saved state.
    pub fn saved(&self) -> Option<LeaseState> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the next `n` saves fail.
    pub fn fail_next_saves(&self, n: usize) {
        self.fail_saves.store(n, Ordering::SeqCst);
    }

    /// Changes leadership (to test followers and hand-overs).
    pub fn set_leadership(&self, leadership: Leadership) {
        self.leadership.send_replace(leadership);
    }
}

impl StateStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<LeaseState>, StoreError>> {
        Box::pin(async move { Ok(self.saved()) })
    }

    fn save<'a>(&'a self, state: &'a LeaseState) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let failing = self
                .fail_saves
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Backend("injected save failure".to_string()));
            }
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
            Ok(())
        })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
