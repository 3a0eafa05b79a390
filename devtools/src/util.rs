//! Small helpers shared by the benches.

use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Context, Result, bail};
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

impl EmbeddedCoordinator {
    /// Waits (bounded) until it accepts connections on its gRPC port; an
    /// error carrying its exit status and the end of `log` when it exits
    /// first (a wrong binary, a refused flag), instead of a connect that
    /// retries against a dead process.
    pub fn wait_listening(&mut self, log: &std::path::Path) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.0.try_wait()? {
                bail!(
                    "the coordinator exited at start ({status}); its log ({}) ends:\n{}",
                    log.display(),
                    log_tail(log, 10)
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the coordinator did not listen on 127.0.0.1:{} within 30 s; its log ({}) ends:\n{}",
                    self.port,
                    log.display(),
                    log_tail(log, 10)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The last `lines` lines of the file at `path` ("(nothing)" when it is
/// empty or unreadable).
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    if tail.is_empty() {
        return "(nothing)".to_string();
    }
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
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

/// A bench's last word: `Ok` when its verdict found no failure; else an
/// error saying that `bench` did not do its job (the words the suite's
/// bench tests look for), where its report is (`written`) and each
/// failure, so the bench exits non-zero after writing its report.
pub fn job_done(bench: &str, written: &str, failures: &[String]) -> Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    bail!(
        "{bench} did not do its job ({written}):\n  {}",
        failures.join("\n  ")
    )
}

/// Which cargo profile built a binary, told cheaply from the directory
/// cargo put it in (`target/release/`, `target/debug/`); a binary kept
/// elsewhere (a baseline copied aside) is [`Build::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// In a `release` directory.
    Release,
    /// In a `debug` directory.
    Debug,
    /// Anywhere else.
    Unknown,
}

impl Build {
    /// The build of the binary at `path` (symbolic links followed).
    pub fn of(path: &Path) -> Self {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        match path
            .parent()
            .and_then(Path::file_name)
            .and_then(|d| d.to_str())
        {
            Some("release") => Build::Release,
            Some("debug") => Build::Debug,
            _ => Build::Unknown,
        }
    }

    /// Its name in a report: `release`, `debug` or `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            Build::Release => "release",
            Build::Debug => "debug",
            Build::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_is_told_from_the_directory_cargo_put_the_binary_in() {
        let of = |p: &str| Build::of(Path::new(p));
        assert_eq!(
            of("/nonexistent/target/release/baton-agent"),
            Build::Release
        );
        assert_eq!(of("/nonexistent/target/debug/baton-agent"), Build::Debug);
        assert_eq!(of("/nonexistent/baseline/baton-agent"), Build::Unknown);
        assert_eq!(of("baton-agent"), Build::Unknown);
    }
}
