//! The step of each phase. Every step is idempotent: a restarted agent runs
//! the step of its persisted phase again from the start.

use super::hold_back::{self, Ending};
use super::lease::{OnStale, backoff};
use super::{Agent, Interrupted, MAX_REBOOT_REQUESTS, fatal, lease_terms};
use crate::coordinator::{Coordinator, CoordinatorError, Grant, Step};
use crate::host::{HostOs, Job};
use crate::node_ops::NodeOps;
use crate::phase::Event;
use crate::text;
use tokio::sync::watch;

/// How often the reboot check is asked before releasing while it gives no
/// answer, before the maintenance fails.
const SENTINEL_CHECKS: u32 = 3;

impl<H: HostOs, C: Coordinator, N: NodeOps> Agent<H, C, N> {
    /// Wait for the next wake (or shutdown).
    async fn next_wake(&self, wakes: &mut watch::Receiver<u64>) -> Result<(), Interrupted> {
        tokio::select! {
            changed = wakes.changed() => changed.map_err(|_| Interrupted::Shutdown),
            _ = self.shutdown.cancelled() => Err(Interrupted::Shutdown),
        }
    }

    /// Idle: check the need on every wake; ask for the baton when it is
    /// there, nothing blocks and no hold-back applies.
    pub(super) async fn idle(
        &mut self,
        wakes: &mut watch::Receiver<u64>,
    ) -> Result<(), Interrupted> {
        loop {
            wakes.borrow_and_update();
            let need = match self.host.maintenance_needed().await {
                Ok(need) => need,
                Err(error) => {
                    // No answer is neither "needed" (a node would be taken
                    // down on a broken check) nor "not needed" (that would
                    // reset the persisted hold-back and hide the fault):
                    // ask for nothing, show why, and look again at the
                    // next wake.
                    self.show_blockers(vec![format!(
                        "cannot check whether maintenance is needed: {error}"
                    )])
                    .await;
                    self.next_wake(wakes).await?;
                    continue;
                }
            };
            let Some(reason) = need else {
                if self.state.hold_back.take().is_some() {
                    tracing::info!("the need is gone; the hold-back is reset");
                    self.save()?;
                }
                self.show_blockers(Vec::new()).await;
                self.next_wake(wakes).await?;
                continue;
            };
            if let Some(hold_back) = &self.state.hold_back
                && let Some(left) =
                    hold_back::remaining(hold_back, self.settings.abort_backoff, self.now_ms())
            {
                if self.announced_hold_back != Some(hold_back.until_ms) {
                    tracing::info!(
                        reason,
                        why = hold_back.why,
                        hold_back = %humantime::format_duration(left),
                        "maintenance needed, holding back before asking"
                    );
                    self.announced_hold_back = Some(hold_back.until_ms);
                }
                tokio::select! {
                    _ = tokio::time::sleep(left) => {},
                    changed = wakes.changed() => changed.map_err(|_| Interrupted::Shutdown)?,
                    _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
                }
                continue;
            }
            let blockers = self.blockers().await;
            self.show_blockers(blockers).await;
            if self.blockers.as_ref().is_some_and(Vec::is_empty) {
                tracing::info!(reason, "maintenance needed");
                self.state.reason = reason;
                return self
                    .advance(Event::MaintenanceNeeded, "maintenance needed")
                    .await
                    .map_err(fatal);
            }
            self.next_wake(wakes).await?;
        }
    }

    /// What keeps the node from asking for the baton (or from using it)
    /// now. A check that fails counts as blocked: a blocking pod may be
    /// running.
    async fn blockers(&self) -> Vec<String> {
        match self.node_ops.blockers().await {
            Ok(blockers) => blockers,
            Err(error) => vec![format!("cannot check for blocking pods: {error}")],
        }
    }

    /// Log and show the blockers when they changed since the last check.
    async fn show_blockers(&mut self, blockers: Vec<String>) {
        if self.blockers.as_ref() == Some(&blockers) {
            return;
        }
        if blockers.is_empty() {
            tracing::debug!("nothing blocks the request for the baton");
        } else {
            tracing::warn!(blockers = ?blockers, "maintenance held back: not asking for the baton while these run");
        }
        self.show(self.node_ops.show_waiting(&blockers)).await;
        self.blockers = Some(blockers);
    }

    /// Waiting (persisted): ask and wait for the grant; withdraw when the
    /// need goes away.
    pub(super) async fn waiting(
        &mut self,
        wakes: &mut watch::Receiver<u64>,
    ) -> Result<(), Interrupted> {
        let reason = text::reason(&self.state.reason);
        let need_cleared = async {
            loop {
                if wakes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                match self.host.maintenance_needed().await {
                    Ok(None) => return,
                    Ok(Some(_)) => {}
                    // The need was seen; a check without an answer does
                    // not show that it is gone.
                    Err(error) => {
                        tracing::warn!(%error, "cannot check the need while waiting; keeping the request")
                    }
                }
            }
        };
        let answer = tokio::select! {
            a = self.coordinator.acquire(&reason, true) => a,
            _ = need_cleared => return self.withdraw().await,
            _ = self.shutdown.cancelled() => return Err(Interrupted::Shutdown),
        };
        match answer {
            Ok(Some(grant)) => self.granted(grant, "baton granted").await.map_err(fatal),
            Ok(None) => Ok(()),
            Err(CoordinatorError::Refused(why)) => {
                tracing::error!(
                    why,
                    "the coordinator refuses this node's request; holding back"
                );
                self.hold_back(Ending::Aborted);
                self.advance(Event::NeedCleared, "request refused")
                    .await
                    .map_err(fatal)
            }
            Err(error) => {
                tracing::warn!(%error, "acquire failed; retrying");
                self.pause(self.settings.retry_interval).await;
                Ok(())
            }
        }
    }

    /// The need went away while waiting: withdraw the request. A grant
    /// whose answer was lost would otherwise stay with a node that does
    /// not know it holds it, so ask what the node holds and give it back.
    async fn withdraw(&mut self) -> Result<(), Interrupted> {
        tracing::info!("maintenance no longer needed; withdrawing the request");
        let mut failures = 0u32;
        loop {
            let ask = self.coordinator.acquire("withdrawing the request", false);
            match self.call(ask).await {
                Ok(None) => break,
                Ok(Some(grant)) => {
                    self.release_with_retry(grant.fencing_token, "maintenance no longer needed")
                        .await?;
                    break;
                }
                Err(CoordinatorError::Refused(why)) => {
                    tracing::error!(why, "the coordinator refused the withdrawal");
                    break;
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "cannot withdraw yet; retrying");
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                    if self.shutdown.is_cancelled() {
                        return Err(Interrupted::Shutdown);
                    }
                }
            }
        }
        self.advance(Event::NeedCleared, "request withdrawn")
            .await
            .map_err(fatal)
    }

    pub(super) async fn granted(
        &mut self,
        grant: Grant,
        message: &str,
    ) -> Result<(), super::AgentError> {
        tracing::info!(
            token = grant.fencing_token,
            resumed = grant.resumed,
            "baton granted"
        );
        self.state.lease = Some(lease_terms(&grant, &self.settings));
        self.state.fencing_token = Some(grant.fencing_token);
        self.state.backup_required = grant.backup_required.then_some(grant.fencing_token);
        self.state.backup_learned = Some(grant.fencing_token);
        self.advance(Event::Granted, message).await
    }

    pub(super) async fn preparing(&mut self, token: u64) -> Result<(), Interrupted> {
        // A blocking pod may have started since the request: check again
        // now that the baton is ours, before anything is touched.
        let blockers = self.blockers().await;
        if !blockers.is_empty() {
            let error = format!("blocked after the grant: {}", blockers.join("; "));
            tracing::warn!(error, "not preparing the node; giving the baton back");
            self.state.error = Some(error);
            return self
                .advance(Event::PrepareAborted, "maintenance aborted")
                .await
                .map_err(fatal);
        }
        // A grant resumed from an older agent's state: whether it needs a
        // backup was never saved; ask before anything is touched.
        if self.state.backup_learned != Some(token) {
            self.learn_backup_required(token).await?;
        }
        // A control-plane node's certificates and kubeadm configuration go
        // to the coordinator before anything is touched; without them the
        // node is not drained (fail closed: the baton goes back).
        if self.state.backup_required == Some(token)
            && let Err(error) = self
                .holding(token, OnStale::Stop, self.back_up(token))
                .await?
        {
            if self.shutdown.is_cancelled() {
                // A restarted agent makes and sends the backup again.
                return Err(Interrupted::Shutdown);
            }
            tracing::warn!(%error, "no control-plane backup; not draining, giving the baton back");
            self.state.error = Some(format!("control-plane backup: {error}"));
            return self
                .advance(Event::PrepareAborted, "maintenance aborted")
                .await
                .map_err(fatal);
        }
        // The coordinator's go-ahead right before the node is touched, as
        // before the update and the reboot: it holds the drain of a grant
        // whose backup was not kept (whatever path this agent took past
        // the backup step) and re-runs the guards, which may have changed
        // since the grant. For an ordinary grant it is one call answered
        // "go", the same answer the update's Confirm would give.
        self.confirm_step(token, Step::Drain).await?;
        match self
            .holding(token, OnStale::Stop, self.node_ops.prepare())
            .await?
        {
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

    /// The update job for this grant, its log file made private first.
    fn update_job(&self, action: &super::Action, token: u64) -> Result<Job, String> {
        let job = self.job(action, "update", token);
        if let Job::Command { output, .. } = &job {
            let name = output.file_name().unwrap_or_default().to_string_lossy();
            self.state_file
                .private_log(&name)
                .map_err(|e| format!("update log: {e}"))?;
        }
        Ok(job)
    }

    pub(super) async fn updating(&mut self, token: u64) -> Result<(), Interrupted> {
        let mut message = "no update configured".to_string();
        if let Some(action) = self.settings.update.clone() {
            let resumed = self.state.update_started == Some(token);
            let job = match self.update_job(&action, token) {
                Ok(job) => job,
                Err(error) => return self.fail(error, "").await,
            };
            if resumed && matches!(job, Job::Unit(_)) {
                // StartUnit of a unit whose run has ended starts it again;
                // whether this grant's run ended cannot be told, so do not
                // risk a second run. Nor may a run that still goes on
                // outlive the Failed phase: a force-release gives the node
                // back, mid-update.
                let stopped = self.stop_run_of_unknown_end(&job).await;
                return self
                    .fail(
                        format!(
                            "the update unit {} was started for this grant before the agent restarted; not starting it a second time, and {stopped} (check its result, then force-release)",
                            job.unit_name()
                        ),
                        "",
                    )
                    .await;
            }
            // Confirmed in this process even when resuming: a restarted
            // agent may find the run never started (killed right after the
            // save below), and then starts it now; following a run that
            // goes on by itself after a "wait" loses nothing.
            self.confirm_step(token, Step::Update).await?;
            if !resumed {
                self.state.update_started = Some(token);
                self.save()?;
            }
            match self
                .run_job(token, &job, self.settings.update_timeout, "update")
                .await?
            {
                Ok(outcome) => {
                    self.state.update_output = outcome.output_tail.clone();
                    message = format!("update done ({})", outcome.detail);
                }
                Err((error, output)) => return self.fail(error, &output).await,
            }
        }
        // A check without an answer is read as "reboot": the update may
        // have asked for one, and releasing without it would leave the
        // update not live while the next node goes down. A reboot too many
        // costs one reboot of a node that is drained anyway.
        let reboot_required = match self.host.reboot_required().await {
            Ok(required) => required,
            Err(error) => {
                tracing::warn!(%error, "cannot check the reboot sentinel after the update; rebooting to be safe");
                message = format!(
                    "{message}; rebooting: the reboot sentinel could not be checked ({error})"
                );
                true
            }
        };
        if reboot_required {
            // The phase and the boot_id before the reboot are one write: a
            // restarted agent must never find `Rebooting` without it.
            let boot_id = match self.host.boot_id().await {
                Ok(id) => id,
                Err(error) => return self.fail(format!("reading boot_id: {error}"), "").await,
            };
            self.state.boot_id_before_reboot = Some(boot_id);
            self.state.reboot_requests = 0;
        }
        self.advance(Event::Updated { reboot_required }, &message)
            .await
            .map_err(fatal)?;
        if reboot_required {
            self.reboot(token).await?;
        }
        Ok(())
    }

    /// Run `job` with the baton (a slow coordinator does not stop a unit
    /// that runs). The outcome when it succeeded, else the error and the
    /// output for the report. A run whose end is not known fails the
    /// maintenance here ([`Interrupted::Failed`]).
    async fn run_job(
        &mut self,
        token: u64,
        job: &Job,
        timeout: std::time::Duration,
        what: &str,
    ) -> Result<Result<crate::host::UnitOutcome, (String, String)>, Interrupted> {
        let run = self.host.run(job, timeout);
        let why = match self.holding(token, OnStale::Continue, run).await {
            Ok(Ok(outcome)) if outcome.success => return Ok(Ok(outcome)),
            Ok(Ok(outcome)) => {
                return Ok(Err((
                    format!("{what} {} failed: {}", job.unit_name(), outcome.detail),
                    outcome.output_tail,
                )));
            }
            // How the run ended is not known (a D-Bus error mid-run; a
            // timeout was stopped by the host already).
            Ok(Err(error)) => format!("{what}: {error}"),
            // The unit goes on by itself; a restarted agent follows it.
            Err(Interrupted::Shutdown) => return Err(Interrupted::Shutdown),
            // Refused for good: the maintenance fails.
            Err(Interrupted::Refused(why)) => why,
            Err(other) => {
                self.stop_run_of_unknown_end(job).await;
                return Err(other);
            }
        };
        // The run must not go on behind a Failed phase, so it is stopped;
        // but Failed is saved first. Stopping a transient unit whose run
        // had ended makes systemd drop it, and an agent killed between the
        // stop and the save would find Updating and no unit on restart, and
        // start the update a second time.
        self.fail(
            format!(
                "{why}; the run of {} is stopped (its end is unknown)",
                job.unit_name()
            ),
            "",
        )
        .await?;
        self.stop_run_of_unknown_end(job).await;
        Err(Interrupted::Failed)
    }

    /// Stop the unit of `job`, whose run may still go on (stopping one
    /// that does not run is no error); what happened, for the reason.
    pub(super) async fn stop_run_of_unknown_end(&self, job: &Job) -> String {
        match self.host.stop(job).await {
            Ok(()) => format!("the unit {} was stopped", job.unit_name()),
            Err(error) => {
                tracing::error!(unit = job.unit_name(), %error, "stopping a run of unknown end failed");
                format!("stopping the unit {} failed: {error}", job.unit_name())
            }
        }
    }

    /// Rebooting, on the boot the reboot was asked from: ask (again). The
    /// coordinator confirms the step first; the number of requests is
    /// persisted and bounded. Returns after waiting for the machine to go
    /// down; the run loop then comes back to [`Self::after_boot`].
    async fn reboot(&mut self, token: u64) -> Result<(), Interrupted> {
        let before = self.state.boot_id_before_reboot.clone().unwrap_or_default();
        if self.state.reboot_requests >= MAX_REBOOT_REQUESTS {
            return self
                .fail(
                    format!(
                        "asked for a reboot {} times but the machine did not go down (boot_id still {before})",
                        self.state.reboot_requests
                    ),
                    "",
                )
                .await;
        }
        if let Err(why) = self.wait_for_inhibitors(token).await? {
            return self.fail(why, "").await;
        }
        // The last check, right before the step.
        self.confirm_step(token, Step::Reboot).await?;
        self.state.reboot_requests += 1;
        self.save()?;
        tracing::info!(
            boot_id = before,
            token,
            attempt = self.state.reboot_requests,
            "rebooting"
        );
        let wait = match self.host.reboot().await {
            Ok(()) => self.settings.reboot_timeout,
            Err(error) => {
                tracing::warn!(%error, "the reboot request failed; asking again");
                self.settings.retry_interval
            }
        };
        self.holding(token, OnStale::Continue, tokio::time::sleep(wait))
            .await?;
        tracing::warn!(boot_id = before, "the machine did not go down");
        Ok(())
    }

    /// Rebooting, at start-up or after waiting for the machine to go down:
    /// a changed boot_id proves the reboot; the same boot_id (or none
    /// recorded) means it did not happen yet, so it is asked for again.
    pub(super) async fn after_boot(&mut self, token: u64) -> Result<(), Interrupted> {
        let now = match self.host.boot_id().await {
            Ok(id) => id,
            Err(error) => return self.fail(format!("reading boot_id: {error}"), "").await,
        };
        let Some(before) = self.state.boot_id_before_reboot.clone() else {
            // Written by an older agent that died between two writes: the
            // reboot was not asked for from this boot.
            tracing::warn!(now, "no boot_id recorded before the reboot: rebooting now");
            self.state.boot_id_before_reboot = Some(now);
            self.state.reboot_requests = 0;
            self.save()?;
            return self.reboot(token).await;
        };
        if before == now {
            tracing::warn!(
                now,
                requests = self.state.reboot_requests,
                "still the same boot: the reboot did not happen yet"
            );
            return self.reboot(token).await;
        }
        tracing::info!(before, now, "back after the reboot");
        self.state.reboot_requests = 0;
        self.advance(Event::Booted { boot_changed: true }, "back after reboot")
            .await
            .map_err(fatal)
    }

    pub(super) async fn verifying(&mut self, token: u64) -> Result<(), Interrupted> {
        if let Err(error) = self
            .holding(token, OnStale::Stop, self.node_ops.wait_ready_after_boot())
            .await?
        {
            return self.fail(format!("readiness: {error}"), "").await;
        }
        // The sentinel is checked again before the baton goes: after a
        // reboot it must be gone; without one it must still be absent. A
        // check without an answer (after a few tries) keeps the baton:
        // releasing needs a "no".
        let required = match self
            .holding(token, OnStale::Continue, self.reboot_check_with_retries())
            .await?
        {
            Ok(required) => required,
            Err(error) => {
                return self
                    .fail(
                        format!(
                            "cannot check the reboot sentinel before releasing ({error}); not releasing without knowing that no reboot is needed"
                        ),
                        "",
                    )
                    .await;
            }
        };
        if required {
            let need = self
                .host
                .maintenance_needed()
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| "a reboot sentinel".to_string());
            let error = if self.state.boot_id_before_reboot.is_some() {
                format!(
                    "still needs a reboot after a verified reboot ({need}): the update is not live (held or phased packages, or the bootloader boots the old kernel?)"
                )
            } else {
                format!(
                    "needs a reboot after the update after all ({need}); not releasing without one"
                )
            };
            return self.fail(error, "").await;
        }
        if let Some(action) = self.settings.post_check.clone() {
            let job = self.job(&action, "post-check", token);
            let timeout = self.settings.post_check_timeout;
            if let Err((error, output)) = self.run_job(token, &job, timeout, "post-check").await? {
                return self.fail(error, &output).await;
            }
        }
        self.advance(Event::Verified, "verified")
            .await
            .map_err(fatal)
    }

    /// The reboot check, asked up to [`SENTINEL_CHECKS`] times while it
    /// gives no answer (a check that timed out once may answer the next
    /// time); the last error when it never answers.
    async fn reboot_check_with_retries(&self) -> Result<bool, crate::host::HostError> {
        let mut attempt = 1;
        loop {
            match self.host.reboot_required().await {
                Ok(required) => return Ok(required),
                Err(error) if attempt >= SENTINEL_CHECKS => return Err(error),
                Err(error) => {
                    tracing::warn!(%error, attempt, "the reboot check gave no answer; asking again");
                    attempt += 1;
                    tokio::time::sleep(self.settings.retry_interval).await;
                }
            }
        }
    }

    pub(super) async fn finishing(&mut self, token: u64) -> Result<(), Interrupted> {
        if let Err(error) = self
            .holding(token, OnStale::Stop, self.node_ops.finish())
            .await?
        {
            return self.fail(format!("finish: {error}"), "").await;
        }
        self.release_with_retry(token, "maintenance complete")
            .await?;
        tracing::info!(token, "baton released");
        self.hold_back(Ending::Done);
        self.advance(Event::Released, "released")
            .await
            .map_err(fatal)
    }

    /// Aborting: give the node back (again: idempotent, a restarted agent
    /// comes here too), release the baton with the reason, and hold back
    /// before asking again. Guarantee: reached only from Preparing, so
    /// nothing was updated and no reboot was asked for.
    pub(super) async fn aborting(&mut self, token: u64) -> Result<(), Interrupted> {
        let error = self
            .state
            .error
            .clone()
            .unwrap_or_else(|| "preparing gave up".to_string());
        if let Err(undo) = self
            .holding(token, OnStale::Stop, self.node_ops.abort(&error))
            .await?
        {
            // The node may still be cordoned: keep the baton (fail closed)
            // rather than let another node go down as well.
            return self
                .fail(format!("{error}; giving the node back failed: {undo}"), "")
                .await;
        }
        let reason = format!("maintenance aborted: {error}");
        self.release_with_retry(token, &reason).await?;
        self.hold_back(Ending::Aborted);
        tracing::warn!(token, reason, "baton released after an aborted maintenance");
        self.advance(Event::Released, &reason).await.map_err(fatal)
    }

    /// Release, retrying until the coordinator answers. A refused token
    /// means the baton is not ours any more, which is what we wanted; a
    /// release refused for good is `Refused` (the caller fails).
    pub(super) async fn release_with_retry(
        &self,
        token: u64,
        reason: &str,
    ) -> Result<(), Interrupted> {
        let reason = text::reason(reason);
        let mut failures = 0u32;
        loop {
            match self.call(self.coordinator.release(token, &reason)).await {
                Ok(()) => return Ok(()),
                Err(CoordinatorError::Fenced(why)) => {
                    tracing::warn!(why, "release refused: the baton was no longer ours");
                    return Ok(());
                }
                Err(CoordinatorError::Refused(why)) => {
                    return Err(Interrupted::Refused(format!("release refused: {why}")));
                }
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "release failed; retrying");
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                    if self.shutdown.is_cancelled() {
                        return Err(Interrupted::Shutdown);
                    }
                }
            }
        }
    }

    /// Failed: keep the baton (renewing it) until an operator force-releases
    /// it or the agent is stopped. A renewal refused for good is only
    /// logged: there is nothing left to fail. The failure is reported again
    /// with every renewal until the coordinator took it: a lost report
    /// would show the node as still at work.
    pub(super) async fn failed(&mut self, token: u64) -> Result<(), Interrupted> {
        let mut reported = self.report(&self.failure_message()).await;
        loop {
            match self.renew(token).await {
                Ok(()) if !reported => {
                    reported = self.report(&self.failure_message()).await;
                }
                Ok(()) => {}
                Err(CoordinatorError::Fenced(why)) => return Err(Interrupted::Fenced(why)),
                Err(error) => tracing::warn!(%error, "renew failed while failed; retrying"),
            }
            self.pause(self.renew_interval()).await;
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
            }
        }
    }
}
