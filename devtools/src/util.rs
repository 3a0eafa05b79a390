//! Small helpers shared by the benches.

use std::path::PathBuf;
use std::process::Child;

use anyhow::{Context, Result};
use baton_tests::ports::free_port;

/// The workspace root (this crate's manifest dir is `<root>/devtools`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("devtools lives in the workspace")
        .to_path_buf()
}

/// The directory of the release binaries: this tool's own directory, since
/// `cargo xtask` builds every release binary with one command before it
/// starts this tool (and so honours `CARGO_TARGET_DIR`).
pub fn release_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target/release"))
}

/// A child process killed when dropped, however the task ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A gRPC channel to `url`, retried for up to 30 s while the server starts.
pub async fn connect(url: &str) -> Result<tonic::transport::Channel> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match tonic::transport::Channel::from_shared(url.to_string())?
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A coordinator on the embedded store, started for a bench.
pub struct EmbeddedCoordinator {
    /// The process (killed when dropped).
    pub process: Proc,
    /// Its gRPC port on 127.0.0.1.
    pub port: u16,
    /// Its data directory (emptied first).
    pub data: PathBuf,
}

/// Starts `binary serve --insecure` on free loopback ports with a fresh
/// data directory `data`, `extra` arguments, logging at warn to `log` (the
/// shipped default is info; warn keeps a slow coordinator's per-waiter
/// lines from filling the disk).
pub fn start_embedded_coordinator(
    binary: &std::path::Path,
    data: PathBuf,
    log: &std::path::Path,
    extra: &[&str],
) -> Result<EmbeddedCoordinator> {
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let port = free_port();
    let metrics_port = free_port();
    let child = std::process::Command::new(binary)
        // A fresh data directory holds no state: say to create it.
        .args(["serve", "--insecure", "--initialize"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
        .arg(format!("--data-dir={}", data.display()))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(EmbeddedCoordinator {
        process: Proc(child),
        port,
        data,
    })
}
