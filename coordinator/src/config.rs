//! Command-line and environment configuration of `baton-coordinator`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Grants the baton, the cluster-wide maintenance lease, to one node at a time.
#[derive(Debug, Parser)]
#[command(name = "baton-coordinator", version = crate::VERSION)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the baton.v1 API.
    Serve(Box<ServeArgs>),
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the state lives.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum StoreKind {
    /// One file under --data-dir (a single coordinator).
    Embedded,
    /// etcd (--etcd-endpoints): any number of replicas, one leader elected
    /// with etcd's election API.
    Etcd,
    /// A ConfigMap written with resourceVersion compare-and-swap; leader
    /// elected on a Lease (2+ replicas in a cluster).
    Kubernetes,
}

/// TLS and authentication of the gRPC listener.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Server certificate (PEM). With --tls-key, serve TLS.
    #[arg(long, env = "BATON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "BATON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to: mutual TLS.
    /// A client certificate's common name or DNS name must equal the node it
    /// acts for.
    #[arg(long, env = "BATON_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Client-certificate names that may act for any node and pause, resume
    /// and force-release (repeatable).
    #[arg(
        long = "admin-name",
        env = "BATON_ADMIN_NAMES",
        value_delimiter = ',',
        default_value = "baton-admin"
    )]
    pub admin_names: Vec<String>,
    /// Accept clients without authentication (plaintext unless --tls-cert is
    /// given). For local labs only.
    #[arg(long, env = "BATON_INSECURE")]
    pub insecure: bool,
}

/// `baton-coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "BATON_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Metrics and health listen address (/metrics, /healthz, /readyz).
    #[arg(long, env = "BATON_METRICS_LISTEN", default_value = "0.0.0.0:9443")]
    pub metrics_listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(
        long,
        env = "BATON_DATA_DIR",
        default_value = "/var/lib/baton-coordinator"
    )]
    pub data_dir: PathBuf,
    /// Where the state lives.
    #[arg(long, env = "BATON_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// Create the lease state in an empty store: for a new installation
    /// only, once. Without it a store that holds no state is refused (the
    /// state may have been lost); with it a store that holds state is
    /// refused. Remove it after the first start.
    #[arg(long, env = "BATON_INITIALIZE")]
    pub initialize: bool,
    /// The longest a grant's preparation (the etcd snapshot and leadership
    /// move) may take; past it the node keeps waiting and is tried again.
    #[arg(long, env = "BATON_PREPARE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub prepare_timeout: std::time::Duration,
    /// This replica's id (default: the host name).
    #[arg(long, env = "BATON_ID")]
    pub id: Option<String>,
    /// How many nodes may hold the baton at once (control-plane nodes: one
    /// at a time whatever this says). Default 1; the policy file's
    /// `maxConcurrent` instead, if it sets it (setting both is an error).
    #[arg(long, env = "BATON_MAX_CONCURRENT", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: Option<u32>,
    /// Maintenance window, e.g. "Mon-Fri 22:00-04:00 Europe/Berlin"
    /// (repeatable; none = always).
    #[arg(long = "window", env = "BATON_WINDOWS", value_delimiter = ';')]
    pub windows: Vec<String>,
    /// Do not grant when less than this is left of the window (default
    /// 30m; or the policy file's `minWindowRemaining`).
    #[arg(long, env = "BATON_MIN_WINDOW_REMAINING", value_parser = humantime::parse_duration)]
    pub min_window_remaining: Option<std::time::Duration>,
    /// The rollout policy file (YAML; see the README). Flags are its
    /// defaults; it is reloaded on SIGHUP and when it changes, and a file
    /// that fails a check is refused (the running policy stays).
    #[arg(long, env = "BATON_POLICY")]
    pub policy: Option<PathBuf>,
    /// How often holders are asked to renew.
    #[arg(long, env = "BATON_RENEW_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_interval: std::time::Duration,
    /// A holder that has not renewed for this long is overdue (it keeps the
    /// baton; reboots must fit inside it to not raise an alert).
    #[arg(long, env = "BATON_OVERDUE_AFTER", default_value = "15m", value_parser = humantime::parse_duration)]
    pub overdue_after: std::time::Duration,
    /// TLS and authentication.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// etcd: the quorum guard and the etcd store.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Kubernetes: Lease election, state object, node watch, TokenReview.
    #[command(flatten)]
    pub kube: crate::kube::KubeArgs,
    /// Log format.
    #[arg(long, env = "BATON_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// etcd: the quorum guard (on whenever --etcd-endpoints is given) and the
/// etcd store (`--store etcd`).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// The cluster's etcd client endpoints (comma-separated). Enables the
    /// quorum guard; also where `--store etcd` keeps the state.
    #[arg(long, env = "BATON_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// CA bundle (PEM) that etcd's server certificates chain to.
    #[arg(long, env = "BATON_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "BATON_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "BATON_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// node=member pairs (comma-separated) for nodes whose etcd member is not
    /// named like the node.
    #[arg(long, env = "BATON_ETCD_MEMBER_MAP", value_delimiter = ',')]
    pub etcd_member_map: Vec<String>,
    /// Nodes the guard does not check (repeatable or comma-separated). A node
    /// is never exempt because no member was found for it.
    #[arg(long, env = "BATON_ETCD_EXEMPT_NODES", value_delimiter = ',')]
    pub etcd_exempt_node: Vec<String>,
    /// The largest apply lag (leader's raft index minus the member's applied
    /// index) of a healthy member, in entries.
    #[arg(long, env = "BATON_ETCD_MAX_APPLY_LAG", default_value_t = 1000)]
    pub etcd_max_apply_lag: u64,
    /// On clusters of 5 or more voting members, allow taking a member down
    /// while others are unhealthy as long as quorum remains.
    #[arg(long, env = "BATON_ETCD_ALLOW_DEGRADED")]
    pub etcd_allow_degraded: bool,
    /// Allow taking down the only member of a 1-member cluster (after a
    /// verified snapshot): etcd is down while it reboots.
    #[arg(long, env = "BATON_ETCD_ALLOW_OUTAGE")]
    pub etcd_allow_outage: bool,
    /// Where verified snapshots are kept (default: <data-dir>/etcd-snapshots).
    #[arg(long, env = "BATON_ETCD_SNAPSHOT_DIR")]
    pub etcd_snapshot_dir: Option<PathBuf>,
    /// How many snapshots are kept.
    #[arg(long, env = "BATON_ETCD_SNAPSHOT_KEEP", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub etcd_snapshot_keep: u64,
    /// The largest control-plane backup (a tar.gz of /etc/kubernetes/pki
    /// and the kubeadm configuration) an agent may send, in bytes; a bigger
    /// one is refused and nothing is kept. Backups are kept beside the etcd
    /// snapshot taken for the grant and rotated with it.
    #[arg(long, env = "BATON_BACKUP_MAX_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub backup_max_bytes: u64,
    /// Key prefix of the etcd store.
    #[arg(long, env = "BATON_ETCD_PREFIX", default_value = "/baton")]
    pub etcd_prefix: String,
    /// TTL of the leader's election lease (a dead leader is replaced after
    /// about this long).
    #[arg(long, env = "BATON_ETCD_ELECTION_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub etcd_election_ttl: std::time::Duration,
    /// How often etcd's health is probed.
    #[arg(long, env = "BATON_ETCD_PROBE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub etcd_probe_interval: std::time::Duration,
    /// Timeout of every etcd call made by a probe.
    #[arg(long, env = "BATON_ETCD_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: std::time::Duration,
    /// Health data older than this answers no.
    #[arg(long, env = "BATON_ETCD_MAX_HEALTH_AGE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub etcd_max_health_age: std::time::Duration,
    /// Healthy probe rounds in a row before a node that went out counts as back.
    #[arg(long, env = "BATON_ETCD_BACK_AFTER", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub etcd_back_after: u32,
}
