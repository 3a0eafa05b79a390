//! Debian packages and a flat local apt repository, for update scenarios.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `name_version_all.deb` in `dir` with `dpkg-deb --build`. It installs
/// `/usr/share/NAME/version` and runs `postinst` (a shell script body) if
/// given.
pub fn build_deb(dir: &Path, name: &str, version: &str, postinst: Option<&str>) -> Result<PathBuf> {
    let tree = tempfile::tempdir()?;
    let root = tree.path();
    fs::create_dir_all(root.join("DEBIAN"))?;
    fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\n\
             Maintainer: Baton tests <tests@example.invalid>\n\
             Description: Baton test package\n"
        ),
    )?;
    if let Some(script) = postinst {
        let path = root.join("DEBIAN/postinst");
        fs::write(&path, format!("#!/bin/sh\nset -e\n{script}\n"))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    let share = root.join("usr/share").join(name);
    fs::create_dir_all(&share)?;
    fs::write(share.join("version"), format!("{version}\n"))?;
    fs::create_dir_all(dir)?;
    let deb = dir.join(format!("{name}_{version}_all.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(root)
        .arg(&deb)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb --build failed");
    }
    Ok(deb)
}

/// Write a flat `Packages` index for every .deb in `dir`, for
/// `deb [trusted=yes] file:/repo ./`.
pub fn write_packages_index(dir: &Path) -> Result<()> {
    let mut index = String::new();
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    for deb in debs {
        let control = Command::new("dpkg-deb").arg("-f").arg(&deb).output()?;
        if !control.status.success() {
            bail!("dpkg-deb -f {} failed", deb.display());
        }
        let bytes = fs::read(&deb)?;
        index.push_str(String::from_utf8_lossy(&control.stdout).trim_end());
        index.push_str(&format!(
            "\nFilename: ./{}\nSize: {}\nSHA256: {}\n\n",
            deb.file_name().unwrap().to_string_lossy(),
            bytes.len(),
            hex::encode(Sha256::digest(&bytes))
        ));
    }
    fs::write(dir.join("Packages"), index)?;
    Ok(())
}
