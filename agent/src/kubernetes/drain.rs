//! Draining: evict the planned pods through policy/v1 Evictions with a
//! bound on parallelism, retry PodDisruptionBudget refusals (429) with
//! backoff until the drain timeout, then wait for the evicted pods to be
//! gone. Grace periods are honoured: the drain never deletes a pod itself
//! and never shortens its grace period.
//!
//! A timeout returns [`KubeError::DrainTimeout`] naming every pod still in
//! the way; the caller aborts the maintenance (see `KubeNodeOps::abort`)
//! unless `--force-reboot-on-drain-timeout` says otherwise.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{EvictParams, ListParams};
use tokio::time::Instant;
use tracing::{info, warn};

use super::plan::{Allowances, DrainPlan, PodRef, plan};
use super::{KubeError, KubeNodeOps, retrying, status_code};

/// The first wait after a refused eviction; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two eviction attempts of one pod.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a terminating pod is looked up while waiting for it to go.
const GONE_POLL: Duration = Duration::from_millis(500);

/// What a finished drain did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Pods evicted (and gone).
    pub evicted: Vec<String>,
    /// Pods left running, each with why.
    pub skipped: Vec<String>,
    /// Evictions refused by a disruption budget before they succeeded.
    pub budget_refusals: u32,
}

/// How one pod's eviction ended.
enum Evicted {
    Done(u32),
    TimedOut(String),
}

impl KubeNodeOps {
    /// The drain plan for the pods now on the node.
    pub async fn drain_plan(&self) -> Result<DrainPlan, KubeError> {
        let mut params = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        if let Some(selector) = &self.args.drain_pod_selector {
            params = params.labels(selector);
        }
        let api = self.all_pods();
        let pods = retrying(&self.node, "listing pods", || api.list(&params))
            .await
            .map_err(KubeError::api(format!(
                "listing pods on node {}",
                self.node
            )))?;
        Ok(plan(
            &pods.items,
            Allowances {
                delete_emptydir_data: self.args.delete_emptydir_data,
                evict_unmanaged: self.args.evict_unmanaged_pods,
            },
        ))
    }

    /// Drains the node (cordon it first). Refuses, evicting nothing, when a
    /// pod needs an explicit flag; fails with [`KubeError::DrainTimeout`]
    /// after `--drain-timeout`.
    pub async fn drain(&self) -> Result<DrainReport, KubeError> {
        let deadline = Instant::now() + self.args.drain_timeout;
        let plan = self.drain_plan().await?;
        if !plan.refused.is_empty() {
            let pods = plan
                .refused
                .iter()
                .map(|(pod, why)| {
                    format!(
                        "pod {pod} {} (pass {} to evict it)",
                        why.describe(),
                        why.flag()
                    )
                })
                .collect();
            return Err(KubeError::DrainRefused(pods));
        }
        let mut report = DrainReport {
            skipped: plan
                .skipped
                .iter()
                .map(|(p, why)| format!("{p} ({why:?})"))
                .collect(),
            ..DrainReport::default()
        };
        info!(node = %self.node, evict = plan.evict.len(), skipped = plan.skipped.len(), terminating = plan.terminating.len(), "draining");

        let parallelism = self.args.drain_parallelism.max(1) as usize;
        let outcomes: Vec<(PodRef, Evicted)> = futures::stream::iter(plan.evict.clone())
            .map(|pod| async move {
                let outcome = self.evict_until(&pod, deadline).await;
                (pod, outcome)
            })
            .buffer_unordered(parallelism)
            .collect()
            .await;
        let mut pending = Vec::new();
        let mut not_evicted = Vec::new();
        for (pod, outcome) in outcomes {
            match outcome {
                Evicted::Done(refusals) => report.budget_refusals += refusals,
                Evicted::TimedOut(why) => {
                    pending.push(format!("{pod} ({why})"));
                    not_evicted.push(pod);
                }
            }
        }
        // Only wait for pods whose eviction went through.
        let to_wait = plan
            .evict
            .iter()
            .chain(&plan.terminating)
            .filter(|p| !not_evicted.contains(p));
        for pod in to_wait {
            match self.wait_gone(pod, deadline).await {
                true => report.evicted.push(pod.to_string()),
                false => pending.push(format!(
                    "{pod} (still terminating, grace period {}s)",
                    pod.grace_seconds
                )),
            }
        }
        if !pending.is_empty() {
            warn!(node = %self.node, pending = ?pending, "drain timed out");
            return Err(KubeError::DrainTimeout {
                timeout: self.args.drain_timeout,
                pending,
            });
        }
        info!(node = %self.node, evicted = report.evicted.len(), budget_refusals = report.budget_refusals, "drained");
        Ok(report)
    }

    /// Evicts `pod`, retrying budget refusals and transient failures with
    /// backoff until `deadline`.
    async fn evict_until(&self, pod: &PodRef, deadline: Instant) -> Evicted {
        let api = self.pods(&pod.namespace);
        let mut backoff = FIRST_BACKOFF;
        let mut refusals = 0;
        loop {
            let last = match api.evict(&pod.name, &EvictParams::default()).await {
                Ok(_) => {
                    info!(node = %self.node, pod = %pod, "evicted");
                    return Evicted::Done(refusals);
                }
                // Already gone: nothing to evict.
                Err(e) if status_code(&e) == Some(404) => return Evicted::Done(refusals),
                Err(e) if status_code(&e) == Some(429) => {
                    refusals += 1;
                    info!(node = %self.node, pod = %pod, refusals, "eviction refused by a disruption budget; retrying");
                    "a PodDisruptionBudget refuses the eviction".to_string()
                }
                Err(e) => {
                    warn!(node = %self.node, pod = %pod, error = %e, "eviction failed; retrying");
                    format!("eviction failed: {e}")
                }
            };
            let now = Instant::now();
            if now + backoff > deadline {
                return Evicted::TimedOut(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits until `pod` (this uid) no longer exists; false at `deadline`.
    async fn wait_gone(&self, pod: &PodRef, deadline: Instant) -> bool {
        let api = self.pods(&pod.namespace);
        loop {
            let current = api.get_opt(&pod.name).await;
            match current {
                Ok(None) => return true,
                Ok(Some(p)) if p.metadata.uid.as_deref() != Some(pod.uid.as_str()) => return true,
                Ok(Some(_)) => {}
                Err(e) => {
                    warn!(node = %self.node, pod = %pod, error = %e, "looking up an evicted pod failed; retrying")
                }
            }
            if Instant::now() + GONE_POLL > deadline {
                return false;
            }
            tokio::time::sleep(GONE_POLL).await;
        }
    }
}
