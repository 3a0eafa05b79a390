//! The `Coordinator` boundary: the agent's side of `baton.v1.Coordinator`.
//!
//! [`GrpcCoordinator`] is the tonic client; this module is also where gRPC
//! status codes become [`CoordinatorError`] variants: FAILED_PRECONDITION
//! means the fencing token is stale ([`CoordinatorError::Fenced`]), everything
//! else is worth retrying.

use crate::phase::Phase;
use baton_proto::v1::{
    AcquireRequest, ReleaseRequest, RenewRequest, ReportRequest, acquire_event,
    coordinator_client::CoordinatorClient,
};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Errors of coordinator calls.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The coordinator refused our fencing token: the baton is not ours.
    #[error("fencing token refused: {0}")]
    Fenced(String),
    /// The call failed in a way that may succeed later (unavailable,
    /// follower, network).
    #[error("coordinator call failed: {0}")]
    Call(String),
    /// The endpoint or TLS settings are invalid.
    #[error("coordinator settings: {0}")]
    Config(String),
}

impl From<tonic::Status> for CoordinatorError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::FailedPrecondition => CoordinatorError::Fenced(status.message().into()),
            code => CoordinatorError::Call(format!("{code:?}: {}", status.message())),
        }
    }
}

/// A grant received from Acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token to carry on every later call.
    pub fencing_token: u64,
    /// True when the node already held the baton.
    pub resumed: bool,
    /// How often the coordinator wants renewals (None: not told).
    pub renew_interval: Option<Duration>,
}

/// One progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The phase now.
    pub phase: Phase,
    /// The node's current boot_id.
    pub boot_id: String,
    /// Free-form progress.
    pub message: String,
    /// The error, when failed.
    pub error: String,
}

/// The coordinator, as the agent uses it.
#[allow(async_fn_in_trait)] // used with generics only, never boxed
pub trait Coordinator {
    /// Ask for the baton. With `wait`, wait until it is granted; without,
    /// return None as soon as the coordinator says the node is queued (the
    /// request is then withdrawn), which tells an agent that lost its state
    /// whether it holds the baton. Dropping the future withdraws the request.
    async fn acquire(&self, reason: &str, wait: bool) -> Result<Option<Grant>, CoordinatorError>;
    /// Keep the baton alive.
    async fn renew(&self, fencing_token: u64) -> Result<(), CoordinatorError>;
    /// Record progress.
    async fn report(&self, fencing_token: u64, report: &Report) -> Result<(), CoordinatorError>;
    /// Give the baton back.
    async fn release(&self, fencing_token: u64, reason: &str) -> Result<(), CoordinatorError>;
}

/// TLS material for mutual TLS (PEM file contents).
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed the coordinator's certificate.
    pub ca: Vec<u8>,
    /// The agent's certificate.
    pub cert: Vec<u8>,
    /// The agent's key.
    pub key: Vec<u8>,
}

/// The gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    node: String,
    control_plane: bool,
    client: CoordinatorClient<Channel>,
}

impl GrpcCoordinator {
    /// A lazily connecting client for `node` (connections are made, and
    /// remade, on use).
    pub fn new(
        url: &str,
        tls: Option<Tls>,
        node: &str,
        control_plane: bool,
    ) -> Result<Self, CoordinatorError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| CoordinatorError::Config(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tls.ca))
                .identity(Identity::from_pem(tls.cert, tls.key));
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        }
        Ok(GrpcCoordinator {
            node: node.to_string(),
            control_plane,
            client: CoordinatorClient::new(endpoint.connect_lazy()),
        })
    }
}

fn call_error(e: tonic::Status) -> CoordinatorError {
    e.into()
}

impl Coordinator for GrpcCoordinator {
    async fn acquire(&self, reason: &str, wait: bool) -> Result<Option<Grant>, CoordinatorError> {
        let request = AcquireRequest {
            node: self.node.clone(),
            control_plane: self.control_plane,
            reason: reason.to_string(),
            manual: false,
        };
        tracing::info!(node = %self.node, reason, "acquire sent");
        let mut stream = self
            .client
            .clone()
            .acquire(request)
            .await
            .map_err(call_error)?
            .into_inner();
        while let Some(event) = stream.message().await.map_err(call_error)? {
            match event.event {
                Some(acquire_event::Event::Queued(q)) => {
                    tracing::info!(node = %self.node, position = q.position, queue_length = q.queue_length, reason = %q.reason, "queued");
                    if !wait {
                        return Ok(None);
                    }
                }
                Some(acquire_event::Event::Granted(g)) => {
                    let renew_interval = g
                        .lease
                        .and_then(|l| l.renew_interval)
                        .and_then(|d| Duration::try_from(d).ok());
                    return Ok(Some(Grant {
                        fencing_token: g.fencing_token,
                        resumed: g.resumed,
                        renew_interval,
                    }));
                }
                None => {}
            }
        }
        Err(CoordinatorError::Call(
            "acquire stream ended without a grant".into(),
        ))
    }

    async fn renew(&self, fencing_token: u64) -> Result<(), CoordinatorError> {
        self.client
            .clone()
            .renew(RenewRequest {
                node: self.node.clone(),
                fencing_token,
            })
            .await
            .map_err(call_error)?;
        Ok(())
    }

    async fn report(&self, fencing_token: u64, report: &Report) -> Result<(), CoordinatorError> {
        self.client
            .clone()
            .report(ReportRequest {
                node: self.node.clone(),
                fencing_token,
                phase: report.phase.to_proto() as i32,
                boot_id: report.boot_id.clone(),
                message: report.message.clone(),
                error: report.error.clone(),
            })
            .await
            .map_err(call_error)?;
        Ok(())
    }

    async fn release(&self, fencing_token: u64, reason: &str) -> Result<(), CoordinatorError> {
        self.client
            .clone()
            .release(ReleaseRequest {
                node: self.node.clone(),
                fencing_token,
                reason: reason.to_string(),
            })
            .await
            .map_err(call_error)?;
        Ok(())
    }
}
