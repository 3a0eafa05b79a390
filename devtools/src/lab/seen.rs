//! [`Seen`]: everything the lab observed during a run, in one place that
//! the monitors and the observer write and the progress display and the
//! report read. Times are wall-clock (`DateTime<Utc>`): the coordinators,
//! the nodes and the lab share the host's clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A moment.
pub type Time = DateTime<Utc>;

/// The lab's shared record (cheap to clone: one lock inside).
#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Seen>>);

impl Shared {
    /// Locks the record (a panicked writer does not hide what it saw).
    pub fn lock(&self) -> MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the lab saw.
#[derive(Default, Serialize)]
pub struct Seen {
    /// When the update was published (the rollout starts).
    pub started: Option<Time>,
    /// When every node had finished (released after rebooting).
    pub finished: Option<Time>,
    /// Per node.
    pub nodes: BTreeMap<String, NodeSeen>,
    /// The leading coordinator as the lab's readiness poll sees it, at
    /// every change (None: no replica ready).
    pub leaders: Vec<(Time, Option<String>)>,
    /// Moments when more than one replica answered ready.
    pub several_ready: Vec<(Time, Vec<String>)>,
    /// Per etcd member: up (answers Status) as etcd itself says.
    pub members: BTreeMap<String, MemberSeen>,
    /// Every write of the etcd probe.
    pub probes: Vec<Probe>,
    /// Every fault the chaos injected.
    pub faults: Vec<Fault>,
    /// Every violation a monitor found, as it found it.
    pub violations: Vec<Violation>,
    /// What the logs showed that no verdict covers (read at the end).
    pub observations: Vec<String>,
    /// Lines for the plain progress output and the report's log, in order.
    pub log: Vec<(Time, String)>,
}

/// One node as seen from outside Baton (host records) and from the
/// coordinator's status (its Watch stream).
#[derive(Default, Serialize, Clone)]
pub struct NodeSeen {
    /// It carries an etcd member.
    pub etcd: bool,
    /// The phase now (from the status: waiting, a holder's phase, or idle/done).
    pub phase: String,
    /// Why it waits now (from the queue).
    pub reason: String,
    /// The fencing token it holds now (0: none).
    pub token: u64,
    /// When it first asked for the baton after the rollout started.
    pub asked: Option<Time>,
    /// Every distinct queue reason, when it first showed.
    pub reasons: Vec<(Time, String)>,
    /// Every holder phase seen: (since, phase, token).
    pub phases: Vec<(Time, String, u64)>,
    /// Grants from the audit: (time, token).
    pub grants: Vec<(Time, u64)>,
    /// Releases from the audit: (time, token, actor, reason).
    pub releases: Vec<(Time, u64, String, String)>,
    /// Host view: intervals when the node was down (container stopped until
    /// its agent ran again in the next boot); an open one has no end.
    pub down: Vec<(Time, Option<Time>)>,
    /// Host view: boots (boot_id, started, ended, exit code).
    pub boots: Vec<BootSeen>,
}

/// One boot, from the host's records.
#[derive(Serialize, Clone, Debug)]
pub struct BootSeen {
    /// The boot_id.
    pub boot_id: String,
    /// When systemd started.
    pub started: Time,
    /// When the container stopped.
    pub ended: Option<Time>,
    /// systemd-nspawn's exit code (133 = reboot).
    pub exit_code: Option<i32>,
}

/// An etcd member's state as the lab last probed it.
#[derive(Default, Serialize, Clone)]
pub struct MemberSeen {
    /// It answered Status.
    pub up: bool,
    /// It is the leader.
    pub leader: bool,
    /// Down intervals (no answer within the bound).
    pub down: Vec<(Time, Option<Time>)>,
}

/// One write of the etcd probe.
#[derive(Serialize, Clone)]
pub struct Probe {
    /// When it was started.
    pub at: Time,
    /// How long until it was committed (or until the deadline).
    pub latency_ms: f64,
    /// It was committed within the deadline.
    pub ok: bool,
    /// The member it was committed through, or the last error.
    pub via: String,
}

/// One injected fault.
#[derive(Serialize, Clone)]
pub struct Fault {
    /// When.
    pub at: Time,
    /// When it was undone (a SIGCONT), if it was.
    pub until: Option<Time>,
    /// What: "kill-coordinator", "freeze-coordinator", "kill-agent",
    /// "pause-etcd-member".
    pub kind: String,
    /// Whom: the coordinator, node or etcd member acted on.
    pub target: String,
    /// Whom and how.
    pub detail: String,
    /// What Baton did about it, as seen from outside.
    pub effect: String,
}

/// A monitor's finding.
#[derive(Serialize, Clone)]
pub struct Violation {
    /// Which monitor.
    pub monitor: String,
    /// When.
    pub at: Time,
    /// Why.
    pub why: String,
}

impl Seen {
    /// Adds a log line.
    pub fn note(&mut self, line: impl Into<String>) {
        self.log.push((Utc::now(), line.into()));
    }

    /// Records a violation (and logs it).
    pub fn violation(&mut self, monitor: &str, at: Time, why: String) {
        self.note(format!("VIOLATION [{monitor}] {why}"));
        self.violations.push(Violation {
            monitor: monitor.to_string(),
            at,
            why,
        });
    }

    /// The lab's current leader.
    pub fn leader(&self) -> Option<&str> {
        self.leaders.last().and_then(|(_, l)| l.as_deref())
    }

    /// Nodes that finished: released after the rollout started.
    pub fn done(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| self.finished_node(n))
            .count()
    }

    /// True when `node` released a baton after the rollout started and its
    /// package update is behind it.
    pub fn finished_node(&self, node: &NodeSeen) -> bool {
        let Some(start) = self.started else {
            return false;
        };
        node.releases
            .iter()
            .any(|(t, _, _, reason)| *t >= start && !aborted(reason))
            && node.token == 0
    }
}

/// True for the release of a maintenance its agent aborted before taking
/// the node down (e.g. its control-plane backup could not be kept, after a
/// coordinator failover): nothing was done, no reboot is owed, and the node
/// asks again after its hold-back.
pub fn aborted(reason: &str) -> bool {
    reason.starts_with("maintenance aborted")
}
