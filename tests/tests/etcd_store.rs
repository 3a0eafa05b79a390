//! The etcd store used directly: every save is guarded by the writer's
//! election key and the state's revision, so a replica whose lease is gone
//! cannot write even before it notices, one that leads again cannot
//! overwrite what another leader wrote meanwhile, and the next leader loads
//! what the last one saved.

use std::time::Duration;

use anyhow::{Context, Result};
use baton_coordinator::node::NodeName;
use baton_coordinator::state::{AUDIT_KEEP, LeaseState};
use baton_coordinator::store::etcd::{EtcdStore, EtcdStoreSettings};
use baton_coordinator::store::{Fence, Revision, StateStore, StoreError};
use baton_tests::etcd::{EtcdCluster, serial};
use baton_tests::previous_release;

fn settings(cluster: &EtcdCluster, id: &str, ttl: u64) -> EtcdStoreSettings {
    EtcdStoreSettings {
        endpoints: cluster.endpoints().split(',').map(str::to_string).collect(),
        tls: None,
        prefix: "/baton-test".to_string(),
        id: id.to_string(),
        election_ttl: Duration::from_secs(ttl),
        timeout: Duration::from_secs(2),
    }
}

/// Waits until `store` leads; returns its fence over the stored state.
async fn until_leader(store: &EtcdStore) -> Result<Fence> {
    let mut rx = store.leadership();
    let term = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|l| l.is_leader))
        .await
        .context("never elected")??
        .term;
    Ok(Fence {
        term,
        revision: store.load().await?.revision,
    })
}

/// What the audit tests start from: the serial guard, one member, a
/// client of it, and replica `a` leading, with its fence, over no state or
/// over `document` put as the state key before it started.
type Leading = (
    tokio::sync::MutexGuard<'static, ()>,
    EtcdCluster,
    etcd_client::Client,
    EtcdStore,
    Fence,
);

async fn leading(document: Option<&str>) -> Result<Leading> {
    let serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let mut etcd = cluster.client().await?;
    if let Some(document) = document {
        etcd.put("/baton-test/state", document, None).await?;
    }
    let a = EtcdStore::open(settings(&cluster, "a", 30)).await?;
    let fence = until_leader(&a).await?;
    Ok((serial, cluster, etcd, a, fence))
}

/// Waits until `store` no longer leads.
async fn until_deposed(store: &EtcdStore) -> Result<()> {
    let mut rx = store.leadership();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|l| !l.is_leader))
        .await
        .context("never noticed")??;
    Ok(())
}

#[tokio::test]
async fn a_deposed_store_cannot_save_and_the_next_leader_loads_the_last_state() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let a = EtcdStore::open(settings(&cluster, "a", 30)).await?;
    let fence = until_leader(&a).await?;
    assert_eq!(fence.revision, Revision::Absent);
    let mut state = LeaseState::default();
    state.grant(
        &NodeName::new("w1")?,
        false,
        false,
        "test",
        chrono::Utc::now(),
    )?;
    let revision = a.save(&state, &fence).await?;
    let fence = Fence { revision, ..fence };
    a.confirm(&fence).await?;

    // Depose a behind its back: its lease (and so its election key) goes.
    let lease = a.election_lease().context("a leads, so it has a lease")?;
    let mut etcd = cluster.client().await?;
    etcd.lease_revoke(lease).await?;
    let mut later = state.clone();
    later.grant(
        &NodeName::new("w2")?,
        false,
        false,
        "test",
        chrono::Utc::now(),
    )?;
    let err = a
        .confirm(&fence)
        .await
        .expect_err("a deposed replica must not confirm");
    assert!(matches!(err, StoreError::NotLeader(_)), "{err}");
    let err = a
        .save(&later, &fence)
        .await
        .expect_err("a deposed replica must not write");
    assert!(matches!(err, StoreError::NotLeader(_)), "{err}");
    assert!(
        !a.leadership().borrow().is_leader,
        "a steps down after a refused save"
    );

    let b = EtcdStore::open(settings(&cluster, "b", 2)).await?;
    // a campaigns again too; whichever leads must see the last saved state.
    let leader = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if a.leadership().borrow().is_leader {
                return &a;
            }
            if b.leadership().borrow().is_leader {
                return &b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    assert_eq!(leader.load().await?.state, Some(state));
    Ok(())
}

/// Finding 2 of issue 9: A loads, loses its lease; B leads and grants y the
/// next token; B loses its lease; A leads again and saves what it decided
/// from its old memory (x with the same token). The save must be refused,
/// whether A presents its old term or its new one.
#[tokio::test]
async fn a_re_elected_replica_cannot_overwrite_what_another_leader_wrote() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let a = EtcdStore::open(settings(&cluster, "a", 3)).await?;
    let fence = until_leader(&a).await?;
    let base = LeaseState::default();
    let revision = a.save(&base, &fence).await?;
    let old_fence = Fence { revision, ..fence };
    let mut etcd = cluster.client().await?;
    etcd.lease_revoke(a.election_lease().context("a leads")?)
        .await?;
    // a notices at its next keep-alive and campaigns again.
    until_deposed(&a).await?;
    let b = EtcdStore::open(settings(&cluster, "b", 3)).await?;
    let b_fence = until_leader(&b).await?;
    let mut by_b = b.load().await?.state.context("state")?;
    let token_b = by_b.grant(&NodeName::new("y")?, false, false, "b", chrono::Utc::now())?;
    b.save(&by_b, &b_fence).await?;
    etcd.lease_revoke(b.election_lease().context("b leads")?)
        .await?;
    let new_term = until_leader(&a).await?.term;
    assert!(new_term > old_fence.term);

    // A decides from what it had before it lost the lease.
    let mut by_a = base.clone();
    let token_a = by_a.grant(&NodeName::new("x")?, false, false, "a", chrono::Utc::now())?;
    assert_eq!(token_a, token_b, "the scenario reuses a token");
    let old_term = a.save(&by_a, &old_fence).await;
    assert!(
        matches!(old_term, Err(StoreError::NotLeader(_))),
        "{old_term:?}"
    );
    let new_term_old_revision = Fence {
        term: new_term,
        ..old_fence.clone()
    };
    let refused = a.save(&by_a, &new_term_old_revision).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    let refused = a.confirm(&new_term_old_revision).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert!(
        a.leadership().borrow().is_leader,
        "a revision conflict is not a lost election"
    );
    assert_eq!(a.load().await?.state, Some(by_b));
    Ok(())
}

/// Makes the change the way the engine does: on a copy without the audit,
/// saved, then taken as the current state.
async fn step(
    store: &EtcdStore,
    fence: &mut Fence,
    current: &mut LeaseState,
    change: impl FnOnce(&mut LeaseState),
) -> Result<()> {
    let mut next = current.without_audit();
    change(&mut next);
    fence.revision = store.save(&next, fence).await?;
    current.advance_to(next);
    Ok(())
}

/// `n` pauses and resumes: `2 n` audit records.
fn pauses(n: usize) -> impl FnOnce(&mut LeaseState) {
    move |state| {
        for _ in 0..n {
            state.pause("op", "test", chrono::Utc::now());
            state.resume("op", chrono::Utc::now());
        }
    }
}

/// Five saves of two records each on `store`; the state then and the
/// bytes of its `state` key (a backup of that key alone).
async fn five_saves_and_a_backup(
    store: &EtcdStore,
    fence: &mut Fence,
    etcd: &mut etcd_client::Client,
) -> Result<(LeaseState, Vec<u8>)> {
    let mut current = LeaseState::default();
    for _ in 0..5 {
        step(store, fence, &mut current, pauses(1)).await?;
    }
    let backup = etcd.get("/baton-test/state", None).await?;
    let backup = backup.kvs().first().context("no state")?.value().to_vec();
    Ok((current, backup))
}

/// The audit lives apart from the state document and is appended in the
/// save's own transaction: one change that makes hundreds of records (a
/// tick finding many holders overdue) still saves (etcd refuses a
/// transaction of more than 128 operations: one key per record failed
/// here), the document stays small, the audit keys stay bounded, a refused
/// save leaves no record, and a load brings back the newest records.
#[tokio::test]
async fn the_audit_is_appended_in_the_saves_transaction_and_stays_bounded() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let mut current = LeaseState::default();
    step(&a, &mut fence, &mut current, pauses(150)).await?;
    for _ in 0..30 {
        step(&a, &mut fence, &mut current, pauses(10)).await?;
        let keys = audit_keys(&mut etcd).await?.len();
        assert!(keys <= AUDIT_KEEP, "{keys} audit keys");
    }
    assert_eq!(current.audit_seq, 900);
    let document = etcd.get("/baton-test/state", None).await?;
    let document = document.kvs().first().context("no state")?.value();
    assert!(document.len() < 4096, "{} bytes", document.len());
    // Written empty, for the previous release's reader (FORMAT_VERSION).
    let document: serde_json::Value = serde_json::from_slice(document)?;
    assert_eq!(document["state"]["audit"], serde_json::json!([]));

    // A save from a stale revision is refused and leaves no record.
    let mut ghost = current.without_audit();
    ghost.grant(
        &NodeName::new("ghost")?,
        false,
        false,
        "test",
        chrono::Utc::now(),
    )?;
    let stale = Fence {
        revision: Revision::At("2".to_string()),
        ..fence.clone()
    };
    let refused = a.save(&ghost, &stale).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );

    let loaded = a.load().await?.state.context("no state")?;
    assert_eq!(loaded.audit.len(), AUDIT_KEEP);
    assert_eq!(loaded, current);
    Ok(())
}

/// A document as the previous release wrote it: format 1, the audit inside
/// the state (a grant, the release of that node, the next grant).
const PREVIOUS_RELEASE: &str = previous_release::DOCUMENT;

/// Hostile (red-team F2): an upgrade from the previous release, whose
/// document embedded the audit. The first saves after it must keep those
/// records: the health gate reads the last release from the audit, and a
/// release made just before the upgrade must still be seen by the next
/// leader. Before the fix the first save wrote one audit key with its own
/// record only, and the next load had forgotten the release.
#[tokio::test]
async fn an_upgrade_keeps_the_audit_the_previous_release_embedded() -> Result<()> {
    use baton_coordinator::rollout::gate::last_release;
    let (_serial, cluster, mut etcd, a, mut fence) = leading(Some(PREVIOUS_RELEASE)).await?;
    let mut current = a.load().await?.state.context("no state")?;
    let released = "2026-11-20T10:04:00Z".parse()?;
    assert_eq!(last_release(&current), Some(released));
    assert_eq!((current.audit.len(), current.audit_seq), (3, 3));
    let n2 = NodeName::new("n2")?;
    // A renewal (no record), then a pause (one).
    step(&a, &mut fence, &mut current, |s| {
        s.renew(&n2, 2, chrono::Utc::now()).expect("n2 holds")
    })
    .await?;
    step(&a, &mut fence, &mut current, pauses(1)).await?;
    drop(a);
    let b = EtcdStore::open(settings(&cluster, "b", 30)).await?;
    until_leader(&b).await?;
    let read = b.load().await?.state.context("no state")?;
    assert_eq!(read, current);
    assert_eq!(read.audit.len(), 5);
    assert_eq!(last_release(&read), Some(released));
    let document = etcd.get("/baton-test/state", None).await?;
    let document: serde_json::Value =
        serde_json::from_slice(document.kvs().first().context("no state")?.value())?;
    assert_eq!(document["state"]["audit"], serde_json::json!([]));
    Ok(())
}

/// Puts `count` audit keys numbered from `first` (one record each, of node
/// `node`), as saves of another history would have left them.
async fn leave_audit_keys(
    etcd: &mut etcd_client::Client,
    first: u64,
    count: u64,
    node: &str,
) -> Result<()> {
    let numbers: Vec<u64> = (first..first + count).collect();
    for chunk in numbers.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|n| {
                let record = serde_json::json!([{
                    "number": n, "time": "2026-11-20T10:00:00Z", "action": "grant",
                    "node": node, "fencing_token": n, "actor": "coordinator",
                }]);
                etcd_client::TxnOp::put(
                    format!("/baton-test/audit/{n:020}"),
                    record.to_string(),
                    None,
                )
            })
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// Grants `node` and makes `2 pairs` more records.
fn grant_and_pauses(node: &'static str, pairs: usize) -> impl FnOnce(&mut LeaseState) {
    move |state| {
        state
            .grant(
                &NodeName::new(node).expect("a node name"),
                false,
                false,
                "test",
                chrono::Utc::now(),
            )
            .expect("not a holder yet");
        pauses(pairs)(state);
    }
}

/// Hostile (red-team F3), a restored `state` key: the state is put back
/// from a backup while the audit keys of what came after it stay (saves
/// past the backup, and a long history of them). The audit read must be
/// the backup's, not hidden by the later keys (the read of the newest
/// keys found only those) and, after new saves numbered like the
/// abandoned ones, not mixed with them. Before the fix the load after the
/// restore found no record of the backup's, and later loads showed the
/// abandoned saves' records in place of the new ones.
#[tokio::test]
async fn a_restored_state_key_reads_its_own_audit_not_the_abandoned_one() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let (at_backup, backup) = five_saves_and_a_backup(&a, &mut fence, &mut etcd).await?;
    // What came after the backup: saves of 2 and 3 records (keys 12 and
    // 15), and a long history past them.
    let mut abandoned = at_backup.clone();
    step(&a, &mut fence, &mut abandoned, grant_and_pauses("ghost", 0)).await?;
    step(&a, &mut fence, &mut abandoned, pauses(1)).await?;
    leave_audit_keys(&mut etcd, 16, AUDIT_KEEP as u64 + 100, "ghost").await?;

    etcd.put("/baton-test/state", backup, None).await?;
    let loaded = a.load().await?;
    fence.revision = loaded.revision;
    let mut current = loaded.state.context("no state")?;
    assert_eq!(current, at_backup, "the backup's audit, not hidden");
    // New saves numbered like the abandoned ones (keys 13 and 16).
    step(&a, &mut fence, &mut current, grant_and_pauses("real", 1)).await?;
    step(&a, &mut fence, &mut current, grant_and_pauses("other", 1)).await?;
    let read = a.load().await?.state.context("no state")?;
    assert_eq!(read, current, "not mixed with the abandoned saves");
    assert!(read.audit.iter().all(|r| r.node != "ghost"), "{read:?}");
    Ok(())
}

/// Hostile (red-team F3), `--initialize` on an old prefix: the state key
/// is gone but an earlier installation's audit keys stay. The new
/// installation's audit must be its own: before the fix, once its numbers
/// passed the old keys', loads showed the old installation's records in
/// place of its own.
#[tokio::test]
async fn initialize_on_an_old_prefix_reads_only_the_new_audit() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let mut old = LeaseState::default();
    for node in ["old-1", "old-2", "old-3", "old-4", "old-5"] {
        // Two records a save: keys 2, 4, 6, ...
        step(&a, &mut fence, &mut old, |s| {
            grant_and_pauses(node, 0)(s);
            let n = NodeName::new(node).expect("a node name");
            let token = s.holders[&n].fencing_token;
            s.release(&n, token, node, "done", chrono::Utc::now())
                .expect("holds");
        })
        .await?;
    }
    etcd.delete("/baton-test/state", None).await?;

    // The new installation, as the engine initializes it, then saves of
    // three records.
    let mut fence = Fence {
        revision: a.load().await?.revision,
        ..fence
    };
    assert_eq!(fence.revision, Revision::Absent);
    let mut current = LeaseState::initial(chrono::Utc::now(), "c1");
    fence.revision = a.save(&current, &fence).await?;
    assert_eq!(a.load().await?.state.as_ref(), Some(&current));
    for node in ["new-1", "new-2", "new-3"] {
        step(&a, &mut fence, &mut current, grant_and_pauses(node, 1)).await?;
    }
    let read = a.load().await?.state.context("no state")?;
    assert_eq!(read, current);
    assert!(
        read.audit.iter().all(|r| !r.node.starts_with("old-")),
        "{read:?}"
    );
    Ok(())
}

/// The previous release numbered its embedded audit 1..len (len
/// capped at 500, so every full document is numbered 1..500). The first save
/// after an upgrade that records nothing (a renewal) writes the migrated
/// records as key `len`. A format-1 document put back later (a downgrade,
/// then "go forward again"; or a restored pre-upgrade backup) has the same
/// numbers but other records: the load must give the document's own
/// records, not the leftover key's.
#[tokio::test]
async fn a_format_1_document_reads_its_own_records_not_a_leftover_migration_key() -> Result<()> {
    use baton_coordinator::rollout::gate::last_release;
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(Some(PREVIOUS_RELEASE)).await?;
    let mut current = a.load().await?.state.context("no state")?;
    let n2 = NodeName::new("n2")?;
    // The upgrade's first save: a renewal, no record of its own.
    step(&a, &mut fence, &mut current, |s| {
        s.renew(&n2, 2, chrono::Utc::now()).expect("n2 holds")
    })
    .await?;
    // Back on the previous release, which ran on (its window, full, still
    // numbered 1..len): n2 released at 12:00, n3 granted.
    let later = previous_release::later();
    etcd.put("/baton-test/state", later.to_string(), None)
        .await?;
    let read = a.load().await?.state.context("no state")?;
    assert_eq!(
        last_release(&read),
        Some("2026-11-20T12:00:00Z".parse()?),
        "{:?}",
        read.audit
    );
    assert_eq!(read.audit.back().map(|r| r.node.as_str()), Some("n3"));
    Ok(())
}

/// Restoring only the `state` key after the abandoned history went on
/// for a window's worth of records: that history's saves deleted every
/// audit key the backup's window needs (the keys stay bounded), as the
/// README says. The state itself comes back whole, the audit with none of
/// the backup's records and none of the abandoned ones, and the next saves
/// number on from the backup without mixing in the abandoned key.
/// (Red-team: the README claimed this was "safe for the audit too"; this
/// test asked for the backup's 10 records and failed with none.)
#[tokio::test]
async fn a_restored_state_key_after_a_long_abandoned_history_has_lost_its_window() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let (at_backup, backup) = five_saves_and_a_backup(&a, &mut fence, &mut etcd).await?;
    let mut abandoned = at_backup.clone();
    step(&a, &mut fence, &mut abandoned, pauses(300)).await?;
    etcd.put("/baton-test/state", backup, None).await?;
    let loaded = a.load().await?;
    fence.revision = loaded.revision;
    let mut current = loaded.state.context("no state")?;
    assert!(current.audit.is_empty(), "{:?}", current.audit);
    assert_eq!(current, at_backup.without_audit());
    assert_eq!(current.audit_seq, 10);
    // The next saves number on from the backup; the abandoned key goes.
    step(&a, &mut fence, &mut current, pauses(1)).await?;
    step(&a, &mut fence, &mut current, pauses(2)).await?;
    let read = a.load().await?.state.context("no state")?;
    assert_eq!(read, current);
    assert_eq!(read.audit.len(), 6, "{read:?}");
    assert_eq!(
        audit_keys(&mut etcd).await?,
        [12, 16],
        "the abandoned key is deleted"
    );
    Ok(())
}

/// An installation whose prefix lies among another's audit keys
/// (`/baton-test/audit/x` under `/baton-test`) is refused at start: the
/// outer installation's saves delete key ranges under `/baton-test/audit/`
/// (and `--initialize` the whole of it), which would take the nested
/// installation's state with them. The outer one is unaffected.
#[tokio::test]
async fn a_prefix_under_another_installations_audit_keys_is_refused_at_start() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    for nested in ["/baton-test/audit/x", "/baton-test/audit", "/audit/x"] {
        let mut inner = settings(&cluster, "inner", 30);
        inner.prefix = nested.to_string();
        match EtcdStore::open(inner).await {
            Err(e @ StoreError::NestedPrefix { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&format!("--etcd-prefix {nested} ")), "{text}");
                assert!(text.contains("audit/"), "{text}");
            }
            Err(e) => anyhow::bail!("{nested}: another error: {e}"),
            Ok(_) => anyhow::bail!("{nested}: opened"),
        }
    }
    for fine in [
        "/baton-test/auditor",
        "/baton-test/audits/x",
        "/baton-test-audit",
    ] {
        let mut other = settings(&cluster, "other", 30);
        other.prefix = fine.to_string();
        EtcdStore::open(other)
            .await
            .with_context(|| fine.to_string())?;
    }
    let a = EtcdStore::open(settings(&cluster, "a", 30)).await?;
    until_leader(&a).await?;
    Ok(())
}

/// The numbers of the live audit keys, in key order.
async fn audit_keys(etcd: &mut etcd_client::Client) -> Result<Vec<u64>> {
    let keys = etcd
        .get(
            "/baton-test/audit/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    keys.kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            key.strip_prefix("/baton-test/audit/")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{key} is not an audit key"))
        })
        .collect()
}

/// `n` audit records (pauses and resumes in turn).
fn records(n: usize) -> impl FnOnce(&mut LeaseState) {
    move |state| {
        for _ in 0..n {
            if !state.pause("op", "test", chrono::Utc::now()) {
                state.resume("op", chrono::Utc::now());
            }
        }
    }
}

/// Loads `store` again, checks that the load reads exactly `current` (its
/// window, nothing else) and takes the load's revision.
async fn reload(store: &EtcdStore, fence: &mut Fence, current: &LeaseState) -> Result<()> {
    let loaded = store.load().await?;
    assert_eq!(
        loaded.state.as_ref(),
        Some(current),
        "the load reads the window"
    );
    fence.revision = loaded.revision;
    Ok(())
}

/// Deposes `old` (its lease revoked, the replica gone) and elects a new
/// replica `b`, whose saves start from a state it did not write.
async fn hand_over(
    cluster: &EtcdCluster,
    etcd: &mut etcd_client::Client,
    old: EtcdStore,
) -> Result<(EtcdStore, Fence)> {
    let lease = old.election_lease().context("the old replica leads")?;
    drop(old);
    etcd.lease_revoke(lease).await?;
    let b = EtcdStore::open(settings(cluster, "b", 30)).await?;
    let fence = until_leader(&b).await?;
    Ok((b, fence))
}

/// Issue 12 (BENCHMARKS.md, "etcd store"): every save deleted the batches
/// that fell out of the window with a range from the start of the audit
/// prefix, and etcd walks every key deleted since its last compaction in
/// such a range, so saves slowed down by a key per save. Now a save from
/// this replica's own last save deletes only in the window that save left.
/// etcd shows no walk, so keys no save of this installation would leave
/// stand for the ranges: one below every window, one past every batch. A
/// save from the leader's own state leaves both (it walks neither end of
/// the prefix; before the fix it deleted the one below); the first save
/// after a load (which cannot know what lies where) deletes both. Through
/// two thousand saves the keys are exactly the window's.
#[tokio::test]
async fn a_leaders_saves_delete_only_in_their_window_not_from_the_start_of_the_prefix() -> Result<()>
{
    let (_serial, cluster, mut etcd, a, mut fence) = leading(None).await?;
    let mut current = LeaseState::default();
    for _ in 0..2_000 {
        step(&a, &mut fence, &mut current, records(1)).await?;
    }
    assert_eq!(current.audit_seq, 2_000);
    assert_eq!(
        audit_keys(&mut etcd).await?,
        (1_501..=2_000).collect::<Vec<_>>()
    );
    leave_audit_keys(&mut etcd, 1, 1, "below").await?;
    leave_audit_keys(&mut etcd, 1_000_000, 1, "past").await?;
    step(&a, &mut fence, &mut current, records(3)).await?;
    let keys = audit_keys(&mut etcd).await?;
    assert_eq!(
        keys.first(),
        Some(&1),
        "the save walked from the start: {keys:?}"
    );
    assert_eq!(
        keys.last(),
        Some(&1_000_000),
        "the save walked past its batch"
    );
    let window: Vec<u64> = (1_504..=2_000).chain([2_003]).collect();
    assert_eq!(keys[1..keys.len() - 1], window[..]);
    reload(&a, &mut fence, &current).await?;
    let (b, mut fence) = hand_over(&cluster, &mut etcd, a).await?;
    step(&b, &mut fence, &mut current, records(1)).await?;
    let window: Vec<u64> = (1_505..=2_000).chain([2_003, 2_004]).collect();
    assert_eq!(audit_keys(&mut etcd).await?, window);
    reload(&b, &mut fence, &current).await?;
    Ok(())
}

/// Red-team finding on the narrow ranges: a remembered span is good only
/// along an unbroken chain of the replica's own saves. After an etcd
/// snapshot restore revisions repeat, so the state key can be found at the
/// remembered revision with keys of another history the span does not
/// cover. Keys left while the state key stays at its revision stand for
/// them here: the first save after a load deletes them (it failed before:
/// the span was kept across the load and both keys survived).
#[tokio::test]
async fn the_first_save_after_a_load_deletes_what_the_span_does_not_cover_at_the_same_revision()
-> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let mut current = LeaseState::default();
    for _ in 0..600 {
        step(&a, &mut fence, &mut current, records(1)).await?;
    }
    leave_audit_keys(&mut etcd, 5, 1, "other-history").await?;
    leave_audit_keys(&mut etcd, 1_000_000, 1, "other-history").await?;
    let at = fence.revision.clone();
    reload(&a, &mut fence, &current).await?;
    assert_eq!(fence.revision, at, "the state key did not move");
    step(&a, &mut fence, &mut current, records(1)).await?;
    assert_eq!(
        audit_keys(&mut etcd).await?,
        (102..=601).collect::<Vec<_>>()
    );
    Ok(())
}

/// Hostile: a batch that straddles the window's lower edge stays whole
/// (the load keeps its newest records); a batch longer than the window
/// replaces it all; after each, the keys are exactly those named in the
/// window and a load reads exactly the newest AUDIT_KEEP records.
#[tokio::test]
async fn straddling_and_overlong_batches_leave_exactly_the_window() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let mut current = LeaseState::default();
    for _ in 0..80 {
        step(&a, &mut fence, &mut current, records(7)).await?;
    }
    // The window is 61..=560; key 63 holds 57..=63.
    let multiples_of_7: Vec<u64> = (63..=560).step_by(7).collect();
    assert_eq!(audit_keys(&mut etcd).await?, multiples_of_7);
    reload(&a, &mut fence, &current).await?;
    assert_eq!(current.audit.len(), AUDIT_KEEP);
    step(&a, &mut fence, &mut current, records(7)).await?;
    step(&a, &mut fence, &mut current, records(600)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [1_167]);
    step(&a, &mut fence, &mut current, records(1)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [1_167, 1_168]);
    step(&a, &mut fence, &mut current, records(600)).await?;
    step(&a, &mut fence, &mut current, records(2)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [1_768, 1_770]);
    reload(&a, &mut fence, &current).await?;
    assert_eq!(current.audit.len(), AUDIT_KEEP);
    Ok(())
}

/// Hostile: the first save after a previous release's document (its
/// records inside it) moves them to a key and deletes what an earlier
/// upgrade left anywhere under the prefix (below the document's numbers
/// and past them); the next saves keep exactly the window.
#[tokio::test]
async fn the_first_save_after_a_format_1_document_leaves_only_its_records() -> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(Some(PREVIOUS_RELEASE)).await?;
    leave_audit_keys(&mut etcd, 2, 1, "earlier-upgrade").await?;
    leave_audit_keys(&mut etcd, 700, 3, "earlier-upgrade").await?;
    let mut current = a.load().await?.state.context("no state")?;
    step(&a, &mut fence, &mut current, records(2)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [5]);
    for _ in 0..300 {
        step(&a, &mut fence, &mut current, records(2)).await?;
    }
    // The window is 106..=605: keys 107, 109, ...
    assert_eq!(
        audit_keys(&mut etcd).await?,
        (107..=605).step_by(2).collect::<Vec<_>>()
    );
    reload(&a, &mut fence, &current).await?;
    assert_eq!(current.audit.len(), AUDIT_KEEP);
    assert!(current.audit.iter().all(|r| r.node != "earlier-upgrade"));
    Ok(())
}

/// Hostile: `state` keys restored from backups, several windows behind the
/// history abandoned after them, and then ahead of the audit keys left by
/// the history that ran on from the older backup (another history's keys,
/// below the restored state's window). Each load reads only the restored
/// state's window (none of the other histories' records), and the first
/// save after it leaves only its own keys. A save that deleted only from
/// its batch's first number minus AUDIT_KEEP (enough after the leader's
/// own saves) would keep the other history's keys below the window, and
/// loads would show them.
#[tokio::test]
async fn restored_state_keys_behind_and_ahead_of_the_audit_keys_read_and_keep_their_own()
-> Result<()> {
    let (_serial, _cluster, mut etcd, a, mut fence) = leading(None).await?;
    let (at_backup, backup) = five_saves_and_a_backup(&a, &mut fence, &mut etcd).await?;
    // The history after the backup: over three windows of records.
    let mut abandoned = at_backup.clone();
    for _ in 0..160 {
        step(&a, &mut fence, &mut abandoned, records(10)).await?;
    }
    assert_eq!(abandoned.audit_seq, 1_610);
    let ahead = etcd.get("/baton-test/state", None).await?;
    let ahead = ahead.kvs().first().context("no state")?.value().to_vec();

    // Behind: its window is gone; the abandoned keys past it go with the
    // first save, and only the new history's keys stay.
    etcd.put("/baton-test/state", backup, None).await?;
    let loaded = a.load().await?;
    fence.revision = loaded.revision;
    let mut behind = loaded.state.context("no state")?;
    assert_eq!(behind, at_backup.without_audit());
    for node in ["behind-1", "behind-2", "behind-3"] {
        step(&a, &mut fence, &mut behind, grant_and_pauses(node, 1)).await?;
    }
    assert_eq!(audit_keys(&mut etcd).await?, [13, 16, 19]);
    reload(&a, &mut fence, &behind).await?;

    // Ahead: the keys 13, 16 and 19 are another history's, below this
    // state's window (1111..=1610, deleted by the history behind).
    etcd.put("/baton-test/state", ahead, None).await?;
    let loaded = a.load().await?;
    fence.revision = loaded.revision;
    let mut current = loaded.state.context("no state")?;
    assert_eq!(
        current,
        abandoned.without_audit(),
        "the other history's records are not this state's"
    );
    step(&a, &mut fence, &mut current, records(2)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [1_612]);
    step(&a, &mut fence, &mut current, records(1)).await?;
    assert_eq!(audit_keys(&mut etcd).await?, [1_612, 1_613]);
    reload(&a, &mut fence, &current).await?;
    assert_eq!(current.audit.len(), 3);
    assert!(current.audit.iter().all(|r| !r.node.starts_with("behind")));
    Ok(())
}
