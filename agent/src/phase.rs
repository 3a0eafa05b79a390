//! The agent's maintenance lifecycle as a pure state machine.
//!
//! [`Phase`] says which step the agent is in; [`Event`] is what happened; and
//! [`transition`] is the only way from one phase to the next. It does no I/O,
//! reads no clock and never panics: an event that makes no sense in a phase is
//! an [`IllegalTransition`], which the caller turns into a Failed report
//! instead of a crash loop.
//!
//! A phase names the step that is *in progress*. The agent persists the phase
//! before it starts the step, so that an agent restarted at any point runs the
//! same step again; every step is idempotent for that reason.
//!
//! ```text
//! Idle --MaintenanceNeeded--> Waiting --Granted--> Granted --Started--> Preparing
//!   ^                           |                                          |
//!   +------NeedCleared----------+                                      Prepared
//!   |                                                                      v
//!   |      Verifying <--Updated{reboot_required: false}--------------- Updating
//!   |        ^   |                                                        |
//!   |   Booted{new}  Verified                           Updated{reboot_required: true}
//!   |        |   v                                                        v
//!   |     Rebooting   Finishing --Released--> Idle                   Rebooting <-+
//!   |                                                                     |      |
//!   |                                                                     +------+
//!   |                                                                   Booted{same}
//!   |
//!   +--Fenced-- (any phase holding the baton, including Failed)
//!   +--Released-- Aborting <--PrepareAborted-- Preparing
//! any holding phase --StepFailed--> Failed (keeps the baton: fail closed)
//! ```
//!
//! `Booted{same}` keeps `Rebooting`: the reboot did not happen (yet), and
//! the agent asks for it again, a bounded number of times before it fails
//! the step. `Waiting` is persisted too, so that an agent restarted while
//! queued asks again (or withdraws) instead of leaving a grant it does not
//! know about.
//!
//! `PrepareAborted` is the one way a maintenance ends early *and* gives the
//! baton back: node operations gave up preparing in a way that left the node
//! serving as before (a Kubernetes drain that timed out or was refused, after
//! which the node was uncordoned). Nothing was taken down, so holding on to
//! the baton would stop the rollout for no safety gain; the agent releases it
//! with the reason and asks again later. Every other failure is `StepFailed`.

use serde::{Deserialize, Serialize};

/// Where the agent is in its maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No maintenance in progress and the baton is not held.
    Idle,
    /// Maintenance is needed; the agent asked for the baton and waits.
    Waiting,
    /// The baton was granted; nothing has been touched yet.
    Granted,
    /// Node operations prepare the node (drain, or pre-maintenance units).
    Preparing,
    /// The OS update is being applied.
    Updating,
    /// The reboot is persisted and requested; the next boot must differ.
    Rebooting,
    /// Back after boot (or no reboot was needed): post-checks run.
    Verifying,
    /// Node operations undo the preparation (uncordon, post units); the
    /// release follows.
    Finishing,
    /// Preparing gave up without taking the node down (a drain timed out
    /// or was refused): the node is given back to service and the baton
    /// released with the reason; no update, no reboot.
    Aborting,
    /// A step failed. The baton stays held so that the rollout stops.
    Failed,
}

impl Phase {
    /// True in every phase in which the agent holds the baton (and so must
    /// renew it).
    pub fn holds_baton(self) -> bool {
        !matches!(self, Phase::Idle | Phase::Waiting)
    }

    /// Every phase, for exhaustive tests.
    pub const ALL: [Phase; 10] = [
        Phase::Idle,
        Phase::Waiting,
        Phase::Granted,
        Phase::Preparing,
        Phase::Updating,
        Phase::Rebooting,
        Phase::Verifying,
        Phase::Finishing,
        Phase::Aborting,
        Phase::Failed,
    ];

    /// The phase as the `baton.v1` API reports it. `Idle` and `Waiting` are
    /// never reported (the agent does not hold the baton then).
    pub fn to_proto(self) -> baton_proto::v1::Phase {
        use baton_proto::v1::Phase as P;
        match self {
            Phase::Idle | Phase::Waiting => P::Unspecified,
            Phase::Granted => P::Granted,
            Phase::Preparing => P::Draining,
            Phase::Updating => P::Updating,
            Phase::Rebooting => P::Rebooting,
            Phase::Verifying => P::Verifying,
            // Giving the node back is an uncordon, as at the end of a
            // maintenance; the reason travels in the report's error.
            Phase::Finishing | Phase::Aborting => P::Uncordoning,
            Phase::Failed => P::Failed,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Phase::Idle => "idle",
            Phase::Waiting => "waiting",
            Phase::Granted => "granted",
            Phase::Preparing => "preparing",
            Phase::Updating => "updating",
            Phase::Rebooting => "rebooting",
            Phase::Verifying => "verifying",
            Phase::Finishing => "finishing",
            Phase::Aborting => "aborting",
            Phase::Failed => "failed",
        };
        f.write_str(name)
    }
}

/// Something that happened to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A sentinel, sentinel command or update check says maintenance is due.
    MaintenanceNeeded,
    /// The need went away while the agent was still waiting (the request is
    /// withdrawn).
    NeedCleared,
    /// The coordinator granted the baton (fresh or resumed).
    Granted,
    /// The agent starts working with the baton it holds.
    Started,
    /// Node operations finished preparing the node.
    Prepared,
    /// Node operations gave up preparing and left the node in service (a
    /// drain that timed out or was refused, without
    /// `--force-reboot-on-drain-timeout`).
    PrepareAborted,
    /// The update finished; `reboot_required` is what the sentinels say now.
    Updated {
        /// True when a reboot sentinel is present after the update.
        reboot_required: bool,
    },
    /// The agent started after a reboot was requested; `boot_changed` is
    /// whether the boot_id differs from the persisted one.
    Booted {
        /// True when the current boot_id differs from the one persisted
        /// before the reboot.
        boot_changed: bool,
    },
    /// Post-checks passed.
    Verified,
    /// Node operations finished and the baton was given back.
    Released,
    /// A step failed; the message is reported to the coordinator.
    StepFailed,
    /// The coordinator refused the fencing token: the baton is no longer
    /// ours (force-released by an operator).
    Fenced,
}

/// An event that cannot happen in the given phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event:?} in phase {phase}")]
pub struct IllegalTransition {
    /// The phase the agent was in.
    pub phase: Phase,
    /// The event that does not apply to it.
    pub event: Event,
}

/// Advance the lifecycle: the phase after `event` happened in `phase`.
///
/// Guarantees (checked by the property tests below):
/// - the agent only enters `Rebooting` from `Updating` with a reboot
///   required, so it never reboots without holding the baton or without a
///   sentinel saying so;
/// - a reboot that did not change the boot_id leaves the agent in
///   `Rebooting` (it asks for the reboot again), never in `Verifying`;
/// - `Failed` is left only by losing the baton (`Fenced`): a broken node keeps
///   the baton and stops the rollout;
/// - the baton is given up (`Idle`) only after `Finishing`, after
///   `Aborting` (reached only from `Preparing`, so before any update or
///   reboot), or when the coordinator says it is no longer ours.
pub fn transition(phase: Phase, event: &Event) -> Result<Phase, IllegalTransition> {
    use Event as E;
    use Phase as P;
    let next = match (phase, event) {
        (P::Idle, E::MaintenanceNeeded) => P::Waiting,
        (P::Waiting, E::NeedCleared) => P::Idle,
        // A grant in Idle happens when the state file was lost and the
        // coordinator tells us that we still hold the baton.
        (P::Idle | P::Waiting, E::Granted) => P::Granted,
        (P::Granted, E::Started) => P::Preparing,
        (P::Preparing, E::Prepared) => P::Updating,
        (P::Preparing, E::PrepareAborted) => P::Aborting,
        (
            P::Updating,
            E::Updated {
                reboot_required: true,
            },
        ) => P::Rebooting,
        (
            P::Updating,
            E::Updated {
                reboot_required: false,
            },
        ) => P::Verifying,
        (P::Rebooting, E::Booted { boot_changed: true }) => P::Verifying,
        // The reboot did not happen (yet): a restarted agent asks again
        // (bounded by the agent, which fails the step after a few tries).
        (
            P::Rebooting,
            E::Booted {
                boot_changed: false,
            },
        ) => P::Rebooting,
        (P::Verifying, E::Verified) => P::Finishing,
        (P::Finishing | P::Aborting, E::Released) => P::Idle,
        (
            P::Granted
            | P::Preparing
            | P::Updating
            | P::Rebooting
            | P::Verifying
            | P::Finishing
            | P::Aborting,
            E::StepFailed,
        ) => P::Failed,
        (p, E::Fenced) if p.holds_baton() => P::Idle,
        (phase, event) => {
            return Err(IllegalTransition {
                phase,
                event: event.clone(),
            });
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::MaintenanceNeeded),
            Just(Event::NeedCleared),
            Just(Event::Granted),
            Just(Event::Started),
            Just(Event::Prepared),
            Just(Event::PrepareAborted),
            any::<bool>().prop_map(|r| Event::Updated { reboot_required: r }),
            any::<bool>().prop_map(|b| Event::Booted { boot_changed: b }),
            Just(Event::Verified),
            Just(Event::Released),
            Just(Event::StepFailed),
            Just(Event::Fenced),
        ]
    }

    #[test]
    fn a_full_maintenance_with_reboot_ends_idle() {
        let events = [
            Event::MaintenanceNeeded,
            Event::Granted,
            Event::Started,
            Event::Prepared,
            Event::Updated {
                reboot_required: true,
            },
            Event::Booted { boot_changed: true },
            Event::Verified,
            Event::Released,
        ];
        let end = events.iter().try_fold(Phase::Idle, transition).unwrap();
        assert_eq!(end, Phase::Idle);
    }

    #[test]
    fn a_reboot_that_did_not_happen_is_asked_for_again() {
        assert_eq!(
            transition(
                Phase::Rebooting,
                &Event::Booted {
                    boot_changed: false
                }
            ),
            Ok(Phase::Rebooting)
        );
        assert_eq!(
            transition(Phase::Rebooting, &Event::StepFailed),
            Ok(Phase::Failed)
        );
    }

    #[test]
    fn an_update_without_sentinel_skips_the_reboot() {
        assert_eq!(
            transition(
                Phase::Updating,
                &Event::Updated {
                    reboot_required: false
                }
            ),
            Ok(Phase::Verifying)
        );
    }

    #[test]
    fn failed_is_only_left_by_losing_the_baton() {
        for e in [
            Event::MaintenanceNeeded,
            Event::Granted,
            Event::Started,
            Event::Verified,
            Event::Released,
            Event::StepFailed,
        ] {
            assert!(transition(Phase::Failed, &e).is_err(), "{e:?}");
        }
        assert_eq!(transition(Phase::Failed, &Event::Fenced), Ok(Phase::Idle));
    }

    #[test]
    fn an_aborted_drain_releases_without_update_or_reboot() {
        let events = [
            Event::MaintenanceNeeded,
            Event::Granted,
            Event::Started,
            Event::PrepareAborted,
        ];
        let end = events.iter().try_fold(Phase::Idle, transition).unwrap();
        assert_eq!(end, Phase::Aborting);
        assert!(end.holds_baton(), "the release is still to be done");
        assert_eq!(transition(end, &Event::Released), Ok(Phase::Idle));
        // Nothing but the release (or failing it, or losing the baton)
        // leaves Aborting: no update, no reboot.
        for e in [
            Event::Prepared,
            Event::Updated {
                reboot_required: true,
            },
            Event::Verified,
        ] {
            assert!(transition(Phase::Aborting, &e).is_err(), "{e:?}");
        }
    }

    #[test]
    fn only_preparing_can_abort() {
        for p in Phase::ALL {
            let r = transition(p, &Event::PrepareAborted);
            assert_eq!(r.is_ok(), p == Phase::Preparing, "{p}");
        }
    }

    #[test]
    fn errors_name_the_phase_and_event() {
        let err = transition(Phase::Idle, &Event::Verified).unwrap_err();
        assert_eq!(err.phase, Phase::Idle);
        assert!(err.to_string().contains("Verified"));
    }

    proptest! {
        /// Over any sequence of events (illegal ones are rejected and leave
        /// the phase unchanged), the safety properties hold.
        #[test]
        fn safety_over_random_event_sequences(events in proptest::collection::vec(event(), 0..64)) {
            let mut phase = Phase::Idle;
            for event in &events {
                match transition(phase, event) {
                    Ok(next) => {
                        if next == Phase::Rebooting && phase != Phase::Rebooting {
                            prop_assert_eq!(phase, Phase::Updating);
                            prop_assert_eq!(event, &Event::Updated { reboot_required: true });
                        }
                        if phase == Phase::Rebooting && next == Phase::Verifying {
                            prop_assert_eq!(event, &Event::Booted { boot_changed: true });
                        }
                        if event == &(Event::Booted { boot_changed: false }) {
                            prop_assert_eq!(next, Phase::Rebooting);
                        }
                        if phase == Phase::Failed {
                            prop_assert_eq!(event, &Event::Fenced);
                        }
                        if phase.holds_baton() && !next.holds_baton() {
                            prop_assert!(
                                matches!(event, Event::Fenced)
                                    || (matches!(phase, Phase::Finishing | Phase::Aborting)
                                        && event == &Event::Released)
                            );
                        }
                        if next == Phase::Aborting {
                            prop_assert_eq!(phase, Phase::Preparing);
                        }
                        if !phase.holds_baton() && next.holds_baton() {
                            prop_assert_eq!(event, &Event::Granted);
                        }
                        phase = next;
                    }
                    Err(err) => prop_assert_eq!(err.phase, phase),
                }
            }
        }
    }

    #[test]
    fn every_holding_phase_maps_to_a_reported_phase() {
        for p in Phase::ALL {
            assert_eq!(
                p.holds_baton(),
                p.to_proto() != baton_proto::v1::Phase::Unspecified,
                "{p}"
            );
        }
    }
}
