//! Webhooks on rollout events.
//!
//! An observer follows the engine from outside (its change signal and
//! status snapshots, the same view `batonctl status --watch` has) and turns
//! new audit records and holders' phases into events; it never holds the
//! engine's lock while sending, so a slow or failing webhook cannot delay a
//! grant. Each webhook has its own bounded queue and worker: a full queue
//! drops the event (logged), a failed delivery is retried with exponential
//! backoff up to the hook's `maxAttempts`.
//!
//! Only the leader notifies, and it starts from the audit trail it loaded
//! (nothing older is sent again after a failover).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use http::Method;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::http::HttpClient;
use super::metrics::{HookLabel, RolloutMetrics};
use super::reload::PolicyHandle;
use super::schema::{EventKind, WebhookSpec};
use super::template::Template;
use crate::engine::Snapshot;
use crate::kube::events::{EventRecorder, RolloutEvent, Subject};
use crate::state::AuditEntry;

/// Events queued per webhook before new ones are dropped.
pub const QUEUE: usize = 256;
/// The first retry waits this long; each next one twice as long.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One rollout event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The node (empty for pause, resume, finished).
    pub node: String,
    /// Why, or the holder's error.
    pub reason: String,
    /// The fencing token (0 = none).
    pub token: u64,
    /// Who (an identity or "coordinator").
    pub actor: String,
    /// When.
    pub time: DateTime<Utc>,
}

impl Event {
    fn values(&self, coordinator: &str) -> BTreeMap<&'static str, String> {
        [
            ("event", self.kind.name().to_string()),
            ("node", self.node.clone()),
            ("reason", self.reason.clone()),
            ("token", self.token.to_string()),
            ("actor", self.actor.clone()),
            (
                "time",
                self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            ),
            ("coordinator", coordinator.to_string()),
        ]
        .into()
    }
}

fn from_audit(a: &AuditEntry) -> Option<Event> {
    let kind = match a.action.as_str() {
        "grant" => EventKind::Granted,
        "release" => EventKind::Released,
        "force-release" => EventKind::ForceReleased,
        "overdue" => EventKind::Overdue,
        "failed" => EventKind::Failed,
        "pause" => EventKind::Paused,
        "resume" => EventKind::Resumed,
        _ => return None,
    };
    Some(Event {
        kind,
        node: a.node.clone(),
        reason: a.reason.clone(),
        token: a.fencing_token,
        actor: a.actor.clone(),
        time: a.time,
    })
}

/// What the observer remembers between two snapshots.
#[derive(Debug, Default)]
pub struct Observer {
    /// The last audit record seen and how many records precede it.
    last_audit: Option<AuditEntry>,
    /// True while holders or waiters exist (so "finished" is sent once).
    busy: bool,
    /// When observing started: older records (a state loaded after a
    /// failover) are never sent.
    since: Option<DateTime<Utc>>,
}

impl Observer {
    /// The events between the previous snapshot and `snap`. The first
    /// snapshot only sets the baseline.
    pub fn observe(&mut self, snap: &Snapshot) -> Vec<Event> {
        let state = &snap.state;
        let mut events = Vec::new();
        if let Some(since) = self.since {
            let start = match &self.last_audit {
                None => 0,
                Some(last) => state
                    .audit
                    .iter()
                    .rposition(|a| a == last)
                    .map(|i| i + 1)
                    // Not found: more records than the trail keeps came in.
                    .unwrap_or(0),
            };
            events.extend(
                state
                    .audit
                    .iter()
                    .skip(start)
                    .filter(|a| a.time >= since)
                    .filter_map(from_audit),
            );
        }
        self.last_audit = state.audit.back().cloned();
        let busy = !state.holders.is_empty() || !snap.queue.is_empty();
        // Busy before, or a grant came and went since the last snapshot.
        let was_busy = self.busy || events.iter().any(|e| e.kind == EventKind::Granted);
        if self.since.is_some() && was_busy && !busy {
            events.push(Event {
                kind: EventKind::Finished,
                node: String::new(),
                reason: "no node holds the baton and none waits".to_string(),
                token: 0,
                actor: "coordinator".to_string(),
                time: snap.now,
            });
        }
        self.busy = busy;
        self.since.get_or_insert(snap.now);
        events
    }
}

/// Sends events to the webhooks of the policy in force.
pub struct Notifier {
    policy: Arc<PolicyHandle>,
    http: HttpClient,
    coordinator: String,
    /// `None` until this replica leads (a new leadership starts from the
    /// state it loads).
    observer: Option<Observer>,
    workers: Vec<Worker>,
    reporting: Option<Reporting>,
}

/// Where deliveries are counted and given-up ones reported.
#[derive(Clone)]
pub struct Reporting {
    /// The rollout's metrics.
    pub metrics: RolloutMetrics,
    /// Kubernetes Events (a disabled recorder outside a cluster).
    pub events: EventRecorder,
}

struct Worker {
    spec: WebhookSpec,
    hook: String,
    queue: mpsc::Sender<Event>,
}

/// A webhook's name in metrics and Events: its position in the policy and
/// its URL's host (never the path, which may carry a secret).
pub fn hook_name(position: usize, spec: &WebhookSpec) -> String {
    let url = spec.url.0.as_str();
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    // user:password@host — keep only the host.
    let host = host.rsplit('@').next().unwrap_or_default();
    format!("{}:{host}", position + 1)
}

impl Notifier {
    /// A notifier for `coordinator` (its id goes into the bodies).
    pub fn new(policy: Arc<PolicyHandle>, coordinator: &str) -> Self {
        Self {
            policy,
            http: HttpClient::new(),
            coordinator: coordinator.to_string(),
            observer: None,
            workers: Vec::new(),
            reporting: None,
        }
    }

    /// Counts deliveries in `reporting`'s metrics and records an Event for
    /// every event a webhook gave up on.
    pub fn with_reporting(mut self, reporting: Reporting) -> Self {
        self.reporting = Some(reporting);
        self
    }

    /// Queues the events since the last snapshot (never waits: a full
    /// queue drops the event).
    pub fn on_snapshot(&mut self, snap: &Snapshot) {
        let events = self
            .observer
            .get_or_insert_with(Observer::default)
            .observe(snap);
        if events.is_empty() {
            return;
        }
        self.refresh_workers();
        for event in events {
            self.dispatch(event);
        }
    }

    /// This replica stopped leading.
    pub fn reset(&mut self) {
        self.observer = None;
    }

    /// One worker per webhook of the policy in force (kept while the hook
    /// is unchanged, so its queue survives unrelated reloads).
    fn refresh_workers(&mut self) {
        let hooks = self.policy.current().effective.webhooks.clone();
        self.workers.retain(|w| hooks.contains(&w.spec));
        for (position, spec) in hooks.into_iter().enumerate() {
            if self.workers.iter().any(|w| w.spec == spec) {
                continue;
            }
            let hook = hook_name(position, &spec);
            if let Some(r) = &self.reporting {
                // Every result exists from the start: increase() sees the
                // first give-up.
                for result in ["delivered", "retried", "given_up", "dropped"] {
                    drop(
                        r.metrics
                            .webhook_deliveries
                            .get_or_create(&super::metrics::HookResult {
                                hook: hook.clone(),
                                result: result.to_string(),
                            }),
                    );
                }
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(
                self.http.clone(),
                spec.clone(),
                self.coordinator.clone(),
                rx,
                (hook.clone(), self.reporting.clone()),
            ));
            self.workers.push(Worker {
                spec,
                hook,
                queue: tx,
            });
        }
    }

    fn dispatch(&self, event: Event) {
        for w in &self.workers {
            if !w.spec.events.is_empty() && !w.spec.events.contains(&event.kind) {
                continue;
            }
            if let Err(e) = w.queue.try_send(event.clone()) {
                warn!(url = %w.spec.url, event = event.kind.name(), node = %event.node, error = %e, "webhook queue full or closed; event dropped");
                if let Some(r) = &self.reporting {
                    r.metrics.webhook(&w.hook, "dropped");
                }
            }
            if let Some(r) = &self.reporting {
                r.metrics
                    .webhook_queue_length
                    .get_or_create(&HookLabel {
                        hook: w.hook.clone(),
                    })
                    .set((w.queue.max_capacity() - w.queue.capacity()) as i64);
            }
        }
    }
}

/// The wait before attempt `n` (1-based; attempt 1 does not wait).
pub fn backoff(attempt: u32) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    FIRST_BACKOFF
        .saturating_mul(1u32 << (attempt - 2).min(16))
        .min(MAX_BACKOFF)
}

async fn deliver(
    http: HttpClient,
    spec: WebhookSpec,
    coordinator: String,
    mut queue: mpsc::Receiver<Event>,
    (hook, reporting): (String, Option<Reporting>),
) {
    let count = |result: &str| {
        if let Some(r) = &reporting {
            r.metrics.webhook(&hook, result);
        }
    };
    let template = spec
        .template
        .as_deref()
        .and_then(|t| Template::parse(t).ok())
        .unwrap_or_else(Template::default_body);
    while let Some(event) = queue.recv().await {
        if let Some(r) = &reporting {
            r.metrics
                .webhook_queue_length
                .get_or_create(&HookLabel { hook: hook.clone() })
                .set(queue.len() as i64);
        }
        let body = template.render(&event.values(&coordinator));
        let mut attempt = 1;
        loop {
            tokio::time::sleep(backoff(attempt)).await;
            let result = http
                .send(
                    Method::POST,
                    &spec.url.0,
                    Some((body.clone(), "application/json")),
                    spec.timeout.0,
                )
                .await;
            let failure = match result {
                Ok((status, _)) if status.is_success() => {
                    debug!(url = %spec.url, event = event.kind.name(), node = %event.node, attempt, "webhook delivered");
                    count("delivered");
                    break;
                }
                Ok((status, _)) => format!("answered {status}"),
                Err(e) => e.to_string(),
            };
            if attempt >= spec.max_attempts {
                warn!(url = %spec.url, event = event.kind.name(), node = %event.node, attempts = attempt, error = %failure, "webhook failed; event dropped");
                count("given_up");
                if let Some(r) = &reporting {
                    r.events.record(RolloutEvent::warning(
                        Subject::Rollout,
                        "WebhookGivenUp",
                        format!(
                            "webhook {hook} gave up on the {} event{} after {attempt} attempt(s): {failure}",
                            event.kind.name(),
                            if event.node.is_empty() {
                                String::new()
                            } else {
                                format!(" of node {}", event.node)
                            }
                        ),
                    ));
                }
                break;
            }
            count("retried");
            info!(url = %spec.url, event = event.kind.name(), attempt, error = %failure, "webhook failed; retrying");
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeName;
    use crate::rollout::test_support::snapshot;
    use crate::state::LeaseState;
    use crate::state::Phase;

    fn snap(state: &LeaseState, waiting: usize, now: DateTime<Utc>) -> Snapshot {
        let names: Vec<String> = (0..waiting).map(|i| format!("w{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        snapshot(state, &names, now)
    }

    #[test]
    fn audit_records_and_failed_phases_become_events_once() {
        let now = Utc::now();
        let n1 = NodeName::new("n1").unwrap();
        let mut state = LeaseState::default();
        state.pause("op", "before", now);
        let mut o = Observer::default();
        assert!(
            o.observe(&snap(&state, 0, now)).is_empty(),
            "the baseline sends nothing"
        );
        state.resume("op", now);
        let t = state.grant(&n1, false, false, "reboot", now).unwrap();
        let kinds = |e: Vec<Event>| e.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(o.observe(&snap(&state, 1, now))),
            [EventKind::Resumed, EventKind::Granted]
        );
        assert!(o.observe(&snap(&state, 1, now)).is_empty());
        state
            .report(
                &n1,
                t,
                crate::state::Progress {
                    phase: Phase::Failed,
                    error: "apt failed".into(),
                    ..Default::default()
                },
                now,
            )
            .unwrap();
        let events = o.observe(&snap(&state, 1, now));
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].kind, events[0].reason.as_str()),
            (EventKind::Failed, "apt failed")
        );
        assert!(o.observe(&snap(&state, 1, now)).is_empty());
        state.release(&n1, t, "n1", "done", now).unwrap();
        assert_eq!(
            kinds(o.observe(&snap(&state, 1, now))),
            [EventKind::Released]
        );
        assert_eq!(
            kinds(o.observe(&snap(&state, 0, now))),
            [EventKind::Finished]
        );
        assert!(o.observe(&snap(&state, 0, now)).is_empty());
    }

    #[test]
    fn what_came_and_went_between_two_snapshots_is_still_sent() {
        let now = Utc::now();
        let n1 = NodeName::new("n1").unwrap();
        let mut state = LeaseState::default();
        let mut o = Observer::default();
        assert!(o.observe(&snap(&state, 0, now)).is_empty());
        let t = state.grant(&n1, false, false, "r", now).unwrap();
        let failed = crate::state::Progress {
            phase: Phase::Failed,
            error: "boom".into(),
            ..Default::default()
        };
        state.report(&n1, t, failed, now).unwrap();
        state.release(&n1, t, "n1", "done", now).unwrap();
        let kinds: Vec<EventKind> = o
            .observe(&snap(&state, 0, now))
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                EventKind::Granted,
                EventKind::Failed,
                EventKind::Released,
                EventKind::Finished
            ]
        );
    }

    #[test]
    fn a_state_loaded_after_the_baseline_is_not_sent_again() {
        let now = Utc::now();
        let mut o = Observer::default();
        assert!(o.observe(&snap(&LeaseState::default(), 0, now)).is_empty());
        // The leader loads a state written an hour ago (a failover).
        let mut loaded = LeaseState::default();
        let then = now - chrono::Duration::hours(1);
        loaded
            .grant(&NodeName::new("n1").unwrap(), false, false, "old", then)
            .unwrap();
        loaded.pause("op", "old", then);
        assert!(o.observe(&snap(&loaded, 0, now)).is_empty());
    }

    #[test]
    fn hooks_are_named_by_position_and_host_only() {
        let spec = |url: &str| -> WebhookSpec {
            serde_json::from_value(serde_json::json!({ "url": url })).unwrap()
        };
        assert_eq!(
            hook_name(0, &spec("https://hooks.slack.com/services/T0/B0/SECRET")),
            "1:hooks.slack.com"
        );
        assert_eq!(
            hook_name(2, &spec("http://user:pw@127.0.0.1:8080?x=1")),
            "3:127.0.0.1:8080"
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), FIRST_BACKOFF);
        assert_eq!(backoff(3), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
