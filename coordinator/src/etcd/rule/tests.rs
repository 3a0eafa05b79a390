//! Examples and properties of the quorum rule.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::etcd::health::fixtures::{cluster, member};
use crate::etcd::health::{Alarm, MemberHealth};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 12, 0, 0).unwrap()
}

/// The rule with the snapshot's age taken from its wall-clock stamp, so
/// the examples below can say "six seconds old" directly.
fn may_take_down(
    health: &HealthSnapshot,
    node: &str,
    member: &str,
    out: &[OutNode],
    settings: &QuorumSettings,
    now: DateTime<Utc>,
) -> Result<(), String> {
    super::may_take_down(health, node, member, out, settings, now - health.taken_at)
}

fn three() -> Vec<MemberHealth> {
    vec![member(1, "n1"), member(2, "n2"), member(3, "n3")]
}

fn run(members: Vec<MemberHealth>, settings: &QuorumSettings) -> Result<(), String> {
    may_take_down(&cluster(now(), members), "n1", "n1", &[], settings, now())
}

#[test]
fn healthy_three_member_cluster_allows_one_down() {
    assert_eq!(run(three(), &QuorumSettings::default()), Ok(()));
}

#[test]
fn one_unhealthy_member_blocks_with_the_exact_reason() {
    let mut members = three();
    members[1] = member(2, "n2").down("connection refused");
    assert_eq!(
        run(members, &QuorumSettings::default()),
        Err("etcd: member n2 unhealthy (connection refused); taking n1 down would leave 1 of 3 voting members, quorum is 2".to_string())
    );
}

#[test]
fn stale_or_unreadable_data_answers_no() {
    let settings = QuorumSettings::default();
    let old = cluster(now() - Duration::seconds(6), three());
    assert!(
        may_take_down(&old, "n1", "n1", &[], &settings, now())
            .unwrap_err()
            .contains("old")
    );
    let gone = HealthSnapshot::unreadable(now(), "connection refused");
    assert_eq!(
        may_take_down(&gone, "n1", "n1", &[], &settings, now()),
        Err("etcd: cannot read the cluster (connection refused)".to_string())
    );
}

#[test]
fn alarms_learners_and_two_member_clusters_block() {
    let settings = QuorumSettings::default();
    let mut alarmed = cluster(now(), three());
    alarmed.alarms.push(Alarm {
        member_id: 2,
        kind: "NOSPACE".into(),
    });
    assert!(
        may_take_down(&alarmed, "n1", "n1", &[], &settings, now())
            .unwrap_err()
            .contains("alarm NOSPACE raised by member n2")
    );
    let mut with_learner = three();
    with_learner.push(member(4, "n4").learner());
    assert!(
        run(with_learner, &settings)
            .unwrap_err()
            .contains("member n4 is a learner")
    );
    assert!(
        run(vec![member(1, "n1"), member(2, "n2")], &settings)
            .unwrap_err()
            .contains("2-member")
    );
    let outage = QuorumSettings {
        allow_outage: true,
        ..settings.clone()
    };
    assert!(
        run(vec![member(1, "n1")], &settings)
            .unwrap_err()
            .contains("--etcd-allow-outage")
    );
    assert_eq!(run(vec![member(1, "n1")], &outage), Ok(()));
    assert!(run(vec![member(1, "n1"), member(2, "n2")], &outage).is_err());
}

#[test]
fn another_etcd_node_out_blocks() {
    let out = [OutNode {
        node: "n2".into(),
        member: "n2".into(),
        why: "holds the baton".into(),
    }];
    let health = cluster(now(), three());
    assert_eq!(
        may_take_down(&health, "n1", "n1", &out, &QuorumSettings::default(), now()),
        Err("etcd: node n2 (member n2) holds the baton; only one etcd node at a time".to_string())
    );
}

#[test]
fn another_etcd_node_out_names_unhealthy_members_too() {
    // The lab's chaos run: n2 is not verified back yet while n3's member is
    // frozen; the reason must point at n3 as well, not only at n2.
    let out = [OutNode {
        node: "n2".into(),
        member: "n2".into(),
        why: "is not verified back yet (1 of 3 healthy checks in a row)".into(),
    }];
    let mut members = three();
    members[2] = member(3, "n3").down("no answer within 1000ms");
    let health = cluster(now(), members);
    let reason =
        may_take_down(&health, "n1", "n1", &out, &QuorumSettings::default(), now()).unwrap_err();
    assert!(
        reason.contains("n2 (member n2) is not verified back yet"),
        "{reason}"
    );
    assert!(
        reason.contains("also member n3 unhealthy (no answer within 1000ms)"),
        "{reason}"
    );
}

#[test]
fn degraded_is_allowed_only_from_five_members() {
    let degraded = QuorumSettings {
        allow_degraded: true,
        ..QuorumSettings::default()
    };
    let mut five: Vec<_> = (1..=5).map(|i| member(i, &format!("n{i}"))).collect();
    five[4] = member(5, "n5").down("timed out");
    assert!(run(five.clone(), &QuorumSettings::default()).is_err());
    assert_eq!(run(five.clone(), &degraded), Ok(()));
    five[3] = member(4, "n4").down("timed out");
    assert!(
        run(five, &degraded)
            .unwrap_err()
            .contains("would leave 2 of 5 voting members, quorum is 3")
    );
    let mut three = three();
    three[2] = member(3, "n3").down("x");
    assert!(run(three, &degraded).is_err());
}

fn arb_member(id: u64) -> impl Strategy<Value = MemberHealth> {
    (
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(healthy, learner, unstarted, disagrees)| {
            let mut m = member(id, &format!("n{id}"));
            if !healthy {
                m.problem = Some("down".into());
            }
            m.is_learner = learner;
            if unstarted {
                m.name.clear();
            }
            if disagrees {
                m.leader = 2;
            }
            m
        })
}

fn arb_cluster() -> impl Strategy<Value = Vec<MemberHealth>> {
    (1usize..=7).prop_flat_map(|n| (1..=n as u64).map(arb_member).collect::<Vec<_>>())
}

proptest! {
    #[test]
    fn a_yes_always_leaves_quorum(members in arb_cluster(), degraded in any::<bool>(), outage in any::<bool>(), alarm in prop::bool::weighted(0.1)) {
        let settings = QuorumSettings { allow_degraded: degraded, allow_outage: outage, ..QuorumSettings::default() };
        let mut health = cluster(now(), members.clone());
        if alarm {
            health.alarms.push(Alarm { member_id: 1, kind: "NOSPACE".into() });
        }
        if may_take_down(&health, "n1", "n1", &[], &settings, now()).is_ok() {
            let voting: Vec<_> = members.iter().filter(|m| m.voting()).collect();
            let v = voting.len();
            prop_assert!(!alarm);
            prop_assert!(members.iter().all(|m| m.voting()));
            prop_assert!(v != 2);
            if v == 1 {
                prop_assert!(outage);
            } else {
                let left = voting.iter().filter(|m| m.name != "n1" && m.healthy()).count();
                prop_assert!(left >= quorum(v), "left {left} of {v}");
                if !(degraded && v >= 5) {
                    prop_assert_eq!(left, v - 1);
                }
            }
        }
    }

    #[test]
    fn losing_a_member_never_turns_no_into_yes(members in arb_cluster(), which in any::<prop::sample::Index>(), degraded in any::<bool>()) {
        let settings = QuorumSettings { allow_degraded: degraded, ..QuorumSettings::default() };
        // Leader disagreement is its own check; here every member agrees.
        let members: Vec<_> = members.into_iter().map(|mut m| { m.leader = 1; m }).collect();
        let before = may_take_down(&cluster(now(), members.clone()), "n1", "n1", &[], &settings, now());
        let mut worse = members.clone();
        let i = which.index(worse.len());
        worse[i].problem = Some("down".into());
        let after = may_take_down(&cluster(now(), worse), "n1", "n1", &[], &settings, now());
        if before.is_err() {
            prop_assert!(after.is_err());
        }
    }

    #[test]
    fn stale_data_never_grants(members in arb_cluster(), age_ms in 5_001i64..100_000) {
        let health = cluster(now() - Duration::milliseconds(age_ms), members);
        let settings = QuorumSettings { allow_outage: true, allow_degraded: true, ..QuorumSettings::default() };
        prop_assert!(may_take_down(&health, "n1", "n1", &[], &settings, now()).is_err());
    }
}
