//! The `Coordinator` boundary: the agent's side of `baton.v1.Coordinator`.
//!
//! [`GrpcCoordinator`] is the tonic client; this module is also where gRPC
//! status codes become [`CoordinatorError`] variants: FAILED_PRECONDITION
//! means the fencing token is stale ([`CoordinatorError::Fenced`]);
//! INVALID_ARGUMENT and PERMISSION_DENIED will be refused again however
//! often the call is repeated ([`CoordinatorError::Refused`]); UNIMPLEMENTED
//! is an older coordinator ([`CoordinatorError::Unimplemented`]); everything
//! else is worth retrying.
//!
//! Every unary call carries a deadline (`grpc-timeout`, see
//! [`GrpcCoordinator::with_call_timeout`]); the waiting Acquire stream has
//! none (it may wait for hours) but its first answer does, and HTTP/2
//! keepalives notice a coordinator that went away.
//!
//! Authentication is mutual TLS ([`Tls`] with a client identity) or a
//! bearer token read from a file ([`BearerToken`], a tonic interceptor that
//! re-reads the file when it changes, since projected ServiceAccount tokens
//! rotate) over server-authenticated TLS or, in labs, plain text.

use crate::phase::Phase;
use baton_proto::v1::{
    AcquireRequest, ConfirmRequest, ReleaseRequest, RenewRequest, ReportRequest, acquire_event,
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
    /// The coordinator refused the call's content or the caller
    /// (INVALID_ARGUMENT, PERMISSION_DENIED): repeating it cannot help.
    #[error("coordinator refused the call: {0}")]
    Refused(String),
    /// The coordinator does not know this call (an older version).
    #[error("coordinator does not implement this call: {0}")]
    Unimplemented(String),
    /// The call failed in a way that may succeed later (unavailable,
    /// follower, network, deadline).
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
            code @ (tonic::Code::InvalidArgument | tonic::Code::PermissionDenied) => {
                CoordinatorError::Refused(format!("{code:?}: {}", status.message()))
            }
            tonic::Code::Unimplemented => CoordinatorError::Unimplemented(status.message().into()),
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
    /// How long the coordinator lets a holder go without renewing before
    /// it counts as overdue (None: not told).
    pub overdue_after: Option<Duration>,
    /// True when the coordinator wants the control-plane backup
    /// ([`Coordinator::upload_backup`]) before the node is drained.
    pub backup_required: bool,
}

/// A successful renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Renewed {
    /// Renew again before this time (the coordinator's clock), or become
    /// overdue. None: not told.
    pub overdue_at: Option<SystemTime>,
}

/// The destructive step a holder asks to take ([`Coordinator::confirm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Cordon and drain, or the pre-maintenance units.
    Drain,
    /// Apply the OS update.
    Update,
    /// Reboot the node.
    Reboot,
}

impl Step {
    /// The step as `baton.v1` names it.
    pub fn to_proto(self) -> baton_proto::v1::Step {
        match self {
            Step::Drain => baton_proto::v1::Step::Drain,
            Step::Update => baton_proto::v1::Step::Update,
            Step::Reboot => baton_proto::v1::Step::Reboot,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Drain => "drain",
            Step::Update => "update",
            Step::Reboot => "reboot",
        })
    }
}

/// The coordinator's answer to [`Coordinator::confirm`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Confirmation {
    /// True: take the step now. False: wait, keep the lease, ask again.
    pub proceed: bool,
    /// Why the holder must wait (empty when it may proceed).
    pub reason: String,
    /// The lease was renewed: renew again before this time.
    pub overdue_at: Option<SystemTime>,
    /// When to ask again if told to wait (None: not told).
    pub retry_after: Option<Duration>,
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
    /// Keep the baton alive; a refused token is [`CoordinatorError::Fenced`].
    async fn renew(&self, fencing_token: u64) -> Result<Renewed, CoordinatorError>;
    /// Record progress.
    async fn report(&self, fencing_token: u64, report: &Report) -> Result<(), CoordinatorError>;
    /// Give the baton back.
    async fn release(&self, fencing_token: u64, reason: &str) -> Result<(), CoordinatorError>;
    /// Ask right before a destructive step whether it may be taken now (the
    /// coordinator checks the token, renews the lease and re-runs its
    /// guards). An older coordinator answers
    /// [`CoordinatorError::Unimplemented`].
    async fn confirm(
        &self,
        fencing_token: u64,
        step: Step,
    ) -> Result<Confirmation, CoordinatorError>;
    /// Send the control-plane backup the grant asked for; the name the
    /// coordinator keeps it under. Too large (RESOURCE_EXHAUSTED) is
    /// [`CoordinatorError::Refused`]: sending it again cannot help.
    async fn upload_backup(
        &self,
        fencing_token: u64,
        archive: &crate::backup::Archive,
    ) -> Result<String, CoordinatorError>;
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

/// How long a unary call may take unless told otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcCoordinator {
    node: String,
    control_plane: bool,
    call_timeout: Duration,
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
            .map_err(|e| {
                CoordinatorError::Config(format!(
                    "--coordinator {url:?} is not a URL ({e}); use https://HOST:PORT"
                ))
            })?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if let Some(tls) = tls {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(config).map_err(|e| {
                CoordinatorError::Config(format!(
                    "TLS settings ({e}); check the PEM files of --ca, --cert and --key"
                ))
            })?;
        }
        Ok(GrpcCoordinator {
            node: node.to_string(),
            control_plane,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            labels: Default::default(),
            client: CoordinatorClient::with_interceptor(endpoint.connect_lazy(), token),
        })
    }

    /// The deadline of every unary call and of the Acquire stream's first
    /// answer (default [`DEFAULT_CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sends `labels` with every Acquire (for the coordinator's policy).
    pub fn with_labels(mut self, labels: impl IntoIterator<Item = (String, String)>) -> Self {
        self.labels = labels.into_iter().collect();
        self
    }

    /// `message` as a request carrying the call deadline.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// `call`, failing with [`CoordinatorError::Call`] after the deadline
    /// (the client side of the deadline: it holds also when the server
    /// ignores `grpc-timeout`).
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, CoordinatorError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result.map_err(call_error),
            Err(_) => Err(CoordinatorError::Call(format!(
                "no answer within {}",
                humantime::format_duration(self.call_timeout)
            ))),
        }
    }
}

/// The deadline of an upload: the call timeout, plus a second per MiB
/// (a slow link still gets a 64 MiB backup through in about a minute).
fn backup_deadline(call_timeout: Duration, size: u64) -> Duration {
    call_timeout + Duration::from_secs(size / (1024 * 1024) + 1)
}

fn call_error(e: tonic::Status) -> CoordinatorError {
    e.into()
}

fn system_time(t: baton_proto::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(t).ok()
}

impl Coordinator for GrpcCoordinator {
    async fn upload_backup(
        &self,
        fencing_token: u64,
        archive: &crate::backup::Archive,
    ) -> Result<String, CoordinatorError> {
        use baton_proto::v1::{BackupChunk, BackupHeader, backup_chunk::Chunk};
        use tokio::io::AsyncReadExt;
        let file = tokio::fs::File::open(&archive.path)
            .await
            .map_err(|e| CoordinatorError::Call(format!("opening the backup: {e}")))?;
        let header = BackupChunk {
            chunk: Some(Chunk::Header(BackupHeader {
                node: self.node.clone(),
                fencing_token,
                sha256: archive.sha256.clone(),
                size: archive.size,
            })),
        };
        // The archive is read while it is sent, one chunk at a time; a
        // read error ends the stream early, which the coordinator refuses
        // (the size and checksum do not match).
        let data = futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut chunk = vec![0u8; crate::backup::CHUNK_BYTES];
            match file.read(&mut chunk).await {
                Ok(0) | Err(_) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some((
                        BackupChunk {
                            chunk: Some(Chunk::Data(chunk)),
                        },
                        Some(file),
                    ))
                }
            }
        });
        let chunks = futures::StreamExt::chain(futures::stream::iter([header]), data);
        let mut request = tonic::Request::new(chunks);
        let deadline = backup_deadline(self.call_timeout, archive.size);
        request.set_timeout(deadline);
        let mut client = self.client.clone();
        let answer = match tokio::time::timeout(deadline, client.upload_backup(request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                return Err(CoordinatorError::Refused(format!(
                    "ResourceExhausted: {}",
                    status.message()
                )));
            }
            Ok(Err(status)) => return Err(status.into()),
            Err(_) => {
                return Err(CoordinatorError::Call(format!(
                    "no answer within {}",
                    humantime::format_duration(deadline)
                )));
            }
        };
        Ok(answer.name)
    }

    async fn acquire(&self, reason: &str, wait: bool) -> Result<Option<Grant>, CoordinatorError> {
        let request = AcquireRequest {
            node: self.node.clone(),
            control_plane: self.control_plane,
            reason: reason.to_string(),
            manual: false,
            labels: self.labels.clone(),
            // This agent makes and sends the backup a grant asks for, and
            // asks Confirm before the drain (`crate::agent`).
            backs_up_control_plane: true,
        };
        tracing::info!(node = %self.node, reason, "acquire sent");
        let mut client = self.client.clone();
        let mut stream = self
            .bounded(client.acquire(tonic::Request::new(request)))
            .await?
            .into_inner();
        loop {
            // Waiting for a grant has no deadline; asking what the node
            // holds (`wait` false) answers at once.
            let next = if wait {
                stream.message().await.map_err(call_error)?
            } else {
                self.bounded(stream.message()).await?
            };
            let Some(event) = next else { break };
            match event.event {
                Some(acquire_event::Event::Queued(q)) => {
                    tracing::info!(node = %self.node, position = q.position, queue_length = q.queue_length, reason = %q.reason, "queued");
                    if !wait {
                        return Ok(None);
                    }
                }
                Some(acquire_event::Event::Granted(g)) => {
                    let lease = g.lease.unwrap_or_default();
                    let duration = |d: Option<baton_proto::ProtoDuration>| {
                        d.and_then(|d| Duration::try_from(d).ok())
                    };
                    return Ok(Some(Grant {
                        fencing_token: g.fencing_token,
                        resumed: g.resumed,
                        renew_interval: duration(lease.renew_interval),
                        overdue_after: duration(lease.overdue_after),
                        backup_required: g.backup_required,
                    }));
                }
                None => {}
            }
        }
        Err(CoordinatorError::Call(
            "acquire stream ended without a grant".into(),
        ))
    }

    async fn renew(&self, fencing_token: u64) -> Result<Renewed, CoordinatorError> {
        let mut client = self.client.clone();
        let answer = self
            .bounded(client.renew(self.request(RenewRequest {
                node: self.node.clone(),
                fencing_token,
            })))
            .await?
            .into_inner();
        Ok(Renewed {
            overdue_at: answer.overdue_at.and_then(system_time),
        })
    }

    async fn report(&self, fencing_token: u64, report: &Report) -> Result<(), CoordinatorError> {
        let mut client = self.client.clone();
        self.bounded(client.report(self.request(ReportRequest {
            node: self.node.clone(),
            fencing_token,
            phase: report.phase.to_proto() as i32,
            boot_id: report.boot_id.clone(),
            message: report.message.clone(),
            error: report.error.clone(),
        })))
        .await?;
        Ok(())
    }

    async fn release(&self, fencing_token: u64, reason: &str) -> Result<(), CoordinatorError> {
        let mut client = self.client.clone();
        self.bounded(client.release(self.request(ReleaseRequest {
            node: self.node.clone(),
            fencing_token,
            reason: reason.to_string(),
        })))
        .await?;
        Ok(())
    }

    async fn confirm(
        &self,
        fencing_token: u64,
        step: Step,
    ) -> Result<Confirmation, CoordinatorError> {
        let mut client = self.client.clone();
        let answer = self
            .bounded(client.confirm(self.request(ConfirmRequest {
                node: self.node.clone(),
                fencing_token,
                step: step.to_proto() as i32,
            })))
            .await?
            .into_inner();
        Ok(Confirmation {
            proceed: answer.proceed,
            reason: answer.reason,
            overdue_at: answer.overdue_at.and_then(system_time),
            retry_after: answer.retry_after.and_then(|d| Duration::try_from(d).ok()),
        })
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
    fn status_codes_map_to_what_the_agent_does_next() {
        use tonic::Status;
        let of = |s: Status| CoordinatorError::from(s);
        assert!(matches!(
            of(Status::failed_precondition("stale")),
            CoordinatorError::Fenced(_)
        ));
        assert!(matches!(
            of(Status::invalid_argument("too long")),
            CoordinatorError::Refused(_)
        ));
        assert!(matches!(
            of(Status::permission_denied("not yours")),
            CoordinatorError::Refused(_)
        ));
        assert!(matches!(
            of(Status::unimplemented("Confirm")),
            CoordinatorError::Unimplemented(_)
        ));
        assert!(matches!(
            of(Status::unavailable("follower")),
            CoordinatorError::Call(_)
        ));
        assert!(matches!(
            of(Status::unauthenticated("token rotating")),
            CoordinatorError::Call(_)
        ));
    }

    /// A coordinator that accepts connections and never answers.
    struct Silent;

    type Events = std::pin::Pin<
        Box<
            dyn futures::Stream<Item = Result<baton_proto::v1::AcquireEvent, tonic::Status>> + Send,
        >,
    >;

    #[tonic::async_trait]
    impl baton_proto::v1::coordinator_server::Coordinator for Silent {
        type AcquireStream = Events;
        async fn acquire(
            &self,
            _: tonic::Request<AcquireRequest>,
        ) -> Result<tonic::Response<Events>, tonic::Status> {
            std::future::pending().await
        }
        async fn renew(
            &self,
            _: tonic::Request<RenewRequest>,
        ) -> Result<tonic::Response<baton_proto::v1::RenewResponse>, tonic::Status> {
            std::future::pending().await
        }
        async fn report(
            &self,
            _: tonic::Request<ReportRequest>,
        ) -> Result<tonic::Response<baton_proto::v1::ReportResponse>, tonic::Status> {
            std::future::pending().await
        }
        async fn release(
            &self,
            _: tonic::Request<ReleaseRequest>,
        ) -> Result<tonic::Response<baton_proto::v1::ReleaseResponse>, tonic::Status> {
            std::future::pending().await
        }
        async fn confirm(
            &self,
            _: tonic::Request<ConfirmRequest>,
        ) -> Result<tonic::Response<baton_proto::v1::ConfirmResponse>, tonic::Status> {
            std::future::pending().await
        }
        async fn upload_backup(
            &self,
            _: tonic::Request<tonic::Streaming<baton_proto::v1::BackupChunk>>,
        ) -> Result<tonic::Response<baton_proto::v1::BackupReceipt>, tonic::Status> {
            std::future::pending().await
        }
    }

    /// Finding 7: every call has a deadline; a coordinator that hangs
    /// makes the call fail (retryable), it never hangs the agent.
    #[tokio::test]
    async fn calls_to_a_hung_coordinator_fail_at_their_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(baton_proto::v1::coordinator_server::CoordinatorServer::new(
                    Silent,
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let client = GrpcCoordinator::new(
            &format!("http://{addr}"),
            None,
            BearerToken::none(),
            "n1",
            false,
        )
        .unwrap()
        .with_call_timeout(Duration::from_millis(300));
        let report = Report {
            phase: Phase::Updating,
            boot_id: String::new(),
            message: String::new(),
            error: String::new(),
        };
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("ca.key"), b"KEY").unwrap();
        let archive = crate::backup::build(
            &[files.path().to_path_buf()],
            &[],
            &files.path().join("state"),
            1,
        )
        .unwrap();
        // The outer bound only keeps a broken build from hanging the suite.
        let bound = Duration::from_secs(60);
        let calls = async {
            assert!(matches!(
                client.renew(1).await,
                Err(CoordinatorError::Call(_))
            ));
            assert!(matches!(
                client.report(1, &report).await,
                Err(CoordinatorError::Call(_))
            ));
            assert!(matches!(
                client.release(1, "r").await,
                Err(CoordinatorError::Call(_))
            ));
            assert!(matches!(
                client.confirm(1, Step::Reboot).await,
                Err(CoordinatorError::Call(_))
            ));
            assert!(matches!(
                client.acquire("r", false).await,
                Err(CoordinatorError::Call(_))
            ));
            assert!(matches!(
                client.upload_backup(1, &archive).await,
                Err(CoordinatorError::Call(_))
            ));
        };
        tokio::time::timeout(bound, calls)
            .await
            .expect("a call without a deadline hung");
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
