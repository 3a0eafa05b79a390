//! What the bench tests share: run `baton-devtools bench <name>` into a
//! fresh directory, one bench at a time, and read the report it must write
//! whatever happened; then check its exit status against its verdict.
//! Every bench runs a coordinator (`--coordinator PATH`), so every run
//! names one: the test's, or the workspace's debug build.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// One bench at a time: each starts its own processes (coordinators, an
/// etcd cluster, an agent), and the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// What one bench run left: its output, its report, and the directory
/// holding them (removed when dropped).
pub struct Bench {
    /// Its exit status, stdout and stderr.
    pub output: Output,
    /// Its report (`report`.json in `out`).
    pub report: Value,
    /// Its `--out` directory.
    pub out: tempfile::TempDir,
}

impl Bench {
    /// Runs `baton-devtools bench <bench> ARGS --coordinator C --out DIR`
    /// with `env` added to its environment, into a fresh DIR, one bench at a
    /// time; C is `coordinator` or the workspace's debug coordinator (see
    /// [`program`]). Reads the report the bench must write whatever
    /// happened (DIR/`report`.json).
    pub fn run<A: AsRef<OsStr>>(
        bench: &str,
        coordinator: Option<&Path>,
        args: impl IntoIterator<Item = A>,
        env: &[(&str, &OsStr)],
        report: &str,
    ) -> Self {
        let coordinator = program(coordinator, "baton-coordinator");
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let out = tempfile::tempdir().expect("temp dir");
        let output = Command::new(env!("CARGO_BIN_EXE_baton-devtools"))
            .args(["bench", bench])
            .args(args)
            .arg("--coordinator")
            .arg(&coordinator)
            .arg("--out")
            .arg(out.path())
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap_or_else(|e| panic!("running baton-devtools bench {bench}: {e}"));
        let path = out.path().join(format!("{report}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} not written ({e}); {}",
                path.display(),
                describe(&output)
            )
        });
        let report = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()));
        Bench {
            output,
            report,
            out,
        }
    }

    /// The run succeeded and its report's verdict agrees; the report.
    pub fn succeeded(&self) -> &Value {
        assert!(self.output.status.success(), "{}", describe(&self.output));
        assert_eq!(
            self.report["verdict"]["ok"], true,
            "the report disagrees: {:#}",
            self.report
        );
        &self.report
    }

    /// The run failed, saying `why` on stderr, and its report's verdict
    /// agrees; the report.
    pub fn failed(&self, why: &str) -> &Value {
        assert!(!self.output.status.success(), "{}", describe(&self.output));
        let stderr = String::from_utf8_lossy(&self.output.stderr);
        assert!(
            stderr.contains("did not do its job") && stderr.contains(why),
            "no \"did not do its job\" and {why:?} on stderr: {}",
            describe(&self.output)
        );
        assert_eq!(
            self.report["verdict"]["ok"], false,
            "the report disagrees: {:#}",
            self.report
        );
        &self.report
    }
}

/// `given`, or else the workspace's debug build of `name` (built first when
/// stale): the program a bench is told to run.
pub fn program(given: Option<&Path>, name: &str) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| baton_tests::binary(name))
}

/// An executable shell script `name` in `dir` running `body`: a program
/// that misbehaves the way a test needs.
#[allow(dead_code)] // bench_fleet.rs needs none
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("writing a script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A process's exit status and output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number at JSON `pointer` in `value`; panics, showing `value`, when
/// there is none.
pub fn number(value: &Value, pointer: &str) -> f64 {
    value
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {value:#}"))
}

/// Every figure at `pointers` in `value` is a positive number.
pub fn assert_positive(value: &Value, pointers: &[&str]) {
    for p in pointers {
        assert!(number(value, p) > 0.0, "{p} is not positive: {value:#}");
    }
}
