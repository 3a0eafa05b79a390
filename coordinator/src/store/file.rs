//! The embedded store: one JSON file, `state.json`, under `--data-dir`.
//!
//! Every save writes `state.json.tmp`, fsyncs it, renames it over
//! `state.json` and fsyncs the directory, so after a crash (even `kill -9` or
//! power loss) the file holds either the old or the new state, never a mix.
//! A lock file (`flock`) keeps two coordinators off one directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Leadership, StateStore, StoreError, decode, encode};
use crate::state::LeaseState;

/// The embedded single-file store. The process that opens it leads.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    leadership: watch::Sender<Leadership>,
    /// Held open for the lock's lifetime.
    _lock: File,
}

impl FileStore {
    /// Opens (creating if needed) the data directory and locks it.
    pub fn open(dir: &Path, id: &str) -> Result<Self, StoreError> {
        let io = |path: &Path, source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.display().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path, e)),
        }
        let (leadership, _) = watch::channel(Leadership {
            is_leader: true,
            leader: Some(id.to_string()),
            term: 1,
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            leadership,
            _lock: lock,
        })
    }

    /// The state file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let target = dir.join("state.json");
        let tmp = dir.join("state.json.tmp");
        let io = |path: &Path, source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| io(&tmp, e))?;
        file.sync_all().map_err(|e| io(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        Ok(())
    }
}

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<LeaseState>, StoreError>> {
        Box::pin(async move {
            let path = self.path();
            match fs::read(&path) {
                Ok(bytes) => decode(&path.display().to_string(), &bytes).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::Io {
                    path: path.display().to_string(),
                    source,
                }),
            }
        })
    }

    fn save<'a>(&'a self, state: &'a LeaseState) -> BoxFuture<'a, Result<(), StoreError>> {
        let bytes = encode(state);
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::write_atomically(&dir, &bytes))
                .await
                .map_err(|e| StoreError::Backend(format!("state writer task failed: {e}")))?
        })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::node::NodeName;

    #[tokio::test]
    async fn saves_loads_and_refuses_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "c1").unwrap();
        assert_eq!(store.load().await.unwrap(), None);
        let mut state = LeaseState::default();
        state
            .grant(
                &NodeName::new("n1").unwrap(),
                true,
                false,
                "test",
                Utc::now(),
            )
            .unwrap();
        store.save(&state).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(state.clone()));
        assert!(!dir.path().join("state.json.tmp").exists());

        // A second coordinator on the same directory is refused.
        assert!(matches!(
            FileStore::open(dir.path(), "c2"),
            Err(StoreError::Locked { .. })
        ));

        for garbage in [
            &b"{\"format\":1,\"state\":{"[..],
            b"",
            b"\x00\x01",
            b"{\"format\":7,\"state\":{}}",
        ] {
            fs::write(store.path(), garbage).unwrap();
            let err = store.load().await.unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            assert_eq!(
                fs::read(store.path()).unwrap(),
                garbage,
                "corrupt file must stay untouched"
            );
        }
    }
}
