//! `batonctl --kube` (and `kubectl baton`): reach the leading coordinator
//! through the Kubernetes API, so an operator needs nothing but a
//! kubeconfig: no network path to the coordinator's gRPC port.
//!
//! 1. The leader is the pod the coordinators' Lease names
//!    (`--kube-lease`; its holderIdentity is the pod name, `BATON_ID`).
//! 2. Every gRPC connection is a port-forward to that pod's `grpc` port
//!    (kube-rs, the WebSocket `v4.channel.k8s.io` subprotocol), used as the
//!    transport of a tonic channel through a custom connector.
//! 3. TLS inside the tunnel, as the Service would see it: the server name
//!    `baton-coordinator.NAMESPACE.svc`, the CA from `--ca` or the
//!    ConfigMap `baton-coordinator-ca` (`ca.crt`; public, so operators
//!    need no access to the TLS Secret and its key).
//! 4. Identity: a short-lived token of the ServiceAccount `batonctl`
//!    (audience `baton`), requested with the user's own Kubernetes
//!    identity (TokenRequest), sent as a bearer token; the coordinator's
//!    TokenReview and `--kube-admin system:serviceaccount:NS:batonctl`
//!    make it an admin. Who may run batonctl is RBAC on that ServiceAccount's
//!    `token` subresource (manifests/rbac-batonctl.yaml).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long the requested ServiceAccount token lives (the API's minimum).
const TOKEN_SECONDS: i64 = 600;
/// The coordinator's gRPC port when its pod does not name one `grpc`.
const DEFAULT_GRPC_PORT: u16 = 7443;

/// `--kube` and its settings.
#[derive(Debug, Clone, Args)]
pub struct KubeConnection {
    /// Reach the leading coordinator through the Kubernetes API
    /// (port-forward with your kubeconfig) instead of --coordinator.
    #[arg(long, global = true, env = "BATON_KUBE")]
    pub kube: bool,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true, env = "BATON_KUBE_CONTEXT")]
    pub kube_context: Option<String>,
    /// The namespace Baton is installed in.
    #[arg(
        long,
        global = true,
        env = "BATON_KUBE_NAMESPACE",
        default_value = "baton-system"
    )]
    pub kube_namespace: String,
    /// The Lease the coordinators elect their leader on.
    #[arg(
        long,
        global = true,
        env = "BATON_KUBE_LEASE",
        default_value = "baton-coordinator"
    )]
    pub kube_lease: String,
    /// The ServiceAccount whose token batonctl presents (the coordinator's
    /// --kube-admin names it).
    #[arg(
        long,
        global = true,
        env = "BATON_KUBE_SERVICE_ACCOUNT",
        default_value = "batonctl"
    )]
    pub kube_service_account: String,
    /// The audience of that token (the coordinator's --token-audience).
    #[arg(
        long,
        global = true,
        env = "BATON_KUBE_TOKEN_AUDIENCE",
        default_value = "baton"
    )]
    pub kube_token_audience: String,
    /// The ConfigMap whose `ca.crt` the coordinator's certificate chains to
    /// (read when --ca is not given; public, unlike the TLS Secret).
    #[arg(
        long,
        global = true,
        env = "BATON_KUBE_CA_CONFIGMAP",
        default_value = "baton-coordinator-ca"
    )]
    pub kube_ca_configmap: String,
    /// The name the coordinator's certificate must carry (default:
    /// baton-coordinator.NAMESPACE.svc, the Service's name).
    #[arg(long, global = true, env = "BATON_KUBE_SERVER_NAME")]
    pub kube_server_name: Option<String>,
}

/// What batonctl talks to after `connect`.
pub struct KubeChannel {
    /// The gRPC channel over port-forwards.
    pub channel: Channel,
    /// The bearer token to present (the ServiceAccount's).
    pub token: Option<String>,
}

/// The client for the user's kubeconfig (or in-cluster configuration).
async fn client(kube: &KubeConnection) -> anyhow::Result<Client> {
    let config = match &kube.kube_context {
        Some(context) => {
            let options = KubeConfigOptions {
                context: Some(context.clone()),
                ..KubeConfigOptions::default()
            };
            let kubeconfig = Kubeconfig::read().context(
                "reading your kubeconfig (KUBECONFIG or ~/.kube/config) for --kube-context",
            )?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("using kubeconfig context {context:?}"))?
        }
        None => Config::infer().await.context(
            "no Kubernetes configuration: set KUBECONFIG or ~/.kube/config (as for kubectl), or run in a pod",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client from your kubeconfig")
}

/// Explains an API error with what to do about it.
fn api_error(error: kube::Error, what: &str, fix: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 403 => anyhow::anyhow!(
            "{what}: forbidden for your Kubernetes identity ({}); {fix}",
            status.message
        ),
        kube::Error::Api(status) if status.code == 404 => {
            anyhow::anyhow!("{what}: not found ({}); {fix}", status.message)
        }
        _ => anyhow::Error::new(error).context(format!(
            "{what} (is the API server in your kubeconfig reachable?)"
        )),
    }
}

/// The pod the Lease names as leader, and its gRPC port.
async fn leader(client: &Client, kube: &KubeConnection) -> anyhow::Result<(String, u16)> {
    let ns = &kube.kube_namespace;
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get(&kube.kube_lease)
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!("reading the Lease {ns}/{}", kube.kube_lease),
                "is Baton installed in this namespace (--kube-namespace) and may you get leases there (Role baton-operator)?",
            )
        })?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .with_context(|| {
            format!(
                "no coordinator leads: the Lease {ns}/{} has no holder; check `kubectl -n {ns} get pods` and the coordinators' logs",
                kube.kube_lease
            )
        })?;
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get(&holder)
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!("reading the leading coordinator's pod {ns}/{holder}"),
                "a failover may be under way: retry in a few seconds",
            )
        })?;
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase != "Running" {
        bail!(
            "the leading coordinator's pod {ns}/{holder} is not running (phase {phase:?}); retry once a coordinator leads"
        );
    }
    let port = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_GRPC_PORT);
    Ok((holder, port))
}

/// A short-lived token of the batonctl ServiceAccount.
async fn token(client: &Client, kube: &KubeConnection) -> anyhow::Result<String> {
    let ns = &kube.kube_namespace;
    let sa = &kube.kube_service_account;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![kube.kube_token_audience.clone()]),
            expiration_seconds: Some(TOKEN_SECONDS),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!("requesting a token of ServiceAccount {ns}/{sa}"),
                &format!(
                    "apply manifests/ (it creates the ServiceAccount and the Role baton-operator) and bind the Role to you: kubectl -n {ns} create rolebinding baton-operator-$USER --role=baton-operator --user=YOUR_USER"
                ),
            )
        })?;
    issued
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("the API server answered the TokenRequest without a token")
}

/// The CA bundle the coordinator's certificate chains to: `--ca`, else the
/// `ca.crt` of the ConfigMap the install publishes it in.
async fn ca(
    client: &Client,
    kube: &KubeConnection,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = ca_file {
        return std::fs::read(path).with_context(|| format!("reading --ca {}", path.display()));
    }
    let ns = &kube.kube_namespace;
    let name = &kube.kube_ca_configmap;
    let fix = format!(
        "publish the CA the coordinator's certificate chains to: kubectl -n {ns} create configmap {name} --from-file=ca.crt=ca.pem (or pass --ca FILE)"
    );
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!("reading the coordinator's CA from ConfigMap {ns}/{name}"),
                &fix,
            )
        })?;
    config_map
        .data
        .and_then(|mut d| d.remove("ca.crt"))
        .filter(|pem| !pem.trim().is_empty())
        .map(String::into_bytes)
        .with_context(|| format!("ConfigMap {ns}/{name} has no ca.crt; {fix}"))
}

/// What the API server (the kubelet) says on the error channel of a fresh
/// port-forward to `pod`, if anything within a second. Used to explain a
/// failed connection: nothing is written, so the message cannot be lost to
/// a write racing the server's close.
async fn forward_error(pods: &Api<Pod>, pod: &str, port: u16) -> Option<String> {
    let mut forwarder = pods.portforward(pod, &[port]).await.ok()?;
    let error = forwarder.take_error(port)?;
    let _unused = forwarder.take_stream(port);
    tokio::time::timeout(Duration::from_secs(1), error)
        .await
        .ok()
        .flatten()
}

/// Connects to the leading coordinator through a port-forward.
/// `plaintext` (--insecure) skips TLS inside the tunnel (labs whose
/// coordinator serves plaintext); `identity` (--cert/--key) is presented
/// in TLS instead of a ServiceAccount token.
pub async fn connect(
    kube: &KubeConnection,
    plaintext: bool,
    ca_file: Option<&std::path::Path>,
    identity: Option<Identity>,
) -> anyhow::Result<KubeChannel> {
    let client = client(kube).await?;
    let (pod, port) = leader(&client, kube).await?;
    let ns = kube.kube_namespace.clone();
    let server_name = kube
        .kube_server_name
        .clone()
        .unwrap_or_else(|| format!("baton-coordinator.{ns}.svc"));
    let token = match identity {
        Some(_) => None,
        None => Some(token(&client, kube).await?),
    };
    let scheme = if plaintext { "http" } else { "https" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{server_name}:{port}"))
        .with_context(|| format!("{server_name:?} is not a host name (--kube-server-name)"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if !plaintext {
        let mut tls = ClientTlsConfig::new()
            .domain_name(server_name.clone())
            .ca_certificate(Certificate::from_pem(ca(&client, kube, ca_file).await?));
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let forwards = pods.clone();
    let target = pod.clone();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let pods = forwards.clone();
        let pod = target.clone();
        async move {
            let mut forwarder = pods.portforward(&pod, &[port]).await.map_err(|e| {
                format!("port-forward to pod {pod} port {port} failed: {e} (may you create pods/portforward? Role baton-operator)")
            })?;
            let stream = forwarder.take_stream(port).ok_or_else(|| {
                format!("port-forward to pod {pod} gave no stream for port {port}")
            })?;
            Ok::<_, String>(TokioIo::new(stream))
        }
    });
    let channel = match endpoint.connect_with_connector(connector).await {
        Ok(channel) => channel,
        Err(e) => {
            let mut message = format!(
                "connecting to the leading coordinator, pod {ns}/{pod} port {port}, through the Kubernetes API: {e}"
            );
            let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            if let Some(said) = forward_error(&pods, &pod, port).await {
                message.push_str(&format!(" (the API server said: {said})"));
            }
            bail!(message);
        }
    };
    Ok(KubeChannel { channel, token })
}
