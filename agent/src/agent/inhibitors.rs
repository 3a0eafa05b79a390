//! The agent's side of logind's inhibitor locks: before it asks for the
//! reboot, it waits for every lock that blocks a shutdown to go, renewing
//! the baton and reporting who holds the locks and why, up to
//! `--inhibitor-timeout`. logind lets root reboot through block locks, so
//! honouring them is the agent's job; `--ignore-inhibitors` turns it off.

use super::lease::OnStale;
use super::{Agent, Interrupted};
use crate::coordinator::Coordinator;
use crate::host::{HostOs, Inhibitor};
use crate::node_ops::NodeOps;

impl<H: HostOs, C: Coordinator, N: NodeOps> Agent<H, C, N> {
    /// Wait until no lock blocks the reboot, renewing the baton meanwhile.
    /// `Ok(Ok(()))`: reboot now. `Ok(Err(why))`: the locks were still held
    /// after `inhibitor_timeout` (the caller fails the maintenance, keeping
    /// the baton). A lock list that cannot be read counts as held: logind
    /// that cannot answer cannot be trusted to have none.
    pub(super) async fn wait_for_inhibitors(
        &self,
        token: u64,
    ) -> Result<Result<(), String>, Interrupted> {
        self.holding(token, OnStale::Continue, self.inhibitors_gone())
            .await
    }

    async fn inhibitors_gone(&self) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        let timeout = self.settings.inhibitor_timeout;
        let mut shown = String::new();
        loop {
            let held = match self.host.reboot_inhibitors().await {
                Ok(locks) if locks.is_empty() => return Ok(()),
                Ok(locks) => describe(&locks),
                Err(error) => format!("cannot list logind's inhibitor locks: {error}"),
            };
            if self.settings.ignore_inhibitors {
                tracing::warn!(held, "rebooting anyway (--ignore-inhibitors)");
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(format!(
                    "{held}; still there after {} (--inhibitor-timeout)",
                    humantime::format_duration(timeout)
                ));
            }
            if held != shown {
                tracing::warn!(held, "the reboot waits for inhibitor locks");
                self.report(&held).await;
                shown = held;
            }
            // logind signals nothing when a lock goes, so look again after a
            // while (a few calls a minute; bounded by the timeout).
            tokio::time::sleep(self.settings.retry_interval.min(timeout - waited)).await;
        }
    }
}

/// "reboot held back by inhibitor locks: WHO (pid P, uid U): WHY; ...".
fn describe(locks: &[Inhibitor]) -> String {
    let locks: Vec<String> = locks.iter().map(Inhibitor::to_string).collect();
    format!("reboot held back by inhibitor locks: {}", locks.join("; "))
}
