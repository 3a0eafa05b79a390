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

    /// Stop a unit; returns the job's object path.
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

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

/// `org.freedesktop.systemd1.Unit`: the state of one unit. systemd sends
/// PropertiesChanged for these (to subscribed clients), so a run is
/// followed by signals, not by polling.
#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdUnit {
    /// Keep the unit loaded (with its last result) while this connection
    /// lives or until [`SystemdUnitProxy::unref`]: a finished service is
    /// otherwise garbage-collected, and its Result with it.
    #[zbus(name = "Ref")]
    fn ref_(&self) -> zbus::Result<()>;

    /// Drop the reference taken with [`SystemdUnitProxy::ref_`].
    fn unref(&self) -> zbus::Result<()>;

    /// "loaded", "not-found", "bad-setting", "error", "masked", "stub".
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;

    /// "active", "reloading", "inactive", "failed", "activating",
    /// "deactivating".
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;

    /// The unit type's own state ("running", "exited", "dead", "start",
    /// "auto-restart", ... for services).
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;

    /// False when the last start found a Condition unmet (the unit was
    /// then not started at all).
    #[zbus(property)]
    fn condition_result(&self) -> zbus::Result<bool>;

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

    /// When the main process of the current (or last) run started,
    /// microseconds since the epoch (0: never).
    #[zbus(property)]
    fn exec_main_start_timestamp(&self) -> zbus::Result<u64>;

    /// How the main process ended: 1 exited (ExecMainStatus is its exit
    /// status), 2 killed, 3 dumped core (ExecMainStatus is the signal).
    #[zbus(property)]
    fn exec_main_code(&self) -> zbus::Result<i32>;
}

/// `org.freedesktop.login1.Manager`: power management.
#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
pub trait LoginManager {
    /// Reboot the machine. As root this does not check block inhibitors
    /// (logind lets root override them), so the agent lists them first.
    fn reboot(&self, interactive: bool) -> zbus::Result<()>;

    /// Every inhibitor lock: (what, who, why, mode, uid, pid).
    #[allow(clippy::type_complexity)]
    fn list_inhibitors(&self) -> zbus::Result<Vec<(String, String, String, String, u32, u32)>>;
}
