//! The command lines as an operator meets them: `--version` names the git
//! revision; a binary that cannot start prints one last line on stderr
//! (after any log lines), prefixed with the program's name, naming what is
//! wrong and what to do (the flag to fix, the thing to check), and exits 1.

use std::process::Command;

use baton_tests::binary;
use baton_tests::ports::free_port;

/// Runs `program` with `args` (no BATON_* settings from the environment);
/// returns its stderr after checking it failed.
fn fails(program: &str, args: &[&str]) -> String {
    let mut command = Command::new(binary(program));
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("BATON_") || key == "KUBECONFIG" {
            command.env_remove(key);
        }
    }
    let out = command.output().expect("running the binary");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{program} {args:?}: {stderr}");
    // Logs may come first; the error is the last line.
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("{program}: ")),
        "{program} {args:?} says who it is: {stderr}"
    );
    assert!(
        !stderr.contains("Caused by") && !stderr.contains("Error: "),
        "one line, not a debug dump: {stderr}"
    );
    stderr
}

fn says(stderr: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(stderr.contains(w), "{w:?} missing from: {stderr}");
    }
}

#[test]
fn the_coordinator_names_the_flag_or_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("--data-dir={}", dir.path().join("data").display());
    let missing = dir.path().join("missing.pem");
    let missing = missing.display().to_string();
    let free = || format!("127.0.0.1:{}", free_port());
    let listen = format!("--listen={}", free());
    let metrics = format!("--metrics-listen={}", free());

    let err = fails(
        "baton-coordinator",
        &[
            "serve",
            &listen,
            &metrics,
            &data,
            "--tls-cert",
            &missing,
            "--tls-key",
            &missing,
            "--insecure",
        ],
    );
    says(&err, &["--tls-cert", &missing]);

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("--listen={}", busy.local_addr().unwrap());
    // A new store is refused without --initialize (before the listener is
    // bound), so this one gets a fresh data directory of its own.
    let fresh = format!("--data-dir={}", dir.path().join("fresh").display());
    let err = fails(
        "baton-coordinator",
        &[
            "serve",
            &busy,
            &metrics,
            &fresh,
            "--insecure",
            "--initialize",
        ],
    );
    says(&err, &["--listen"]);

    let err = fails(
        "baton-coordinator",
        &[
            "serve",
            &listen,
            &metrics,
            &data,
            "--insecure",
            "--window",
            "Mon-Fri 25:00-04:00 UTC",
        ],
    );
    says(&err, &["HH:MM"]);

    let err = fails("baton-coordinator", &["serve", &listen, &metrics, &data]);
    says(&err, &["--client-ca", "--insecure"]);

    let err = fails(
        "baton-coordinator",
        &[
            "serve",
            &listen,
            &metrics,
            &data,
            "--insecure",
            "--store=etcd",
        ],
    );
    says(&err, &["--etcd-endpoints"]);
}

#[test]
fn batonctl_names_the_flag_or_the_fix() {
    let unused = format!("http://127.0.0.1:{}", free_port());
    let err = fails(
        "batonctl",
        &["--insecure", "--coordinator", &unused, "status"],
    );
    says(
        &err,
        &["connecting to", "is the coordinator running", "--kube"],
    );

    let err = fails("batonctl", &["--coordinator", &unused, "status"]);
    says(&err, &["--insecure"]);

    let err = fails(
        "batonctl",
        &[
            "--coordinator",
            "https://127.0.0.1:1",
            "--ca",
            "/nonexistent/ca.pem",
            "status",
        ],
    );
    says(&err, &["--ca", "/nonexistent/ca.pem"]);
}

#[test]
fn the_agent_names_the_flag_or_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let state = format!("--state-dir={}", dir.path().display());
    let err = fails(
        "baton-agent",
        &[
            "run",
            "--node=n1",
            "--coordinator=https://127.0.0.1:1",
            "--ca=/nonexistent/ca.pem",
            "--token-file=/nonexistent/token",
            &state,
        ],
    );
    says(&err, &["--ca", "/nonexistent/ca.pem"]);

    let bus = format!("unix:path={}", dir.path().join("no-bus").display());
    let err = fails(
        "baton-agent",
        &[
            "run",
            "--node=n1",
            "--insecure",
            "--coordinator=http://127.0.0.1:1",
            &format!("--dbus-address={bus}"),
            &state,
        ],
    );
    says(
        &err,
        &["D-Bus", "--dbus-address", "/run/dbus/system_bus_socket"],
    );
}

#[test]
fn every_binary_reports_its_version_and_git_revision() {
    for program in [
        "baton-coordinator",
        "batonctl",
        "kubectl-baton",
        "baton-agent",
    ] {
        let out = Command::new(binary(program))
            .arg("--version")
            .output()
            .expect("running --version");
        assert!(out.status.success());
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let rest = line
            .strip_prefix(&format!("{program} {} (", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{program} --version: {line:?}"));
        // Built from this checkout: the revision is a commit of it (the
        // binary may predate the newest commit, so not necessarily HEAD).
        assert_eq!(rest.len(), 12, "{line}");
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{rest}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running git");
        assert!(known.success(), "{program}: {rest} is not a commit here");
    }
}
