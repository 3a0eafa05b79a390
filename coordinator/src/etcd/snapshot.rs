//! Takes an etcd snapshot, verifies it and keeps it: the stream is written
//! to a hidden temp file while [`TrailerCheck`] verifies it, fsynced, and
//! only a verified file is renamed to `etcd-<time>-<member>.db` beside its
//! `.sha256` (in `sha256sum -c` format); the directory is fsynced and only
//! the newest `keep` snapshots are kept. A failure leaves no file behind
//! under a final name.

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
    tokio::fs::rename(&part, &path)
        .await
        .map_err(|e| io("renaming to", &path, e))?;
    let sum_path = settings.dir.join(format!("{name}.sha256"));
    let sum_part = settings.dir.join(format!(".{name}.sha256.part"));
    write_synced(
        &sum_part,
        format!("{}  {name}\n", verified.file_sha256).as_bytes(),
    )
    .await
    .map_err(|e| io("writing", &sum_part, e))?;
    tokio::fs::rename(&sum_part, &sum_path)
        .await
        .map_err(|e| io("renaming to", &sum_path, e))?;
    sync_dir(&settings.dir)
        .await
        .map_err(|e| io("syncing", &settings.dir, e))?;
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
    let mut file = tokio::fs::File::create(part)
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

async fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = tokio::fs::File::create(path).await?;
    file.write_all(bytes).await?;
    file.sync_all().await
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// Deletes all but the newest `keep` snapshots (names sort by time) and
/// their checksum files.
async fn rotate(dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut names = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(e) = entries.next_entry().await? {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("etcd-") && name.ends_with(".db") {
            names.push(name);
        }
    }
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for name in &names[..excess] {
        tokio::fs::remove_file(dir.join(name)).await?;
        let _ = tokio::fs::remove_file(dir.join(format!("{name}.sha256"))).await;
    }
    Ok(())
}
