//! What the agent's own lifecycle looks like in `kubectl` (pure mapping):
//! the annotations and the Event of each phase change, and the annotation
//! that says why the agent holds back its request for the baton.

use super::{NodeAnnotations, Transition};
use crate::node_ops::PhaseChange;
use crate::phase::Phase;

/// Set while the agent does not ask for the baton because of blocking pods;
/// its value says which. Removed when nothing blocks any more.
pub const WAITING_ANNOTATION: &str = "baton.dev/waiting";

/// The phase as written to the phase annotation (CamelCase, like the
/// annotation values the drain writes: `Draining`, `Drained`, ...).
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Idle => "Idle",
        Phase::Waiting => "Waiting",
        Phase::Granted => "Granted",
        Phase::Preparing => "Preparing",
        Phase::Updating => "Updating",
        Phase::Rebooting => "Rebooting",
        Phase::Verifying => "Verifying",
        Phase::Finishing => "Finishing",
        Phase::Aborting => "Aborting",
        Phase::Failed => "Failed",
    }
}

/// The annotation updates of a phase change: the phase, the token while one
/// is held, and the error when there is one (an earlier error is left in
/// place until a maintenance finishes, which clears it).
pub fn annotations(change: &PhaseChange) -> NodeAnnotations {
    NodeAnnotations {
        phase: Some(phase_name(change.to).to_string()),
        fencing_token: change.fencing_token,
        last_maintenance: None,
        last_error: change.error.clone().map(Some),
    }
}

/// The Event of a phase change: grants, releases, losses, failures and
/// aborts by name; every other phase as `Baton<Phase>`.
pub fn transition(change: &PhaseChange) -> Transition {
    let token = change
        .fencing_token
        .map(|t| format!(" (token {t})"))
        .unwrap_or_default();
    let with_error = |what: &str| match &change.error {
        Some(error) => format!("{what}: {error}"),
        None => format!("{what}: {}", change.message),
    };
    match (change.from, change.to) {
        (_, Phase::Granted) => Transition::normal(
            "BatonGranted",
            format!("baton granted{token}: {}", change.message),
        ),
        (Phase::Finishing, Phase::Idle) => {
            Transition::normal("BatonReleased", "maintenance done; baton released")
        }
        (Phase::Aborting, Phase::Idle) => Transition::warning(
            "BatonReleased",
            with_error("maintenance aborted; baton released"),
        ),
        (from, Phase::Idle) if from.holds_baton() => Transition::warning(
            "BatonLost",
            "the baton is no longer this node's; node given back",
        ),
        (_, Phase::Failed) => Transition::warning(
            "BatonMaintenanceFailed",
            with_error("maintenance failed; baton kept (rollout stops)"),
        ),
        (_, Phase::Aborting) => Transition::warning(
            "BatonAborting",
            with_error("preparing gave up; node back in service, releasing"),
        ),
        (_, to) => Transition::normal(
            format!("Baton{}", phase_name(to)),
            format!("{}{token}", change.message),
        ),
    }
}

/// The value of [`WAITING_ANNOTATION`] for `blockers` (None: remove it).
pub fn waiting_reason(blockers: &[String]) -> Option<String> {
    (!blockers.is_empty()).then(|| format!("blocking pods: {}", blockers.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(from: Phase, to: Phase, error: Option<&str>) -> PhaseChange {
        PhaseChange {
            from,
            to,
            fencing_token: to.holds_baton().then_some(7),
            message: "msg".into(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn grants_releases_and_failures_have_their_own_events() {
        let t = transition(&change(Phase::Waiting, Phase::Granted, None));
        assert_eq!(t.reason, "BatonGranted");
        assert!(t.message.contains("token 7"));
        let t = transition(&change(Phase::Finishing, Phase::Idle, None));
        assert_eq!((t.reason.as_str(), t.warning), ("BatonReleased", false));
        let t = transition(&change(
            Phase::Aborting,
            Phase::Idle,
            Some("drain timed out"),
        ));
        assert_eq!((t.reason.as_str(), t.warning), ("BatonReleased", true));
        assert!(t.message.contains("drain timed out"));
        let t = transition(&change(Phase::Updating, Phase::Failed, Some("boom")));
        assert_eq!(
            (t.reason.as_str(), t.warning),
            ("BatonMaintenanceFailed", true)
        );
        let t = transition(&change(Phase::Failed, Phase::Idle, None));
        assert_eq!(t.reason, "BatonLost");
        let t = transition(&change(Phase::Preparing, Phase::Updating, None));
        assert_eq!((t.reason.as_str(), t.warning), ("BatonUpdating", false));
    }

    #[test]
    fn annotations_carry_phase_token_and_error() {
        let a = annotations(&change(Phase::Preparing, Phase::Aborting, Some("refused")));
        assert_eq!(a.phase.as_deref(), Some("Aborting"));
        assert_eq!(a.fencing_token, Some(7));
        assert_eq!(a.last_error, Some(Some("refused".into())));
        let a = annotations(&change(Phase::Granted, Phase::Preparing, None));
        assert_eq!(a.last_error, None, "an earlier error is left in place");
    }

    #[test]
    fn waiting_names_the_pods() {
        assert_eq!(waiting_reason(&[]), None);
        let why = waiting_reason(&["ci/job-1 (matches app=ci)".into()]).unwrap();
        assert!(why.contains("ci/job-1"));
    }
}
