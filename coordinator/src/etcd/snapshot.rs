//! Takes an etcd snapshot, verifies it and keeps it: the stream is written
//! to a hidden temp file while [`TrailerCheck`] verifies it, fsynced, and
//! only a verified file is renamed to `etcd-<time>-<member>.db` beside its
//! `.sha256` (in `sha256sum -c` format); the directory is fsynced and only
//! the newest `keep` snapshots are kept, each with the files paired with it
//! (named after it: `etcd-<time>-<member>.db.<...>`, the control-plane
//! backups of [`super::backup`]). A failure leaves no file behind under a
//! final name. Renames into the directory and rotation take
//! [`directory_lock`], so a pair is never split by a rotation running
//! between a backup's check for its snapshot and its rename.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::Client;
use tokio::io::AsyncWriteExt;

use super::verify::TrailerCheck;
use super::within;

/// Where snapshots go and how many are kept.
#[derive(Clone, Debug)]
pub struct SnapshotSettings {
    /// The directory.
    pub dir: PathBuf,
    /// How many are kept (at least 1).
    pub keep: usize,
    /// The longest wait for the next chunk of the stream.
    pub stall_timeout: Duration,
}

/// A snapshot written and verified.
#[derive(Clone, Debug)]
pub struct Taken {
    /// The snapshot file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
}

/// Streams a snapshot from `client` (one member's client) into the
/// directory, verifies it and rotates old ones. The error is a sentence.
pub async fn take(
    client: &mut Client,
    member: &str,
    settings: &SnapshotSettings,
    now: DateTime<Utc>,
) -> Result<Taken, String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    tokio::fs::create_dir_all(&settings.dir)
        .await
        .map_err(|e| io("creating", &settings.dir, e))?;
    let name = format!("etcd-{}-{member}.db", now.format("%Y%m%dT%H%M%S%.3fZ"));
    let part = settings.dir.join(format!(".{name}.part"));
    let result = stream_to(client, &part, settings.stall_timeout).await;
    let verified = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    let path = settings.dir.join(&name);
    let _dir = directory_lock().await;
    tokio::fs::rename(&part, &path)
        .await
        .map_err(|e| io("renaming to", &path, e))?;
    keep_checksum(&settings.dir, &name, &verified.file_sha256).await?;
    rotate(&settings.dir, settings.keep.max(1))
        .await
        .map_err(|e| io("rotating", &settings.dir, e))?;
    Ok(Taken {
        path,
        size: verified.size,
        sha256: verified.file_sha256,
    })
}

async fn stream_to(
    client: &mut Client,
    part: &Path,
    stall: Duration,
) -> Result<super::verify::Verified, String> {
    let mut stream = within(stall, client.snapshot())
        .await
        .map_err(|e| format!("starting the snapshot: {e}"))?;
    let mut file = create_private(part)
        .await
        .map_err(|e| format!("creating {}: {e}", part.display()))?;
    let mut check = TrailerCheck::default();
    while let Some(chunk) = within(stall, stream.message())
        .await
        .map_err(|e| format!("reading the snapshot stream: {e}"))?
    {
        check.update(chunk.blob());
        file.write_all(chunk.blob())
            .await
            .map_err(|e| format!("writing {}: {e}", part.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("syncing {}: {e}", part.display()))?;
    check.finish().map_err(|e| e.to_string())
}

/// Held while files are renamed into the snapshot directory or rotated out
/// of it (one directory per process, so one lock).
pub(super) async fn directory_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Writes `<name>.sha256` beside `name` (in `sha256sum -c` format, mode
/// 0600) through a hidden temp file, then fsyncs the directory, so that
/// the file and its checksum are both durable once this returns.
pub(super) async fn keep_checksum(dir: &Path, name: &str, sha256: &str) -> Result<(), String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let sum_path = dir.join(format!("{name}.sha256"));
    // One fixed, short temp name: every caller holds `directory_lock`.
    let sum_part = dir.join(".checksum.sha256.part");
    let written = match write_synced(&sum_part, format!("{sha256}  {name}\n").as_bytes()).await {
        Ok(()) => tokio::fs::rename(&sum_part, &sum_path)
            .await
            .map_err(|e| io("renaming to", &sum_path, e)),
        Err(e) => Err(io("writing", &sum_part, e)),
    };
    if written.is_err() {
        // No temp file outlives a failure.
        let _ = tokio::fs::remove_file(&sum_part).await;
    }
    written?;
    sync_dir(dir).await.map_err(|e| io("syncing", dir, e))
}

/// Creates `path` for writing, mode 0600 from the start (snapshots and
/// backups hold every secret of the cluster).
pub(super) async fn create_private(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
}

async fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = create_private(path).await?;
    file.write_all(bytes).await?;
    file.sync_all().await
}

/// Fsyncs a directory, so that the renames into it are durable.
pub(super) async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// True for a snapshot's file name (`etcd-<time>-<member>.db`).
pub(super) fn is_snapshot(name: &str) -> bool {
    name.starts_with("etcd-") && name.ends_with(".db")
}

/// How long since its last write a hidden `.part` file in the snapshot
/// directory counts as left behind by a crash (an upload stalls out after
/// 30 s, a snapshot stream after its stall timeout).
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// Deletes hidden temp files a crash left behind (see [`LEFTOVER_AGE`]),
/// and all but the newest `keep` snapshots (names sort by time) and
/// the newest one holding each node's control-plane backup, each with
/// every file named after it (its checksum, the backups kept with it and
/// theirs), and any such file whose snapshot is gone: a backup never
/// outlives its snapshot. Call with [`directory_lock`] held.
pub(super) async fn rotate(dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut snapshots = Vec::new();
    let mut others = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(e) = entries.next_entry().await? {
        let name = e.file_name().to_string_lossy().to_string();
        if is_snapshot(&name) {
            snapshots.push(name);
        } else if name.starts_with("etcd-") {
            others.push(name);
        } else if name.starts_with('.') && name.ends_with(".part") {
            // A temp file a crash left behind (they hold every secret of
            // the cluster); one written to within the hour may be an
            // upload or a snapshot in progress.
            let stale = e
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > LEFTOVER_AGE);
            if stale {
                tokio::fs::remove_file(dir.join(&name)).await?;
            }
        }
    }
    snapshots.sort();
    let excess = snapshots.len().saturating_sub(keep);
    // Each node's newest control-plane backup stays with its snapshot,
    // however many snapshots came after it (a grant retried many times
    // must not rotate away the last good pair).
    let mut newest_pair: std::collections::BTreeMap<&str, &str> = Default::default();
    for name in &others {
        if let Some((snapshot, node)) = super::backup::parse_backup_name(name)
            && snapshots.iter().any(|s| s == snapshot)
        {
            let newest = newest_pair.entry(node).or_insert(snapshot);
            if snapshot > *newest {
                *newest = snapshot;
            }
        }
    }
    let pinned: Vec<String> = newest_pair.values().map(|s| s.to_string()).collect();
    let (old, newest) = snapshots.split_at(excess);
    let mut kept: Vec<String> = newest.to_vec();
    for name in old {
        if pinned.contains(name) {
            kept.push(name.clone());
        } else {
            tokio::fs::remove_file(dir.join(name)).await?;
        }
    }
    for name in others {
        let paired = kept.iter().any(|s| {
            name.strip_prefix(s.as_str())
                .is_some_and(|r| r.starts_with('.'))
        });
        if !paired {
            tokio::fs::remove_file(dir.join(&name)).await?;
        }
    }
    sync_dir(dir).await
}
