//! The control-plane backup a grant may ask for (`backup_required`): a
//! tar.gz of `/etc/kubernetes/pki` (and any other `--backup-path`) plus,
//! in Kubernetes mode, the `kube-system/kubeadm-config` ConfigMap, sent
//! to the coordinator before the node is drained. The coordinator keeps it
//! beside the etcd snapshot taken for the grant.
//!
//! Layout of the archive: each path under its absolute path without the
//! leading `/` (`etc/kubernetes/pki/ca.key`), with its mode, owner and
//! mtime, symlinks kept as symlinks; the ConfigMap's entries as
//! `kubeadm-config/<key>` (mode 0600). The README's restore lists it
//! (`tar -tzvf`) and unpacks it into a private staging directory
//! (`-C DIR`), never straight onto `/`.
//!
//! The archive holds private keys: it is written mode 0600 into the
//! agent's state directory, never logged, and removed when it is dropped
//! (after the upload, sent or not). A given path that does not exist is
//! an error: a backup missing the certificates is no backup. So is one
//! holding no regular file, or a `pki` directory without a `*.key` or
//! `*.crt`. A path that is a symlink (a relocated `/etc/kubernetes/pki`)
//! is archived as what it points to, under its own name; links inside it
//! stay links.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The default `--backup-path`.
pub const DEFAULT_PATH: &str = "/etc/kubernetes/pki";

/// The archive's directory for the kubeadm-config ConfigMap's entries.
pub const KUBEADM_CONFIG_DIR: &str = "kubeadm-config";

/// The largest piece of the archive sent in one message.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Why a backup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A path to back up does not exist.
    #[error("{path} does not exist (set --backup-path to what this node has)")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// A path holds nothing worth keeping (no regular file; a `pki`
    /// directory without a `*.key` or `*.crt`).
    #[error("{path} holds {what}: no backup is made of it")]
    Empty {
        /// The path.
        path: PathBuf,
        /// What it lacks.
        what: &'static str,
    },
    /// No path to back up was given.
    #[error("no --backup-path given")]
    NoPaths,
    /// Reading a file or writing the archive failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// An archive written to disk; the file is removed when this is dropped.
#[derive(Debug)]
pub struct Archive {
    /// The file (mode 0600).
    pub path: PathBuf,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

impl Drop for Archive {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The temp name of the archive for `token` in `dir`.
fn archive_path(dir: &Path, token: u64) -> PathBuf {
    dir.join(format!(".backup-{token}.tar.gz"))
}

/// Removes archives a killed agent left in `dir` (they hold keys).
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".backup-") && name.ends_with(".tar.gz") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The most directory entries looked at to tell whether a path holds
/// anything worth keeping.
const CONTENT_SCAN_LIMIT: usize = 100_000;

/// Checks that `real` (what the given `path` resolves to) holds at least
/// one regular file, and for a `pki` directory a `*.key` or `*.crt`:
/// an empty tree archived would count as a backup and be none.
fn check_contents(path: &Path, real: &Path) -> Result<(), BackupError> {
    let pki = path.file_name().is_some_and(|n| n == "pki");
    let mut files = 0usize;
    let mut keys = 0usize;
    let mut seen = 0usize;
    let mut stack = vec![real.to_path_buf()];
    while let Some(at) = stack.pop() {
        let meta =
            std::fs::symlink_metadata(&at).map_err(io(format!("reading {}", at.display())))?;
        if meta.is_file() {
            files += 1;
            if at.extension().is_some_and(|e| e == "key" || e == "crt") {
                keys += 1;
            }
        } else if meta.is_dir() {
            for entry in std::fs::read_dir(&at).map_err(io(format!("reading {}", at.display())))? {
                seen += 1;
                if seen > CONTENT_SCAN_LIMIT {
                    // Fail closed: nothing worth keeping found that far.
                    return Err(BackupError::Empty {
                        path: path.to_path_buf(),
                        what: "nothing worth keeping among its first 100000 entries",
                    });
                }
                stack.push(
                    entry
                        .map_err(io(format!("reading {}", at.display())))?
                        .path(),
                );
            }
        }
        if keys > 0 || (files > 0 && !pki) {
            return Ok(());
        }
    }
    Err(BackupError::Empty {
        path: path.to_path_buf(),
        what: if pki && files > 0 {
            "no *.key or *.crt"
        } else {
            "no regular file"
        },
    })
}

/// Counts and hashes what passes through to the file.
struct Hashing {
    file: File,
    hash: Sha256,
    size: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes the archive of `paths` and `kubeadm_config` (ConfigMap key and
/// value) into `dir` for the grant `token`. Blocking: run it off the
/// async threads.
pub fn build(
    paths: &[PathBuf],
    kubeadm_config: &[(String, String)],
    dir: &Path,
    token: u64,
) -> Result<Archive, BackupError> {
    if paths.is_empty() {
        return Err(BackupError::NoPaths);
    }
    // Each path as what it points to (a symlinked /etc/kubernetes/pki is
    // archived as its files, not as a link), and worth keeping.
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let Ok(real) = std::fs::canonicalize(path) else {
            return Err(BackupError::Missing { path: path.clone() });
        };
        check_contents(path, &real)?;
        sources.push((path, real));
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    remove_leftovers(dir);
    let path = archive_path(dir, token);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    // From here on a failure removes the file (the Archive's drop).
    let mut archive = Archive {
        path,
        sha256: String::new(),
        size: 0,
    };
    let hashing = Hashing {
        file,
        hash: Sha256::new(),
        size: 0,
    };
    let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    for (given, source) in &sources {
        let name = given.strip_prefix("/").unwrap_or(given);
        let meta = std::fs::symlink_metadata(source)
            .map_err(io(format!("reading {}", source.display())))?;
        if meta.is_dir() {
            tar.append_dir_all(name, source)
        } else {
            tar.append_path_with_name(source, name)
        }
        .map_err(io(format!("archiving {}", given.display())))?;
    }
    for (key, value) in kubeadm_config {
        let mut header = tar::Header::new_gnu();
        header.set_size(value.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        );
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(
            &mut header,
            format!("{KUBEADM_CONFIG_DIR}/{key}"),
            value.as_bytes(),
        )
        .map_err(io(format!("archiving the kubeadm-config entry {key}")))?;
    }
    let gz = tar.into_inner().map_err(io("finishing the archive"))?;
    let hashing = gz.finish().map_err(io("finishing the archive"))?;
    hashing
        .file
        .sync_all()
        .map_err(io(format!("syncing {}", archive.path.display())))?;
    archive.sha256 = hex::encode(hashing.hash.finalize());
    archive.size = hashing.size;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    /// A small pki tree with a private key (0600), a certificate (0644), a
    /// subdirectory and a symlink.
    fn pki(root: &Path) -> PathBuf {
        let pki = root.join("pki");
        std::fs::create_dir_all(pki.join("etcd")).unwrap();
        std::fs::write(pki.join("ca.crt"), b"CERT").unwrap();
        std::fs::write(pki.join("ca.key"), b"KEY").unwrap();
        std::fs::set_permissions(pki.join("ca.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::set_permissions(pki.join("ca.crt"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::write(pki.join("etcd").join("server.key"), b"ETCD KEY").unwrap();
        std::os::unix::fs::symlink("ca.crt", pki.join("current.crt")).unwrap();
        pki
    }

    /// (name, mode, contents or link target) of every entry.
    fn entries(archive: &Path) -> Vec<(String, u32, Vec<u8>)> {
        let file = File::open(archive).unwrap();
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut out = Vec::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().to_string();
            let mode = entry.header().mode().unwrap();
            let mut data = Vec::new();
            if let Some(target) = entry.link_name().unwrap() {
                data = target.to_string_lossy().as_bytes().to_vec();
            } else {
                entry.read_to_end(&mut data).unwrap();
            }
            out.push((name, mode, data));
        }
        out
    }

    #[test]
    fn the_archive_keeps_paths_modes_links_and_the_kubeadm_config_and_is_private() {
        let root = tempfile::tempdir().unwrap();
        let pki = pki(root.path());
        let work = root.path().join("state");
        let config = [("ClusterConfiguration".to_string(), "kind: X\n".to_string())];
        let archive = build(std::slice::from_ref(&pki), &config, &work, 7).unwrap();
        let mode = std::fs::metadata(&archive.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let bytes = std::fs::read(&archive.path).unwrap();
        assert_eq!(archive.size, bytes.len() as u64);
        assert_eq!(archive.sha256, hex::encode(Sha256::digest(&bytes)));
        let prefix = pki.strip_prefix("/").unwrap().to_string_lossy().to_string();
        let entries = entries(&archive.path);
        let find = |name: &str| {
            entries
                .iter()
                .find(|(n, _, _)| n.trim_end_matches('/') == format!("{prefix}/{name}"))
                .unwrap_or_else(|| panic!("{name} in {entries:?}"))
                .clone()
        };
        assert_eq!(find("ca.key").1 & 0o777, 0o600);
        assert_eq!(find("ca.key").2, b"KEY");
        assert_eq!(find("ca.crt").1 & 0o777, 0o644);
        assert_eq!(find("etcd/server.key").2, b"ETCD KEY");
        assert_eq!(
            find("current.crt").2,
            b"ca.crt",
            "the link is kept as a link"
        );
        let (_, mode, data) = entries
            .iter()
            .find(|(n, _, _)| n == "kubeadm-config/ClusterConfiguration")
            .unwrap();
        assert_eq!(
            (mode & 0o777, data.as_slice()),
            (0o600, b"kind: X\n".as_slice())
        );
        let path = archive.path.clone();
        drop(archive);
        assert!(!path.exists(), "the archive is removed once dropped");
    }

    #[test]
    fn a_missing_path_is_an_error_and_leaves_no_archive() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("state");
        let missing = root.path().join("etc/kubernetes/pki");
        let error = build(std::slice::from_ref(&missing), &[], &work, 7).unwrap_err();
        assert!(matches!(error, BackupError::Missing { .. }), "{error}");
        assert!(error.to_string().contains("--backup-path"), "{error}");
        assert!(matches!(
            build(&[], &[], &work, 7),
            Err(BackupError::NoPaths)
        ));
        assert!(!archive_path(&work, 7).exists());
    }

    #[test]
    fn archives_a_killed_agent_left_behind_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let pki = pki(root.path());
        let work = root.path().join("state");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(archive_path(&work, 3), b"old keys").unwrap();
        let archive = build(std::slice::from_ref(&pki), &[], &work, 7).unwrap();
        assert!(!archive_path(&work, 3).exists());
        assert!(archive.path.exists());
    }

    #[test]
    fn a_symlinked_path_is_archived_as_what_it_points_to() {
        // /etc/kubernetes/pki as a link to the real tree.
        let root = tempfile::tempdir().unwrap();
        let real = pki(root.path());
        let link = root.path().join("linked").join("pki");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let work = root.path().join("state");
        let archive = build(std::slice::from_ref(&link), &[], &work, 7).unwrap();
        let prefix = link
            .strip_prefix("/")
            .unwrap()
            .to_string_lossy()
            .to_string();
        let entries = entries(&archive.path);
        assert!(
            entries
                .iter()
                .any(|(n, _, d)| *n == format!("{prefix}/ca.key") && d == b"KEY"),
            "the files under the link's name: {entries:?}"
        );
    }

    #[test]
    fn a_pki_directory_without_a_key_or_certificate_is_no_backup() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("state");
        let empty = root.path().join("empty").join("pki");
        std::fs::create_dir_all(&empty).unwrap();
        let error = build(std::slice::from_ref(&empty), &[], &work, 7).unwrap_err();
        assert!(matches!(error, BackupError::Empty { .. }), "{error}");
        // Only a README: still no key or certificate.
        let other = root.path().join("other").join("pki");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("README"), b"x").unwrap();
        let error = build(std::slice::from_ref(&other), &[], &work, 7).unwrap_err();
        assert!(matches!(error, BackupError::Empty { .. }), "{error}");
        // A directory that is not a pki holding no regular file at all.
        let dir = root.path().join("conf");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let error = build(std::slice::from_ref(&dir), &[], &work, 7).unwrap_err();
        assert!(matches!(error, BackupError::Empty { .. }), "{error}");
        assert!(!archive_path(&work, 7).exists());
    }
}
