//! The `HostOs` boundary: what the agent asks of the machine it runs on.
//!
//! The real implementation is [`crate::systemd::SystemdHost`] (systemd and
//! logind over D-Bus, sentinels from [`crate::sentinel`]); tests use an
//! in-memory fake.
//!
//! The contract every implementation keeps:
//! - [`HostOs::run`] returns when the unit's *run* has ended (its main
//!   process exited), not when systemd's start job finished: for
//!   `Type=simple` and `Type=exec` services the start job is done as soon as
//!   the process has started. A run that does not end in time is stopped.
//! - [`HostOs::reboot`] never overrides logind's block inhibitors; the agent
//!   lists them with [`HostOs::reboot_inhibitors`] first and waits.
//! - Every call is bounded: a hung systemd or logind makes a call fail with
//!   an error, it never hangs the agent.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of host operations.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A D-Bus call failed.
    #[error("d-bus: {0}")]
    Dbus(#[from] zbus::Error),
    /// Reading host facts (boot_id, output files) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A reboot sentinel or check command gave no answer (never read as
    /// "no").
    #[error(transparent)]
    Sentinel(#[from] crate::sentinel::SentinelError),
    /// A unit or command (or a D-Bus call) did not finish in time.
    #[error("{what} did not finish within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The unit or command.
        what: String,
        /// How long the agent waited.
        timeout: Duration,
    },
    /// Neither logind nor systemd accepted the reboot.
    #[error("reboot refused: {0}")]
    RebootRefused(String),
    /// The unit cannot be run the way the agent needs: not a service, not
    /// found, or its file is broken.
    #[error("unit {unit}: {why}")]
    BadUnit {
        /// The unit.
        unit: String,
        /// What is wrong with it.
        why: String,
    },
}

/// What the agent runs as a systemd unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Start an existing unit with StartUnit.
    Unit(String),
    /// Run a shell command as a transient unit named `unit`, its output
    /// appended to `output`.
    Command {
        /// The transient unit's name (deterministic per grant, so that a
        /// restarted agent finds the run it started).
        unit: String,
        /// The command, run with `/bin/sh -c`.
        command: String,
        /// Where its stdout and stderr go.
        output: PathBuf,
    },
}

impl Job {
    /// The name of the unit the job runs as.
    pub fn unit_name(&self) -> &str {
        match self {
            Job::Unit(name) => name,
            Job::Command { unit, .. } => unit,
        }
    }
}

/// Check that `unit` can be waited for as a run: only a service has a main
/// process whose end is the end of the work (a target, timer or mount is
/// "active" for as long as it lasts). Called at start-up for every
/// configured unit, so that a wrong name is refused before any node is
/// drained.
pub fn check_runnable_unit(unit: &str) -> Result<(), HostError> {
    let bad = |why: &str| HostError::BadUnit {
        unit: unit.to_string(),
        why: why.to_string(),
    };
    let Some(stem) = unit.strip_suffix(".service") else {
        return Err(bad(
            "only .service units can be run (the agent waits for the service's main process to end)",
        ));
    };
    if stem.is_empty() || stem.ends_with('@') {
        return Err(bad(
            "a service needs a name (and an instance for a template)",
        ));
    }
    if unit.len() > 255 || unit.chars().any(|c| c.is_control() || c == '/' || c == ' ') {
        return Err(bad("not a valid unit name"));
    }
    Ok(())
}

/// A logind inhibitor lock ("who" holds back "what", and "why").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inhibitor {
    /// What is inhibited, colon-separated ("shutdown", "sleep:shutdown", ...).
    pub what: String,
    /// The program that holds the lock, as it named itself.
    pub who: String,
    /// Why it holds the lock, in its words.
    pub why: String,
    /// "block" or "delay".
    pub mode: String,
    /// The user that holds it.
    pub uid: u32,
    /// The process that holds it.
    pub pid: u32,
}

impl Inhibitor {
    /// True when this lock blocks a reboot: mode "block" and "shutdown"
    /// among what it inhibits. Delay locks only postpone a shutdown for a
    /// bounded time, which logind enforces itself.
    pub fn blocks_shutdown(&self) -> bool {
        self.mode == "block" && self.what.split(':').any(|w| w == "shutdown")
    }
}

impl std::fmt::Display for Inhibitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}, uid {}): {}",
            self.who, self.pid, self.uid, self.why
        )
    }
}

/// How a unit ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitOutcome {
    /// True when the unit succeeded.
    pub success: bool,
    /// systemd's words for how it ended (job result, service Result and exit
    /// status), for reports.
    pub detail: String,
    /// The last lines of its output, if captured.
    pub output_tail: String,
}

/// The machine the agent maintains.
#[allow(async_fn_in_trait)] // used with generics only, never boxed
pub trait HostOs {
    /// The current boot_id (`/proc/sys/kernel/random/boot_id`).
    async fn boot_id(&self) -> Result<String, HostError>;

    /// Why maintenance is needed now (a reboot sentinel, the sentinel
    /// command, the update check), or None. A check without an answer is
    /// an error, never None (see [`crate::sentinel`]).
    async fn maintenance_needed(&self) -> Result<Option<String>, HostError>;

    /// True when a reboot sentinel (file or command) says so now. A check
    /// without an answer is an error, never false.
    async fn reboot_required(&self) -> Result<bool, HostError>;

    /// Run `job` and wait until its run ends (the service's main process
    /// exited, whatever the service's Type), at most `timeout`; a run still
    /// going after `timeout` is stopped and the answer is
    /// [`HostError::Timeout`]. If a unit of the same name is already running
    /// (started by an earlier, killed agent), wait for that run instead of
    /// starting another. A start that runs nothing (a failed Condition, a
    /// `RemainAfterExit=yes` unit still active from before) is a failure,
    /// never a success.
    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError>;

    /// Stop the unit of `job` if it is running, and wait until it stopped
    /// (bounded). Used when the baton is lost in the middle of the update:
    /// the update must not go on without it. Stopping a unit that does not
    /// run is not an error.
    async fn stop(&self, job: &Job) -> Result<(), HostError>;

    /// The inhibitor locks that block a reboot now (logind's ListInhibitors,
    /// "block" mode, "shutdown" among what they inhibit).
    async fn reboot_inhibitors(&self) -> Result<Vec<Inhibitor>, HostError>;

    /// Ask for a reboot, without overriding inhibitors. Returns once the
    /// request was accepted; the machine goes down afterwards.
    async fn reboot(&self) -> Result<(), HostError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_services_can_be_run() {
        assert!(check_runnable_unit("apt-daily-upgrade.service").is_ok());
        assert!(check_runnable_unit("site-upgrade@full.service").is_ok());
        for bad in [
            "reboot.target",
            "apt-daily-upgrade.timer",
            "upgrade",
            ".service",
            "upgrade@.service",
            "a b.service",
            "../x.service",
        ] {
            let error = check_runnable_unit(bad).unwrap_err().to_string();
            assert!(error.starts_with(&format!("unit {bad}:")), "{error}");
        }
    }

    #[test]
    fn only_block_locks_on_shutdown_block_a_reboot() {
        let lock = |what: &str, mode: &str| Inhibitor {
            what: what.into(),
            mode: mode.into(),
            ..Inhibitor::default()
        };
        assert!(lock("shutdown", "block").blocks_shutdown());
        assert!(lock("sleep:shutdown:idle", "block").blocks_shutdown());
        assert!(!lock("shutdown", "delay").blocks_shutdown());
        assert!(!lock("sleep:idle", "block").blocks_shutdown());
        assert!(!lock("handle-power-key", "block").blocks_shutdown());
    }
}
