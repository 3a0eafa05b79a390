//! [`Agent`]: drives the phase machine of [`crate::phase`] with the I/O of the
//! three boundaries ([`HostOs`], [`Coordinator`], [`NodeOps`]).
//!
//! Each loop iteration runs the step of the current phase, feeds the outcome
//! to [`transition`], persists the new phase and reports it. While the baton
//! is held, renewals run alongside every step; a refused fencing token stops
//! the step and gives the node back to service. State is written with
//! synchronous calls between await points, so cancelling a step on SIGTERM
//! can never interrupt a write.

use crate::coordinator::{Coordinator, CoordinatorError, Grant, Report};
use crate::host::{HostOs, Job};
use crate::node_ops::{NodeOps, PhaseChange};
use crate::phase::{Event, Phase, transition};
use crate::state::{AgentState, Loaded, StateError, StateFile};
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod inhibitors;

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
    /// How often to renew (a shorter interval from the coordinator wins).
    pub renew_interval: Duration,
    /// How long to wait before retrying a failed coordinator call.
    pub retry_interval: Duration,
    /// How long to hold back after an aborted maintenance before asking
    /// again (doubles with every abort in a row, see [`abort_backoff`]).
    pub abort_backoff: Duration,
    /// How long to wait for logind's block inhibitors on shutdown to go
    /// before the reboot; then the maintenance fails.
    pub inhibitor_timeout: Duration,
    /// Reboot even while block inhibitors are held.
    pub ignore_inhibitors: bool,
}

/// The longest hold-back after aborted maintenances, unless the base
/// backoff itself is longer.
pub const MAX_ABORT_BACKOFF: Duration = Duration::from_secs(3600);

/// How long to hold back after the `aborts`-th aborted maintenance in a
/// row: `base`, doubling each time, at most [`MAX_ABORT_BACKOFF`] (or
/// `base` when that is longer). A drain blocked by a disruption budget is
/// likely to be blocked again at once, so asking again at the next check
/// would only take the node out of service and back over and over.
pub fn abort_backoff(base: Duration, aborts: u32) -> Duration {
    let doublings = aborts.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings)
        .min(MAX_ABORT_BACKOFF.max(base))
}

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
    /// Set when a maintenance just ended: wait for the next wake before
    /// checking the need again, so that a need that does not go away (an
    /// update check that keeps saying yes) cannot chain maintenances back
    /// to back.
    cooldown: bool,
    /// Aborted maintenances in a row (reset by one that finishes).
    aborts_in_a_row: u32,
    /// Set after an aborted maintenance: how long to hold back before
    /// checking the need (and asking) again.
    hold_off: Option<Duration>,
    /// What blocked the last request for the baton (shown on the node
    /// while non-empty).
    blockers: Vec<String>,
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
            cooldown: false,
            aborts_in_a_row: 0,
            hold_off: None,
            blockers: Vec::new(),
        }
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
                Phase::Granted => {
                    self.advance(Event::Started, "maintenance starts").await?;
                    Ok(())
                }
                Phase::Preparing => self.preparing(token).await,
                Phase::Updating => self.updating(token).await,
                Phase::Rebooting => self.after_boot().await,
                Phase::Verifying => self.verifying(token).await,
                Phase::Finishing => self.finishing(token).await,
                Phase::Aborting => self.aborting(token).await,
                Phase::Failed => self.failed(token).await,
            };
            match result {
                Ok(()) => {}
                Err(Interrupted::Shutdown) => break,
                Err(Interrupted::Fenced(why)) => self.lost_baton(&why).await?,
                Err(Interrupted::Fatal(error)) => return Err(error),
            }
        }
        tracing::info!(phase = %self.state.phase, "shutting down");
        Ok(())
    }

    /// Load the state file; a corrupt one is kept aside and the coordinator
    /// tells us what we hold.
    async fn load(&mut self) -> Result<(), AgentError> {
        match self.state_file.load()? {
            Loaded::Missing => self.state = AgentState::idle(),
            Loaded::Valid(state) => {
                tracing::info!(phase = %state.phase, token = ?state.fencing_token, "resuming from state file");
                self.state = state;
            }
            Loaded::Corrupt { moved_to, error } => {
                tracing::error!(moved_to = %moved_to.display(), %error, "state file corrupt; kept aside, asking the coordinator what this node holds");
                self.state = AgentState::idle();
                self.recover_from_coordinator(&format!(
                    "state file was corrupt ({error}); kept at {}",
                    moved_to.display()
                ))
                .await?;
            }
        }
        Ok(())
    }

    async fn recover_from_coordinator(&mut self, note: &str) -> Result<(), AgentError> {
        loop {
            let ask = self
                .coordinator
                .acquire("state file lost: asking what this node holds", false);
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
                    if let Err(error) = self
                        .coordinator
                        .release(grant.fencing_token, "state recovery: nothing was held")
                        .await
                    {
                        tracing::warn!(%error, "release after state recovery failed");
                    }
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

    /// Apply `event`, persist and report the new phase. An illegal transition
    /// (a bug) fails the maintenance instead of panicking.
    async fn advance(&mut self, event: Event, message: &str) -> Result<(), AgentError> {
        let from = self.state.phase;
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
        }
        self.state_file.save(&self.state)?;
        tracing::info!(phase = %self.state.phase, token = ?self.state.fencing_token, message, "phase");
        self.report(message).await;
        let to = self.state.phase;
        let change = PhaseChange {
            from,
            to,
            fencing_token: self.state.fencing_token,
            message: message.to_string(),
            error: error.filter(|_| {
                matches!(to, Phase::Failed | Phase::Aborting) || from == Phase::Aborting
            }),
        };
        self.node_ops.show_phase(&change).await;
        Ok(())
    }

    async fn report(&self, message: &str) {
        let Some(token) = self.state.fencing_token else {
            return;
        };
        let report = Report {
            phase: self.state.phase,
            boot_id: self.host.boot_id().await.unwrap_or_default(),
            message: message.to_string(),
            error: self.state.error.clone().unwrap_or_default(),
        };
        if let Err(error) = self.coordinator.report(token, &report).await {
            tracing::warn!(%error, "report failed");
        }
    }

    /// Run `step` while renewing the baton every renew interval.
    async fn holding<T>(
        &self,
        token: u64,
        step: impl Future<Output = T>,
    ) -> Result<T, Interrupted> {
        let renewals = async {
            loop {
                tokio::time::sleep(self.settings.renew_interval).await;
                match self.coordinator.renew(token).await {
                    Ok(()) => tracing::debug!(token, "renewed"),
                    Err(CoordinatorError::Fenced(why)) => return why,
                    Err(error) => tracing::warn!(%error, "renew failed; retrying"),
                }
            }
        };
        tokio::select! {
            out = step => Ok(out),
            why = renewals => Err(Interrupted::Fenced(why)),
            _ = self.shutdown.cancelled() => Err(Interrupted::Shutdown),
        }
    }

    async fn fail(&mut self, error: String, output: &str) -> Result<(), Interrupted> {
        tracing::error!(%error, "maintenance step failed; keeping the baton");
        self.state.error = Some(error);
        self.state.update_output = output.to_string();
        let message = self.failure_message();
        self.advance(Event::StepFailed, &message)
            .await
            .map_err(fatal)
    }

    /// The report message of a failed maintenance: the error and the last
    /// lines of output, so an operator sees why in `batonctl status`.
    fn failure_message(&self) -> String {
        let error = self.state.error.clone().unwrap_or_default();
        if self.state.update_output.is_empty() {
            format!("failed: {error}")
        } else {
            format!(
                "failed: {error}; last output:\n{}",
                self.state.update_output
            )
        }
    }

    async fn idle(&mut self, wakes: &mut watch::Receiver<u64>) -> Result<(), Interrupted> {
        if let Some(hold_off) = self.hold_off.take() {
            tracing::info!(
                hold_off = %humantime::format_duration(hold_off),
                aborts_in_a_row = self.aborts_in_a_row,
                "maintenance was aborted; holding back before asking again"
            );
            self.pause(hold_off).await;
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
            }
        }
        if std::mem::take(&mut self.cooldown) {
            wakes.borrow_and_update();
            tokio::select! {
                changed = wakes.changed() => if changed.is_err() { return Err(Interrupted::Shutdown) },
                _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
            }
        }
        loop {
            wakes.borrow_and_update();
            let need = self.host.maintenance_needed().await;
            let blockers = match &need {
                Some(_) => self.blockers().await,
                None => Vec::new(),
            };
            self.show_blockers(blockers).await;
            if let Some(reason) = need
                && self.blockers.is_empty()
            {
                tracing::info!(reason, "maintenance needed");
                self.state.reason = reason;
                self.state.phase =
                    transition(Phase::Idle, &Event::MaintenanceNeeded).unwrap_or(Phase::Waiting);
                return Ok(());
            }
            tokio::select! {
                changed = wakes.changed() => if changed.is_err() { return Err(Interrupted::Shutdown) },
                _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
            }
        }
    }

    /// What keeps the node from asking for the baton now. A check that
    /// fails counts as blocked: a blocking pod may be running.
    async fn blockers(&self) -> Vec<String> {
        match self.node_ops.blockers().await {
            Ok(blockers) => blockers,
            Err(error) => vec![format!("cannot check for blocking pods: {error}")],
        }
    }

    /// Log and show the blockers when they changed since the last check.
    async fn show_blockers(&mut self, blockers: Vec<String>) {
        if blockers == self.blockers {
            return;
        }
        if blockers.is_empty() {
            tracing::info!("nothing blocks the request for the baton any more");
        } else {
            tracing::warn!(blockers = ?blockers, "maintenance held back: not asking for the baton while these run");
        }
        self.node_ops.show_waiting(&blockers).await;
        self.blockers = blockers;
    }

    async fn waiting(&mut self, wakes: &mut watch::Receiver<u64>) -> Result<(), Interrupted> {
        let reason = self.state.reason.clone();
        let need_cleared = async {
            loop {
                if wakes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if self.host.maintenance_needed().await.is_none() {
                    return;
                }
            }
        };
        let answer = tokio::select! {
            a = self.coordinator.acquire(&reason, true) => a,
            _ = need_cleared => {
                tracing::info!("maintenance no longer needed; request withdrawn");
                self.state.phase = Phase::Idle;
                return Ok(());
            }
            _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
        };
        match answer {
            Ok(Some(grant)) => self.granted(grant, "baton granted").await.map_err(fatal),
            Ok(None) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "acquire failed; retrying");
                self.pause(self.settings.retry_interval).await;
                Ok(())
            }
        }
    }

    async fn granted(&mut self, grant: Grant, message: &str) -> Result<(), AgentError> {
        tracing::info!(
            token = grant.fencing_token,
            resumed = grant.resumed,
            "baton granted"
        );
        if let Some(interval) = grant.renew_interval
            && interval < self.settings.renew_interval
            && !interval.is_zero()
        {
            self.settings.renew_interval = interval;
        }
        self.state.fencing_token = Some(grant.fencing_token);
        self.advance(Event::Granted, message).await
    }

    async fn preparing(&mut self, token: u64) -> Result<(), Interrupted> {
        match self.holding(token, self.node_ops.prepare()).await? {
            Ok(()) => self
                .advance(Event::Prepared, "node prepared")
                .await
                .map_err(fatal),
            Err(error) if error.aborts_maintenance() => {
                tracing::warn!(%error, "preparing gave up and left the node in service; aborting the maintenance");
                self.state.error = Some(format!("prepare: {error}"));
                self.advance(Event::PrepareAborted, "maintenance aborted")
                    .await
                    .map_err(fatal)
            }
            Err(error) => self.fail(format!("prepare: {error}"), "").await,
        }
    }

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

    async fn updating(&mut self, token: u64) -> Result<(), Interrupted> {
        let mut message = "no update configured".to_string();
        if let Some(action) = self.settings.update.clone() {
            let job = self.job(&action, "update", token);
            let run = self.host.run(&job, self.settings.update_timeout);
            let ran = self.holding(token, run).await;
            if let Err(Interrupted::Fenced(_)) = &ran
                && let Err(error) = self.host.stop(&job).await
            {
                // The update must not go on once the baton is someone else's.
                tracing::error!(unit = job.unit_name(), %error, "the baton was lost; stopping the update failed");
            }
            match ran? {
                Ok(outcome) if outcome.success => {
                    self.state.update_output = outcome.output_tail.clone();
                    message = format!("update done ({})", outcome.detail);
                    if !outcome.output_tail.is_empty() {
                        message.push_str(&format!("; last output:\n{}", outcome.output_tail));
                    }
                }
                Ok(outcome) => {
                    return self
                        .fail(
                            format!("update {} failed: {}", job.unit_name(), outcome.detail),
                            &outcome.output_tail,
                        )
                        .await;
                }
                Err(error) => return self.fail(format!("update: {error}"), "").await,
            }
        }
        let reboot_required = self.host.reboot_required().await;
        self.advance(Event::Updated { reboot_required }, &message)
            .await
            .map_err(fatal)?;
        if reboot_required {
            self.reboot(token).await?;
        }
        Ok(())
    }

    /// Persist the boot_id, confirm the token, ask for the reboot and wait to
    /// be stopped by the shutdown. Guarantee: the reboot call is made only
    /// after the Rebooting phase with the current boot_id is on disk and the
    /// coordinator accepted our token moments before.
    async fn reboot(&mut self, token: u64) -> Result<(), Interrupted> {
        let boot_id = match self.host.boot_id().await {
            Ok(id) => id,
            Err(error) => return self.fail(format!("reading boot_id: {error}"), "").await,
        };
        self.state.boot_id_before_reboot = Some(boot_id.clone());
        self.state_file
            .save(&self.state)
            .map_err(|e| fatal(e.into()))?;
        if let Err(why) = self.wait_for_inhibitors(token).await? {
            return self.fail(why, "").await;
        }
        loop {
            match self.coordinator.renew(token).await {
                Ok(()) => break,
                Err(CoordinatorError::Fenced(why)) => return Err(Interrupted::Fenced(why)),
                Err(error) => {
                    tracing::warn!(%error, "cannot confirm the token before rebooting; waiting");
                    self.pause(self.settings.retry_interval).await;
                    if self.shutdown.is_cancelled() {
                        return Err(Interrupted::Shutdown);
                    }
                }
            }
        }
        tracing::info!(boot_id, token, "rebooting");
        if let Err(error) = self.host.reboot().await {
            return self.fail(format!("reboot: {error}"), "").await;
        }
        let timeout = self.settings.reboot_timeout;
        self.holding(token, tokio::time::sleep(timeout)).await?;
        self.fail(
            format!(
                "reboot did not happen within {}",
                humantime::format_duration(timeout)
            ),
            "",
        )
        .await
    }

    /// Started in Rebooting: the boot_id must have changed.
    async fn after_boot(&mut self) -> Result<(), Interrupted> {
        let now = match self.host.boot_id().await {
            Ok(id) => id,
            Err(error) => return self.fail(format!("reading boot_id: {error}"), "").await,
        };
        let before = self.state.boot_id_before_reboot.clone().unwrap_or_default();
        let boot_changed = now != before;
        if !boot_changed {
            self.state.error = Some(format!("reboot did not happen (boot_id still {now})"));
        }
        tracing::info!(before, now, boot_changed, "started after reboot request");
        self.advance(Event::Booted { boot_changed }, "back after reboot")
            .await
            .map_err(fatal)
    }

    async fn verifying(&mut self, token: u64) -> Result<(), Interrupted> {
        if let Err(error) = self
            .holding(token, self.node_ops.wait_ready_after_boot())
            .await?
        {
            return self.fail(format!("readiness: {error}"), "").await;
        }
        if let Some(action) = self.settings.post_check.clone() {
            let job = self.job(&action, "post-check", token);
            let run = self.host.run(&job, self.settings.post_check_timeout);
            match self.holding(token, run).await? {
                Ok(outcome) if outcome.success => {}
                Ok(outcome) => {
                    return self
                        .fail(
                            format!("post-check failed: {}", outcome.detail),
                            &outcome.output_tail,
                        )
                        .await;
                }
                Err(error) => return self.fail(format!("post-check: {error}"), "").await,
            }
        }
        self.advance(Event::Verified, "verified")
            .await
            .map_err(fatal)
    }

    async fn finishing(&mut self, token: u64) -> Result<(), Interrupted> {
        if let Err(error) = self.holding(token, self.node_ops.finish()).await? {
            return self.fail(format!("finish: {error}"), "").await;
        }
        self.release_with_retry(token, "maintenance complete")
            .await?;
        tracing::info!(token, "baton released");
        self.cooldown = true;
        self.aborts_in_a_row = 0;
        self.advance(Event::Released, "released")
            .await
            .map_err(fatal)
    }

    /// Aborting: give the node back (again: idempotent, a restarted agent
    /// comes here too), release the baton with the reason, and hold back
    /// before asking again. Guarantee: reached only from Preparing, so
    /// nothing was updated and no reboot was asked for.
    async fn aborting(&mut self, token: u64) -> Result<(), Interrupted> {
        let error = self
            .state
            .error
            .clone()
            .unwrap_or_else(|| "preparing gave up".to_string());
        if let Err(undo) = self.holding(token, self.node_ops.abort(&error)).await? {
            // The node may still be cordoned: keep the baton (fail closed)
            // rather than let another node go down as well.
            return self
                .fail(format!("{error}; giving the node back failed: {undo}"), "")
                .await;
        }
        let reason = format!("maintenance aborted: {error}");
        self.release_with_retry(token, &reason).await?;
        self.aborts_in_a_row = self.aborts_in_a_row.saturating_add(1);
        let hold_off = abort_backoff(self.settings.abort_backoff, self.aborts_in_a_row);
        self.hold_off = Some(hold_off);
        tracing::warn!(token, reason, hold_off = %humantime::format_duration(hold_off), "baton released after an aborted maintenance");
        self.advance(Event::Released, &reason).await.map_err(fatal)
    }

    /// Release, retrying until the coordinator answers. A refused token
    /// means the baton is not ours any more, which is what we wanted.
    async fn release_with_retry(&self, token: u64, reason: &str) -> Result<(), Interrupted> {
        loop {
            match self.coordinator.release(token, reason).await {
                Ok(()) => return Ok(()),
                Err(CoordinatorError::Fenced(why)) => {
                    tracing::warn!(why, "release refused: the baton was no longer ours");
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(%error, "release failed; retrying");
                    self.pause(self.settings.retry_interval).await;
                    if self.shutdown.is_cancelled() {
                        return Err(Interrupted::Shutdown);
                    }
                }
            }
        }
    }

    /// Failed: keep the baton (renewing it) until an operator force-releases
    /// it or the agent is stopped.
    async fn failed(&mut self, token: u64) -> Result<(), Interrupted> {
        self.report(&self.failure_message()).await;
        self.holding(token, std::future::pending::<()>()).await
    }

    async fn lost_baton(&mut self, why: &str) -> Result<(), AgentError> {
        tracing::warn!(why, phase = %self.state.phase, "the baton is no longer ours; giving the node back");
        if let Err(error) = self
            .node_ops
            .abort("the baton was lost during maintenance")
            .await
        {
            tracing::warn!(%error, "abort failed");
        }
        self.state.fencing_token = None;
        self.cooldown = true;
        self.advance(Event::Fenced, "baton lost").await
    }
}

/// An error that must stop the agent, carried through a step's result.
fn fatal(error: AgentError) -> Interrupted {
    tracing::error!(%error, "stopping: cannot persist state");
    Interrupted::Fatal(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeCoordinator, FakeHost, FakeNodeOps, PrepareOutcome};
    use std::sync::Arc;

    struct World {
        host: Arc<FakeHost>,
        coordinator: Arc<FakeCoordinator>,
        node_ops: Arc<FakeNodeOps>,
        dir: tempfile::TempDir,
    }

    fn world() -> World {
        let host = Arc::new(FakeHost::default());
        *host.boot_id.lock().unwrap() = "boot-1".into();
        *host.update_succeeds.lock().unwrap() = true;
        World {
            host,
            coordinator: Arc::new(FakeCoordinator::default()),
            node_ops: Arc::new(FakeNodeOps::default()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn settings() -> Settings {
        Settings {
            update: Some(Action::Command("apt-get -y upgrade".into())),
            post_check: None,
            update_timeout: Duration::from_secs(60),
            post_check_timeout: Duration::from_secs(60),
            reboot_timeout: Duration::from_secs(600),
            renew_interval: Duration::from_secs(5),
            retry_interval: Duration::from_secs(1),
            abort_backoff: Duration::from_secs(300),
            inhibitor_timeout: Duration::from_secs(1800),
            ignore_inhibitors: false,
        }
    }

    /// An agent over the world's fakes with the test settings.
    fn agent_in(
        w: &World,
        shutdown: &CancellationToken,
    ) -> Agent<Arc<FakeHost>, Arc<FakeCoordinator>, Arc<FakeNodeOps>> {
        Agent::new(
            w.host.clone(),
            w.coordinator.clone(),
            w.node_ops.clone(),
            StateFile::new(w.dir.path()),
            settings(),
            shutdown.clone(),
        )
    }

    /// Run an agent until `done` holds (then stop it like SIGTERM would) or
    /// until it stops by itself (a reboot cancels it).
    async fn run_until(w: &World, done: impl Fn() -> bool) -> AgentState {
        let shutdown = CancellationToken::new();
        *w.host.on_reboot.lock().unwrap() = Some(shutdown.clone());
        let mut agent = agent_in(w, &shutdown);
        let (_tx, wakes) = watch::channel(0);
        let stop = async {
            while !done() && !shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            shutdown.cancel();
        };
        let (result, ()) = tokio::join!(agent.run(wakes), stop);
        result.unwrap();
        agent.state().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn sentinel_update_reboot_verify_release() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("/run/reboot-required exists".into());
        *w.host.reboot_required.lock().unwrap() = true;
        let state = run_until(&w, || false).await;
        assert_eq!(state.phase, Phase::Rebooting);
        assert_eq!(state.boot_id_before_reboot.as_deref(), Some("boot-1"));
        assert_eq!(*w.host.reboots.lock().unwrap(), 1);
        assert!(
            *w.coordinator.renews.lock().unwrap() >= 1,
            "token re-checked before reboot"
        );
        assert!(w.coordinator.releases.lock().unwrap().is_empty());

        // The machine comes back with another boot_id and no sentinel.
        *w.host.boot_id.lock().unwrap() = "boot-2".into();
        *w.host.need.lock().unwrap() = None;
        *w.host.reboot_required.lock().unwrap() = false;
        let c = w.coordinator.clone();
        let state = run_until(&w, move || !c.releases.lock().unwrap().is_empty()).await;
        assert_eq!(state.phase, Phase::Idle);
        assert_eq!(*w.coordinator.releases.lock().unwrap(), vec![1]);
        assert_eq!(
            w.coordinator.phases(),
            vec![
                Phase::Granted,
                Phase::Preparing,
                Phase::Updating,
                Phase::Rebooting,
                Phase::Verifying,
                Phase::Finishing
            ]
        );
        assert_eq!(
            *w.node_ops.calls.lock().unwrap(),
            vec!["prepare", "ready", "finish"]
        );
        assert_eq!(w.host.jobs.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_update_keeps_the_baton_and_does_not_reboot() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        *w.host.update_succeeds.lock().unwrap() = false;
        *w.host.reboot_required.lock().unwrap() = true;
        let c = w.coordinator.clone();
        let state = run_until(&w, move || *c.renews.lock().unwrap() >= 3).await;
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.error.unwrap().contains("exit status 3"));
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
        assert!(w.coordinator.releases.lock().unwrap().is_empty());
        let reports = w.coordinator.reports.lock().unwrap();
        // Every Failed report (also the ones repeated later) carries the
        // output.
        let (_, failed) = reports
            .iter()
            .rev()
            .find(|(_, r)| r.phase == Phase::Failed)
            .unwrap();
        assert!(failed.message.contains("boom"), "{failed:?}");
        assert!(!failed.error.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_reboot_needed_releases_without_reboot() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        let c = w.coordinator.clone();
        let state = run_until(&w, move || !c.releases.lock().unwrap().is_empty()).await;
        assert_eq!(state.phase, Phase::Idle);
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
        assert!(!w.coordinator.phases().contains(&Phase::Rebooting));
    }

    #[tokio::test(start_paused = true)]
    async fn same_boot_id_after_restart_means_the_reboot_did_not_happen() {
        let w = world();
        let file = StateFile::new(w.dir.path());
        file.save(&AgentState {
            phase: Phase::Rebooting,
            fencing_token: Some(4),
            boot_id_before_reboot: Some("boot-1".into()),
            ..AgentState::idle()
        })
        .unwrap();
        *w.coordinator.held.lock().unwrap() = Some(4);
        let c = w.coordinator.clone();
        let state = run_until(&w, move || c.phases().contains(&Phase::Failed)).await;
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.error.unwrap().contains("reboot did not happen"));
        assert!(w.coordinator.releases.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn corrupt_state_asks_the_coordinator_and_resumes_the_grant() {
        let w = world();
        std::fs::write(w.dir.path().join("state.json"), b"{\"phase\":").unwrap();
        *w.coordinator.held.lock().unwrap() = Some(9);
        let c = w.coordinator.clone();
        let state = run_until(&w, move || !c.releases.lock().unwrap().is_empty()).await;
        assert_eq!(state.phase, Phase::Idle);
        assert_eq!(*w.coordinator.releases.lock().unwrap(), vec![9]);
        assert!(w.dir.path().join("state.json.corrupt-0").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn force_release_while_failed_gives_the_node_back() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        *w.host.update_succeeds.lock().unwrap() = false;
        let c = w.coordinator.clone();
        let n = w.node_ops.clone();
        // Fence the holder once it has failed.
        let c2 = w.coordinator.clone();
        let state = run_until(&w, move || {
            if c.phases().contains(&Phase::Failed) {
                *c2.fenced.lock().unwrap() = true;
            }
            n.calls.lock().unwrap().contains(&"abort")
        })
        .await;
        // After losing the baton the need is still there, so it asks again.
        assert!(matches!(
            state.phase,
            Phase::Idle
                | Phase::Waiting
                | Phase::Granted
                | Phase::Preparing
                | Phase::Updating
                | Phase::Failed
        ));
        assert!(w.node_ops.calls.lock().unwrap().contains(&"abort"));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_timeout_aborts_releases_with_the_reason_and_holds_back() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("/run/reboot-required exists".into());
        *w.host.reboot_required.lock().unwrap() = true;
        *w.node_ops.prepare.lock().unwrap() = PrepareOutcome::DrainTimeout;
        let c = w.coordinator.clone();
        let state = run_until(&w, move || !c.releases.lock().unwrap().is_empty()).await;
        assert_eq!(state.phase, Phase::Idle);
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
        assert!(w.host.jobs.lock().unwrap().is_empty(), "no update ran");
        assert_eq!(*w.coordinator.releases.lock().unwrap(), vec![1]);
        let reasons = w.coordinator.release_reasons.lock().unwrap().clone();
        assert!(reasons[0].contains("drain timed out"), "{reasons:?}");
        // The error was reported while aborting.
        let reports = w.coordinator.reports.lock().unwrap().clone();
        let (_, aborting) = reports
            .iter()
            .find(|(_, r)| r.phase == Phase::Aborting)
            .expect("an Aborting report");
        assert!(aborting.error.contains("drain timed out"));
        assert_eq!(*w.node_ops.calls.lock().unwrap(), vec!["prepare", "abort"]);
        // Every phase change was shown on the node, the release with the error.
        let shown = w.node_ops.shown.lock().unwrap().clone();
        let last = shown.last().unwrap();
        assert_eq!((last.from, last.to), (Phase::Aborting, Phase::Idle));
        assert!(last.error.as_deref().unwrap().contains("drain timed out"));
        assert!(shown.iter().any(|c| c.to == Phase::Granted));
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_abort_the_agent_holds_back_before_asking_again() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        *w.node_ops.prepare.lock().unwrap() = PrepareOutcome::DrainTimeout;
        let c = w.coordinator.clone();
        let started = tokio::time::Instant::now();
        run_until(&w, move || c.releases.lock().unwrap().len() >= 2).await;
        // The second request came only after the backoff (paused clock:
        // this measures virtual time, not the machine's speed).
        assert!(started.elapsed() >= settings().abort_backoff);
        assert_eq!(*w.coordinator.acquires.lock().unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn other_prepare_errors_still_fail_closed() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        *w.node_ops.prepare.lock().unwrap() = PrepareOutcome::Error;
        let c = w.coordinator.clone();
        let state = run_until(&w, move || c.phases().contains(&Phase::Failed)).await;
        assert_eq!(state.phase, Phase::Failed);
        assert!(w.coordinator.releases.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn blockers_keep_the_agent_from_asking_until_they_are_gone() {
        let w = world();
        *w.host.need.lock().unwrap() = Some("updates available".into());
        *w.node_ops.blockers.lock().unwrap() = vec!["ci/job-1 (matches app=ci)".into()];
        let shutdown = CancellationToken::new();
        let mut agent = agent_in(&w, &shutdown);
        let (tick, wakes) = watch::channel(0);
        let driver = async {
            // Several periodic ticks while blocked: no request.
            for n in 1..=3 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                tick.send(n).unwrap();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(*w.coordinator.acquires.lock().unwrap(), 0);
            assert_eq!(
                *w.node_ops.waiting_shown.lock().unwrap(),
                vec![vec!["ci/job-1 (matches app=ci)".to_string()]],
                "shown once, not on every tick"
            );
            // The pod is gone: the next tick asks.
            w.node_ops.blockers.lock().unwrap().clear();
            tick.send(4).unwrap();
            while w.coordinator.releases.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            shutdown.cancel();
        };
        let (result, ()) = tokio::join!(agent.run(wakes), driver);
        result.unwrap();
        assert_eq!(*w.coordinator.acquires.lock().unwrap(), 1);
        assert_eq!(
            w.node_ops.waiting_shown.lock().unwrap().last().unwrap(),
            &Vec::<String>::new()
        );
    }

    // ---- The host layer's contract as the agent uses it: inhibitors,
    // ---- stopping an update that lost its baton or its time.

    /// Run an agent with `settings` until `done` holds or it stops itself;
    /// panics after four hours of (virtual) time, so a wrong agent fails the
    /// test instead of hanging it.
    async fn run_with(w: &World, settings: Settings, done: impl Fn() -> bool) -> AgentState {
        let shutdown = CancellationToken::new();
        *w.host.on_reboot.lock().unwrap() = Some(shutdown.clone());
        let mut agent = Agent::new(
            w.host.clone(),
            w.coordinator.clone(),
            w.node_ops.clone(),
            StateFile::new(w.dir.path()),
            settings,
            shutdown.clone(),
        );
        let (_tx, wakes) = watch::channel(0);
        let limit = tokio::time::Instant::now() + Duration::from_secs(4 * 3600);
        let stop = async {
            while !done() && !shutdown.is_cancelled() {
                assert!(
                    tokio::time::Instant::now() < limit,
                    "the agent never got there"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            shutdown.cancel();
        };
        let (result, ()) = tokio::join!(agent.run(wakes), stop);
        result.unwrap();
        agent.state().clone()
    }

    fn needs_reboot() -> World {
        let w = world();
        *w.host.need.lock().unwrap() = Some("/run/reboot-required exists".into());
        *w.host.reboot_required.lock().unwrap() = true;
        w
    }

    fn reported(w: &World, text: &str) -> bool {
        let reports = w.coordinator.reports.lock().unwrap();
        reports.iter().any(|(_, r)| r.message.contains(text))
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_inhibitor_holds_the_reboot_back_with_its_reason_reported() {
        let w = needs_reboot();
        w.host.inhibit("nightly-backup", "copying /srv to tape");
        let host = w.host.clone();
        let coordinator = w.coordinator.clone();
        let lifted = std::sync::Mutex::new(None);
        run_with(&w, settings(), || {
            // Lift the lock ten minutes after the reason was reported.
            if reported(&w, "copying /srv to tape") && lifted.lock().unwrap().is_none() {
                *lifted.lock().unwrap() = Some(tokio::time::Instant::now());
            }
            if let Some(at) = *lifted.lock().unwrap()
                && at.elapsed() >= Duration::from_secs(600)
            {
                host.inhibitors.lock().unwrap().clear();
            }
            false
        })
        .await;
        let lifted = lifted.lock().unwrap().expect("the reason was reported");
        assert!(lifted.elapsed() >= Duration::from_secs(600));
        assert_eq!(*w.host.reboots.lock().unwrap(), 1);
        assert_eq!(*w.host.reboots_while_inhibited.lock().unwrap(), 0);
        // The wait was reported while Rebooting, with who and why.
        let reports = coordinator.reports.lock().unwrap();
        let (_, held) = reports
            .iter()
            .find(|(_, r)| r.message.contains("nightly-backup"))
            .unwrap();
        assert_eq!(held.phase, Phase::Rebooting);
        assert!(
            held.message.contains("reboot held back by inhibitor locks"),
            "{held:?}"
        );
        // The baton was renewed while waiting.
        assert!(*coordinator.renews.lock().unwrap() >= 600 / 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inhibitor_past_the_timeout_fails_without_a_reboot() {
        let w = needs_reboot();
        w.host.inhibit("nightly-backup", "copying /srv to tape");
        let c = w.coordinator.clone();
        let state = run_with(&w, settings(), move || c.phases().contains(&Phase::Failed)).await;
        assert_eq!(state.phase, Phase::Failed);
        let error = state.error.unwrap();
        assert!(error.contains("nightly-backup"), "{error}");
        assert!(error.contains("--inhibitor-timeout"), "{error}");
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
        assert!(w.coordinator.releases.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ignore_inhibitors_reboots_through_them() {
        let w = needs_reboot();
        w.host.inhibit("nightly-backup", "copying /srv to tape");
        let settings = Settings {
            ignore_inhibitors: true,
            ..settings()
        };
        let state = run_with(&w, settings, || false).await;
        assert_eq!(state.phase, Phase::Rebooting);
        assert_eq!(*w.host.reboots_while_inhibited.lock().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_whose_baton_is_lost_is_stopped() {
        let w = needs_reboot();
        w.host.runs_take(Duration::from_secs(3600));
        let c = w.coordinator.clone();
        let host = w.host.clone();
        run_with(&w, settings(), move || {
            if c.phases().contains(&Phase::Updating) {
                *c.fenced.lock().unwrap() = true;
            }
            !host.stops.lock().unwrap().is_empty()
        })
        .await;
        assert_eq!(
            *w.host.stops.lock().unwrap(),
            vec!["baton-update-1.service".to_string()]
        );
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_past_its_timeout_is_stopped_and_fails() {
        let w = needs_reboot();
        w.host.runs_take(Duration::from_secs(3600));
        let c = w.coordinator.clone();
        let state = run_with(&w, settings(), move || c.phases().contains(&Phase::Failed)).await;
        assert!(state.error.unwrap().contains("did not finish within 1m"));
        assert_eq!(
            *w.host.stops.lock().unwrap(),
            vec!["baton-update-1.service".to_string()]
        );
        assert_eq!(*w.host.reboots.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fake_host_refuses_what_systemd_cannot_wait_for() {
        let w = needs_reboot();
        let settings = Settings {
            update: Some(Action::Unit("apt-daily-upgrade.timer".into())),
            ..settings()
        };
        let c = w.coordinator.clone();
        let state = run_with(&w, settings, move || c.phases().contains(&Phase::Failed)).await;
        assert!(state.error.unwrap().contains("only .service units"));
    }

    #[test]
    fn abort_backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(300);
        assert_eq!(abort_backoff(base, 1), base);
        assert_eq!(abort_backoff(base, 2), base * 2);
        assert_eq!(abort_backoff(base, 3), base * 4);
        assert_eq!(abort_backoff(base, 50), MAX_ABORT_BACKOFF);
        let long = Duration::from_secs(7200);
        assert_eq!(abort_backoff(long, 5), long);
    }
}
