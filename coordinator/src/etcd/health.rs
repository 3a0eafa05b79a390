//! The health snapshot: what the prober saw of every etcd member in one
//! round, as plain data. The quorum rule ([`super::rule`]) and the member
//! mapping ([`super::mapping`]) read only this.

use chrono::{DateTime, Utc};

/// One member as seen in one probe round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberHealth {
    /// The member ID (stays the same across restarts; a new ID means the
    /// member was removed and added again).
    pub id: u64,
    /// The member name; empty while the member was added but never started.
    pub name: String,
    /// True for a raft learner (not voting).
    pub is_learner: bool,
    /// The client endpoint the member was probed through.
    pub endpoint: String,
    /// The peer URLs the member list gives for it (an unstarted member has
    /// these but no client URLs); the mapping matches node InternalIPs
    /// against these and [`MemberHealth::client_urls`].
    pub peer_urls: Vec<String>,
    /// The client URLs the member advertises.
    pub client_urls: Vec<String>,
    /// `None` when every check passed, else why the member is unhealthy.
    pub problem: Option<String>,
    /// The leader this member reports (0 = none or unknown).
    pub leader: u64,
    /// The raft term this member reports.
    pub term: u64,
    /// The member's applied raft index.
    pub applied_index: u64,
}

impl MemberHealth {
    /// True once the member has started (it has a name).
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }

    /// True for a started, voting member.
    pub fn voting(&self) -> bool {
        self.started() && !self.is_learner
    }

    /// True when every check passed.
    pub fn healthy(&self) -> bool {
        self.problem.is_none()
    }

    /// Every URL the member list gives for it, peer URLs first.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.peer_urls
            .iter()
            .chain(&self.client_urls)
            .map(String::as_str)
    }

    /// The name used in messages: the name, or the ID of an unstarted member.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("{:x} (unstarted)", self.id)
        } else {
            self.name.clone()
        }
    }
}

/// An active etcd alarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alarm {
    /// The member that raised it.
    pub member_id: u64,
    /// NOSPACE, CORRUPT, ...
    pub kind: String,
}

/// Everything one probe round saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// When the round finished (wall clock, for people).
    pub taken_at: DateTime<Utc>,
    /// When the round finished on the monotonic clock: the snapshot's age is
    /// measured from this, so a wall clock that jumps (NTP, a VM resumed)
    /// can neither make old data look fresh nor fresh data old.
    pub probed_at: tokio::time::Instant,
    /// Set when the cluster could not be read at all (no member list).
    pub unreadable: Option<String>,
    /// Every member in the member list.
    pub members: Vec<MemberHealth>,
    /// Active alarms.
    pub alarms: Vec<Alarm>,
    /// Set when the alarm list could not be read (no etcd node goes down
    /// then, but workers are still told apart by the member list).
    pub alarm_error: Option<String>,
}

impl HealthSnapshot {
    /// A snapshot that says etcd could not be read.
    pub fn unreadable(taken_at: DateTime<Utc>, reason: impl Into<String>) -> Self {
        Self {
            taken_at,
            probed_at: tokio::time::Instant::now(),
            unreadable: Some(reason.into()),
            members: Vec::new(),
            alarms: Vec::new(),
            alarm_error: None,
        }
    }

    /// How old the snapshot is, on the monotonic clock.
    pub fn age(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.probed_at.elapsed()).unwrap_or(chrono::Duration::MAX)
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Option<&MemberHealth> {
        self.members.iter().find(|m| m.started() && m.name == name)
    }

    /// The member with ID `id`.
    pub fn member_by_id(&self, id: u64) -> Option<&MemberHealth> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The leader every healthy member agrees on, if they agree.
    pub fn agreed_leader(&self) -> Result<&MemberHealth, String> {
        let healthy: Vec<&MemberHealth> = self.members.iter().filter(|m| m.healthy()).collect();
        let Some(first) = healthy.first() else {
            return Err("no member is healthy".to_string());
        };
        if let Some(other) = healthy
            .iter()
            .find(|m| (m.leader, m.term) != (first.leader, first.term))
        {
            return Err(format!(
                "members disagree on the leader ({} says {:x} at term {}, {} says {:x} at term {})",
                first.label(),
                first.leader,
                first.term,
                other.label(),
                other.leader,
                other.term
            ));
        }
        if first.leader == 0 {
            return Err("there is no leader".to_string());
        }
        self.member_by_id(first.leader)
            .ok_or_else(|| format!("the leader {:x} is not in the member list", first.leader))
    }
}

/// Builders for tests: `member("n1").leader(1)`.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    /// A healthy voting member named `name` with ID `id`, following leader 1 at term 2.
    pub fn member(id: u64, name: &str) -> MemberHealth {
        MemberHealth {
            id,
            name: name.to_string(),
            is_learner: false,
            endpoint: format!("http://{name}:2379"),
            peer_urls: vec![format!("http://{name}:2380")],
            client_urls: vec![format!("http://{name}:2379")],
            problem: None,
            leader: 1,
            term: 2,
            applied_index: 100,
        }
    }

    impl MemberHealth {
        /// Marks it unhealthy.
        pub fn down(mut self, why: &str) -> Self {
            self.problem = Some(why.to_string());
            self
        }
        /// Replaces the URLs the member list gives for it.
        pub fn advertising(mut self, peer: &[&str], client: &[&str]) -> Self {
            self.peer_urls = peer.iter().map(|u| u.to_string()).collect();
            self.client_urls = client.iter().map(|u| u.to_string()).collect();
            self
        }
        /// Makes it a member that was added but never started (no name, no
        /// client URLs).
        pub fn unstarted(mut self) -> Self {
            self.name.clear();
            self.client_urls.clear();
            self.problem = Some("not started".to_string());
            self
        }
        /// Marks it a learner.
        pub fn learner(mut self) -> Self {
            self.is_learner = true;
            self
        }
    }

    /// A snapshot of `members` taken at `at`.
    pub fn cluster(at: DateTime<Utc>, members: Vec<MemberHealth>) -> HealthSnapshot {
        HealthSnapshot {
            taken_at: at,
            probed_at: tokio::time::Instant::now(),
            unreadable: None,
            members,
            alarms: Vec::new(),
            alarm_error: None,
        }
    }
}
