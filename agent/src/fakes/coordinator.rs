//! The simulated coordinator: one holder, growing tokens, fencing after a
//! force-release, the published text limits, Confirm with "wait" (scripted
//! per step, and for every step of a grant whose backup was not kept).

use super::{Holder, Injected, Point, Rec, Sim};
use crate::coordinator::{
    Confirmation, Coordinator, CoordinatorError, Grant, Renewed, Report, Step,
};
use crate::text::{ERROR_BYTES, MESSAGE_BYTES, REASON_BYTES};
use std::sync::Arc;
use std::time::Duration;

/// How long a hung call takes to fail (longer than the agent's deadline).
const HANG: Duration = Duration::from_secs(600);

/// The coordinator of a [`Sim`].
#[derive(Clone)]
pub struct SimCoordinator(pub Arc<Sim>);

fn injected(what: &str, e: Injected) -> CoordinatorError {
    CoordinatorError::Call(format!("{what}: injected {e:?}"))
}

fn lost() -> CoordinatorError {
    CoordinatorError::Call("injected: the answer was lost".into())
}

/// INVALID_ARGUMENT for text over `limit` bytes or with control characters
/// other than newline and tab, as the coordinator answers.
fn check_text(field: &str, text: &str, limit: usize) -> Result<(), CoordinatorError> {
    if text.len() > limit {
        return Err(CoordinatorError::Refused(format!(
            "InvalidArgument: {field} is {} bytes, more than {limit}",
            text.len()
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(CoordinatorError::Refused(format!(
            "InvalidArgument: {field} has control characters"
        )));
    }
    Ok(())
}

fn fenced(token: u64) -> CoordinatorError {
    CoordinatorError::Fenced(format!("token {token} is not the node's current one"))
}

impl SimCoordinator {
    /// Enter a call; an unreachable coordinator fails it.
    async fn enter(&self, point: Point) -> Result<super::Fault, CoordinatorError> {
        let what = format!("{point:?}");
        let fault = self
            .0
            .enter(point, HANG)
            .await
            .map_err(|e| injected(&what, e))?;
        let state = self.0.state();
        let down = state.coordinator_down
            || state
                .coordinator_down_until
                .is_some_and(|until| tokio::time::Instant::now() < until);
        drop(state);
        if down {
            return Err(CoordinatorError::Call(
                "Unavailable: coordinator unreachable".into(),
            ));
        }
        Ok(fault)
    }

    /// Check `token` against the holder, recording the answer.
    fn check_token(&self, token: u64) -> Result<(), CoordinatorError> {
        let mut state = self.0.state();
        let inc = state.incarnation;
        if state.holder.as_ref().is_some_and(|h| h.token == token) {
            state.log.push(Rec::TokenOk { inc, token });
            Ok(())
        } else {
            state.log.push(Rec::TokenRefused { inc, token });
            Err(fenced(token))
        }
    }
}

impl Coordinator for SimCoordinator {
    /// As strict as the coordinator: the current token, a grant that asked
    /// for it, the size limit, and the archive's bytes hash to what was
    /// declared (read from the file, as the real client sends it).
    async fn upload_backup(
        &self,
        token: u64,
        archive: &crate::backup::Archive,
    ) -> Result<String, CoordinatorError> {
        let fault = self.enter(Point::UploadBackup).await?;
        if self.0.state().backup_unreachable {
            return Err(CoordinatorError::Call(
                "Unavailable: coordinator unreachable".into(),
            ));
        }
        let bytes = std::fs::read(&archive.path)
            .map_err(|e| CoordinatorError::Call(format!("reading the archive: {e}")))?;
        let answer = (|| {
            self.check_token(token)?;
            let mut state = self.0.state();
            if let Some(why) = &state.backup_refused {
                return Err(CoordinatorError::Fenced(why.clone()));
            }
            if !state.backup_required {
                return Err(CoordinatorError::Fenced(
                    "no etcd snapshot was kept for this grant".into(),
                ));
            }
            if bytes.len() as u64 > state.backup_max_bytes || archive.size > state.backup_max_bytes
            {
                return Err(CoordinatorError::Refused(format!(
                    "ResourceExhausted: the backup is {} bytes, over the limit of {}",
                    bytes.len(),
                    state.backup_max_bytes
                )));
            }
            use sha2::Digest;
            let actual = hex::encode(sha2::Sha256::digest(&bytes));
            if actual != archive.sha256 || bytes.len() as u64 != archive.size {
                return Err(CoordinatorError::Refused(
                    "InvalidArgument: the backup's SHA-256 or size does not match".into(),
                ));
            }
            state.backups.push((token, actual, archive.size));
            state.log.push(Rec::BackupKept(token));
            Ok(format!("backup-{token}.tar.gz"))
        })();
        self.0.leave(fault, answer, lost()).await
    }

    async fn acquire(&self, reason: &str, wait: bool) -> Result<Option<Grant>, CoordinatorError> {
        let fault = self.enter(Point::Acquire).await?;
        check_text("reason", reason, REASON_BYTES)?;
        self.0.state().acquires += 1;
        loop {
            let answer = {
                let mut state = self.0.state();
                let grant = |token, resumed, state: &super::SimState| Grant {
                    fencing_token: token,
                    resumed,
                    renew_interval: Some(state.renew_interval),
                    overdue_after: Some(state.overdue_after),
                    backup_required: state.backup_required,
                };
                if let Some(holder) = &state.holder {
                    let token = holder.token;
                    state.log.push(Rec::Granted {
                        token,
                        resumed: true,
                    });
                    Some(Some(grant(token, true, &state)))
                } else if state.queue_blocked {
                    (!wait).then_some(None)
                } else {
                    state.last_token += 1;
                    let token = state.last_token;
                    state.holder = Some(Holder {
                        token,
                        phase: None,
                        message: String::new(),
                        error: String::new(),
                        updated: false,
                    });
                    state.log.push(Rec::Granted {
                        token,
                        resumed: false,
                    });
                    Some(Some(grant(token, false, &state)))
                }
            };
            if let Some(answer) = answer {
                return self.0.leave(fault, Ok(answer), lost()).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn renew(&self, token: u64) -> Result<Renewed, CoordinatorError> {
        let fault = self.enter(Point::Renew).await?;
        let latency = self.0.state().renew_latency;
        tokio::time::sleep(latency).await;
        if self.0.state().renew_refused {
            return Err(CoordinatorError::Refused("PermissionDenied: rt".into()));
        }
        self.0.state().renews += 1;
        let answer = self.check_token(token).map(|()| Renewed {
            overdue_at: Some(self.0.now_wall() + self.0.state().overdue_after),
        });
        self.0.leave(fault, answer, lost()).await
    }

    async fn report(&self, token: u64, report: &Report) -> Result<(), CoordinatorError> {
        let fault = self.enter(Point::Report).await?;
        check_text("message", &report.message, MESSAGE_BYTES)?;
        check_text("error", &report.error, ERROR_BYTES)?;
        check_text("boot_id", &report.boot_id, 64)?;
        let answer = {
            let mut state = self.0.state();
            match state.holder.as_mut() {
                Some(h) if h.token == token => {
                    h.phase = Some(report.phase);
                    h.message = report.message.clone();
                    h.error = report.error.clone();
                    state.reports.push((token, report.clone()));
                    Ok(())
                }
                _ => Err(fenced(token)),
            }
        };
        self.0.leave(fault, answer, lost()).await
    }

    async fn release(&self, token: u64, reason: &str) -> Result<(), CoordinatorError> {
        let fault = self.enter(Point::Release).await?;
        check_text("reason", reason, REASON_BYTES)?;
        if self.0.state().refuse_release {
            return Err(CoordinatorError::Refused(
                "PermissionDenied: this identity may not release".into(),
            ));
        }
        let answer = {
            let mut state = self.0.state();
            match &state.holder {
                Some(h) if h.token == token => {
                    let updated = h.updated;
                    state.holder = None;
                    let reboot_pending = state.reboot_pending();
                    state.log.push(Rec::Released {
                        token,
                        reboot_pending,
                        updated,
                    });
                    state.release_reasons.push(reason.to_string());
                    Ok(())
                }
                _ => Err(fenced(token)),
            }
        };
        self.0.leave(fault, answer, lost()).await
    }

    async fn confirm(&self, token: u64, step: Step) -> Result<Confirmation, CoordinatorError> {
        let fault = self.enter(Point::Confirm).await?;
        self.0.state().confirms += 1;
        let unimplemented = {
            let mut state = self.0.state();
            let older = state.confirm_unimplemented || state.confirm_unimplemented_calls > 0;
            state.confirm_unimplemented_calls = state.confirm_unimplemented_calls.saturating_sub(1);
            if older {
                if let Some(d) = state.outage_after_unimplemented.take() {
                    state.coordinator_down_until = Some(tokio::time::Instant::now() + d);
                }
                let inc = state.incarnation;
                state.log.push(Rec::Confirmed {
                    inc,
                    step,
                    answer: "unimplemented",
                });
            }
            older
        };
        if unimplemented {
            let answer = Err(CoordinatorError::Unimplemented("Confirm".into()));
            return self.0.leave(fault, answer, lost()).await;
        }
        let answer = {
            let mut state = self.0.state();
            let inc = state.incarnation;
            let overdue_at = Some(self.0.now_wall() + state.overdue_after);
            if state.holder.as_ref().is_none_or(|h| h.token != token) {
                state.log.push(Rec::TokenRefused { inc, token });
                Err(fenced(token))
            } else if state.backup_required && !state.backups.iter().any(|b| b.0 == token) {
                // As the real coordinator: no step before the backup the
                // grant asked for was kept.
                state.log.push(Rec::Confirmed {
                    inc,
                    step,
                    answer: "wait",
                });
                Ok(Confirmation {
                    proceed: false,
                    reason: "this grant needs a control-plane backup first; upgrade the agent"
                        .into(),
                    overdue_at,
                    retry_after: Some(Duration::from_secs(2)),
                })
            } else if let Some(at) = state.confirm_waits.iter().position(|(s, _)| *s == step) {
                // "Wait" renews the lease but confirms no step.
                let (_, reason) = state.confirm_waits.remove(at);
                state.log.push(Rec::Confirmed {
                    inc,
                    step,
                    answer: "wait",
                });
                Ok(Confirmation {
                    proceed: false,
                    reason: format!("{step}: {reason}"),
                    overdue_at,
                    retry_after: Some(Duration::from_secs(2)),
                })
            } else {
                state.log.push(Rec::TokenOk { inc, token });
                state.log.push(Rec::Confirmed {
                    inc,
                    step,
                    answer: "go",
                });
                Ok(Confirmation {
                    proceed: true,
                    overdue_at,
                    ..Confirmation::default()
                })
            }
        };
        self.0.leave(fault, answer, lost()).await
    }
}
