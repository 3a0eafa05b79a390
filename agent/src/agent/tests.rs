//! The agent over the simulated node (`crate::fakes`), with tokio's paused
//! clock: one behaviour per test. The crash-point harness
//! (`crate::crash_points`) runs the same simulation with faults.

use super::*;
use crate::coordinator::Step;
use crate::fakes::driver::{Driver, settings};
use crate::fakes::{
    Fault, Faults, Point, PrepareOutcome, Rec, Sim, SimState, UPDATE_UNIT, UnitKind,
};
use crate::state::{HoldBack, SaveStage};
use tokio::time::Instant;

/// A simulation with `setup` applied and no faults.
fn sim(setup: impl FnOnce(&mut SimState)) -> Arc<Sim> {
    let mut state = SimState::default();
    setup(&mut state);
    Sim::new(state, Faults::None)
}

/// A kernel-like update: it applies the updates and asks for a reboot.
fn kernel_update(s: &mut SimState) {
    s.updates_pending = true;
    s.update_sets_sentinel = true;
}

const HOUR: Duration = Duration::from_secs(3600);

/// A driver for a kernel-like update, with `tweak` applied after it.
fn kernel_driver(tweak: impl FnOnce(&mut SimState)) -> Driver {
    Driver::new(
        sim(|s| {
            kernel_update(s);
            tweak(s);
        }),
        settings(),
    )
}

/// A driver for a pending update (no reboot), with `tweak` applied after it.
fn update_driver(tweak: impl FnOnce(&mut SimState)) -> Driver {
    Driver::new(
        sim(|s| {
            s.updates_pending = true;
            tweak(s);
        }),
        settings(),
    )
}

/// Runs until the agent is Failed (within `limit`) and returns its error.
async fn failed_with(d: &Driver, limit: Duration) -> String {
    assert!(d.run(limit, failed).await);
    d.agent_state().unwrap().error.unwrap()
}

/// The maintenance is over: released, idle, nothing needed.
fn done(s: &SimState, a: Option<&AgentState>) -> bool {
    s.holder.is_none()
        && !s.releases().is_empty()
        && a.is_some_and(|a| a.phase == Phase::Idle)
        && !s.reboot_pending()
}

/// The agent sits in Failed and has reported it.
fn failed(s: &SimState, a: Option<&AgentState>) -> bool {
    a.is_some_and(|a| a.phase == Phase::Failed)
        && s.holder.as_ref().and_then(|h| h.phase) == Some(Phase::Failed)
}

#[tokio::test(start_paused = true)]
async fn sentinel_update_reboot_verify_release() {
    let d = Driver::new(sim(kernel_update), settings());
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.releases(), vec![1]);
    assert_eq!(s.boot, 2, "one real reboot");
    assert_eq!(
        s.phases(),
        vec![
            Phase::Granted,
            Phase::Preparing,
            Phase::Updating,
            Phase::Rebooting,
            Phase::Verifying,
            Phase::Finishing
        ]
    );
    assert_eq!(s.node_calls, vec!["prepare", "ready", "finish"]);
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
    assert!(!s.cordoned);
}

#[tokio::test(start_paused = true)]
async fn failed_update_keeps_the_baton_and_does_not_reboot() {
    let d = kernel_driver(|s| {
        s.update_succeeds = false;
        s.update_output = "fetching\nE: disk on fire".into();
    });
    assert!(d.run(HOUR, failed).await);
    let state = d.agent_state().unwrap();
    assert!(state.error.unwrap().contains("exit status 3"));
    let s = d.sim.state();
    assert_eq!(s.boot, 1, "not rebooted");
    assert!(s.releases().is_empty());
    let (_, report) = s
        .reports
        .iter()
        .rev()
        .find(|(_, r)| r.phase == Phase::Failed)
        .unwrap();
    // The output goes in the error (room for it), not the message.
    assert!(report.error.contains("disk on fire"), "{report:?}");
    assert!(report.message.contains("exit status 3"), "{report:?}");
    assert!(!report.message.contains('\n'));
}

#[tokio::test(start_paused = true)]
async fn no_reboot_needed_releases_without_reboot() {
    let d = Driver::new(sim(|s| s.updates_pending = true), settings());
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.boot, 1);
    assert!(!s.phases().contains(&Phase::Rebooting));
    assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
}

/// Finding 1: `Rebooting` never reaches the disk without the boot_id.
#[tokio::test(start_paused = true)]
async fn rebooting_and_the_boot_id_before_it_are_one_write() {
    let d = Driver::new(sim(kernel_update), settings());
    let saved = Arc::new(Mutex::new(Vec::<AgentState>::new()));
    // Record every durable state (the driver's own hook runs no faults).
    let seen = saved.clone();
    let file = StateFile::new(d.dir.path()).with_faults(Arc::new(move |stage, state| {
        if stage == SaveStage::After {
            seen.lock().unwrap().push(state.clone());
        }
        Ok(())
    }));
    let shutdown = CancellationToken::new();
    let sim = d.sim.clone();
    let mut agent = Agent::new(
        crate::fakes::SimHost(sim.clone()),
        crate::fakes::SimCoordinator(sim.clone()),
        crate::fakes::SimNode(sim.clone()),
        file,
        settings(),
        shutdown.clone(),
    )
    .with_clock(sim.clock());
    let (_tick, wakes) = watch::channel(0);
    let stop = async {
        while sim.state().reboot_at.is_none() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(agent.run(wakes), stop);
    result.unwrap();
    let saved = saved.lock().unwrap();
    let rebooting: Vec<_> = saved
        .iter()
        .filter(|s| s.phase == Phase::Rebooting)
        .collect();
    assert!(!rebooting.is_empty());
    for state in rebooting {
        assert_eq!(state.boot_id_before_reboot.as_deref(), Some("boot-1"));
    }
}

/// Finding 1: a state file in `Rebooting` without a boot_id (written by an
/// agent killed between two writes) means "not rebooted yet".
#[tokio::test(start_paused = true)]
async fn rebooting_without_a_boot_id_reboots_before_releasing() {
    let d = Driver::new(
        sim(|s| {
            s.sentinel = true;
            s.hold(4, Phase::Rebooting);
            s.cordoned = true;
        }),
        settings(),
    );
    StateFile::new(d.dir.path())
        .save(&AgentState {
            phase: Phase::Rebooting,
            fencing_token: Some(4),
            boot_id_before_reboot: None,
            ..AgentState::idle()
        })
        .unwrap();
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.boot, 2, "rebooted before releasing");
    let booted = s.log.iter().position(|r| *r == Rec::Booted(2)).unwrap();
    let released = s
        .log
        .iter()
        .position(|r| matches!(r, Rec::Released { .. }))
        .unwrap();
    assert!(booted < released);
}

/// Finding 7: a restart in `Rebooting` on the same boot asks again
/// instead of failing.
#[tokio::test(start_paused = true)]
async fn same_boot_id_after_restart_asks_for_the_reboot_again() {
    let d = Driver::new(
        sim(|s| {
            s.sentinel = true;
            s.hold(4, Phase::Rebooting);
        }),
        settings(),
    );
    StateFile::new(d.dir.path())
        .save(&AgentState {
            phase: Phase::Rebooting,
            fencing_token: Some(4),
            boot_id_before_reboot: Some("boot-1".into()),
            reboot_requests: 1,
            ..AgentState::idle()
        })
        .unwrap();
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.boot, 2);
    assert!(!s.phases().contains(&Phase::Failed));
}

/// A machine that never goes down: a bounded number of requests, then
/// Failed (not a loop, and never a release).
#[tokio::test(start_paused = true)]
async fn a_reboot_that_never_happens_fails_after_bounded_requests() {
    let d = kernel_driver(|s| {
        s.reboot_delay = Duration::from_secs(100 * 3600);
    });
    assert!(d.run(10 * HOUR, failed).await);
    let state = d.agent_state().unwrap();
    assert!(state.error.unwrap().contains("did not go down"));
    let s = d.sim.state();
    assert_eq!(
        s.count(|r| matches!(r, Rec::RebootRequest(_))),
        MAX_REBOOT_REQUESTS as usize
    );
    assert!(s.releases().is_empty());
}

/// Finding 2: a saved token is confirmed before anything is done with it.
/// Force-released while the agent was down: it gives the node back.
#[tokio::test(start_paused = true)]
async fn a_saved_token_that_was_force_released_drains_nothing() {
    let d = kernel_driver(|s| {
        s.last_token = 4;
        s.cordoned = true;
    });
    StateFile::new(d.dir.path())
        .save(&AgentState {
            phase: Phase::Preparing,
            fencing_token: Some(4),
            reason: "updates available".into(),
            ..AgentState::idle()
        })
        .unwrap();
    assert!(
        d.run(Duration::from_secs(60), |s, a| {
            !s.cordoned && a.is_some_and(|a| a.phase == Phase::Idle)
        })
        .await
    );
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 0, "no drain");
    assert_eq!(s.node_calls, vec!["abort"]);
    assert!(s.log.contains(&Rec::TokenRefused { inc: 1, token: 4 }));
}

/// Finding 2: renewals start at once, and an unreachable coordinator
/// stops new evictions once the lease is older than the coordinator
/// allows; nothing further starts until it answers again.
#[tokio::test(start_paused = true)]
async fn an_unreachable_coordinator_stops_the_drain_and_the_update() {
    let d = kernel_driver(|s| {
        s.drain_duration = Duration::from_secs(600);
        s.overdue_after = Duration::from_secs(60);
        s.outage_on_drain = true;
    });
    // One agent process through the outage: the drain (600 s) is stopped
    // once the lease is older than 60 s, and nothing else starts.
    assert!(!d.run(Duration::from_secs(900), |_, _| false).await);
    {
        let s = d.sim.state();
        let prepare = s.log.iter().position(|r| matches!(r, Rec::Prepare(_)));
        let confirmed = s.log.iter().position(|r| matches!(r, Rec::TokenOk { .. }));
        assert!(confirmed < prepare, "renewed before the drain: {:?}", s.log);
        assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 1);
        assert_eq!(
            s.count(|r| matches!(r, Rec::UpdateStart { .. })),
            0,
            "no update without the coordinator"
        );
        assert_eq!(s.count(|r| matches!(r, Rec::AgentStarted(_))), 1);
    }
    assert_eq!(
        d.agent_state().unwrap().phase,
        Phase::Preparing,
        "the drain did not finish"
    );
    // The coordinator is back: the drain runs again, then the rest.
    {
        let mut s = d.sim.state();
        s.outage_on_drain = false;
        s.coordinator_down = false;
    }
    assert!(d.run(HOUR, done).await);
    assert_eq!(d.sim.state().count(|r| matches!(r, Rec::Prepare(_))), 2);
}

/// Finding 3: an aborted drain's reason naming every pod is cut to the
/// API's limit, so the release goes through.
#[tokio::test(start_paused = true)]
async fn a_long_abort_reason_is_cut_and_the_baton_released() {
    let d = kernel_driver(|s| {
        s.prepare = PrepareOutcome::DrainTimeout;
        s.drain_pending = (0..200)
            .map(|i| format!("apps/web-{i} (disruption budget)"))
            .collect();
    });
    assert!(
        d.run(HOUR, |s, a| !s.releases().is_empty()
            && a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert!(s.release_reasons[0].contains("drain timed out"));
    assert!(s.release_reasons[0].len() <= crate::text::REASON_BYTES);
    assert!(s.holder.is_none());
}

/// Finding 3: long update output fits in the report's error, and the
/// Failed report is accepted.
#[tokio::test(start_paused = true)]
async fn long_update_output_is_reported_within_the_limits() {
    let d = kernel_driver(|s| {
        s.update_succeeds = false;
        s.update_output = "x".repeat(50_000);
    });
    assert!(d.run(HOUR, failed).await);
    let s = d.sim.state();
    let (_, report) = s.reports.last().unwrap();
    assert_eq!(report.phase, Phase::Failed);
    assert!(report.error.ends_with("E: boom"));
    assert!(report.error.len() <= crate::text::ERROR_BYTES);
}

/// Finding 3: a release refused for good (PERMISSION_DENIED) fails the
/// maintenance with the reason instead of retrying forever.
#[tokio::test(start_paused = true)]
async fn a_permanently_refused_release_ends_in_failed() {
    let d = update_driver(|s| {
        s.refuse_release = true;
    });
    let error = failed_with(&d, HOUR).await;
    assert!(error.contains("PermissionDenied"), "{error}");
}

/// Finding 4: a sentinel still there after a verified reboot is Failed,
/// not another maintenance.
#[tokio::test(start_paused = true)]
async fn a_sentinel_that_survives_the_reboot_ends_in_failed() {
    let d = Driver::new(sim(|s| s.persistent_sentinel = true), settings());
    let error = failed_with(&d, HOUR).await;
    assert!(error.contains("after a verified reboot"), "{error}");
    // Hours later: still one reboot, still failed, still held.
    assert!(!d.run(5 * HOUR, |_, _| false).await);
    let s = d.sim.state();
    assert_eq!(s.boot, 2);
    assert_eq!(
        s.count(|r| matches!(r, Rec::Granted { resumed: false, .. })),
        1
    );
    assert!(s.releases().is_empty());
}

/// Finding 4: a need that comes back after every maintenance (phased
/// packages) is held back, doubling, and the hold-back survives restarts.
#[tokio::test(start_paused = true)]
async fn a_need_that_comes_back_is_held_back_exponentially() {
    let d = update_driver(|s| {
        s.update_clears_need = false;
    });
    let base = settings().abort_backoff;
    let grants = |s: &SimState| s.count(|r| matches!(r, Rec::Granted { resumed: false, .. }));
    let started = Instant::now();
    assert!(d.run(10 * HOUR, |s, _| grants(s) == 4).await);
    // Three hold-backs before the fourth grant: base, 2 base, 4 base.
    assert!(started.elapsed() >= base * 7, "{:?}", started.elapsed());
    let hold_back: HoldBack = d.agent_state().unwrap().hold_back.unwrap();
    assert_eq!(hold_back.streak, 3);
    // A restart does not shorten the hold-back: kill the agent right after
    // the next release and count grants during the next 7 base periods.
    assert!(
        d.run(10 * HOUR, |s, a| s.releases().len() == 4
            && a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    d.sim.kill();
    let before = Instant::now();
    assert!(d.run(10 * HOUR, |s, _| grants(s) == 5).await);
    assert!(
        before.elapsed() >= base * 8 - Duration::from_secs(5),
        "{:?}",
        before.elapsed()
    );
}

/// Finding 7 and item 8: a failing update keeps the baton; a
/// force-release gives the node back (uncordoned) and the failing update
/// does not come straight back.
#[tokio::test(start_paused = true)]
async fn force_release_while_failed_gives_the_node_back() {
    let d = kernel_driver(|s| {
        s.update_succeeds = false;
    });
    assert!(d.run(HOUR, failed).await);
    assert!(d.sim.state().cordoned, "a failed node stays cordoned");
    d.sim.state().force_release();
    // Not a stop condition: a fixed stretch of time, then the checks.
    assert!(!d.run(Duration::from_secs(120), |_, _| false).await);
    let s = d.sim.state();
    assert!(s.node_calls.contains(&"abort"), "{:?}", s.node_calls);
    assert!(!s.cordoned, "given back");
    assert_eq!(
        s.count(|r| matches!(r, Rec::Granted { resumed: false, .. })),
        1,
        "the failing update did not come straight back"
    );
    let state = d.agent_state().unwrap();
    assert_eq!(state.phase, Phase::Idle);
    assert_eq!(state.fencing_token, None);
    assert!(state.hold_back.is_some());
}

/// A failing update keeps the baton (Failed) until an operator
/// force-releases it; then the agent is idle, holding back.
async fn idle_after_a_force_released_failure() -> Driver {
    let d = kernel_driver(|s| {
        s.update_succeeds = false;
    });
    assert!(d.run(HOUR, failed).await);
    d.sim.state().force_release();
    assert!(
        d.run(HOUR, |_, a| a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    d
}

/// Finding 7: the hold-back after a force-release survives a restart.
#[tokio::test(start_paused = true)]
async fn the_hold_back_after_a_force_release_survives_a_restart() {
    let d = idle_after_a_force_released_failure().await;
    let idle_at = Instant::now();
    d.sim.kill();
    let grants = |s: &SimState| s.count(|r| matches!(r, Rec::Granted { resumed: false, .. }));
    assert!(d.run(HOUR, |s, _| grants(s) == 2).await);
    assert!(idle_at.elapsed() >= settings().abort_backoff - Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn corrupt_state_asks_the_coordinator_and_resumes_the_grant() {
    let d = update_driver(|s| {
        s.hold(9, Phase::Failed);
    });
    std::fs::write(d.dir.path().join("state.json"), b"{\"phase\":").unwrap();
    assert!(d.run(HOUR, |s, _| !s.releases().is_empty()).await);
    assert_eq!(d.sim.state().releases(), vec![9]);
    assert!(d.dir.path().join("state.json.corrupt-0").exists());
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_aborts_releases_with_the_reason_and_holds_back() {
    let d = kernel_driver(|s| {
        s.prepare = PrepareOutcome::DrainTimeout;
    });
    assert!(
        d.run(HOUR, |s, a| !s.releases().is_empty()
            && a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert_eq!(s.boot, 1);
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 0);
    assert!(s.release_reasons[0].contains("drain timed out"));
    let (_, aborting) = s
        .reports
        .iter()
        .find(|(_, r)| r.phase == Phase::Aborting)
        .expect("an Aborting report");
    assert!(aborting.error.contains("drain timed out"));
    assert_eq!(s.node_calls, vec!["prepare", "abort"]);
    let last = s.shown.last().unwrap();
    assert_eq!((last.from, last.to), (Phase::Aborting, Phase::Idle));
    assert!(last.error.as_deref().unwrap().contains("drain timed out"));
}

#[tokio::test(start_paused = true)]
async fn after_an_abort_the_agent_holds_back_before_asking_again() {
    let d = update_driver(|s| {
        s.prepare = PrepareOutcome::DrainTimeout;
    });
    let started = Instant::now();
    assert!(d.run(HOUR, |s, _| s.releases().len() >= 2).await);
    assert!(started.elapsed() >= settings().abort_backoff);
    assert_eq!(d.sim.state().acquires, 2);
}

#[tokio::test(start_paused = true)]
async fn other_prepare_errors_still_fail_closed() {
    let d = update_driver(|s| {
        s.prepare = PrepareOutcome::Error;
    });
    assert!(d.run(HOUR, failed).await);
    assert!(d.sim.state().releases().is_empty());
    assert!(d.sim.state().cordoned);
}

#[tokio::test(start_paused = true)]
async fn blockers_keep_the_agent_from_asking_until_they_are_gone() {
    let d = update_driver(|s| {
        s.blockers = vec!["ci/job-1 (matches app=ci)".into()];
    });
    assert!(!d.run(Duration::from_secs(600), |_, _| false).await);
    {
        let s = d.sim.state();
        assert_eq!(s.acquires, 0);
        assert_eq!(
            s.waiting_shown,
            vec![vec!["ci/job-1 (matches app=ci)".to_string()]],
            "shown once, not on every tick (and once per restart)"
        );
    }
    d.sim.state().blockers.clear();
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.acquires, 1);
    assert_eq!(s.waiting_shown.last().unwrap(), &Vec::<String>::new());
}

/// Finding 7: a blocking pod that started while the node waited in the
/// queue is seen after the grant: nothing is drained, the baton goes back.
#[tokio::test(start_paused = true)]
async fn a_blocking_pod_that_appears_after_the_grant_gives_the_baton_back() {
    let d = update_driver(|s| {
        s.queue_blocked = true;
    });
    assert!(
        d.run(HOUR, |_, a| a.is_some_and(|a| a.phase == Phase::Waiting))
            .await
    );
    {
        let mut s = d.sim.state();
        s.blockers = vec!["ci/job-1 (matches app=ci)".into()];
        s.queue_blocked = false;
    }
    assert!(d.run(HOUR, |s, _| !s.releases().is_empty()).await);
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 0, "not drained");
    assert!(
        s.release_reasons[0].contains("ci/job-1"),
        "{:?}",
        s.release_reasons
    );
}

/// Finding 8: Confirm says "wait": the update waits, the reason is
/// reported, and the update starts only once the coordinator says go.
#[tokio::test(start_paused = true)]
async fn the_update_waits_while_the_coordinator_says_wait() {
    let d = kernel_driver(|s| {
        s.confirm_waits = vec![(Step::Update, "etcd member n2 unhealthy".into()); 5];
    });
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    let waiting = s
        .reports
        .iter()
        .find(|(_, r)| r.message.contains("etcd member n2 unhealthy"))
        .expect("the reason was reported");
    assert_eq!(waiting.1.phase, Phase::Updating);
    // One "go" for the drain, five "wait" answers, then one "go" for the
    // update and one for the reboot.
    assert_eq!(s.confirms, 8);
    assert_eq!(
        s.confirmed(),
        [
            vec![(Step::Drain, "go")],
            vec![(Step::Update, "wait"); 5],
            vec![(Step::Update, "go"), (Step::Reboot, "go")]
        ]
        .concat()
    );
    // The reason was reported once, not on every answer.
    assert_eq!(
        s.reports
            .iter()
            .filter(|(_, r)| r.message.contains("unhealthy"))
            .count(),
        1
    );
}

/// Confirm says "wait" before the drain: the node is neither cordoned nor
/// drained until the coordinator says go, and the reason is reported (in
/// Preparing) once.
#[tokio::test(start_paused = true)]
async fn the_drain_waits_while_the_coordinator_says_wait() {
    let d = kernel_driver(|s| {
        s.confirm_waits = vec![(Step::Drain, "etcd member n2 unhealthy".into()); 3];
    });
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(
        s.confirmed(),
        [
            vec![(Step::Drain, "wait"); 3],
            vec![
                (Step::Drain, "go"),
                (Step::Update, "go"),
                (Step::Reboot, "go")
            ]
        ]
        .concat()
    );
    let go = s
        .log
        .iter()
        .position(|r| {
            matches!(
                r,
                Rec::Confirmed {
                    step: Step::Drain,
                    answer: "go",
                    ..
                }
            )
        })
        .unwrap();
    let drained = s.log.iter().position(|r| matches!(r, Rec::Prepare(_)));
    assert!(drained > Some(go), "drained before the go: {:?}", s.log);
    let waiting: Vec<_> = s
        .reports
        .iter()
        .filter(|(_, r)| r.message.contains("unhealthy"))
        .collect();
    assert_eq!(waiting.len(), 1, "reported once");
    assert_eq!(waiting[0].1.phase, Phase::Preparing);
    assert!(
        waiting[0].1.message.contains("before the drain"),
        "{:?}",
        waiting[0].1
    );
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 1);
}

/// Finding 8: a token refused by Confirm stops the maintenance before the
/// update.
#[tokio::test(start_paused = true)]
async fn a_confirm_that_refuses_the_token_stops_before_the_update() {
    let d = kernel_driver(|s| {
        s.confirm_waits = vec![(Step::Update, "wait".into())];
    });
    assert!(
        d.run(HOUR, |s, _| s.confirmed().last()
            == Some(&(Step::Update, "wait")))
            .await
    );
    d.sim.state().force_release();
    assert!(
        d.run(HOUR, |_, a| a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 0);
    assert!(!s.cordoned);
}

/// Finding 8: an older coordinator without Confirm: Renew confirms the
/// token instead, for each step (Confirm is asked again at the next step:
/// see `confirm_is_asked_again_after_an_unimplemented_answer`).
#[tokio::test(start_paused = true)]
async fn an_older_coordinator_without_confirm_falls_back_to_renew() {
    let d = kernel_driver(|s| {
        s.confirm_unimplemented = true;
    });
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    // Once before each of the drain, the update and the reboot.
    assert_eq!(
        s.confirmed(),
        [Step::Drain, Step::Update, Step::Reboot].map(|step| (step, "unimplemented"))
    );
    assert_eq!(s.boot, 2);
}

/// Finding 7: the coordinator's renew interval has a lower bound.
#[test]
fn a_tiny_renew_interval_from_the_coordinator_is_raised() {
    let grant = Grant {
        fencing_token: 1,
        resumed: false,
        renew_interval: Some(Duration::from_millis(10)),
        overdue_after: None,
        backup_required: false,
    };
    let terms = lease_terms(&grant, &settings());
    assert_eq!(
        terms.renew_interval_ms,
        MIN_RENEW_INTERVAL.as_millis() as u64
    );
    let grant = Grant {
        renew_interval: Some(Duration::from_secs(2)),
        ..grant
    };
    assert_eq!(lease_terms(&grant, &settings()).renew_interval_ms, 2000);
}

/// Finding 7: with `--update-unit`, an agent restarted after it started
/// the unit never starts it a second time.
#[tokio::test(start_paused = true)]
async fn an_update_unit_is_never_started_twice_for_a_grant() {
    let sim = sim(|s| {
        kernel_update(s);
        s.known_units.insert(UPDATE_UNIT.into(), UnitKind::Oneshot);
        s.update_duration = Duration::from_secs(5);
    });
    let d = Driver::new(
        sim,
        Settings {
            update: Some(Action::Unit(UPDATE_UNIT.into())),
            ..settings()
        },
    );
    // The agent is killed when the unit's run has ended and before it
    // could persist anything about it (its next call).
    d.sim.set_faults(Faults::OnPoint {
        point: Point::RebootRequired,
        nth: 0,
        fault: Fault::KillBefore,
        seen: 0,
    });
    assert!(d.run(HOUR, failed).await);
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
    assert_eq!(s.count(|r| matches!(r, Rec::AgentStarted(_))), 2);
    let error = d.agent_state().unwrap().error.unwrap();
    assert!(error.contains("not starting it a second time"), "{error}");
}

// ---- The host layer's contract as the agent uses it (ported from the
// ---- host-layer branch onto the simulated node): inhibitors, stopping an
// ---- update that lost its baton or its time.

/// Finding 6: a block inhibitor holds the reboot back, with who and why
/// reported, the baton renewed meanwhile; once it goes, the reboot comes.
#[tokio::test(start_paused = true)]
async fn a_block_inhibitor_holds_the_reboot_back_with_its_reason_reported() {
    let d = kernel_driver(|s| {
        s.inhibit("nightly-backup", "copying /srv to tape");
    });
    let reported = |s: &SimState| {
        s.reports
            .iter()
            .any(|(_, r)| r.message.contains("copying /srv to tape"))
    };
    assert!(d.run(HOUR, |s, _| reported(s)).await);
    let renews = d.sim.state().renews;
    assert!(!d.run(Duration::from_secs(600), |_, _| false).await);
    {
        let s = d.sim.state();
        assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
        assert!(s.renews >= renews + 600 / 5 - 1, "renewed while waiting");
        let (_, held) = s
            .reports
            .iter()
            .find(|(_, r)| r.message.contains("nightly-backup"))
            .unwrap();
        assert_eq!(held.phase, Phase::Rebooting);
        assert!(held.message.contains("reboot held back by inhibitor locks"));
    }
    d.sim.state().inhibitors.clear();
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(s.boot, 2);
    assert_eq!(s.reboots_while_inhibited, 0);
}

#[tokio::test(start_paused = true)]
async fn an_inhibitor_past_the_timeout_fails_without_a_reboot() {
    let d = kernel_driver(|s| {
        s.inhibit("nightly-backup", "copying /srv to tape");
    });
    let error = failed_with(&d, 2 * HOUR).await;
    assert!(error.contains("nightly-backup"), "{error}");
    assert!(error.contains("--inhibitor-timeout"), "{error}");
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
    assert!(s.releases().is_empty());
}

#[tokio::test(start_paused = true)]
async fn ignore_inhibitors_reboots_through_them() {
    let d = Driver::new(
        sim(|s| {
            kernel_update(s);
            s.inhibit("nightly-backup", "copying /srv to tape");
        }),
        Settings {
            ignore_inhibitors: true,
            ..settings()
        },
    );
    assert!(d.run(HOUR, done).await);
    assert_eq!(d.sim.state().reboots_while_inhibited, 1);
}

/// Finding 7: an update whose baton is lost is stopped.
#[tokio::test(start_paused = true)]
async fn an_update_whose_baton_is_lost_is_stopped() {
    let d = kernel_driver(|s| {
        s.update_duration = HOUR;
    });
    assert!(
        d.run(HOUR, |s, _| s
            .count(|r| matches!(r, Rec::UpdateStart { .. }))
            == 1)
            .await
    );
    d.sim.state().force_release();
    assert!(d.run(HOUR, |s, _| !s.stops.is_empty()).await);
    let s = d.sim.state();
    assert_eq!(s.stops, vec!["baton-update-1.service".to_string()]);
    assert!(
        s.log.contains(&Rec::UpdateEnd {
            unit: "baton-update-1.service".into(),
            success: false
        }),
        "the run ended when it was stopped"
    );
    assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
}

#[tokio::test(start_paused = true)]
async fn an_update_past_its_timeout_is_stopped_and_fails() {
    let d = kernel_driver(|s| {
        s.update_duration = 10 * HOUR;
    });
    let error = failed_with(&d, 2 * HOUR).await;
    assert!(error.contains("did not finish within 10m"), "{error}");
    // The host stops a run past its timeout; the agent stops it again
    // (idempotent), because a timeout may also be a D-Bus call's whose
    // run goes on.
    assert!(
        error.contains("the run of baton-update-1.service is stopped"),
        "{error}"
    );
    assert!(
        d.sim
            .state()
            .stops
            .contains(&"baton-update-1.service".to_string()),
        "stopped after Failed was saved"
    );
    let s = d.sim.state();
    assert!(!s.stops.is_empty());
    assert!(s.stops.iter().all(|u| u == "baton-update-1.service"));
    assert!(s.units["baton-update-1.service"].ended);
    assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
}

#[tokio::test(start_paused = true)]
async fn the_fake_host_refuses_what_systemd_cannot_wait_for() {
    let d = Driver::new(
        sim(kernel_update),
        Settings {
            update: Some(Action::Unit("apt-daily-upgrade.timer".into())),
            ..settings()
        },
    );
    let error = failed_with(&d, HOUR).await;
    assert!(error.contains("only .service units"), "{error}");
}

/// Red-team 1: a reboot check that fails after the update (here: the
/// update leaves a directory where the sentinel file should be) is never
/// read as "no reboot needed": the node reboots, and since the check still
/// fails after the reboot, the baton is kept (Failed, with the reason).
#[tokio::test(start_paused = true)]
async fn a_failing_reboot_check_after_the_update_reboots_and_never_releases() {
    let d = kernel_driver(|s| {
        s.update_breaks_sentinel = true;
    });
    assert!(
        d.run(HOUR, |s, a| failed(s, a) || !s.releases().is_empty())
            .await
    );
    let s = d.sim.state();
    assert!(s.releases().is_empty(), "released: {:?}", s.log);
    assert_eq!(s.boot, 2, "rebooted once");
    let error = d.agent_state().unwrap().error.unwrap();
    assert!(
        error.contains("cannot check the reboot sentinel"),
        "{error}"
    );
}

/// Red-team 1: a need check that fails before asking neither asks for
/// the baton nor reads as "nothing needed" (which would reset the
/// persisted hold-back); the error is shown on the node.
#[tokio::test(start_paused = true)]
async fn a_failing_need_check_asks_for_nothing_and_keeps_the_hold_back() {
    let d = idle_after_a_force_released_failure().await;
    assert!(d.agent_state().unwrap().hold_back.is_some());
    {
        let mut s = d.sim.state();
        // Only the (failing) sentinel check is left to say anything.
        s.updates_pending = false;
        s.sentinel_check_fails = true;
    }
    assert!(!d.run(2 * HOUR, |_, _| false).await);
    let s = d.sim.state();
    assert_eq!(
        s.count(|r| matches!(r, Rec::Granted { resumed: false, .. })),
        1,
        "asked again on a failing check"
    );
    let shown = s.waiting_shown.last().cloned().unwrap_or_default();
    assert!(
        shown.iter().any(|b| b.contains("cannot check")),
        "{:?}",
        s.waiting_shown
    );
    drop(s);
    assert!(
        d.agent_state().unwrap().hold_back.is_some(),
        "a failing check reset the hold-back"
    );
}

/// Red-team 1: a need check that fails while waiting for the grant does
/// not withdraw the request (the need was seen; a failing check does not
/// show it is gone).
#[tokio::test(start_paused = true)]
async fn a_failing_need_check_while_waiting_keeps_the_request() {
    let d = kernel_driver(|s| {
        s.queue_blocked = true;
    });
    assert!(
        d.run(HOUR, |_, a| a.is_some_and(|a| a.phase == Phase::Waiting))
            .await
    );
    d.sim.state().sentinel_check_fails = true;
    assert!(
        !d.run(HOUR, |_, a| a.is_none_or(|a| a.phase != Phase::Waiting))
            .await
    );
}

/// Red-team 2: an UNIMPLEMENTED answer (a coordinator not upgraded yet)
/// makes Renew the confirmation for that step only: the next step asks
/// Confirm again, and the upgraded coordinator's "wait" is honoured.
#[tokio::test(start_paused = true)]
async fn confirm_is_asked_again_after_an_unimplemented_answer() {
    let d = kernel_driver(|s| {
        s.confirm_unimplemented_calls = 1;
        s.confirm_waits = vec![(Step::Update, "etcd member n2 unhealthy".into()); 3];
    });
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    // UNIMPLEMENTED before the drain; three "wait" and one "go" before
    // the update; "go" before the reboot.
    assert_eq!(
        s.confirmed(),
        [
            vec![(Step::Drain, "unimplemented")],
            vec![(Step::Update, "wait"); 3],
            vec![(Step::Update, "go"), (Step::Reboot, "go")]
        ]
        .concat()
    );
    let waited = s
        .reports
        .iter()
        .position(|(_, r)| r.message.contains("unhealthy"))
        .expect("the wait was reported");
    assert_eq!(s.reports[waited].1.phase, Phase::Updating);
    assert_eq!(s.boot, 2);
}

/// Red-team 2: after an UNIMPLEMENTED answer, a real Confirm that says
/// the token is stale (force-released right then) stops the agent before
/// the reboot.
#[tokio::test(start_paused = true)]
async fn a_stale_token_at_confirm_after_an_unimplemented_answer_stops_the_agent() {
    let mut state = SimState::default();
    kernel_update(&mut state);
    state.confirm_unimplemented_calls = 1;
    let sim = Sim::new(
        state,
        Faults::OnPoint {
            point: Point::Confirm,
            nth: 1,
            fault: Fault::ForceRelease,
            seen: 0,
        },
    );
    let d = Driver::new(sim, settings());
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none()
            && s.confirms == 2
            && a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    // Force-released at the update's Confirm, right after the drain's
    // UNIMPLEMENTED answer.
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 0);
    assert_eq!(s.count(|r| matches!(r, Rec::RebootRequest(_))), 0);
    assert_eq!(s.boot, 1);
    assert!(!s.cordoned);
}

/// Red-team 3: a renewal that hangs is no renewal: the drain stops when
/// the lease runs out (the grant's `overdue_after`), not only when the
/// hung call times out later, and starts again once the token is
/// confirmed. Here the drain would finish after the lease ran out but
/// before the hung renewal's deadline.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_hangs_stops_the_drain_when_the_lease_runs_out() {
    let mut state = SimState::default();
    kernel_update(&mut state);
    state.overdue_after = Duration::from_secs(12);
    state.drain_duration = Duration::from_secs(13);
    let sim = Sim::new(
        state,
        Faults::OnPoint {
            point: Point::Renew,
            // The first renewal during the drain (after the one that
            // confirms the token before it).
            nth: 1,
            fault: Fault::Hang,
            seen: 0,
        },
    );
    let d = Driver::new(sim, settings());
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    assert_eq!(
        s.count(|r| matches!(r, Rec::Prepare(_))),
        2,
        "the drain went on after the lease ran out: {:?}",
        s.log
    );
}

/// Red-team 3: a Failed report that the coordinator did not get (it was
/// unreachable right then) is sent again once it answers: a report error
/// is not "reported".
#[tokio::test(start_paused = true)]
async fn a_failed_report_that_was_lost_is_sent_again() {
    let d = kernel_driver(|s| {
        s.update_succeeds = false;
        // Unreachable from the failed update's end for two minutes:
        // every report of the failure in that time is lost.
        s.outage_after_update = Some(Duration::from_secs(120));
    });
    // One agent process throughout (a restart would report anew).
    assert!(!d.run(Duration::from_secs(600), |_, _| false).await);
    let s = d.sim.state();
    assert_eq!(s.incarnation, 1);
    let holder = s.holder.as_ref().expect("the baton is kept");
    assert_eq!(holder.phase, Some(Phase::Failed), "{:?}", s.reports);
    assert!(
        holder.message.contains("exit status 3"),
        "{}",
        holder.message
    );
}

/// Red-team of the fixes, A: the coordinator answers UNIMPLEMENTED to
/// Confirm(drain) just before it is upgraded (an outage of a few
/// seconds), and the upgraded one says "wait". The Renew fallback counts
/// only when the Renew sent right after the UNIMPLEMENTED answer succeeds
/// at once; after the outage the agent asks Confirm again and waits.
#[tokio::test(start_paused = true)]
async fn an_outage_after_an_unimplemented_confirm_asks_confirm_again() {
    let d = kernel_driver(|s| {
        s.confirm_unimplemented_calls = 1;
        s.outage_after_unimplemented = Some(Duration::from_secs(5));
        s.confirm_waits = vec![(Step::Drain, "etcd member n3 unhealthy".into())];
    });
    assert!(d.run(HOUR, done).await);
    let s = d.sim.state();
    let first_drain = s
        .log
        .iter()
        .position(|r| matches!(r, Rec::Prepare(_)))
        .unwrap();
    let confirms: Vec<_> = s.log[..first_drain]
        .iter()
        .filter_map(|r| match r {
            Rec::Confirmed { step, answer, .. } => Some((*step, *answer)),
            _ => None,
        })
        .collect();
    assert_eq!(
        confirms,
        [
            (Step::Drain, "unimplemented"),
            (Step::Drain, "wait"),
            (Step::Drain, "go")
        ],
        "the drain started after an outage on the old coordinator's UNIMPLEMENTED; the upgraded coordinator was never asked"
    );
}

/// Red-team of the fixes, B: the update unit must not outlive the baton.
/// A renewal refused for good while the update runs fails the
/// maintenance; the operator force-releases the Failed node, which is
/// uncordoned: the update must have been stopped by then.
#[tokio::test(start_paused = true)]
async fn a_refused_renewal_stops_the_update_before_the_node_is_given_back() {
    let d = kernel_driver(|s| {
        s.update_duration = HOUR;
        s.refuse_renew_on_update_start = true;
    });
    assert!(d.run(HOUR, failed).await);
    // Stopped when the maintenance failed, not only when the baton goes.
    let error = d.agent_state().unwrap().error.unwrap();
    assert!(
        error.contains("the run of baton-update-1.service is stopped"),
        "{error}"
    );
    assert!(
        d.sim
            .state()
            .stops
            .contains(&"baton-update-1.service".to_string()),
        "stopped after Failed was saved"
    );
    assert!(d.sim.state().units["baton-update-1.service"].ended);
    {
        let mut s = d.sim.state();
        s.renew_refused = false;
        s.force_release();
    }
    assert!(
        d.run(HOUR, |_, a| a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert!(
        running_units(&s).is_empty(),
        "idle (cordoned={}) with the update still running; stops {:?}",
        s.cordoned,
        s.stops
    );
}

/// An agent with `--update-unit` (an hour-long run), killed while the
/// update runs and restarted, until it is Failed.
async fn update_unit_killed_mid_run(faults: Faults) -> Driver {
    let mut state = SimState::default();
    kernel_update(&mut state);
    state
        .known_units
        .insert(UPDATE_UNIT.into(), UnitKind::Oneshot);
    state.update_duration = HOUR;
    let d = Driver::new(
        Sim::new(state, faults),
        Settings {
            update: Some(Action::Unit(UPDATE_UNIT.into())),
            ..settings()
        },
    );
    assert!(
        d.run(HOUR, |s, _| s
            .count(|r| matches!(r, Rec::UpdateStart { .. }))
            == 1)
            .await
    );
    d.sim.kill();
    assert!(d.run(HOUR, failed).await);
    d
}

/// The units whose run goes on now.
fn running_units(s: &SimState) -> Vec<String> {
    s.units
        .iter()
        .filter(|(_, r)| !r.ended && r.ends_at > Instant::now())
        .map(|(n, _)| n.clone())
        .collect()
}

/// Red-team of the fixes, B: `--update-unit`, the agent restarted while
/// the update runs (e.g. the update upgrades baton-agent's own package):
/// Failed ("not starting it a second time"), and the unit must not run
/// on into the force-release that uncordons the node.
#[tokio::test(start_paused = true)]
async fn an_update_unit_resumed_after_a_restart_is_stopped_before_the_node_is_given_back() {
    let d = update_unit_killed_mid_run(Faults::None).await;
    let error = d.agent_state().unwrap().error.unwrap();
    assert!(
        error.contains(&format!("the unit {UPDATE_UNIT} was stopped")),
        "{error}"
    );
    assert!(d.sim.state().units[UPDATE_UNIT].ended);
    d.sim.state().force_release();
    assert!(
        d.run(Duration::from_secs(600), |_, a| a
            .is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert!(running_units(&s).is_empty(), "stops {:?}", s.stops);
}

/// Red-team of the fixes, B: when stopping the update fails as the
/// maintenance fails, the run goes on in the Failed phase; giving the
/// node back after a force-release stops it first, whatever the phase.
#[tokio::test(start_paused = true)]
async fn losing_the_baton_in_failed_stops_an_update_that_still_runs() {
    let d = update_unit_killed_mid_run(Faults::OnPoint {
        point: Point::Stop,
        nth: 0,
        fault: Fault::Fail,
        seen: 0,
    })
    .await;
    let error = d.agent_state().unwrap().error.unwrap();
    assert!(error.contains("stopping the unit"), "{error}");
    assert!(!d.sim.state().units[UPDATE_UNIT].ended);
    d.sim.state().force_release();
    assert!(
        d.run(Duration::from_secs(600), |_, a| a
            .is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert!(running_units(&s).is_empty(), "stops {:?}", s.stops);
    assert!(!s.cordoned);
}

/// Red-team round 3: the stop when the baton is lost fails too. The node
/// is not given back while its update may still run: the stop is retried.
#[tokio::test(start_paused = true)]
async fn a_failed_stop_when_the_baton_is_lost_is_retried_before_giving_the_node_back() {
    let stop_fails_once = || Faults::OnPoint {
        point: Point::Stop,
        nth: 0,
        fault: Fault::Fail,
        seen: 0,
    };
    let d = update_unit_killed_mid_run(stop_fails_once()).await;
    assert!(!d.sim.state().units[UPDATE_UNIT].ended);
    d.sim.set_faults(stop_fails_once());
    d.sim.state().force_release();
    assert!(
        d.run(Duration::from_secs(600), |_, a| a
            .is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    assert!(running_units(&s).is_empty(), "stops {:?}", s.stops);
    assert!(!s.cordoned);
}

/// Red-team of the fixes, C: every renewal succeeds but takes more than a
/// third of the lease. Renewals scheduled from the last send keep the
/// lease; the drain must not be stopped as Stale at every lease end and
/// restarted from scratch forever.
#[tokio::test(start_paused = true)]
async fn slow_renewals_do_not_livelock_the_drain() {
    let d = kernel_driver(|s| {
        s.overdue_after = Duration::from_secs(9);
        s.renew_latency = Duration::from_secs(4);
        s.drain_duration = Duration::from_secs(20);
    });
    let finished = d.run(HOUR, |s, a| done(s, a) || failed(s, a)).await;
    let s = d.sim.state();
    let drains = s.count(|r| matches!(r, Rec::Prepare(_)));
    assert!(
        finished,
        "after an hour: not done and not failed; {drains} drains started, {} renewals, phase {:?}",
        s.renews,
        d.agent_state().map(|a| a.phase)
    );
}

/// Red-team of the fixes, C: renewals answered after more than half of
/// the lease cannot keep it (each is late for the lease it renews): the
/// drain is stopped at every lease end. After a bounded number of
/// restarts the maintenance is aborted: the node given back, the baton
/// released, nothing updated.
#[tokio::test(start_paused = true)]
async fn a_drain_stopped_by_the_lease_again_and_again_is_aborted() {
    let d = kernel_driver(|s| {
        s.overdue_after = Duration::from_secs(9);
        s.renew_latency = Duration::from_secs(6);
        s.drain_duration = Duration::from_secs(20);
    });
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none()
            && a.is_some_and(|a| a.phase == Phase::Idle))
            .await
    );
    let s = d.sim.state();
    let drains = s.count(|r| matches!(r, Rec::Prepare(_)));
    assert_eq!(drains, MAX_STALE_RESTARTS as usize);
    assert!(!s.cordoned);
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 0);
    assert_eq!(s.releases(), vec![1]);
    assert!(
        d.agent_state().unwrap().hold_back.is_some(),
        "holds back before asking again"
    );
}

/// Red-team of the fixes, C: a renewal answered after the lease it grants
/// ran out confirms nothing: no drain starts on it.
#[tokio::test(start_paused = true)]
async fn a_renewal_answered_after_its_lease_ran_out_confirms_nothing() {
    let d = kernel_driver(|s| {
        s.overdue_after = Duration::from_secs(9);
        s.renew_latency = Duration::from_secs(10);
    });
    assert!(!d.run(Duration::from_secs(600), |_, _| false).await);
    let s = d.sim.state();
    assert!(s.renews > 3, "kept asking: {} renewals", s.renews);
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 0);
    assert_eq!(d.agent_state().unwrap().phase, Phase::Preparing);
}
