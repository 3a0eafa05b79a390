//! `batonctl plan`: the order waiting nodes would go in and what each waits
//! for, computed with the grant rule on a copy of the state: nothing is
//! granted, the queue is untouched.

use std::process::{Child, Stdio};
use std::time::Duration;

use baton_tests::coordinator::CoordinatorProcess;
use serde_json::Value;

/// Keeps `batonctl acquire NODE` waiting (killed on drop).
struct Waiter(Child);

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_in_queue(c: &CoordinatorProcess, node: &str, control_plane: bool) -> Waiter {
    let mut args = vec!["acquire", node];
    if control_plane {
        args.push("--control-plane");
    }
    // Killed and waited for on drop, whatever happens below.
    let waiter = Waiter(
        c.ctl_command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        let queue = c.status()["queue"].clone();
        if queue.as_array().unwrap().iter().any(|q| q["node"] == node) {
            return waiter;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{node} never queued");
}

fn plan(c: &CoordinatorProcess) -> Value {
    let out = c.ctl(&["plan", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row(plan: &Value, node: &str) -> (u64, u64, String) {
    let e = plan["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {plan}"));
    (
        e["order"].as_u64().unwrap(),
        e["round"].as_u64().unwrap(),
        e["reason"].as_str().unwrap().to_string(),
    )
}

#[test]
fn plan_shows_order_rounds_and_reasons_without_granting() {
    let dir = tempfile::tempdir().unwrap();
    let c = CoordinatorProcess::start(&dir.path().join("data"), &["--max-concurrent=2"]);
    // w1 holds; cp1 and cp2 are control-plane nodes; w2 a worker.
    let token = String::from_utf8(c.ctl(&["acquire", "w1"]).stdout).unwrap();
    assert!(token.trim().parse::<u64>().is_ok(), "{token}");
    let _cp_holder = wait_in_queue_or_granted(&c, "cp0");
    let _a = wait_in_queue(&c, "cp1", true);
    let _b = wait_in_queue(&c, "w2", false);
    let _d = wait_in_queue(&c, "cp2", true);
    let before = c.status();

    let p = plan(&c);
    assert_eq!(p["holders"], serde_json::json!(["w1", "cp0"]));
    // The limit is full (w1, cp0): everyone waits for a release. After w1
    // releases, cp1 cannot go while cp0 holds (one control-plane node at a
    // time), so w2 takes the slot; cp1 goes after cp0 (round 2); holders
    // are assumed to release in grant order, so cp2 goes once cp1 did,
    // after w2 (round 3) and cp1 (round 4).
    let (o_cp1, r_cp1, why_cp1) = row(&p, "cp1");
    let (o_w2, r_w2, _) = row(&p, "w2");
    let (o_cp2, r_cp2, _) = row(&p, "cp2");
    assert!(why_cp1.contains("concurrency limit"), "{why_cp1}");
    assert_eq!((o_w2, r_w2), (1, 1), "{p}");
    assert_eq!((o_cp1, r_cp1), (2, 2), "{p}");
    assert_eq!((o_cp2, r_cp2), (3, 4), "{p}");

    // Nothing was granted or dequeued.
    let after = c.status();
    assert_eq!(before["holders"], after["holders"]);
    assert_eq!(
        before["queue"].as_array().unwrap().len(),
        after["queue"].as_array().unwrap().len()
    );
    assert_eq!(before["last_fencing_token"], after["last_fencing_token"]);

    // Paused: nobody can be placed, and each says why.
    assert!(
        c.ctl(&["pause", "--reason", "change freeze"])
            .status
            .success()
    );
    let p = plan(&c);
    for node in ["cp1", "w2", "cp2"] {
        let (order, _, why) = row(&p, node);
        assert_eq!(order, 0, "{p}");
        assert!(why.contains("change freeze"), "{why}");
    }
    let table = String::from_utf8(c.ctl(&["plan"]).stdout).unwrap();
    assert!(
        table.contains("not planned") && table.contains("cp1 (cp)"),
        "{table}"
    );
}

/// `batonctl acquire --control-plane NODE` that is granted at once (there
/// is room): it returns the token.
fn wait_in_queue_or_granted(c: &CoordinatorProcess, node: &str) -> String {
    let out = c.ctl(&["acquire", node, "--control-plane"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
