//! Moves etcd leadership away from a member before its node goes down:
//! MoveLeader is sent to the leader itself (etcd only accepts it there),
//! naming the most caught-up healthy voter, and the move is confirmed by
//! asking the new leader before the grant goes ahead.

use std::time::Duration;

use tracing::info;

use super::health::{HealthSnapshot, MemberHealth};
use super::probe::Prober;
use super::within;

/// How long a leadership move may take to show.
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(10);

/// If `candidate` leads, moves leadership to the most caught-up healthy
/// voter and waits until that member reports itself leader. Returns the new
/// leader's name when a move happened.
pub async fn move_away(
    prober: &Prober,
    health: &HealthSnapshot,
    candidate: &MemberHealth,
) -> Result<Option<String>, String> {
    let t = prober.settings().timeout;
    let mut own = prober.client(&candidate.endpoint).await?;
    let status = within(t, own.status())
        .await
        .map_err(|e| format!("asking member {} whether it leads: {e}", candidate.name))?;
    if status.leader() != candidate.id {
        return Ok(None);
    }
    let target = health
        .members
        .iter()
        .filter(|m| m.id != candidate.id && m.voting() && m.healthy())
        .max_by_key(|m| m.applied_index)
        .ok_or_else(|| {
            format!(
                "member {} leads and no healthy voter can take over",
                candidate.name
            )
        })?;
    info!(from = %candidate.name, to = %target.name, "moving etcd leadership away before maintenance");
    within(t.max(Duration::from_secs(5)), own.move_leader(target.id))
        .await
        .map_err(|e| {
            format!(
                "moving leadership from {} to {}: {e}",
                candidate.name, target.name
            )
        })?;
    let mut theirs = prober.client(&target.endpoint).await?;
    let deadline = tokio::time::Instant::now() + CONFIRM_WITHIN;
    loop {
        if let Ok(s) = within(t, theirs.status()).await
            && s.leader() == target.id
        {
            info!(leader = %target.name, "etcd leadership moved");
            return Ok(Some(target.name.clone()));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "leadership move from {} to {} not confirmed within {}s",
                candidate.name,
                target.name,
                CONFIRM_WITHIN.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
