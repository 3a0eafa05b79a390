//! What the lab checks of the control-plane backups, without trusting
//! Baton: every `<snapshot>.control-plane-<node>.tar.gz` the coordinators
//! kept is verified the way the README tells an operator to (`sha256sum -c`
//! on the archive and on its etcd snapshot, in their directory), its
//! snapshot must be there, and the archive must hold the node's private
//! key and its kubeadm configuration (`tar -tzf`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The backups kept for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeBackups {
    /// Archives that passed every check.
    pub verified: usize,
    /// What failed, a sentence each.
    pub problems: Vec<String>,
}

/// What the archive of a control-plane node must hold (paths inside it end
/// with these).
const MUST_HOLD: [&str; 2] = ["pki/apiserver.key", "kubeadm-config.yaml"];

/// Scans the coordinators' snapshot directories: node → its backups.
pub fn scan(dirs: &[&Path]) -> BTreeMap<String, NodeBackups> {
    let mut out: BTreeMap<String, NodeBackups> = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((snapshot, node)) = split(&name) else {
                continue;
            };
            let seen = out.entry(node.to_string()).or_default();
            match check(dir, &name, snapshot) {
                Ok(()) => seen.verified += 1,
                Err(e) => seen.problems.push(format!("{}/{name}: {e}", dir.display())),
            }
        }
    }
    out
}

/// `<snapshot>.control-plane-<node>.tar.gz` → (snapshot, node).
fn split(name: &str) -> Option<(&str, &str)> {
    let stem = name.strip_suffix(".tar.gz")?;
    let at = stem.find(".db.control-plane-")? + ".db".len();
    let node = stem[at..].strip_prefix(".control-plane-")?;
    (!name.starts_with('.') && !node.is_empty()).then_some((&stem[..at], node))
}

fn check(dir: &Path, archive: &str, snapshot: &str) -> Result<(), String> {
    if !dir.join(snapshot).is_file() {
        return Err(format!("its etcd snapshot {snapshot} is not there"));
    }
    for file in [archive, snapshot] {
        run(
            dir,
            "sha256sum",
            &["--check", "--strict", &format!("{file}.sha256")],
        )?;
    }
    let listing = run(dir, "tar", &["-tzf", archive])?;
    for wanted in MUST_HOLD {
        if !listing.lines().any(|l| l.ends_with(wanted)) {
            return Err(format!("the archive holds no {wanted}"));
        }
    }
    Ok(())
}

fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_snapshot_and_node() {
        assert_eq!(
            split("etcd-20261121T223000.123Z-etcd-2.db.control-plane-etcd-1.tar.gz"),
            Some(("etcd-20261121T223000.123Z-etcd-2.db", "etcd-1"))
        );
        for other in [
            "etcd-20261121T223000.123Z-etcd-2.db",
            "etcd-20261121T223000.123Z-etcd-2.db.sha256",
            "etcd-x.db.control-plane-etcd-1.tar.gz.sha256",
            ".etcd-x.db.control-plane-etcd-1.tar.gz",
            "etcd-x.db.control-plane-.tar.gz",
        ] {
            assert_eq!(split(other), None, "{other}");
        }
    }

    /// A kept pair that verifies passes; a changed byte, a missing
    /// snapshot or an archive without the key fail.
    #[test]
    fn a_pair_is_verified_as_an_operator_would() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let snapshot = "etcd-20261121T223000.123Z-etcd-2.db";
        let archive = format!("{snapshot}.control-plane-etcd-1.tar.gz");
        std::fs::write(d.join(snapshot), b"a snapshot").unwrap();
        let src = d.join("src");
        std::fs::create_dir_all(src.join("pki")).unwrap();
        std::fs::write(src.join("pki/apiserver.key"), b"key").unwrap();
        std::fs::write(src.join("kubeadm-config.yaml"), b"kind: x").unwrap();
        let sum = |file: &str| {
            let out = run(d, "sha256sum", &[file]).unwrap();
            std::fs::write(d.join(format!("{file}.sha256")), out).unwrap();
        };
        let pack = |paths: &[&str]| {
            let mut args = vec!["-czf", "../x.tar.gz"];
            args.extend_from_slice(paths);
            run(&src, "tar", &args).unwrap();
            std::fs::rename(d.join("x.tar.gz"), d.join(&archive)).unwrap();
            sum(&archive);
        };
        sum(snapshot);
        pack(&["pki", "kubeadm-config.yaml"]);
        let ok = scan(&[d]);
        assert_eq!(
            ok["etcd-1"],
            NodeBackups {
                verified: 1,
                problems: vec![]
            }
        );

        std::fs::write(d.join(snapshot), b"a snapshoT").unwrap();
        assert!(scan(&[d])["etcd-1"].problems[0].contains("sha256sum"));
        std::fs::remove_file(d.join(snapshot)).unwrap();
        assert!(scan(&[d])["etcd-1"].problems[0].contains("is not there"));
        std::fs::write(d.join(snapshot), b"a snapshot").unwrap();
        pack(&["kubeadm-config.yaml"]);
        assert!(scan(&[d])["etcd-1"].problems[0].contains("pki/apiserver.key"));
    }
}
