//! Build script of baton-coordinator and baton-agent (one script for both
//! crates' binaries).
//!
//! 1. The git revision the binaries are built from goes into
//!    `BATON_GIT_REVISION`, which their `--version` shows ("baton-agent 0.1.0
//!    (1a2b3c4d5e6f)"). `BATON_GIT_REVISION` set in the build's environment
//!    wins (a build from a source tarball can say what it is); without it and
//!    without git (or outside a git checkout) the revision is "unknown
//!    revision". The script reruns when HEAD or the branch it points at
//!    moves, and only then.
//! 2. On Linux with glibc the binaries are linked with packed relative
//!    relocations (`-z pack-relative-relocs`, DT_RELR; glibc 2.36 and GNU ld
//!    2.38 or newer, as in Debian 12, the agent image's base). A
//!    position-independent Rust binary carries one 24-byte `.rela.dyn` entry
//!    per pointer in its read-only data: 0.8 MB for the agent, which the
//!    dynamic loader reads whole at every start, so it stayed resident for
//!    the agent's life. Packed, the table is 14 KB: the agent's idle RSS
//!    fell from 10.0 to 9.2 MiB (docs/BENCHMARKS.md), with ASLR kept. An
//!    older linker ignores the option with a warning; a glibc older than
//!    2.36 refuses to load such a binary with a clear message
//!    (GLIBC_ABI_DT_RELR not found). `agent/tests/footprint.rs` checks the
//!    agent is linked so.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BATON_GIT_REVISION");
    let revision = std::env::var("BATON_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown revision".to_string());
    println!("cargo:rustc-env=BATON_GIT_REVISION={revision}");

    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os == "linux" && target_env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// `git` in the package's directory; None when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn git_revision() -> Option<String> {
    let revision = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Rerun when HEAD moves: HEAD itself, the branch it names (a loose ref
    // or the packed refs). Only existing files: cargo treats a missing one
    // as changed on every build.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(revision)
}
