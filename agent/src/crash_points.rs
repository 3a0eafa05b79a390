//! Crash-point tests of the agent: the whole maintenance over the
//! simulated node (`crate::fakes`), once per point with each fault, and
//! with seeded random combinations of faults, the agent restarted on the
//! same state directory after every kill; then the invariants.
//!
//! A *point* is every persisted write and every external call
//! (coordinator, host and logind, node operations). The faults: kill the
//! agent before the call or after it took effect, fail it, make it hang
//! until its deadline, lose its answer after it took effect, or have an
//! operator force-release the baton right then.
//!
//! The invariants, checked on the simulation's log after each run:
//! 1. never released after an update while a reboot is still pending (the
//!    sentinel is cleared only by a real reboot, so a release after it
//!    proves the reboot);
//! 2. never a drain, an update (started or followed) or a reboot request
//!    unless the coordinator's last answer about the token in *this*
//!    agent process accepted it;
//! 3. the update is started at most once per grant, and every drain,
//!    update start and reboot request comes after its own Confirm (of
//!    that step) in this agent process, answered "go" (or UNIMPLEMENTED by
//!    an older coordinator, then the token confirmed with Renew): never
//!    after "wait", never on another step's answer;
//! 4. the node is not left cordoned once the baton is gone;
//! 5. when grants ask for a control-plane backup, never a drain for a
//!    grant before its backup was kept, nor on a Confirm(drain) answered
//!    before that backup was kept;
//! 6. no endless loop: the run ends done (released, idle, nothing needed)
//!    or failed (the baton kept, Failed reported) within a bound of
//!    virtual time, with a bounded number of grants and reboots; and it
//!    ends done whenever the only faults were kills, force-releases,
//!    failed saves or coordinator faults (the agent must recover from all
//!    of those).
//!
//! A failure prints the scenario, the fault plan (seed) and the log, so
//! it replays exactly: the clock is tokio's paused clock and the runtime is
//! single-threaded.

use crate::agent::{Action, Settings};
use crate::coordinator::Step;
use crate::fakes::driver::{Driver, settings};
use crate::fakes::{
    Fault, Faults, Point, PrepareOutcome, Rec, Rng, Sim, SimState, UPDATE_UNIT, UnitKind,
};
use crate::phase::Phase;
use crate::state::AgentState;
use std::time::{Duration, Instant};

/// The most virtual time a run may take.
const LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Seeded random runs per scenario.
const SEEDS: u64 = 150;

/// One maintenance to run.
struct Scenario {
    name: &'static str,
    setup: fn(&mut SimState),
    settings: fn() -> Settings,
    /// The state file the first agent process finds (None: none).
    state_file: Option<fn() -> serde_json::Value>,
}

fn kernel_update(s: &mut SimState) {
    s.updates_pending = true;
    s.update_sets_sentinel = true;
}

/// A small pki directory for the backup scenario (one per test process).
fn pki_dir() -> std::path::PathBuf {
    static PKI: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.key"), b"KEY").expect("writing ca.key");
        dir
    })
    .path()
    .to_path_buf()
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "update command, reboot",
            setup: kernel_update,
            settings,
            state_file: None,
        },
        Scenario {
            name: "update unit, reboot, coordinator says wait",
            setup: |s| {
                kernel_update(s);
                s.known_units.insert(UPDATE_UNIT.into(), UnitKind::Oneshot);
                s.confirm_waits = vec![
                    (Step::Drain, "etcd member n2 unhealthy".into()),
                    (Step::Update, "etcd member n2 unhealthy".into()),
                ];
            },
            settings: || Settings {
                update: Some(Action::Unit(UPDATE_UNIT.into())),
                post_check: Some(Action::Command("true".into())),
                ..settings()
            },
            state_file: None,
        },
        Scenario {
            name: "update without reboot, older coordinator",
            setup: |s| {
                s.updates_pending = true;
                s.confirm_unimplemented = true;
            },
            settings,
            state_file: None,
        },
        Scenario {
            name: "coordinators upgraded during the maintenance",
            setup: |s| {
                kernel_update(s);
                // UNIMPLEMENTED before the drain, then "wait" before the
                // update from the upgraded coordinator.
                s.confirm_unimplemented_calls = 1;
                s.confirm_waits = vec![(Step::Update, "etcd member n2 unhealthy".into())];
            },
            settings,
            state_file: None,
        },
        Scenario {
            name: "control-plane node: backup before the drain",
            setup: |s| {
                kernel_update(s);
                s.backup_required = true;
            },
            settings: || Settings {
                backup_paths: vec![pki_dir()],
                ..settings()
            },
            state_file: None,
        },
        Scenario {
            name: "control-plane node resumed from an older agent's state",
            setup: |s| {
                kernel_update(s);
                s.backup_required = true;
                // Grant 1 is held; the older agent saved Preparing.
                s.hold(1, Phase::Preparing);
            },
            settings: || Settings {
                backup_paths: vec![pki_dir()],
                ..settings()
            },
            state_file: Some(|| crate::fakes::older_agents_state(1)),
        },
        Scenario {
            name: "drain times out",
            setup: |s| {
                kernel_update(s);
                s.prepare = PrepareOutcome::DrainTimeout;
            },
            settings,
            state_file: None,
        },
    ]
}

/// What a run ended in.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Done,
    Failed,
}

fn done(s: &SimState, a: Option<&AgentState>) -> bool {
    s.holder.is_none()
        && a.is_some_and(|a| a.phase == Phase::Idle)
        && !s.reboot_pending()
        && !s.updates_pending
        && s.reboot_at.is_none()
}

fn failed(s: &SimState, a: Option<&AgentState>) -> bool {
    a.is_some_and(|a| a.phase == Phase::Failed)
        && s.holder.as_ref().and_then(|h| h.phase) == Some(Phase::Failed)
}

/// For the drain-timeout scenario "done" is: aborted and given back, with
/// the node idle and holding nothing.
fn aborted(s: &SimState, a: Option<&AgentState>) -> bool {
    s.holder.is_none()
        && !s.releases().is_empty()
        && a.is_some_and(|a| a.phase == Phase::Idle)
        && s.reboot_at.is_none()
}

/// Run `scenario` with `faults`; the end and the final simulation, or why
/// an invariant broke.
fn run(scenario: &Scenario, faults: Faults) -> Result<(End, usize), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut state = SimState::default();
        (scenario.setup)(&mut state);
        let aborts = state.prepare == PrepareOutcome::DrainTimeout;
        let sim = Sim::new(state, faults);
        let driver = Driver::new(sim.clone(), (scenario.settings)());
        if let Some(state_file) = scenario.state_file {
            std::fs::write(
                driver.dir.path().join("state.json"),
                serde_json::to_vec(&state_file()).expect("state as JSON"),
            )
            .expect("writing the state file");
        }
        let finished = driver
            .run(LIMIT, |s, a| {
                failed(s, a) || if aborts { aborted(s, a) } else { done(s, a) }
            })
            .await;
        let agent = driver.agent_state();
        let s = sim.state();
        let describe = |why: &str| {
            format!(
                "{why}\nscenario: {}\nfaults: {:?}\nagent: {agent:?}\nlog:\n{}",
                scenario.name,
                s.faults,
                s.log
                    .iter()
                    .map(|r| format!("  {r:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        };
        if !finished {
            return Err(describe("no end within the time bound (a loop?)"));
        }
        let end = if failed(&s, agent.as_ref()) {
            End::Failed
        } else {
            End::Done
        };
        let error = agent.as_ref().and_then(|a| a.error.clone());
        check(&s, &end, error.as_deref()).map_err(|why| describe(&why))?;
        Ok((end, s.points))
    })
}

/// The invariants of the module docs.
fn check(s: &SimState, end: &End, error: Option<&str>) -> Result<(), String> {
    let mut last_answer: Option<(u32, bool)> = None;
    let mut last_confirm: Option<(u32, Step, &str)> = None;
    let mut starts_this_grant = 0;
    // The grant held now, and whether its backup was kept.
    let mut grant: Option<u64> = None;
    let mut backed_up = false;
    for (i, rec) in s.log.iter().enumerate() {
        match rec {
            Rec::Granted { token, .. } => {
                if grant != Some(*token) {
                    backed_up = false;
                }
                grant = Some(*token);
            }
            Rec::BackupKept(token) if grant == Some(*token) => {
                backed_up = true;
                // A Confirm answered before the backup was kept does not
                // let the drain through.
                last_confirm = None;
            }
            _ => {}
        }
        if s.backup_required && matches!(rec, Rec::Prepare(_)) && !backed_up {
            return Err(format!(
                "#{i}: drained for grant {grant:?} before its control-plane backup was kept"
            ));
        }
        match rec {
            Rec::Released {
                token,
                reboot_pending: true,
                updated: true,
            } => {
                return Err(format!(
                    "#{i}: token {token} released after an update with a reboot pending"
                ));
            }
            Rec::TokenOk { inc, .. } => last_answer = Some((*inc, true)),
            Rec::TokenRefused { inc, .. } => last_answer = Some((*inc, false)),
            Rec::AgentStarted(_) => {
                last_answer = None;
                last_confirm = None;
            }
            Rec::Confirmed { inc, step, answer } => last_confirm = Some((*inc, *step, answer)),
            Rec::Granted { resumed: false, .. } => starts_this_grant = 0,
            _ => {}
        }
        let destructive = match rec {
            Rec::Prepare(inc) | Rec::RebootRequest(inc) => Some(*inc),
            Rec::UpdateStart { inc, .. } | Rec::UpdateJoin { inc, .. } => Some(*inc),
            _ => None,
        };
        if let Some(inc) = destructive
            && last_answer != Some((inc, true))
        {
            return Err(format!(
                "#{i}: {rec:?} without the token confirmed in this process (last answer {last_answer:?})"
            ));
        }
        let own_step = match rec {
            Rec::Prepare(inc) => Some((*inc, Step::Drain)),
            Rec::UpdateStart { inc, .. } => Some((*inc, Step::Update)),
            Rec::RebootRequest(inc) => Some((*inc, Step::Reboot)),
            _ => None,
        };
        if let Some((inc, step)) = own_step {
            if !matches!(last_confirm, Some((i, s, "go" | "unimplemented")) if i == inc && s == step)
            {
                return Err(format!(
                    "#{i}: {rec:?} without its own Confirm({step}) answered go in this process (last answer {last_confirm:?})"
                ));
            }
            last_confirm = None;
        }
        if matches!(rec, Rec::UpdateStart { .. }) {
            starts_this_grant += 1;
            if starts_this_grant > 1 {
                return Err(format!("#{i}: the update started twice for one grant"));
            }
        }
    }
    if s.holder.is_none() && s.cordoned {
        return Err("the baton is gone but the node is still cordoned".into());
    }
    let faults = s.faults.len();
    let grants = s.count(|r| matches!(r, Rec::Granted { resumed: false, .. }));
    if grants > 2 + 2 * faults {
        return Err(format!("{grants} grants for {faults} faults (a loop?)"));
    }
    let reboots = s.boot as usize - 1;
    if reboots > 1 + faults {
        return Err(format!("{reboots} reboots for {faults} faults (a loop?)"));
    }
    let may_fail = s.faults.iter().any(|(_, point, fault)| {
        point.is_host_or_node() && matches!(fault, Fault::Fail | Fault::Hang | Fault::LoseAnswer)
    }) || faults > 1
        // With --update-unit, a restart after the unit was started cannot
        // tell whether its run ended: the agent fails closed rather than
        // risk a second run.
        || error.is_some_and(|e| e.contains("not starting it a second time"));
    if *end == End::Failed && !may_fail {
        return Err(format!(
            "ended in Failed after faults the agent must recover from: {:?}",
            s.faults
        ));
    }
    Ok(())
}

/// Every point of the clean run with every fault, then the seeds.
fn exhaust(scenario: &Scenario) {
    let started = Instant::now();
    let (end, points) = run(scenario, Faults::None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        end,
        End::Done,
        "{}: the clean run must finish",
        scenario.name
    );
    let mut runs = 1;
    for index in 0..points {
        for fault in Fault::ALL {
            runs += 1;
            if let Err(why) = run(scenario, Faults::At { index, fault }) {
                panic!("point {index} of {points}, {fault:?}:\n{why}");
            }
        }
    }
    for seed in 0..SEEDS {
        runs += 1;
        let faults = Faults::Random {
            rng: Rng::new(seed),
            percent: 4,
            max: 3,
        };
        if let Err(why) = run(scenario, faults) {
            panic!("seed {seed} (replay with Rng::new({seed}), 4%, max 3):\n{why}");
        }
    }
    eprintln!(
        "crash points, {}: {points} points x {} faults + {SEEDS} seeds = {runs} runs in {:.1?}",
        scenario.name,
        Fault::ALL.len(),
        started.elapsed()
    );
}

#[test]
fn crash_points_update_command_with_reboot() {
    exhaust(&scenarios()[0]);
}

#[test]
fn crash_points_update_unit_with_confirm_waits() {
    exhaust(&scenarios()[1]);
}

#[test]
fn crash_points_update_without_reboot_older_coordinator() {
    exhaust(&scenarios()[2]);
}

#[test]
fn crash_points_coordinators_upgraded_mid_maintenance() {
    exhaust(&scenarios()[3]);
}

#[test]
fn crash_points_control_plane_backup() {
    exhaust(&scenarios()[4]);
}

#[test]
fn crash_points_control_plane_resumed_from_an_older_agents_state() {
    exhaust(&scenarios()[5]);
}

#[test]
fn crash_points_drain_timeout() {
    exhaust(&scenarios()[6]);
}

/// The harness can fail: an agent that releases right after the update
/// (as the agent before finding 1 could) breaks invariant 1.
#[test]
fn the_checks_catch_a_release_with_a_reboot_pending() {
    let s = SimState {
        log: vec![
            Rec::AgentStarted(1),
            Rec::Granted {
                token: 1,
                resumed: false,
            },
            Rec::Released {
                token: 1,
                reboot_pending: true,
                updated: true,
            },
        ],
        ..SimState::default()
    };
    assert!(check(&s, &End::Done, None).is_err());
    let s = SimState {
        log: vec![
            Rec::AgentStarted(1),
            Rec::TokenOk { inc: 1, token: 1 },
            Rec::AgentStarted(2),
            Rec::Prepare(2),
        ],
        ..SimState::default()
    };
    let why = check(&s, &End::Done, None).unwrap_err();
    assert!(why.contains("without the token confirmed"), "{why}");
    // A reboot on the update's Confirm (as an agent that remembered an
    // UNIMPLEMENTED answer for good would do), or after "wait".
    let confirmed = |step, answer| Rec::Confirmed {
        inc: 1,
        step,
        answer,
    };
    for answers in [vec!["unimplemented"], vec!["go", "wait"]] {
        let mut log = vec![
            Rec::AgentStarted(1),
            confirmed(Step::Update, "unimplemented"),
            Rec::TokenOk { inc: 1, token: 1 },
            Rec::UpdateStart {
                inc: 1,
                unit: "baton-update-1.service".into(),
            },
        ];
        log.extend(
            answers[1..]
                .iter()
                .map(|answer| confirmed(Step::Reboot, answer)),
        );
        log.extend([Rec::TokenOk { inc: 1, token: 1 }, Rec::RebootRequest(1)]);
        if answers[0] == "go" {
            log.insert(4, confirmed(Step::Reboot, "go"));
        }
        let s = SimState {
            log,
            ..SimState::default()
        };
        let why = check(&s, &End::Done, None).unwrap_err();
        assert!(
            why.contains("without its own Confirm(reboot)"),
            "{answers:?}: {why}"
        );
    }
    // A drain with no Confirm of its own (the token confirmed by Renew
    // only, as the agent before the drain's Confirm did), or on the
    // answer for another step.
    for before in [vec![], vec![confirmed(Step::Update, "go")]] {
        let mut log = vec![Rec::AgentStarted(1)];
        log.extend(before);
        log.extend([Rec::TokenOk { inc: 1, token: 1 }, Rec::Prepare(1)]);
        let s = SimState {
            log,
            ..SimState::default()
        };
        let why = check(&s, &End::Done, None).unwrap_err();
        assert!(why.contains("without its own Confirm(drain)"), "{why}");
    }
    // With a backup asked for: a drain on a Confirm answered before the
    // backup was kept; and the order that is right.
    let backup_log = |confirm_first: bool| {
        let mut log = vec![
            Rec::AgentStarted(1),
            Rec::Granted {
                token: 1,
                resumed: false,
            },
            Rec::BackupKept(1),
        ];
        let at = if confirm_first { 2 } else { 3 };
        log.insert(at, confirmed(Step::Drain, "go"));
        log.extend([Rec::TokenOk { inc: 1, token: 1 }, Rec::Prepare(1)]);
        SimState {
            log,
            backup_required: true,
            ..SimState::default()
        }
    };
    let why = check(&backup_log(true), &End::Done, None).unwrap_err();
    assert!(why.contains("without its own Confirm(drain)"), "{why}");
    assert_eq!(check(&backup_log(false), &End::Done, None), Ok(()));
    let _ = Point::Renew;
}
