//! The coordinator the nspawn nodes talk to, and its view of them: holders
//! (phase, message, error) and the audit trail, from `batonctl status`, so
//! that every claim of a test is checked from outside the agent.

use super::{Boot, Node, require_root, wait_for};
use crate::coordinator::CoordinatorProcess;
use anyhow::{Context, Result, anyhow, ensure};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::time::Duration;

/// Generous bound for a whole maintenance (only to avoid hanging forever).
pub const MAINTENANCE: Duration = Duration::from_secs(240);

/// A coordinator on the host, with its data in a temp dir.
pub struct Cluster {
    /// The coordinator process.
    pub coordinator: CoordinatorProcess,
    _data: tempfile::TempDir,
}

/// One audit record.
#[derive(Debug, Clone)]
pub struct Audit {
    /// When it happened.
    pub time: DateTime<Utc>,
    /// "grant", "release", ...
    pub action: String,
    /// The node.
    pub node: String,
}

impl Cluster {
    /// Start a coordinator (needs root, like the nodes).
    pub fn start() -> Result<Cluster> {
        require_root();
        let data = tempfile::tempdir()?;
        let coordinator = CoordinatorProcess::start(&data.path().join("coordinator"), &[]);
        Ok(Cluster {
            coordinator,
            _data: data,
        })
    }

    /// The URL agents use.
    pub fn url(&self) -> String {
        self.coordinator.url.clone()
    }

    /// `node`'s holder entry in `batonctl status`, if it holds the baton.
    pub fn holder(&self, node: &str) -> Option<Value> {
        let status = self.coordinator.status();
        status["holders"]
            .as_array()?
            .iter()
            .find(|h| h["node"] == node)
            .cloned()
    }

    /// The whole audit trail.
    pub fn audit(&self) -> Vec<Audit> {
        let status = self.coordinator.status();
        status["audit"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                Some(Audit {
                    time: a["time"].as_str()?.parse().ok()?,
                    action: a["action"].as_str()?.to_string(),
                    node: a["node"].as_str()?.to_string(),
                })
            })
            .collect()
    }

    /// The audit records of `action` for `node`.
    pub fn records(&self, node: &str, action: &str) -> Vec<Audit> {
        self.audit()
            .into_iter()
            .filter(|a| a.node == node && a.action == action)
            .collect()
    }

    fn context(&self, node: &Node) -> String {
        format!(
            "{}\ncoordinator status: {}",
            node.diagnostics(),
            self.coordinator.status()
        )
    }

    /// Wait until `node` has released the baton `n` times in total. Fails
    /// early if the node reports Failed instead.
    pub fn wait_released(&self, node: &Node, n: usize) -> Result<()> {
        wait_for(&format!("{} to release", node.name()), MAINTENANCE, || {
            if self.records(node.name(), "release").len() >= n {
                return Some(Ok(()));
            }
            self.holder(node.name())
                .filter(|h| h["phase"] == "failed")
                .map(|h| Err(anyhow!("{} failed: {h}", node.name())))
        })
        .and_then(|r| r)
        .with_context(|| self.context(node))
    }

    /// Wait until `node` holds the baton and its entry satisfies `check`
    /// (`what` says what for the error). Fails early if the node releases
    /// the baton instead.
    pub fn wait_holder(
        &self,
        node: &Node,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_for(&format!("{} {what}", node.name()), MAINTENANCE, || {
            if !self.records(node.name(), "release").is_empty() {
                return Some(Err(anyhow!("{} released instead", node.name())));
            }
            self.holder(node.name()).filter(&check).map(Ok)
        })
        .and_then(|r| r)
        .with_context(|| self.context(node))
    }

    /// Wait until `node` holds the baton in `phase`.
    pub fn wait_phase(&self, node: &Node, phase: &str) -> Result<Value> {
        self.wait_holder(node, &format!("to report {phase}"), |h| h["phase"] == phase)
    }
}

/// Wait until the node's agent runs; its PID (host namespace).
pub fn wait_agent_running(node: &Node) -> Result<i32> {
    wait_for("the agent to start", Duration::from_secs(60), || {
        node.agent_pid()
    })
    .with_context(|| node.diagnostics())
}

/// Create the reboot sentinel in the node.
pub fn touch_sentinel(node: &Node) -> Result<()> {
    let out = node.exec(&["touch", "/run/reboot-required"])?;
    ensure!(out.status.success(), "touch in {}: {:?}", node.name(), out);
    Ok(())
}

/// The node rebooted exactly once, for real: two boots, the first ended
/// with exit 133, and the boot_ids differ.
pub fn check_one_real_reboot(node: &Node) -> Result<Vec<Boot>> {
    let boots = node.boots();
    ensure!(
        boots.len() == 2,
        "{} booted {} times: {boots:?}",
        node.name(),
        boots.len()
    );
    ensure!(
        boots[0].exit_code == Some(133),
        "first boot did not end in a reboot: {boots:?}"
    );
    ensure!(
        boots[0].boot_id != boots[1].boot_id,
        "boot_id unchanged: {boots:?}"
    );
    Ok(boots)
}
