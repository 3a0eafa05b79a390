//! Leader election on a coordination.k8s.io/v1 Lease.
//!
//! Every replica reads the Lease each `--lease-retry-period`. The holder
//! renews it; the others follow, and take it over only once it has not
//! changed for a whole `--lease-duration` as measured on their own clock
//! (the time a replica first saw the current resourceVersion, so clock skew
//! between nodes does not matter). Every write is guarded by the
//! resourceVersion read, so two replicas can never both win a takeover.
//! A leader that could not renew for `--lease-renew-deadline` steps down
//! before anyone else may take over: it counts its lease from when it sent
//! its last successful renewal (never from the late answer), and the flags
//! are checked at start ([`Timings::validate`]) so that its deadline check
//! always falls before the Lease can expire in another replica's view.
//!
//! The decision is the pure [`step`]; [`Elector::run`] does the I/O and
//! publishes [`Leadership`] on a watch channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::kube::Api;
use ::kube::api::PostParams;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::store::Leadership;

/// The Lease as one replica observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// `spec.holderIdentity` (empty when released).
    pub holder: String,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

/// What a replica does next with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it, holding it.
    Create,
    /// This replica holds it: renew.
    Renew,
    /// Released or expired: take it over.
    TakeOver,
    /// This replica holds it but must not lead: give it up.
    Release,
    /// Someone else holds a live Lease (or this replica yields).
    Follow {
        /// The holder.
        leader: String,
    },
}

/// Decides the next step. `unchanged_for` is how long this replica has seen
/// the Lease at its current resourceVersion. `yielding` is `Some(patience)`
/// while this replica should not lead (its own node holds the baton, so it
/// must be drainable): it releases a Lease it holds, and takes a free or
/// expired one only after `patience` (when no other replica did).
pub fn step(
    lease: Option<&Observed>,
    me: &str,
    unchanged_for: Duration,
    yielding: Option<Duration>,
) -> Step {
    let free = |l: &Observed| l.holder.is_empty() || unchanged_for >= l.duration;
    let patient = yielding.is_none_or(|patience| unchanged_for >= patience);
    match lease {
        Some(l) if l.holder == me && yielding.is_some() => Step::Release,
        Some(l) if l.holder == me => Step::Renew,
        None if patient => Step::Create,
        Some(l) if free(l) && patient => Step::TakeOver,
        None => Step::Follow {
            leader: String::new(),
        },
        Some(l) => Step::Follow {
            leader: l.holder.clone(),
        },
    }
}

/// Timings of the election.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How long a Lease is valid without renewal.
    pub duration: Duration,
    /// Step down when not renewed for this long.
    pub renew_deadline: Duration,
    /// How often to renew or check.
    pub retry_period: Duration,
}

/// Election timings that would let two replicas lead at once.
#[derive(Debug, thiserror::Error)]
pub enum TimingsError {
    /// A zero retry period (the loop would spin).
    #[error("--lease-retry-period must be longer than zero")]
    ZeroRetry,
    /// The retry period is not shorter than the renew deadline (a leader
    /// would step down between two renewals).
    #[error(
        "--lease-retry-period ({retry:?}) must be shorter than --lease-renew-deadline ({renew:?})"
    )]
    RetryNotBelowDeadline {
        /// --lease-retry-period.
        retry: Duration,
        /// --lease-renew-deadline.
        renew: Duration,
    },
    /// A leader that cannot renew might step down only after the Lease
    /// expired for the other replicas.
    #[error(
        "--lease-duration ({duration:?}, written to the Lease in whole seconds as {written}s) must be longer than --lease-renew-deadline ({renew:?}) + --lease-retry-period ({retry:?}) + one election round (bounded by the longer of --lease-retry-period and 200ms: {round:?}) = {needed:?}; otherwise a leader that cannot renew steps down only after another replica may have taken over (two leaders)"
    )]
    Overlap {
        /// --lease-duration.
        duration: Duration,
        /// What is written to `spec.leaseDurationSeconds`.
        written: i32,
        /// --lease-renew-deadline.
        renew: Duration,
        /// --lease-retry-period.
        retry: Duration,
        /// The bound of one round.
        round: Duration,
        /// The sum the duration must exceed.
        needed: Duration,
    },
}

impl Timings {
    /// The longest one election round (read, then write) may take before it
    /// counts as failed.
    pub fn round_timeout(&self) -> Duration {
        self.retry_period.max(Duration::from_millis(200))
    }

    /// Checks that a leader always steps down before its Lease can expire
    /// in any other replica's view.
    ///
    /// The leader counts its lease from the moment it *sent* its last
    /// successful renewal (S); the write lands at W >= S, and every other
    /// replica measures the Lease's age from when it first saw that write,
    /// so no one takes over before W + duration (the duration as written,
    /// in whole seconds). The leader checks its deadline after every round;
    /// two checks are at most one sleep (`retry_period`) plus one round
    /// (`round_timeout`) apart, so it steps down by S + renew_deadline +
    /// retry_period + round_timeout at the latest. Hence the written
    /// duration must exceed renew_deadline + retry_period + round_timeout
    /// (with the defaults: 15s, more than 10s + 2s + 2s).
    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.retry_period.is_zero() {
            return Err(TimingsError::ZeroRetry);
        }
        if self.retry_period >= self.renew_deadline {
            return Err(TimingsError::RetryNotBelowDeadline {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        let written = lease_seconds(self.duration);
        let round = self.round_timeout();
        let needed = self.renew_deadline + self.retry_period + round;
        if Duration::from_secs(written as u64) <= needed {
            return Err(TimingsError::Overlap {
                duration: self.duration,
                written,
                renew: self.renew_deadline,
                retry: self.retry_period,
                round,
                needed,
            });
        }
        Ok(())
    }
}

/// Runs the election of one replica.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    id: String,
    timings: Timings,
    leadership: Arc<watch::Sender<Leadership>>,
    yielding: Arc<AtomicBool>,
}

/// What one round of the election found.
struct Round {
    /// When this replica holds the Lease: when the write that proved it
    /// (create, renewal, takeover) was sent. The lease counts from then, not
    /// from the answer, which may arrive late.
    holding: Option<Instant>,
    leader: String,
    term: u64,
}

fn lease_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    /// An elector for Lease `name` in `api`'s namespace, publishing on
    /// `leadership`.
    pub fn new(
        api: Api<Lease>,
        name: &str,
        id: &str,
        timings: Timings,
        leadership: Arc<watch::Sender<Leadership>>,
        yielding: Arc<AtomicBool>,
    ) -> Self {
        Self {
            api,
            name: name.to_string(),
            id: id.to_string(),
            timings,
            leadership,
            yielding,
        }
    }

    /// Runs until the leadership channel has no receivers left (the store
    /// and the engine are gone).
    pub async fn run(self) {
        let mut seen: Option<(String, Instant)> = None;
        let mut last_renewal: Option<Instant> = None;
        loop {
            if self.leadership.is_closed() {
                return;
            }
            let round =
                tokio::time::timeout(self.timings.round_timeout(), self.round(&mut seen)).await;
            match round {
                Ok(Ok(Round {
                    holding: Some(sent),
                    leader,
                    term,
                })) => {
                    last_renewal = Some(sent);
                    // An answer that took longer than the deadline proves
                    // nothing: the check below steps down at once.
                    self.publish(true, Some(leader), term);
                }
                Ok(Ok(r)) => {
                    last_renewal = None;
                    self.publish(false, Some(r.leader).filter(|l| !l.is_empty()), r.term);
                }
                Ok(Err(e)) => warn!(lease = %self.name, error = %e, "lease election round failed"),
                Err(_) => warn!(lease = %self.name, "lease election round timed out"),
            }
            // A leader that cannot renew in time steps down before its Lease
            // can expire for the others.
            if last_renewal.is_some_and(|at| at.elapsed() >= self.timings.renew_deadline) {
                warn!(lease = %self.name, id = %self.id, "could not renew the lease in time; stepping down");
                last_renewal = None;
                let term = self.leadership.borrow().term;
                self.publish(false, None, term);
            }
            tokio::time::sleep(self.timings.retry_period).await;
        }
    }

    fn publish(&self, is_leader: bool, leader: Option<String>, term: u64) {
        let next = Leadership {
            is_leader,
            leader,
            term,
        };
        self.leadership.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            if current.is_leader != next.is_leader {
                info!(id = %self.id, is_leader, leader = ?next.leader, term, "leadership changed");
            }
            *current = next;
            true
        });
    }

    async fn round(&self, seen: &mut Option<(String, Instant)>) -> Result<Round, ::kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let now = Instant::now();
        let observed = current.as_ref().map(|l| {
            let spec = l.spec.clone().unwrap_or_default();
            Observed {
                holder: spec.holder_identity.unwrap_or_default(),
                duration: Duration::from_secs(
                    spec.lease_duration_seconds.unwrap_or(0).max(0) as u64
                ),
            }
        });
        let rv = current
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone())
            .unwrap_or_default();
        let unchanged_for = match seen {
            Some((seen_rv, at)) if *seen_rv == rv => now.duration_since(*at),
            _ => {
                *seen = Some((rv, now));
                Duration::ZERO
            }
        };
        let transitions = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let yielding = self
            .yielding
            .load(Ordering::SeqCst)
            .then_some(self.timings.duration * 2);
        let decided = step(observed.as_ref(), &self.id, unchanged_for, yielding);
        // Taken before the write below is sent (the read above is done).
        let sent = Instant::now();
        let (lease, term) = match (&decided, current) {
            (Step::Follow { leader }, _) => {
                return Ok(Round {
                    holding: None,
                    leader: leader.clone(),
                    term: transitions as u64,
                });
            }
            (Step::Release, current) => {
                if let Some(mut lease) = current {
                    info!(lease = %self.name, id = %self.id, "this replica's node holds the baton: handing the lease over");
                    // Not leading from before the Lease says so: once the
                    // write lands another replica may take over at once.
                    let term = self.leadership.borrow().term;
                    self.publish(false, None, term);
                    let mut spec = lease.spec.take().unwrap_or_default();
                    spec.holder_identity = None;
                    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
                    lease.spec = Some(spec);
                    match self
                        .api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await
                    {
                        // A conflict means someone else wrote it: re-read next round.
                        Ok(_) | Err(::kube::Error::Api(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                return Ok(Round {
                    holding: None,
                    leader: String::new(),
                    term: transitions as u64,
                });
            }
            // A Lease deleted between the read and the decision is created anew.
            (Step::Create, _) | (Step::Renew | Step::TakeOver, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                (self.api.create(&PostParams::default(), &lease).await, 0)
            }
            (Step::Renew, Some(mut lease)) => {
                let spec = lease.spec.take().unwrap_or_default();
                lease.spec = Some(self.spec(transitions, spec.acquire_time));
                (
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await,
                    transitions,
                )
            }
            (Step::TakeOver, Some(mut lease)) => {
                info!(lease = %self.name, id = %self.id, previous = ?observed.map(|o| o.holder), "taking over the lease");
                lease.spec = Some(self.spec(transitions + 1, None));
                (
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await,
                    transitions + 1,
                )
            }
        };
        match lease {
            Ok(_) => Ok(Round {
                holding: Some(sent),
                leader: self.id.clone(),
                term: term as u64,
            }),
            // Someone else wrote first (409 conflict or 409 already exists):
            // re-read next round and re-decide.
            Err(::kube::Error::Api(s)) if s.code == 409 => Ok(Round {
                holding: None,
                leader: String::new(),
                term: term as u64,
            }),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.id.clone()),
            lease_duration_seconds: Some(lease_seconds(self.timings.duration)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

/// Gives up Lease `name` if `id` holds it (a clean shutdown), so another
/// replica takes over at its next round instead of after the Lease expired.
/// The write is guarded by the resourceVersion read: a Lease someone else
/// took meanwhile is left alone.
pub async fn release(api: &Api<Lease>, name: &str, id: &str) -> Result<bool, ::kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(id) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    lease.spec = Some(spec);
    api.replace(name, &PostParams::default(), &lease).await?;
    info!(lease = %name, id = %id, "lease released");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str) -> Observed {
        Observed {
            holder: holder.to_string(),
            duration: Duration::from_secs(15),
        }
    }

    fn timings(duration_ms: u64, renew_ms: u64, retry_ms: u64) -> Timings {
        Timings {
            duration: Duration::from_millis(duration_ms),
            renew_deadline: Duration::from_millis(renew_ms),
            retry_period: Duration::from_millis(retry_ms),
        }
    }

    #[test]
    fn the_default_timings_are_valid() {
        timings(15_000, 10_000, 2_000).validate().unwrap();
    }

    #[test]
    fn timings_that_let_two_replicas_lead_are_refused_naming_the_flags() {
        // Renewal checks 2s + 2s apart: a leader whose last renewal was sent
        // at S steps down by S + 12s + 4s, after the Lease (15s) expired.
        let err = timings(15_000, 12_000, 2_000).validate().unwrap_err();
        let message = err.to_string();
        for flag in [
            "--lease-duration",
            "--lease-renew-deadline",
            "--lease-retry-period",
        ] {
            assert!(message.contains(flag), "{message}");
        }
        assert!(message.contains("two leaders"), "{message}");
        // Equal is not enough: the step-down could coincide with expiry.
        assert!(timings(15_000, 11_000, 2_000).validate().is_err());
        timings(15_000, 10_999, 2_000).validate().unwrap();
        // The round's 200ms floor counts when the retry period is shorter.
        assert!(timings(2_000, 1_700, 100).validate().is_err());
        timings(2_000, 1_650, 100).validate().unwrap();
    }

    #[test]
    fn the_lease_duration_counts_as_written_in_whole_seconds() {
        // 2.9s is written as 2s: followers take over after 2s.
        let err = timings(2_900, 2_000, 250).validate().unwrap_err();
        assert!(err.to_string().contains("as 2s"), "{err}");
    }

    #[test]
    fn a_retry_period_not_below_the_deadline_or_zero_is_refused() {
        let err = timings(15_000, 2_000, 2_000).validate().unwrap_err();
        assert!(err.to_string().contains("--lease-retry-period"), "{err}");
        assert!(matches!(
            timings(15_000, 2_000, 0).validate(),
            Err(TimingsError::ZeroRetry)
        ));
    }

    #[test]
    fn missing_lease_is_created() {
        assert_eq!(step(None, "a", Duration::ZERO, None), Step::Create);
    }

    #[test]
    fn holder_renews_whatever_the_age() {
        let s = step(Some(&held_by("a")), "a", Duration::from_secs(100), None);
        assert_eq!(s, Step::Renew);
    }

    #[test]
    fn live_lease_of_another_is_followed() {
        let s = step(Some(&held_by("b")), "a", Duration::from_secs(14), None);
        assert_eq!(
            s,
            Step::Follow {
                leader: "b".to_string()
            }
        );
    }

    #[test]
    fn expired_or_released_lease_is_taken_over() {
        let s = step(Some(&held_by("b")), "a", Duration::from_secs(15), None);
        assert_eq!(s, Step::TakeOver);
        assert_eq!(
            step(Some(&held_by("")), "a", Duration::ZERO, None),
            Step::TakeOver
        );
    }

    #[test]
    fn a_yielding_replica_releases_and_takes_over_only_when_nobody_else_does() {
        let patience = Some(Duration::from_secs(30));
        assert_eq!(
            step(Some(&held_by("a")), "a", Duration::ZERO, patience),
            Step::Release
        );
        let free = step(Some(&held_by("")), "a", Duration::from_secs(29), patience);
        assert_eq!(
            free,
            Step::Follow {
                leader: String::new()
            }
        );
        let s = step(Some(&held_by("")), "a", Duration::from_secs(30), patience);
        assert_eq!(s, Step::TakeOver);
        assert_eq!(
            step(None, "a", Duration::from_secs(30), patience),
            Step::Create
        );
    }
}
