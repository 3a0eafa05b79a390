//! Command line and environment: every flag also reads a `BATON_*`
//! variable, so a systemd `EnvironmentFile=` serves as the config file.

use crate::kubernetes::KubernetesArgs;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Updates and reboots this node through systemd while it holds the baton.
#[derive(Debug, Parser)]
#[command(name = "baton-agent", version = crate::VERSION)]
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
    /// A Kubernetes node: cordon and drain before, Ready and uncordon after,
    /// annotations and Events on the Node, blocking pods respected.
    Kubernetes,
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
    /// A label for the coordinator's policy (pool selectors, zones) on
    /// hosts without Kubernetes, as KEY=VALUE (repeatable, or
    /// comma-separated in the environment), e.g.
    /// `--label topology.kubernetes.io/zone=rack-a`.
    #[arg(long = "label", env = "BATON_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
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
    /// `--mode kubernetes` (ignored in standalone mode).
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// The coordinator connection.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// The coordinator's URL (http://... with --insecure, https://... with TLS).
    #[arg(long = "coordinator", env = "BATON_COORDINATOR")]
    pub url: String,
    /// Talk plain text (local labs only): without authentication, or with
    /// --token-file.
    #[arg(long, env = "BATON_INSECURE", conflicts_with_all = ["ca", "cert", "key"])]
    pub insecure: bool,
    /// CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, env = "BATON_CA")]
    pub ca: Option<PathBuf>,
    /// This agent's client certificate (PEM), for mutual TLS.
    #[arg(long, env = "BATON_CERT", requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM), for mutual TLS.
    #[arg(long, env = "BATON_KEY", requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token sent on every call (a projected
    /// ServiceAccount token with audience `baton`); re-read when it changes.
    /// With --ca (server TLS) or --insecure; not with a client certificate.
    #[arg(long, env = "BATON_TOKEN_FILE", conflicts_with_all = ["cert", "key"])]
    pub token_file: Option<PathBuf>,
}

/// How the agent talks to the coordinator, from [`CoordinatorArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Plain text; a bearer token if given (labs only).
    Insecure {
        /// The token file, if any.
        token_file: Option<PathBuf>,
    },
    /// Mutual TLS (standalone hosts).
    MutualTls {
        /// The coordinator's CA.
        ca: PathBuf,
        /// The agent's certificate.
        cert: PathBuf,
        /// The agent's key.
        key: PathBuf,
    },
    /// Server TLS and a bearer token (in a cluster).
    Token {
        /// The coordinator's CA.
        ca: PathBuf,
        /// The token file.
        token_file: PathBuf,
    },
}

impl CoordinatorArgs {
    /// The one authentication these flags describe, or a sentence saying
    /// which flags are missing or do not go together.
    pub fn auth(&self) -> Result<Auth, String> {
        let auth = self.auth_from_flags()?;
        let plain = self
            .url
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("http://");
        match &auth {
            Auth::MutualTls { .. } | Auth::Token { .. } if plain => Err(format!(
                "--coordinator {} is plain http://, but --ca/--cert/--token-file ask for TLS: the bearer token or certificate would not protect anything (use https://, or --insecure in a lab)",
                self.url
            )),
            _ => Ok(auth),
        }
    }

    fn auth_from_flags(&self) -> Result<Auth, String> {
        match (
            self.insecure,
            &self.ca,
            &self.cert,
            &self.key,
            &self.token_file,
        ) {
            (true, None, None, None, token_file) => Ok(Auth::Insecure {
                token_file: token_file.clone(),
            }),
            (true, ..) => Err("--insecure does not go with --ca, --cert or --key".into()),
            (false, Some(ca), Some(cert), Some(key), None) => Ok(Auth::MutualTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (false, Some(ca), None, None, Some(token_file)) => Ok(Auth::Token {
                ca: ca.clone(),
                token_file: token_file.clone(),
            }),
            (false, _, Some(_), _, Some(_)) | (false, _, _, Some(_), Some(_)) => Err(
                "--token-file goes with --ca only (server TLS), not with a client certificate"
                    .into(),
            ),
            (false, None, _, _, Some(_)) => {
                Err("--token-file needs --ca (the coordinator's CA), or --insecure in a lab".into())
            }
            (false, Some(_), None, None, None) => Err(
                "--ca needs either --token-file, or --cert and --key for mutual TLS".into(),
            ),
            _ => Err(
                "authenticate with --ca and --token-file, with --ca, --cert and --key, or use --insecure"
                    .into(),
            ),
        }
    }
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
    /// A shell command that exits 0 when a reboot is required and 1 when
    /// not; any other exit status (126, 127, 124, 137, ...), a signal or
    /// `--check-timeout` is no answer, never "no".
    #[arg(long, env = "BATON_REBOOT_SENTINEL_COMMAND")]
    pub reboot_sentinel_command: Option<String>,
    /// A shell command that exits 0 when updates are available (the same
    /// rules as `--reboot-sentinel-command`).
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
    /// Reboot even while logind inhibitor locks (mode "block", what
    /// "shutdown") are held. By default the agent waits for them to go, up
    /// to --inhibitor-timeout, and then fails.
    #[arg(long, env = "BATON_IGNORE_INHIBITORS")]
    pub ignore_inhibitors: bool,
    /// When logind refuses the reboot, start reboot.target instead. That
    /// bypasses logind (and every inhibitor), so it is off by default.
    #[arg(long, env = "BATON_REBOOT_FALLBACK_TARGET")]
    pub reboot_fallback_target: bool,
    /// What the control-plane backup holds (repeatable, or comma-separated
    /// in the environment): files or directories, archived with their
    /// modes. The coordinator asks for the backup when it grants a
    /// control-plane node that carries an etcd member, and keeps it beside
    /// the etcd snapshot taken for that grant. In Kubernetes mode the
    /// kube-system/kubeadm-config ConfigMap is added. Add the kubeadm
    /// configuration file if this node keeps one (e.g.
    /// `--backup-path /etc/kubernetes/pki --backup-path /etc/kubernetes/kubeadm.yaml`).
    /// A path that does not exist fails the backup, and the node is not
    /// drained.
    #[arg(long = "backup-path", env = "BATON_BACKUP_PATHS", value_delimiter = ',', default_value = crate::backup::DEFAULT_PATH)]
    pub backup_paths: Vec<PathBuf>,
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
    /// How long to hold back before asking again after a maintenance that
    /// was aborted (a drain that timed out) or lost (force-released), or
    /// after which the need was still there; doubles with each one in a
    /// row, up to an hour. Persisted across restarts.
    #[arg(long, env = "BATON_ABORT_BACKOFF", value_parser = humantime::parse_duration, default_value = "5m")]
    pub abort_backoff: Duration,
    /// The deadline of every call to the coordinator (the wait for a grant
    /// aside).
    #[arg(long, env = "BATON_CALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "15s")]
    pub call_timeout: Duration,
    /// How long to wait for logind's block inhibitors on shutdown to go
    /// before the reboot; then the maintenance fails (the baton stays held).
    #[arg(long, env = "BATON_INHIBITOR_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30m")]
    pub inhibitor_timeout: Duration,
    /// The deadline of every D-Bus call to systemd and logind.
    #[arg(long, env = "BATON_DBUS_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub dbus_timeout: Duration,
    /// How long a sentinel or update-check command, or looking at the
    /// sentinel files, may take before the check is an error.
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

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "baton-agent",
            "run",
            "--node",
            "n1",
            "--coordinator",
            "https://c:7443",
        ];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv)?.command;
        Ok(args)
    }

    /// The exact arguments of manifests/agent-daemonset.yaml.
    #[test]
    fn the_daemonset_arguments_parse() {
        let cli = Cli::try_parse_from([
            "baton-agent",
            "run",
            "--mode=kubernetes",
            "--coordinator=https://baton-coordinator.baton-system.svc:7443",
            "--ca=/etc/baton/coordinator-ca/ca.crt",
            "--token-file=/var/run/secrets/baton/token",
            "--state-dir=/var/lib/baton",
            "--reboot-sentinel=/host/run/reboot-required",
            "--drain-timeout=10m",
            "--node=n1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.mode, Mode::Kubernetes);
        assert_eq!(args.kubernetes.drain_timeout, Duration::from_secs(600));
        assert_eq!(
            args.coordinator.auth(),
            Ok(Auth::Token {
                ca: "/etc/baton/coordinator-ca/ca.crt".into(),
                token_file: "/var/run/secrets/baton/token".into(),
            })
        );
    }

    #[test]
    fn authentication_combinations() {
        let auth = |extra: &[&str]| run_args(extra).map(|a| a.coordinator.auth());
        assert!(matches!(
            auth(&["--ca=ca", "--cert=c", "--key=k"]),
            Ok(Ok(Auth::MutualTls { .. }))
        ));
        assert!(matches!(
            auth(&["--insecure", "--token-file=t"]),
            Ok(Ok(Auth::Insecure {
                token_file: Some(_)
            }))
        ));
        assert!(matches!(
            auth(&["--insecure"]),
            Ok(Ok(Auth::Insecure { token_file: None }))
        ));
        // Rejected by clap: a client certificate and a token together, a
        // certificate without its key, plain text with TLS files.
        assert!(auth(&["--ca=ca", "--cert=c", "--key=k", "--token-file=t"]).is_err());
        assert!(auth(&["--ca=ca", "--cert=c"]).is_err());
        assert!(auth(&["--insecure", "--ca=ca"]).is_err());
        // Rejected with a sentence: a token without a CA, a CA alone,
        // nothing at all.
        let err = auth(&["--token-file=t"]).unwrap().unwrap_err();
        assert!(err.contains("--token-file needs --ca"), "{err}");
        let err = auth(&["--ca=ca"]).unwrap().unwrap_err();
        assert!(err.contains("--token-file"), "{err}");
        assert!(auth(&[]).unwrap().is_err());
    }

    /// Finding 7: TLS material with a plain-text URL would send the bearer
    /// token in clear; refused with a sentence.
    #[test]
    fn plain_http_with_tls_flags_is_refused() {
        let parse = |url: &str, extra: &[&str]| {
            let mut argv = vec!["baton-agent", "run", "--node", "n1", "--coordinator", url];
            argv.extend_from_slice(extra);
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command;
            args.coordinator.auth()
        };
        let err = parse("http://c:7443", &["--ca=ca", "--token-file=t"]).unwrap_err();
        assert!(err.contains("plain http://"), "{err}");
        assert!(parse("HTTP://c:7443", &["--ca=ca", "--cert=c", "--key=k"]).is_err());
        assert!(parse("https://c:7443", &["--ca=ca", "--token-file=t"]).is_ok());
        // A lab on purpose: plain text, said so.
        assert!(parse("http://127.0.0.1:7443", &["--insecure"]).is_ok());
    }
}

/// Parses `KEY=VALUE` (the coordinator checks the key and value).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod label_tests {
    use super::parse_label;

    #[test]
    fn labels_are_key_value_pairs() {
        assert_eq!(
            parse_label("topology.kubernetes.io/zone=rack-a").unwrap(),
            ("topology.kubernetes.io/zone".into(), "rack-a".into())
        );
        assert_eq!(
            parse_label("empty=").unwrap(),
            ("empty".into(), String::new())
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
    }
}
