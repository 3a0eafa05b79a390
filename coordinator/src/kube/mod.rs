//! The coordinator inside a Kubernetes cluster, on Kubernetes' own
//! primitives (through kube-rs; never kubectl):
//! - [`election`]: leader election on a coordination.k8s.io/v1 Lease (the
//!   pure step function and the loop that renews or takes over);
//! - [`store`]: `--store kubernetes`: the lease state in a ConfigMap
//!   written with resourceVersion compare-and-swap, leadership from the
//!   Lease;
//! - [`nodes`]: a watch on Nodes: NotReady nodes count against the
//!   concurrency limit, control-plane nodes (node-role label) go one at a
//!   time, unknown nodes wait;
//! - [`events`]: Kubernetes Events from the leader, on Nodes and on the
//!   Lease;
//! - [`token_review`]: agents authenticate with a projected ServiceAccount
//!   token (audience `baton`), checked with a TokenReview and bound to the
//!   node their pod runs on.
//!
//! [`KubeWiring`] builds the pieces `serve` needs from [`KubeArgs`].

pub mod election;
pub mod events;
pub mod nodes;
pub mod store;
pub mod token_review;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;

use crate::auth::Authenticator;
use crate::engine::Engine;
use crate::policy::GrantGuard;
use crate::store::StateStore;

/// Flags of the coordinator's Kubernetes integration.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Namespace of the Lease, the state object and the agents' pods.
    #[arg(
        long = "kube-namespace",
        env = "BATON_KUBE_NAMESPACE",
        default_value = "baton-system"
    )]
    pub namespace: String,
    /// Name of the coordination.k8s.io/v1 Lease the replicas elect a leader on.
    #[arg(long, env = "BATON_LEASE_NAME", default_value = "baton-coordinator")]
    pub lease_name: String,
    /// Name of the ConfigMap holding the lease state (`--store kubernetes`).
    #[arg(long, env = "BATON_STATE_CONFIGMAP", default_value = "baton-state")]
    pub state_configmap: String,
    /// How long a leader's Lease stays valid without renewal.
    #[arg(long, env = "BATON_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down (shorter than
    /// --lease-duration, so it stops before another replica may take over).
    #[arg(long, env = "BATON_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,
    /// How often the Lease is renewed or checked.
    #[arg(long, env = "BATON_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,
    /// Watch Nodes even without `--store kubernetes` (implied by it).
    #[arg(long, env = "BATON_WATCH_NODES")]
    pub watch_nodes: bool,
    /// Do not count NotReady nodes against the concurrency limit (a
    /// NotReady control-plane node still holds back other control-plane
    /// nodes).
    #[arg(long, env = "BATON_IGNORE_NOTREADY_NODES")]
    pub ignore_notready_nodes: bool,
    /// Node facts not confirmed by a successful list or watch event for
    /// this long are unknown, and unknown facts hold every grant back.
    #[arg(long, env = "BATON_NODE_FACTS_MAX_AGE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub node_facts_max_age: Duration,
    /// Authenticate agents with ServiceAccount tokens checked by TokenReview.
    #[arg(long, env = "BATON_TOKEN_REVIEW")]
    pub token_review: bool,
    /// The agents' ServiceAccount (in --kube-namespace).
    #[arg(
        long,
        env = "BATON_AGENT_SERVICE_ACCOUNT",
        default_value = "baton-agent"
    )]
    pub agent_service_account: String,
    /// The audience agent tokens must be issued for.
    #[arg(long, env = "BATON_TOKEN_AUDIENCE", default_value = "baton")]
    pub token_audience: String,
    /// The node this replica runs on (downward API `spec.nodeName`). While
    /// that node holds the baton this replica hands leadership to another,
    /// so the node can be drained (only the leader is Ready, and the
    /// coordinators' disruption budget protects Ready pods).
    #[arg(long = "node-name", env = "BATON_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes user names (e.g.
    /// `system:serviceaccount:baton-system:batonctl`) that may act for any
    /// node and pause, resume and force-release (repeatable).
    #[arg(long = "kube-admin", env = "BATON_KUBE_ADMINS", value_delimiter = ',')]
    pub admins: Vec<String>,
    /// Talk to this API server URL without credentials (e.g. `kubectl
    /// proxy`); default: in-cluster configuration or KUBECONFIG.
    #[arg(long, env = "BATON_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
}

/// Why the Kubernetes integration could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSetupError {
    /// No usable client configuration.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The lease timings cannot work (two replicas could lead at once).
    #[error(transparent)]
    Timings(#[from] election::TimingsError),
}

impl KubeArgs {
    /// The election's timings per these flags.
    pub fn timings(&self) -> election::Timings {
        election::Timings {
            duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        }
    }

    /// A client per these flags. kube's own retry of 429/503 is off:
    /// the election must notice an unreachable API server within its renew
    /// deadline, and every caller here retries with its own bound.
    pub async fn client(&self) -> Result<::kube::Client, KubeSetupError> {
        let mut config = match &self.kube_api_url {
            Some(url) => ::kube::Config::new(
                url.parse()
                    .map_err(|e| KubeSetupError::Config(format!("--kube-api-url {url}: {e}")))?,
            ),
            None => ::kube::Config::infer().await.map_err(|e| {
                KubeSetupError::Config(format!(
                    "{e}; in a pod the ServiceAccount's token is mounted automatically (is automountServiceAccountToken off?), elsewhere set KUBECONFIG or --kube-api-url"
                ))
            })?,
        };
        config.default_retry = false;
        ::kube::Client::try_from(config).map_err(|e| KubeSetupError::Config(e.to_string()))
    }
}

/// The Kubernetes pieces of one coordinator.
pub struct KubeWiring {
    client: ::kube::Client,
    args: KubeArgs,
    facts: Option<Arc<nodes::NodeFacts>>,
    /// Set while this replica's own node holds the baton.
    yielding: Arc<AtomicBool>,
}

impl KubeWiring {
    /// Builds the wiring when anything Kubernetes is enabled (`store`
    /// says whether the state lives in Kubernetes).
    pub async fn new(args: &KubeArgs, store: bool) -> Result<Option<Self>, KubeSetupError> {
        let watch_nodes = args.watch_nodes || store;
        if !(watch_nodes || args.token_review) {
            return Ok(None);
        }
        if store {
            args.timings().validate()?;
        }
        Ok(Some(Self {
            client: args.client().await?,
            args: args.clone(),
            facts: watch_nodes.then(|| Arc::new(nodes::NodeFacts::new(args.node_facts_max_age))),
            yielding: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// The Kubernetes client.
    pub fn client(&self) -> ::kube::Client {
        self.client.clone()
    }

    /// Where this replica's Events go (the namespace and Lease of
    /// `--kube-namespace` and `--lease-name`).
    pub fn event_target(&self, id: &str) -> events::EventTarget {
        events::EventTarget {
            client: self.client.clone(),
            namespace: self.args.namespace.clone(),
            lease_name: self.args.lease_name.clone(),
            instance: id.to_string(),
        }
    }

    /// The TokenReview authenticator, when `--token-review` is set.
    pub fn authenticator(&self) -> Option<Arc<dyn Authenticator>> {
        self.args.token_review.then(|| {
            Arc::new(token_review::TokenReviewAuth::new(
                self.client.clone(),
                &self.args,
            )) as Arc<dyn Authenticator>
        })
    }

    /// The Kubernetes state store; starts the election.
    pub fn store(&self, id: &str) -> Arc<dyn StateStore> {
        Arc::new(store::KubeStore::start(
            self.client.clone(),
            &self.args,
            id,
            self.yielding.clone(),
        ))
    }

    /// What releases the Lease on shutdown (`--store kubernetes` only).
    pub fn lease_release(&self, store: bool, id: &str) -> Option<LeaseRelease> {
        store.then(|| LeaseRelease {
            api: ::kube::Api::namespaced(self.client.clone(), &self.args.namespace),
            name: self.args.lease_name.clone(),
            id: id.to_string(),
            yielding: self.yielding.clone(),
        })
    }

    /// The node facts the watch keeps (the etcd guard maps members to
    /// nodes by their InternalIPs), when nodes are watched.
    pub fn node_facts(&self) -> Option<Arc<nodes::NodeFacts>> {
        self.facts.clone()
    }

    /// Guards fed by the node watch.
    pub fn guards(&self) -> Vec<Arc<dyn GrantGuard>> {
        self.facts
            .iter()
            .map(|f| Arc::new(nodes::NodeGuard::new(f.clone())) as Arc<dyn GrantGuard>)
            .collect()
    }

    /// Starts the node watch feeding `engine` (if nodes are watched) and,
    /// with `--node-name`, the task that makes this replica yield
    /// leadership while its own node holds the baton.
    pub fn spawn_tasks(&self, engine: Arc<Engine>) {
        if let Some(facts) = &self.facts {
            tokio::spawn(nodes::watch_nodes(
                self.client.clone(),
                facts.clone(),
                engine.clone(),
                self.args.ignore_notready_nodes,
            ));
        }
        if let Some(node) = self.args.node_name.clone() {
            tokio::spawn(follow_own_node(engine, node, self.yielding.clone()));
        }
    }
}

/// Hands leadership over on a clean shutdown.
pub struct LeaseRelease {
    api: ::kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    name: String,
    id: String,
    yielding: Arc<AtomicBool>,
}

impl LeaseRelease {
    /// Stops this replica from leading again and releases the Lease if it
    /// holds it. Failures are logged: the Lease then simply expires.
    pub async fn release(&self) {
        self.yielding.store(true, Ordering::SeqCst);
        if let Err(e) = election::release(&self.api, &self.name, &self.id).await {
            tracing::warn!(error = %e, lease = %self.name, "could not release the lease; it will expire");
        }
    }
}

/// Keeps `yielding` equal to "`node` holds the baton" as this replica's
/// engine last knew it.
async fn follow_own_node(engine: Arc<Engine>, node: String, yielding: Arc<AtomicBool>) {
    let mut changes = engine.subscribe();
    loop {
        let holds = engine
            .snapshot()
            .await
            .state
            .holders
            .keys()
            .any(|n| n.as_str() == node);
        if yielding.swap(holds, Ordering::SeqCst) != holds {
            tracing::info!(node = %node, yielding = holds, "own node's baton changed");
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
