//! UploadBackup's checks over a real engine (memory store) and a real
//! directory: the caller, the token, the pairing; what is counted.

use std::sync::Arc;

use chrono::Utc;
use sha2::{Digest, Sha256};

use super::*;
use crate::auth::Scope;
use crate::state::{LeaseState, Returning};
use crate::store::memory::MemoryStore;

const SNAP: &str = "etcd-20261121T223000.123Z-m2.db";

/// An engine where cp-1 holds the baton with a snapshot kept for its
/// grant (`paired`), a directory holding that snapshot, and cp-1's token.
async fn setup(paired: bool) -> (Arc<Engine>, BackupSettings, tempfile::TempDir, u64) {
    let node = NodeName::new("cp-1").unwrap();
    let mut state = LeaseState::default();
    state.grant(&node, true, false, "test", Utc::now()).unwrap();
    let token = state.holders[&node].fencing_token;
    state.returning.insert(
        node,
        Returning {
            member: "cp-1".into(),
            member_id: 1,
            control_plane_snapshot: paired.then(|| crate::state::PairedSnapshot {
                name: SNAP.to_string(),
                taken_at: Utc::now(),
            }),
        },
    );
    let engine = Engine::over(Arc::new(MemoryStore::new(Some(state))), "upload-test").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SNAP), b"snapshot").unwrap();
    let settings = BackupSettings::new(dir.path().to_path_buf(), 1024);
    (engine, settings, dir, token)
}

fn agent(node: &str) -> Identity {
    Identity {
        name: format!("system:node:{node}"),
        scope: Scope::Nodes(vec![node.to_string()]),
        admin: false,
    }
}

fn chunks(node: &str, token: u64, data: &[u8]) -> Vec<Result<pb::BackupChunk, Status>> {
    let header = pb::BackupHeader {
        node: node.into(),
        fencing_token: token,
        sha256: hex::encode(Sha256::digest(data)),
        size: data.len() as u64,
    };
    std::iter::once(pb::backup_chunk::Chunk::Header(header))
        .chain(
            data.chunks(4)
                .map(|c| pb::backup_chunk::Chunk::Data(c.to_vec())),
        )
        .map(|chunk| Ok(pb::BackupChunk { chunk: Some(chunk) }))
        .collect()
}

async fn send(
    engine: &Engine,
    settings: &BackupSettings,
    caller: &Identity,
    chunks: Vec<Result<pb::BackupChunk, Status>>,
) -> Result<pb::BackupReceipt, Status> {
    receive(
        engine,
        Some(settings),
        caller,
        futures::stream::iter(chunks),
    )
    .await
}

fn kept_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != SNAP)
        .collect()
}

fn counted(engine: &Engine, result: &str) -> bool {
    engine
        .metrics()
        .encode()
        .contains(&format!("baton_backups_total{{result=\"{result}\"}} 1"))
}

#[tokio::test]
async fn the_current_holder_s_backup_is_kept_and_counted() {
    let (engine, settings, dir, token) = setup(true).await;
    let receipt = send(
        &engine,
        &settings,
        &agent("cp-1"),
        chunks("cp-1", token, b"pki"),
    )
    .await
    .unwrap();
    assert_eq!(receipt.snapshot, SNAP);
    assert_eq!(receipt.name, format!("{SNAP}.control-plane-cp-1.tar.gz"));
    assert_eq!(
        kept_files(dir.path()).len(),
        2,
        "the archive and its checksum"
    );
    assert!(counted(&engine, "kept"), "{}", engine.metrics().encode());
}

/// cp-1's upload, sent by `caller` with cp-1's token (`stale`: the one
/// before it), is refused with `code` and a message containing `needle`,
/// and nothing is kept. The engine, for what it counted.
async fn refused(
    paired: bool,
    caller: &str,
    stale: bool,
    code: tonic::Code,
    needle: &str,
) -> Arc<Engine> {
    let (engine, settings, dir, token) = setup(paired).await;
    let token = if stale { token - 1 } else { token };
    let refused = send(
        &engine,
        &settings,
        &agent(caller),
        chunks("cp-1", token, b"pki"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), code, "{refused:?}");
    assert!(refused.message().contains(needle), "{refused:?}");
    assert!(kept_files(dir.path()).is_empty());
    engine
}

#[tokio::test]
async fn a_stale_token_is_refused_and_nothing_kept() {
    let engine = refused(
        true,
        "cp-1",
        true,
        tonic::Code::FailedPrecondition,
        "not the current token",
    )
    .await;
    assert!(counted(&engine, "refused"));
}

#[tokio::test]
async fn another_node_s_identity_is_refused_and_nothing_kept() {
    refused(
        true,
        "w-1",
        false,
        tonic::Code::PermissionDenied,
        "may act only for",
    )
    .await;
}

#[tokio::test]
async fn a_grant_without_a_snapshot_keeps_no_backup() {
    refused(
        false,
        "cp-1",
        false,
        tonic::Code::FailedPrecondition,
        "no etcd snapshot was kept",
    )
    .await;
}

#[tokio::test]
async fn an_oversized_upload_is_refused_with_resource_exhausted() {
    let (engine, settings, dir, token) = setup(true).await;
    let mut stream = chunks("cp-1", token, &[1u8; 1000]);
    // It keeps sending past the limit of 1024 bytes.
    stream.extend(chunks("cp-1", token, &[2u8; 100]).into_iter().skip(1));
    let refused = send(&engine, &settings, &agent("cp-1"), stream)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        kept_files(dir.path()).is_empty(),
        "{:?}",
        kept_files(dir.path())
    );
}

#[tokio::test]
async fn data_before_the_header_or_a_second_header_is_refused() {
    let (engine, settings, dir, token) = setup(true).await;
    let mut stream = chunks("cp-1", token, b"pki");
    let _header = stream.remove(0);
    let refused = send(&engine, &settings, &agent("cp-1"), stream)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let mut stream = chunks("cp-1", token, b"pki");
    stream.push(chunks("cp-1", token, b"").remove(0));
    let refused = send(&engine, &settings, &agent("cp-1"), stream)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(kept_files(dir.path()).is_empty());
}

/// cp-1's upload that declares `data` but sends a byte every `every`,
/// forever (each well within the stall timeout).
fn trickle(
    token: u64,
    every: std::time::Duration,
) -> impl futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send + Unpin {
    let header = chunks("cp-1", token, &[0u8; 1000]).remove(0);
    let bytes = futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(every).await;
        Some((
            Ok(pb::BackupChunk {
                chunk: Some(pb::backup_chunk::Chunk::Data(vec![0])),
            }),
            (),
        ))
    });
    Box::pin(futures::stream::iter([header]).chain(bytes))
}

#[tokio::test]
async fn an_upload_that_trickles_ends_at_its_overall_deadline_keeping_nothing() {
    let (engine, mut settings, dir, token) = setup(true).await;
    settings.deadline = std::time::Duration::from_millis(300);
    let failed = receive(
        &engine,
        Some(&settings),
        &agent("cp-1"),
        trickle(token, std::time::Duration::from_millis(20)),
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::DeadlineExceeded, "{failed:?}");
    assert!(failed.message().contains("nothing was kept"), "{failed:?}");
    assert!(
        kept_files(dir.path()).is_empty(),
        "{:?}",
        kept_files(dir.path())
    );
}

#[tokio::test]
async fn uploads_beyond_the_limit_at_once_are_told_to_come_back() {
    let (engine, settings, dir, token) = setup(true).await;
    // MAX_UPLOADS slow uploads in progress.
    let mut slow = Vec::new();
    for _ in 0..MAX_UPLOADS {
        let (engine, settings) = (engine.clone(), settings.clone());
        slow.push(tokio::spawn(async move {
            receive(
                &engine,
                Some(&settings),
                &agent("cp-1"),
                trickle(token, std::time::Duration::from_millis(50)),
            )
            .await
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let busy = send(
        &engine,
        &settings,
        &agent("cp-1"),
        chunks("cp-1", token, b"pki"),
    )
    .await
    .unwrap_err();
    assert_eq!(busy.code(), tonic::Code::Unavailable, "{busy:?}");
    for task in slow {
        task.abort();
    }
    drop(dir);
}

#[tokio::test]
async fn a_grant_that_ends_while_its_upload_trickles_stops_the_upload() {
    let (engine, mut settings, dir, token) = setup(true).await;
    settings.recheck = std::time::Duration::from_millis(50);
    let upload = {
        let (engine, settings) = (engine.clone(), settings.clone());
        tokio::spawn(async move {
            receive(
                &engine,
                Some(&settings),
                &agent("cp-1"),
                trickle(token, std::time::Duration::from_millis(10)),
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    engine
        .release(&NodeName::new("cp-1").unwrap(), token, "cp-1", "done")
        .await
        .unwrap();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), upload)
        .await
        .expect("the upload stops soon after the grant ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        stopped.code(),
        tonic::Code::FailedPrecondition,
        "{stopped:?}"
    );
    assert!(kept_files(dir.path()).is_empty());
}
