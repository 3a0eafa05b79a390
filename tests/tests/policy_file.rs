//! The policy file on a real coordinator process: checked at start (a bad
//! file stops it with the line and the reason), shown by `batonctl
//! policy`, reloaded when the file changes and on SIGHUP, and a bad reload
//! is refused while the running policy stays.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::binary;
use baton_tests::coordinator::CoordinatorProcess;
use nix::sys::signal::Signal;

fn policy_json(c: &CoordinatorProcess) -> serde_json::Value {
    let out = c.ctl(&["policy", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gave up waiting for: {what}");
}

/// Rewrites the file in place (same inode), as `>` in a shell does.
fn rewrite(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// Runs `serve` with `policy` and `extra`; it must exit at once.
fn refused_start(dir: &Path, policy: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(binary("baton-coordinator"))
        .args([
            "serve",
            "--insecure",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
        ])
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--policy={}", policy.display()))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_bad_file_stops_the_start_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "maxConcurrent: 2\nwebhooks:\n  - url: http://x\n    evnts: [granted]\n",
    )
    .unwrap();
    let out = refused_start(dir.path(), &policy, &[]);
    assert!(!out.status.success(), "the coordinator started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy.yaml:4:"), "{stderr}");
    assert!(stderr.contains("evnts"), "{stderr}");

    // A setting given twice: both places are named.
    std::fs::write(&policy, "maxConcurrent: 2\n").unwrap();
    let out = refused_start(dir.path(), &policy, &["--max-concurrent=3"]);
    assert!(!out.status.success(), "the coordinator started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policy.yaml:1") && stderr.contains("--max-concurrent=3"),
        "{stderr}"
    );
}

#[test]
fn reloads_on_change_and_sighup_and_keeps_the_running_policy_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let policy = conf.join("policy.yaml");
    std::fs::write(&policy, "maxConcurrent: 2\nwindows: []\n").unwrap();
    let c = CoordinatorProcess::start(
        &dir.path().join("data"),
        &[&format!("--policy={}", policy.display())],
    );
    let shown = policy_json(&c);
    assert!(
        shown["source"].as_str().unwrap().contains("policy.yaml"),
        "{shown}"
    );
    assert!(
        shown["yaml"].as_str().unwrap().contains("maxConcurrent: 2"),
        "{shown}"
    );
    assert_eq!(c.status()["max_concurrent"], 2);
    let table = c.ctl(&["policy"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("# source: file "), "{table}");

    // A bad edit is refused with its line; the policy in force stays.
    std::fs::write(
        &policy,
        "maxConcurrent: 5\nhealthGate:\n  querry: up == 0\n",
    )
    .unwrap();
    until("the refused reload shows", Duration::from_secs(10), || {
        policy_json(&c)["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    });
    let shown = policy_json(&c);
    let error = shown["last_error"].as_str().unwrap();
    assert!(
        error.contains("policy.yaml:3:") && error.contains("querry"),
        "{error}"
    );
    assert!(
        shown["yaml"].as_str().unwrap().contains("maxConcurrent: 2"),
        "{shown}"
    );
    assert_eq!(c.status()["max_concurrent"], 2);

    // A good edit goes in force (inotify on the directory).
    std::fs::write(&policy, "maxConcurrent: 3\n").unwrap();
    until("maxConcurrent 3", Duration::from_secs(10), || {
        c.status()["max_concurrent"] == 3
    });
    assert_eq!(policy_json(&c)["last_error"], "");
    std::thread::sleep(Duration::from_millis(1000));

    // A change inotify on the directory cannot see (written through a
    // hard link elsewhere) goes in force on SIGHUP.
    let other = dir.path().join("elsewhere.yaml");
    std::fs::hard_link(&policy, &other).unwrap();
    rewrite(&other, "maxConcurrent: 4\n");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.status()["max_concurrent"], 3, "reloaded without a signal");
    c.signal(Signal::SIGHUP);
    until(
        "maxConcurrent 4 after SIGHUP",
        Duration::from_secs(10),
        || c.status()["max_concurrent"] == 4,
    );
}
