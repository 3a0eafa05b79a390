//! Small helpers shared by tasks.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask's manifest dir is `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs cargo with `args` in the workspace root; fails on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(&cargo);
    command.args(args).current_dir(workspace_root());
    if std::env::var_os("CI").is_some() {
        // A fresh clone builds once: incremental artifacts only cost disk.
        command.env("CARGO_INCREMENTAL", "0");
    }
    let status = command
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// A child process killed when dropped, however the task ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds every release binary. Benches and `serve` all use this one
/// command, so cargo resolves features once and nothing is rebuilt between
/// them.
pub fn build_release_bins() -> Result<()> {
    cargo(&["build", "--release", "--workspace", "--bins"])
}
