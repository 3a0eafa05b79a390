//! The gRPC services: `baton.v1.Coordinator` (agents) and `baton.v1.Admin`
//! (operators). Each call is authenticated, validated, authorized for the
//! node it names, then handed to the [`Engine`]. Every Admin call, reads
//! included, needs an admin identity: Status and Watch show every node's
//! errors and the whole audit trail, which agents have no need to read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use baton_proto::v1::{self as pb, admin_server::Admin, coordinator_server::Coordinator};
use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Credentials, Identity};
use crate::engine::{AcquireUpdate, Engine, EngineError, Snapshot, Step};
use crate::node::NodeName;
use crate::rollout::PolicyHandle;
use crate::rollout::labels::{LabelBook, check_labels};
use crate::rollout::report::ViewHandle;
use crate::state::{Phase, Progress};
use crate::status_map::invalid_node;
use crate::text::{self, BOOT_ID_BYTES, ERROR_BYTES, MESSAGE_BYTES, REASON_BYTES};

/// Both services over one engine.
#[derive(Clone)]
pub struct Services {
    engine: Arc<Engine>,
    auth: Arc<dyn Authenticator>,
    policy: Option<Arc<PolicyHandle>>,
    labels: Arc<LabelBook>,
    /// What the rollout policy does now (status).
    rollout: Option<ViewHandle>,
    /// One changing call at a time past this point (the engine serializes
    /// them anyway): the wait for it stays cancellable, so calls whose
    /// clients gave up (a slow or down store) leave the queue instead of
    /// piling up as detached work.
    changes: Arc<tokio::sync::Semaphore>,
    /// Where control-plane backups are kept (None: no etcd snapshots, so
    /// no backups).
    backups: Option<crate::etcd::backup::BackupSettings>,
}

impl Services {
    /// Serves `engine`, authenticating with `auth`.
    pub fn new(engine: Arc<Engine>, auth: Arc<dyn Authenticator>) -> Self {
        Self {
            engine,
            auth,
            policy: None,
            labels: Arc::new(LabelBook::default()),
            rollout: None,
            changes: Arc::new(tokio::sync::Semaphore::new(1)),
            backups: None,
        }
    }

    /// Keeps control-plane backups as `settings` say (UploadBackup).
    pub fn with_backups(mut self, settings: crate::etcd::backup::BackupSettings) -> Self {
        self.backups = Some(settings);
        self
    }

    /// Answers GetPolicy from `policy`.
    pub fn with_policy(mut self, policy: Arc<PolicyHandle>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Shows the rollout policy's state (gate, canaries, budget) in status.
    pub fn with_rollout_view(mut self, view: ViewHandle) -> Self {
        self.rollout = Some(view);
        self
    }

    /// Keeps the labels agents send in `labels` (for the policy's selectors).
    pub fn with_labels(mut self, labels: Arc<LabelBook>) -> Self {
        self.labels = labels;
        self
    }

    async fn identity<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        self.auth
            .authenticate(Credentials {
                metadata: request.metadata(),
                peer_certs: request.peer_certs(),
            })
            .await
    }

    /// Authenticates, parses `node` and checks the caller may act for it.
    async fn for_node<T>(
        &self,
        request: &Request<T>,
        node: &str,
    ) -> Result<(Identity, NodeName), Status> {
        let identity = self.identity(request).await?;
        let node = NodeName::new(node).map_err(invalid_node)?;
        identity.may_act_for(&node)?;
        Ok((identity, node))
    }
}

impl Services {
    /// Runs one changing engine call to completion in a task of its own and
    /// returns its answer. When a client hangs up mid-call, tonic drops the
    /// handler's future; a save cut off there would leave the store and the
    /// engine's memory apart (safe, since the next call reloads, but that
    /// call answers UNAVAILABLE). In its own task the call always ends, and
    /// only its answer is lost. Until its turn comes (one changing call at
    /// a time) it is still cancelled with its client.
    async fn to_completion<T, F>(&self, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
    {
        let turn = self
            .changes
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the coordinator is stopping"))?;
        tokio::spawn(async move {
            let _turn = turn;
            call.await
        })
        .await
        .map_err(|e| Status::internal(format!("the engine's task failed: {e}")))?
        .map_err(Status::from)
    }
}

/// INVALID_ARGUMENT unless `value` is acceptable text for `field` (see
/// [`crate::text`]).
fn check_text(field: &'static str, value: &str, limit: usize) -> Result<(), Status> {
    text::check(field, value, limit).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Converts a timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn duration(d: chrono::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

/// Maps a stored phase to the API's.
pub fn phase_to_proto(phase: Phase) -> pb::Phase {
    match phase {
        Phase::Granted => pb::Phase::Granted,
        Phase::Draining => pb::Phase::Draining,
        Phase::EtcdPrepare => pb::Phase::EtcdPrepare,
        Phase::Updating => pb::Phase::Updating,
        Phase::Rebooting => pb::Phase::Rebooting,
        Phase::Verifying => pb::Phase::Verifying,
        Phase::Uncordoning => pb::Phase::Uncordoning,
        Phase::Failed => pb::Phase::Failed,
        Phase::Manual => pb::Phase::Manual,
    }
}

fn phase_from_proto(value: i32) -> Result<Phase, Status> {
    Ok(match pb::Phase::try_from(value) {
        Ok(pb::Phase::Granted) => Phase::Granted,
        Ok(pb::Phase::Draining) => Phase::Draining,
        Ok(pb::Phase::EtcdPrepare) => Phase::EtcdPrepare,
        Ok(pb::Phase::Updating) => Phase::Updating,
        Ok(pb::Phase::Rebooting) => Phase::Rebooting,
        Ok(pb::Phase::Verifying) => Phase::Verifying,
        Ok(pb::Phase::Uncordoning) => Phase::Uncordoning,
        Ok(pb::Phase::Failed) => Phase::Failed,
        // An operator's hold is Manual from its grant (`batonctl hold`) and
        // is never reported so: a holder reporting it would pass for an
        // operator's hold, which Confirm's backup judgement and an agent's
        // Acquire treat as the operator's.
        Ok(pb::Phase::Manual) => {
            return Err(Status::invalid_argument(
                "phase: manual is what `batonctl hold` is granted as; it is never reported",
            ));
        }
        Ok(pb::Phase::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "phase: {value} is not a reportable phase"
            )));
        }
    })
}

/// The lease settings as the API shows them.
fn lease_settings(engine: &Engine) -> pb::LeaseSettings {
    pb::LeaseSettings {
        renew_interval: Some(duration(engine.config().renew_interval)),
        overdue_after: Some(duration(engine.config().overdue_after)),
    }
}

/// Builds the Status answer from a snapshot.
pub fn status_response(engine: &Engine, snap: &Snapshot) -> pb::StatusResponse {
    let state = &snap.state;
    pb::StatusResponse {
        paused: state.paused.is_some(),
        pause_reason: state
            .paused
            .as_ref()
            .map(|p| p.reason.clone())
            .unwrap_or_default(),
        max_concurrent: engine.policy().max_concurrent,
        holders: state
            .holders
            .iter()
            .map(|(node, h)| pb::Holder {
                node: node.to_string(),
                fencing_token: h.fencing_token,
                phase: phase_to_proto(h.phase) as i32,
                since: Some(timestamp(h.granted_at)),
                last_renewed: Some(timestamp(h.last_renewed)),
                overdue: snap.overdue.contains(node),
                control_plane: h.control_plane,
                boot_id: h.boot_id.clone(),
                message: h.message.clone(),
                error: h.error.clone(),
                reason: h.reason.clone(),
                phase_since: Some(timestamp(h.phase_since)),
            })
            .collect(),
        queue: snap
            .queue
            .iter()
            .enumerate()
            .map(|(i, q)| pb::QueueEntry {
                node: q.node.to_string(),
                position: i as u32 + 1,
                reason: q.reason.clone(),
                control_plane: q.control_plane,
                waiting_since: Some(timestamp(q.since)),
                request_reason: q.request_reason.clone(),
            })
            .collect(),
        audit: state
            .audit
            .iter()
            .map(|a| pb::AuditRecord {
                time: Some(timestamp(a.time)),
                action: a.action.clone(),
                node: a.node.clone(),
                fencing_token: a.fencing_token,
                actor: a.actor.clone(),
                reason: a.reason.clone(),
            })
            .collect(),
        windows: engine
            .policy()
            .windows
            .windows
            .iter()
            .map(ToString::to_string)
            .collect(),
        window_open: snap.window_open,
        coordinator_id: engine.config().coordinator_id.clone(),
        lease: Some(lease_settings(engine)),
        last_fencing_token: state.last_token,
        queue_length: snap.queue_length as u32,
        // Filled by the service from the rollout's view.
        rollout: None,
        // Listed from the snapshot directory by the Status call itself.
        backups: Vec::new(),
    }
}

/// An Acquire stream: ends after the grant, withdraws the request when the
/// client goes away first.
struct AcquireStream {
    engine: Arc<Engine>,
    node: NodeName,
    ticket: u64,
    events: mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>,
    lease: pb::LeaseSettings,
    done: bool,
}

impl Stream for AcquireStream {
    type Item = Result<pb::AcquireEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.events.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Err(Status::unavailable(
                    "the coordinator stopped serving this request",
                ))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Err(e.into())
            }
            Poll::Ready(Some(Ok(AcquireUpdate::Queued {
                position,
                queue_length,
                reason,
            }))) => Ok(pb::AcquireEvent {
                event: Some(pb::acquire_event::Event::Queued(pb::Queued {
                    position,
                    queue_length,
                    reason,
                })),
            }),
            Poll::Ready(Some(Ok(AcquireUpdate::Granted(grant)))) => {
                self.done = true;
                Ok(pb::AcquireEvent {
                    event: Some(pb::acquire_event::Event::Granted(pb::Granted {
                        fencing_token: grant.fencing_token,
                        granted_at: Some(timestamp(grant.granted_at)),
                        lease: Some(self.lease),
                        resumed: grant.resumed,
                        phase: if grant.resumed {
                            phase_to_proto(grant.phase) as i32
                        } else {
                            0
                        },
                        // Filled in by `with_backup_flag` once the stream
                        // is polled outside this synchronous function.
                        backup_required: false,
                    })),
                })
            }
        };
        Poll::Ready(Some(item))
    }
}

impl Drop for AcquireStream {
    fn drop(&mut self) {
        // The client left (or the grant was delivered, then this is a no-op).
        let engine = self.engine.clone();
        let node = self.node.clone();
        let ticket = self.ticket;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { engine.withdraw(&node, ticket).await });
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Sets `backup_required` on the Granted event from the saved grant: the
/// grant is in memory by the time it is told, and with it whether an etcd
/// snapshot was kept for it (see [`crate::etcd::backup`]).
fn with_backup_flag(
    stream: AcquireStream,
    engine: Arc<Engine>,
    node: NodeName,
) -> BoxStream<pb::AcquireEvent> {
    use futures::StreamExt;
    Box::pin(stream.then(move |item| {
        let (engine, node) = (engine.clone(), node.clone());
        async move {
            let mut event = item?;
            if let Some(pb::acquire_event::Event::Granted(granted)) = &mut event.event {
                granted.backup_required = engine.backup_required(&node).await;
            }
            Ok(event)
        }
    }))
}

#[tonic::async_trait]
impl Coordinator for Services {
    type AcquireStream = BoxStream<pb::AcquireEvent>;

    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        let (_, node) = self.for_node(&request, &request.get_ref().node).await?;
        let req = request.into_inner();
        check_text("reason", &req.reason, REASON_BYTES)?;
        check_labels(&req.labels).map_err(Status::invalid_argument)?;
        self.labels.record(&node, req.labels);
        let (ticket, events) = self
            .engine
            .acquire(crate::engine::AcquireRequest {
                node: node.clone(),
                control_plane: req.control_plane,
                reason: req.reason,
                manual: req.manual,
                backs_up_control_plane: req.backs_up_control_plane,
            })
            .await?;
        let stream = AcquireStream {
            lease: lease_settings(&self.engine),
            engine: self.engine.clone(),
            node: node.clone(),
            ticket,
            events,
            done: false,
        };
        Ok(Response::new(with_backup_flag(
            stream,
            self.engine.clone(),
            node,
        )))
    }

    async fn upload_backup(
        &self,
        request: Request<tonic::Streaming<pb::BackupChunk>>,
    ) -> Result<Response<pb::BackupReceipt>, Status> {
        let identity = self.identity(&request).await?;
        let receipt = crate::upload::receive(
            &self.engine,
            self.backups.as_ref(),
            &identity,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(receipt))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let (_, node) = self.for_node(&request, &request.get_ref().node).await?;
        let (engine, token) = (self.engine.clone(), request.get_ref().fencing_token);
        let overdue_at = self
            .to_completion(async move { engine.renew(&node, token).await })
            .await?;
        Ok(Response::new(pb::RenewResponse {
            overdue_at: Some(timestamp(overdue_at)),
        }))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let (_, node) = self.for_node(&request, &request.get_ref().node).await?;
        let req = request.into_inner();
        let phase = phase_from_proto(req.phase)?;
        check_text("boot_id", &req.boot_id, BOOT_ID_BYTES)?;
        check_text("message", &req.message, MESSAGE_BYTES)?;
        check_text("error", &req.error, ERROR_BYTES)?;
        let progress = Progress {
            phase,
            boot_id: req.boot_id,
            message: req.message,
            error: req.error,
        };
        let engine = self.engine.clone();
        self.to_completion(async move { engine.report(&node, req.fencing_token, progress).await })
            .await?;
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (identity, node) = self.for_node(&request, &request.get_ref().node).await?;
        let req = request.into_inner();
        check_text("reason", &req.reason, REASON_BYTES)?;
        let engine = self.engine.clone();
        self.to_completion(async move {
            engine
                .release(&node, req.fencing_token, &identity.name, &req.reason)
                .await
        })
        .await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn confirm(
        &self,
        request: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ConfirmResponse>, Status> {
        let (_, node) = self.for_node(&request, &request.get_ref().node).await?;
        let req = request.into_inner();
        let step = match pb::Step::try_from(req.step) {
            Ok(pb::Step::Drain) => Step::Drain,
            Ok(pb::Step::Update) => Step::Update,
            // Not given: the most destructive step.
            Ok(pb::Step::Reboot | pb::Step::Unspecified) => Step::Reboot,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "step: {} is not a step",
                    req.step
                )));
            }
        };
        let engine = self.engine.clone();
        let answer = self
            .to_completion(async move { engine.confirm_step(&node, req.fencing_token, step).await })
            .await?;
        Ok(Response::new(pb::ConfirmResponse {
            proceed: answer.wait.is_none(),
            reason: answer.wait.unwrap_or_default(),
            overdue_at: Some(timestamp(answer.overdue_at)),
            retry_after: Some(prost_types::Duration {
                seconds: answer.retry_after.as_secs() as i64,
                nanos: answer.retry_after.subsec_nanos() as i32,
            }),
        }))
    }
}

#[tonic::async_trait]
impl Admin for Services {
    type WatchStream = BoxStream<pb::StatusResponse>;

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.identity(&request).await?.may_administer()?;
        let snap = self.engine.confirmed_snapshot().await?;
        let mut response = status_response(&self.engine, &snap);
        response.rollout = rollout_status(self.rollout.as_ref(), self.policy.as_deref());
        if let Some(backups) = &self.backups {
            // A directory that cannot be read shows no backups; the status
            // itself is still worth answering.
            let listed = crate::etcd::backup::newest(&backups.dir, crate::etcd::backup::LISTED)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot list the control-plane backups");
                    Vec::new()
                });
            response.backups = listed
                .into_iter()
                .map(|b| pb::BackupRecord {
                    name: b.name,
                    node: b.node,
                    snapshot: b.snapshot,
                    size: b.size,
                    kept_at: Some(timestamp(b.kept_at)),
                    sha256: b.sha256,
                })
                .collect();
        }
        Ok(Response::new(response))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.identity(&request).await?.may_administer()?;
        Ok(Response::new(Box::pin(watch_stream(
            self.engine.clone(),
            self.rollout.clone(),
            self.policy.clone(),
        ))))
    }

    async fn pause(
        &self,
        request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        let identity = self.identity(&request).await?;
        identity.may_administer()?;
        check_text("reason", &request.get_ref().reason, REASON_BYTES)?;
        let (engine, reason) = (self.engine.clone(), request.into_inner().reason);
        self.to_completion(async move { engine.pause(&identity.name, &reason).await })
            .await?;
        Ok(Response::new(pb::PauseResponse {}))
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        let identity = self.identity(&request).await?;
        identity.may_administer()?;
        let engine = self.engine.clone();
        self.to_completion(async move { engine.resume(&identity.name).await })
            .await?;
        Ok(Response::new(pb::ResumeResponse {}))
    }

    async fn force_release(
        &self,
        request: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let identity = self.identity(&request).await?;
        identity.may_administer()?;
        let req = request.into_inner();
        let node = NodeName::new(req.node).map_err(invalid_node)?;
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reason: a force-release needs a reason (it is audited)",
            ));
        }
        check_text("reason", &req.reason, REASON_BYTES)?;
        let expected = match (req.fencing_token, req.any_token) {
            (0, true) => None,
            (0, false) => {
                return Err(Status::invalid_argument(
                    "fencing_token: name the token to take (see status), or set any_token to take whatever the node holds",
                ));
            }
            (token, false) => Some(token),
            (_, true) => {
                return Err(Status::invalid_argument(
                    "fencing_token and any_token: give one, not both",
                ));
            }
        };
        let engine = self.engine.clone();
        let token = self
            .to_completion(async move {
                engine
                    .force_release(&node, expected, &identity.name, &req.reason)
                    .await
            })
            .await?;
        Ok(Response::new(pb::ForceReleaseResponse {
            fencing_token: token,
        }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        // Admin-only like Status: webhook URLs are often secrets.
        self.identity(&request).await?.may_administer()?;
        let Some(policy) = &self.policy else {
            return Err(Status::unimplemented(
                "this coordinator has no policy handle",
            ));
        };
        let loaded = policy.current();
        let last_error = policy.last_error();
        Ok(Response::new(pb::GetPolicyResponse {
            yaml: loaded.yaml(),
            source: loaded.source.clone(),
            loaded_at: Some(timestamp(loaded.loaded_at)),
            file_sha256: loaded.sha256.clone(),
            last_error: last_error
                .as_ref()
                .map(|(e, _)| e.to_string())
                .unwrap_or_default(),
            last_error_at: last_error.map(|(_, t)| timestamp(t)),
        }))
    }

    async fn plan(
        &self,
        request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        // Admin-only like Status: it shows every node's state.
        self.identity(&request).await?.may_administer()?;
        let plan = self.engine.plan().await?;
        Ok(Response::new(pb::PlanResponse {
            entries: plan
                .entries
                .into_iter()
                .map(|e| pb::PlanEntry {
                    node: e.node.to_string(),
                    order: e.order,
                    round: e.round,
                    reason: e.reason,
                    control_plane: e.control_plane,
                    queue_position: e.queue_position,
                })
                .collect(),
            holders: plan.holders.iter().map(ToString::to_string).collect(),
            computed_at: Some(timestamp(plan.now)),
        }))
    }
}

/// The Watch stream: the status now, then after every change (changes that
/// come faster than the client reads are folded into one), until the engine
/// shuts down or the client leaves. Every status sent is confirmed as the
/// leader's latest state; when it cannot be, the stream ends UNAVAILABLE.
fn watch_stream(
    engine: Arc<Engine>,
    rollout: Option<ViewHandle>,
    policy: Option<Arc<PolicyHandle>>,
) -> impl Stream<Item = Result<pb::StatusResponse, Status>> + Send {
    let changes = engine.subscribe();
    futures::stream::unfold(
        (engine, changes, Some(true)),
        move |(engine, mut changes, state)| {
            let (rollout, policy) = (rollout.clone(), policy.clone());
            async move {
                let first = state?;
                if !first && changes.changed().await.is_err() {
                    return None;
                }
                changes.borrow_and_update();
                if engine.is_shutting_down().await {
                    return None;
                }
                match engine.confirmed_snapshot().await {
                    Ok(snap) => {
                        let mut response = status_response(&engine, &snap);
                        response.rollout = rollout_status(rollout.as_ref(), policy.as_deref());
                        Some((Ok(response), (engine, changes, Some(false))))
                    }
                    Err(e) => Some((Err(e.into()), (engine, changes, None))),
                }
            }
        },
    )
}

/// The rollout policy's part of a status (`None` before the leader's
/// first look, or without a policy). The policy's generation and last
/// refusal are read live from `policy` (the view may be a tick old).
fn rollout_status(
    view: Option<&ViewHandle>,
    policy: Option<&PolicyHandle>,
) -> Option<pb::RolloutStatus> {
    let mut view = view?.borrow().clone();
    if !view.known {
        return None;
    }
    if let Some(policy) = policy {
        view.policy_generation = policy.generation();
        view.policy_sha256 = policy.current().sha256.clone();
        view.policy_reload_error = policy
            .last_error()
            .map(|(e, _)| e.to_string())
            .unwrap_or_default();
    }
    Some(pb::RolloutStatus {
        gate_open: view.gate_open,
        gate_cause: view.gate_cause,
        gate_reason: view.gate_reason,
        alerts_firing: view.alerts_firing,
        canaries: view
            .canaries
            .into_iter()
            .map(|c| pb::CanaryStatus {
                pool: c.pool,
                phase: c.phase.to_string(),
                node: c.node,
                soak_until: c.soak_until.map(timestamp),
            })
            .collect(),
        failure_budget_max: view.budget_max.unwrap_or(0),
        failures: view
            .budget_spent
            .into_iter()
            .map(|(pool, failed)| pb::PoolFailures { pool, failed })
            .collect(),
        failure_budget_remaining: view.budget_remaining,
        paused_by_failure_budget: view.paused_by_budget,
        policy_generation: view.policy_generation,
        policy_sha256: view.policy_sha256,
        policy_reload_error: view.policy_reload_error,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::Unauthenticated;
    use crate::state::LeaseState;
    use crate::store::memory::MemoryStore;

    /// Both services, unauthenticated, over a memory store holding `state`.
    async fn serve(state: LeaseState) -> (Arc<MemoryStore>, Services) {
        let store = Arc::new(MemoryStore::new(Some(state)));
        let engine = Engine::over(store.clone(), "service-test").await;
        (store, Services::new(engine, Arc::new(Unauthenticated)))
    }

    /// A client that hangs up while its Release is being saved (tonic then
    /// drops the handler's future) still has its release applied, and the
    /// next reader is answered, not told UNAVAILABLE.
    #[tokio::test]
    async fn a_release_whose_client_hangs_up_mid_save_still_happens() {
        let node = NodeName::new("n1").unwrap();
        let mut state = LeaseState::default();
        state
            .grant(&node, false, false, "test", Utc::now())
            .unwrap();
        let token = state.holders[&node].fencing_token;
        let (store, services) = serve(state).await;
        store.backend().set_latency(Duration::from_millis(200));

        let release = Coordinator::release(
            &services,
            Request::new(pb::ReleaseRequest {
                node: "n1".into(),
                fencing_token: token,
                reason: "done".into(),
            }),
        );
        let hung_up = tokio::time::timeout(Duration::from_millis(20), release).await;
        assert!(hung_up.is_err(), "the call was cut off before its save");

        let status = Admin::status(&services, Request::new(pb::StatusRequest {}))
            .await
            .expect("status answered after the hang-up")
            .into_inner();
        assert!(
            status.holders.is_empty(),
            "the release was applied: {:?}",
            status.holders
        );
        assert!(store.saved().unwrap().holders.is_empty(), "and saved");
    }

    /// No holder reports itself into an operator's hold: Manual is only
    /// ever granted (`batonctl hold`). A holder that could would escape
    /// Confirm's backup judgement and turn away its own agent's Acquire.
    #[tokio::test]
    async fn a_holder_cannot_report_itself_into_an_operators_hold() {
        let node = NodeName::new("cp-1").unwrap();
        let mut state = LeaseState::default();
        state.grant(&node, true, false, "test", Utc::now()).unwrap();
        let token = state.holders[&node].fencing_token;
        let (store, services) = serve(state).await;
        let refused = Coordinator::report(
            &services,
            Request::new(pb::ReportRequest {
                node: "cp-1".into(),
                fencing_token: token,
                phase: pb::Phase::Manual as i32,
                ..Default::default()
            }),
        )
        .await
        .expect_err("a Manual report was taken");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("batonctl hold"), "{refused}");
        assert_eq!(
            store.saved().unwrap().holders[&node].phase,
            Phase::Granted,
            "the holding is unchanged"
        );
    }

    /// A changing call whose client gives up before its turn comes (the
    /// store is slow, another change is being saved) is dropped, not left
    /// to run later as detached work: abandoned calls cannot pile up.
    #[tokio::test]
    async fn a_call_abandoned_before_its_turn_never_runs() {
        let (store, services) = serve(LeaseState::default()).await;
        store.backend().set_latency(Duration::from_millis(300));

        let pause = Admin::pause(
            &services,
            Request::new(pb::PauseRequest {
                reason: "first".into(),
            }),
        );
        let resume = Admin::resume(&services, Request::new(pb::ResumeRequest {}));
        let (paused, resumed) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(50), pause),
            tokio::time::timeout(Duration::from_millis(100), resume),
        );
        assert!(paused.is_err() && resumed.is_err(), "both clients gave up");

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let saved = store.saved().unwrap();
        assert!(
            saved.paused.is_some(),
            "the pause that had its turn was applied, the resume abandoned before its turn was not"
        );
    }
}
