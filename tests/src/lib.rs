//! Support code shared by the end-to-end tests in `tests/tests/`:
//! - [`binary`]: the path of a workspace binary, built on demand;
//! - [`require_root`]: tests that need root (nspawn, etcd on privileged
//!   paths) say so clearly instead of failing obscurely;
//! - [`ports`]: loopback ports for test servers, outside the kernel's
//!   ephemeral range so no outgoing connection takes them first.
//!
//! Harnesses for real components live in their own modules:
//! - [`etcd`]: real etcd clusters on loopback, and coordinator processes;
//! - [`kube_fake`]: an in-process fake of the Kubernetes API server;
//! - [`prometheus`]: a real Prometheus scraping an exporter the test runs;
//! - [`previous_release`]: state documents the previous release wrote.

pub mod etcd;

pub mod coordinator;
pub mod kube_fake;
pub mod nspawn;
pub mod ports;
pub mod previous_release;
pub mod prometheus;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Serializes on-demand builds of binaries across tests in one process.
static BUILD: Mutex<()> = Mutex::new(());

/// The path of workspace binary `name` (e.g. `baton-coordinator`,
/// `batonctl`, `baton-agent`) in this profile's target directory. Builds the
/// workspace's binaries first when it is missing or older than this test
/// executable (its sources changed since): a test run directly must never
/// start a stale binary. `cargo xtask test` builds them all first and says
/// so in `BATON_BINARIES_FRESH`.
pub fn binary(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable is in target/<profile>/deps")
        .to_path_buf();
    let path = profile_dir.join(name);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    // `cargo xtask test` builds every binary right before the suite.
    let fresh = std::env::var_os("BATON_BINARIES_FRESH").is_some();
    let stale = match (modified(&path), modified(&exe)) {
        (Some(binary), Some(test)) => binary < test && !fresh,
        (None, _) => true,
        (Some(_), None) => false,
    };
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins", "--workspace"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --bins failed");
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Runs `command` to completion; a failure to start or a non-zero exit is
/// an error carrying its output (for tests that run real tools:
/// promtool, podman, kubectl).
pub fn run_checked(command: &mut Command) -> anyhow::Result<std::process::Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command.output().map_err(|e| {
        anyhow::anyhow!("running {program}: {e} (cargo xtask deps installs what the tests use)")
    })?;
    if !out.status.success() {
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        anyhow::bail!(
            "{program} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Panics with a clear message unless running as root.
pub fn require_root(what: &str) {
    assert!(
        is_root(),
        "{what} needs root (run the suite with `cargo xtask test` as root, which also installs the packages it needs)"
    );
}
