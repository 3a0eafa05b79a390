//! Typed D-Bus proxies for the parts of systemd and logind the agent uses.
//!
//! This is the only module that names D-Bus interfaces. The agent never runs
//! `systemctl` or `busctl`: everything goes through these proxies on the
//! system bus (or the bus given with `--dbus-address`).

use zbus::proxy;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, Value};

/// `org.freedesktop.systemd1.Manager`: start units and follow their jobs.
#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait SystemdManager {
    /// Ask systemd to emit job and unit signals to this client. Without it,
    /// JobRemoved is not sent.
    fn subscribe(&self) -> zbus::Result<()>;

    /// Start a unit; returns the job's object path.
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Create and start a transient unit; returns the job's object path.
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    /// The object path of a loaded unit (fails with NoSuchUnit otherwise).
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// The object path of a unit, loading it from disk if needed.
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// A job finished; `result` is "done", "failed", "canceled", "timeout",
    /// "dependency" or "skipped".
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// `org.freedesktop.systemd1.Unit`: the state of one unit.
#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdUnit {
    /// "active", "reloading", "inactive", "failed", "activating",
    /// "deactivating".
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;

    /// The ID of the unit's current (or last) run, 16 bytes; its journal
    /// entries carry it as `_SYSTEMD_INVOCATION_ID`.
    #[zbus(property, name = "InvocationID")]
    fn invocation_id(&self) -> zbus::Result<Vec<u8>>;
}

/// `org.freedesktop.systemd1.Service`: how a service's main process ended.
#[proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdService {
    /// "success", "exit-code", "signal", "timeout", ...
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;

    /// The exit status (or signal number) of the main process.
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
}

/// `org.freedesktop.login1.Manager`: power management.
#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
pub trait LoginManager {
    /// "yes", "no", "challenge" or "na".
    fn can_reboot(&self) -> zbus::Result<String>;

    /// Reboot the machine.
    fn reboot(&self, interactive: bool) -> zbus::Result<()>;
}
