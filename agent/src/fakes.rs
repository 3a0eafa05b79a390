//! In-memory fakes of the three I/O boundaries, for the agent's unit tests.
//! Each fake records what was asked of it so tests can check it afterwards.

use crate::coordinator::{Coordinator, CoordinatorError, Grant, Report};
use crate::host::{HostError, HostOs, Inhibitor, Job, UnitOutcome, check_runnable_unit};
use crate::kubernetes::KubeError;
use crate::node_ops::{NodeOps, NodeOpsError, PhaseChange};
use crate::phase::Phase;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A machine: a boot_id, sentinels, scripted unit outcomes.
///
/// As strict as systemd where the agent depends on it: only services can be
/// run; a run takes `run_time` (virtual time) whatever the unit's Type, and
/// goes on when the agent stops waiting (a restarted agent follows it
/// instead of starting another); a run past its timeout is stopped; logind
/// inhibitors do not stop a reboot (root overrides them), they are only
/// listed; a reboot takes `reboot_delay` before the machine goes down.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub boot_id: Mutex<String>,
    pub need: Mutex<Option<String>>,
    pub reboot_required: Mutex<bool>,
    pub update_succeeds: Mutex<bool>,
    pub jobs: Mutex<Vec<Job>>,
    pub reboots: Mutex<u32>,
    /// Cancelled when a reboot is requested: systemd stops the agent.
    pub on_reboot: Mutex<Option<CancellationToken>>,
    /// How long a run of a unit lasts (zero: it ends at once).
    pub run_time: Mutex<Duration>,
    /// Runs going on: unit name -> when the run ends and how.
    pub running: Mutex<HashMap<String, (tokio::time::Instant, bool)>>,
    /// Units stopped (by `stop`, or by `run` after its timeout).
    pub stops: Mutex<Vec<String>>,
    /// Inhibitor locks held now.
    pub inhibitors: Mutex<Vec<Inhibitor>>,
    /// Reboots asked for while a lock blocked shutdown.
    pub reboots_while_inhibited: Mutex<u32>,
    /// How long after the reboot request the machine goes down.
    pub reboot_delay: Mutex<Duration>,
}

impl FakeHost {
    /// Runs of units last `run_time`.
    pub fn runs_take(&self, run_time: Duration) -> &Self {
        *self.run_time.lock().unwrap() = run_time;
        self
    }

    /// The machine goes down `delay` after the reboot request.
    pub fn reboot_takes(&self, delay: Duration) -> &Self {
        *self.reboot_delay.lock().unwrap() = delay;
        self
    }

    /// A process holds a lock that blocks shutdown (what "shutdown", mode
    /// "block"), like `systemd-inhibit --what=shutdown --mode=block`.
    pub fn inhibit(&self, who: &str, why: &str) -> &Self {
        self.inhibitors.lock().unwrap().push(Inhibitor {
            what: "shutdown".into(),
            who: who.into(),
            why: why.into(),
            mode: "block".into(),
            uid: 0,
            pid: 4242,
        });
        self
    }

    fn outcome(success: bool) -> UnitOutcome {
        UnitOutcome {
            success,
            detail: if success {
                "job done".into()
            } else {
                "job failed, exit status 3".into()
            },
            output_tail: "boom".into(),
        }
    }
}

impl HostOs for Arc<FakeHost> {
    async fn boot_id(&self) -> Result<String, HostError> {
        Ok(self.boot_id.lock().unwrap().clone())
    }
    async fn maintenance_needed(&self) -> Option<String> {
        self.need.lock().unwrap().clone()
    }
    async fn reboot_required(&self) -> bool {
        *self.reboot_required.lock().unwrap()
    }
    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError> {
        check_runnable_unit(job.unit_name())?;
        let name = job.unit_name().to_string();
        let now = tokio::time::Instant::now();
        let (ends, success) = {
            let mut running = self.running.lock().unwrap();
            match running.get(&name) {
                // An earlier agent's run still going: follow it.
                Some(&(ends, success)) if ends > now => (ends, success),
                _ => {
                    self.jobs.lock().unwrap().push(job.clone());
                    let run = (
                        now + *self.run_time.lock().unwrap(),
                        *self.update_succeeds.lock().unwrap(),
                    );
                    running.insert(name.clone(), run);
                    run
                }
            }
        };
        if tokio::time::timeout_at(now + timeout, tokio::time::sleep_until(ends))
            .await
            .is_err()
        {
            self.stop(job).await?;
            return Err(HostError::Timeout {
                what: name,
                timeout,
            });
        }
        Ok(FakeHost::outcome(success))
    }
    async fn stop(&self, job: &Job) -> Result<(), HostError> {
        let name = job.unit_name().to_string();
        let now = tokio::time::Instant::now();
        let mut running = self.running.lock().unwrap();
        if running.get(&name).is_some_and(|(ends, _)| *ends > now) {
            // Stopped runs end as failed.
            running.insert(name.clone(), (now, false));
        }
        self.stops.lock().unwrap().push(name);
        Ok(())
    }
    async fn reboot_inhibitors(&self) -> Result<Vec<Inhibitor>, HostError> {
        let locks = self.inhibitors.lock().unwrap();
        Ok(locks
            .iter()
            .filter(|l| l.blocks_shutdown())
            .cloned()
            .collect())
    }
    async fn reboot(&self) -> Result<(), HostError> {
        *self.reboots.lock().unwrap() += 1;
        if self
            .inhibitors
            .lock()
            .unwrap()
            .iter()
            .any(Inhibitor::blocks_shutdown)
        {
            *self.reboots_while_inhibited.lock().unwrap() += 1;
        }
        if let Some(token) = self.on_reboot.lock().unwrap().clone() {
            let delay = *self.reboot_delay.lock().unwrap();
            if delay.is_zero() {
                token.cancel();
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    token.cancel();
                });
            }
        }
        Ok(())
    }
}

/// A coordinator that grants at once and records every call.
#[derive(Debug, Default)]
pub struct FakeCoordinator {
    pub next_token: Mutex<u64>,
    /// What Acquire(wait = false) finds: Some(token) = held, resumed.
    pub held: Mutex<Option<u64>>,
    pub fenced: Mutex<bool>,
    pub acquires: Mutex<u32>,
    pub renews: Mutex<u32>,
    pub reports: Mutex<Vec<(u64, Report)>>,
    pub releases: Mutex<Vec<u64>>,
    pub release_reasons: Mutex<Vec<String>>,
}

impl FakeCoordinator {
    pub fn phases(&self) -> Vec<Phase> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.phase)
            .collect()
    }
}

impl Coordinator for Arc<FakeCoordinator> {
    async fn acquire(&self, _reason: &str, wait: bool) -> Result<Option<Grant>, CoordinatorError> {
        *self.acquires.lock().unwrap() += 1;
        if let Some(token) = *self.held.lock().unwrap() {
            return Ok(Some(Grant {
                fencing_token: token,
                resumed: true,
                renew_interval: None,
            }));
        }
        if !wait {
            return Ok(None);
        }
        let mut next = self.next_token.lock().unwrap();
        *next += 1;
        *self.held.lock().unwrap() = Some(*next);
        Ok(Some(Grant {
            fencing_token: *next,
            resumed: false,
            renew_interval: None,
        }))
    }
    async fn renew(&self, _token: u64) -> Result<(), CoordinatorError> {
        *self.renews.lock().unwrap() += 1;
        if *self.fenced.lock().unwrap() {
            return Err(CoordinatorError::Fenced("stale token".into()));
        }
        Ok(())
    }
    async fn report(&self, token: u64, report: &Report) -> Result<(), CoordinatorError> {
        self.reports.lock().unwrap().push((token, report.clone()));
        Ok(())
    }
    async fn release(&self, token: u64, reason: &str) -> Result<(), CoordinatorError> {
        self.releases.lock().unwrap().push(token);
        self.release_reasons
            .lock()
            .unwrap()
            .push(reason.to_string());
        *self.held.lock().unwrap() = None;
        Ok(())
    }
}

/// How the fake's `prepare` ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum PrepareOutcome {
    #[default]
    Ok,
    /// A drain timeout (the node was given back).
    DrainTimeout,
    /// Any other error.
    Error,
}

/// Node operations that record what they were asked.
#[derive(Debug, Default)]
pub struct FakeNodeOps {
    pub calls: Mutex<Vec<&'static str>>,
    pub prepare: Mutex<PrepareOutcome>,
    pub shown: Mutex<Vec<PhaseChange>>,
    pub blockers: Mutex<Vec<String>>,
    pub waiting_shown: Mutex<Vec<Vec<String>>>,
}

impl NodeOps for Arc<FakeNodeOps> {
    async fn prepare(&self) -> Result<(), NodeOpsError> {
        self.calls.lock().unwrap().push("prepare");
        match *self.prepare.lock().unwrap() {
            PrepareOutcome::Ok => Ok(()),
            PrepareOutcome::DrainTimeout => Err(KubeError::DrainTimeout {
                timeout: Duration::from_secs(60),
                pending: vec!["apps/web-1 (disruption budget)".into()],
            }
            .into()),
            PrepareOutcome::Error => Err(KubeError::NodeMissing("n1".into()).into()),
        }
    }
    async fn wait_ready_after_boot(&self) -> Result<(), NodeOpsError> {
        self.calls.lock().unwrap().push("ready");
        Ok(())
    }
    async fn finish(&self) -> Result<(), NodeOpsError> {
        self.calls.lock().unwrap().push("finish");
        Ok(())
    }
    async fn abort(&self, _reason: &str) -> Result<(), NodeOpsError> {
        self.calls.lock().unwrap().push("abort");
        Ok(())
    }
    async fn show_phase(&self, change: &PhaseChange) {
        self.shown.lock().unwrap().push(change.clone());
    }
    async fn blockers(&self) -> Result<Vec<String>, NodeOpsError> {
        Ok(self.blockers.lock().unwrap().clone())
    }
    async fn show_waiting(&self, blockers: &[String]) {
        self.waiting_shown.lock().unwrap().push(blockers.to_vec());
    }
}
