//! The agent's side of the lease: the token is confirmed with the
//! coordinator before every step and renewed alongside it, the destructive
//! steps are confirmed with `Confirm`, and the agent knows when its last
//! renewal no longer counts.
//!
//! "Confirmed" always means: by the coordinator, in this process. A token
//! read from the state file is not confirmed until the coordinator has
//! accepted it again.
//!
//! How long a renewal counts: the grant's `overdue_after` (a duration, so
//! clock skew between node and coordinator does not matter), measured from
//! when the renewal was *sent*; if the coordinator did not say, its
//! `overdue_at` answer; if neither, three renew intervals. Once that has
//! passed without a successful renewal, a step that starts things (a drain
//! evicting pods) is stopped and no new step starts until the coordinator
//! answers again. A unit already running is not stopped for a slow
//! coordinator; only a refused token stops it.

use super::{Agent, Interrupted};
use crate::coordinator::{Confirmation, Coordinator, CoordinatorError, Step};
use crate::host::HostOs;
use crate::node_ops::NodeOps;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The longest pause between two attempts of a failing call.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Failed attempts to confirm the token before the agent says loudly that
/// it has stopped starting steps.
const QUIET_FAILURES: u32 = 3;

/// What this process knows of its lease.
#[derive(Debug, Default)]
pub(super) struct LeaseView {
    /// Until when the last successful renewal counts (None: no renewal
    /// in this process yet).
    valid_until: Option<Instant>,
}

/// What to do with a running step when the lease gets too old.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnStale {
    /// Stop it (it starts things over time, like evictions; it is
    /// idempotent and runs again once the token is confirmed).
    Stop,
    /// Let it finish (a unit that already runs; the next step is not
    /// started before the token is confirmed again).
    Continue,
}

/// The pause before attempt `failures + 1` of a failing call: `base`,
/// doubling, at most [`MAX_RETRY_PAUSE`] (or `base` when that is longer).
pub(super) fn backoff(base: Duration, failures: u32) -> Duration {
    super::hold_back::doubling(base, failures, MAX_RETRY_PAUSE)
}

impl<H: HostOs, C: Coordinator, N: NodeOps> Agent<H, C, N> {
    /// How often to renew: the grant's interval (persisted with the state),
    /// else the configured one, never below [`super::MIN_RENEW_INTERVAL`].
    pub(super) fn renew_interval(&self) -> Duration {
        self.state
            .lease
            .map_or(self.settings.renew_interval, |l| {
                Duration::from_millis(l.renew_interval_ms)
            })
            .max(super::MIN_RENEW_INTERVAL)
    }

    /// How long a renewal counts, per the module docs.
    fn allowance(&self, overdue_at: Option<SystemTime>) -> Duration {
        if let Some(ms) = self.state.lease.and_then(|l| l.overdue_after_ms) {
            return Duration::from_millis(ms);
        }
        let fallback = self.renew_interval() * 3;
        match overdue_at.map(|at| at.duration_since((self.clock)())) {
            Some(Ok(left)) if !left.is_zero() => left,
            _ => fallback,
        }
    }

    fn note_renewed(&self, sent_at: Instant, overdue_at: Option<SystemTime>) {
        let until = sent_at + self.allowance(overdue_at);
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .valid_until = Some(until);
    }

    /// True when no renewal in this process counts any more (or none was
    /// made yet).
    pub(super) fn lease_expired(&self) -> bool {
        let view = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        view.valid_until.is_none_or(|until| Instant::now() >= until)
    }

    /// One renewal, with the call deadline.
    pub(super) async fn renew(&self, token: u64) -> Result<(), CoordinatorError> {
        let sent_at = Instant::now();
        let renewed = self.call(self.coordinator.renew(token)).await?;
        tracing::debug!(token, "renewed");
        self.note_renewed(sent_at, renewed.overdue_at);
        Ok(())
    }

    /// Confirm `token` with the coordinator now, retrying (with backoff)
    /// calls that fail, and never returning Ok before the coordinator
    /// accepted it. Refused: `Fenced`; refused for good: `Refused`.
    pub(super) async fn confirm_token(&self, token: u64) -> Result<(), Interrupted> {
        let mut failures = 0u32;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
            }
            match self.renew(token).await {
                Ok(()) => {
                    if failures >= QUIET_FAILURES {
                        tracing::info!(token, "token confirmed again; going on");
                    }
                    return Ok(());
                }
                Err(CoordinatorError::Fenced(why)) => return Err(Interrupted::Fenced(why)),
                Err(CoordinatorError::Refused(why)) => return Err(Interrupted::Refused(why)),
                Err(error) => {
                    failures += 1;
                    if failures == QUIET_FAILURES {
                        tracing::error!(%error, token, failures, "cannot confirm the token: starting no step until the coordinator answers");
                    } else {
                        tracing::warn!(%error, token, failures, "cannot confirm the token; retrying");
                    }
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                }
            }
        }
    }

    /// Run `step` with the baton: confirm the token first, then renew every
    /// renew interval while it runs. A refused token stops the step
    /// (`Fenced`); a lease older than the coordinator allows stops it when
    /// `on_stale` says so (`Stale`).
    pub(super) async fn holding<T>(
        &self,
        token: u64,
        on_stale: OnStale,
        step: impl Future<Output = T>,
    ) -> Result<T, Interrupted> {
        self.confirm_token(token).await?;
        let renewals = async {
            let mut failures = 0u32;
            loop {
                let wait = if failures == 0 {
                    self.renew_interval()
                } else {
                    backoff(self.settings.retry_interval, failures).min(self.renew_interval())
                };
                tokio::time::sleep(wait).await;
                match self.renew(token).await {
                    Ok(()) => failures = 0,
                    Err(CoordinatorError::Fenced(why)) => return Interrupted::Fenced(why),
                    Err(CoordinatorError::Refused(why)) => return Interrupted::Refused(why),
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%error, failures, "renew failed; retrying");
                        if on_stale == OnStale::Stop && self.lease_expired() {
                            return Interrupted::Stale;
                        }
                    }
                }
            }
        };
        tokio::select! {
            out = step => Ok(out),
            why = renewals => Err(why),
            _ = self.shutdown.cancelled() => Err(Interrupted::Shutdown),
        }
    }

    /// Ask the coordinator, right before `step`, whether it may be taken
    /// now. While it says "wait", report its reason and ask again (each
    /// answer renews the lease). An older coordinator (UNIMPLEMENTED): the
    /// token is confirmed with Renew instead, logged once.
    pub(super) async fn confirm_step(&self, token: u64, step: Step) -> Result<(), Interrupted> {
        let mut failures = 0u32;
        let mut shown: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
            }
            if self.confirm_unimplemented.load(Ordering::Relaxed) {
                return self.confirm_token(token).await;
            }
            let sent_at = Instant::now();
            match self.call(self.coordinator.confirm(token, step)).await {
                Ok(Confirmation {
                    proceed: true,
                    overdue_at,
                    ..
                }) => {
                    self.note_renewed(sent_at, overdue_at);
                    tracing::info!(token, %step, "the coordinator confirmed the step");
                    return Ok(());
                }
                Ok(answer) => {
                    self.note_renewed(sent_at, answer.overdue_at);
                    failures = 0;
                    if shown.as_deref() != Some(answer.reason.as_str()) {
                        tracing::warn!(token, %step, reason = answer.reason, "the coordinator says wait");
                        self.report(&format!(
                            "waiting for the coordinator before the {step}: {}",
                            answer.reason
                        ))
                        .await;
                        shown = Some(answer.reason.clone());
                    }
                    let again = answer
                        .retry_after
                        .unwrap_or(self.settings.retry_interval)
                        .clamp(super::MIN_RENEW_INTERVAL, self.renew_interval());
                    self.pause(again).await;
                }
                Err(CoordinatorError::Unimplemented(why)) => {
                    tracing::warn!(
                        why,
                        "the coordinator cannot confirm steps (an older version); confirming the token with Renew instead"
                    );
                    self.confirm_unimplemented.store(true, Ordering::Relaxed);
                }
                Err(CoordinatorError::Fenced(why)) => return Err(Interrupted::Fenced(why)),
                Err(CoordinatorError::Refused(why)) => return Err(Interrupted::Refused(why)),
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, %step, failures, "cannot confirm the step; retrying");
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 3), base * 4);
        assert_eq!(backoff(base, 40), MAX_RETRY_PAUSE);
        assert_eq!(backoff(Duration::from_secs(60), 5), Duration::from_secs(60));
    }
}
