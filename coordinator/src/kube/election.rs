//! Leader election on a coordination.k8s.io/v1 Lease.
//!
//! Every replica reads the Lease each `--lease-retry-period`. The holder
//! renews it; the others follow, and take it over only once it has not
//! changed for a whole `--lease-duration` as measured on their own clock
//! (the time a replica first saw the current resourceVersion, so clock skew
//! between nodes does not matter). Every write is guarded by the
//! resourceVersion read, so two replicas can never both win a takeover.
//! A leader that could not renew for `--lease-renew-deadline` (shorter than
//! the duration) steps down before anyone else may take over.
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
    holding: bool,
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
            let round = tokio::time::timeout(
                self.timings.retry_period.max(Duration::from_millis(200)),
                self.round(&mut seen),
            )
            .await;
            match round {
                Ok(Ok(r)) if r.holding => {
                    last_renewal = Some(Instant::now());
                    self.publish(true, Some(r.leader), r.term);
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
        let (lease, term) = match (&decided, current) {
            (Step::Follow { leader }, _) => {
                return Ok(Round {
                    holding: false,
                    leader: leader.clone(),
                    term: transitions as u64,
                });
            }
            (Step::Release, current) => {
                if let Some(mut lease) = current {
                    info!(lease = %self.name, id = %self.id, "this replica's node holds the baton: handing the lease over");
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
                    holding: false,
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
                holding: true,
                leader: self.id.clone(),
                term: term as u64,
            }),
            // Someone else wrote first (409 conflict or 409 already exists):
            // re-read next round and re-decide.
            Err(::kube::Error::Api(s)) if s.code == 409 => Ok(Round {
                holding: false,
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
