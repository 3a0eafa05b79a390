//! The UploadBackup call: an agent hands over its control-plane backup
//! (see [`crate::etcd::backup`]). Checked in this order, each refusal
//! keeping nothing: the header comes first and is well-formed; the caller
//! may act for the node (the same check as Renew); the token is the
//! node's current one and an etcd snapshot was kept for this grant (the
//! lease is renewed on the way, from the confirmed leader); the bytes stay
//! under the limit and match the declared size and SHA-256; the token is
//! still current while the data arrives (checked every few seconds) and
//! when it has arrived; only then is the archive renamed into place beside
//! its snapshot, and the kept backup recorded on the holder (what Confirm
//! waits for). At most [`MAX_UPLOADS`] are received at once, each within
//! [`crate::etcd::backup::UPLOAD_DEADLINE`] in all.

use std::time::Duration;

use baton_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::Status;
use tracing::{info, warn};

use crate::auth::Identity;
use crate::engine::Engine;
use crate::etcd::backup::{BackupError, BackupSettings, Incoming, is_sha256};
use crate::node::NodeName;
use crate::status_map::invalid_node;

/// The longest wait for the next message of an upload.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The most uploads received at once; one more is told to come back
/// (UNAVAILABLE, which the agent retries). Only the control-plane node
/// being granted sends one, so this bounds what stolen node credentials
/// can tie up.
pub const MAX_UPLOADS: usize = 4;

/// Receives one upload from `identity` and keeps it, or says why not.
/// Every outcome is counted in `baton_backups_total`.
pub async fn receive<S>(
    engine: &Engine,
    settings: Option<&BackupSettings>,
    identity: &Identity,
    chunks: S,
) -> Result<pb::BackupReceipt, Status>
where
    S: Stream<Item = Result<pb::BackupChunk, Status>> + Send + Unpin,
{
    let deadline = settings.map_or(crate::etcd::backup::UPLOAD_DEADLINE, |s| s.deadline);
    let result = tokio::time::timeout(
        deadline,
        receive_checked(engine, settings, identity, chunks),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "the upload took longer than {}s in all; nothing was kept",
            deadline.as_secs_f64()
        )))
    });
    let outcome = match &result {
        Ok(_) => "kept",
        Err(status) => match status.code() {
            tonic::Code::Internal | tonic::Code::Unavailable | tonic::Code::DataLoss => "failed",
            _ => "refused",
        },
    };
    engine.metrics().backup(outcome);
    if let Err(status) = &result {
        warn!(caller = %identity.name, code = ?status.code(), reason = status.message(), "control-plane backup not kept");
    }
    result
}

async fn next<S>(chunks: &mut S) -> Result<Option<pb::BackupChunk>, Status>
where
    S: Stream<Item = Result<pb::BackupChunk, Status>> + Unpin,
{
    match tokio::time::timeout(STALL_TIMEOUT, chunks.next()).await {
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(status))) => Err(status),
        Ok(None) => Ok(None),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no part of the backup arrived within {}s; nothing was kept",
            STALL_TIMEOUT.as_secs()
        ))),
    }
}

fn status(e: BackupError) -> Status {
    match e {
        BackupError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        BackupError::Checksum { .. } | BackupError::Size { .. } => {
            Status::invalid_argument(e.to_string())
        }
        BackupError::SnapshotGone(_) => Status::failed_precondition(e.to_string()),
        BackupError::Io(_) => Status::internal(e.to_string()),
    }
}

async fn receive_checked<S>(
    engine: &Engine,
    settings: Option<&BackupSettings>,
    identity: &Identity,
    mut chunks: S,
) -> Result<pb::BackupReceipt, Status>
where
    S: Stream<Item = Result<pb::BackupChunk, Status>> + Send + Unpin,
{
    let header = match next(&mut chunks).await?.and_then(|c| c.chunk) {
        Some(pb::backup_chunk::Chunk::Header(header)) => header,
        _ => {
            return Err(Status::invalid_argument(
                "an upload starts with its header (node, fencing token, sha256, size)",
            ));
        }
    };
    let node = NodeName::new(&header.node).map_err(invalid_node)?;
    identity.may_act_for(&node)?;
    if !is_sha256(&header.sha256) {
        return Err(Status::invalid_argument(
            "sha256: not 64 lowercase hex digits",
        ));
    }
    let settings = settings.ok_or_else(|| {
        Status::failed_precondition(
            "this coordinator keeps no backups: it takes no etcd snapshots (no --etcd-endpoints)",
        )
    })?;
    let _permit = settings.uploads.clone().try_acquire_owned().map_err(|_| {
        Status::unavailable(format!(
            "{MAX_UPLOADS} backups are being received already; send it again shortly"
        ))
    })?;
    let token = header.fencing_token;
    let snapshot = engine
        .backup_snapshot_for(&node, token)
        .await?
        .ok_or_else(|| no_snapshot(&node, token))?;
    let mut incoming = Incoming::begin(settings, &snapshot, &node, header.size)
        .await
        .map_err(status)?;
    let mut checked = tokio::time::Instant::now();
    while let Some(chunk) = next(&mut chunks).await? {
        // A grant that ended (a force-release) stops its upload now, not
        // when the last byte arrives.
        if checked.elapsed() >= settings.recheck {
            let still = engine.backup_snapshot_for(&node, token).await?;
            if still.as_deref() != Some(snapshot.as_str()) {
                return Err(no_snapshot(&node, token));
            }
            checked = tokio::time::Instant::now();
        }
        match chunk.chunk {
            Some(pb::backup_chunk::Chunk::Data(data)) => {
                incoming.write(&data).await.map_err(status)?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "only data may follow the header; nothing was kept",
                ));
            }
        }
    }
    incoming.verify(&header.sha256).await.map_err(status)?;
    // The grant may have ended while the bytes arrived (a force-release):
    // a backup is kept only for the grant that is current now.
    let still = engine.backup_snapshot_for(&node, token).await?;
    if still.as_deref() != Some(snapshot.as_str()) {
        return Err(no_snapshot(&node, token));
    }
    // Run to completion even if this handler is dropped (the agent hung
    // up): the pair is never left half replaced by a cancelled keep.
    let sha256 = header.sha256.clone();
    let kept = tokio::spawn(async move { incoming.keep(&sha256).await })
        .await
        .map_err(|e| Status::internal(format!("keeping the backup: {e}")))?
        .map_err(status)?;
    // Only once recorded (on the confirmed leader) does Confirm let the
    // drain through; a failure here leaves the grant held and the agent
    // sends the backup again.
    engine.record_backup_kept(&node, token, &kept.name).await?;
    info!(node = %node, token, name = %kept.name, snapshot = %kept.snapshot, size = kept.size, "control-plane backup kept beside its etcd snapshot");
    Ok(pb::BackupReceipt {
        name: kept.name,
        snapshot: kept.snapshot,
        size: kept.size,
    })
}

fn no_snapshot(node: &NodeName, token: u64) -> Status {
    Status::failed_precondition(format!(
        "no etcd snapshot was kept for the grant {token} of node {node} (not a control-plane etcd node's grant); a backup is kept only beside its snapshot"
    ))
}

#[cfg(test)]
mod tests;
