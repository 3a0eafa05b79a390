//! The Debian packages the build, the main job and the tests need, and the
//! programs they start: installed with apt-get as root when missing, or a
//! clear message naming them otherwise.
//!
//! The table is checked against the source tree by a test: every program a
//! crate of this workspace starts by name (`Command::new("...")`) must be
//! listed here, with the package that ships it, so a fresh machine gets it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A program something in the workspace starts, and where it comes from.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// The name it is started by.
    pub name: &'static str,
    /// The Debian package that ships it.
    pub package: &'static str,
    /// What needs it (documentation; shown when it is missing).
    pub used_by: &'static str,
}

const fn program(name: &'static str, package: &'static str, used_by: &'static str) -> Program {
    Program {
        name,
        package,
        used_by,
    }
}

/// What `cargo build` needs: etcd-client's build script compiles its protos
/// with protoc, and they import Google's well-known types, which Debian
/// ships apart from protoc (our own protos use protox and need nothing).
/// An entry with a slash is a file that shows the package is there.
pub const BUILD: &[Program] = &[
    program(
        "protoc",
        "protobuf-compiler",
        "the build (etcd-client's build script)",
    ),
    program(
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
        "the build (protoc's well-known types)",
    ),
    program(
        "git",
        "git",
        "the revision in --version and image labels (without it: \"unknown\")",
    ),
];

/// Real etcd for the guard, the etcd store, the nemesis and the etcd bench.
pub const ETCD: &[Program] = &[
    program("etcd", "etcd-server", "etcd tests, bench, lab"),
    program(
        "etcdctl",
        "etcd-client",
        "etcd tests (snapshot checks, the restore walkthrough), lab",
    ),
];

/// Real systemd nodes: systemd-nspawn containers from a debootstrap rootfs,
/// a local apt repository, and the agent's own needs on a host.
pub const NODES: &[Program] = &[
    program("systemd-nspawn", "systemd-container", "nspawn tests, lab"),
    program("debootstrap", "debootstrap", "the nodes' root filesystem"),
    program(
        "dbus-daemon",
        "dbus",
        "bench agent and its tests (a private bus)",
    ),
    program("journalctl", "systemd", "the agent (update unit output)"),
];

/// Monitoring: a real Prometheus for the health gate and the alert
/// blockers; promtool checks the alert rules (ours and the tests'), their
/// unit tests, the dashboard's queries and a real coordinator's /metrics.
pub const MONITORING: &[Program] = &[
    program(
        "prometheus",
        "prometheus",
        "health gate and alert blocker tests",
    ),
    program(
        "promtool",
        "prometheus",
        "monitoring tests (promtool check/test rules, check metrics), the health gate tests' rules",
    ),
];

/// Images: podman builds them from a COPY-only Containerfile on a base
/// imported from a debootstrap rootfs (no registry, no network).
pub const IMAGES: &[Program] = &[
    program("podman", "podman", "cargo xtask image, image tests"),
    program("debootstrap", "debootstrap", "the images' root filesystem"),
    program("ldd", "libc-bin", "the coordinator image's libraries"),
    program(
        "strip",
        "binutils",
        "the images' binaries without debug info",
    ),
];

/// Shipped on these machine images (Google's `kubectl` package, not
/// Debian's): the tests render the manifests with `kubectl kustomize`
/// exactly as a user would.
pub const KUBECTL: &[Program] = &[program(
    "kubectl",
    "kubectl",
    "manifest tests (kubectl kustomize)",
)];

/// Programs of Debian's essential set (or of the packages apt itself needs):
/// on every Debian 12 machine, so they are checked but never installed.
pub const ESSENTIAL: &[Program] = &[
    program("sh", "dash", "commands run through the shell"),
    program("/bin/sh", "dash", "commands run through the shell"),
    program("cp", "coreutils", "copying the rootfs per node"),
    program("chroot", "coreutils", "installing .debs into the rootfs"),
    program("nsenter", "util-linux", "reaching a node's namespaces"),
    program("getconf", "libc-bin", "bench agent (clock ticks)"),
    program("dpkg-deb", "dpkg", "building the test packages"),
    program("apt-get", "apt", "this installer"),
    program(
        "tar",
        "tar",
        "importing the images' root filesystems; unpacking control-plane backups (etcd_backup)",
    ),
    program(
        "sha256sum",
        "coreutils",
        "checking kept snapshots and backups (etcd_backup)",
    ),
];

/// Everything the test command needs (the essential programs are checked
/// too: a missing one is installed like any other).
pub fn all() -> Vec<Program> {
    [BUILD, ETCD, NODES, MONITORING, IMAGES, KUBECTL, ESSENTIAL].concat()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The path `name` would run as (a name with a slash is taken as a path).
fn find_program(name: &str) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        return Path::new(name).exists().then(|| name.into());
    }
    // sbin too: root's PATH has it, a user's may not.
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
}

/// Installs the packages of whichever of `programs` are missing, then checks
/// that every one of them can be found.
pub fn ensure(programs: &[Program]) -> Result<()> {
    let mut missing: Vec<&str> = programs
        .iter()
        .filter(|p| find_program(p.name).is_none())
        .map(|p| p.package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (run cargo xtask as root to install them, or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(missing.iter().copied());
    apt(&install)?;
    let still: Vec<String> = programs
        .iter()
        .filter(|p| find_program(p.name).is_none())
        .map(|p| format!("{} (package {}, for {})", p.name, p.package, p.used_by))
        .collect();
    if !still.is_empty() {
        bail!("installed, but still not found: {}", still.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `Command::new("name")` in the workspace's sources, with where.
    fn started_programs(dir: &Path, found: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("readable source dir") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    started_programs(&path, found);
                }
            } else if name.ends_with(".rs") && !path.ends_with("xtask/src/deps.rs") {
                let text = std::fs::read_to_string(&path).expect("readable source");
                for (i, piece) in text.split("Command::new(\"").enumerate().skip(1) {
                    let program = piece.split('"').next().unwrap_or_default();
                    found.push((program.to_string(), format!("{} #{i}", path.display())));
                }
            }
        }
    }

    #[test]
    fn every_program_the_workspace_starts_is_installed_or_essential() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut found = Vec::new();
        started_programs(root, &mut found);
        assert!(
            found.iter().any(|(p, _)| p == "systemd-nspawn"),
            "the scan found none of the known programs: {found:?}"
        );
        let known = all();
        let unknown: Vec<String> = found
            .iter()
            .filter(|(program, _)| !known.iter().any(|k| k.name == program))
            .map(|(program, at)| format!("{program} ({at})"))
            .collect();
        assert!(
            unknown.is_empty(),
            "programs started but not in xtask's package table (xtask/src/deps.rs): {unknown:?}"
        );
    }

    #[test]
    fn essential_programs_are_present_here() {
        for p in ESSENTIAL {
            assert!(find_program(p.name).is_some(), "{} missing", p.name);
        }
    }
}
