//! baton-agent: the per-node agent. It notices that its node needs
//! maintenance, asks the coordinator for the baton, updates and reboots the
//! node through systemd while holding it, proves the reboot happened, and
//! gives the baton back.
//!
//! Layout:
//! - [`phase`]: the pure lifecycle (enum + transition function);
//! - [`agent`]: the loop that drives it with the I/O boundaries;
//! - [`host`] (trait `HostOs`), [`systemd`] (its D-Bus implementation),
//!   [`unit_run`] (which run of a unit to wait for, and when it is over)
//!   and [`dbus`] (the typed systemd/logind proxies);
//! - [`coordinator`]: trait `Coordinator` and its gRPC client;
//! - [`node_ops`]: trait `NodeOps` and the standalone implementation;
//! - [`kubernetes`]: the Kubernetes node operations (cordon, drain, uncordon,
//!   Ready after reboot, annotations, Events) for `--mode kubernetes`;
//! - [`sentinel`]: reboot sentinels, check commands, inotify watching;
//! - [`state`]: the atomically written state file;
//! - [`text`]: text cut to the API's limits before it is sent;
//! - [`cli`]: flags and environment.
//!
//! The agent's tests run it over a simulated node (`fakes`, test only),
//! also with faults at every crash point (`crash_points`, test only).

pub mod agent;
pub mod backup;
pub mod cli;
pub mod coordinator;
// The proxy macro generates signal-argument types without docs.
#[allow(missing_docs)]
pub mod dbus;
pub mod host;
pub mod kubernetes;
pub mod node_ops;
pub mod phase;
pub mod sentinel;
pub mod state;
pub mod systemd;
pub mod text;
pub mod unit_run;

/// The version `--version` shows: the package version and the git revision
/// the binary was built from (see build-support/build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BATON_GIT_REVISION"),
    ")"
);

#[cfg(test)]
mod crash_points;
#[cfg(test)]
mod fakes;

use agent::{Action, Agent, AgentError, Settings};
use cli::{Auth, Command, LogFormat, Mode, RunArgs};
use coordinator::{BearerToken, CoordinatorError, GrpcCoordinator, Tls};
use host::HostError;
use kubernetes::{KubeError, KubeNodeOps};
use node_ops::{AnyNodeOps, StandaloneNodeOps};
use sentinel::Sentinels;
use state::StateFile;
use systemd::{HostSettings, SystemdHost};
use tokio_util::sync::CancellationToken;

/// Errors that end `baton-agent`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Talking to systemd failed at startup.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The coordinator settings are unusable.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// The agent stopped on an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The Kubernetes client could not be set up (`--mode kubernetes`).
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    /// The host's systemd could not be reached over D-Bus.
    #[error(
        "cannot reach systemd on the system D-Bus ({address}): {source}; the agent needs the host's system bus (in a pod: mount the host's /run/dbus/system_bus_socket; elsewhere: --dbus-address)"
    )]
    SystemBus {
        /// The bus address tried.
        address: String,
        /// The error (boxed: it is large, and this is the rare path).
        source: Box<HostError>,
    },
    /// A TLS file could not be read, or signals could not be installed.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Run the command line.
pub async fn run(cli: cli::Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Run(args) => run_agent(args).await,
    }
}

/// Reads the file a flag names; the error says which flag.
fn read(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Io {
        what: format!("reading {flag} {}", path.display()),
        source,
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn run_agent(args: RunArgs) -> Result<(), RunError> {
    init_logging(args.log_format);
    let auth = args.coordinator.auth().map_err(CoordinatorError::Config)?;
    let (tls, token) = match &auth {
        Auth::Insecure { token_file } => (
            None,
            token_file
                .as_ref()
                .map(BearerToken::from_file)
                .unwrap_or_default(),
        ),
        Auth::MutualTls { ca, cert, key } => (
            Some(Tls {
                ca: read("--ca", ca)?,
                identity: Some((read("--cert", cert)?, read("--key", key)?)),
            }),
            BearerToken::none(),
        ),
        Auth::Token { ca, token_file } => (
            Some(Tls {
                ca: read("--ca", ca)?,
                identity: None,
            }),
            BearerToken::from_file(token_file),
        ),
    };
    let coordinator = GrpcCoordinator::new(
        &args.coordinator.url,
        tls,
        token,
        &args.node,
        args.control_plane,
    )?
    .with_call_timeout(args.timing.call_timeout)
    .with_labels(args.labels.clone());
    let sentinels = Sentinels {
        files: args.sentinels.reboot_sentinels.clone(),
        command: args.sentinels.reboot_sentinel_command.clone(),
        update_check: args.sentinels.update_check_command.clone(),
        command_timeout: args.timing.check_timeout,
        ..Sentinels::default()
    };
    // Every unit the agent runs is waited for until its run ends, which
    // only a service has: refuse anything else before touching the node.
    let m = &args.maintenance;
    for unit in [
        &m.update_unit,
        &m.pre_maintenance_unit,
        &m.post_maintenance_unit,
        &m.post_check_unit,
    ]
    .into_iter()
    .flatten()
    {
        host::check_runnable_unit(unit)?;
    }
    let host = SystemdHost::connect(
        args.dbus_address.as_deref(),
        sentinels,
        HostSettings {
            dbus_timeout: args.timing.dbus_timeout,
            reboot_fallback_target: m.reboot_fallback_target,
        },
    )
    .await
    .map_err(|source| RunError::SystemBus {
        address: args
            .dbus_address
            .clone()
            .unwrap_or_else(|| "the system bus".to_string()),
        source: Box::new(source),
    })?;
    let node_ops = match args.mode {
        Mode::Standalone => AnyNodeOps::Standalone(StandaloneNodeOps::new(
            host.clone(),
            args.maintenance.pre_maintenance_unit.clone(),
            args.maintenance.post_maintenance_unit.clone(),
            args.timing.node_ops_timeout,
        )),
        Mode::Kubernetes => {
            if args.maintenance.pre_maintenance_unit.is_some()
                || args.maintenance.post_maintenance_unit.is_some()
            {
                tracing::warn!(
                    "--pre/--post-maintenance-unit are for standalone mode; ignored with --mode kubernetes"
                );
            }
            let client = args.kubernetes.client().await?;
            AnyNodeOps::Kubernetes(Box::new(KubeNodeOps::new(
                client,
                &args.node,
                args.kubernetes.clone(),
            )))
        }
    };
    let settings = Settings {
        update: match (&m.update_unit, &m.update_command) {
            (Some(unit), _) => Some(Action::Unit(unit.clone())),
            (None, Some(cmd)) => Some(Action::Command(cmd.clone())),
            (None, None) => None,
        },
        post_check: match (&m.post_check_unit, &m.post_check_command) {
            (Some(unit), _) => Some(Action::Unit(unit.clone())),
            (None, Some(cmd)) => Some(Action::Command(cmd.clone())),
            (None, None) => None,
        },
        update_timeout: args.timing.update_timeout,
        post_check_timeout: args.timing.post_check_timeout,
        reboot_timeout: args.timing.reboot_timeout,
        renew_interval: args.timing.renew_interval,
        retry_interval: args.timing.retry_interval,
        abort_backoff: args.timing.abort_backoff,
        call_timeout: args.timing.call_timeout,
        inhibitor_timeout: args.timing.inhibitor_timeout,
        ignore_inhibitors: m.ignore_inhibitors,
        backup_paths: m.backup_paths.clone(),
        backup_attempts: Settings::default().backup_attempts,
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    tracing::info!(node = %args.node, mode = ?args.mode, coordinator = %args.coordinator.url, state_dir = %args.state_dir.display(), "baton-agent starting");
    let wakes = sentinel::watch(
        &args.sentinels.reboot_sentinels,
        args.sentinels.check_interval,
    );
    let mut agent = Agent::new(
        host,
        coordinator,
        node_ops,
        StateFile::new(&args.state_dir),
        settings,
        shutdown,
    );
    agent.run(wakes).await?;
    Ok(())
}

/// First SIGTERM/SIGINT: graceful stop (the current step is abandoned at an
/// await point, never in the middle of writing state). Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |source| RunError::Io {
        what: "installing signal handlers".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            if n == 0 {
                tracing::info!("signal received; stopping");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal; exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
