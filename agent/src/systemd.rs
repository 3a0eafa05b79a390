//! [`SystemdHost`]: the real [`HostOs`], talking to systemd and logind over
//! D-Bus through the proxies of [`crate::dbus`].
//!
//! Running a unit: subscribe, start listening for JobRemoved, *then* start the
//! job (so its JobRemoved cannot be missed), wait for the job's signal, then
//! read the service's Result and ExecMainStatus. Transient units keep
//! `RemainAfterExit=yes` so that their result can still be read afterwards,
//! and by a restarted agent that finds the unit it started before it died.

use crate::dbus::{LoginManagerProxy, SystemdManagerProxy, SystemdServiceProxy, SystemdUnitProxy};
use crate::host::{HostError, HostOs, Job, UnitOutcome};
use crate::sentinel::Sentinels;
use std::path::Path;
use std::time::Duration;
use tokio_stream::StreamExt;
use zbus::zvariant::{OwnedObjectPath, Value};

/// How many lines of a unit's output go into reports.
const OUTPUT_TAIL_LINES: usize = 20;

/// The machine, through systemd and logind.
#[derive(Debug, Clone)]
pub struct SystemdHost {
    bus: zbus::Connection,
    sentinels: Sentinels,
}

impl SystemdHost {
    /// Connect to the system bus, or to `address` when given.
    pub async fn connect(address: Option<&str>, sentinels: Sentinels) -> Result<Self, HostError> {
        let bus = match address {
            Some(address) => zbus::connection::Builder::address(address)?.build().await?,
            None => zbus::Connection::system().await?,
        };
        Ok(SystemdHost { bus, sentinels })
    }

    /// The last lines a unit's latest run wrote to the journal (empty when
    /// the journal cannot be read). systemd has no D-Bus API for reading the
    /// journal, so this asks `journalctl` for the entries of the run's
    /// invocation ID; the unit itself is only ever driven over D-Bus.
    async fn journal_tail(&self, manager: &SystemdManagerProxy<'_>, unit: &str) -> String {
        let invocation = async {
            let path = manager.get_unit(unit).await.ok()?;
            let proxy = SystemdUnitProxy::builder(&self.bus)
                .path(path)
                .ok()?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .ok()?;
            let id = proxy.invocation_id().await.ok()?;
            (!id.is_empty()).then(|| id.iter().map(|b| format!("{b:02x}")).collect::<String>())
        };
        let Some(id) = invocation.await else {
            return String::new();
        };
        let lines = OUTPUT_TAIL_LINES.to_string();
        let read = tokio::process::Command::new("journalctl")
            .args(["--no-pager", "--quiet", "--output=cat", "--lines", &lines])
            .arg(format!("_SYSTEMD_INVOCATION_ID={id}"))
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(out)) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim_end().to_string()
            }
            Ok(Ok(out)) => {
                tracing::debug!(unit, status = %out.status, "journalctl could not read the unit's output");
                String::new()
            }
            Ok(Err(error)) => {
                tracing::debug!(unit, %error, "journalctl unavailable; no output in the report");
                String::new()
            }
            Err(_) => String::new(),
        }
    }

    async fn outcome_of(&self, unit_path: &OwnedObjectPath, job_result: &str) -> UnitOutcome {
        let mut detail = format!("job {job_result}");
        let mut success = job_result == "done";
        let service = match SystemdServiceProxy::builder(&self.bus).path(unit_path.clone()) {
            Ok(builder) => {
                builder
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
            }
            Err(e) => Err(e),
        };
        if let Ok(service) = service {
            if let Ok(result) = service.result().await {
                success &= result == "success";
                detail.push_str(&format!(", result {result}"));
            }
            if let Ok(status) = service.exec_main_status().await {
                detail.push_str(&format!(", exit status {status}"));
            }
        }
        UnitOutcome {
            success,
            detail,
            output_tail: String::new(),
        }
    }

    /// Wait for a unit that is already loaded to settle (not activating or
    /// deactivating) and say how it ended.
    async fn wait_existing(&self, unit_path: &OwnedObjectPath) -> Result<UnitOutcome, HostError> {
        let unit = SystemdUnitProxy::builder(&self.bus)
            .path(unit_path.clone())?
            .build()
            .await?;
        let mut changes = unit.receive_active_state_changed().await;
        loop {
            let state = unit.active_state().await?;
            match state.as_str() {
                "activating" | "deactivating" | "reloading" => {
                    tracing::info!(unit = %unit_path.as_str(), state, "waiting for a unit started earlier");
                    changes.next().await;
                }
                "failed" => return Ok(self.outcome_of(unit_path, "failed").await),
                _ => return Ok(self.outcome_of(unit_path, "done").await),
            }
        }
    }

    async fn start_and_wait(
        &self,
        manager: &SystemdManagerProxy<'_>,
        job: &Job,
    ) -> Result<UnitOutcome, HostError> {
        let name = job.unit_name();
        // Listen before starting, so that a fast job's JobRemoved is not lost.
        let mut removed = manager.receive_job_removed().await?;
        let job_path = match job {
            Job::Unit(unit) => manager.start_unit(unit, "replace").await?,
            Job::Command {
                unit,
                command,
                output,
            } => {
                let exec: Vec<(String, Vec<String>, bool)> = vec![(
                    "/bin/sh".to_string(),
                    vec!["/bin/sh".into(), "-c".into(), command.clone()],
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
                manager
                    .start_transient_unit(unit, "fail", &properties, &[])
                    .await?
            }
        };
        tracing::info!(unit = name, job = %job_path.as_str(), "started");
        while let Some(signal) = removed.next().await {
            let args = signal.args()?;
            if args.job.as_str() == job_path.as_str() {
                let unit_path = manager.get_unit(name).await.ok();
                return Ok(match unit_path {
                    Some(path) => self.outcome_of(&path, args.result).await,
                    None => UnitOutcome {
                        success: args.result == "done",
                        detail: format!("job {}", args.result),
                        output_tail: String::new(),
                    },
                });
            }
        }
        Err(HostError::Dbus(zbus::Error::Failure(
            "the JobRemoved stream ended".into(),
        )))
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

    async fn maintenance_needed(&self) -> Option<String> {
        self.sentinels.maintenance_needed().await
    }

    async fn reboot_required(&self) -> bool {
        self.sentinels.reboot_required().await
    }

    async fn run(&self, job: &Job, timeout: Duration) -> Result<UnitOutcome, HostError> {
        let manager = SystemdManagerProxy::new(&self.bus).await?;
        subscribe(&manager).await?;
        let run = async {
            // A transient unit of this name exists only if an earlier agent
            // started it for this grant: follow that run instead of starting
            // the update twice.
            if let Job::Command { unit, .. } = job
                && let Ok(path) = manager.get_unit(unit).await
            {
                return self.wait_existing(&path).await;
            }
            self.start_and_wait(&manager, job).await
        };
        let mut outcome =
            tokio::time::timeout(timeout, run)
                .await
                .map_err(|_| HostError::Timeout {
                    what: job.unit_name().to_string(),
                    timeout,
                })??;
        outcome.output_tail = match job {
            Job::Command { output, .. } => tail(output, OUTPUT_TAIL_LINES),
            Job::Unit(name) => self.journal_tail(&manager, name).await,
        };
        Ok(outcome)
    }

    async fn reboot(&self) -> Result<(), HostError> {
        let login = LoginManagerProxy::new(&self.bus).await?;
        match login.can_reboot().await {
            Ok(answer) if answer == "yes" => match login.reboot(false).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%error, "logind refused the reboot; trying reboot.target")
                }
            },
            Ok(answer) => tracing::warn!(answer, "logind CanReboot; trying reboot.target"),
            Err(error) => tracing::warn!(%error, "logind unavailable; trying reboot.target"),
        }
        let manager = SystemdManagerProxy::new(&self.bus).await?;
        manager
            .start_unit("reboot.target", "replace-irreversibly")
            .await
            .map(|_| ())
            .map_err(|e| HostError::RebootRefused(e.to_string()))
    }
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
