//! The embedded store: one JSON file, `state.json`, under `--data-dir`.
//!
//! Every save writes `state.json.tmp`, fsyncs it, renames it over
//! `state.json` and fsyncs the directory, so after a crash (even `kill -9` or
//! power loss) the file holds either the old or the new state, never a mix.
//! A lock file (`flock`) keeps two coordinators off one directory: holding
//! it is this store's leadership (one term, for the life of the process).
//!
//! Every save is a compare-and-swap on the document's `generation`, checked
//! under the lock: the store remembers the generation and the file's
//! identity (device, inode, size, modification time) it last read or wrote,
//! and refuses a save or a confirmation when either differs, so a file
//! replaced or edited behind the coordinator's back (a restored backup) is
//! re-read, never overwritten.
//!
//! The audit is kept apart: the document carries only its newest records
//! (at most [`AUDIT_TAIL`]), and a save that would carry more first appends
//! them to `audit.jsonl` (fsynced, before the document that drops them is
//! written), so a save writes a small document, never the whole audit. A
//! record appended for a save that then failed has a number above the
//! stored `audit_seq` and is ignored when loading (a later record with that
//! number replaces it); the file is rewritten once it holds twice
//! [`AUDIT_KEEP`] records, keeping the newest `AUDIT_KEEP` of the document
//! on disk and the records the save adds past them, so that the stored
//! document's whole window survives when the save's own document write
//! then fails. A document of the previous release (format 1) carries its
//! audit inside: those records count as the document's tail when it is
//! read, so the first save keeps them in its document or moves them to
//! `audit.jsonl` before writing a document without them.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, watch};

use super::{
    Fence, Leadership, Loaded, Numbered, Revision, StateStore, StoreError, attach_audit,
    decode_document, encode_document, numbered,
};
use crate::state::{AUDIT_KEEP, LeaseState};

/// The most audit records the document carries before they are moved to
/// `audit.jsonl` (one extra fsync per this many records).
pub const AUDIT_TAIL: usize = 32;

/// The one leadership term of a file store (the lock is held for the life
/// of the process).
const TERM: u64 = 1;

/// What identifies one version of the state file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// What this store last read or wrote: `None` for "no file".
type Known = Option<Option<(u64, Identity)>>;

/// The audit as last read or written.
#[derive(Clone, Debug, Default)]
struct AuditKnown {
    /// The records the document carries (its tail; after an upgrade, the
    /// ones the previous release embedded too, until a save moves them).
    tail: Vec<Numbered>,
    /// How many lines `audit.jsonl` has.
    lines: usize,
    /// The stored document's `audit_seq`: the newest record that is
    /// certainly kept, whatever a save in flight does.
    stored_seq: u64,
}

/// The embedded single-file store. The process that opens it leads.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    leadership: watch::Sender<Leadership>,
    /// The generation and identity last read or written (outer `None`:
    /// nothing read yet). Shared with the blocking task of a save, which
    /// holds it until the write has ended (see [`FileStore::save`]).
    known: Arc<Mutex<Known>>,
    /// What this store knows of the audit (only touched under `known`'s
    /// lock, by a save's blocking task too).
    audit: Arc<std::sync::Mutex<AuditKnown>>,
    /// Held open for the lock's lifetime; a save's writing task holds a
    /// clone, so the lock outlives the store while a write is running.
    lock: Arc<File>,
}

/// `records` as JSON lines.
fn json_lines(records: &[Numbered]) -> Vec<u8> {
    let mut text = Vec::new();
    for record in records {
        serde_json::to_writer(&mut text, record).expect("audit records serialize");
        text.push(b'\n');
    }
    text
}

fn io(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileStore {
    /// Opens (creating if needed) the data directory and locks it.
    pub fn open(dir: &Path, id: &str) -> Result<Self, StoreError> {
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
            term: TERM,
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            leadership,
            known: Arc::new(Mutex::new(None)),
            audit: Arc::new(std::sync::Mutex::new(AuditKnown::default())),
            lock: Arc::new(lock),
        })
    }

    /// The state file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The audit file's path.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// The records of `audit.jsonl` in file order (a later line with the
    /// same number wins). Lines that do not parse, as UTF-8 or as a record
    /// (the torn end of an append a crash interrupted, which may cut a
    /// character in two), are skipped: the audit is a record, the document
    /// is what must never be misread.
    fn read_audit(path: &Path) -> Result<Vec<Numbered>, StoreError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(path, e)),
        };
        let mut records = Vec::new();
        for line in bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
        {
            match serde_json::from_slice::<Numbered>(line) {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable audit line")
                }
            }
        }
        Ok(records)
    }

    /// Appends `records` to `audit.jsonl` and fsyncs it; when the file
    /// would hold more than twice [`AUDIT_KEEP`] lines, rewrites it (atomic)
    /// with the records numbered up to `newest` that either document may
    /// need: the newest `AUDIT_KEEP` up to `stored` (the document on disk,
    /// read again if the save that wrote this fails) and those above it
    /// (the new document's). Returns its line count.
    fn append_audit(
        dir: &Path,
        records: &[Numbered],
        lines: usize,
        stored: u64,
        newest: u64,
    ) -> Result<usize, StoreError> {
        let path = dir.join("audit.jsonl");
        let text = json_lines(records);
        if lines + records.len() > 2 * AUDIT_KEEP {
            // A later line with the same number wins, as when loading.
            let kept: std::collections::BTreeMap<u64, Numbered> = Self::read_audit(&path)?
                .into_iter()
                .chain(records.iter().cloned())
                .map(|n| (n.number, n))
                .collect();
            // Keeping only the newest AUDIT_KEEP up to `newest` would lose
            // the oldest of the stored document's window when this save's
            // document write then fails (red-team F1).
            let first = stored.saturating_sub(AUDIT_KEEP as u64) + 1;
            let kept: Vec<Numbered> = kept
                .into_values()
                .filter(|n| (first..=newest).contains(&n.number))
                .collect();
            let text = json_lines(&kept);
            let tmp = dir.join("audit.jsonl.tmp");
            let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
            file.write_all(&text).map_err(|e| io(&tmp, e))?;
            file.sync_all().map_err(|e| io(&tmp, e))?;
            drop(file);
            fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, e))?;
            return Ok(kept.len());
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        // A torn line left by a crash ends without a newline: start afresh.
        let len = file.metadata().map_err(|e| io(&path, e))?.len();
        let torn = len > 0 && {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            let mut reader = File::open(&path).map_err(|e| io(&path, e))?;
            reader
                .seek(SeekFrom::End(-1))
                .and_then(|_| reader.read_exact(&mut last))
                .map_err(|e| io(&path, e))?;
            last[0] != b'\n'
        };
        if torn {
            file.write_all(b"\n").map_err(|e| io(&path, e))?;
        }
        file.write_all(&text).map_err(|e| io(&path, e))?;
        file.sync_data().map_err(|e| io(&path, e))?;
        if lines == 0 {
            // A new file: its directory entry must be durable too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, e))?;
        }
        Ok(lines + records.len())
    }

    /// The file's identity now (`None`: there is no file).
    fn identity_now(&self) -> Result<Option<Identity>, StoreError> {
        let path = self.path();
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(Identity::of(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Checks `fence` against what this store last read or wrote and the
    /// file on disk now; returns the current generation (`None`: no file).
    fn check(&self, known: &Known, fence: &Fence) -> Result<Option<u64>, StoreError> {
        if fence.term != TERM {
            return Err(StoreError::NotLeader(format!(
                "the embedded store has one term ({TERM}), not {}",
                fence.term
            )));
        }
        let Some(known) = known else {
            return Err(StoreError::Conflict(
                "the state file was not read yet".to_string(),
            ));
        };
        let revision = match known {
            Some((generation, _)) => Revision::At(generation.to_string()),
            None => Revision::Absent,
        };
        if revision != fence.revision {
            return Err(StoreError::Conflict(format!(
                "{} is at generation {revision}, this coordinator's memory at {}",
                self.path().display(),
                fence.revision
            )));
        }
        let on_disk = self.identity_now()?;
        if on_disk != known.map(|(_, identity)| identity) {
            return Err(StoreError::Conflict(format!(
                "{} was changed by something other than this coordinator",
                self.path().display()
            )));
        }
        Ok(known.map(|(generation, _)| generation))
    }

    fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<Identity, StoreError> {
        let target = dir.join("state.json");
        let tmp = dir.join("state.json.tmp");
        let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| io(&tmp, e))?;
        file.sync_all().map_err(|e| io(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        let meta = fs::metadata(&target).map_err(|e| io(&target, e))?;
        Ok(Identity::of(&meta))
    }
}

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            let path = self.path();
            let mut known = self.known.lock().await;
            let before = self.identity_now()?;
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    *known = Some(None);
                    return Ok(Loaded {
                        state: None,
                        revision: Revision::Absent,
                    });
                }
                Err(source) => return Err(io(&path, source)),
            };
            let doc = decode_document(&path.display().to_string(), &bytes)?;
            let generation = doc.generation.unwrap_or(0);
            // Only this process writes while it holds the lock; an identity
            // that moved during the read means someone else did: read again.
            let after = self.identity_now()?;
            if before != after {
                return Err(StoreError::Conflict(format!(
                    "{} changed while it was read",
                    path.display()
                )));
            }
            if known.is_none() {
                // The last write's outcome is unknown (it failed after its
                // rename, say at the directory's fsync) or nothing was read
                // yet: what was read may sit in the page cache only. Make it
                // durable before anything is answered from it, or a power
                // loss could bring back the older file after a grant from
                // this one went out.
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(&path, e))?;
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io(&self.dir, e))?;
            }
            let mut state = doc.state;
            let mut records = Self::read_audit(&self.audit_path())?;
            let lines = records.len();
            // A document of the previous release carries its audit inside
            // (format 1): those records count as the document's tail, so
            // the next save keeps them in the document or moves them to the
            // audit file before the document that drops them is written.
            let mut tail: Vec<Numbered> = numbered(&state).collect();
            tail.extend(doc.audit_tail);
            records.extend(tail.iter().cloned());
            let stored_seq = state.audit_seq;
            attach_audit(&mut state, records);
            *self.audit.lock().unwrap_or_else(|e| e.into_inner()) = AuditKnown {
                tail,
                lines,
                stored_seq,
            };
            *known = after.map(|identity| Some((generation, identity)));
            Ok(Loaded {
                state: Some(state),
                revision: Revision::At(generation.to_string()),
            })
        })
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            // The lock is held across the write: one save at a time, and the
            // check and the write cannot interleave with another call.
            let mut known = self.known.clone().lock_owned().await;
            let current = self.check(&known, fence)?;
            let generation = current.map_or(1, |g| g + 1);
            // The document's tail with this save's records (by number).
            let AuditKnown {
                tail,
                lines,
                stored_seq,
            } = self.audit.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut by_number: std::collections::BTreeMap<u64, Numbered> = tail
                .into_iter()
                .chain(numbered(state))
                .filter(|n| n.number <= state.audit_seq)
                .map(|n| (n.number, n))
                .collect();
            let mut tail: Vec<Numbered> = std::mem::take(&mut by_number).into_values().collect();
            let flush = tail.len() > AUDIT_TAIL;
            let moved = if flush {
                std::mem::take(&mut tail)
            } else {
                Vec::new()
            };
            let bytes = encode_document(state, Some(generation), &tail);
            let newest = state.audit_seq;
            let dir = self.dir.clone();
            let audit = self.audit.clone();
            let directory_lock = self.lock.clone();
            // The write and the bookkeeping after it run in one blocking task
            // that owns the lock. A caller that stops waiting (a timeout, a
            // client that hung up) cannot cut it short: until the write has
            // ended nothing else reads, confirms or saves, so a write that
            // lands late can never land after a newer one, and what this
            // store remembers is always what is on disk. The task also holds
            // the directory's flock: a coordinator stopping while its write
            // runs keeps the next one out of the directory until it ends.
            let write = tokio::task::spawn_blocking(move || {
                let _directory_lock = directory_lock;
                // Forgotten until the write is known to have ended (so a
                // panic in it leaves the files to be read again).
                *known = None;
                // The records leave the document only once they are durable
                // in the audit file.
                let written = if moved.is_empty() {
                    Ok(lines)
                } else {
                    Self::append_audit(&dir, &moved, lines, stored_seq, newest)
                }
                .and_then(|lines| {
                    Self::write_atomically(&dir, &bytes).map(|identity| (identity, lines))
                });
                match written {
                    Ok((identity, lines)) => {
                        *audit.lock().unwrap_or_else(|e| e.into_inner()) = AuditKnown {
                            tail,
                            lines,
                            stored_seq: newest,
                        };
                        *known = Some(Some((generation, identity)));
                        Ok(Revision::At(generation.to_string()))
                    }
                    Err(e) => {
                        // The files may or may not have changed: forget them
                        // until they are read again.
                        *known = None;
                        Err(e)
                    }
                }
            });
            write
                .await
                .map_err(|e| StoreError::Backend(format!("state writer task failed: {e}")))?
        })
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let known = self.known.lock().await;
            self.check(&known, fence).map(|_| ())
        })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn location(&self) -> String {
        format!("the embedded store's file {}", self.path().display())
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::node::NodeName;

    /// A store of replica "c1" on a new directory, its (empty) state read.
    async fn opened() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "c1").unwrap();
        store.load().await.unwrap();
        (dir, store)
    }

    fn fence(revision: Revision) -> Fence {
        Fence {
            term: TERM,
            revision,
        }
    }

    fn granted(node: &str) -> LeaseState {
        let mut state = LeaseState::default();
        state
            .grant(
                &NodeName::new(node).unwrap(),
                true,
                false,
                "test",
                Utc::now(),
            )
            .unwrap();
        state
    }

    #[tokio::test]
    async fn saves_loads_and_refuses_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "c1").unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.state, None);
        assert_eq!(loaded.revision, Revision::Absent);
        let state = granted("n1");
        let revision = store.save(&state, &fence(Revision::Absent)).await.unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.state, Some(state.clone()));
        assert_eq!(loaded.revision, revision);
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
            b"{\"format\":2,\"state\":{\"holders\":7}}",
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

    #[tokio::test]
    async fn saves_are_compare_and_swap_on_the_generation_and_the_file() {
        let (_dir, store) = opened().await;
        let first = store
            .save(&granted("n1"), &fence(Revision::Absent))
            .await
            .unwrap();
        // A save from memory that predates the last write is refused.
        let stale = store.save(&granted("n2"), &fence(Revision::Absent)).await;
        assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
        store.confirm(&fence(first.clone())).await.unwrap();
        let wrong_term = Fence {
            term: 7,
            revision: first.clone(),
        };
        assert!(matches!(
            store.confirm(&wrong_term).await,
            Err(StoreError::NotLeader(_))
        ));

        // Someone restores an older file behind the coordinator's back: the
        // next save and confirmation are refused until the file is re-read.
        let restored = crate::store::encode_generation(&LeaseState::default(), Some(1));
        fs::write(store.path().with_extension("restore"), &restored).unwrap();
        fs::rename(store.path().with_extension("restore"), store.path()).unwrap();
        assert!(matches!(
            store.confirm(&fence(first.clone())).await,
            Err(StoreError::Conflict(_))
        ));
        let refused = store.save(&granted("n3"), &fence(first.clone())).await;
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
        assert_eq!(
            fs::read(store.path()).unwrap(),
            restored,
            "nothing was overwritten"
        );
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.state, Some(LeaseState::default()));
        store
            .save(&granted("n3"), &fence(loaded.revision))
            .await
            .unwrap();
    }

    /// A save whose caller stops waiting mid-write (a timeout, a client
    /// that hung up) still completes, and the store still knows the file it
    /// wrote: the next confirmation of the new generation succeeds and a
    /// save from the older one is refused. Before, the store forgot the file
    /// ("not read yet") and a late write could land after a newer save.
    #[tokio::test]
    async fn a_save_whose_caller_stops_waiting_completes_and_stays_known() {
        let (_dir, store) = opened().await;
        let first = store
            .save(&granted("n1"), &fence(Revision::Absent))
            .await
            .unwrap();
        let second = granted("n2");
        let from_first = fence(first.clone());
        {
            let mut save = store.save(&second, &from_first);
            // One poll starts the write; then the caller goes away.
            let polled = futures::poll!(&mut save);
            drop(save);
            if polled.is_ready() {
                eprintln!("the write finished within one poll; nothing was cut off");
            }
        }
        let next = Revision::At("2".to_string());
        store.confirm(&fence(next.clone())).await.unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.state, Some(second));
        assert_eq!(loaded.revision, next);
        let stale = store.save(&granted("n3"), &fence(first)).await;
        assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    }

    /// Applies `change` the way the engine does: to a copy without the
    /// audit, saved, then taken as the current state.
    async fn step(
        store: &FileStore,
        current: &mut LeaseState,
        revision: &mut Revision,
        change: impl FnOnce(&mut LeaseState),
    ) {
        let mut next = current.without_audit();
        change(&mut next);
        *revision = store.save(&next, &fence(revision.clone())).await.unwrap();
        current.advance_to(next);
    }

    /// One pause and resume: two audit records.
    fn pause_resume(state: &mut LeaseState) {
        state.pause("op", "test", Utc::now());
        state.resume("op", Utc::now());
    }

    /// A store whose document's audit tail is full: its next save moves
    /// the tail to `audit.jsonl`. Returns the directory, the store, the
    /// state saved and its revision.
    async fn tail_full() -> (tempfile::TempDir, FileStore, LeaseState, Revision) {
        let (dir, store) = opened().await;
        let (mut current, mut revision) = (LeaseState::default(), Revision::Absent);
        for _ in 0..AUDIT_TAIL / 2 {
            step(&store, &mut current, &mut revision, pause_resume).await;
        }
        (dir, store, current, revision)
    }

    /// Stands for a crash: the store goes away and `state.json` is put back
    /// as it was (an atomic write that never happened), `audit.jsonl` kept.
    fn crash_with_document(store: FileStore, document: &[u8]) -> FileStore {
        let dir = store.dir.clone();
        drop(store);
        let tmp = dir.join("state.json.restore");
        fs::write(&tmp, document).unwrap();
        fs::rename(&tmp, dir.join("state.json")).unwrap();
        FileStore::open(&dir, "c1").unwrap()
    }

    /// Hostile: the coordinator dies after a save appended its audit
    /// records to `audit.jsonl` and before the document that moves them
    /// there was written (and, for good measure, in the middle of a later
    /// append, leaving a torn line). What was answered (every save that
    /// completed) keeps every record; the save that never happened leaves
    /// no record behind, although its grant's record is in the audit file;
    /// the grant made instead, with the same number and fencing token, is
    /// recorded once.
    #[tokio::test]
    async fn a_crash_between_the_audit_append_and_the_document_loses_and_doubles_nothing() {
        let (dir, store, mut current, mut revision) = tail_full().await;
        assert!(!store.audit_path().exists());
        let before = fs::read(store.path()).unwrap();

        // The save that dies half-way: its records reach the audit file...
        let mut ghost = current.without_audit();
        let ghost_token = ghost
            .grant(
                &NodeName::new("ghost").unwrap(),
                false,
                false,
                "t",
                Utc::now(),
            )
            .unwrap();
        store.save(&ghost, &fence(revision.clone())).await.unwrap();
        let audit = fs::read_to_string(store.audit_path()).unwrap();
        assert!(audit.contains("\"ghost\""), "{audit}");
        // ...the document never changes.
        let store = crash_with_document(store, &before);
        let loaded = store.load().await.unwrap();
        assert_eq!(
            loaded.state.as_ref(),
            Some(&current),
            "what was answered, exactly"
        );
        revision = loaded.revision;

        // Another node gets the grant instead, with the ghost's number and
        // token; then a crash tears an append.
        step(&store, &mut current, &mut revision, |s| {
            let token = s
                .grant(
                    &NodeName::new("real").unwrap(),
                    false,
                    false,
                    "t",
                    Utc::now(),
                )
                .unwrap();
            assert_eq!(token, ghost_token);
        })
        .await;
        let mut file = OpenOptions::new()
            .append(true)
            .open(store.audit_path())
            .unwrap();
        file.write_all(br#"{"number":9999,"time":"#).unwrap();
        drop(file);
        // More saves move the real grant's record to the audit file too,
        // after the ghost's and the torn line.
        for _ in 0..AUDIT_TAIL {
            step(&store, &mut current, &mut revision, pause_resume).await;
        }
        let audit = fs::read_to_string(store.audit_path()).unwrap();
        assert!(audit.contains("\"real\"") && audit.contains("\"ghost\""));

        let store = crash_with_document(store, &fs::read(dir.path().join("state.json")).unwrap());
        let loaded = store.load().await.unwrap().state.unwrap();
        assert_eq!(loaded, current);
        let grants: Vec<_> = loaded
            .audit
            .iter()
            .filter(|r| r.action == "grant")
            .collect();
        assert_eq!(grants.len(), 1, "{grants:?}");
        assert_eq!(
            (grants[0].node.as_str(), grants[0].fencing_token),
            ("real", ghost_token)
        );
        assert_eq!(loaded.audit.len() as u64, loaded.audit_seq);
    }

    /// Hostile: when the audit file cannot be written, the save that would
    /// move records there fails and the document is untouched (the records
    /// never leave the document before they are durable elsewhere).
    #[tokio::test]
    async fn a_save_whose_audit_append_fails_writes_nothing() {
        let (_dir, store, current, revision) = tail_full().await;
        let before = fs::read(store.path()).unwrap();
        // A directory where the audit file goes: appending fails.
        fs::create_dir(store.audit_path()).unwrap();
        let mut next = current.without_audit();
        pause_resume(&mut next);
        let failed = store.save(&next, &fence(revision.clone())).await;
        assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        assert_eq!(fs::read(store.path()).unwrap(), before);
        fs::remove_dir(store.audit_path()).unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.state, Some(current));
    }

    /// The audit file stays bounded: once it holds twice [`AUDIT_KEEP`]
    /// records it is rewritten with the newest; the document stays small
    /// however many records were made.
    #[tokio::test]
    async fn the_audit_file_and_the_document_stay_bounded() {
        let (dir, store) = opened().await;
        let (mut current, mut revision) = (LeaseState::default(), Revision::Absent);
        let mut largest_document = 0;
        let saves = 3 * AUDIT_KEEP / 40;
        for _ in 0..saves {
            step(&store, &mut current, &mut revision, |s| {
                (0..20).for_each(|_| pause_resume(s))
            })
            .await;
            largest_document = largest_document.max(fs::metadata(store.path()).unwrap().len());
            let lines = fs::read_to_string(store.audit_path())
                .unwrap()
                .lines()
                .count();
            assert!(lines <= 2 * AUDIT_KEEP, "{lines} lines");
        }
        assert_eq!(current.audit_seq, saves as u64 * 40);
        // The tail at most: a few KiB, not the audit.
        assert!(largest_document < 16 * 1024, "{largest_document} bytes");
        drop(store);
        let store = FileStore::open(dir.path(), "c1").unwrap();
        let loaded = store.load().await.unwrap().state.unwrap();
        assert_eq!(loaded.audit.len(), AUDIT_KEEP);
        assert_eq!(loaded, current);
    }

    /// A coordinator that stops while its save is still writing keeps the
    /// directory locked until the write has ended: the next one to open it
    /// never finds a write of another process still running.
    #[tokio::test]
    async fn the_directory_stays_locked_until_a_running_write_ends() {
        for round in 0..30 {
            let (dir, store) = opened().await;
            let state = granted("n1");
            let absent = fence(Revision::Absent);
            let mut save = store.save(&state, &absent);
            let _ = futures::poll!(&mut save);
            drop(save);
            drop(store);
            loop {
                match FileStore::open(dir.path(), "c2") {
                    Ok(next) => {
                        assert!(
                            !dir.path().join("state.json.tmp").exists(),
                            "round {round}: opened while the first store's write was running"
                        );
                        let loaded = next.load().await.unwrap();
                        assert_eq!(loaded.state, Some(state), "round {round}");
                        break;
                    }
                    Err(StoreError::Locked { .. }) => tokio::task::yield_now().await,
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
        }
    }

    /// The files of the store's directory that a crash can leave in any
    /// state: each one's content, `None` when it does not exist.
    type Files = Vec<(&'static str, Option<Vec<u8>>)>;

    const CRASH_FILES: [&str; 4] = [
        "state.json",
        "state.json.tmp",
        "audit.jsonl",
        "audit.jsonl.tmp",
    ];

    fn files(dir: &Path) -> Files {
        CRASH_FILES
            .iter()
            .map(|name| (*name, fs::read(dir.join(name)).ok()))
            .collect()
    }

    /// Stands for a crash: the store goes away and the files are put back
    /// as `files` says; the directory is opened again.
    fn crash_leaving(store: FileStore, files: &Files) -> FileStore {
        let dir = store.dir.clone();
        drop(store);
        for (name, content) in files {
            let path = dir.join(name);
            match content {
                Some(bytes) => fs::write(&path, bytes).unwrap(),
                None => match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{}: {e}", path.display()),
                },
            }
        }
        FileStore::open(&dir, "c1").unwrap()
    }

    /// A store whose `audit.jsonl` is full: its next save that moves the
    /// tail there rewrites the file with the newest records.
    async fn audit_file_full() -> (tempfile::TempDir, FileStore, LeaseState, Revision) {
        let (dir, store) = opened().await;
        let (mut current, mut revision) = (LeaseState::default(), Revision::Absent);
        // 40 records a save: each save moves its records to the file.
        while current.audit_seq + 40 <= 2 * AUDIT_KEEP as u64 {
            step(&store, &mut current, &mut revision, |s| {
                (0..20).for_each(|_| pause_resume(s))
            })
            .await;
        }
        (dir, store, current, revision)
    }

    fn lines_of(path: &Path) -> usize {
        fs::read_to_string(path).unwrap().lines().count()
    }

    /// A grant of `node` and a pause and resume: three records.
    fn grant_and_pause(node: &'static str) -> impl FnOnce(&mut LeaseState) {
        move |s| {
            s.grant(&NodeName::new(node).unwrap(), false, false, "t", Utc::now())
                .unwrap();
            (0..20).for_each(|_| pause_resume(s));
        }
    }

    /// Hostile (red-team F1): the save that rewrites the full
    /// `audit.jsonl` stops at each of its writes (the new audit file
    /// written but not renamed; renamed, the document not written; the
    /// document's temporary file written but not renamed; both renamed), or
    /// its document write fails. Whatever the crash left, the state read
    /// back is the one last answered with its whole window of
    /// [`AUDIT_KEEP`] records, in order, none lost or doubled; a different
    /// change made instead (same numbers) is recorded once, not mixed with
    /// the lost save's records. Before the fix the rewrite kept the newest
    /// records up to the *unsaved* document's number, and the oldest of the
    /// stored window were gone once the document write did not happen.
    #[tokio::test]
    async fn a_crash_at_any_write_of_an_audit_rewrite_loses_and_doubles_nothing() {
        for point in [
            "audit tmp",
            "audit renamed",
            "document tmp",
            "done",
            "fails",
        ] {
            let (dir, store, current, revision) = audit_file_full().await;
            let lines = lines_of(&store.audit_path());
            assert_eq!(lines, 2 * AUDIT_KEEP, "{point}: the rewrite is next");
            let before = files(dir.path());
            let mut ghost = current.without_audit();
            grant_and_pause("ghost")(&mut ghost);
            let mut answered = current.clone();
            let store = if point == "fails" {
                // The document cannot be written: its temporary file's
                // place is taken.
                fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
                let failed = store.save(&ghost, &fence(revision.clone())).await;
                assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
                fs::remove_dir(dir.path().join("state.json.tmp")).unwrap();
                store
            } else {
                store.save(&ghost, &fence(revision.clone())).await.unwrap();
                let after = files(dir.path());
                let new = |name: &str| after.iter().find(|f| f.0 == name).unwrap().1.clone();
                let old = |name: &str| before.iter().find(|f| f.0 == name).unwrap().1.clone();
                assert!(
                    lines_of(&store.audit_path()) < lines,
                    "{point}: the save rewrote the audit file"
                );
                let left: Files = match point {
                    "audit tmp" => vec![
                        ("state.json", old("state.json")),
                        ("audit.jsonl", old("audit.jsonl")),
                        ("audit.jsonl.tmp", new("audit.jsonl")),
                    ],
                    "audit renamed" => vec![
                        ("state.json", old("state.json")),
                        ("audit.jsonl", new("audit.jsonl")),
                    ],
                    "document tmp" => vec![
                        ("state.json", old("state.json")),
                        ("state.json.tmp", new("state.json")),
                        ("audit.jsonl", new("audit.jsonl")),
                    ],
                    _ => {
                        answered.advance_to(ghost.clone());
                        after.clone()
                    }
                };
                crash_leaving(store, &left)
            };
            let loaded = store.load().await.unwrap();
            let mut read = loaded.state.unwrap();
            assert_eq!(read.audit.len(), AUDIT_KEEP, "{point}: the window is whole");
            assert_eq!(read, answered, "{point}: what was answered, exactly");
            let mut revision = loaded.revision;
            if point == "done" {
                continue;
            }
            // A different change gets the lost save's numbers; a restart
            // reads it once, and none of the lost save's records.
            step(&store, &mut read, &mut revision, grant_and_pause("real")).await;
            let store = crash_leaving(store, &files(dir.path()));
            let read_again = store.load().await.unwrap().state.unwrap();
            assert_eq!(read_again, read, "{point}");
            assert!(
                read_again.audit.iter().all(|r| r.node != "ghost"),
                "{point}: a record of the save that never happened"
            );
            assert_eq!(read_again.audit.len(), AUDIT_KEEP, "{point}");
        }
    }

    /// A document as the previous release wrote it: format 1, the audit
    /// inside the state (a grant, the release of that node, the next grant).
    pub(crate) const PREVIOUS_RELEASE: &str = include_str!("testdata/previous-release.json");

    /// Hostile (red-team F2): an upgrade from the previous release, whose
    /// document embedded the audit. The first save after it (and any crash
    /// while it moves the records) must not drop them: the health gate
    /// reads the last release from the audit, and a release made just
    /// before the upgrade must still hold the next grant after a restart.
    /// Before the fix the first save wrote a document without them and the
    /// restarted coordinator had forgotten the release.
    #[tokio::test]
    async fn an_upgrade_keeps_the_audit_the_previous_release_embedded() {
        use crate::rollout::gate::last_release;
        let released = "2026-11-20T10:04:00Z".parse().unwrap();
        // 3 embedded records (they stay in the document's tail) and 43
        // (the first save moves them to the audit file, and a crash stops it
        // half-way).
        for extra in [0, 40] {
            let dir = tempfile::tempdir().unwrap();
            let mut document: serde_json::Value = serde_json::from_str(PREVIOUS_RELEASE).unwrap();
            let audit = document["state"]["audit"].as_array_mut().unwrap();
            for i in 0..extra {
                let mut later = audit[2].clone();
                later["action"] = serde_json::json!(if i % 2 == 0 { "pause" } else { "resume" });
                later["node"] = serde_json::json!("");
                audit.push(later);
            }
            let document = serde_json::to_vec(&document).unwrap();
            fs::write(dir.path().join("state.json"), &document).unwrap();
            let store = FileStore::open(dir.path(), "c1").unwrap();
            let loaded = store.load().await.unwrap();
            let mut current = loaded.state.unwrap();
            let mut revision = loaded.revision;
            assert_eq!(current.audit.len(), 3 + extra);
            assert_eq!(current.audit_seq, 3 + extra as u64);
            assert_eq!(last_release(&current), Some(released));
            let upgraded = current.clone();

            let store = if extra > 0 {
                // The first save dies after moving the records, before its
                // document: the previous release's document is read again.
                let mut next = current.without_audit();
                next.pause("op", "t", Utc::now());
                store.save(&next, &fence(revision.clone())).await.unwrap();
                let store = crash_with_document(store, &document);
                let loaded = store.load().await.unwrap();
                assert_eq!(loaded.state.as_ref(), Some(&upgraded), "extra {extra}");
                revision = loaded.revision;
                store
            } else {
                store
            };
            check_upgrade(store, &mut current, &mut revision, extra, released).await;
        }
    }

    /// The first saves after the upgrade, then a restart: every record the
    /// previous release wrote is still read, before the new ones.
    async fn check_upgrade(
        store: FileStore,
        current: &mut LeaseState,
        revision: &mut Revision,
        extra: usize,
        released: chrono::DateTime<Utc>,
    ) {
        use crate::rollout::gate::last_release;
        let n2 = NodeName::new("n2").unwrap();
        step(&store, current, revision, |s| {
            s.renew(&n2, 2, Utc::now()).unwrap()
        })
        .await;
        step(&store, current, revision, |s| {
            s.pause("op", "t", Utc::now());
        })
        .await;
        let left = files(&store.dir);
        let store = crash_leaving(store, &left);
        let read = store.load().await.unwrap().state.unwrap();
        assert_eq!(&read, current, "extra {extra}");
        assert_eq!(read.audit.len(), 4 + extra, "extra {extra}");
        assert_eq!(last_release(&read), Some(released), "extra {extra}");
        assert_eq!(read.audit[0].action, "grant");
        // The next writes carry no embedded audit any more.
        let document = fs::read_to_string(store.path()).unwrap();
        let document: serde_json::Value = serde_json::from_str(&document).unwrap();
        assert_eq!(document["state"]["audit"], serde_json::json!([]));
        assert_eq!(
            document["format"],
            serde_json::json!(crate::store::FORMAT_VERSION)
        );
    }

    /// A document from a newer Baton (a higher format, whatever its shape)
    /// is refused with an error that says so, and left untouched; one from
    /// the previous release is read.
    #[tokio::test]
    async fn a_document_from_a_newer_baton_is_refused_clearly() {
        let (_dir, store) = opened().await;
        let newer = br#"{"format":9,"state":{"holders":"not as you know them"},"shards":[1]}"#;
        fs::write(store.path(), newer).unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            matches!(err, StoreError::NewerFormat { format: 9, .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("newer Baton") && message.contains("format 9"),
            "{message}"
        );
        assert_eq!(fs::read(store.path()).unwrap(), newer);
        fs::write(store.path(), PREVIOUS_RELEASE).unwrap();
        let read = store.load().await.unwrap().state.unwrap();
        assert_eq!(read.holders.len(), 1);
        assert_eq!(read.audit.len(), 3);
    }

    /// What the previous release (format 1) does with a document this one
    /// wrote: its decoder, as it was (the state's `audit` required, then
    /// the format compared), gets as far as the format and refuses it as
    /// "format version 2 is not 1". Before `audit` was written empty it
    /// failed with "missing field `audit`", which says nothing of a newer
    /// Baton.
    #[tokio::test]
    async fn the_previous_release_refuses_a_new_document_by_its_format() {
        use std::collections::{BTreeMap, VecDeque};

        use crate::state::{AuditEntry, Holding, Pause, Returning};
        #[derive(serde::Deserialize)]
        #[allow(dead_code)] // Read only to see that it parses.
        struct PreviousState {
            paused: Option<Pause>,
            last_token: u64,
            holders: BTreeMap<NodeName, Holding>,
            #[serde(default)]
            returning: BTreeMap<NodeName, Returning>,
            audit: VecDeque<AuditEntry>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct PreviousDocument {
            format: u32,
            #[serde(default)]
            generation: Option<u64>,
            state: PreviousState,
        }
        let (_dir, store) = opened().await;
        let mut state = granted("n1");
        pause_resume(&mut state);
        store.save(&state, &fence(Revision::Absent)).await.unwrap();
        let written = fs::read(store.path()).unwrap();
        let read: PreviousDocument = serde_json::from_slice(&written)
            .unwrap_or_else(|e| panic!("the previous release cannot parse it: {e}"));
        assert_eq!(read.format, crate::store::FORMAT_VERSION);
        assert_ne!(read.format, 1, "the previous release's own format");
        assert!(read.state.audit.is_empty());
    }

    /// A record read back is held to the limits it was written under: an
    /// audit.jsonl line edited (or written by something else) to carry
    /// megabytes is cut on load, so it cannot ride in Status, Watch and
    /// webhooks past gRPC's message limit.
    #[tokio::test]
    async fn an_oversized_audit_line_is_cut_to_the_record_limits_on_load() {
        let (_dir, store) = opened().await;
        let mut state = LeaseState::default();
        for i in 0..(AUDIT_TAIL + 8) {
            state.record(Utc::now(), "pause", "", 0, "op", &format!("r{i}"));
        }
        store.save(&state, &fence(Revision::Absent)).await.unwrap();
        let huge = "x".repeat(4 << 20);
        let line = serde_json::json!({
            "number": 3, "time": "2026-11-20T10:00:00Z", "action": huge,
            "node": huge, "fencing_token": 0, "actor": huge, "reason": huge,
        });
        let mut file = OpenOptions::new()
            .append(true)
            .open(store.audit_path())
            .unwrap();
        writeln!(file, "{line}").unwrap();
        drop(file);
        let read = store.load().await.unwrap().state.unwrap();
        assert_eq!(read.audit.len(), state.audit.len());
        let cut = &read.audit[2];
        assert!(
            cut.reason.len() <= crate::text::REASON_BYTES,
            "{}",
            cut.reason.len()
        );
        assert!(
            cut.actor.len() <= crate::text::ACTOR_BYTES,
            "{}",
            cut.actor.len()
        );
        assert!(cut.node.len() <= crate::node::MAX_NODE_NAME_LEN);
        assert!(cut.action.len() <= 64);
        assert_eq!(read.audit[3], state.audit[3]);
    }

    /// A torn append (power loss or ENOSPC mid-write) that cuts a
    /// multi-byte character leaves audit.jsonl invalid UTF-8. The torn line
    /// belongs to a save that never happened and must be skipped like any
    /// torn line; the state must still load.
    #[tokio::test]
    async fn a_torn_multibyte_character_in_audit_jsonl_still_loads() {
        let (_dir, store) = opened().await;
        let state = granted("n1");
        store.save(&state, &fence(Revision::Absent)).await.unwrap();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.audit_path())
            .unwrap();
        // "é" is 0xC3 0xA9; the append stopped after its first byte.
        file.write_all(b"{\"number\":2,\"time\":\"2026-11-20T10:00:00Z\",\"action\":\"pause\",\"node\":\"\",\"fencing_token\":0,\"actor\":\"op\",\"reason\":\"caf\xc3")
            .unwrap();
        drop(file);
        let loaded = store.load().await;
        assert!(loaded.is_ok(), "{loaded:?}");
        let loaded = loaded.unwrap();
        assert_eq!(loaded.state, Some(state.clone()));
        // The rewrite (a save past twice AUDIT_KEEP lines) reads the file
        // the same way and leaves it valid UTF-8, whole.
        let mut current = state;
        let mut revision = loaded.revision;
        for _ in 0..2 {
            let mut next = current.without_audit();
            for i in 0..AUDIT_KEEP {
                next.record(Utc::now(), "pause", "", 0, "op", &format!("r{i}"));
            }
            revision = store.save(&next, &fence(revision)).await.unwrap();
            current.advance_to(next);
        }
        let text = fs::read_to_string(store.audit_path()).unwrap();
        assert!(text.lines().count() <= 2 * AUDIT_KEEP);
        assert_eq!(store.load().await.unwrap().state, Some(current));
    }
}
