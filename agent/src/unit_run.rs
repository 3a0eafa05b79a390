//! Which run of a systemd service the agent waits for, and when that run is
//! over: pure decisions over [`UnitState`] snapshots, used by
//! [`crate::systemd::SystemdHost`].
//!
//! systemd's start job ends ("JobRemoved done") when the service has
//! *started*: for `Type=oneshot` that is when its process exited, but for
//! `Type=simple` and `Type=exec` (systemd's default) it is the moment the
//! process was forked. Taking that as "the update finished" reboots in the
//! middle of a dpkg run. So the agent identifies the run by the unit's
//! InvocationID (a new one for every start) and waits until that run has
//! ended, whatever the service type.

use crate::host::UnitOutcome;

/// A snapshot of a unit's properties (Unit and Service interfaces).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitState {
    /// "loaded", "not-found", ... (empty: the unit does not exist yet).
    pub load_state: String,
    /// "active", "inactive", "failed", "activating", "deactivating",
    /// "reloading".
    pub active_state: String,
    /// "running", "exited", "dead", "auto-restart", ...
    pub sub_state: String,
    /// The current (or last) run's ID, hex; empty when it never ran.
    pub invocation: String,
    /// False when the last start found a Condition unmet.
    pub condition_result: bool,
    /// The service's Result ("success", "exit-code", "signal", ...).
    pub result: String,
    /// ExecMainCode: 1 exited, 2 killed, 3 dumped.
    pub exec_main_code: i32,
    /// ExecMainStatus: the exit status, or the signal.
    pub exec_main_status: i32,
    /// ExecMainStartTimestamp: when the run's main process started, µs
    /// since the epoch (0: unknown).
    pub main_started_usec: u64,
}

impl UnitState {
    /// True when no run is going on: the unit is inactive or failed, or
    /// active only because of `RemainAfterExit=yes` (sub-state "exited").
    /// A service waiting to restart ("auto-restart") is activating, so a
    /// run that will be retried by `Restart=` is not over yet.
    pub fn finished(&self) -> bool {
        matches!(self.active_state.as_str(), "inactive" | "failed")
            || (self.active_state == "active" && self.sub_state == "exited")
    }

    /// True when a run is going on (started, not yet ended).
    pub fn running(&self) -> bool {
        !self.invocation.is_empty() && !self.active_state.is_empty() && !self.finished()
    }

    /// How the current run ended, for a start job that ended with
    /// `job_result`: a success only when the job is "done", the service's
    /// Result is "success" and the unit did not end up failed.
    pub fn outcome(&self, job_result: &str) -> UnitOutcome {
        let mut detail = format!("job {job_result}");
        if !self.result.is_empty() {
            detail.push_str(&format!(", result {}", self.result));
        }
        match self.exec_main_code {
            1 => detail.push_str(&format!(", exit status {}", self.exec_main_status)),
            2 | 3 => detail.push_str(&format!(", killed by signal {}", self.exec_main_status)),
            _ => {}
        }
        UnitOutcome {
            success: job_result == "done"
                && self.result == "success"
                && self.active_state != "failed",
            detail,
            output_tail: String::new(),
        }
    }
}

/// What to do once the start job is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterStart {
    /// The run is over (or never happened): this is how it ended.
    Finished(UnitOutcome),
    /// Wait for the run with this InvocationID to end.
    WaitFor(String),
}

/// Which run a start job started, from the unit's state `before` the start
/// (default for a transient unit that did not exist), the job's result, and
/// the state `after` the job was removed.
///
/// - A job that is not "done" failed (a oneshot that exited non-zero, a
///   dependency, a start timeout): finished, as a failure.
/// - A new InvocationID is the run this start made: wait for it.
/// - The same InvocationID as a run that was going on before the start is
///   that run (started by an agent that was killed since): wait for it.
/// - Otherwise nothing ran: a Condition was unmet, or a
///   `RemainAfterExit=yes` unit was still active from an earlier run so
///   StartUnit did nothing. That is a failure, never a success: an update
///   that did not run must not be followed by a reboot as if it had.
pub fn after_start(before: &UnitState, job_result: &str, after: &UnitState) -> AfterStart {
    if job_result != "done" {
        return AfterStart::Finished(after.outcome(job_result));
    }
    let ours = if !after.invocation.is_empty() && after.invocation != before.invocation {
        Some(&after.invocation)
    } else if before.running() && after.invocation == before.invocation {
        Some(&before.invocation)
    } else {
        None
    };
    match ours {
        Some(invocation) => match during_run(invocation, after) {
            Some(outcome) => AfterStart::Finished(outcome),
            None => AfterStart::WaitFor(invocation.clone()),
        },
        None => AfterStart::Finished(UnitOutcome {
            success: false,
            detail: did_not_run(after),
            output_tail: String::new(),
        }),
    }
}

/// While waiting for run `ours`: Some(how it ended) once it is over, None
/// while it goes on. A different InvocationID means the run is over and
/// another one started (or the unit was unloaded): its result is no longer
/// readable, so that is a failure.
pub fn during_run(ours: &str, now: &UnitState) -> Option<UnitOutcome> {
    if now.invocation != ours {
        return Some(UnitOutcome {
            success: false,
            detail: format!(
                "the run {ours} ended unseen: the unit now shows run {:?} ({}/{}), so how it ended is unknown",
                now.invocation, now.active_state, now.sub_state
            ),
            output_tail: String::new(),
        });
    }
    now.finished().then(|| now.outcome("done"))
}

fn did_not_run(after: &UnitState) -> String {
    if after.active_state == "active" && after.sub_state == "exited" {
        "job done but nothing ran: the unit is still active from an earlier run \
         (RemainAfterExit=yes), so starting it did nothing; use RemainAfterExit=no"
            .to_string()
    } else if !after.condition_result {
        "job done but nothing ran: a Condition of the unit was not met".to_string()
    } else {
        format!(
            "job done but no new run of the unit was seen ({}/{})",
            after.active_state, after.sub_state
        )
    }
}

/// An InvocationID (16 bytes) as the hex string journald uses.
pub fn invocation_hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(active: &str, sub: &str, invocation: &str) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            invocation: invocation.into(),
            condition_result: true,
            result: "success".into(),
            exec_main_code: 1,
            exec_main_status: 0,
            main_started_usec: 0,
        }
    }

    #[test]
    fn a_simple_service_that_just_started_is_waited_for() {
        // The start job of a Type=simple unit is done while it runs.
        let before = state("inactive", "dead", "aa");
        let after = state("active", "running", "bb");
        assert_eq!(
            after_start(&before, "done", &after),
            AfterStart::WaitFor("bb".into())
        );
        assert_eq!(during_run("bb", &after), None);
        // It ends with an exit code: a failure, with the status.
        let mut ended = state("failed", "failed", "bb");
        ended.result = "exit-code".into();
        ended.exec_main_status = 5;
        let outcome = during_run("bb", &ended).unwrap();
        assert!(!outcome.success);
        assert_eq!(outcome.detail, "job done, result exit-code, exit status 5");
        // Or it ends well and goes inactive.
        assert!(
            during_run("bb", &state("inactive", "dead", "bb"))
                .unwrap()
                .success
        );
    }

    #[test]
    fn a_oneshot_is_over_when_its_job_is() {
        let before = UnitState::default(); // a transient unit: not there yet
        let after = state("active", "exited", "cc"); // RemainAfterExit=yes
        let AfterStart::Finished(outcome) = after_start(&before, "done", &after) else {
            panic!("a finished oneshot is not waited for");
        };
        assert!(outcome.success, "{outcome:?}");
        // Failed oneshot: the job itself fails.
        let mut failed = state("failed", "failed", "cc");
        failed.result = "exit-code".into();
        failed.exec_main_status = 3;
        let AfterStart::Finished(outcome) = after_start(&before, "failed", &failed) else {
            panic!()
        };
        assert!(!outcome.success);
        assert!(outcome.detail.contains("exit status 3"), "{outcome:?}");
    }

    #[test]
    fn a_run_started_by_an_earlier_agent_is_followed() {
        let before = state("active", "running", "dd");
        let after = state("active", "running", "dd");
        assert_eq!(
            after_start(&before, "done", &after),
            AfterStart::WaitFor("dd".into())
        );
    }

    #[test]
    fn a_start_that_runs_nothing_is_a_failure() {
        // RemainAfterExit=yes, still active from last week's run.
        let before = state("active", "exited", "ee");
        let AfterStart::Finished(outcome) = after_start(&before, "done", &before.clone()) else {
            panic!()
        };
        assert!(!outcome.success);
        assert!(outcome.detail.contains("RemainAfterExit"), "{outcome:?}");
        // A Condition was not met: the unit stays inactive, same run ID.
        let before = state("inactive", "dead", "ff");
        let mut after = before.clone();
        after.condition_result = false;
        let AfterStart::Finished(outcome) = after_start(&before, "done", &after) else {
            panic!()
        };
        assert!(!outcome.success);
        assert!(outcome.detail.contains("Condition"), "{outcome:?}");
    }

    #[test]
    fn a_run_replaced_by_another_is_not_a_success() {
        let outcome = during_run("aa", &state("active", "running", "bb")).unwrap();
        assert!(!outcome.success);
        let outcome = during_run("aa", &UnitState::default()).unwrap();
        assert!(!outcome.success);
    }

    #[test]
    fn restarting_and_stopping_are_not_the_end() {
        assert!(!state("activating", "auto-restart", "a").finished());
        assert!(!state("deactivating", "stop-sigterm", "a").finished());
        assert!(!state("reloading", "reload", "a").finished());
        assert!(!state("activating", "start", "a").finished());
        assert!(state("failed", "failed", "a").finished());
    }

    #[test]
    fn killed_runs_say_so() {
        let mut s = state("failed", "failed", "a");
        s.result = "signal".into();
        s.exec_main_code = 2;
        s.exec_main_status = 15;
        assert_eq!(
            s.outcome("done").detail,
            "job done, result signal, killed by signal 15"
        );
        assert_eq!(invocation_hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
