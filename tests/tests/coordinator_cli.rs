//! The coordinator and batonctl as an operator uses them: real processes,
//! `kill -9`, SIGTERM, and every batonctl command.

use baton_tests::coordinator::CoordinatorProcess;
use nix::sys::signal::Signal;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn holders_and_tokens_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = CoordinatorProcess::start(&dir.path().join("data"), &[]);
    let out = coordinator.ctl(&["acquire", "n1", "--control-plane"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token: u64 = stdout(&out).parse().expect("acquire prints the token");

    let status = coordinator.signal_and_wait(Signal::SIGKILL);
    assert!(!status.success());
    coordinator.restart();

    let status = coordinator.status();
    assert_eq!(status["holders"][0]["node"], "n1");
    assert_eq!(status["holders"][0]["token"], token);
    assert_eq!(status["holders"][0]["control_plane"], true);
    // The old token still works for its holder; the next grant is larger.
    let out = coordinator.ctl(&["release", "n1", "--token", &token.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let next: u64 = stdout(&coordinator.ctl(&["acquire", "n2"]))
        .parse()
        .unwrap();
    assert!(next > token);
}

#[test]
fn batonctl_commands_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(&dir.path().join("data"), &["--max-concurrent=1"]);
    let token: u64 = stdout(&coordinator.ctl(&["acquire", "n1"]))
        .parse()
        .unwrap();

    // Waiting times out with a non-zero exit and withdraws the request.
    let out = coordinator.ctl(&["acquire", "n2", "--wait-timeout", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("concurrency limit"),
        "{}",
        stderr(&out)
    );
    let mut status = coordinator.status();
    for _ in 0..100 {
        if status["queue"].as_array().unwrap().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        status = coordinator.status();
    }
    assert_eq!(
        status["queue"].as_array().unwrap().len(),
        0,
        "timed-out request withdrawn: {status}"
    );

    // A stale token is refused with a clear error.
    let out = coordinator.ctl(&["release", "n1", "--token", &(token + 5).to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not the current token"),
        "{}",
        stderr(&out)
    );

    // pause / resume / force-release, all audited.
    assert!(
        coordinator
            .ctl(&["pause", "--reason", "cve triage"])
            .status
            .success()
    );
    let status = coordinator.status();
    assert_eq!(status["paused"], true);
    assert_eq!(status["pause_reason"], "cve triage");
    // force-release names the token it means to take (or says --any-token):
    // without either it is refused before anything is sent, and a token the
    // node no longer holds changes nothing.
    let out = coordinator.ctl(&["force-release", "n1", "--reason", "node replaced"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--token"), "{}", stderr(&out));
    let stale = (token + 5).to_string();
    let out = coordinator.ctl(&[
        "force-release",
        "n1",
        "--token",
        &stale,
        "--reason",
        "node replaced",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not the current token"),
        "{}",
        stderr(&out)
    );
    let out = coordinator.ctl(&[
        "force-release",
        "n1",
        "--token",
        &token.to_string(),
        "--reason",
        "node replaced",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(coordinator.ctl(&["resume"]).status.success());
    let status = coordinator.status();
    let actions: Vec<&str> = status["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["initialize", "grant", "pause", "force-release", "resume"]
    );
    assert_eq!(status["audit"][3]["reason"], "node replaced");

    // hold: waits, runs the command while holding, releases, exits with its status.
    let inner_status = dir.path().join("inside.json");
    let script = format!(
        "{} --insecure --coordinator={} status -o json > {}; exit 7",
        baton_tests::binary("batonctl").display(),
        coordinator.url,
        inner_status.display()
    );
    let out = coordinator.ctl(&[
        "hold",
        "n3",
        "--reason",
        "kubeadm upgrade",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let inside: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&inner_status).unwrap()).unwrap();
    assert_eq!(inside["holders"][0]["node"], "n3");
    assert_eq!(inside["holders"][0]["phase"], "manual");
    assert_eq!(inside["holders"][0]["reason"], "kubeadm upgrade");
    let status = coordinator.status();
    assert!(
        status["holders"].as_array().unwrap().is_empty(),
        "hold released: {status}"
    );
    assert_eq!(
        status["audit"].as_array().unwrap().last().unwrap()["reason"],
        "hold: command exited with 7"
    );

    // The table form names holders and waiters.
    let _t: u64 = stdout(&coordinator.ctl(&["acquire", "n4"]))
        .parse()
        .unwrap();
    let table = stdout(&coordinator.ctl(&["status"]));
    assert!(table.contains("HOLDER") && table.contains("n4"), "{table}");

    // Plaintext without --insecure is refused by batonctl itself.
    let out = std::process::Command::new(baton_tests::binary("batonctl"))
        .args(["--coordinator", &coordinator.url, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --insecure"), "{}", stderr(&out));
}

#[test]
fn sigterm_ends_waiting_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = CoordinatorProcess::start(&dir.path().join("data"), &[]);
    let _ = stdout(&coordinator.ctl(&["acquire", "n1"]));
    let waiter = coordinator
        .ctl_command(&["acquire", "n2"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until n2 is queued.
    while coordinator.status()["queue"].as_array().unwrap().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = coordinator.signal_and_wait(Signal::SIGTERM);
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}\n{}",
        coordinator.log_text()
    );
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("shutting down"), "{}", stderr(&out));
}

/// Starts the coordinator on a data directory whose `state.json` holds
/// `document`; it must not start. What it printed, and the file after.
fn start_up_refused(document: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("state.json"), document).unwrap();
    let out = std::process::Command::new(baton_tests::binary("baton-coordinator"))
        .args([
            "serve",
            "--insecure",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
        ])
        .arg(format!("--data-dir={}", data.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    (
        stderr(&out),
        std::fs::read_to_string(data.join("state.json")).unwrap(),
    )
}

#[test]
fn corrupt_state_file_stops_start_up_with_a_clear_error() {
    let (err, left) = start_up_refused("not json");
    assert!(err.contains("state.json is corrupt"), "{err}");
    assert_eq!(left, "not json");
}

/// A state file a newer Baton wrote (a format this one does not know, in
/// a shape it does not know either) stops start-up saying so, not as a
/// corrupt file, and is left untouched.
#[test]
fn a_state_file_from_a_newer_baton_stops_start_up_saying_so() {
    let newer = r#"{"format":3,"state":{"holders":[["n1",7]]}}"#;
    let (err, left) = start_up_refused(newer);
    assert!(err.contains("written by a newer Baton (format 3"), "{err}");
    assert_eq!(left, newer);
}

#[test]
fn status_watch_prints_every_change_as_json_lines() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let coordinator = CoordinatorProcess::start(&dir.path().join("data"), &[]);
    let mut watcher = coordinator
        .ctl_command(&["status", "--watch", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read lines on a thread so a watch that goes quiet fails the test
    // instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let out = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx
                .send(serde_json::from_str(&line).expect("each line is JSON"))
                .is_err()
            {
                return;
            }
        }
    });
    let next = || rx.recv_timeout(std::time::Duration::from_secs(30)).ok();
    let first = next().expect("watch prints the state at once");
    assert!(first["holders"].as_array().unwrap().is_empty());
    let token: u64 = stdout(&coordinator.ctl(&["acquire", "w1"]))
        .parse()
        .unwrap();
    // Some later line shows w1 holding with the printed token.
    let seen = std::iter::from_fn(next).any(|v| {
        v["holders"]
            .get(0)
            .is_some_and(|h| h["node"] == "w1" && h["token"] == token)
    });
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(seen, "watch never showed w1 holding token {token}");
}
