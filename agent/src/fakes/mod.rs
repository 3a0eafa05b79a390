//! A simulated node, host and coordinator for the agent's tests: one
//! [`Sim`] behind the three I/O boundaries ([`SimHost`], [`SimCoordinator`],
//! [`SimNode`]) and the state file's save hook.
//!
//! The fakes are at least as strict as what they stand for:
//! - the coordinator keeps one holder, hands out growing tokens, refuses a
//!   stale token after a force-release (FAILED_PRECONDITION), refuses text
//!   over the published limits or with control characters
//!   (INVALID_ARGUMENT), and implements Confirm with a scriptable "wait";
//! - the host's units take time and keep running when the agent dies; a
//!   transient unit that ran stays (RemainAfterExit) and is followed, not
//!   run again; an existing unit that ended is started again by StartUnit;
//!   unknown units are refused; a reboot takes time, kills running units,
//!   clears `/run` and changes the boot_id;
//! - node operations take time and track whether the node is cordoned.
//!
//! Every call and every save is a *point* where a [`Faults`] plan can kill
//! the agent, fail the call, make it hang until its deadline, lose its
//! answer after it took effect, or have an operator force-release the baton
//! (see [`Fault`]). Everything that happens is appended to one log of
//! [`Rec`]ords, which the invariant checks read. [`driver`] runs agent
//! incarnations over a `Sim` (restarts, reboots) with tokio's paused clock.

pub mod coordinator;
pub mod driver;
pub mod host;
pub mod node;

use crate::phase::Phase;
use crate::state::{AgentState, SaveStage};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use coordinator::SimCoordinator;
pub use host::SimHost;
pub use node::{PrepareOutcome, SimNode};

/// Where a fault can be injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point {
    /// Saving the state with this phase.
    Save(Phase),
    /// Coordinator calls.
    Acquire,
    /// Renew.
    Renew,
    /// Report.
    Report,
    /// Release.
    Release,
    /// Confirm.
    Confirm,
    /// UploadBackup.
    UploadBackup,
    /// Host calls.
    BootId,
    /// The need check.
    Need,
    /// The reboot-required check.
    RebootRequired,
    /// Running a unit.
    Run(String),
    /// Asking for the reboot.
    Reboot,
    /// Stopping a unit.
    Stop,
    /// Listing logind's inhibitor locks.
    Inhibitors,
    /// Node operations.
    Prepare,
    /// Waiting for Ready.
    WaitReady,
    /// Uncordon after maintenance.
    Finish,
    /// Giving the node back.
    Abort,
    /// The blocking-pod check.
    Blockers,
    /// Showing a phase change.
    ShowPhase,
    /// Showing the blockers.
    ShowWaiting,
}

impl Point {
    /// True for points of the host and node operations (as opposed to the
    /// coordinator and the state file).
    pub fn is_host_or_node(&self) -> bool {
        !matches!(
            self,
            Point::Save(_)
                | Point::Acquire
                | Point::Renew
                | Point::Report
                | Point::Release
                | Point::Confirm
                | Point::UploadBackup
        )
    }
}

/// What happens at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// Nothing: the call goes through.
    None,
    /// The agent is killed before the call (SIGKILL).
    KillBefore,
    /// The call fails without effect.
    Fail,
    /// The call hangs until its deadline, then fails without effect.
    Hang,
    /// The call takes effect, but its answer is lost (an error).
    LoseAnswer,
    /// The call takes effect, then the agent is killed.
    KillAfter,
    /// An operator force-releases the baton just before the call.
    ForceRelease,
}

impl Fault {
    /// Every fault, for exhaustive runs.
    pub const ALL: [Fault; 6] = [
        Fault::KillBefore,
        Fault::Fail,
        Fault::Hang,
        Fault::LoseAnswer,
        Fault::KillAfter,
        Fault::ForceRelease,
    ];
}

/// A small deterministic random source (splitmix64), so that a seed
/// replays the same run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Which points get which fault.
#[derive(Debug, Clone)]
pub enum Faults {
    /// No faults (and count the points).
    None,
    /// `fault` at the `index`-th point (0-based, over all incarnations).
    At {
        /// The point's index.
        index: usize,
        /// The fault.
        fault: Fault,
    },
    /// `fault` at the `nth` (0-based) time `point` is reached.
    OnPoint {
        /// The point.
        point: Point,
        /// Which time it is reached.
        nth: usize,
        /// The fault.
        fault: Fault,
        /// Times reached so far.
        seen: usize,
    },
    /// Each point gets a random fault with probability `percent`%, at most
    /// `max` faults in all.
    Random {
        /// The random source.
        rng: Rng,
        /// Chance of a fault at each point.
        percent: u64,
        /// Most faults in one run.
        max: usize,
    },
}

/// One thing that happened, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    /// An agent process started (incarnation).
    AgentStarted(u32),
    /// A grant (fresh or resumed).
    Granted {
        /// The token.
        token: u64,
        /// False for a fresh grant.
        resumed: bool,
    },
    /// The agent released.
    Released {
        /// The token.
        token: u64,
        /// Whether a reboot was pending at the time.
        reboot_pending: bool,
        /// Whether an update ran under this token.
        updated: bool,
    },
    /// An operator force-released.
    ForceReleased(u64),
    /// The coordinator accepted the token (renew, confirm with proceed).
    TokenOk {
        /// The agent incarnation.
        inc: u32,
        /// The token.
        token: u64,
    },
    /// The coordinator refused the token.
    TokenRefused {
        /// The agent incarnation.
        inc: u32,
        /// The token.
        token: u64,
    },
    /// The coordinator answered Confirm (with a token it accepted, or
    /// UNIMPLEMENTED).
    Confirmed {
        /// The agent incarnation.
        inc: u32,
        /// The step asked about.
        step: crate::coordinator::Step,
        /// "go", "wait" or "unimplemented".
        answer: &'static str,
    },
    /// A control-plane backup was kept for this token.
    BackupKept(u64),
    /// A drain started.
    Prepare(u32),
    /// The update unit was started.
    UpdateStart {
        /// The agent incarnation.
        inc: u32,
        /// The unit.
        unit: String,
    },
    /// An update run already going was followed.
    UpdateJoin {
        /// The agent incarnation.
        inc: u32,
        /// The unit.
        unit: String,
    },
    /// An update run ended.
    UpdateEnd {
        /// The unit.
        unit: String,
        /// Whether it succeeded.
        success: bool,
    },
    /// A reboot was asked for.
    RebootRequest(u32),
    /// The machine went down.
    MachineDown,
    /// The machine booted (boot number).
    Booted(u32),
    /// The node was cordoned.
    Cordon,
    /// The node was uncordoned.
    Uncordon,
    /// A fault was injected.
    Injected {
        /// Where.
        point: Point,
        /// What.
        fault: Fault,
    },
}

/// How a unit behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// A `Type=oneshot` service (transient units, update units).
    Oneshot,
}

/// A unit's run.
#[derive(Debug, Clone)]
pub struct UnitRun {
    /// When it ends.
    pub ends_at: Instant,
    /// Whether it succeeds.
    pub success: bool,
    /// Whether its end was applied (effects, record).
    pub ended: bool,
}

/// The holder as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Its token.
    pub token: u64,
    /// Its last reported phase.
    pub phase: Option<Phase>,
    /// Its last reported message and error.
    pub message: String,
    /// The error.
    pub error: String,
    /// Whether an update ran under this grant.
    pub updated: bool,
}

/// Everything the simulation knows.
#[derive(Debug)]
pub struct SimState {
    // Host.
    /// Boots so far (the boot_id is `boot-N`).
    pub boot: u32,
    /// The update check says yes while true.
    pub updates_pending: bool,
    /// `/run/reboot-required` (cleared by a reboot).
    pub sentinel: bool,
    /// A sentinel that a reboot does not clear.
    pub persistent_sentinel: bool,
    /// The update creates the sentinel (like a kernel package).
    pub update_sets_sentinel: bool,
    /// Every need and reboot-required check fails (a directory where the
    /// sentinel file should be, a check command that hangs).
    pub sentinel_check_fails: bool,
    /// A successful update leaves something odd at the sentinel path:
    /// every check fails from then on (a reboot does not mend it).
    pub update_breaks_sentinel: bool,
    /// The update succeeds.
    pub update_succeeds: bool,
    /// A successful update makes the update check say no (false: phased
    /// or held packages keep it saying yes).
    pub update_clears_need: bool,
    /// The last lines of the update's output.
    pub update_output: String,
    /// How long the update runs.
    pub update_duration: Duration,
    /// Units that exist (by name) besides transient ones.
    pub known_units: BTreeMap<String, UnitKind>,
    /// Unit runs (current or last) by name.
    pub units: BTreeMap<String, UnitRun>,
    /// When the machine goes down after a reboot request.
    pub reboot_at: Option<Instant>,
    /// How long a reboot takes to take the machine down.
    pub reboot_delay: Duration,
    /// logind's inhibitor locks held now.
    pub inhibitors: Vec<crate::host::Inhibitor>,
    /// Reboots asked for while a lock blocked shutdown.
    pub reboots_while_inhibited: u32,
    /// Units stopped (by the agent, or by a run past its timeout).
    pub stops: Vec<String>,
    // Coordinator.
    /// The last token handed out.
    pub last_token: u64,
    /// The holder.
    pub holder: Option<Holder>,
    /// Confirm answers "wait" to a step with the first reason scripted
    /// here for that step (used up as it is answered); other steps go.
    pub confirm_waits: Vec<(crate::coordinator::Step, String)>,
    /// Confirm is not implemented (an older coordinator).
    pub confirm_unimplemented: bool,
    /// Renew answers PERMISSION_DENIED (refused for good) while set.
    pub renew_refused: bool,
    /// Set `renew_refused` when the update unit starts.
    pub refuse_renew_on_update_start: bool,
    /// How long every Renew takes to answer (a slow coordinator).
    pub renew_latency: Duration,
    /// An outage of this length starts right after the next UNIMPLEMENTED
    /// answer to Confirm (the older coordinator being upgraded).
    pub outage_after_unimplemented: Option<Duration>,
    /// The first this many Confirm calls are answered UNIMPLEMENTED (an
    /// older coordinator, upgraded afterwards).
    pub confirm_unimplemented_calls: u32,
    /// Grants are held back (the node waits in the queue).
    pub queue_blocked: bool,
    /// Every coordinator call fails (unreachable).
    pub coordinator_down: bool,
    /// The coordinator becomes unreachable as soon as a drain starts.
    pub outage_on_drain: bool,
    /// The coordinator is unreachable for this long from the end of the
    /// update run (None: no such outage).
    pub outage_after_update: Option<Duration>,
    /// The coordinator is unreachable until then.
    pub coordinator_down_until: Option<Instant>,
    /// Releases are refused for good (PERMISSION_DENIED).
    pub refuse_release: bool,
    /// Confirm calls answered.
    pub confirms: u32,
    /// The renew interval handed out with grants.
    pub renew_interval: Duration,
    /// How long a renewal counts.
    pub overdue_after: Duration,
    /// Every report accepted.
    pub reports: Vec<(u64, crate::coordinator::Report)>,
    /// Every release reason accepted.
    pub release_reasons: Vec<String>,
    /// Grants say a control-plane backup is required.
    pub backup_required: bool,
    /// The largest backup accepted (bytes), as the coordinator's limit.
    pub backup_max_bytes: u64,
    /// Uploads fail as with an unreachable coordinator (other calls pass).
    pub backup_unreachable: bool,
    /// Uploads are refused with this answer (e.g. "no snapshot kept").
    pub backup_refused: Option<String>,
    /// Backups kept: (token, sha256, size), checked like the coordinator.
    pub backups: Vec<(u64, String, u64)>,
    /// Acquire calls.
    pub acquires: u32,
    /// Renew calls answered.
    pub renews: u32,
    // Node.
    /// Whether the node is cordoned.
    pub cordoned: bool,
    /// How long a drain takes.
    pub drain_duration: Duration,
    /// How prepare ends.
    pub prepare: PrepareOutcome,
    /// The pods a timed-out drain names.
    pub drain_pending: Vec<String>,
    /// Blocking pods.
    pub blockers: Vec<String>,
    /// Node operations called, in order.
    pub node_calls: Vec<&'static str>,
    /// Phase changes shown on the node.
    pub shown: Vec<crate::node_ops::PhaseChange>,
    /// Blockers shown on the node.
    pub waiting_shown: Vec<Vec<String>>,
    // Bookkeeping.
    /// The agent's incarnation (restarts).
    pub incarnation: u32,
    /// Everything that happened.
    pub log: Vec<Rec>,
    /// Points passed (faulted or not).
    pub points: usize,
    /// Faults injected.
    pub faults: Vec<(usize, Point, Fault)>,
}

impl Default for SimState {
    fn default() -> Self {
        SimState {
            boot: 1,
            updates_pending: false,
            sentinel: false,
            persistent_sentinel: false,
            update_sets_sentinel: false,
            sentinel_check_fails: false,
            update_breaks_sentinel: false,
            update_succeeds: true,
            update_clears_need: true,
            update_output: "ok".into(),
            update_duration: Duration::from_secs(30),
            known_units: BTreeMap::new(),
            units: BTreeMap::new(),
            reboot_at: None,
            reboot_delay: Duration::from_secs(5),
            inhibitors: Vec::new(),
            reboots_while_inhibited: 0,
            stops: Vec::new(),
            last_token: 0,
            holder: None,
            confirm_waits: Vec::new(),
            confirm_unimplemented: false,
            renew_latency: Duration::ZERO,
            renew_refused: false,
            refuse_renew_on_update_start: false,
            outage_after_unimplemented: None,
            confirm_unimplemented_calls: 0,
            queue_blocked: false,
            coordinator_down: false,
            outage_on_drain: false,
            outage_after_update: None,
            coordinator_down_until: None,
            refuse_release: false,
            backup_required: false,
            backup_max_bytes: 64 * 1024 * 1024,
            backup_unreachable: false,
            backup_refused: None,
            backups: Vec::new(),
            confirms: 0,
            renew_interval: Duration::from_secs(5),
            overdue_after: Duration::from_secs(60),
            reports: Vec::new(),
            release_reasons: Vec::new(),
            acquires: 0,
            renews: 0,
            cordoned: false,
            drain_duration: Duration::from_secs(10),
            prepare: PrepareOutcome::Ok,
            drain_pending: vec!["apps/web-1 (disruption budget)".into()],
            blockers: Vec::new(),
            node_calls: Vec::new(),
            shown: Vec::new(),
            waiting_shown: Vec::new(),
            incarnation: 0,
            log: Vec::new(),
            points: 0,
            faults: Vec::new(),
        }
    }
}

impl SimState {
    /// The boot_id of the current boot.
    pub fn boot_id(&self) -> String {
        format!("boot-{}", self.boot)
    }

    /// True when a reboot sentinel exists.
    pub fn reboot_pending(&self) -> bool {
        self.sentinel || self.persistent_sentinel
    }

    /// Apply the end of every unit run whose time has come.
    pub fn settle(&mut self, now: Instant) {
        let mut ended = Vec::new();
        for (name, run) in self.units.iter_mut() {
            if !run.ended && run.ends_at <= now {
                run.ended = true;
                ended.push((name.clone(), run.success));
            }
        }
        for (unit, success) in ended {
            if success && is_update(&unit) {
                if self.update_clears_need {
                    self.updates_pending = false;
                }
                if self.update_sets_sentinel {
                    self.sentinel = true;
                }
                if self.update_breaks_sentinel {
                    self.sentinel_check_fails = true;
                }
            }
            if is_update(&unit) {
                self.log.push(Rec::UpdateEnd { unit, success });
                if let Some(outage) = self.outage_after_update.take() {
                    self.coordinator_down_until = Some(now + outage);
                }
            }
        }
    }

    /// The phases reported, in order.
    pub fn phases(&self) -> Vec<Phase> {
        self.reports.iter().map(|(_, r)| r.phase).collect()
    }

    /// Tokens released by the agent, in order.
    pub fn releases(&self) -> Vec<u64> {
        self.log
            .iter()
            .filter_map(|r| match r {
                Rec::Released { token, .. } => Some(*token),
                _ => None,
            })
            .collect()
    }

    /// Every Confirm answered, in order: the step and the answer.
    pub fn confirmed(&self) -> Vec<(crate::coordinator::Step, &'static str)> {
        self.log
            .iter()
            .filter_map(|r| match r {
                Rec::Confirmed { step, answer, .. } => Some((*step, *answer)),
                _ => None,
            })
            .collect()
    }

    /// How many times `rec` matches.
    pub fn count(&self, rec: impl Fn(&Rec) -> bool) -> usize {
        self.log.iter().filter(|r| rec(r)).count()
    }

    /// The node already holds the baton with `token`, last reported in
    /// `phase` (a state from before the test).
    pub fn hold(&mut self, token: u64, phase: Phase) {
        self.last_token = self.last_token.max(token);
        self.holder = Some(Holder {
            token,
            phase: Some(phase),
            message: String::new(),
            error: String::new(),
            updated: false,
        });
    }

    /// A process holds a lock that blocks shutdown, like `systemd-inhibit
    /// --what=shutdown --mode=block`.
    pub fn inhibit(&mut self, who: &str, why: &str) {
        self.inhibitors.push(crate::host::Inhibitor {
            what: "shutdown".into(),
            who: who.into(),
            why: why.into(),
            mode: "block".into(),
            uid: 0,
            pid: 4242,
        });
    }

    /// Stop the unit `name` if it runs: its run ends now, failed.
    pub fn stop_unit(&mut self, name: &str, now: Instant) {
        if let Some(run) = self.units.get_mut(name)
            && !run.ended
        {
            run.ends_at = now;
            run.success = false;
        } else if self.units.get(name).is_some_and(|run| run.success)
            && !self.known_units.contains_key(name)
        {
            // As systemd does: a transient unit whose run ended well is
            // inactive once stopped, and then garbage-collected (a failed
            // one stays until reset).
            self.units.remove(name);
        }
        self.stops.push(name.to_string());
        self.settle(now);
    }

    /// Force-release the holder, as an operator would.
    pub fn force_release(&mut self) {
        if let Some(holder) = self.holder.take() {
            self.log.push(Rec::ForceReleased(holder.token));
        }
    }
}

/// True for the units that apply the update.
pub fn is_update(unit: &str) -> bool {
    unit.starts_with("baton-update-") || unit == UPDATE_UNIT
}

/// The name of the existing update unit in scenarios with `--update-unit`.
pub const UPDATE_UNIT: &str = "site-upgrade.service";

/// Why a call failed by injection (the caller builds its own error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Failed at once.
    Failed,
    /// Hung until its deadline.
    TimedOut,
}

/// The simulation: state, fault plan, kill switch.
pub struct Sim {
    state: Mutex<SimState>,
    faults: Mutex<Faults>,
    killed: AtomicBool,
    kill: Notify,
    /// The epoch of the wall clock the agent and the coordinator read.
    epoch: (SystemTime, Instant),
}

impl Sim {
    /// A simulation with `state` and fault plan `faults`.
    pub fn new(state: SimState, faults: Faults) -> Arc<Sim> {
        Arc::new(Sim {
            state: Mutex::new(state),
            faults: Mutex::new(faults),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
            epoch: (
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                Instant::now(),
            ),
        })
    }

    /// Replace the fault plan.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// The state (settled to now).
    pub fn state(&self) -> MutexGuard<'_, SimState> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.settle(Instant::now());
        state
    }

    /// The wall clock, following tokio's (paused) clock.
    pub fn now_wall(&self) -> SystemTime {
        self.epoch.0 + (Instant::now() - self.epoch.1)
    }

    /// A wall clock for the agent.
    pub fn clock(self: &Arc<Self>) -> crate::agent::WallClock {
        let sim = self.clone();
        Arc::new(move || sim.now_wall())
    }

    /// True once the current agent incarnation was killed.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Kill the current agent incarnation: every call it makes from now on
    /// hangs and every save fails; the driver drops it.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.kill.notify_waiters();
        self.kill.notify_one();
    }

    /// Wait until the agent is killed.
    pub async fn killed(&self) {
        while !self.is_killed() {
            self.kill.notified().await;
        }
    }

    /// A new agent process starts.
    pub fn start_incarnation(&self) -> u32 {
        self.killed.store(false, Ordering::SeqCst);
        let mut state = self.state();
        state.incarnation += 1;
        let inc = state.incarnation;
        state.log.push(Rec::AgentStarted(inc));
        inc
    }

    /// The fault for the next point (counting it).
    fn decide(&self, point: &Point) -> Fault {
        let mut state = self.state();
        let index = state.points;
        state.points += 1;
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let fault = match &mut *faults {
            Faults::None => Fault::None,
            Faults::At { index: at, fault } if *at == index => *fault,
            Faults::At { .. } => Fault::None,
            Faults::OnPoint {
                point: at,
                nth,
                fault,
                seen,
            } if at == point => {
                *seen += 1;
                if *seen == *nth + 1 {
                    *fault
                } else {
                    Fault::None
                }
            }
            Faults::OnPoint { .. } => Fault::None,
            Faults::Random { rng, percent, max } => {
                if state.faults.len() < *max && rng.below(100) < *percent {
                    Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize]
                } else {
                    Fault::None
                }
            }
        };
        let fault = applicable(point, fault);
        if fault != Fault::None {
            state.faults.push((index, point.clone(), fault));
            state.log.push(Rec::Injected {
                point: point.clone(),
                fault,
            });
            if fault == Fault::ForceRelease {
                state.force_release();
            }
        }
        fault
    }

    /// Enter a call at `point`. Ok(fault): go on with the effect (then pass
    /// the answer through [`Sim::leave`]). Err: the call fails without
    /// effect, after hanging for `hang` if it hangs. A killed agent never
    /// gets past this.
    pub async fn enter(&self, point: Point, hang: Duration) -> Result<Fault, Injected> {
        if self.is_killed() {
            return std::future::pending().await;
        }
        match self.decide(&point) {
            Fault::KillBefore => {
                self.kill();
                std::future::pending().await
            }
            Fault::Fail => Err(Injected::Failed),
            Fault::Hang => {
                tokio::time::sleep(hang).await;
                Err(Injected::TimedOut)
            }
            fault => Ok(fault),
        }
    }

    /// Leave a call: the answer, or `lost` if the answer is lost, or never
    /// (the agent is killed after the effect).
    pub async fn leave<T, E>(&self, fault: Fault, answer: Result<T, E>, lost: E) -> Result<T, E> {
        match fault {
            Fault::LoseAnswer => Err(lost),
            Fault::KillAfter => {
                self.kill();
                std::future::pending().await
            }
            _ => answer,
        }
    }

    /// A call without an answer to lose (best-effort visibility): killed
    /// or hung, or through.
    pub async fn enter_quiet(&self, point: Point, hang: Duration) {
        let _ = self.enter(point, hang).await;
    }

    /// The state file's save hook: kill or fail a save.
    pub fn save_hook(self: &Arc<Self>) -> crate::state::SaveHook {
        let sim = self.clone();
        let pending_kill = Arc::new(AtomicBool::new(false));
        Arc::new(move |stage, state: &AgentState| {
            let dead = || std::io::Error::other("the agent was killed");
            if sim.is_killed() {
                return Err(dead());
            }
            match stage {
                SaveStage::Before => match sim.decide(&Point::Save(state.phase)) {
                    Fault::KillBefore => {
                        sim.kill();
                        Err(dead())
                    }
                    Fault::Fail | Fault::Hang => Err(std::io::Error::other("injected: disk full")),
                    Fault::LoseAnswer | Fault::KillAfter => {
                        pending_kill.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                    Fault::None | Fault::ForceRelease => Ok(()),
                },
                SaveStage::After => {
                    if pending_kill.swap(false, Ordering::SeqCst) {
                        sim.kill();
                        return Err(dead());
                    }
                    Ok(())
                }
            }
        })
    }

    /// Take the machine down (the driver calls this at `reboot_at`) and
    /// boot it again.
    pub fn reboot_now(&self) {
        self.kill();
        let mut state = self.state();
        state.reboot_at = None;
        state.log.push(Rec::MachineDown);
        // Running units die with the machine; transient units are gone.
        state.units.clear();
        state.sentinel = false;
        state.boot += 1;
        let boot = state.boot;
        state.log.push(Rec::Booted(boot));
    }

    /// Record a call of a node operation.
    pub fn node_call(&self, name: &'static str) {
        self.state().node_calls.push(name);
    }
}

/// The fault that makes sense at `point` (others become `None`): saves
/// have no answer to lose and cannot hang; visibility calls only die or
/// hang; checks without an error have no answer to lose.
fn applicable(point: &Point, fault: Fault) -> Fault {
    match (point, fault) {
        (Point::Save(_), Fault::Hang) => Fault::Fail,
        (Point::Save(_), Fault::LoseAnswer) => Fault::KillAfter,
        (Point::ShowPhase | Point::ShowWaiting, Fault::KillBefore | Fault::Hang) => fault,
        (Point::ShowPhase | Point::ShowWaiting, Fault::ForceRelease) => fault,
        (Point::ShowPhase | Point::ShowWaiting, _) => Fault::None,
        (Point::Need | Point::RebootRequired, Fault::LoseAnswer) => Fault::Fail,
        _ => fault,
    }
}

/// The state file an agent from before control-plane backups saved while
/// it held grant `token` in Preparing: none of the backup fields.
pub fn older_agents_state(token: u64) -> serde_json::Value {
    let mut old = serde_json::to_value(AgentState {
        phase: Phase::Preparing,
        fencing_token: Some(token),
        reason: "updates pending".into(),
        ..AgentState::idle()
    })
    .expect("state as JSON");
    if let Some(fields) = old.as_object_mut() {
        fields.retain(|k, _| !k.starts_with("backup"));
    }
    old
}
