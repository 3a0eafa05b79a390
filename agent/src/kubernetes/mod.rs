//! Kubernetes node operations of the agent (`--mode kubernetes`), through
//! kube-rs only (never kubectl).
//!
//! [`KubeNodeOps`] is the one boundary: `cordon`, `drain`, `uncordon`,
//! `abort`, `wait_ready`, `annotate`, `set_holding`, `record_event` and
//! `blocking_pods`, each named after what it does to the node. Layout:
//! - [`plan`]: pure: which pods a drain evicts, skips, waits for or refuses;
//! - [`node`]: cordon and uncordon (remembering whether the node was
//!   cordoned before Baton touched it), annotations, the holding label and
//!   waiting for Ready after a reboot;
//! - [`drain`]: evictions through policy/v1 with bounded parallelism, PDB
//!   429s retried with backoff until the drain timeout, then waiting for the
//!   evicted pods to be gone (their grace periods are honoured, never cut);
//! - [`events`]: a Kubernetes Event on the Node per transition, and the
//!   blocking-pod check;
//! - [`node_ops`]: all of it as the agent's `NodeOps` (prepare, wait ready,
//!   finish, abort, phase changes shown, blocking pods);
//! - [`visibility`]: pure: the annotations and Event of each phase change.
//!
//! Every operation is idempotent, so an agent restarted at any point can
//! repeat the step it was in. API calls that fail transiently (429, 5xx,
//! a connection that broke or timed out) are retried with backoff for up
//! to [`API_RETRY_BUDGET`] (a readiness wait for up to its own timeout)
//! instead of failing the maintenance on the first error.

pub mod drain;
pub mod events;
pub mod node;
pub mod node_ops;
pub mod plan;
pub mod visibility;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::{Api, Client};

pub use drain::DrainReport;
pub use events::Transition;
pub use node::{CordonOutcome, NodeAnnotations, UncordonOutcome};
pub use plan::{Allowances, DrainPlan, PodRef, Refusal, Skip};

/// The prefix of every annotation and label Baton writes.
pub const PREFIX: &str = "baton.dev/";

/// Flags of `--mode kubernetes` (flatten into the agent's CLI).
#[derive(Clone, Debug, clap::Args)]
pub struct KubernetesArgs {
    /// Give up draining after this long; the maintenance is aborted (the
    /// node uncordoned unless it was cordoned before) unless
    /// --force-reboot-on-drain-timeout is set.
    #[arg(long, env = "BATON_DRAIN_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Reboot even when the drain timed out (explicit opt-out of aborting).
    #[arg(long, env = "BATON_FORCE_REBOOT_ON_DRAIN_TIMEOUT")]
    pub force_reboot_on_drain_timeout: bool,
    /// How many evictions run at once.
    #[arg(long, env = "BATON_DRAIN_PARALLELISM", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub drain_parallelism: u32,
    /// Only evict pods matching this label selector (others are left running).
    #[arg(long, env = "BATON_DRAIN_POD_SELECTOR")]
    pub drain_pod_selector: Option<String>,
    /// Evict pods with emptyDir volumes (their data is lost).
    #[arg(long, env = "BATON_DELETE_EMPTYDIR_DATA")]
    pub delete_emptydir_data: bool,
    /// Evict pods no controller manages (they are not recreated).
    #[arg(long, env = "BATON_EVICT_UNMANAGED_PODS")]
    pub evict_unmanaged_pods: bool,
    /// While a pod matching this label selector runs on the node, do not ask
    /// for the baton (repeatable).
    #[arg(
        long = "blocking-pod-selector",
        env = "BATON_BLOCKING_POD_SELECTORS",
        value_delimiter = ';'
    )]
    pub blocking_pod_selectors: Vec<String>,
    /// How long to wait for the node to be Ready after a reboot.
    #[arg(long, env = "BATON_NODE_READY_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub node_ready_timeout: Duration,
    /// Namespace the node Events are written to.
    #[arg(long, env = "BATON_EVENT_NAMESPACE", default_value = "default")]
    pub event_namespace: String,
    /// Talk to this API server URL without credentials (e.g. `kubectl
    /// proxy`); default: in-cluster configuration or KUBECONFIG.
    #[arg(long, env = "BATON_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
}

impl Default for KubernetesArgs {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(600),
            force_reboot_on_drain_timeout: false,
            drain_parallelism: 5,
            drain_pod_selector: None,
            delete_emptydir_data: false,
            evict_unmanaged_pods: false,
            blocking_pod_selectors: Vec::new(),
            node_ready_timeout: Duration::from_secs(900),
            event_namespace: "default".to_string(),
            kube_api_url: None,
        }
    }
}

impl KubernetesArgs {
    /// A client per these flags: `--kube-api-url`, else inferred
    /// (in-cluster service account, else KUBECONFIG). The client's own
    /// retry of 429/503 answers is off: the drain must see every
    /// disruption-budget refusal to keep to `--drain-timeout`, and every
    /// caller here retries with its own bound.
    pub async fn client(&self) -> Result<Client, KubeError> {
        let mut config = match &self.kube_api_url {
            Some(url) => kube::Config::new(
                url.parse()
                    .map_err(|e| KubeError::Config(format!("--kube-api-url {url}: {e}")))?,
            ),
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        config.default_retry = false;
        Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The client could not be configured.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// An API call failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The error.
        source: kube::Error,
    },
    /// The node object does not exist.
    #[error("node {0} does not exist in the cluster")]
    NodeMissing(String),
    /// Pods on the node may not be evicted without an explicit flag; nothing
    /// was evicted.
    #[error("drain refused, nothing was evicted: {}", .0.join("; "))]
    DrainRefused(Vec<String>),
    /// The drain did not finish in time; these pods were still there.
    #[error("drain timed out after {}: still waiting for {}", humantime::format_duration(*timeout), pending.join(", "))]
    DrainTimeout {
        /// The --drain-timeout.
        timeout: Duration,
        /// Pods not evicted or not gone yet, each with why.
        pending: Vec<String>,
    },
    /// The node did not become Ready in time after the reboot.
    #[error("node {node} not Ready after {}: {detail}", humantime::format_duration(*timeout))]
    NotReady {
        /// The node.
        node: String,
        /// The timeout.
        timeout: Duration,
        /// The last condition seen.
        detail: String,
    },
    /// Another writer kept changing the node; the update was not applied.
    #[error("node {0} kept changing under us (resourceVersion conflicts); not applied")]
    Conflict(String),
}

impl KubeError {
    pub(crate) fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let action = action.into();
        move |source| KubeError::Api { action, source }
    }
}

/// How long one API call (read or write of the node, a list of pods) is
/// retried through transient errors before it fails.
pub const API_RETRY_BUDGET: Duration = Duration::from_secs(120);

/// The first pause after a transient error; doubled up to
/// [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(250);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// True for errors that may go away by themselves: the API server was
/// overloaded or unavailable (429, 5xx), or the request or its answer was
/// lost on the way.
pub(crate) fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Run `call` until it succeeds, fails for good, or still fails
/// transiently after [`API_RETRY_BUDGET`].
pub(crate) async fn retrying<T, Fut>(
    node: &str,
    action: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<T, kube::Error>
where
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let deadline = tokio::time::Instant::now() + API_RETRY_BUDGET;
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        match call().await {
            Err(e) if is_transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(node, action, error = %e, "transient API error; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// The API status code of a kube error, if it is one.
pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The Kubernetes operations on one node.
#[derive(Clone)]
pub struct KubeNodeOps {
    client: Client,
    node: String,
    args: KubernetesArgs,
    nodes: Api<Node>,
    events: Api<Event>,
}

impl KubeNodeOps {
    /// Operations on `node` through `client`.
    pub fn new(client: Client, node: impl Into<String>, args: KubernetesArgs) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client.clone(), &args.event_namespace),
            client,
            node: node.into(),
            args,
        }
    }

    /// The node operated on.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The flags in use.
    pub fn args(&self) -> &KubernetesArgs {
        &self.args
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn all_pods(&self) -> Api<Pod> {
        Api::all(self.client.clone())
    }
}
