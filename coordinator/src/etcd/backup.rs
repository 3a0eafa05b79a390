//! Control-plane backups kept beside the etcd snapshot of their grant.
//!
//! Before a control-plane node is drained, its agent sends a tar.gz of
//! `/etc/kubernetes/pki` and the kubeadm configuration (UploadBackup). The
//! archive is written to a hidden temp file (mode 0600) while it is counted
//! against the size limit and hashed; fsynced; checked against the SHA-256
//! the agent declared; then, with the snapshot directory's lock held and
//! only while the snapshot it pairs with is still kept, its `.sha256` (in
//! `sha256sum -c` format) is written and the archive renamed to
//! `<snapshot>.control-plane-<node>.tar.gz` beside it, and the directory
//! fsynced: the same discipline
//! and helpers as [`super::snapshot`]. Rotation there removes a backup with
//! its snapshot. A refused or failed upload leaves nothing under a final
//! name (the temp file goes when the upload is dropped).
//!
//! At 3 a.m. the pair reads: `etcd-20261121T223000.123Z-cp-2.db` and
//! `etcd-20261121T223000.123Z-cp-2.db.control-plane-cp-1.tar.gz` (the
//! snapshot taken from member cp-2 before node cp-1 went down, and cp-1's
//! certificates and kubeadm configuration).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::snapshot::{create_private, directory_lock, is_snapshot, keep_checksum, sync_dir};
use crate::node::NodeName;

/// The default for `--backup-max-bytes`.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// How many backups status lists.
pub const LISTED: usize = 10;

/// What sits between a snapshot's name and the node in a backup's name.
const MARK: &str = ".control-plane-";

/// The longest an upload may take from its first message to its last.
pub const UPLOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// How often an upload in progress checks that its grant is still current.
pub const TOKEN_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Where backups go, how big one may be, and how uploads are bounded.
#[derive(Clone, Debug)]
pub struct BackupSettings {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The largest archive accepted, in bytes.
    pub max_bytes: u64,
    /// Uploads received at once (see [`crate::upload::MAX_UPLOADS`]).
    pub uploads: std::sync::Arc<tokio::sync::Semaphore>,
    /// The longest one upload may take ([`UPLOAD_DEADLINE`]).
    pub deadline: std::time::Duration,
    /// How often an upload re-checks its token ([`TOKEN_RECHECK`]).
    pub recheck: std::time::Duration,
}

impl BackupSettings {
    /// Backups kept in `dir`, at most `max_bytes` each, uploads bounded
    /// by the defaults.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(crate::upload::MAX_UPLOADS)),
            deadline: UPLOAD_DEADLINE,
            recheck: TOKEN_RECHECK,
        }
    }
}

/// Why a backup was not kept. Nothing is kept under a final name when one
/// is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    /// The archive is (or says it is) bigger than the limit.
    #[error(
        "the backup is {size} bytes or more, over the limit of {limit} bytes (--backup-max-bytes); nothing was kept"
    )]
    TooLarge {
        /// The bytes seen (or declared).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes do not hash to the declared SHA-256.
    #[error("the backup's SHA-256 is {actual}, not the declared {declared}; nothing was kept")]
    Checksum {
        /// What the agent declared.
        declared: String,
        /// What arrived.
        actual: String,
    },
    /// Fewer or more bytes arrived than declared.
    #[error("the backup is {actual} bytes, not the declared {declared}; nothing was kept")]
    Size {
        /// What the agent declared.
        declared: u64,
        /// What arrived.
        actual: u64,
    },
    /// The snapshot it pairs with is not kept (rotated away, or taken by
    /// another coordinator replica before a failover).
    #[error(
        "the etcd snapshot {0} taken for this grant is not kept by this coordinator (rotated away, or taken by another replica); nothing was kept"
    )]
    SnapshotGone(String),
    /// Reading or writing the directory failed.
    #[error("{0}; nothing was kept")]
    Io(String),
}

/// The file name of `node`'s backup kept with `snapshot`.
pub fn backup_name(snapshot: &str, node: &NodeName) -> String {
    format!("{snapshot}{MARK}{node}.tar.gz")
}

/// Splits a backup's file name into its snapshot's name and its node.
pub fn parse_backup_name(name: &str) -> Option<(&str, &str)> {
    let stem = name.strip_suffix(".tar.gz")?;
    let at = stem.find(".db.control-plane-")? + ".db".len();
    let (snapshot, rest) = stem.split_at(at);
    let node = rest.strip_prefix(MARK)?;
    (is_snapshot(snapshot) && !node.is_empty()).then_some((snapshot, node))
}

/// True for a SHA-256 as `sha256sum` prints it.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A backup kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// Its file name.
    pub name: String,
    /// The snapshot's file name.
    pub snapshot: String,
    /// Its size.
    pub size: u64,
}

/// A backup arriving: its hidden temp file, removed unless it is kept.
pub struct Incoming {
    dir: PathBuf,
    snapshot: String,
    name: String,
    part: PathBuf,
    file: Option<tokio::fs::File>,
    hash: Sha256,
    size: u64,
    declared: u64,
    limit: u64,
    kept: bool,
}

impl Incoming {
    /// Starts receiving `node`'s backup for `snapshot`, declared to be
    /// `declared` bytes (refused at once when over the limit).
    pub async fn begin(
        settings: &BackupSettings,
        snapshot: &str,
        node: &NodeName,
        declared: u64,
    ) -> Result<Self, BackupError> {
        if declared > settings.max_bytes {
            return Err(BackupError::TooLarge {
                size: declared,
                limit: settings.max_bytes,
            });
        }
        if !is_snapshot(snapshot) || !kept(&settings.dir.join(snapshot)).await? {
            return Err(BackupError::SnapshotGone(snapshot.to_string()));
        }
        // Unique per upload: a retry may overlap an upload its agent gave
        // up on; each writes its own temp file and the last rename wins.
        // Short, whatever the node's name: only the final names carry it.
        static UPLOADS: AtomicU64 = AtomicU64::new(0);
        let name = backup_name(snapshot, node);
        let part = settings.dir.join(format!(
            ".backup-{}-{}.part",
            std::process::id(),
            UPLOADS.fetch_add(1, Ordering::Relaxed)
        ));
        let file = create_private(&part)
            .await
            .map_err(|e| io_error("creating", &part, e))?;
        Ok(Self {
            dir: settings.dir.clone(),
            snapshot: snapshot.to_string(),
            name,
            part,
            file: Some(file),
            hash: Sha256::new(),
            size: 0,
            declared,
            limit: settings.max_bytes,
            kept: false,
        })
    }

    /// Appends the next bytes; past the limit the upload is refused.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BackupError> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            return Err(BackupError::TooLarge {
                size: self.size,
                limit: self.limit,
            });
        }
        self.hash.update(data);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| BackupError::Io("the backup file is closed".into()))?;
        file.write_all(data)
            .await
            .map_err(|e| io_error("writing", &self.part, e))
    }

    /// Ends the data: fsyncs the temp file and checks the size and the
    /// SHA-256 against what was declared.
    pub async fn verify(&mut self, sha256: &str) -> Result<(), BackupError> {
        if self.size != self.declared {
            return Err(BackupError::Size {
                declared: self.declared,
                actual: self.size,
            });
        }
        let actual = hex::encode(self.hash.clone().finalize());
        if actual != sha256 {
            return Err(BackupError::Checksum {
                declared: sha256.to_string(),
                actual,
            });
        }
        if let Some(file) = self.file.take() {
            file.sync_all()
                .await
                .map_err(|e| io_error("syncing", &self.part, e))?;
        }
        Ok(())
    }

    /// Keeps the verified backup under its final name, with its checksum,
    /// while its snapshot is still kept. Call after [`Incoming::verify`]
    /// and after checking once more that the grant is still current.
    pub async fn keep(mut self, sha256: &str) -> Result<Kept, BackupError> {
        if self.file.is_some() {
            return Err(BackupError::Io("the backup was not verified".into()));
        }
        let _dir = directory_lock().await;
        if !kept(&self.dir.join(&self.snapshot)).await? {
            return Err(BackupError::SnapshotGone(self.snapshot.clone()));
        }
        let path = self.dir.join(&self.name);
        let sum = self.dir.join(format!("{}.sha256", self.name));
        // The checksum goes first: an archive under its final name never
        // lacks one, and a crash between the two renames leaves an old
        // archive beside the new checksum, which `sha256sum -c` flags,
        // never a new archive that nothing vouches for.
        let previous = tokio::fs::read_to_string(&sum).await.ok();
        keep_checksum(&self.dir, &self.name, sha256)
            .await
            .map_err(BackupError::Io)?;
        if let Err(e) = tokio::fs::rename(&self.part, &path).await {
            // The archive kept before (a backup sent again) gets its own
            // checksum back; with none before, none is left.
            match previous
                .as_deref()
                .and_then(|t| t.split_whitespace().next())
                .filter(|old| is_sha256(old))
            {
                Some(old) => {
                    let _ = keep_checksum(&self.dir, &self.name, old).await;
                }
                None => {
                    let _ = tokio::fs::remove_file(&sum).await;
                    let _ = sync_dir(&self.dir).await;
                }
            }
            return Err(io_error("renaming to", &path, e));
        }
        self.kept = true;
        sync_dir(&self.dir)
            .await
            .map_err(|e| io_error("syncing", &self.dir, e))?;
        Ok(Kept {
            name: self.name.clone(),
            snapshot: self.snapshot.clone(),
            size: self.size,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(format!("{what} {}: {e}", path.display()))
}

/// True when `path` is a kept file.
async fn kept(path: &Path) -> Result<bool, BackupError> {
    match tokio::fs::metadata(path).await {
        Ok(m) => Ok(m.is_file()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("reading", path, e)),
    }
}

/// A backup as status lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its file name.
    pub name: String,
    /// The node it was taken on.
    pub node: String,
    /// The snapshot it is kept with.
    pub snapshot: String,
    /// Its size.
    pub size: u64,
    /// When it was kept (the file's modification time).
    pub kept_at: DateTime<Utc>,
    /// Its SHA-256, from its `.sha256` file (empty when unreadable).
    pub sha256: String,
}

/// The newest `n` backups in `dir`, newest first. A missing directory
/// lists nothing; the directory holds few files (rotation bounds it).
pub async fn newest(dir: &Path, n: usize) -> Result<Vec<Listed>, String> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut found = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
    {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some((snapshot, node)) = parse_backup_name(&name) else {
            continue;
        };
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        let kept_at = meta
            .modified()
            .map(DateTime::<Utc>::from)
            .unwrap_or_default();
        found.push(Listed {
            node: node.to_string(),
            snapshot: snapshot.to_string(),
            size: meta.len(),
            kept_at,
            sha256: String::new(),
            name,
        });
    }
    found.sort_by(|a, b| b.kept_at.cmp(&a.kept_at).then(b.name.cmp(&a.name)));
    found.truncate(n);
    for listed in &mut found {
        let sum = dir.join(format!("{}.sha256", listed.name));
        if let Ok(text) = tokio::fs::read_to_string(&sum).await {
            listed.sha256 = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
