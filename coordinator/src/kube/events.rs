//! Kubernetes Events from the coordinator (the leader only): on the Node
//! for what happens to one node's baton, and on the coordinators' Lease for
//! what happens to the whole rollout.
//!
//! Why the Lease: `kubectl describe lease -n baton-system baton-coordinator`
//! is where an operator already looks to see which replica leads, it is
//! the one object every installation has whatever the policy's source (a
//! file, a ConfigMap under any name, flags only), and it is namespaced, so
//! writing its Events needs only a Role in the coordinator's namespace.
//!
//! Events never hold anything up: [`EventRecorder::record`] only offers the
//! Event to a bounded queue (a full queue drops it and counts the drop);
//! one worker writes them, each API call bounded by [`API_TIMEOUT`], so an
//! API server that answers 500 or 429, or hangs, costs dropped Events and
//! never a delayed grant. Repeats are aggregated as client-go's recorder
//! does: the same reason and message on the same object within
//! [`AGGREGATE_FOR`] raise the existing Event's `count` and
//! `lastTimestamp` instead of creating another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::rollout::metrics::RolloutMetrics;

/// Events waiting to be written before new ones are dropped.
pub const QUEUE: usize = 256;
/// The longest one API call may take before the Event is dropped.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest message written (bytes; longer ones are cut, marked with
/// `…`). It is the events.k8s.io API's limit on `note`, so an Event reads
/// the same through either API.
pub const MESSAGE_BYTES: usize = 1024;
/// A repeat within this time counts on the existing Event.
pub const AGGREGATE_FOR: chrono::Duration = chrono::Duration::minutes(10);
/// How many distinct Events are remembered for aggregation.
pub const REMEMBERED: usize = 512;
/// The component Events are reported under.
pub const COMPONENT: &str = "baton-coordinator";

/// What an Event is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// One node (its baton).
    Node(String),
    /// The whole rollout (recorded on the coordinators' Lease).
    Rollout,
}

/// One Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutEvent {
    /// What it is about.
    pub subject: Subject,
    /// A CamelCase reason, e.g. `BatonGranted`, `PolicyReloadRefused`.
    pub reason: &'static str,
    /// A human sentence (cut to [`MESSAGE_BYTES`]).
    pub message: String,
    /// True for Warning Events.
    pub warning: bool,
}

impl RolloutEvent {
    /// A Normal Event.
    pub fn normal(subject: Subject, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            subject,
            reason,
            message: message.into(),
            warning: false,
        }
    }

    /// A Warning Event.
    pub fn warning(subject: Subject, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            ..Self::normal(subject, reason, message)
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked `…`.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mark = "…";
    let mut end = max.saturating_sub(mark.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{mark}", &text[..end])
}

/// Hands Events to the writer. Cheap to clone; a disabled recorder (no
/// Kubernetes) drops everything silently.
#[derive(Clone)]
pub struct EventRecorder {
    queue: Option<mpsc::Sender<RolloutEvent>>,
    metrics: RolloutMetrics,
}

/// Where Events go and who writes them.
pub struct EventTarget {
    /// The client.
    pub client: kube::Client,
    /// The namespace Events are written to (the coordinator's).
    pub namespace: String,
    /// The coordinators' Lease (rollout-wide Events).
    pub lease_name: String,
    /// This replica's id (`reportingInstance`).
    pub instance: String,
}

impl EventRecorder {
    /// A recorder that records nothing (standalone coordinators).
    pub fn disabled(metrics: RolloutMetrics) -> Self {
        Self {
            queue: None,
            metrics,
        }
    }

    /// Starts the writer. `leads` is asked before every write: Events
    /// queued while leading are not written once this replica stopped.
    pub fn start(
        target: EventTarget,
        metrics: RolloutMetrics,
        leads: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            events: Api::namespaced(target.client.clone(), &target.namespace),
            leases: Api::namespaced(target.client, &target.namespace),
            namespace: target.namespace,
            lease_name: target.lease_name,
            instance: target.instance,
            lease_uid: None,
            seen: HashMap::new(),
            metrics: metrics.clone(),
        };
        tokio::spawn(writer.run(rx, leads));
        Self {
            queue: Some(tx),
            metrics,
        }
    }

    /// Offers `event` to the writer; never waits (a full queue drops it,
    /// counted in `baton_kube_events_dropped_total{result="queue_full"}`).
    pub fn record(&self, event: RolloutEvent) {
        let Some(queue) = &self.queue else { return };
        if let Err(e) = queue.try_send(event) {
            self.metrics.event_dropped("queue_full");
            debug!(error = %e, "event queue full; event dropped");
        }
    }
}

/// What identifies a repeat.
type Key = (Subject, &'static str, String);

struct Seen {
    name: String,
    count: i32,
    last: DateTime<Utc>,
}

struct Writer {
    events: Api<Event>,
    leases: Api<Lease>,
    namespace: String,
    lease_name: String,
    instance: String,
    lease_uid: Option<String>,
    seen: HashMap<Key, Seen>,
    metrics: RolloutMetrics,
}

impl Writer {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<RolloutEvent>,
        leads: Arc<dyn Fn() -> bool + Send + Sync>,
    ) {
        while let Some(mut event) = queue.recv().await {
            if !leads() {
                continue;
            }
            event.message = bounded(&event.message, MESSAGE_BYTES);
            match tokio::time::timeout(API_TIMEOUT, self.write(&event, Utc::now())).await {
                Ok(Ok(())) => {
                    self.metrics.events_recorded.inc();
                }
                Ok(Err(e)) => {
                    self.metrics.event_dropped("api_error");
                    warn!(reason = event.reason, error = %e, "recording an event failed; dropped");
                }
                Err(_) => {
                    self.metrics.event_dropped("api_error");
                    warn!(reason = event.reason, timeout = ?API_TIMEOUT, "recording an event took too long; dropped");
                }
            }
        }
    }

    /// Counts a repeat on its Event, or creates one.
    async fn write(&mut self, event: &RolloutEvent, now: DateTime<Utc>) -> Result<(), kube::Error> {
        let key: Key = (event.subject.clone(), event.reason, event.message.clone());
        let stamp = now.to_rfc3339_opts(SecondsFormat::Secs, true);
        if let Some(seen) = self.seen.get(&key)
            && now - seen.last < AGGREGATE_FOR
        {
            let patch = json!({"count": seen.count + 1, "lastTimestamp": stamp});
            let name = seen.name.clone();
            match self
                .events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if let Some(seen) = self.seen.get_mut(&key) {
                        seen.count += 1;
                        seen.last = now;
                    }
                    return Ok(());
                }
                // Expired or deleted: record it afresh.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let involved = match &event.subject {
            // kubectl describe node looks Node Events up with the node's
            // name as their uid, as the kubelet records them.
            Subject::Node(node) => json!({
                "apiVersion": "v1", "kind": "Node", "name": node, "uid": node,
            }),
            Subject::Rollout => {
                if self.lease_uid.is_none() {
                    self.lease_uid = self
                        .leases
                        .get_opt(&self.lease_name)
                        .await?
                        .and_then(|l| l.metadata.uid);
                }
                json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "name": self.lease_name, "namespace": self.namespace,
                    "uid": self.lease_uid,
                })
            }
        };
        let prefix = match &event.subject {
            Subject::Node(node) => node.as_str(),
            Subject::Rollout => self.lease_name.as_str(),
        };
        let body = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{prefix}.baton.")},
            "involvedObject": involved,
            "reason": event.reason,
            "message": event.message,
            "type": if event.warning { "Warning" } else { "Normal" },
            "source": {"component": COMPONENT},
            "reportingComponent": format!("baton.dev/{COMPONENT}"),
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        });
        let body: Event = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
        let created = self.events.create(&PostParams::default(), &body).await?;
        if self.seen.len() >= REMEMBERED {
            // Forget the oldest: a repeat of it creates a new Event.
            if let Some(oldest) = self
                .seen
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                self.seen.remove(&oldest);
            }
        }
        if let Some(name) = created.metadata.name {
            self.seen.insert(
                key,
                Seen {
                    name,
                    count: 1,
                    last: now,
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(600);
        let cut = bounded(&long, MESSAGE_BYTES);
        assert!(cut.len() <= MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
