//! `baton-coordinator serve`: wires the store, the engine, the gRPC services
//! and the metrics endpoints together, and shuts them down cleanly.

use std::net::SocketAddr;
use std::sync::Arc;

use baton_proto::v1::admin_server::AdminServer;
use baton_proto::v1::coordinator_server::CoordinatorServer;
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{Authenticator, CertificateOrToken, MutualTls, Unauthenticated};
use crate::config::{ServeArgs, StoreKind};
use crate::engine::{Engine, EngineConfig, system_clock};
use crate::kube::KubeWiring;
use crate::kube::events::EventRecorder;
use crate::metrics::{self, Metrics};
use crate::rollout::budget::FailureBudget;
use crate::rollout::gate::HealthGate;
use crate::rollout::labels::LabelBook;
use crate::rollout::notify::{Notifier, Reporting};
use crate::rollout::observe::Observers;
use crate::rollout::report::{Reporter, RolloutView, ViewHandle};
use crate::rollout::rule::PolicyRule;
use crate::rollout::stuck::StuckLocks;
use crate::rollout::{FlagDefaults, PolicyHandle};
use crate::service::Services;
use crate::store::file::FileStore;
use crate::store::{StateStore, StoreError};

/// Why the coordinator did not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Neither client authentication nor --insecure was configured.
    #[error(
        "refusing to start without client authentication: pass --tls-cert/--tls-key with --client-ca (mutual TLS), or --insecure for a lab"
    )]
    NoAuthentication,
    /// The policy (file or flags) was refused.
    #[error("policy refused: {0}")]
    Policy(#[from] crate::rollout::PolicyError),
    /// The store failed to open or load.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A TLS file could not be read.
    #[error("reading {flag} {path}: {source}")]
    TlsFile {
        /// The flag that names it.
        flag: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Binding a listener failed.
    #[error(
        "binding {addr}: {source} (is another process listening there? choose another address with --listen or --metrics-listen)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The Kubernetes integration could not start.
    #[error(transparent)]
    Kubernetes(#[from] crate::kube::KubeSetupError),
    /// The etcd settings were refused or the etcd store did not open.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::wiring::EtcdStoreOpenError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The engine refused to run (missing state, `--initialize` on existing
    /// state, corrupt state): the coordinator stopped.
    #[error("{0}")]
    Refused(String),
}

/// A started coordinator.
pub struct Running {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound metrics address.
    pub metrics_addr: SocketAddr,
    /// The engine (for tests and embedding).
    pub engine: Arc<Engine>,
    /// Finishes when both servers have stopped.
    pub done: JoinHandle<Result<(), ServeError>>,
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::TlsFile {
        flag,
        path: path.display().to_string(),
        source,
    })
}

/// Opens the store the arguments name.
async fn open_store(
    args: &ServeArgs,
    id: &str,
    kube: Option<&KubeWiring>,
) -> Result<Arc<dyn StateStore>, ServeError> {
    match (args.store, kube) {
        (StoreKind::Embedded, _) => Ok(Arc::new(FileStore::open(&args.data_dir, id)?)),
        (StoreKind::Etcd, _) => Ok(Arc::new(crate::etcd::wiring::store(args, id).await?)),
        (StoreKind::Kubernetes, Some(kube)) => Ok(kube.store(id)),
        (StoreKind::Kubernetes, None) => Err(StoreError::Backend(
            "--store kubernetes needs the Kubernetes client".to_string(),
        )
        .into()),
    }
}

/// Starts serving; `shutdown` completing starts a graceful stop (Acquire and
/// Watch streams end, the listeners close; every change was saved when it
/// was made). An engine that refuses to run stops it too, and `done` then
/// ends with [`ServeError::Refused`].
pub async fn start(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let kube = KubeWiring::new(&args.kube, args.store == StoreKind::Kubernetes).await?;
    // TokenReview (agents in a cluster) and mutual TLS (hosts outside it)
    // can both be on: a caller with a client certificate is judged by it,
    // any other by its token.
    let token_review = kube.as_ref().and_then(KubeWiring::authenticator);
    let auth: Arc<dyn Authenticator> =
        match (token_review.clone(), &args.tls.client_ca, args.tls.insecure) {
            (Some(review), Some(_), _) => Arc::new(CertificateOrToken {
                certificates: MutualTls {
                    admin_names: args.tls.admin_names.clone(),
                },
                tokens: review,
            }),
            (Some(review), None, _) => review,
            (None, Some(_), _) => Arc::new(MutualTls {
                admin_names: args.tls.admin_names.clone(),
            }),
            (None, None, true) => {
                warn!(
                    "--insecure: clients are not authenticated; every caller may act for every node"
                );
                Arc::new(Unauthenticated)
            }
            (None, None, false) => return Err(ServeError::NoAuthentication),
        };
    // The rollout policy: flags are the defaults, the file overrides them.
    // An empty window string (`--window ""`, a trailing `;`) is a mistake,
    // not "always": the policy refuses it like any other malformed window.
    let watch_nodes = args.kube.watch_nodes || args.store == StoreKind::Kubernetes;
    let rollout_policy = PolicyHandle::load(
        args.policy.clone(),
        FlagDefaults {
            max_concurrent: args.max_concurrent,
            windows: args.windows.clone(),
            min_window_remaining: args.min_window_remaining,
            overdue_after: args.overdue_after,
            kubernetes: watch_nodes,
        },
        chrono::Utc::now(),
    )?;
    let id = args.id.clone().unwrap_or_else(hostname);
    let config = EngineConfig {
        renew_interval: chrono::Duration::from_std(args.renew_interval)
            .unwrap_or(chrono::Duration::MAX),
        overdue_after: chrono::Duration::from_std(args.overdue_after)
            .unwrap_or(chrono::Duration::MAX),
        prepare_timeout: args.prepare_timeout,
        initialize: args.initialize,
        ..EngineConfig::new(rollout_policy.current().engine_policy.clone(), &id)
    };

    let tls = match (&args.tls.tls_cert, &args.tls.tls_key) {
        (Some(cert), Some(key)) => {
            let mut tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
            if let Some(ca) = &args.tls.client_ca {
                // With TokenReview on, agents in the cluster come without a
                // certificate; one that is presented must still chain to
                // the CA.
                tls = tls
                    .client_ca_root(Certificate::from_pem(read("--client-ca", ca)?))
                    .client_auth_optional(token_review.is_some());
            }
            Some(tls)
        }
        _ => None,
    };

    let store = open_store(&args, &id, kube.as_ref()).await?;
    let metrics = Metrics::new();
    // The etcd quorum guard (when --etcd-endpoints is given) is both a
    // guard and a preparer; it probes etcd and pokes the engine.
    let etcd_guard = crate::etcd::wiring::guard(&args, system_clock())
        .map_err(crate::etcd::wiring::EtcdStoreOpenError::from)?;
    let guards: Vec<Arc<dyn crate::policy::GrantGuard>> =
        etcd_guard.iter().map(|g| g.clone() as _).collect();
    // The node watch's guard (Kubernetes): unknown nodes wait, control-plane
    // nodes by label one at a time.
    // The health gate and alert blockers of the rollout policy (they let
    // everything through while the policy turns them off).
    let gate = HealthGate::new(
        rollout_policy.clone(),
        kube.as_ref().and_then(KubeWiring::node_facts),
        kube.as_ref().map(KubeWiring::client),
    );
    // Pools, zones and order: labels from the node watch in a cluster,
    // from the agents' Acquire calls otherwise.
    let labels = Arc::new(LabelBook::default());
    let rule = Arc::new(PolicyRule::new(
        rollout_policy.clone(),
        kube.as_ref().and_then(KubeWiring::node_facts),
        labels.clone(),
    ));
    let guards = guards
        .into_iter()
        .chain(kube.as_ref().map(KubeWiring::guards).unwrap_or_default())
        .chain([
            rule.clone() as Arc<dyn crate::policy::GrantGuard>,
            gate.clone() as Arc<dyn crate::policy::GrantGuard>,
        ])
        .collect();
    let preparers: Vec<Arc<dyn crate::engine::GrantPreparer>> =
        etcd_guard.iter().map(|g| g.clone() as _).collect();
    let engine = Engine::new(
        store,
        config,
        guards,
        preparers,
        system_clock(),
        metrics.clone(),
    )
    .await?;
    if let Some(guard) = etcd_guard {
        // With the node watch, etcd members also map to nodes by the
        // InternalIPs in their peer and client URLs.
        if let Some(facts) = kube.as_ref().and_then(KubeWiring::node_facts) {
            guard.map_by_internal_ip(facts);
        }
        guard.attach(&engine);
        tokio::spawn(guard.run());
    }
    tokio::spawn(engine.clone().run_granter());
    tokio::spawn(rollout_policy.clone().run(engine.clone()));
    // What acts on the engine's changes: one follower, off its lock.
    let (releases, releases_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(gate.clone().run(engine.clone(), releases_rx));
    // Kubernetes Events (only the leader's are written), the rollout's
    // metrics and the view `batonctl status` shows.
    let events = match &kube {
        Some(kube) => {
            let weak = Arc::downgrade(&engine);
            EventRecorder::start(
                kube.event_target(&id),
                metrics.rollout.clone(),
                Arc::new(move || weak.upgrade().is_some_and(|e| e.leadership().is_leader)),
            )
        }
        None => EventRecorder::disabled(metrics.rollout.clone()),
    };
    Reporter::follow_reloads(&rollout_policy, metrics.rollout.clone(), events.clone());
    let view: ViewHandle = Arc::new(watch::channel(RolloutView::default()).0);
    tokio::spawn(
        Observers {
            policy: rollout_policy.clone(),
            notifier: Notifier::new(rollout_policy.clone(), &id).with_reporting(Reporting {
                metrics: metrics.rollout.clone(),
                events: events.clone(),
            }),
            budget: FailureBudget::default(),
            reporter: Reporter::new(
                rollout_policy.clone(),
                gate,
                rule.clone(),
                metrics.rollout.clone(),
                events,
                view.clone(),
            ),
            rule,
            stuck: StuckLocks::new(
                rollout_policy.clone(),
                kube.as_ref().and_then(KubeWiring::node_facts),
            ),
            releases,
        }
        .run(engine.clone()),
    );
    if let Some(kube) = &kube {
        kube.spawn_tasks(engine.clone());
    }

    let grpc = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    let metrics_listener =
        metrics::bind(args.metrics_listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: args.metrics_listen,
                source,
            })?;
    let grpc_addr = grpc.local_addr().map_err(|source| ServeError::Bind {
        addr: args.listen,
        source,
    })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: args.metrics_listen,
            source,
        })?;
    info!(%grpc_addr, %metrics_addr, id = %id, tls = tls.is_some(), mutual_tls = args.tls.client_ca.is_some(), "coordinator serving");

    // One shutdown signal fans out to the engine and both servers. An
    // engine that refuses to run (missing state, found only once this
    // replica leads) stops the coordinator the same way, with its reason.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let refusal = Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let engine = engine.clone();
        let lease = kube
            .as_ref()
            .and_then(|k| k.lease_release(args.store == StoreKind::Kubernetes, &id));
        let refusal = refusal.clone();
        let mut refused = engine.refused();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => info!("shutting down: ending streams"),
                Ok(reason) = refused.wait_for(Option::is_some) => {
                    let reason = reason.clone().unwrap_or_default();
                    tracing::error!(reason = %reason, "stopping: the coordinator refuses to run");
                    *refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                }
            }
            engine.shutdown().await;
            // Hand leadership over now rather than after the Lease expires.
            if let Some(lease) = lease {
                lease.release().await;
            }
            let _ = stop_tx.send(true);
        });
    }

    let mut services = Services::new(engine.clone(), auth)
        .with_policy(rollout_policy.clone())
        .with_labels(labels)
        .with_rollout_view(view);
    if let Some(backups) = crate::etcd::wiring::backups(&args) {
        services = services.with_backups(backups);
    }
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let grpc_server = builder
        .add_service(CoordinatorServer::new(services.clone()))
        .add_service(AdminServer::new(services))
        .serve_with_incoming_shutdown(incoming(grpc), stopped(stop_rx.clone()));
    let http = metrics::serve(
        metrics_listener,
        metrics::router(engine.clone(), metrics),
        stopped(stop_rx),
    );
    let done = tokio::spawn(async move {
        let (grpc_result, http_result) = tokio::join!(
            grpc_server,
            http.map(|r| r.map_err(|source| ServeError::Bind {
                addr: metrics_addr,
                source,
            }))
        );
        grpc_result?;
        http_result?;
        info!("coordinator stopped");
        match refusal.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(reason) => Err(ServeError::Refused(reason)),
            None => Ok(()),
        }
    });
    Ok(Running {
        grpc_addr,
        metrics_addr,
        engine,
        done,
    })
}

/// Accepted connections with Nagle's algorithm off: a grant is one small
/// frame, and waiting for a delayed ACK would add ~40 ms to every handoff.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "baton-coordinator".to_string())
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}
