//! The lease-state side of control-plane backups: which etcd snapshot a
//! control-plane holder's backup pairs with, and the token check an upload
//! passes before anything is written.

use chrono::{DateTime, Utc};

use super::{Engine, EngineError};
use crate::node::NodeName;
use crate::state::PairedSnapshot;

impl Engine {
    /// Records that `snapshot` (a file name in the snapshot directory) was
    /// taken for the grant `node` is being prepared for, and that its
    /// agent's control-plane backup is to be kept beside it. Saved before
    /// the grant, so a restarted or new leader still knows the pairing.
    pub async fn record_backup_snapshot(
        &self,
        node: &NodeName,
        snapshot: &str,
        taken_at: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        let paired = PairedSnapshot {
            name: snapshot.to_string(),
            taken_at,
        };
        let mut inner = self.inner.lock().await;
        self.ensure_current(&mut inner).await?;
        let Some(record) = inner.state.returning.get(node) else {
            // The preparation records the node as out first; without that
            // record the snapshot belongs to no known preparation.
            return Err(EngineError::Refused(format!(
                "{node} is not recorded as going out; the snapshot {snapshot} pairs with nothing"
            )));
        };
        if record.control_plane_snapshot.as_ref() == Some(&paired) {
            return Ok(());
        }
        self.commit(&mut inner, |s| {
            if let Some(r) = s.returning.get_mut(node) {
                r.control_plane_snapshot = Some(paired);
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// For an upload: renews `node`'s lease with `token` (so a stale or
    /// foreign token is refused exactly as Renew refuses it, and the
    /// answer comes from the confirmed leader), then names the snapshot
    /// its backup pairs with (None: no snapshot was taken for this grant,
    /// or the node is not a control-plane node).
    pub async fn backup_snapshot_for(
        &self,
        node: &NodeName,
        token: u64,
    ) -> Result<Option<String>, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        self.commit(&mut inner, |s| s.renew(node, token, now))
            .await?;
        Ok(inner.state.backup_snapshot(node).map(str::to_string))
    }

    /// Records that `node`'s control-plane backup `name` was kept for the
    /// grant `token` (a save on the confirmed leader): from then on
    /// Confirm lets that grant's destructive steps through (see
    /// [`crate::state::LeaseState::backup_missing`]).
    pub async fn record_backup_kept(
        &self,
        node: &NodeName,
        token: u64,
        name: &str,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        self.commit(&mut inner, |s| {
            s.renew(node, token, now)?;
            if let Some(h) = s.holders.get_mut(node) {
                h.backup_kept = Some(name.to_string());
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// The snapshot recorded for `node`'s preparation, when it was taken
    /// at or after `since`: the granter decides again after a preparation
    /// changed the state (this record among it), and that second
    /// preparation reuses the snapshot instead of taking (and recording)
    /// another, which would change the state again.
    pub async fn recent_backup_snapshot(
        &self,
        node: &NodeName,
        since: DateTime<Utc>,
    ) -> Option<String> {
        let inner = self.inner.lock().await;
        inner
            .state
            .returning
            .get(node)
            .and_then(|r| r.control_plane_snapshot.as_ref())
            .filter(|p| p.taken_at >= since)
            .map(|p| p.name.clone())
    }

    /// True when `node`'s current grant wants a control-plane backup (what
    /// the Granted event says). From memory: the grant was just saved.
    pub async fn backup_required(&self, node: &NodeName) -> bool {
        let inner = self.inner.lock().await;
        inner.state.backup_snapshot(node).is_some()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use crate::node::NodeName;
    use crate::state::{LeaseState, PairedSnapshot, Returning};
    use crate::store::{FORMAT_VERSION, decode, encode_document};

    /// The pairing and the kept backup travel only in format-2 documents,
    /// which the previous release (format 1) refuses as a whole ("format
    /// version 2 is not 1", checked in its decode_document after parsing):
    /// it never loads such a state and so cannot save it back without
    /// them. This release keeps both across a save and a load.
    #[test]
    fn the_pairing_and_the_kept_backup_travel_in_a_document_the_previous_release_refuses() {
        let now = chrono::Utc
            .with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
            .unwrap();
        let cp1 = NodeName::new("cp-1").unwrap();
        let mut state = LeaseState::default();
        state.returning.insert(
            cp1.clone(),
            Returning {
                member: "cp-1".into(),
                member_id: 7,
                control_plane_snapshot: Some(PairedSnapshot {
                    name: "etcd-x-cp-2.db".into(),
                    taken_at: now,
                }),
            },
        );
        state.grant(&cp1, true, false, "test", now).unwrap();
        state.holders.get_mut(&cp1).unwrap().backup_kept =
            Some("etcd-x-cp-2.db.control-plane-cp-1.tar.gz".into());
        let bytes = encode_document(&state, None, &[]);
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(FORMAT_VERSION, 2);
        assert_eq!(doc["format"], 2, "not a format the previous release reads");
        let read = decode("test", &bytes).unwrap();
        assert_eq!(read.backup_snapshot(&cp1), Some("etcd-x-cp-2.db"));
        assert_eq!(read.backup_missing(&cp1), None, "kept, as recorded");
    }
}
