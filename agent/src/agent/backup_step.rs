//! The control-plane backup step (Preparing, before the drain, when the
//! grant asked for one): archive the configured paths and the kubeadm
//! configuration, send the archive, remove it. The upload is tried again a
//! bounded number of times while the coordinator is unreachable; anything
//! else ends the step at once. The caller gives the baton back on an
//! error (fail closed): no drain, no update without the backup.

use super::lease::backoff;
use super::{Agent, Interrupted};
use crate::coordinator::{Coordinator, CoordinatorError};
use crate::host::HostOs;
use crate::node_ops::NodeOps;

impl<H: HostOs, C: Coordinator, N: NodeOps> Agent<H, C, N> {
    /// Asks the coordinator whether the grant `token` needs a backup (an
    /// Acquire that does not wait answers a holder with its grant, resumed)
    /// and saves the answer. Retried while the coordinator cannot be
    /// reached; any other grant than `token` means this one is gone.
    pub(super) async fn learn_backup_required(&mut self, token: u64) -> Result<(), Interrupted> {
        let mut failures = 0u32;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(Interrupted::Shutdown);
            }
            let answer = self
                .coordinator
                .acquire(
                    "resumed: does this grant need a control-plane backup?",
                    false,
                )
                .await;
            match answer {
                Ok(Some(grant)) if grant.resumed && grant.fencing_token == token => {
                    tracing::info!(
                        token,
                        backup_required = grant.backup_required,
                        "asked the coordinator whether this resumed grant needs a control-plane backup"
                    );
                    self.state.backup_required = grant.backup_required.then_some(token);
                    self.state.backup_learned = Some(token);
                    return self.save();
                }
                Ok(Some(grant)) if !grant.resumed => {
                    // Nothing was held: the grant is new, not ours to use.
                    let _ = self
                        .coordinator
                        .release(grant.fencing_token, "asked about a grant no longer held")
                        .await;
                    return Err(Interrupted::Fenced(format!(
                        "grant {token} is no longer held"
                    )));
                }
                Ok(_) => {
                    return Err(Interrupted::Fenced(format!(
                        "grant {token} is no longer held"
                    )));
                }
                Err(CoordinatorError::Fenced(why)) => return Err(Interrupted::Fenced(why)),
                Err(CoordinatorError::Refused(why)) => return Err(Interrupted::Refused(why)),
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "cannot ask whether this grant needs a backup; retrying");
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                }
            }
        }
    }

    /// Makes and sends the backup for the grant `token`; why not, as a
    /// sentence (never the archive's content: it holds private keys).
    pub(super) async fn back_up(&self, token: u64) -> Result<(), String> {
        let kubeadm_config = self
            .node_ops
            .kubeadm_config()
            .await
            .map_err(|e| format!("reading the kubeadm configuration: {e}"))?;
        let paths = self.settings.backup_paths.clone();
        let dir = self.state_file.dir().to_path_buf();
        let archive = tokio::task::spawn_blocking(move || {
            crate::backup::build(&paths, &kubeadm_config, &dir, token)
        })
        .await
        .map_err(|e| format!("archiving: {e}"))?
        .map_err(|e| format!("archiving: {e}"))?;
        let attempts = self.settings.backup_attempts.max(1);
        let mut failures = 0u32;
        loop {
            match self.coordinator.upload_backup(token, &archive).await {
                Ok(name) => {
                    tracing::info!(
                        token,
                        name,
                        size = archive.size,
                        sha256 = archive.sha256,
                        "control-plane backup kept by the coordinator"
                    );
                    return Ok(());
                }
                Err(CoordinatorError::Call(error)) if failures + 1 < attempts => {
                    failures += 1;
                    tracing::warn!(%error, failures, attempts, "sending the control-plane backup failed; trying again");
                    self.pause(backoff(self.settings.retry_interval, failures))
                        .await;
                    if self.shutdown.is_cancelled() {
                        return Err("the agent is stopping".into());
                    }
                }
                Err(error) => {
                    return Err(format!(
                        "sending it failed ({} of {attempts} attempts): {error}",
                        failures + 1
                    ));
                }
            }
        }
    }
}
