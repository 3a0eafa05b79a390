//! [`Agent`]: drives the phase machine of [`crate::phase`] with the I/O of the
//! three boundaries ([`HostOs`], [`Coordinator`], [`NodeOps`]).
//!
//! Each loop iteration runs the step of the current phase, feeds the outcome
//! to [`transition`], persists the new phase and reports it. State is
//! written with synchronous calls between await points, so cancelling a
//! step on SIGTERM can never interrupt a write.
//!
//! What the agent guarantees (the crash-point tests in `crash_points`
//! check them with the agent killed, or its calls failed, at every write
//! and every external call):
//! - **No step on an unconfirmed token.** Before every step (and when it
//!   resumes from its state file) the token is confirmed with the
//!   coordinator in this process; right before the drain (after a
//!   control-plane backup the grant asked for), the update (also when a
//!   restarted agent resumes it) and the reboot the coordinator is asked to
//!   confirm the step itself (`Confirm`) and may answer "wait" (it does
//!   until a backup the grant asked for was kept); an older
//!   coordinator's UNIMPLEMENTED makes Renew the confirmation for that one
//!   step only. While the lease is older than the coordinator
//!   allows, no new eviction or unit is started. See [`lease`].
//! - **A reboot is proven.** `Rebooting` and the boot_id before the reboot
//!   are one write; the baton is released only after the boot_id changed
//!   and the reboot sentinel is gone. A sentinel check without an answer
//!   is never "no reboot needed": after the update it means reboot; before
//!   the release (asked a few times) it means Failed, keeping the baton;
//!   before asking for the baton it means ask for nothing (shown on the
//!   node, the hold-back kept); while waiting it keeps the request. A restart in `Rebooting` on the same
//!   boot asks for the reboot again (a bounded number of times).
//! - **The update runs at most once per grant.** The grant it was started
//!   for is persisted before it starts; a restarted agent follows that run.
//! - **A node is never left cordoned by a lost baton**: giving it back is
//!   retried until it succeeds.
//! - **No loops.** A need that comes back after a maintenance, or a
//!   maintenance that did not finish, holds the next request back
//!   (persisted, doubling; see [`hold_back`]).
//! - **Text fits the API** ([`crate::text`]); refusals that cannot change
//!   (INVALID_ARGUMENT, PERMISSION_DENIED) end in Failed, not in a retry
//!   loop.

mod backup_step;
#[cfg(test)]
mod backup_tests;
mod hold_back;
mod inhibitors;
mod lease;
mod steps;
#[cfg(test)]
mod tests;

pub use hold_back::{MAX_ABORT_BACKOFF, abort_backoff};

use crate::coordinator::{Coordinator, CoordinatorError, Grant, Report};
use crate::host::{HostOs, Job};
use crate::node_ops::{NodeOps, PhaseChange};
use crate::phase::{Event, Phase, transition};
use crate::state::{AgentState, Loaded, StateError, StateFile};
use crate::text;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What to run for the update or the post-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start this unit.
    Unit(String),
    /// Run this shell command as a transient unit.
    Command(String),
}

/// The agent's maintenance settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The update to apply (None: maintenance is a reboot only).
    pub update: Option<Action>,
    /// The check to run after boot (None: no check).
    pub post_check: Option<Action>,
    /// How long the update may run.
    pub update_timeout: Duration,
    /// How long the post-check may run.
    pub post_check_timeout: Duration,
    /// How long to wait for the machine to go down after asking to reboot.
    pub reboot_timeout: Duration,
    /// How often to renew (a shorter interval from the coordinator wins,
    /// down to [`MIN_RENEW_INTERVAL`]).
    pub renew_interval: Duration,
    /// How long to wait before retrying a failed coordinator call.
    pub retry_interval: Duration,
    /// How long to hold back before asking again after a maintenance that
    /// was aborted or lost, or after which the need was still there
    /// (doubles with every one in a row, see [`abort_backoff`]).
    pub abort_backoff: Duration,
    /// The deadline of every coordinator call (the waiting Acquire aside).
    pub call_timeout: Duration,
    /// How long to wait for logind's block inhibitors on shutdown to go
    /// before the reboot; then the maintenance fails.
    pub inhibitor_timeout: Duration,
    /// Reboot even while block inhibitors are held.
    pub ignore_inhibitors: bool,
    /// What the control-plane backup holds, when a grant asks for one.
    pub backup_paths: Vec<std::path::PathBuf>,
    /// How many times a backup upload that failed in a way that may pass
    /// (the coordinator unreachable) is tried before the maintenance is
    /// given up.
    pub backup_attempts: u32,
}

impl Default for Settings {
    /// The command line's defaults, without an update or a post-check.
    fn default() -> Self {
        Settings {
            update: None,
            post_check: None,
            update_timeout: Duration::from_secs(3600),
            post_check_timeout: Duration::from_secs(600),
            reboot_timeout: Duration::from_secs(600),
            renew_interval: Duration::from_secs(10),
            retry_interval: Duration::from_secs(2),
            abort_backoff: Duration::from_secs(300),
            call_timeout: crate::coordinator::DEFAULT_CALL_TIMEOUT,
            inhibitor_timeout: Duration::from_secs(1800),
            ignore_inhibitors: false,
            backup_paths: vec![crate::backup::DEFAULT_PATH.into()],
            backup_attempts: 3,
        }
    }
}

/// The shortest renew interval the agent accepts from a coordinator: a
/// misconfigured coordinator must not make every agent renew in a loop.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// How often a reboot is asked for in one boot before the maintenance fails
/// (the machine does not go down).
pub const MAX_REBOOT_REQUESTS: u32 = 3;

/// How many times in a row a step may be stopped because the lease ran out
/// before the agent gives up on it (renewals answered too late for the
/// lease they grant would otherwise restart it forever): Preparing is
/// aborted (the node given back, the baton released), a later step fails.
pub const MAX_STALE_RESTARTS: u32 = 5;

/// How long showing a phase change on the node may take (best effort).
const VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// The wall clock (persisted hold-backs, the coordinator's `overdue_at`).
/// Tests pass one that follows tokio's paused clock.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Errors that stop the agent (it exits, and systemd restarts it).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state could not be persisted: continuing could lose track of a
    /// reboot, so the agent stops.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Why a step did not finish.
enum Interrupted {
    /// SIGTERM: stop now; the persisted phase is resumed on restart.
    Shutdown,
    /// The coordinator refused the fencing token.
    Fenced(String),
    /// The coordinator refused a call in a way that will not change
    /// (INVALID_ARGUMENT, PERMISSION_DENIED): the maintenance fails.
    Refused(String),
    /// The lease is older than the coordinator allows: the step was
    /// stopped; it runs again once the token is confirmed.
    Stale,
    /// The step failed and the Failed phase is saved already (nothing is
    /// left to do for it).
    Failed,
    /// The state could not be persisted: stop with an error.
    Fatal(AgentError),
}

/// The agent of one node.
pub struct Agent<H, C, N> {
    host: H,
    coordinator: C,
    node_ops: N,
    state_file: StateFile,
    settings: Settings,
    state: AgentState,
    shutdown: CancellationToken,
    clock: WallClock,
    /// What this process knows of its lease (see [`lease`]).
    lease: Mutex<lease::LeaseView>,
    /// What blocked the last request for the baton (shown on the node
    /// while non-empty); None until the first check of this process, so
    /// that a stale "waiting" left by an earlier process is cleared.
    blockers: Option<Vec<String>>,
    /// The hold-back last logged (so that it is logged once).
    announced_hold_back: Option<u64>,
    /// Times in a row the current step was stopped because the lease ran
    /// out (reset by every phase change).
    stale_restarts: u32,
}

impl<H: HostOs, C: Coordinator, N: NodeOps> Agent<H, C, N> {
    /// An agent that keeps its state in `state_file` and stops when
    /// `shutdown` is cancelled.
    pub fn new(
        host: H,
        coordinator: C,
        node_ops: N,
        state_file: StateFile,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        Agent {
            host,
            coordinator,
            node_ops,
            state_file,
            settings,
            state: AgentState::idle(),
            shutdown,
            clock: Arc::new(SystemTime::now),
            lease: Mutex::default(),
            blockers: None,
            announced_hold_back: None,
            stale_restarts: 0,
        }
    }

    /// The same agent reading the wall clock from `clock`.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// The current state (for tests).
    pub fn state(&self) -> &AgentState {
        &self.state
    }

    /// Run until shutdown. `wakes` changes whenever the maintenance need
    /// should be checked again (see [`crate::sentinel::watch`]).
    pub async fn run(&mut self, mut wakes: watch::Receiver<u64>) -> Result<(), AgentError> {
        self.load().await?;
        while !self.shutdown.is_cancelled() {
            let phase = self.state.phase;
            let token = self.state.fencing_token.unwrap_or(0);
            let result = match phase {
                Phase::Idle => self.idle(&mut wakes).await,
                Phase::Waiting => self.waiting(&mut wakes).await,
                Phase::Granted => self
                    .advance(Event::Started, "maintenance starts")
                    .await
                    .map_err(fatal),
                Phase::Preparing => self.preparing(token).await,
                Phase::Updating => self.updating(token).await,
                Phase::Rebooting => self.after_boot(token).await,
                Phase::Verifying => self.verifying(token).await,
                Phase::Finishing => self.finishing(token).await,
                Phase::Aborting => self.aborting(token).await,
                Phase::Failed => self.failed(token).await,
            };
            self.interrupted(result).await?;
        }
        tracing::info!(phase = %self.state.phase, "shutting down");
        Ok(())
    }

    /// Handle how a step ended.
    async fn interrupted(&mut self, result: Result<(), Interrupted>) -> Result<(), AgentError> {
        match result {
            Ok(()) | Err(Interrupted::Shutdown | Interrupted::Failed) => Ok(()),
            Err(Interrupted::Fenced(why)) => self.lost_baton(&why).await,
            Err(Interrupted::Stale) => self.stale().await,
            Err(Interrupted::Refused(why)) => {
                if self.state.phase.holds_baton() && self.state.phase != Phase::Failed {
                    match self.fail(why, "").await {
                        Err(Interrupted::Fatal(error)) => return Err(error),
                        _ => return Ok(()),
                    }
                }
                tracing::error!(why, "the coordinator refused a call; holding back");
                self.pause(self.settings.retry_interval).await;
                Ok(())
            }
            Err(Interrupted::Fatal(error)) => Err(error),
        }
    }

    /// A step was stopped because the lease ran out: it runs again once
    /// the token is confirmed, at most [`MAX_STALE_RESTARTS`] times in a
    /// row; then Preparing is aborted (nothing was taken down: give the
    /// node back and release) and a later step fails (the baton is kept).
    async fn stale(&mut self) -> Result<(), AgentError> {
        self.stale_restarts += 1;
        let phase = self.state.phase;
        if self.stale_restarts < MAX_STALE_RESTARTS {
            tracing::warn!(%phase, restarts = self.stale_restarts, "the lease is older than the coordinator allows: no new step until the token is confirmed again");
            return Ok(());
        }
        let why = format!(
            "the lease ran out {} times in a row while {phase} ran (renewals answered too late or not at all); giving up on the step",
            self.stale_restarts
        );
        match phase {
            Phase::Preparing => {
                tracing::error!(why, "aborting the maintenance");
                self.state.error = Some(why);
                self.advance(Event::PrepareAborted, "maintenance aborted")
                    .await
            }
            phase if phase.holds_baton() && phase != Phase::Failed => {
                match self.fail(why, "").await {
                    Err(Interrupted::Fatal(error)) => Err(error),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Load the state file (a corrupt one is kept aside and the coordinator
    /// tells us what we hold) and confirm a saved token with the
    /// coordinator before anything else.
    async fn load(&mut self) -> Result<(), AgentError> {
        match self.state_file.load()? {
            Loaded::Missing => self.state = AgentState::idle(),
            Loaded::Valid(state) => {
                tracing::info!(phase = %state.phase, token = ?state.fencing_token, "resuming from state file");
                self.state = *state;
            }
            Loaded::Corrupt { moved_to, error } => {
                tracing::error!(moved_to = %moved_to.display(), %error, "state file corrupt; kept aside, asking the coordinator what this node holds");
                self.state = AgentState::idle();
                return self
                    .recover_from_coordinator(&format!(
                        "state file was corrupt ({error}); kept at {}",
                        moved_to.display()
                    ))
                    .await;
            }
        }
        if let (Some(token), true) = (self.state.fencing_token, self.state.phase.holds_baton()) {
            let checked = self.confirm_token(token).await;
            self.interrupted(checked).await?;
        }
        Ok(())
    }

    async fn recover_from_coordinator(&mut self, note: &str) -> Result<(), AgentError> {
        loop {
            let ask = self.call(
                self.coordinator
                    .acquire("state file lost: asking what this node holds", false),
            );
            let answer = tokio::select! {
                a = ask => a,
                _ = self.shutdown.cancelled() => return Ok(()),
            };
            match answer {
                Ok(None) => {
                    tracing::info!("coordinator: this node holds nothing");
                    return Ok(());
                }
                Ok(Some(grant)) if grant.resumed => {
                    tracing::warn!(
                        token = grant.fencing_token,
                        "coordinator: this node holds the baton; restarting maintenance from the grant"
                    );
                    self.state.reason = "resumed after state loss".into();
                    return self.granted(grant, &format!("resumed: {note}")).await;
                }
                Ok(Some(grant)) => {
                    // The queue was empty, so asking got us a fresh grant.
                    // Nothing is held from before: give it back at once.
                    tracing::info!(
                        token = grant.fencing_token,
                        "coordinator granted afresh; releasing"
                    );
                    let _ = self
                        .release_with_retry(grant.fencing_token, "state recovery: nothing was held")
                        .await;
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot ask the coordinator yet");
                    self.pause(self.settings.retry_interval).await;
                }
            }
        }
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {},
            _ = self.shutdown.cancelled() => {},
        }
    }

    /// The wall clock now, in milliseconds since the epoch.
    fn now_ms(&self) -> u64 {
        (self.clock)()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Persist the state as it is now.
    fn save(&self) -> Result<(), Interrupted> {
        self.state_file
            .save(&self.state)
            .map_err(|e| fatal(e.into()))
    }

    /// Apply `event`, persist and report the new phase. An illegal transition
    /// (a bug) fails the maintenance instead of panicking.
    async fn advance(&mut self, event: Event, message: &str) -> Result<(), AgentError> {
        let from = self.state.phase;
        self.stale_restarts = 0;
        let error = self.state.error.clone();
        match transition(self.state.phase, &event) {
            Ok(next) => self.state.phase = next,
            Err(illegal) => {
                tracing::error!(%illegal, "illegal transition");
                if self.state.phase.holds_baton() {
                    self.state.phase = Phase::Failed;
                    self.state.error = Some(illegal.to_string());
                }
            }
        }
        if !self.state.phase.holds_baton() {
            self.state.fencing_token = None;
            self.state.boot_id_before_reboot = None;
            self.state.error = None;
            self.state.update_started = None;
            self.state.reboot_requests = 0;
            self.state.lease = None;
        }
        self.state_file.save(&self.state)?;
        tracing::info!(phase = %self.state.phase, token = ?self.state.fencing_token, message, "phase");
        self.report(message).await;
        let to = self.state.phase;
        let change = PhaseChange {
            from,
            to,
            fencing_token: self.state.fencing_token,
            message: text::message(message),
            error: error.filter(|_| {
                matches!(to, Phase::Failed | Phase::Aborting) || from == Phase::Aborting
            }),
        };
        self.show(self.node_ops.show_phase(&change)).await;
        Ok(())
    }

    /// Run a best-effort visibility call, bounded.
    async fn show(&self, call: impl Future<Output = ()>) {
        if tokio::time::timeout(VISIBILITY_TIMEOUT, call)
            .await
            .is_err()
        {
            tracing::warn!("showing the phase on the node took too long; skipped");
        }
    }

    /// A coordinator call with the call deadline.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, CoordinatorError>>,
    ) -> Result<T, CoordinatorError> {
        match tokio::time::timeout(self.settings.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CoordinatorError::Call(format!(
                "no answer within {}",
                humantime::format_duration(self.settings.call_timeout)
            ))),
        }
    }

    /// Report the phase with `message` (best effort: the phase is already
    /// persisted). The text is cut to the API's limits. True when the
    /// coordinator took it.
    async fn report(&self, message: &str) -> bool {
        let Some(token) = self.state.fencing_token else {
            return false;
        };
        let report = Report {
            phase: self.state.phase,
            boot_id: self.host.boot_id().await.unwrap_or_default(),
            message: text::message(message),
            error: text::error(&self.error_text()),
        };
        match self.call(self.coordinator.report(token, &report)).await {
            Ok(()) => true,
            Err(CoordinatorError::Refused(why)) => {
                tracing::error!(why, "the coordinator refused the report");
                false
            }
            Err(error) => {
                tracing::warn!(%error, "report failed");
                false
            }
        }
    }

    /// The report's error: the error and the last lines of output (the
    /// error field has room for them; the message does not).
    fn error_text(&self) -> String {
        let Some(error) = &self.state.error else {
            return String::new();
        };
        if self.state.update_output.is_empty() || self.state.phase != Phase::Failed {
            error.clone()
        } else {
            format!("{error}\nlast output:\n{}", self.state.update_output)
        }
    }

    async fn fail(&mut self, error: String, output: &str) -> Result<(), Interrupted> {
        tracing::error!(%error, "maintenance step failed; keeping the baton");
        self.state.update_output = output.to_string();
        let message = format!("failed: {error}");
        self.state.error = Some(error);
        self.advance(Event::StepFailed, &message)
            .await
            .map_err(fatal)
    }

    /// The report message of a failed maintenance (the output is in the
    /// report's error).
    fn failure_message(&self) -> String {
        format!("failed: {}", self.state.error.clone().unwrap_or_default())
    }

    /// The job of `action` for the grant `token`.
    fn job(&self, action: &Action, what: &str, token: u64) -> Job {
        match action {
            Action::Unit(unit) => Job::Unit(unit.clone()),
            Action::Command(command) => Job::Command {
                unit: format!("baton-{what}-{token}.service"),
                command: command.clone(),
                output: self.state_file.dir().join(format!("{what}-{token}.log")),
            },
        }
    }

    /// The baton is not ours any more: give the node back (retried until it
    /// works, so that the node is never left cordoned), hold back before
    /// asking again, and go idle.
    async fn lost_baton(&mut self, why: &str) -> Result<(), AgentError> {
        tracing::warn!(why, phase = %self.state.phase, "the baton is no longer ours; giving the node back");
        // The update must not go on once the baton is someone else's,
        // whatever the phase: a Failed maintenance (a refused renewal, a
        // restart that could not tell whether the run ended) may have
        // left it running, and the node is given back below.
        if let (Some(token), Some(action)) =
            (self.state.fencing_token, self.settings.update.clone())
            && self.state.update_started == Some(token)
        {
            let job = self.job(&action, "update", token);
            // Retried until it works: the node is not given back while its
            // update may still run for a baton that is someone else's now.
            let mut failures = 0u32;
            while let Err(error) = self.host.stop(&job).await {
                failures += 1;
                tracing::warn!(%error, failures, unit = job.unit_name(), "stopping the update failed; the node is not given back until it is stopped");
                self.pause(lease::backoff(self.settings.retry_interval, failures))
                    .await;
                if self.shutdown.is_cancelled() {
                    // The phase is unchanged: a restarted agent finds the
                    // token refused and comes back here.
                    return Ok(());
                }
            }
        }
        let mut failures = 0u32;
        loop {
            match self
                .node_ops
                .abort("the baton was lost during maintenance")
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "giving the node back failed; retrying");
                    self.pause(lease::backoff(self.settings.retry_interval, failures))
                        .await;
                    if self.shutdown.is_cancelled() {
                        // The phase is unchanged: a restarted agent finds
                        // the token refused and comes back here.
                        return Ok(());
                    }
                }
            }
        }
        self.hold_back(hold_back::Ending::Lost);
        self.state.fencing_token = None;
        self.advance(Event::Fenced, "baton lost").await
    }

    /// Record the hold-back after a maintenance that ended as `ending`.
    fn hold_back(&mut self, ending: hold_back::Ending) {
        let next = hold_back::after_maintenance(
            self.state.hold_back.as_ref(),
            &self.state.reason,
            ending,
            self.settings.abort_backoff,
            self.now_ms(),
        );
        tracing::info!(
            streak = next.streak,
            hold_back_ms = next.until_ms.saturating_sub(self.now_ms()),
            why = next.why,
            "holding back before the next request"
        );
        self.state.hold_back = Some(next);
    }
}

/// The grant's lease terms, as persisted.
fn lease_terms(grant: &Grant, settings: &Settings) -> crate::state::LeaseTerms {
    let renew = grant
        .renew_interval
        .filter(|i| !i.is_zero())
        .map_or(settings.renew_interval, |i| i.min(settings.renew_interval))
        .max(MIN_RENEW_INTERVAL);
    crate::state::LeaseTerms {
        renew_interval_ms: renew.as_millis() as u64,
        overdue_after_ms: grant.overdue_after.map(|d| d.as_millis() as u64),
    }
}

/// An error that must stop the agent, carried through a step's result.
fn fatal(error: AgentError) -> Interrupted {
    tracing::error!(%error, "stopping: cannot persist state");
    Interrupted::Fatal(error)
}
