//! The lab as part of the suite: `baton-devtools lab --chaos` with a fixed
//! seed on a small cluster (3 etcd nodes, so the etcd pause has a third
//! member to act on, and 1 worker), checked from its exit status and its
//! report. Needs root (systemd-nspawn), etcd and debootstrap, which
//! `cargo xtask test` installs and provides.

use std::process::Command;

use serde_json::Value;

#[test]
fn chaos_lab_rolls_the_update_through_every_node_with_every_monitor_green() {
    baton_tests::require_root("the lab (systemd-nspawn nodes)");
    // The lab runs the agent and the coordinator next to itself.
    for name in ["baton-agent", "baton-coordinator", "batonctl"] {
        baton_tests::binary(name);
    }
    let out = tempfile::tempdir().expect("temp dir");
    let status = Command::new(env!("CARGO_BIN_EXE_baton-devtools"))
        .args([
            "lab",
            "--chaos",
            "--seed",
            "11",
            "--nodes",
            "3",
            "--workers",
            "1",
            // Its own addresses: a lab someone runs by hand uses 127.0.1.x.
            "--subnet",
            "127.0.3",
            "--timeout",
            "400",
        ])
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("running baton-devtools lab");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report.json")).expect("report.json written"),
    )
    .expect("report.json parses");
    let verdicts = report["verdicts"].as_array().expect("verdicts");
    let failed: Vec<&Value> = verdicts.iter().filter(|v| v["ok"] != true).collect();
    assert!(
        status.success() && failed.is_empty(),
        "lab exited {status}; failed verdicts: {failed:#?}"
    );
    let monitors: Vec<&str> = verdicts
        .iter()
        .filter_map(|v| v["monitor"].as_str())
        .collect();
    for monitor in [
        "nodes-down",
        "etcd-writes",
        "etcd-members-down",
        "reboots-match-audit",
        "package-updated",
        "fencing-tokens",
        "rollout",
        "control-plane-backups",
        "chaos",
    ] {
        assert!(
            monitors.contains(&monitor),
            "no {monitor} verdict: {monitors:?}"
        );
    }
    let faults: Vec<&str> = report["seen"]["faults"]
        .as_array()
        .expect("faults")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    for kind in [
        "kill-coordinator",
        "kill-agent",
        "pause-etcd-member",
        "freeze-coordinator",
    ] {
        assert!(faults.contains(&kind), "{kind} not injected: {faults:?}");
    }
    let html = std::fs::read_to_string(out.path().join("report.html")).expect("report.html");
    assert!(
        html.contains("<svg") && !html.contains("http://")
            || html.contains("xmlns=\"http://www.w3.org/2000/svg\"")
    );
}
