//! The granter task: follows leadership, marks overdue holders and runs the
//! grant rule whenever something changed (and once a second, so maintenance
//! windows opening and guards' fresh data are noticed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{AcquireUpdate, Engine, Grant, Inner};
use crate::node::NodeName;
use crate::policy::{Decision, GrantGuard, Waiter, decide};
use crate::state::LeaseState;

/// Holds back nodes whose preparation failed until their retry time.
struct PrepareFailures<'a>(&'a HashMap<NodeName, (String, DateTime<Utc>)>);

impl GrantGuard for PrepareFailures<'_> {
    fn check(&self, candidate: &Waiter, _: &LeaseState, now: DateTime<Utc>) -> Result<(), String> {
        match self.0.get(&candidate.node) {
            Some((reason, retry_at)) if *retry_at > now => Err(format!(
                "{reason} (retrying at {})",
                retry_at.format("%H:%M:%SZ")
            )),
            _ => Ok(()),
        }
    }
}

impl Engine {
    /// Runs until shutdown. Spawn exactly one per engine.
    pub async fn run_granter(self: Arc<Self>) {
        let mut leadership = self.leadership.clone();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if self.inner.lock().await.shutting_down {
                return;
            }
            self.follow_leadership().await;
            self.mark_overdue().await;
            self.grant_pass().await;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tick.tick() => {}
                changed = leadership.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing can be granted any more.
                        self.lose_leadership().await;
                        return;
                    }
                }
            }
        }
    }

    async fn follow_leadership(&self) {
        let claim = self.leadership.borrow().clone();
        let leading = self.inner.lock().await.leading;
        if claim.is_leader && !leading {
            if let Err(e) = self.take_leadership().await {
                warn!(error = %e, "won leadership but could not load the state; not granting");
            }
        } else if !claim.is_leader && leading {
            self.lose_leadership().await;
        }
    }

    /// Logs, audits and counts holders that just became overdue. They keep
    /// the baton.
    async fn mark_overdue(&self) {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        if !inner.leading {
            return;
        }
        let newly: Vec<(NodeName, u64)> = inner
            .state
            .holders
            .iter()
            .filter(|(n, h)| {
                h.is_overdue(now, self.config.overdue_after) && !inner.overdue_seen.contains(*n)
            })
            .map(|(n, h)| (n.clone(), h.fencing_token))
            .collect();
        for (node, token) in newly {
            let reason = format!(
                "no renewal for more than {}s; the node keeps the baton until it returns or is force-released",
                self.config.overdue_after.num_seconds()
            );
            let saved = self
                .commit(&mut inner, |s| {
                    s.record(now, "overdue", node.as_str(), token, "coordinator", &reason);
                    Ok(())
                })
                .await;
            if saved.is_ok() {
                warn!(node = %node, token, "holder is overdue; it keeps the baton");
                self.metrics.overdue_events.inc();
                inner.overdue_seen.insert(node);
                self.changed();
            }
        }
        self.refresh_gauges(&inner);
    }

    fn decide_now(&self, inner: &Inner, now: DateTime<Utc>) -> Decision {
        let failures = PrepareFailures(&inner.prepare_failed);
        let mut guards: Vec<&dyn GrantGuard> = self.guards.iter().map(|g| g.as_ref()).collect();
        guards.push(&failures);
        decide(
            &inner.state,
            inner.queue.waiters(),
            &inner.unavailable,
            &self.config.policy,
            &guards,
            now,
        )
    }

    /// Grants every node the rule allows, one at a time, then tells the rest
    /// why they wait.
    async fn grant_pass(&self) {
        loop {
            let mut inner = self.inner.lock().await;
            if !inner.leading || inner.shutting_down {
                return;
            }
            let now = self.now();
            inner
                .prepare_failed
                .retain(|_, (_, retry_at)| *retry_at > now);
            let decision = self.decide_now(&inner, now);
            let Some(candidate) = decision.grant else {
                self.tell_waiters(&mut inner, decision);
                if inner.queue.is_empty() {
                    inner.handoff_started = None;
                }
                return;
            };
            if !self.preparers.is_empty() {
                let waiter = inner
                    .queue
                    .get(&candidate)
                    .map(|q| q.waiter.clone())
                    .expect("candidate is queued");
                drop(inner);
                if let Err(reason) = self.prepare(&waiter).await {
                    let retry_at = self.now() + self.config.prepare_retry;
                    warn!(node = %candidate, reason = %reason, "preparing the grant failed; the node keeps waiting");
                    self.inner
                        .lock()
                        .await
                        .prepare_failed
                        .insert(candidate, (reason, retry_at));
                    continue;
                }
                inner = self.inner.lock().await;
                if !inner.leading || inner.shutting_down {
                    return;
                }
                // The world may have moved while preparing: decide again.
                let now = self.now();
                if self.decide_now(&inner, now).grant.as_ref() != Some(&candidate) {
                    continue;
                }
            }
            if !self.grant(&mut inner, &candidate).await {
                return;
            }
        }
    }

    async fn prepare(&self, waiter: &Waiter) -> Result<(), String> {
        for preparer in &self.preparers {
            preparer.prepare(waiter).await?;
        }
        Ok(())
    }

    /// Grants `node` (which the rule just chose). False when the store
    /// refused, so the pass stops until the next wake.
    async fn grant(&self, inner: &mut Inner, node: &NodeName) -> bool {
        let Some((request, closed)) = inner
            .queue
            .get(node)
            .map(|q| (q.request.clone(), q.events.is_closed()))
        else {
            return true;
        };
        if closed {
            // Its stream is gone (the withdrawal may still be on its way).
            inner.queue.take(node);
            return true;
        }
        let now = self.now();
        let result = self
            .commit(inner, |s| {
                s.grant(
                    node,
                    request.control_plane,
                    request.manual,
                    &request.reason,
                    now,
                )
            })
            .await;
        let token = match result {
            Ok(token) => token,
            Err(e) => {
                warn!(node = %node, error = %e, "grant not saved; the node keeps waiting");
                return false;
            }
        };
        let queued = inner.queue.take(node).expect("the lock was held since get");
        let phase = inner.state.holders[node].phase;
        let _ = queued.events.send(Ok(AcquireUpdate::Granted(Grant {
            fencing_token: token,
            granted_at: now,
            resumed: false,
            phase,
        })));
        self.metrics.grants.inc();
        if let Some(started) = inner.handoff_started.take() {
            self.metrics
                .handoff_latency
                .observe(started.elapsed().as_secs_f64());
            self.metrics.handoffs.inc();
        }
        self.metrics.queue_length.set(inner.queue.len() as i64);
        info!(node = %node, token, control_plane = request.control_plane, waited_ms = (now - queued.since).num_milliseconds(), "granted");
        self.changed();
        true
    }

    /// Tells waiters what changed (see the `queue` module: new reasons at
    /// once, positions as they move, rate-limited, without walking every
    /// waiter on a handoff).
    fn tell_waiters(&self, inner: &mut Inner, decision: Decision) {
        let telling = inner.queue.tell(&decision, Instant::now());
        for (node, position, reason) in &telling.new_reasons {
            info!(node = %node, position, reason = %reason.text, "waiting");
        }
        if let Some(reason) = &telling.shared_changed {
            info!(waiters = inner.queue.len(), reason = %reason.text, "every waiter waits");
        }
        if telling.sent > 0 {
            self.metrics.queue_length.set(inner.queue.len() as i64);
            self.changed();
        }
    }
}
