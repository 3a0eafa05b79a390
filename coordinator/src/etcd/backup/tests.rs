//! The keeper against a real directory: every refusal and failure keeps
//! nothing under a final name; kept files are 0600; rotation keeps pairs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

const SNAP: &str = "etcd-20261121T223000.123Z-m2.db";

fn settings(dir: &Path, max_bytes: u64) -> BackupSettings {
    BackupSettings::new(dir.to_path_buf(), max_bytes)
}

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A directory holding one snapshot (and its checksum).
fn with_snapshot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SNAP), b"snapshot").unwrap();
    std::fs::write(dir.path().join(format!("{SNAP}.sha256")), b"x  y\n").unwrap();
    dir
}

/// Every file name in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Only the snapshot and its checksum: nothing else was kept, no temp file
/// was left.
fn nothing_kept(dir: &Path) {
    assert_eq!(
        names(dir),
        vec![SNAP.to_string(), format!("{SNAP}.sha256")],
        "nothing kept, nothing left behind"
    );
}

/// Puts a non-empty directory at `path`: a rename onto it fails.
fn in_the_way(path: &Path) {
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("x"), b"").unwrap();
}

async fn upload(
    settings: &BackupSettings,
    data: &[u8],
    declared_sha: &str,
    declared_size: u64,
) -> Result<Kept, BackupError> {
    let mut incoming = Incoming::begin(settings, SNAP, &node("cp-1"), declared_size).await?;
    for chunk in data.chunks(7) {
        incoming.write(chunk).await?;
    }
    incoming.verify(declared_sha).await?;
    incoming.keep(declared_sha).await
}

#[tokio::test]
async fn a_verified_backup_is_kept_beside_its_snapshot_private_with_a_checksum() {
    let dir = with_snapshot();
    let data = b"the archive's bytes, more than one chunk long";
    let kept = upload(
        &settings(dir.path(), 1024),
        data,
        &sha(data),
        data.len() as u64,
    )
    .await
    .unwrap();
    let name = format!("{SNAP}.control-plane-cp-1.tar.gz");
    assert_eq!(kept.name, name);
    assert_eq!(kept.snapshot, SNAP);
    assert_eq!(std::fs::read(dir.path().join(&name)).unwrap(), data);
    let sum = std::fs::read_to_string(dir.path().join(format!("{name}.sha256"))).unwrap();
    assert_eq!(sum, format!("{}  {name}\n", sha(data)));
    for file in [name.clone(), format!("{name}.sha256")] {
        let mode = std::fs::metadata(dir.path().join(&file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is {mode:o}");
    }
    assert_eq!(parse_backup_name(&name), Some((SNAP, "cp-1")));
}

#[tokio::test]
async fn a_backup_declared_over_the_limit_is_refused_before_a_byte_is_written() {
    let dir = with_snapshot();
    let refused = Incoming::begin(&settings(dir.path(), 10), SNAP, &node("cp-1"), 11)
        .await
        .err()
        .unwrap();
    assert_eq!(
        refused,
        BackupError::TooLarge {
            size: 11,
            limit: 10
        }
    );
    assert!(
        refused.to_string().contains("--backup-max-bytes"),
        "{refused}"
    );
    nothing_kept(dir.path());
}

#[tokio::test]
async fn a_backup_that_sends_more_than_the_limit_is_refused_and_nothing_kept() {
    let dir = with_snapshot();
    // It declares a small size but keeps sending.
    let data = vec![7u8; 100];
    let refused = upload(&settings(dir.path(), 50), &data, &sha(&data), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, BackupError::TooLarge { limit: 50, .. }),
        "{refused:?}"
    );
    nothing_kept(dir.path());
}

#[tokio::test]
async fn a_wrong_checksum_or_size_keeps_nothing() {
    let dir = with_snapshot();
    let data = b"archive";
    let refused = upload(&settings(dir.path(), 1024), data, &sha(b"other"), 7)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, BackupError::Checksum { .. }),
        "{refused:?}"
    );
    nothing_kept(dir.path());
    let refused = upload(&settings(dir.path(), 1024), data, &sha(data), 8)
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        BackupError::Size {
            declared: 8,
            actual: 7
        }
    );
    nothing_kept(dir.path());
}

#[tokio::test]
async fn a_disk_error_at_the_rename_keeps_nothing_under_a_final_name() {
    let dir = with_snapshot();
    // The final name is taken by a non-empty directory: the rename fails.
    let name = format!("{SNAP}.control-plane-cp-1.tar.gz");
    in_the_way(&dir.path().join(&name));
    let data = b"archive";
    let failed = upload(&settings(dir.path(), 1024), data, &sha(data), 7)
        .await
        .unwrap_err();
    assert!(matches!(failed, BackupError::Io(_)), "{failed:?}");
    assert!(
        !names(dir.path()).iter().any(|n| n.ends_with(".part")),
        "{:?}",
        names(dir.path())
    );
    assert!(dir.path().join(&name).is_dir(), "the obstacle is untouched");
}

#[tokio::test]
async fn a_disk_error_writing_the_checksum_removes_the_archive_too() {
    let dir = with_snapshot();
    let name = format!("{SNAP}.control-plane-cp-1.tar.gz");
    let sum = dir.path().join(format!("{name}.sha256"));
    in_the_way(&sum);
    let data = b"archive";
    let failed = upload(&settings(dir.path(), 1024), data, &sha(data), 7)
        .await
        .unwrap_err();
    assert!(matches!(failed, BackupError::Io(_)), "{failed:?}");
    assert!(
        !dir.path().join(&name).exists(),
        "no archive without its checksum"
    );
    assert!(
        !names(dir.path()).iter().any(|n| n.ends_with(".part")),
        "{:?}",
        names(dir.path())
    );
}

#[tokio::test]
async fn a_backup_whose_snapshot_is_gone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let refused = Incoming::begin(&settings(dir.path(), 1024), SNAP, &node("cp-1"), 1)
        .await
        .err()
        .unwrap();
    assert_eq!(refused, BackupError::SnapshotGone(SNAP.to_string()));
    // Rotated away while the bytes arrived: still nothing kept.
    let dir = with_snapshot();
    let data = b"archive";
    let mut incoming = Incoming::begin(&settings(dir.path(), 1024), SNAP, &node("cp-1"), 7)
        .await
        .unwrap();
    incoming.write(data).await.unwrap();
    incoming.verify(&sha(data)).await.unwrap();
    std::fs::remove_file(dir.path().join(SNAP)).unwrap();
    let refused = incoming.keep(&sha(data)).await.unwrap_err();
    assert_eq!(refused, BackupError::SnapshotGone(SNAP.to_string()));
    assert_eq!(names(dir.path()), vec![format!("{SNAP}.sha256")]);
}

#[tokio::test]
async fn rotation_removes_backups_with_their_snapshot_and_keeps_the_pairs_it_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let snaps = [
        "etcd-20261121T220000.000Z-m1.db",
        "etcd-20261121T221000.000Z-m2.db",
        "etcd-20261121T222000.000Z-m1.db",
    ];
    for snap in snaps {
        for file in [
            snap.to_string(),
            format!("{snap}.sha256"),
            format!("{snap}.control-plane-cp-1.tar.gz"),
            format!("{snap}.control-plane-cp-1.tar.gz.sha256"),
        ] {
            std::fs::write(dir.path().join(file), b"x").unwrap();
        }
    }
    // An orphan (its snapshot was removed by hand) and a stranger's file.
    std::fs::write(
        dir.path()
            .join("etcd-20261121T210000.000Z-m3.db.control-plane-cp-2.tar.gz"),
        b"x",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    super::super::snapshot::rotate(dir.path(), 2).await.unwrap();
    let mut expected = vec!["notes.txt".to_string()];
    for snap in &snaps[1..] {
        expected.extend([
            snap.to_string(),
            format!("{snap}.control-plane-cp-1.tar.gz"),
            format!("{snap}.control-plane-cp-1.tar.gz.sha256"),
            format!("{snap}.sha256"),
        ]);
    }
    expected.sort();
    assert_eq!(names(dir.path()), expected);
}

#[tokio::test]
async fn status_lists_the_newest_backups_with_their_snapshot_and_checksum() {
    let dir = with_snapshot();
    let data = b"archive";
    upload(&settings(dir.path(), 1024), data, &sha(data), 7)
        .await
        .unwrap();
    let listed = newest(dir.path(), LISTED).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].node, "cp-1");
    assert_eq!(listed[0].snapshot, SNAP);
    assert_eq!(listed[0].sha256, sha(data));
    assert_eq!(listed[0].size, 7);
    assert!(
        newest(&dir.path().join("missing"), 3)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn rotation_keeps_the_newest_pair_of_each_node_whatever_came_after() {
    // S0 holds cp-0's backup; then more snapshots than kept, without one
    // (say a control-plane grant retried with a new snapshot each time).
    let dir = tempfile::tempdir().unwrap();
    let s0 = "etcd-20261121T200000.000Z-m1.db";
    let pair = [
        s0.to_string(),
        format!("{s0}.sha256"),
        format!("{s0}.control-plane-cp-0.tar.gz"),
        format!("{s0}.control-plane-cp-0.tar.gz.sha256"),
    ];
    for file in &pair {
        std::fs::write(dir.path().join(file), b"x").unwrap();
    }
    let later: Vec<String> = (0..6)
        .map(|i| format!("etcd-20261121T21{i}000.000Z-m2.db"))
        .collect();
    for snap in &later {
        std::fs::write(dir.path().join(snap), b"x").unwrap();
    }
    super::super::snapshot::rotate(dir.path(), 5).await.unwrap();
    let mut expected: Vec<String> = pair.to_vec();
    expected.extend(later[1..].iter().cloned());
    expected.sort();
    assert_eq!(names(dir.path()), expected);
}

#[tokio::test]
async fn a_failed_replacement_keeps_the_previous_pair_whole() {
    let dir = with_snapshot();
    let settings = settings(dir.path(), 1024);
    let first = b"the first archive";
    upload(&settings, first, &sha(first), first.len() as u64)
        .await
        .unwrap();
    // The agent sends it again; writing the new checksum fails.
    in_the_way(&dir.path().join(".checksum.sha256.part"));
    in_the_way(
        &dir.path()
            .join(format!(".{SNAP}.control-plane-cp-1.tar.gz.sha256.part")),
    );
    let again = b"the second archive";
    let failed = upload(&settings, again, &sha(again), again.len() as u64)
        .await
        .unwrap_err();
    assert!(matches!(failed, BackupError::Io(_)), "{failed:?}");
    let name = format!("{SNAP}.control-plane-cp-1.tar.gz");
    assert_eq!(
        std::fs::read(dir.path().join(&name)).unwrap(),
        first,
        "the kept archive stays"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join(format!("{name}.sha256"))).unwrap(),
        format!("{}  {name}\n", sha(first)),
        "with its own checksum"
    );
}

#[tokio::test]
async fn a_long_node_name_is_kept_while_its_final_names_fit() {
    let dir = with_snapshot();
    // The longest node whose checksum file name still fits in 255 bytes.
    let room = 255 - format!("{SNAP}.control-plane-.tar.gz.sha256").len();
    let labels = format!("{}.", "n".repeat(62)).repeat(5);
    let long = node(labels[..room.min(crate::node::MAX_NODE_NAME_LEN)].trim_end_matches('.'));
    let data = b"archive";
    let mut incoming = Incoming::begin(&settings(dir.path(), 1024), SNAP, &long, 7)
        .await
        .unwrap();
    incoming.write(data).await.unwrap();
    incoming.verify(&sha(data)).await.unwrap();
    let kept = incoming.keep(&sha(data)).await.unwrap();
    assert!(dir.path().join(&kept.name).is_file());
    assert!(dir.path().join(format!("{}.sha256", kept.name)).is_file());
}

#[tokio::test]
async fn rotation_removes_temp_files_a_crash_left_behind_but_not_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir
        .path()
        .join(".etcd-x.db.control-plane-cp-1.tar.gz.1.2.part");
    let fresh = dir.path().join(".bk-1-3.part");
    for file in [&old, &fresh] {
        std::fs::write(file, b"private keys").unwrap();
    }
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(day_ago)
        .unwrap();
    super::super::snapshot::rotate(dir.path(), 5).await.unwrap();
    assert!(!old.exists(), "a day-old temp file is a leftover");
    assert!(fresh.exists(), "a fresh one may be an upload in progress");
}
