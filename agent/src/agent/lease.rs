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
//! `overdue_at` answer, kept between one and three renew intervals (it is
//! read on this node's clock, which may be skewed); if neither, three renew
//! intervals (see [`allowance`]). Once that has passed without a successful
//! renewal (a renewal that hangs is none), a step that starts things (a
//! drain evicting pods) is stopped at once and no new step starts until the
//! coordinator answers again. A unit already running is not stopped for a
//! slow coordinator; only a refused token stops it.

use super::{Agent, Interrupted};
use crate::coordinator::{Confirmation, Coordinator, CoordinatorError, Step};
use crate::host::HostOs;
use crate::node_ops::NodeOps;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The longest pause between two attempts of a failing call.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Failed attempts to confirm the token before the agent says loudly that
/// it has stopped starting steps.
const QUIET_FAILURES: u32 = 3;

/// The shortest time a renewal counts: twice the shortest renew interval,
/// so that renewing at half of it (see `holding`) can keep a lease.
const MIN_ALLOWANCE: Duration = Duration::from_secs(2);

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

/// How long a renewal counts, per the module docs: the grant's
/// `overdue_after` (a duration: no clock involved); else the coordinator's
/// `overdue_at` as seen on this node's clock, kept between one and three
/// renew intervals, because a skewed clock must neither stretch the lease
/// (a node clock behind the coordinator's by an hour would count every
/// renewal for an hour) nor be read as "not said" (an answer already in
/// the past counts for one interval, not the three of the fallback); else
/// three renew intervals. Never below [`MIN_ALLOWANCE`]: a lease that
/// counts for nothing could never be kept, and every step would be
/// stopped as soon as it started.
pub(super) fn allowance(
    overdue_after: Option<Duration>,
    overdue_at: Option<SystemTime>,
    now: SystemTime,
    renew_interval: Duration,
) -> Duration {
    let fallback = renew_interval * 3;
    let allowed = match (overdue_after, overdue_at) {
        (Some(after), _) => after,
        (None, Some(at)) => at
            .duration_since(now)
            .unwrap_or_default()
            .clamp(renew_interval, fallback),
        (None, None) => fallback,
    };
    allowed.max(MIN_ALLOWANCE)
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

    fn note_renewed(&self, sent_at: Instant, overdue_at: Option<SystemTime>) {
        let until = sent_at
            + allowance(
                self.state
                    .lease
                    .and_then(|l| l.overdue_after_ms)
                    .map(Duration::from_millis),
                overdue_at,
                (self.clock)(),
                self.renew_interval(),
            );
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .valid_until = Some(until);
    }

    /// Until when the last renewal in this process counts (None: none
    /// was made yet).
    fn lease_valid_until(&self) -> Option<Instant> {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .valid_until
    }

    /// True when no renewal in this process counts any more (or none was
    /// made yet).
    pub(super) fn lease_expired(&self) -> bool {
        self.lease_valid_until()
            .is_none_or(|until| Instant::now() >= until)
    }

    /// Resolves when the lease runs out without a renewal that counts: a
    /// renewal that hangs is no renewal, whatever its call deadline.
    async fn lease_runs_out(&self) {
        loop {
            match self.lease_valid_until() {
                Some(until) if Instant::now() < until => tokio::time::sleep_until(until).await,
                _ => return,
            }
        }
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
    /// renew interval (and before half of what is left of the lease) while
    /// it runs. A refused token stops the step (`Fenced`); a lease older
    /// than the coordinator allows stops it when `on_stale` says so
    /// (`Stale`), at the moment it runs out, even while a renewal hangs.
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
                    // Renew before the lease runs out even when the
                    // coordinator's interval is longer than its allowance.
                    let left = self.lease_valid_until().map_or(Duration::ZERO, |until| {
                        until.saturating_duration_since(Instant::now())
                    });
                    self.renew_interval()
                        .min((left / 2).max(super::MIN_RENEW_INTERVAL))
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
        let runs_out = async {
            match on_stale {
                OnStale::Stop => self.lease_runs_out().await,
                OnStale::Continue => std::future::pending().await,
            }
        };
        tokio::select! {
            out = step => Ok(out),
            why = renewals => Err(why),
            () = runs_out => Err(Interrupted::Stale),
            _ = self.shutdown.cancelled() => Err(Interrupted::Shutdown),
        }
    }

    /// Ask the coordinator, right before `step`, whether it may be taken
    /// now. While it says "wait", report its reason and ask again (each
    /// answer renews the lease). An older coordinator (UNIMPLEMENTED): the
    /// token is confirmed with Renew instead, for this step only: the
    /// coordinators may be upgraded in the middle of a maintenance (a
    /// rolling upgrade, a new leader), and the next step asks Confirm
    /// again, so an upgraded coordinator's "wait" or refusal is never
    /// skipped. The fallback is as strict as the rest of
    /// [`Self::confirm_token`]: Ok only after the coordinator accepted the
    /// token in this process; an error is retried, never taken as a yes.
    pub(super) async fn confirm_step(&self, token: u64, step: Step) -> Result<(), Interrupted> {
        let mut failures = 0u32;
        let mut shown: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
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
                        %step,
                        "the coordinator cannot confirm steps (an older version); confirming the token with Renew for this step"
                    );
                    return self.confirm_token(token).await;
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

    /// Red-team 3: the coordinator's `overdue_at` is read on this node's
    /// clock; a skewed clock must neither stretch the lease (an hour ahead)
    /// nor be read as the harmless fallback (already past).
    #[test]
    fn overdue_at_is_kept_within_one_to_three_renew_intervals() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let every = Duration::from_secs(5);
        let at = |secs: i64| {
            Some(if secs >= 0 {
                now + Duration::from_secs(secs as u64)
            } else {
                now - Duration::from_secs((-secs) as u64)
            })
        };
        assert_eq!(allowance(None, at(12), now, every), Duration::from_secs(12));
        assert_eq!(allowance(None, at(3600), now, every), every * 3);
        assert_eq!(allowance(None, at(-30), now, every), every);
        assert_eq!(allowance(None, at(0), now, every), every);
        assert_eq!(allowance(None, at(1), now, every), every);
        assert_eq!(allowance(None, None, now, every), every * 3);
        // The grant's duration wins (no clock involved), but a lease that
        // counts for (almost) nothing cannot be kept alive at all: the
        // floor keeps renewing possible.
        let after = Some(Duration::from_secs(60));
        assert_eq!(
            allowance(after, at(3600), now, every),
            Duration::from_secs(60)
        );
        assert_eq!(
            allowance(Some(Duration::ZERO), None, now, every),
            MIN_ALLOWANCE
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 3), base * 4);
        assert_eq!(backoff(base, 40), MAX_RETRY_PAUSE);
        assert_eq!(backoff(Duration::from_secs(60), 5), Duration::from_secs(60));
    }
}
