//! The `Coordinator` boundary: the agent's side of `baton.v1.Coordinator`.
//!
//! [`GrpcCoordinator`] is the tonic client; this module is also where gRPC
//! status codes become [`CoordinatorError`] variants: FAILED_PRECONDITION
//! means the fencing token is stale ([`CoordinatorError::Fenced`]), everything
//! else is worth retrying.
//!
//! Authentication is mutual TLS ([`Tls`] with a client identity) or a
//! bearer token read from a file ([`BearerToken`], a tonic interceptor that
//! re-reads the file when it changes, since projected ServiceAccount tokens
//! rotate) over server-authenticated TLS or, in labs, plain text.

use crate::phase::Phase;
use baton_proto::v1::{
    AcquireRequest, ReleaseRequest, RenewRequest, ReportRequest, acquire_event,
    coordinator_client::CoordinatorClient,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
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

/// TLS material (PEM file contents): the coordinator's CA, and the agent's
/// own certificate and key for mutual TLS.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed the coordinator's certificate.
    pub ca: Vec<u8>,
    /// The agent's certificate and key (None: server TLS only, the agent
    /// authenticates with a bearer token).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Adds `authorization: Bearer <token>` to every call, the token read from
/// a file. The file is re-read whenever its modification time or length
/// changes (kubelet rewrites a projected token well before it expires), so
/// a rotated token is used from the next call on. Without a file the
/// interceptor passes calls through unchanged.
#[derive(Debug, Clone, Default)]
pub struct BearerToken {
    file: Option<Arc<TokenFile>>,
}

#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    /// The last token read and the file's (mtime, len) when it was read.
    cache: Mutex<Option<CachedToken>>,
}

/// A header value and the file stamp it was read at.
type CachedToken = ((SystemTime, u64), AuthHeader);

/// The `authorization` header value.
type AuthHeader = MetadataValue<tonic::metadata::Ascii>;

impl BearerToken {
    /// No token: calls go out as they are (mutual TLS, or a lab).
    pub fn none() -> Self {
        Self::default()
    }

    /// The token in `path`, read on first use and again when it changes.
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        BearerToken {
            file: Some(Arc::new(TokenFile {
                path: path.into(),
                cache: Mutex::new(None),
            })),
        }
    }

    /// The header value to send now (None without a file). A missing,
    /// empty or unreadable file is an UNAVAILABLE status: the call fails
    /// and is retried like any other, by which time kubelet may have
    /// written the token.
    pub fn header(&self) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, tonic::Status> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        file.header().map(Some)
    }
}

impl TokenFile {
    fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, tonic::Status> {
        let unavailable = |what: &str| {
            tonic::Status::unavailable(format!("token file {}: {what}", self.path.display()))
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| unavailable(&e.to_string()))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, value)) = cache.as_ref()
            && *seen == stamp
        {
            return Ok(value.clone());
        }
        let token = read_token(&self.path).map_err(|e| unavailable(&e))?;
        let value: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| unavailable("the token is not a valid header value"))?;
        tracing::debug!(path = %self.path.display(), "bearer token (re)read");
        *cache = Some((stamp, value.clone()));
        Ok(value)
    }
}

fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("empty".into());
    }
    Ok(token.to_string())
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = self.header()? {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    node: String,
    control_plane: bool,
    labels: std::collections::HashMap<String, String>,
    client: CoordinatorClient<InterceptedService<Channel, BearerToken>>,
}

impl GrpcCoordinator {
    /// A lazily connecting client for `node` (connections are made, and
    /// remade, on use) that sends `token` (if any) on every call.
    pub fn new(
        url: &str,
        tls: Option<Tls>,
        token: BearerToken,
        node: &str,
        control_plane: bool,
    ) -> Result<Self, CoordinatorError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| CoordinatorError::Config(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        }
        Ok(GrpcCoordinator {
            node: node.to_string(),
            control_plane,
            labels: Default::default(),
            client: CoordinatorClient::with_interceptor(endpoint.connect_lazy(), token),
        })
    }
}

impl GrpcCoordinator {
    /// Sends `labels` with every Acquire (for the coordinator's policy).
    pub fn with_labels(mut self, labels: impl IntoIterator<Item = (String, String)>) -> Self {
        self.labels = labels.into_iter().collect();
        self
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
            labels: self.labels.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_of(token: &mut BearerToken) -> Result<Option<String>, tonic::Status> {
        let request = token.call(tonic::Request::new(()))?;
        Ok(request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()))
    }

    #[test]
    fn without_a_file_calls_pass_unchanged() {
        assert_eq!(auth_of(&mut BearerToken::none()).unwrap(), None);
    }

    #[test]
    fn sends_the_token_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let mut token = BearerToken::from_file(&path);
        assert_eq!(
            auth_of(&mut token).unwrap().as_deref(),
            Some("Bearer first-token")
        );
        // Kubelet rotates the projected token: a new file (longer here, so
        // the change shows even where mtimes are coarse).
        let rotated = dir.path().join("token.new");
        std::fs::write(&rotated, "second-token-longer").unwrap();
        std::fs::rename(&rotated, &path).unwrap();
        assert_eq!(
            auth_of(&mut token).unwrap().as_deref(),
            Some("Bearer second-token-longer")
        );
    }

    #[test]
    fn a_missing_or_empty_token_fails_the_call_as_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let mut token = BearerToken::from_file(&path);
        let status = auth_of(&mut token).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("token"));
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(
            auth_of(&mut token).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        // Retryable, not a fencing refusal.
        assert!(matches!(
            CoordinatorError::from(status),
            CoordinatorError::Call(_)
        ));
    }
}
