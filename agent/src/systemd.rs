//! [`SystemdHost`]: the real [`HostOs`], talking to systemd and logind over
//! D-Bus through the proxies of [`crate::dbus`].
//!
//! Running a unit: subscribe, start listening for JobRemoved and for the
//! unit's PropertiesChanged, read the unit's state, *then* start the job (so
//! no signal can be missed), wait for the job's JobRemoved, and then wait
//! for the run the job started (its InvocationID, see [`crate::unit_run`])
//! to end: for `Type=simple`/`exec` services the start job is done while the
//! process still runs. The unit is referenced (`Ref`) meanwhile so that
//! systemd keeps its Result. Transient units keep `RemainAfterExit=yes` so
//! that their result can still be read afterwards, also by a restarted agent
//! that finds the unit it started before it died.
//!
//! Every D-Bus call has a deadline (the connection's method timeout, and an
//! overall bound on each operation), so a hung systemd or logind ends in an
//! error, never in an agent that waits forever.

use crate::dbus::{LoginManagerProxy, SystemdManagerProxy, SystemdServiceProxy, SystemdUnitProxy};
use crate::host::{HostError, HostOs, Inhibitor, Job, UnitOutcome, check_runnable_unit};
use crate::sentinel::Sentinels;
use crate::unit_run::{AfterStart, UnitState, after_start, during_run, invocation_hex};
use std::future::Future;
use std::path::Path;
use std::time::Duration;
use tokio_stream::StreamExt;
use zbus::zvariant::{OwnedObjectPath, Value};

/// How many lines of a unit's output go into reports.
const OUTPUT_TAIL_LINES: usize = 20;

/// How long a unit may take to stop. systemd's own stop timeout is 90 s
/// before it kills (`TimeoutStopSec`); this leaves room for that.
const STOP_TIMEOUT: Duration = Duration::from_secs(180);

/// The default deadline of one D-Bus call (and of connecting).
pub const DEFAULT_DBUS_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent talks to systemd and logind.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// The deadline of every D-Bus call.
    pub dbus_timeout: Duration,
    /// When logind refuses the reboot, start `reboot.target` with
    /// `replace-irreversibly` instead. That bypasses logind, and with it
    /// every inhibitor, so it is off unless asked for.
    pub reboot_fallback_target: bool,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            dbus_timeout: DEFAULT_DBUS_TIMEOUT,
            reboot_fallback_target: false,
        }
    }
}

/// The machine, through systemd and logind.
#[derive(Debug, Clone)]
pub struct SystemdHost {
    bus: zbus::Connection,
    sentinels: Sentinels,
    settings: HostSettings,
}

impl SystemdHost {
    /// Connect to the system bus, or to `address` when given (within the
    /// D-Bus deadline).
    pub async fn connect(
        address: Option<&str>,
        sentinels: Sentinels,
        settings: HostSettings,
    ) -> Result<Self, HostError> {
        let builder = match address {
            Some(address) => zbus::connection::Builder::address(address)?,
            None => zbus::connection::Builder::system()?,
        }
        .method_timeout(settings.dbus_timeout);
        let bus = tokio::time::timeout(settings.dbus_timeout, builder.build())
            .await
            .map_err(|_| HostError::Timeout {
                what: "connecting to the system bus".into(),
                timeout: settings.dbus_timeout,
            })??;
        Ok(SystemdHost {
            bus,
            sentinels,
            settings,
        })
    }

    /// `operation`, failing with [`HostError::Timeout`] after the D-Bus
    /// deadline. For operations of a few calls whose every part must be
    /// bounded (signal subscriptions resolve names with calls that the
    /// connection's method timeout does not cover).
    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl Future<Output = Result<T, HostError>>,
    ) -> Result<T, HostError> {
        let timeout = self.settings.dbus_timeout;
        tokio::time::timeout(timeout, operation)
            .await
            .map_err(|_| HostError::Timeout {
                what: what.to_string(),
                timeout,
            })?
            .map_err(|e| self.explain(e))
    }

    /// A D-Bus call that hit the connection's method timeout, as a
    /// [`HostError::Timeout`] that says which deadline (zbus only says
    /// "timed out").
    fn explain(&self, error: HostError) -> HostError {
        match error {
            HostError::Dbus(zbus::Error::InputOutput(io))
                if io.kind() == std::io::ErrorKind::TimedOut =>
            {
                HostError::Timeout {
                    what: "a D-Bus call to systemd or logind".into(),
                    timeout: self.settings.dbus_timeout,
                }
            }
            other => other,
        }
    }

    async fn manager(&self) -> Result<SystemdManagerProxy<'static>, HostError> {
        let manager = SystemdManagerProxy::builder(&self.bus)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        subscribe(&manager).await?;
        Ok(manager)
    }

    async fn unit_proxy(
        &self,
        path: &OwnedObjectPath,
    ) -> Result<SystemdUnitProxy<'static>, HostError> {
        Ok(SystemdUnitProxy::builder(&self.bus)
            .path(path.clone())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?)
    }

    /// The unit's state now, read property by property (each read is one
    /// bounded call). Missing Service properties read as empty.
    async fn unit_state(&self, path: &OwnedObjectPath) -> Result<UnitState, HostError> {
        let unit = self.unit_proxy(path).await?;
        let service = SystemdServiceProxy::builder(&self.bus)
            .path(path.clone())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok(UnitState {
            load_state: unit.load_state().await?,
            active_state: unit.active_state().await?,
            sub_state: unit.sub_state().await?,
            invocation: invocation_hex(&unit.invocation_id().await?),
            condition_result: unit.condition_result().await?,
            result: service.result().await.unwrap_or_default(),
            exec_main_code: service.exec_main_code().await.unwrap_or_default(),
            exec_main_status: service.exec_main_status().await.unwrap_or_default(),
            main_started_usec: service
                .exec_main_start_timestamp()
                .await
                .unwrap_or_default(),
        })
    }

    /// The unit's PropertiesChanged signals (the match is in place when
    /// this returns, so a change after it is not missed).
    async fn property_changes(
        &self,
        path: &OwnedObjectPath,
    ) -> Result<zbus::fdo::PropertiesChangedStream, HostError> {
        let properties = zbus::fdo::PropertiesProxy::builder(&self.bus)
            .destination("org.freedesktop.systemd1")?
            .path(path.clone())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok(properties.receive_properties_changed().await?)
    }

    /// The last lines `run` wrote to the journal (empty when the journal
    /// cannot be read). systemd has no D-Bus API for reading the journal,
    /// so this asks `journalctl`; the unit itself is only ever driven over
    /// D-Bus.
    ///
    /// The entries are those of the run's invocation ID, or the unit's own
    /// entries since the run's main process started: journald tags a line
    /// with the invocation ID only if it reads it while the process still
    /// lives, and a busy journald reads a run's last lines (the error, as a
    /// rule) after the process exited. Those lines can also still sit in
    /// journald's stream buffers when systemd already says the run ended,
    /// so journald is asked to flush first (`--sync` is handled after
    /// pending log data), and an empty answer is asked again a few times.
    /// All of it within 10 s.
    async fn journal_tail(&self, unit: &str, run: &RunId) -> String {
        if run.invocation.is_empty() {
            return String::new();
        }
        let read = async {
            let _ = journalctl(&["--sync"]).await;
            let mut query: Vec<String> =
                vec!["--no-pager".into(), "--quiet".into(), "--output=cat".into()];
            query.push(format!("--lines={OUTPUT_TAIL_LINES}"));
            if run.main_started_usec > 0 {
                // Whole seconds: at worst a line or two of the same unit's
                // previous run, in the same second, comes along.
                query.push(format!("--since=@{}", run.main_started_usec / 1_000_000));
            }
            query.push(format!("_SYSTEMD_INVOCATION_ID={}", run.invocation));
            if run.main_started_usec > 0 {
                query.push("+".into());
                query.push(format!("_SYSTEMD_UNIT={unit}"));
            }
            let query: Vec<&str> = query.iter().map(String::as_str).collect();
            for attempt in 0..4 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                match journalctl(&query).await {
                    Ok(text) if text.is_empty() => continue,
                    Ok(text) => return text,
                    Err(why) => {
                        tracing::debug!(unit, why, "no output in the report");
                        return String::new();
                    }
                }
            }
            String::new()
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_default()
    }

    /// Wait until run `ours` of the unit at `path` has ended. `changes`
    /// was subscribed before the state that led here was read, so every
    /// later change wakes this loop.
    async fn wait_run_end(
        &self,
        unit: &str,
        path: &OwnedObjectPath,
        ours: &str,
        mut changes: zbus::fdo::PropertiesChangedStream,
    ) -> Result<UnitOutcome, HostError> {
        tracing::info!(
            unit,
            invocation = ours,
            "the unit runs; waiting for its run to end"
        );
        loop {
            let now = self.unit_state(path).await?;
            if let Some(outcome) = during_run(ours, &now) {
                return Ok(outcome);
            }
            tracing::debug!(unit, state = %now.active_state, sub = %now.sub_state, "still running");
            if changes.next().await.is_none() {
                return Err(HostError::Dbus(zbus::Error::Failure(
                    "the PropertiesChanged stream ended".into(),
                )));
            }
        }
    }

    /// Keep the unit loaded with its result until [`Self::unreference`]
    /// (best effort: without it a finished service may be collected, which
    /// [`during_run`] then reports as a run whose end is unknown).
    async fn reference(&self, unit: &str, path: &OwnedObjectPath) {
        let referenced = async {
            self.unit_proxy(path)
                .await?
                .ref_()
                .await
                .map_err(HostError::from)
        };
        if let Err(error) = referenced.await {
            tracing::debug!(unit, %error, "could not reference the unit");
        }
    }

    async fn unreference(&self, path: &OwnedObjectPath) {
        let unreferenced = async {
            self.unit_proxy(path)
                .await?
                .unref()
                .await
                .map_err(HostError::from)
        };
        if let Err(error) = unreferenced.await {
            tracing::debug!(path = %path.as_str(), %error, "could not drop the unit reference");
        }
    }

    /// Follow the run of a unit that exists already (started by an earlier
    /// agent), until it ends.
    async fn follow_existing(
        &self,
        unit: &str,
        path: &OwnedObjectPath,
    ) -> Result<(UnitOutcome, RunId), HostError> {
        let changes = self.property_changes(path).await?;
        self.reference(unit, path).await;
        let state = self.unit_state(path).await?;
        tracing::info!(unit, state = %state.active_state, "found the unit started before this agent restarted");
        let outcome = self
            .wait_run_end(unit, path, &state.invocation, changes)
            .await?;
        self.unreference(path).await;
        Ok((outcome, RunId::of(&state)))
    }

    /// Start `job` (or find the run an earlier agent started) and wait for
    /// its run to end. Returns the outcome and the run (no InvocationID
    /// when nothing ran).
    async fn run_to_end(&self, job: &Job) -> Result<(UnitOutcome, RunId), HostError> {
        let name = job.unit_name();
        let manager = self.manager().await?;
        // Listen before starting, so that a fast job's JobRemoved is not lost.
        let mut removed = manager.receive_job_removed().await?;
        // A transient unit of this name exists only if an earlier agent
        // started it for this grant: follow that run instead of starting the
        // update twice.
        if matches!(job, Job::Command { .. })
            && let Ok(path) = manager.get_unit(name).await
        {
            return self.follow_existing(name, &path).await;
        }
        // The state before the start tells a new run from an old one. A
        // transient unit does not exist yet.
        let (before, watched) = match job {
            Job::Unit(_) => {
                let path = manager.load_unit(name).await?;
                let changes = self.property_changes(&path).await?;
                let before = self.unit_state(&path).await?;
                if before.load_state != "loaded" {
                    return Err(HostError::BadUnit {
                        unit: name.to_string(),
                        why: format!("cannot be started: its load state is {}", before.load_state),
                    });
                }
                self.reference(name, &path).await;
                (before, Some((path, changes)))
            }
            Job::Command { .. } => (UnitState::default(), None),
        };
        let job_path = match job {
            Job::Unit(_) => manager.start_unit(name, "replace").await?,
            Job::Command {
                unit,
                command,
                output,
            } => start_transient(&manager, unit, command, output).await?,
        };
        tracing::info!(unit = name, job = %job_path.as_str(), "started");
        let (path, changes) = match watched {
            Some(watched) => watched,
            None => {
                // The transient unit exists from StartTransientUnit on. Its
                // state is read only after its job ended, so subscribing
                // now misses no change that matters.
                let path = manager.get_unit(name).await?;
                let changes = self.property_changes(&path).await?;
                self.reference(name, &path).await;
                (path, changes)
            }
        };
        let job_result = job_removed(&mut removed, &job_path).await?;
        let after = self.unit_state(&path).await?;
        let ran = after.invocation != before.invocation || before.running();
        let outcome = match after_start(&before, &job_result, &after) {
            AfterStart::Finished(outcome) => outcome,
            AfterStart::WaitFor(ours) => self.wait_run_end(name, &path, &ours, changes).await?,
        };
        self.unreference(&path).await;
        let run = if ran {
            RunId::of(&after)
        } else {
            RunId::default()
        };
        Ok((outcome, run))
    }
}

impl HostOs for SystemdHost {
    async fn boot_id(&self) -> Result<String, HostError> {
        let path = "/proc/sys/kernel/random/boot_id";
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|source| HostError::Io {
                what: path.to_string(),
                source,
            })
    }

    async fn maintenance_needed(&self) -> Result<Option<String>, HostError> {
        Ok(self.sentinels.maintenance_needed().await?)
    }

    async fn reboot_required(&self) -> Result<bool, HostError> {
        Ok(self.sentinels.reboot_required().await?)
    }

    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError> {
        check_runnable_unit(job.unit_name())?;
        let (mut outcome, run) = match tokio::time::timeout(timeout, self.run_to_end(job)).await {
            Ok(ended) => ended?,
            Err(_) => {
                // A run the agent no longer waits for must not go on by
                // itself (an update still writing while the node reboots,
                // or after another node got the baton).
                tracing::warn!(
                    unit = job.unit_name(),
                    "the run did not end in time; stopping it"
                );
                if let Err(error) = self.stop(job).await {
                    tracing::error!(unit = job.unit_name(), %error, "stopping the unit failed");
                }
                return Err(HostError::Timeout {
                    what: job.unit_name().to_string(),
                    timeout,
                });
            }
        };
        outcome.output_tail = match job {
            Job::Command { output, .. } => tail(output, OUTPUT_TAIL_LINES),
            Job::Unit(name) => self.journal_tail(name, &run).await,
        };
        Ok(outcome)
    }

    async fn stop(&self, job: &Job) -> Result<(), HostError> {
        let name = job.unit_name();
        let stopping = async {
            let manager = self.manager().await?;
            let mut removed = manager.receive_job_removed().await?;
            let job_path = match manager.stop_unit(name, "replace").await {
                Ok(path) => path,
                Err(zbus::Error::MethodError(error, _, _))
                    if error.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
                {
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            };
            let result = job_removed(&mut removed, &job_path).await?;
            tracing::info!(unit = name, result, "stopped");
            match result.as_str() {
                "done" => Ok(()),
                other => Err(HostError::BadUnit {
                    unit: name.to_string(),
                    why: format!("its stop job ended {other}"),
                }),
            }
        };
        tokio::time::timeout(STOP_TIMEOUT, stopping)
            .await
            .map_err(|_| HostError::Timeout {
                what: format!("stopping {name}"),
                timeout: STOP_TIMEOUT,
            })?
            .map_err(|e| self.explain(e))
    }

    async fn reboot_inhibitors(&self) -> Result<Vec<Inhibitor>, HostError> {
        self.bounded("listing logind's inhibitors", async {
            let login = LoginManagerProxy::builder(&self.bus)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            let all = login.list_inhibitors().await?;
            Ok(all
                .into_iter()
                .map(|(what, who, why, mode, uid, pid)| Inhibitor {
                    what,
                    who,
                    why,
                    mode,
                    uid,
                    pid,
                })
                .filter(Inhibitor::blocks_shutdown)
                .collect())
        })
        .await
    }

    async fn reboot(&self) -> Result<(), HostError> {
        let refused = self
            .bounded("asking logind to reboot", async {
                let login = LoginManagerProxy::builder(&self.bus)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await?;
                Ok(login.reboot(false).await?)
            })
            .await;
        let Err(refused) = refused else {
            return Ok(());
        };
        if !self.settings.reboot_fallback_target {
            return Err(HostError::RebootRefused(format!(
                "logind: {refused} (starting reboot.target instead would bypass logind and its inhibitors; \
                 --reboot-fallback-target allows it)"
            )));
        }
        tracing::warn!(%refused, "logind refused the reboot; starting reboot.target (--reboot-fallback-target)");
        self.bounded("starting reboot.target", async {
            let manager = self.manager().await?;
            manager
                .start_unit("reboot.target", "replace-irreversibly")
                .await
                .map(|_| ())
                .map_err(|e| {
                    HostError::RebootRefused(format!("logind: {refused}; reboot.target: {e}"))
                })
        })
        .await
    }
}

/// One run of a unit, as the journal knows it.
#[derive(Debug, Default)]
struct RunId {
    /// The InvocationID (hex; empty when nothing ran).
    invocation: String,
    /// When its main process started (µs since the epoch; 0: unknown).
    main_started_usec: u64,
}

impl RunId {
    fn of(state: &UnitState) -> Self {
        RunId {
            invocation: state.invocation.clone(),
            main_started_usec: state.main_started_usec,
        }
    }
}

/// Run `journalctl` with `args`; its output, trimmed, or why not.
async fn journalctl(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("journalctl")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("journalctl unavailable: {e}"))?;
    if !out.status.success() {
        return Err(format!("journalctl {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// Wait for the JobRemoved signal of `job` and return its result ("done",
/// "failed", "canceled", "timeout", "dependency", "skipped").
async fn job_removed(
    removed: &mut crate::dbus::JobRemovedStream,
    job: &OwnedObjectPath,
) -> Result<String, HostError> {
    while let Some(signal) = removed.next().await {
        let args = signal.args()?;
        if args.job.as_str() == job.as_str() {
            return Ok(args.result.to_string());
        }
    }
    Err(HostError::Dbus(zbus::Error::Failure(
        "the JobRemoved stream ended".into(),
    )))
}

/// Create and start the transient unit of a [`Job::Command`]: a oneshot
/// that stays active after it exited, so that its result can still be read
/// later (also by a restarted agent). Returns the start job's path.
async fn start_transient(
    manager: &SystemdManagerProxy<'_>,
    unit: &str,
    command: &str,
    output: &Path,
) -> Result<OwnedObjectPath, HostError> {
    let exec: Vec<(String, Vec<String>, bool)> = vec![(
        "/bin/sh".to_string(),
        vec!["/bin/sh".into(), "-c".into(), command.to_string()],
        false,
    )];
    let output = output.display().to_string();
    let properties: Vec<(&str, Value<'_>)> = vec![
        ("Description", Value::from(format!("baton: {command}"))),
        ("Type", Value::from("oneshot")),
        ("RemainAfterExit", Value::from(true)),
        ("ExecStart", Value::from(exec)),
        ("StandardOutputFileToAppend", Value::from(output.clone())),
        ("StandardErrorFileToAppend", Value::from(output)),
    ];
    Ok(manager
        .start_transient_unit(unit, "fail", &properties, &[])
        .await?)
}

/// Subscribe this connection to systemd's signals. systemd refuses a second
/// Subscribe from the same connection with AlreadySubscribed, which means
/// the subscription is in place.
async fn subscribe(manager: &SystemdManagerProxy<'_>) -> Result<(), HostError> {
    match manager.subscribe().await {
        Ok(()) => Ok(()),
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The last `lines` lines of a file (empty if it cannot be read), at most
/// 4 KiB.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    if out.len() > 4096 {
        let cut = out.len() - 4096;
        let cut = (cut..out.len())
            .find(|i| out.is_char_boundary(*i))
            .unwrap_or(0);
        out = out.split_off(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&f, 2), "c\nd");
        assert_eq!(tail(&f, 10), "a\nb\nc\nd");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }
}
