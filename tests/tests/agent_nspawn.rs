//! baton-agent against real systemd, logind and apt in systemd-nspawn
//! containers, with real reboots, and the real coordinator on the host.
//! Needs root (CI runs `cargo xtask test` as root, which installs
//! systemd-container, debootstrap and dbus).
//!
//! Every claim is checked from outside the agent: boots (boot_id, start and
//! end) are recorded by the host-side supervisor, holders and the audit trail
//! come from `batonctl status`, installed versions from the node's dpkg.

use anyhow::{Context, Result, bail, ensure};
use baton_tests::nspawn::cluster::{
    Cluster, MAINTENANCE, check_one_real_reboot, touch_sentinel, wait_agent_running,
};
use baton_tests::nspawn::{Node, NodeSpec, apt, wait_for};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;

fn cluster() -> Result<Cluster> {
    Cluster::start()
}

fn time(t: std::time::SystemTime) -> DateTime<Utc> {
    t.into()
}

#[test]
fn sentinel_appears_agent_reboots_for_real_and_releases() -> Result<()> {
    let c = cluster()?;
    // A check interval of an hour: only inotify can notice the sentinel.
    let node = Node::boot(NodeSpec::new("sentinel-1", &c.url()).env("BATON_CHECK_INTERVAL", "1h"))?;
    wait_agent_running(&node)?;
    touch_sentinel(&node)?;
    c.wait_released(&node, 1)?;
    let boots = check_one_real_reboot(&node)?;
    let grant = &c.records("sentinel-1", "grant")[0];
    let release = &c.records("sentinel-1", "release")[0];
    let down = time(boots[0].ended.context("first boot ended")?);
    ensure!(
        grant.time <= down && down <= release.time,
        "reboot outside the grant"
    );
    ensure!(c.holder("sentinel-1").is_none(), "still holding");
    Ok(())
}

#[test]
fn apt_upgrade_from_local_repo_reboots_into_v2() -> Result<()> {
    let c = cluster()?;
    let debs = tempfile::tempdir()?;
    let repo = tempfile::tempdir()?;
    let v1 = apt::build_deb(debs.path(), "baton-demo", "1", None)?;
    // Like kernel packages (through update-notifier-common), v2 asks for a
    // reboot.
    apt::build_deb(
        repo.path(),
        "baton-demo",
        "2",
        Some("touch /var/run/reboot-required"),
    )?;
    apt::write_packages_index(repo.path())?;
    let mut spec = NodeSpec::new("apt-1", &c.url())
        .env(
            "BATON_UPDATE_CHECK_COMMAND",
            "apt-get update -qq >/dev/null 2>&1; apt-get -s upgrade | grep -q '^Inst baton-demo'",
        )
        .env(
            "BATON_UPDATE_COMMAND",
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get -y upgrade",
        );
    spec.repo = Some(repo.path().to_path_buf());
    spec.preinstall = vec![v1];
    let node = Node::boot(spec)?;
    c.wait_released(&node, 1)?;
    check_one_real_reboot(&node)?;
    let out = node.exec(&["dpkg-query", "-W", "-f", "${Version}", "baton-demo"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "2",
        "installed after maintenance: {:?}\n{}",
        out,
        node.diagnostics()
    );
    Ok(())
}

#[test]
fn failing_update_keeps_baton_reports_failed_and_does_not_reboot() -> Result<()> {
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("failing-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env(
                "BATON_UPDATE_COMMAND",
                "echo fetching; echo 'E: disk on fire' >&2; touch /run/reboot-required; exit 3",
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(error.contains("exit status 3"), "error: {holder}");
    // The output goes in the report's error (room for it), the message
    // says what failed.
    ensure!(
        error.contains("disk on fire"),
        "the output is not in the report: {holder}"
    );
    let message = holder["message"].as_str().unwrap_or_default();
    ensure!(message.contains("exit status 3"), "message: {holder}");
    // The sentinel exists, yet the node was not rebooted and keeps the baton.
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    ensure!(node.boots()[0].ended.is_none(), "node went down");
    ensure!(c.records("failing-1", "release").is_empty(), "released");
    let state = node.agent_state().context("state file")?;
    ensure!(state["phase"] == "failed", "state: {state}");
    Ok(())
}

#[test]
fn failing_update_unit_reports_its_journal_lines() -> Result<()> {
    // --update-unit starts an existing unit with StartUnit; its output is
    // read back from the journal by the run's invocation ID.
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("unitfail-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env("BATON_UPDATE_UNIT", "site-upgrade.service")
            .file(
                "/etc/systemd/system/site-upgrade.service",
                "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo unpacking; echo dpkg: error processing linux-image >&2; exit 4'\n",
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(error.contains("exit status 4"), "error: {holder}");
    ensure!(
        error.contains("dpkg: error processing linux-image"),
        "the unit's journal lines are not in the report: {holder}\n{}",
        node.diagnostics()
    );
    ensure!(node.boots().len() == 1, "rebooted: {:?}", node.boots());
    ensure!(c.records("unitfail-1", "release").is_empty(), "released");
    Ok(())
}

#[test]
fn corrupt_state_file_is_kept_aside_and_the_coordinator_asked() -> Result<()> {
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("corrupt-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env("BATON_UPDATE_COMMAND", "exit 7")
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let before = c.wait_phase(&node, "failed")?;
    let state = node.rootfs().join("var/lib/baton/state.json");
    std::fs::write(&state, b"{\"phase\": \"rebo")?;
    let old = wait_agent_running(&node)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    // The restarted agent keeps the corrupt file, learns from the
    // coordinator that it holds the baton (same token, no new grant), goes
    // through the maintenance again and reports Failed anew.
    let kept = node.rootfs().join("var/lib/baton/state.json.corrupt-0");
    wait_for("the corrupt file to be kept aside", MAINTENANCE, || {
        kept.exists().then_some(())
    })
    .with_context(|| node.diagnostics())?;
    ensure!(
        std::fs::read(&kept)? == b"{\"phase\": \"rebo",
        "corrupt file changed"
    );
    let since = |h: &Value| -> Option<DateTime<Utc>> { h["phase_since"].as_str()?.parse().ok() };
    let after = wait_for("a new Failed report", MAINTENANCE, || {
        c.holder("corrupt-1")
            .filter(|h| h["phase"] == "failed" && since(h) > since(&before))
    })
    .with_context(|| node.diagnostics())?;
    ensure!(after["token"] == before["token"], "{before} vs {after}");
    ensure!(c.records("corrupt-1", "grant").len() == 1, "granted again");
    ensure!(
        node.agent_state().is_some_and(|s| s["phase"] == "failed"),
        "new state file"
    );
    ensure!(node.boots().len() == 1, "rebooted");
    Ok(())
}

#[test]
fn agent_killed_mid_update_resumes_and_finishes() -> Result<()> {
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("killed-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env(
                "BATON_UPDATE_COMMAND",
                "echo run >> /var/lib/baton-test/runs; \
                 while [ ! -e /var/lib/baton-test/go ]; do sleep 0.2; done; \
                 rm -f /var/lib/baton-test/want-update; touch /run/reboot-required",
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    c.wait_phase(&node, "updating")?;
    let runs = node.rootfs().join("var/lib/baton-test/runs");
    wait_for("the update to run", MAINTENANCE, || {
        runs.exists().then_some(())
    })?;
    let old = wait_agent_running(&node)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    // systemd restarts the agent (Restart=always); the update keeps running
    // in its own transient unit meanwhile.
    wait_for("the agent to be restarted", MAINTENANCE, || {
        node.agent_pid().filter(|p| *p != old)
    })
    .with_context(|| node.diagnostics())?;
    wait_for("the restarted agent to resume", MAINTENANCE, || {
        (node.agent_log().matches("resuming from state file").count() >= 1).then_some(())
    })
    .with_context(|| node.diagnostics())?;
    std::fs::write(node.rootfs().join("var/lib/baton-test/go"), "")?;
    c.wait_released(&node, 1)?;
    check_one_real_reboot(&node)?;
    let ran = std::fs::read_to_string(&runs)?;
    ensure!(
        ran.lines().count() == 1,
        "the update ran {} times",
        ran.lines().count()
    );
    ensure!(
        c.records("killed-1", "grant").len() == 1,
        "granted more than once"
    );
    Ok(())
}

/// A oneshot unit that appends `word` to /var/lib/baton-test/order.
fn oneshot(word: &str, extra: &str) -> String {
    format!(
        "[Service]\nType=oneshot\nExecStart=/bin/sh -c '{extra}echo {word} >> /var/lib/baton-test/order'\n"
    )
}

#[test]
fn update_without_reboot_sentinel_releases_without_reboot() -> Result<()> {
    let c = cluster()?;
    // This scenario also drives the unit paths: StartUnit of an update unit
    // and of the pre/post-maintenance units, and a post-check command.
    let node = Node::boot(
        NodeSpec::new("noreboot-1", &c.url())
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env("BATON_UPDATE_UNIT", "baton-test-update.service")
            .env("BATON_PRE_MAINTENANCE_UNIT", "baton-test-pre.service")
            .env("BATON_POST_MAINTENANCE_UNIT", "baton-test-post.service")
            .env(
                "BATON_POST_CHECK_COMMAND",
                "echo check >> /var/lib/baton-test/order",
            )
            .file("/var/lib/baton-test/want-update", "")
            .file(
                "/etc/systemd/system/baton-test-pre.service",
                &oneshot("pre", ""),
            )
            .file(
                "/etc/systemd/system/baton-test-update.service",
                &oneshot("update", "rm -f /var/lib/baton-test/want-update; "),
            )
            .file(
                "/etc/systemd/system/baton-test-post.service",
                &oneshot("post", ""),
            ),
    )?;
    c.wait_released(&node, 1)?;
    let order = std::fs::read_to_string(node.rootfs().join("var/lib/baton-test/order"))?;
    ensure!(
        order == "pre\nupdate\ncheck\npost\n",
        "steps ran as: {order:?}"
    );
    let boots = node.boots();
    ensure!(
        boots.len() == 1 && boots[0].ended.is_none(),
        "rebooted: {boots:?}"
    );
    ensure!(c.records("noreboot-1", "grant").len() == 1, "grants");
    Ok(())
}

#[test]
fn three_nodes_needing_maintenance_go_strictly_one_after_another() -> Result<()> {
    let c = cluster()?;
    let names = ["seq-1", "seq-2", "seq-3"];
    let nodes = names
        .iter()
        .map(|n| Node::boot(NodeSpec::new(n, &c.url())))
        .collect::<Result<Vec<_>>>()?;
    for node in &nodes {
        wait_agent_running(node)?;
    }
    for node in &nodes {
        touch_sentinel(node)?;
    }
    for node in &nodes {
        c.wait_released(node, 1)?;
    }
    // From the coordinator's history: grant..release intervals.
    let mut held = Vec::new();
    for node in &nodes {
        let grants = c.records(node.name(), "grant");
        let releases = c.records(node.name(), "release");
        ensure!(
            grants.len() == 1 && releases.len() == 1,
            "{}: {grants:?} {releases:?}",
            node.name()
        );
        let boots = check_one_real_reboot(node)?;
        let down = time(boots[0].ended.context("ended")?);
        let up = time(boots[1].started);
        // From the host's records: the node was down only while it held
        // the baton.
        ensure!(
            grants[0].time <= down && up <= releases[0].time,
            "{} was down outside its grant: grant {} down {} up {} release {}",
            node.name(),
            grants[0].time,
            down,
            up,
            releases[0].time
        );
        held.push((
            grants[0].time,
            releases[0].time,
            down,
            up,
            node.name().to_string(),
        ));
    }
    held.sort();
    for pair in held.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.0 < a.1 {
            bail!("{} was granted before {} released: {held:?}", b.4, a.4);
        }
        if b.2 < a.3 {
            bail!("{} went down before {} was back up: {held:?}", b.4, a.4);
        }
    }
    Ok(())
}

/// Finding 1: the agent is SIGKILLed right after it persisted `rebooting`
/// (the coordinator is frozen, so it cannot get any further). The
/// restarted agent must really reboot the node before it releases: the
/// host's boot records show a second boot, ended by a reboot, before the
/// release.
#[test]
fn agent_killed_right_after_rebooting_is_persisted_still_reboots_first() -> Result<()> {
    use nix::sys::signal::Signal;
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("rkill-1", &c.url())
            .env("BATON_CALL_TIMEOUT", "2s")
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env(
                "BATON_UPDATE_COMMAND",
                "touch /var/lib/baton-test/update-started; sleep 3; \
                 rm -f /var/lib/baton-test/want-update; touch /run/reboot-required",
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let started = node.rootfs().join("var/lib/baton-test/update-started");
    wait_for("the update to start", MAINTENANCE, || {
        started.exists().then_some(())
    })
    .with_context(|| node.diagnostics())?;
    // Frozen, the coordinator answers nothing: the agent finishes the
    // update, persists `rebooting`, and then waits for its report and for
    // the confirmation of the reboot.
    c.coordinator.signal(Signal::SIGSTOP);
    let persisted = wait_for("`rebooting` persisted", MAINTENANCE, || {
        node.agent_state().filter(|s| s["phase"] == "rebooting")
    })
    .with_context(|| node.diagnostics());
    let killed = persisted.and_then(|state| {
        let pid = node.agent_pid().context("the agent runs")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
        Ok(state)
    });
    c.coordinator.signal(Signal::SIGCONT);
    let state = killed?;
    ensure!(node.boots().len() == 1, "rebooted before the kill");
    ensure!(
        state["boot_id_before_reboot"] == node.boots()[0].boot_id.as_str(),
        "`rebooting` persisted without this boot's id: {state}"
    );
    c.wait_released(&node, 1)?;
    let boots = check_one_real_reboot(&node)?;
    let release = &c.records("rkill-1", "release")[0];
    ensure!(
        time(boots[0].ended.context("first boot ended")?) <= release.time,
        "released before the node went down: {boots:?} {release:?}"
    );
    Ok(())
}

/// Finding 4: a reboot sentinel that a reboot does not clear (here on
/// persistent storage; in life a held kernel package or a bootloader that
/// still boots the old kernel) ends in Failed after one real reboot, not
/// in a loop of maintenances; a force-release gives the node back and the
/// need does not come straight back.
#[test]
fn a_sentinel_that_survives_the_reboot_ends_in_failed_not_a_loop() -> Result<()> {
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("stuck-1", &c.url())
            .env(
                "BATON_REBOOT_SENTINEL",
                "/var/lib/baton-test/reboot-required",
            )
            .env("BATON_CHECK_INTERVAL", "2s")
            .env("BATON_ABORT_BACKOFF", "1h")
            .file("/var/lib/baton-test/reboot-required", ""),
    )?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(error.contains("after a verified reboot"), "error: {holder}");
    check_one_real_reboot(&node)?;
    // A while later: still one reboot, one grant, the baton kept.
    std::thread::sleep(Duration::from_secs(8));
    check_one_real_reboot(&node)?;
    ensure!(c.records("stuck-1", "grant").len() == 1, "granted again");
    ensure!(c.records("stuck-1", "release").is_empty(), "released");
    // The operator force-releases: the node is given back and held back.
    let token = holder["token"]
        .as_u64()
        .with_context(|| format!("no token in {holder}"))?
        .to_string();
    let out = c.coordinator.ctl(&[
        "force-release",
        "stuck-1",
        "--token",
        &token,
        "--reason",
        "looked at it",
    ]);
    ensure!(out.status.success(), "force-release: {out:?}");
    wait_for("the agent to go idle", MAINTENANCE, || {
        node.agent_state().filter(|s| s["phase"] == "idle")
    })
    .with_context(|| node.diagnostics())?;
    std::thread::sleep(Duration::from_secs(8));
    ensure!(
        c.records("stuck-1", "grant").len() == 1,
        "the need came straight back: {}",
        c.coordinator.status()
    );
    check_one_real_reboot(&node)?;
    Ok(())
}

/// Red-team 1: an update that leaves a dangling symlink where the reboot
/// sentinel file should be (`Path::exists` says false: before the fix the
/// node released without a reboot): the check has no answer, which is
/// never "no reboot needed": the node reboots for real and, since the
/// check still has no answer after the boot, keeps the baton (Failed, with
/// the reason) instead of releasing.
#[test]
fn a_sentinel_check_without_an_answer_reboots_and_never_releases() -> Result<()> {
    let c = cluster()?;
    let node = Node::boot(
        NodeSpec::new("oddsentinel-1", &c.url())
            .env(
                "BATON_REBOOT_SENTINEL",
                "/var/lib/baton-test/reboot-required",
            )
            .env(
                "BATON_UPDATE_CHECK_COMMAND",
                "test -e /var/lib/baton-test/want-update",
            )
            .env(
                "BATON_UPDATE_COMMAND",
                "rm -f /var/lib/baton-test/want-update; ln -sfn /nonexistent /var/lib/baton-test/reboot-required",
            )
            .file("/var/lib/baton-test/want-update", ""),
    )?;
    let holder = c.wait_phase(&node, "failed")?;
    let error = holder["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("cannot check the reboot sentinel")
            && error.contains("is a dangling symlink"),
        "error: {holder}"
    );
    check_one_real_reboot(&node)?;
    ensure!(c.records("oddsentinel-1", "release").is_empty(), "released");
    Ok(())
}
