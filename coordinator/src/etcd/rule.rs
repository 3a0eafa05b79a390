//! The quorum rule: may the etcd member of a node go down now? A pure
//! function of one health snapshot, the clock and the settings.
//!
//! With V the voting members, Q = floor(|V|/2)+1 and t the candidate's
//! member, [`may_take_down`] answers yes only if all of these hold:
//! 1. the snapshot is readable and younger than `max_age` (its age is
//!    measured by the caller on a monotonic clock, never from wall-clock
//!    timestamps);
//! 2. t is in the member list;
//! 3. no alarm is active (NOSPACE, CORRUPT, ...);
//! 4. every member is started and voting (no learner, no unstarted member);
//! 5. |V| is not 2 (either loss breaks quorum), and |V| = 1 only with
//!    `allow_outage` (the preparer then still requires a verified snapshot);
//! 6. no other etcd node is out (holding the baton, or not verified back);
//! 7. all healthy members agree on one leader and term;
//! 8. H, the healthy voting members other than t, is |V|-1; with
//!    `allow_degraded` and |V| >= 5, H >= Q is enough.
//!
//! Guarantee: whenever the answer is yes on a cluster of 3 or more, the
//! healthy voting members left after t goes down are at least Q, so etcd
//! keeps quorum. The answer is never yes on data it cannot vouch for: stale
//! or unreadable data answers no.

use chrono::Duration;

use super::health::HealthSnapshot;

/// The rule's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumSettings {
    /// Allow H >= Q instead of H = |V|-1 on clusters of 5 or more.
    pub allow_degraded: bool,
    /// Allow taking down the only member of a 1-member cluster.
    pub allow_outage: bool,
    /// Health data older than this answers no.
    pub max_age: Duration,
}

impl Default for QuorumSettings {
    fn default() -> Self {
        Self {
            allow_degraded: false,
            allow_outage: false,
            max_age: Duration::seconds(5),
        }
    }
}

/// Another etcd node that is out of service as far as the guard knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutNode {
    /// The node.
    pub node: String,
    /// Its member.
    pub member: String,
    /// Why it counts as out: "holds the baton", "is not verified back yet".
    pub why: String,
}

/// The smallest number of voting members that keeps quorum.
pub fn quorum(voting: usize) -> usize {
    voting / 2 + 1
}

/// `Ok(())` when the member `member` of node `node` may go down now, else
/// the exact reason it may not (prefixed "etcd: "). `age` is how old
/// `health` is ([`HealthSnapshot::age`]).
pub fn may_take_down(
    health: &HealthSnapshot,
    node: &str,
    member: &str,
    out: &[OutNode],
    settings: &QuorumSettings,
    age: Duration,
) -> Result<(), String> {
    check(health, node, member, out, settings, age).map_err(|reason| format!("etcd: {reason}"))
}

fn check(
    health: &HealthSnapshot,
    node: &str,
    member: &str,
    out: &[OutNode],
    settings: &QuorumSettings,
    age: Duration,
) -> Result<(), String> {
    if age > settings.max_age {
        return Err(format!(
            "health data is {:.1}s old (limit {}s); waiting for a fresh probe",
            age.num_milliseconds() as f64 / 1000.0,
            settings.max_age.num_seconds()
        ));
    }
    if let Some(reason) = &health.unreadable {
        return Err(format!("cannot read the cluster ({reason})"));
    }
    let Some(target) = health.member(member) else {
        return Err(format!(
            "member {member} of node {node} is not in the member list"
        ));
    };
    if let Some(alarm) = health.alarms.first() {
        let by = health
            .member_by_id(alarm.member_id)
            .map(|m| m.label())
            .unwrap_or_else(|| format!("{:x}", alarm.member_id));
        return Err(format!(
            "alarm {} raised by member {by}; no etcd node goes down until it is cleared",
            alarm.kind
        ));
    }
    if let Some(e) = &health.alarm_error {
        return Err(format!("cannot read the alarm list ({e})"));
    }
    if let Some(m) = health.members.iter().find(|m| !m.voting()) {
        let what = if m.started() {
            "is a learner"
        } else {
            "was added but has not started"
        };
        return Err(format!(
            "member {} {what}; no etcd node goes down while the membership is changing",
            m.label()
        ));
    }
    let voting: Vec<_> = health.members.iter().filter(|m| m.voting()).collect();
    let v = voting.len();
    let q = quorum(v);
    match v {
        2 => {
            return Err(format!(
                "a 2-member cluster loses quorum when either member goes down; {member} is never taken down (grow the cluster to 3)"
            ));
        }
        1 if !settings.allow_outage => {
            return Err(format!(
                "{member} is the only member; taking it down stops etcd (allow it with --etcd-allow-outage)"
            ));
        }
        _ => {}
    }
    if let Some(o) = out.iter().find(|o| o.node != node) {
        // Name every unhealthy member too: an operator who sees only "not
        // verified back yet" while another member is down would look in
        // the wrong place.
        let sick: Vec<String> = health
            .members
            .iter()
            .filter(|m| m.voting() && m.id != target.id && !m.healthy())
            .map(|m| {
                format!(
                    "{} unhealthy ({})",
                    m.label(),
                    m.problem.as_deref().unwrap_or("unknown")
                )
            })
            .collect();
        let also = if sick.is_empty() {
            String::new()
        } else {
            format!("; also member {}", sick.join(", member "))
        };
        return Err(format!(
            "node {} (member {}) {}; only one etcd node at a time{also}",
            o.node, o.member, o.why
        ));
    }
    if v == 1 {
        return Ok(());
    }
    health.agreed_leader()?;
    let unhealthy: Vec<_> = voting
        .iter()
        .filter(|m| m.id != target.id && !m.healthy())
        .collect();
    let h = v - 1 - unhealthy.len();
    let degraded_ok = settings.allow_degraded && v >= 5;
    let required = if degraded_ok { q } else { v - 1 };
    if h >= required {
        return Ok(());
    }
    let list: Vec<String> = unhealthy
        .iter()
        .map(|m| {
            format!(
                "{} unhealthy ({})",
                m.label(),
                m.problem.as_deref().unwrap_or("unknown")
            )
        })
        .collect();
    let who = if list.len() == 1 {
        format!("member {}", list[0])
    } else {
        format!("members {}", list.join(", "))
    };
    if h < q {
        Err(format!(
            "{who}; taking {member} down would leave {h} of {v} voting members, quorum is {q}"
        ))
    } else {
        Err(format!(
            "{who}; taking {member} down would leave {h} of {v} voting members (quorum is {q}), and every other voting member must be healthy{}",
            if v >= 5 {
                " unless --etcd-allow-degraded is set"
            } else {
                ""
            }
        ))
    }
}

#[cfg(test)]
mod tests;
