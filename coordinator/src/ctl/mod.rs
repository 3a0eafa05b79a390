//! `batonctl`: the operators' command line. It speaks the Admin and
//! Coordinator services; `hold` wraps a manual maintenance command in the
//! baton. This module is the binary's logic (it uses `anyhow`, as a `main`
//! does), kept in the library so tests can drive it.
//!
//! It reaches the coordinator at `--coordinator` (TLS, optionally mutual),
//! or with `--kube` through the Kubernetes API ([`kube`]: a port-forward
//! to the leading pod, authenticated with a ServiceAccount token that the
//! user's own Kubernetes identity requests). `kubectl-baton`, the kubectl
//! plugin name of the same program, implies `--kube`.

pub mod kube;
mod output;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_proto::v1::{
    self as pb, admin_client::AdminClient, coordinator_client::CoordinatorClient,
};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit code when `acquire`/`hold` gave up waiting.
pub const EXIT_TIMEOUT: i32 = 2;

/// Operate a Baton rollout: status, pause, resume, acquire, release, force-release, hold.
#[derive(Debug, Parser)]
#[command(name = "batonctl", version = crate::VERSION)]
pub struct Cli {
    /// How to reach the coordinator.
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Connection flags.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Coordinator URL (http:// needs --insecure; https:// uses TLS).
    #[arg(
        long,
        global = true,
        env = "BATON_COORDINATOR",
        default_value = "https://127.0.0.1:7443"
    )]
    pub coordinator: String,
    /// Allow plaintext http:// (labs only).
    #[arg(long, global = true, env = "BATON_INSECURE")]
    pub insecure: bool,
    /// CA bundle (PEM) the coordinator's certificate chains to.
    #[arg(long, global = true, env = "BATON_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "BATON_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "BATON_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Through the Kubernetes API instead (--kube).
    #[command(flatten)]
    pub kube: kube::KubeConnection,
}

/// Adds the bearer token (if any) to every call.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport every client of batonctl uses.
pub type Transport = InterceptedService<Channel, Bearer>;

/// Output format of `status`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// A human table.
    Table,
    /// JSON (one object per state with --watch).
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show holders, the queue and the audit trail.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// Print again after every change.
        #[arg(long)]
        watch: bool,
    },
    /// Show the rollout policy in force, where it came from and when it
    /// was loaded (and the last refused reload, if any).
    Policy {
        /// Output format (table: the YAML with a header).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Dry run: the order the waiting nodes would be granted in and what
    /// each waits for. Grants nothing.
    Plan {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Stop granting (holders finish).
    Pause {
        /// Why (audited).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Grant again.
    Resume,
    /// Wait for the baton for NODE and print its fencing token.
    Acquire {
        /// The node.
        node: String,
        /// The node is a control-plane node.
        #[arg(long)]
        control_plane: bool,
        /// Give up (and withdraw) after this long, e.g. 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait_timeout: Option<Duration>,
        /// Why (shown in status).
        #[arg(long, default_value = "batonctl acquire")]
        reason: String,
    },
    /// Give NODE's baton back.
    Release {
        /// The node.
        node: String,
        /// Its fencing token.
        #[arg(long)]
        token: u64,
        /// Why (audited).
        #[arg(long, default_value = "batonctl release")]
        reason: String,
    },
    /// Take the baton from NODE (audited). Name the token you saw in
    /// `status` with --token, so a late command cannot drop a newer grant of
    /// the same node; --any-token takes whatever it holds.
    #[command(group = clap::ArgGroup::new("expected").required(true).args(["token", "any_token"]))]
    ForceRelease {
        /// The node.
        node: String,
        /// The fencing token NODE must still hold (from `batonctl status`).
        #[arg(long)]
        token: Option<u64>,
        /// Take whatever token NODE holds.
        #[arg(long)]
        any_token: bool,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Take the baton for NODE, run CMD, release, exit with CMD's status.
    Hold {
        /// The node.
        node: String,
        /// Why (shown in status).
        #[arg(long, default_value = "manual maintenance")]
        reason: String,
        /// The node is a control-plane node.
        #[arg(long)]
        control_plane: bool,
        /// Give up (and withdraw) after this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait_timeout: Option<Duration>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Reads a PEM file named by a flag, saying which flag when it cannot.
fn read_pem(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
}

/// The client certificate of --cert/--key, if given.
fn client_identity(conn: &Connection) -> anyhow::Result<Option<Identity>> {
    match (&conn.cert, &conn.key) {
        (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
            read_pem("--cert", cert)?,
            read_pem("--key", key)?,
        ))),
        _ => Ok(None),
    }
}

/// Connects to the coordinator (directly, or with --kube through the
/// Kubernetes API).
pub async fn connect(conn: &Connection) -> anyhow::Result<Transport> {
    if conn.kube.kube {
        let kube = kube::connect(
            &conn.kube,
            conn.insecure,
            conn.ca.as_deref(),
            client_identity(conn)?,
        )
        .await?;
        let bearer = match kube.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .context("the ServiceAccount token is not a valid header value")?,
            ),
            None => None,
        };
        return Ok(InterceptedService::new(kube.channel, Bearer(bearer)));
    }
    let mut endpoint = Endpoint::from_shared(conn.coordinator.clone())
        .with_context(|| {
            format!(
                "bad coordinator URL {:?}: use https://HOST:PORT (or --kube to go through the Kubernetes API)",
                conn.coordinator
            )
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if conn.coordinator.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &conn.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem("--ca", ca)?));
        } else {
            tls = tls.with_native_roots();
        }
        if let Some(identity) = client_identity(conn)? {
            tls = tls.identity(identity);
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if !conn.insecure {
        bail!(
            "{} is plaintext: pass --insecure to allow it, or use https://",
            conn.coordinator
        );
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!(
            "connecting to {} (is the coordinator running and reachable? in a cluster, --kube goes through the Kubernetes API)",
            conn.coordinator
        )
    })?;
    Ok(InterceptedService::new(channel, Bearer::default()))
}

/// Parses the command line of `batonctl`, or of `kubectl-baton` (the
/// kubectl plugin: `kubectl baton ...`), which implies `--kube`.
pub fn parse_args(plugin: bool) -> Cli {
    if !plugin {
        return Cli::parse();
    }
    let command = Cli::command()
        .name("kubectl-baton")
        .bin_name("kubectl baton");
    let matches = command.get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.conn.kube.kube = true;
    cli
}

/// The whole program: parse, run, print the error, exit.
pub async fn main(plugin: bool) -> ! {
    let cli = parse_args(plugin);
    let name = if plugin { "kubectl baton" } else { "batonctl" };
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let channel = connect(&cli.conn).await?;
    let mut admin = AdminClient::new(channel.clone());
    let mut lease = CoordinatorClient::new(channel);
    match cli.command {
        Command::Status { output, watch } => {
            if watch {
                let mut stream = admin.watch(pb::WatchRequest {}).await?.into_inner();
                while let Some(status) = stream.message().await? {
                    output::print_status(&status, output)?;
                }
            } else {
                let status = admin.status(pb::StatusRequest {}).await?.into_inner();
                output::print_status(&status, output)?;
            }
            Ok(0)
        }
        Command::Policy { output } => {
            let policy = admin
                .get_policy(pb::GetPolicyRequest {})
                .await?
                .into_inner();
            output::print_policy(&policy, output)?;
            Ok(0)
        }
        Command::Plan { output } => {
            let plan = admin.plan(pb::PlanRequest {}).await?.into_inner();
            output::print_plan(&plan, output)?;
            Ok(0)
        }
        Command::Pause { reason } => {
            admin.pause(pb::PauseRequest { reason }).await?;
            eprintln!("paused");
            Ok(0)
        }
        Command::Resume => {
            admin.resume(pb::ResumeRequest {}).await?;
            eprintln!("resumed");
            Ok(0)
        }
        Command::Acquire {
            node,
            control_plane,
            wait_timeout,
            reason,
        } => {
            let request = pb::AcquireRequest {
                node,
                control_plane,
                reason,
                manual: false,
                labels: Default::default(),
                // batonctl makes no control-plane backup: a control-plane
                // etcd node waits (its reason says so); `batonctl hold`
                // is the way for manual work there.
                backs_up_control_plane: false,
            };
            match acquire(&mut lease, request, wait_timeout).await? {
                Some(granted) => {
                    println!("{}", granted.fencing_token);
                    Ok(0)
                }
                None => Ok(EXIT_TIMEOUT),
            }
        }
        Command::Release {
            node,
            token,
            reason,
        } => {
            lease
                .release(pb::ReleaseRequest {
                    node,
                    fencing_token: token,
                    reason,
                })
                .await?;
            eprintln!("released");
            Ok(0)
        }
        Command::ForceRelease {
            node,
            token,
            any_token,
            reason,
        } => {
            let released = admin
                .force_release(pb::ForceReleaseRequest {
                    node,
                    reason,
                    fencing_token: token.unwrap_or(0),
                    any_token,
                })
                .await?
                .into_inner();
            eprintln!("force-released token {}", released.fencing_token);
            Ok(0)
        }
        Command::Hold {
            node,
            reason,
            control_plane,
            wait_timeout,
            command,
        } => hold(lease, node, reason, control_plane, wait_timeout, command).await,
    }
}

/// Waits for the grant, printing queue updates on stderr. `None` on timeout;
/// dropping the stream withdraws the request.
async fn acquire(
    lease: &mut CoordinatorClient<Transport>,
    request: pb::AcquireRequest,
    wait_timeout: Option<Duration>,
) -> anyhow::Result<Option<pb::Granted>> {
    let node = request.node.clone();
    let wait = async {
        let mut stream = lease.acquire(request).await?.into_inner();
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(pb::acquire_event::Event::Queued(q)) => {
                    eprintln!(
                        "{node}: waiting, position {} of {}: {}",
                        q.position, q.queue_length, q.reason
                    );
                }
                Some(pb::acquire_event::Event::Granted(g)) => return Ok(g),
                None => {}
            }
        }
        bail!("the coordinator ended the Acquire stream without a grant")
    };
    match wait_timeout {
        None => wait.await.map(Some),
        Some(limit) => match tokio::time::timeout(limit, wait).await {
            Ok(result) => result.map(Some),
            Err(_) => {
                eprintln!(
                    "{node}: no grant within {}; request withdrawn",
                    humantime::format_duration(limit)
                );
                Ok(None)
            }
        },
    }
}

/// `batonctl hold`: acquire, run the command while renewing, release.
async fn hold(
    mut lease: CoordinatorClient<Transport>,
    node: String,
    reason: String,
    control_plane: bool,
    wait_timeout: Option<Duration>,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let request = pb::AcquireRequest {
        node: node.clone(),
        control_plane,
        reason,
        manual: true,
        labels: Default::default(),
        // A hold runs no agent steps (the operator does the work); the
        // coordinator grants it for `manual` alone.
        backs_up_control_plane: false,
    };
    let Some(granted) = acquire(&mut lease, request, wait_timeout).await? else {
        return Ok(EXIT_TIMEOUT);
    };
    let token = granted.fencing_token;
    eprintln!("{node}: holding the baton (token {token}); running {command:?}");
    let renew_every = granted
        .lease
        .and_then(|l| l.renew_interval)
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(10));

    let mut child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("{node}: cannot run {:?}: {e}", command[0]);
            release_after_hold(&mut lease, &node, token, "hold: command could not start").await?;
            return Ok(127);
        }
    };
    let mut renewals = tokio::time::interval(renew_every);
    renewals.tick().await;
    let status: ExitStatus = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = renewals.tick() => {
                if let Err(e) = lease.renew(pb::RenewRequest { node: node.clone(), fencing_token: token }).await {
                    eprintln!("{node}: renewing the baton failed: {}", e.message());
                }
            }
        }
    };
    let code = status.code().unwrap_or(128);
    release_after_hold(
        &mut lease,
        &node,
        token,
        &format!("hold: command exited with {code}"),
    )
    .await?;
    Ok(code)
}

async fn release_after_hold(
    lease: &mut CoordinatorClient<Transport>,
    node: &str,
    token: u64,
    reason: &str,
) -> anyhow::Result<()> {
    lease
        .release(pb::ReleaseRequest {
            node: node.to_string(),
            fencing_token: token,
            reason: reason.to_string(),
        })
        .await
        .with_context(|| format!("releasing the baton of {node} (token {token})"))?;
    eprintln!("{node}: released (token {token})");
    Ok(())
}
