//! baton-agent's host layer against real systemd and logind in
//! systemd-nspawn containers (needs root, like `agent_nspawn`):
//! - a `Type=simple` unit's start job ends when its process starts, yet the
//!   agent waits for the run to end, and sees its exit code;
//! - a logind block inhibitor on shutdown holds the reboot back, with who
//!   and why in the coordinator's view, until it goes;
//! - an update that outlives its timeout, or whose baton is force-released,
//!   is stopped (StopUnit), not left running;
//! - a hung systemd (PID 1 frozen) fails the step after the D-Bus deadline
//!   instead of hanging the agent.
//!
//! As in `agent_nspawn`, every claim is checked from outside the agent:
//! boots from the host-side supervisor, phases, messages and the audit from
//! `batonctl status`, files the units wrote from the node's rootfs.

use anyhow::{Context, Result, ensure};
use baton_tests::nspawn::cluster::{
    Cluster, check_one_real_reboot, touch_sentinel, wait_agent_running,
};
use baton_tests::nspawn::{Node, NodeSpec, wait_for};
use chrono::{DateTime, Utc};
use std::time::{Duration, SystemTime};

fn time(t: SystemTime) -> DateTime<Utc> {
    t.into()
}

/// A `Type=simple` service running `script` with /bin/sh.
fn simple(script: &str) -> String {
    format!("[Service]\nType=simple\nExecStart=/bin/sh -c '{script}'\n")
}

#[test]
fn simple_update_unit_is_waited_for_until_its_run_ends() -> Result<()> {
    // The pre-maintenance unit and the update are both Type=simple (their
    // start jobs are done at once). The update waits for a file from the
    // test, and only at its end asks for a reboot, the way a kernel
    // package's postinst does. An agent that took the start job for the
    // end would start the update before the pre unit finished, and would
    // see no reboot sentinel and release without rebooting.
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("simple-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env("BATON_UPDATE_UNIT", "site-upgrade.service")
            .env("BATON_PRE_MAINTENANCE_UNIT", "site-pre.service")
            .file(
                "/etc/systemd/system/site-pre.service",
                &simple("sleep 2; echo pre >> /var/lib/baton-test/order"),
            )
            .file(
                "/etc/systemd/system/site-upgrade.service",
                &simple(
                    "echo start >> /var/lib/baton-test/order; \
                     while [ ! -e /var/lib/baton-test/go ]; do sleep 0.2; done; \
                     echo end >> /var/lib/baton-test/order; \
                     rm -f /var/lib/baton-test/want-update; touch /run/reboot-required",
                ),
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let order = node.rootfs().join("var/lib/baton-test/order");
    wait_for("the update to start", Duration::from_secs(240), || {
        let text = std::fs::read_to_string(&order).ok()?;
        text.contains("start").then_some(text)
    })
    .with_context(|| node.diagnostics())?;
    let holder = c.wait_phase(&node, "updating")?;
    ensure!(node.boots().len() == 1, "rebooted mid-update: {holder}");
    let go = SystemTime::now();
    std::fs::write(node.rootfs().join("var/lib/baton-test/go"), "")?;
    c.wait_released(&node, 1)?;
    let ran = std::fs::read_to_string(&order)?;
    ensure!(ran == "pre\nstart\nend\n", "steps ran as {ran:?}");
    let boots = check_one_real_reboot(&node)?;
    let down = time(boots[0].ended.context("first boot ended")?);
    ensure!(
        time(go) <= down,
        "the node went down at {down}, before the update could end ({})",
        time(go)
    );
    Ok(())
}

#[test]
fn simple_update_unit_that_exits_non_zero_is_a_failure() -> Result<()> {
    // The sentinel exists from the start, so an agent that took "started"
    // for "succeeded" would reboot.
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("simplefail-1", &c.url())
            .env("BATON_CHECK_INTERVAL", "1h")
            .env("BATON_UPDATE_UNIT", "site-upgrade.service")
            .file(
                "/etc/systemd/system/site-upgrade.service",
                &simple("sleep 1; echo E: dpkg was interrupted >&2; exit 5"),
            ),
    )?;
    wait_agent_running(&node)?;
    touch_sentinel(&node)?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(error.contains("exit status 5"), "error: {holder}");
    // The output travels in the report's error (the message is one line).
    ensure!(
        error.contains("dpkg was interrupted"),
        "the run's journal lines are not in the report: {holder}\njournal: {:?}",
        node.exec(&["journalctl", "-o", "verbose", "-u", "site-upgrade.service"])
    );
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    ensure!(node.boots()[0].ended.is_none(), "node went down");
    ensure!(c.records("simplefail-1", "release").is_empty(), "released");
    Ok(())
}

#[test]
fn block_inhibitor_holds_the_reboot_back_with_its_reason_reported() -> Result<()> {
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("inhibit-1", &c.url())
            .env("BATON_CHECK_INTERVAL", "1h")
            .file(
                "/etc/systemd/system/nightly-backup.service",
                "[Service]\nType=simple\n\
                 ExecStart=/usr/bin/systemd-inhibit --what=shutdown --mode=block \
                 --who=nightly-backup \"--why=copying /srv to tape\" \
                 /bin/sh -c 'while [ ! -e /var/lib/baton-test/backup-done ]; do sleep 0.2; done'\n",
            )
            .file("/var/lib/baton-test/.keep", ""),
    )?;
    wait_agent_running(&node)?;
    let started = node.exec(&["systemctl", "start", "nightly-backup.service"])?;
    ensure!(started.status.success(), "{started:?}");
    wait_for("the inhibitor lock", Duration::from_secs(60), || {
        let out = node
            .exec(&["systemd-inhibit", "--list", "--no-legend"])
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("nightly-backup")
            .then_some(())
    })
    .with_context(|| node.diagnostics())?;
    touch_sentinel(&node)?;
    let holder = c.wait_holder(&node, "to report the inhibitor", |h| {
        h["phase"] == "rebooting"
            && h["message"]
                .as_str()
                .is_some_and(|m| m.contains("nightly-backup") && m.contains("copying /srv to tape"))
    })?;
    ensure!(
        node.boots().len() == 1 && node.boots()[0].ended.is_none(),
        "rebooted while the lock was held: {holder} {:?}",
        node.boots()
    );
    // The backup ends; its lock goes with its process.
    let lifted = SystemTime::now();
    std::fs::write(node.rootfs().join("var/lib/baton-test/backup-done"), "")?;
    c.wait_released(&node, 1)?;
    let boots = check_one_real_reboot(&node)?;
    let down = time(boots[0].ended.context("first boot ended")?);
    ensure!(
        time(lifted) <= down,
        "went down at {down}, before the lock was lifted at {}",
        time(lifted)
    );
    Ok(())
}

/// An update command that never ends by itself.
const ENDLESS_UPDATE: &str =
    "while true; do echo tick >> /var/lib/baton-test/ticks; sleep 0.2; done";

/// The state of `unit` in `node` (`systemctl is-active`).
fn unit_state(node: &Node, unit: &str) -> String {
    node.exec(&["systemctl", "is-active", unit])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Wait until `unit` no longer runs in `node`.
fn wait_stopped(node: &Node, unit: &str) -> Result<String> {
    wait_for(
        &format!("{unit} to be stopped"),
        Duration::from_secs(60),
        || {
            let state = unit_state(node, unit);
            matches!(state.as_str(), "inactive" | "failed").then_some(state)
        },
    )
    .with_context(|| {
        format!(
            "{unit} is {}\n{}",
            unit_state(node, unit),
            node.diagnostics()
        )
    })
}

#[test]
fn update_past_its_timeout_is_stopped_and_fails() -> Result<()> {
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("timeout-1", &c.url())
            .env("BATON_CHECK_INTERVAL", "1h")
            .env("BATON_UPDATE_TIMEOUT", "3s")
            .env("BATON_UPDATE_COMMAND", ENDLESS_UPDATE)
            .file("/var/lib/baton-test/.keep", ""),
    )?;
    wait_agent_running(&node)?;
    touch_sentinel(&node)?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("did not finish within 3s"),
        "error: {holder}"
    );
    // Failed is reported after the stop: the unit is already down.
    let state = unit_state(&node, "baton-update-1.service");
    ensure!(
        state == "inactive" || state == "failed",
        "the timed-out update still runs ({state})\n{}",
        node.diagnostics()
    );
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    Ok(())
}

#[test]
fn update_whose_baton_is_force_released_is_stopped() -> Result<()> {
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("fenced-1", &c.url())
            .env("BATON_CHECK_INTERVAL", "1h")
            .env("BATON_UPDATE_COMMAND", ENDLESS_UPDATE)
            .file("/var/lib/baton-test/.keep", ""),
    )?;
    wait_agent_running(&node)?;
    touch_sentinel(&node)?;
    let holder = c.wait_phase(&node, "updating")?;
    let ticks = node.rootfs().join("var/lib/baton-test/ticks");
    wait_for("the update to run", Duration::from_secs(60), || {
        ticks.exists().then_some(())
    })?;
    let token = holder["token"]
        .as_u64()
        .with_context(|| format!("no token in {holder}"))?
        .to_string();
    let out = c.coordinator.ctl(&[
        "force-release",
        "fenced-1",
        "--token",
        &token,
        "--reason",
        "node replaced",
    ]);
    ensure!(out.status.success(), "force-release: {out:?}");
    // At its next renewal the agent learns the baton is gone, and stops
    // the update it started with it.
    wait_stopped(&node, "baton-update-1.service")?;
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    Ok(())
}

#[test]
fn hung_systemd_fails_the_update_after_the_dbus_deadline() -> Result<()> {
    let c = Cluster::start()?;
    let node = Node::boot(
        NodeSpec::new("hung-1", &c.url())
            .env("BATON_CHECK_INTERVAL", "1h")
            .env("BATON_DBUS_TIMEOUT", "2s")
            .env("BATON_UPDATE_COMMAND", "true"),
    )?;
    let agent = wait_agent_running(&node)?;
    // The agent's parent is the node's systemd (PID 1 inside). Frozen, it
    // answers no D-Bus call; dbus-daemon and the agent keep running.
    let status = std::fs::read_to_string(format!("/proc/{agent}/status"))?;
    let pid1: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .context("PPid")?
        .trim()
        .parse()?;
    let pid1 = nix::unistd::Pid::from_raw(pid1);
    let frozen = Frozen(pid1);
    nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGSTOP)?;
    touch_sentinel(&node)?;
    let holder = c.wait_phase(&node, "failed")?;
    drop(frozen);
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("did not finish within 2s") || error.contains("timed out"),
        "error: {holder}"
    );
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    ensure!(c.records("hung-1", "release").is_empty(), "released");
    Ok(())
}

/// Thaws a frozen process when dropped (also when the test fails).
struct Frozen(nix::unistd::Pid);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}
