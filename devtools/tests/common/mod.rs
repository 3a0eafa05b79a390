//! What the bench tests share: run `baton-devtools bench ...` into a fresh
//! directory, one bench at a time, and read the report it must write
//! whatever happened; then check its exit status and verdict.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// One bench at a time: each starts its own coordinators (and etcd
/// cluster), and the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// What one bench run left: its output, its report, and the directory
/// holding them (removed when dropped).
pub struct Bench {
    /// Its exit status, stdout and stderr.
    pub output: Output,
    /// Its report (`name`.json in `out`).
    pub report: Value,
    /// Its `--out` directory.
    pub out: tempfile::TempDir,
}

impl Bench {
    /// Runs `baton-devtools bench <words>` with `--out` a fresh directory,
    /// and `--coordinator` `coordinator` or the workspace's debug
    /// coordinator (built first when stale), one bench at a time; reads the
    /// report it must write whatever happened (`name`.json).
    pub fn run(words: &[&str], coordinator: Option<&Path>, name: &str) -> Self {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let coordinator = coordinator
            .map(Path::to_path_buf)
            .unwrap_or_else(|| baton_tests::binary("baton-coordinator"));
        let out = tempfile::tempdir().expect("temp dir");
        let output = Command::new(env!("CARGO_BIN_EXE_baton-devtools"))
            .arg("bench")
            .args(words)
            .arg("--coordinator")
            .arg(&coordinator)
            .arg("--out")
            .arg(out.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running baton-devtools bench");
        let path = out.path().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} not written ({e}); {}",
                path.display(),
                describe(&output)
            )
        });
        let report = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        Self {
            output,
            report,
            out,
        }
    }

    /// The run succeeded and its report's verdict agrees.
    pub fn succeeded(&self) -> &Value {
        assert!(self.output.status.success(), "{}", describe(&self.output));
        assert_eq!(
            self.report["verdict"]["ok"],
            Value::Bool(true),
            "{:#}",
            self.report
        );
        &self.report
    }

    /// The run failed, saying `why` on stderr, and its report's verdict
    /// agrees.
    pub fn failed(&self, why: &str) -> &Value {
        assert!(!self.output.status.success(), "{}", describe(&self.output));
        let stderr = String::from_utf8_lossy(&self.output.stderr);
        assert!(
            stderr.contains("did not do its job") && stderr.contains(why),
            "{}",
            describe(&self.output)
        );
        assert_eq!(
            self.report["verdict"]["ok"],
            Value::Bool(false),
            "{:#}",
            self.report
        );
        &self.report
    }
}

/// A process's status and output, for a failed assertion's message.
pub fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number at `pointer` in `report` (a panic naming it when absent).
pub fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {report:#}"))
}

/// Every figure at `pointers` in `report` is a positive number.
pub fn assert_positive(report: &Value, pointers: &[&str]) {
    for p in pointers {
        assert!(number(report, p) > 0.0, "{p} is not positive: {report:#}");
    }
}
