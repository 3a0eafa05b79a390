//! Small helpers shared by tasks.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (xtask's manifest dir is `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The target directory cargo builds into (`CARGO_TARGET_DIR` or
/// `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs cargo with `args` in the workspace root; fails on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// [`cargo`] with extra environment variables for it and what it starts.
pub fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(&cargo);
    command.args(args).current_dir(workspace_root());
    command.envs(env.iter().copied());
    if std::env::var_os("CI").is_some() {
        // A fresh clone builds once: incremental artifacts only cost disk.
        command.env("CARGO_INCREMENTAL", "0");
    }
    run(&mut command, &format!("{cargo} {}", args.join(" ")))
}

/// Builds every release binary, baton-devtools included. `serve`, the
/// benches and the lab all use this one command, so cargo resolves features
/// once and nothing is rebuilt between them.
pub fn build_release_bins() -> Result<()> {
    cargo(&["build", "--release", "--workspace", "--bins"])
}

/// Runs the release binary `name` with `args` (after [`build_release_bins`]).
pub fn run_release_bin(name: &str, args: &[String]) -> Result<()> {
    let path = target_dir().join("release").join(name);
    let mut command = Command::new(&path);
    command.args(args).current_dir(workspace_root());
    run(&mut command, &path.display().to_string())
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
