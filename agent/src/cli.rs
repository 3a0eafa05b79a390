//! Command line and environment: every flag also reads a `BATON_*`
//! variable, so a systemd `EnvironmentFile=` serves as the config file.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// The Baton node agent.
#[derive(Debug, Parser)]
#[command(name = "baton-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch for maintenance needs and carry out maintenance with the baton.
    Run(RunArgs),
}

/// How the node is taken out of service around maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// No Kubernetes: pre- and post-maintenance systemd units.
    Standalone,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `baton-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's name (the Kubernetes node name, or the host name).
    #[arg(long, env = "BATON_NODE")]
    pub node: String,
    /// Where the agent keeps its state across restarts and reboots.
    #[arg(long, env = "BATON_STATE_DIR", default_value = "/var/lib/baton")]
    pub state_dir: PathBuf,
    /// How the node is taken out of service.
    #[arg(long, env = "BATON_MODE", value_enum, default_value = "standalone")]
    pub mode: Mode,
    /// This node is a control-plane node.
    #[arg(long, env = "BATON_CONTROL_PLANE")]
    pub control_plane: bool,
    /// D-Bus address of the system bus (default: the standard system bus).
    #[arg(long, env = "BATON_DBUS_ADDRESS")]
    pub dbus_address: Option<String>,
    /// Log format.
    #[arg(long, env = "BATON_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The coordinator connection.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// When maintenance is needed.
    #[command(flatten)]
    pub sentinels: SentinelArgs,
    /// What maintenance does.
    #[command(flatten)]
    pub maintenance: MaintenanceArgs,
    /// Timeouts and intervals.
    #[command(flatten)]
    pub timing: TimingArgs,
}

/// The coordinator connection.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// The coordinator's URL (http://... with --insecure, https://... with TLS).
    #[arg(long = "coordinator", env = "BATON_COORDINATOR")]
    pub url: String,
    /// Talk plain text without authentication (local labs only).
    #[arg(long, env = "BATON_INSECURE", conflicts_with_all = ["ca", "cert", "key"])]
    pub insecure: bool,
    /// CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, env = "BATON_CA", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// This agent's client certificate (PEM).
    #[arg(long, env = "BATON_CERT")]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, env = "BATON_KEY")]
    pub key: Option<PathBuf>,
}

/// When maintenance is needed.
#[derive(Debug, Args)]
pub struct SentinelArgs {
    /// A file whose existence means "reboot required" (repeatable; the
    /// environment variable takes a comma-separated list).
    #[arg(
        long = "reboot-sentinel",
        env = "BATON_REBOOT_SENTINEL",
        value_delimiter = ',',
        default_values = ["/var/run/reboot-required", "/run/reboot-required"]
    )]
    pub reboot_sentinels: Vec<PathBuf>,
    /// A shell command that exits 0 when a reboot is required.
    #[arg(long, env = "BATON_REBOOT_SENTINEL_COMMAND")]
    pub reboot_sentinel_command: Option<String>,
    /// A shell command that exits 0 when updates are available.
    #[arg(long, env = "BATON_UPDATE_CHECK_COMMAND")]
    pub update_check_command: Option<String>,
    /// How often sentinels and check commands are re-checked (inotify wakes
    /// the agent at once for sentinel files).
    #[arg(long, env = "BATON_CHECK_INTERVAL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub check_interval: Duration,
}

/// What maintenance does.
#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    /// The unit that applies updates (e.g. apt-daily-upgrade.service).
    #[arg(long, env = "BATON_UPDATE_UNIT", conflicts_with = "update_command")]
    pub update_unit: Option<String>,
    /// A shell command that applies updates, run as a transient unit.
    #[arg(long, env = "BATON_UPDATE_COMMAND")]
    pub update_command: Option<String>,
    /// A unit started before maintenance (standalone mode).
    #[arg(long, env = "BATON_PRE_MAINTENANCE_UNIT")]
    pub pre_maintenance_unit: Option<String>,
    /// A unit started after maintenance (standalone mode).
    #[arg(long, env = "BATON_POST_MAINTENANCE_UNIT")]
    pub post_maintenance_unit: Option<String>,
    /// A unit that checks the node after boot.
    #[arg(
        long,
        env = "BATON_POST_CHECK_UNIT",
        conflicts_with = "post_check_command"
    )]
    pub post_check_unit: Option<String>,
    /// A shell command that checks the node after boot (transient unit).
    #[arg(long, env = "BATON_POST_CHECK_COMMAND")]
    pub post_check_command: Option<String>,
}

/// Timeouts and intervals.
#[derive(Debug, Args)]
pub struct TimingArgs {
    /// How long the update may run.
    #[arg(long, env = "BATON_UPDATE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1h")]
    pub update_timeout: Duration,
    /// How long the post-check may run.
    #[arg(long, env = "BATON_POST_CHECK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub post_check_timeout: Duration,
    /// How long pre- and post-maintenance units may run.
    #[arg(long, env = "BATON_NODE_OPS_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30m")]
    pub node_ops_timeout: Duration,
    /// How long to wait for the machine to go down after asking to reboot.
    #[arg(long, env = "BATON_REBOOT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub reboot_timeout: Duration,
    /// How often to renew the baton (a shorter interval from the coordinator
    /// wins).
    #[arg(long, env = "BATON_RENEW_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub renew_interval: Duration,
    /// How long to wait before retrying a failed coordinator call.
    #[arg(long, env = "BATON_RETRY_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub retry_interval: Duration,
    /// How long a sentinel or update-check command may run.
    #[arg(long, env = "BATON_CHECK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub check_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_watch_both_run_paths() {
        let cli = Cli::try_parse_from([
            "baton-agent",
            "run",
            "--node",
            "n1",
            "--coordinator",
            "http://127.0.0.1:1",
            "--insecure",
        ])
        .unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(
            args.sentinels.reboot_sentinels,
            vec![
                PathBuf::from("/var/run/reboot-required"),
                PathBuf::from("/run/reboot-required")
            ]
        );
        assert_eq!(args.mode, Mode::Standalone);
    }
}
