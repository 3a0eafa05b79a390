//! The agent binary the nodes run, and where the harness keeps its files.
//!
//! `crate::binary` only builds a binary when it is missing. The nodes must
//! never run a stale agent, so the harness runs `cargo build --workspace
//! --bins` once per test process: the same command `cargo xtask test` runs
//! before the tests, so it is a no-op there (a `-p baton-agent` build would
//! unify features differently and rebuild half the dependency tree).

use anyhow::{Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The cargo target directory (`CARGO_TARGET_DIR`, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of a freshly built `baton-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let path = crate::binary("baton-agent");
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace_root())
                .args(["build", "--workspace", "--bins"]);
            if path.parent().is_some_and(|p| p.ends_with("release")) {
                cmd.arg("--release");
            }
            match cmd.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("cargo build --workspace --bins failed: {s}")),
                Err(e) => Err(format!("running cargo: {e}")),
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    if !path.exists() {
        bail!("{} missing after cargo build", path.display());
    }
    Ok(path)
}
