//! Installs the Debian packages the build and the tests need, when they are
//! missing: with apt-get as root, or a clear message naming them otherwise.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// A package and a file that shows it is installed.
pub type Package = (&'static str, &'static str);

/// What `cargo build` needs: etcd-client compiles its protos with protoc.
pub const BUILD: &[Package] = &[("protobuf-compiler", "/usr/bin/protoc")];

/// Everything: the build plus real etcd, systemd-nspawn, debootstrap and dbus
/// for the end-to-end tests.
pub const ALL: &[Package] = &[
    ("protobuf-compiler", "/usr/bin/protoc"),
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    ("systemd-container", "/usr/bin/systemd-nspawn"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    ("dbus", "/usr/bin/dbus-daemon"),
    ("dpkg-dev", "/usr/bin/dpkg-scanpackages"),
];

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

/// Installs whichever of `packages` are missing.
pub fn ensure(packages: &[Package]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !std::path::Path::new(file).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (run as root to install them, or apt-get install them)",
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
    Ok(())
}
