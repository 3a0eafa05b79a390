//! The `HostOs` boundary: what the agent asks of the machine it runs on.
//!
//! The real implementation is [`crate::systemd::SystemdHost`] (systemd and
//! logind over D-Bus, sentinels from [`crate::sentinel`]); tests use an
//! in-memory fake.

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
    /// A unit or command did not finish in time.
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
    /// command, the update check), or None.
    async fn maintenance_needed(&self) -> Option<String>;

    /// True when a reboot sentinel (file or command) says so now.
    async fn reboot_required(&self) -> bool;

    /// Run `job` and wait until it ends, at most `timeout`. If a unit of the
    /// same name is already running (started by an earlier, killed agent),
    /// wait for that run instead of starting another.
    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError>;

    /// Ask for a reboot. Returns once the request was accepted; the machine
    /// goes down afterwards.
    async fn reboot(&self) -> Result<(), HostError>;
}
