//! The simulated host: units that take time and outlive the agent, a
//! reboot that takes time, sentinels.

use super::{Injected, Point, Rec, Sim, UnitRun, is_update};
use crate::host::{HostError, HostOs, Inhibitor, Job, UnitOutcome, check_runnable_unit};
use crate::sentinel::SentinelError;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a hung host call takes to fail.
const HANG: Duration = Duration::from_secs(60);
/// How long a hung sentinel check takes (the check timeout).
const CHECK_HANG: Duration = Duration::from_secs(300);
/// How long a post-check runs.
const POST_CHECK: Duration = Duration::from_secs(2);

/// The host of a [`Sim`].
#[derive(Clone)]
pub struct SimHost(pub Arc<Sim>);

fn host_error(what: &str, e: Injected) -> HostError {
    match e {
        Injected::Failed => HostError::Io {
            what: format!("{what} (injected)"),
            source: std::io::Error::other("injected failure"),
        },
        Injected::TimedOut => HostError::Timeout {
            what: what.to_string(),
            timeout: HANG,
        },
    }
}

/// A sentinel check that failed or hung, as the real checks fail.
fn check_error(what: &str, e: Injected) -> HostError {
    HostError::Sentinel(match e {
        Injected::Failed => SentinelError::Unreadable {
            path: "/run/reboot-required".into(),
            source: std::io::Error::other(format!("{what}: injected failure")),
        },
        Injected::TimedOut => SentinelError::TimedOut {
            what: what.to_string(),
            timeout: CHECK_HANG,
        },
    })
}

/// What the real check says when a directory sits where the sentinel file
/// should be.
fn odd_sentinel() -> HostError {
    HostError::Sentinel(SentinelError::NotAFile {
        path: "/run/reboot-required".into(),
        what: "a directory",
    })
}

fn lost(what: &str) -> HostError {
    HostError::Io {
        what: what.to_string(),
        source: std::io::Error::other("injected: the answer was lost"),
    }
}

impl SimHost {
    /// Start or follow the run of `job`; when it ends. Refuses units the
    /// machine does not have.
    fn start_or_follow(&self, job: &Job) -> Result<(Instant, bool), HostError> {
        let now = Instant::now();
        let mut state = self.0.state();
        let inc = state.incarnation;
        let name = job.unit_name().to_string();
        let transient = matches!(job, Job::Command { .. });
        if !transient && !state.known_units.contains_key(&name) {
            return Err(HostError::Io {
                what: format!("unit {name}"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such unit"),
            });
        }
        // A transient unit that ran stays (RemainAfterExit); an existing
        // unit that is still running is joined; one whose run ended is
        // started again by StartUnit.
        if let Some(run) = state.units.get(&name)
            && (transient || !run.ended)
        {
            let (ends_at, success) = (run.ends_at, run.success);
            if is_update(&name) {
                state.log.push(Rec::UpdateJoin { inc, unit: name });
            }
            return Ok((ends_at, success));
        }
        let (duration, success) = if is_update(&name) {
            (state.update_duration, state.update_succeeds)
        } else {
            (POST_CHECK, true)
        };
        if is_update(&name) {
            state.log.push(Rec::UpdateStart {
                inc,
                unit: name.clone(),
            });
            if let Some(holder) = state.holder.as_mut() {
                holder.updated = true;
            }
        }
        state.units.insert(
            name,
            UnitRun {
                ends_at: now + duration,
                success,
                ended: false,
            },
        );
        Ok((now + duration, success))
    }
}

impl HostOs for SimHost {
    async fn boot_id(&self) -> Result<String, HostError> {
        let fault = self
            .0
            .enter(Point::BootId, HANG)
            .await
            .map_err(|e| host_error("boot_id", e))?;
        let answer = Ok(self.0.state().boot_id());
        self.0.leave(fault, answer, lost("boot_id")).await
    }

    async fn maintenance_needed(&self) -> Result<Option<String>, HostError> {
        self.0
            .enter(Point::Need, CHECK_HANG)
            .await
            .map_err(|e| check_error("the maintenance check", e))?;
        let state = self.0.state();
        if state.reboot_pending() && !state.sentinel_check_fails {
            Ok(Some("/run/reboot-required exists".into()))
        } else if state.updates_pending {
            // A yes from the update check wins over a failing sentinel.
            Ok(Some("updates available".into()))
        } else if state.sentinel_check_fails {
            Err(odd_sentinel())
        } else {
            Ok(None)
        }
    }

    async fn reboot_required(&self) -> Result<bool, HostError> {
        self.0
            .enter(Point::RebootRequired, CHECK_HANG)
            .await
            .map_err(|e| check_error("the reboot check", e))?;
        let state = self.0.state();
        if state.sentinel_check_fails {
            return Err(odd_sentinel());
        }
        Ok(state.reboot_pending())
    }

    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError> {
        let fault = self
            .0
            .enter(Point::Run(job.unit_name().to_string()), timeout)
            .await
            .map_err(|e| host_error(job.unit_name(), e))?;
        // Only a service has a run whose end can be waited for.
        check_runnable_unit(job.unit_name())?;
        let (ends_at, success) = self.start_or_follow(job)?;
        let output = self.0.state().update_output.clone();
        if ends_at > Instant::now() + timeout {
            tokio::time::sleep(timeout).await;
            // A run past its timeout is stopped (the host's contract).
            self.0.state().stop_unit(job.unit_name(), Instant::now());
            return Err(HostError::Timeout {
                what: job.unit_name().to_string(),
                timeout,
            });
        }
        tokio::time::sleep_until(ends_at).await;
        let answer = Ok(UnitOutcome {
            success,
            detail: if success {
                "job done, result success, exit status 0".into()
            } else {
                "job done, result exit-code, exit status 3".into()
            },
            output_tail: if success {
                output
            } else {
                format!("{output}\nE: boom")
            },
        });
        self.0.leave(fault, answer, lost(job.unit_name())).await
    }

    async fn stop(&self, job: &Job) -> Result<(), HostError> {
        let fault = self
            .0
            .enter(Point::Stop, HANG)
            .await
            .map_err(|e| host_error("stop", e))?;
        self.0.state().stop_unit(job.unit_name(), Instant::now());
        self.0.leave(fault, Ok(()), lost("stop")).await
    }

    async fn reboot_inhibitors(&self) -> Result<Vec<Inhibitor>, HostError> {
        let fault = self
            .0
            .enter(Point::Inhibitors, HANG)
            .await
            .map_err(|e| host_error("inhibitors", e))?;
        let locks = self.0.state().inhibitors.clone();
        let answer = Ok(locks
            .into_iter()
            .filter(Inhibitor::blocks_shutdown)
            .collect());
        self.0.leave(fault, answer, lost("inhibitors")).await
    }

    async fn reboot(&self) -> Result<(), HostError> {
        let fault = self
            .0
            .enter(Point::Reboot, HANG)
            .await
            .map_err(|e| host_error("reboot", e))?;
        {
            let mut state = self.0.state();
            let inc = state.incarnation;
            state.log.push(Rec::RebootRequest(inc));
            // logind lets root reboot through block locks: only counted.
            if state.inhibitors.iter().any(Inhibitor::blocks_shutdown) {
                state.reboots_while_inhibited += 1;
            }
            if state.reboot_at.is_none() {
                state.reboot_at = Some(Instant::now() + state.reboot_delay);
            }
        }
        self.0.leave(fault, Ok(()), lost("reboot")).await
    }
}
