//! The control-plane backup step over the simulated node: kept before the
//! drain; fail closed (no drain, no update, the baton given back) when it
//! cannot be made or sent; made and sent again after a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::coordinator::Step;
use crate::fakes::driver::{Driver, settings};
use crate::fakes::{Faults, Point, Rec, Sim, SimState};

const HOUR: Duration = Duration::from_secs(3600);

/// A pki tree with a private key, in `root`.
fn pki(root: &Path) -> PathBuf {
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.key"), b"KEY").unwrap();
    std::fs::set_permissions(pki.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    pki
}

/// A control-plane node's update whose grant asks for a backup of
/// `paths`, with `tweak` applied.
fn driver(paths: Vec<PathBuf>, faults: Faults, tweak: impl FnOnce(&mut SimState)) -> Driver {
    let mut state = SimState {
        updates_pending: true,
        backup_required: true,
        ..SimState::default()
    };
    tweak(&mut state);
    Driver::new(
        Sim::new(state, faults),
        Settings {
            backup_paths: paths,
            ..settings()
        },
    )
}

fn given_back(s: &crate::fakes::SimState, a: Option<&AgentState>) -> bool {
    !s.releases().is_empty() && a.is_some_and(|a| a.phase == Phase::Idle)
}

/// No archive (it holds keys) is left in the state directory.
fn no_archive_left(d: &Driver) {
    let left: Vec<_> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("backup"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(start_paused = true)]
async fn the_backup_is_kept_before_the_drain() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(vec![pki(root.path())], Faults::None, |_| {});
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none() && given_back(s, a))
            .await
    );
    let s = d.sim.state();
    assert_eq!(s.backups.len(), 1, "one backup, for grant 1");
    assert_eq!(s.backups[0].0, 1);
    let kept = s.log.iter().position(|r| *r == Rec::BackupKept(1));
    let drained = s.log.iter().position(|r| matches!(r, Rec::Prepare(_)));
    assert!(
        kept.is_some() && kept < drained,
        "kept, then drained: {:?}",
        s.log
    );
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
    no_archive_left(&d);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_coordinator_for_the_upload_gives_the_baton_back_undrained() {
    let root = tempfile::tempdir().unwrap();
    // Every upload fails as an unreachable coordinator would; the other
    // calls go through.
    let d = driver(vec![pki(root.path())], Faults::None, |s| {
        s.backup_unreachable = true;
    });
    assert!(d.run(HOUR, given_back).await);
    let s = d.sim.state();
    assert!(s.backups.is_empty());
    assert!(
        !s.node_calls.contains(&"prepare"),
        "not drained: {:?}",
        s.node_calls
    );
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 0);
    assert!(!s.cordoned);
    assert_eq!(
        s.count(|r| matches!(r, Rec::UpdateStart { .. })),
        0,
        "not updated"
    );
    assert_eq!(s.boot, 1, "not rebooted");
    assert!(
        s.release_reasons[0].contains("control-plane backup"),
        "{:?}",
        s.release_reasons
    );
    assert!(
        s.release_reasons[0].contains("3 of 3 attempts"),
        "bounded retries: {:?}",
        s.release_reasons
    );
    assert!(
        d.agent_state().unwrap().hold_back.is_some(),
        "held back before asking again"
    );
    no_archive_left(&d);
}

#[tokio::test(start_paused = true)]
async fn a_refused_upload_gives_the_baton_back_at_once() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(vec![pki(root.path())], Faults::None, |s| {
        s.backup_max_bytes = 10;
    });
    assert!(d.run(HOUR, given_back).await);
    let s = d.sim.state();
    assert!(!s.node_calls.contains(&"prepare"));
    assert!(
        s.release_reasons[0].contains("ResourceExhausted")
            && s.release_reasons[0].contains("1 of 3"),
        "refused, not retried: {:?}",
        s.release_reasons
    );
}

#[tokio::test(start_paused = true)]
async fn a_missing_backup_path_gives_the_baton_back_undrained() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(
        vec![root.path().join("etc/kubernetes/pki")],
        Faults::None,
        |_| {},
    );
    assert!(d.run(HOUR, given_back).await);
    let s = d.sim.state();
    assert!(!s.node_calls.contains(&"prepare"));
    assert!(
        s.release_reasons[0].contains("does not exist"),
        "{:?}",
        s.release_reasons
    );
}

#[tokio::test(start_paused = true)]
async fn no_backup_when_the_grant_does_not_ask_for_one() {
    // A worker: the missing path is never looked at.
    let root = tempfile::tempdir().unwrap();
    let d = driver(vec![root.path().join("missing")], Faults::None, |s| {
        s.backup_required = false;
    });
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none() && given_back(s, a))
            .await
    );
    let s = d.sim.state();
    assert!(s.backups.is_empty());
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
}

#[tokio::test(start_paused = true)]
async fn an_agent_killed_after_the_upload_sends_it_again_before_the_drain() {
    let root = tempfile::tempdir().unwrap();
    // Killed once the upload took effect, before its answer arrived.
    let d = driver(
        vec![pki(root.path())],
        Faults::OnPoint {
            point: Point::UploadBackup,
            nth: 0,
            fault: crate::fakes::Fault::KillAfter,
            seen: 0,
        },
        |_| {},
    );
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none() && given_back(s, a))
            .await
    );
    let s = d.sim.state();
    assert_eq!(s.backups.len(), 2, "sent again by the restarted agent");
    assert_eq!(
        s.backups[0], s.backups[1],
        "the same grant, the same archive"
    );
    assert_eq!(s.releases(), vec![1], "one grant");
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
    no_archive_left(&d);
}

#[tokio::test(start_paused = true)]
async fn a_grant_resumed_from_an_older_agents_state_asks_whether_it_needs_a_backup() {
    let root = tempfile::tempdir().unwrap();
    // An older agent held grant 1 and saved Preparing without the
    // backup_required field (it did not know it); the coordinator wants
    // the backup for that grant.
    let d = driver(vec![pki(root.path())], Faults::None, |s| {
        s.hold(1, Phase::Preparing);
    });
    std::fs::write(
        d.dir.path().join("state.json"),
        serde_json::to_vec(&crate::fakes::older_agents_state(1)).unwrap(),
    )
    .unwrap();
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none() && given_back(s, a))
            .await
    );
    let s = d.sim.state();
    let kept = s.log.iter().position(|r| *r == Rec::BackupKept(1));
    let confirmed = s.log.iter().position(|r| {
        matches!(
            r,
            Rec::Confirmed {
                step: Step::Drain,
                answer: "go",
                ..
            }
        )
    });
    let drained = s.log.iter().position(|r| matches!(r, Rec::Prepare(_)));
    assert!(
        kept.is_some() && kept < confirmed && confirmed < drained,
        "the backup is kept, then the drain confirmed, then the node drained: {:?}",
        s.log
    );
    no_archive_left(&d);
}

/// A grant whose backup this agent skipped (its state says it learned
/// that no backup is needed: an older coordinator replica answered during
/// a rolling upgrade, or any other path past the backup) is not drained
/// while the coordinator wants the backup: Confirm(drain) says wait, the
/// agent reports why and keeps the baton, undrained and uncordoned; it
/// drains once the coordinator says go.
#[tokio::test(start_paused = true)]
async fn a_grant_that_skipped_its_backup_is_not_drained_until_the_coordinator_says_go() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(vec![pki(root.path())], Faults::None, |s| {
        s.hold(1, Phase::Preparing);
    });
    let state = AgentState {
        phase: Phase::Preparing,
        fencing_token: Some(1),
        reason: "updates pending".into(),
        backup_learned: Some(1),
        backup_required: None,
        ..AgentState::idle()
    };
    std::fs::write(
        d.dir.path().join("state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    // An hour of waiting: never drained, never cordoned, the baton kept.
    assert!(!d.run(HOUR, |s, _| !s.node_calls.is_empty()).await);
    {
        let s = d.sim.state();
        assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 0, "{:?}", s.log);
        assert!(!s.cordoned);
        assert_eq!(s.holder.as_ref().map(|h| h.token), Some(1));
        assert!(s.confirmed().iter().all(|c| *c == (Step::Drain, "wait")));
        assert!(
            s.holder
                .as_ref()
                .is_some_and(|h| h.message.contains("before the drain")
                    && h.message.contains("control-plane backup")),
            "the reason is shown: {:?}",
            s.holder
        );
    }
    // The backup arrives (an operator's, or the coordinator changed its
    // mind): the next Confirm says go and the maintenance goes on.
    d.sim.state().backups.push((1, "sha".into(), 3));
    assert!(
        d.run(HOUR, |s, a| s.holder.is_none() && given_back(s, a))
            .await
    );
    let s = d.sim.state();
    assert_eq!(s.count(|r| matches!(r, Rec::Prepare(_))), 1);
    assert_eq!(s.count(|r| matches!(r, Rec::UpdateStart { .. })), 1);
}
