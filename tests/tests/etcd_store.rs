//! The etcd store used directly: every save is guarded by the writer's
//! election key, so a replica whose lease is gone cannot write even before
//! it notices, and the next leader loads what the last one saved.

use std::time::Duration;

use anyhow::{Context, Result};
use baton_coordinator::node::NodeName;
use baton_coordinator::state::LeaseState;
use baton_coordinator::store::etcd::{EtcdStore, EtcdStoreSettings};
use baton_coordinator::store::{StateStore, StoreError};
use baton_tests::etcd::{EtcdCluster, serial};

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

async fn until_leader(store: &EtcdStore) -> Result<()> {
    let mut rx = store.leadership();
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|l| l.is_leader))
        .await
        .context("never elected")??;
    Ok(())
}

#[tokio::test]
async fn a_deposed_store_cannot_save_and_the_next_leader_loads_the_last_state() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let a = EtcdStore::open(settings(&cluster, "a", 30)).await?;
    until_leader(&a).await?;
    let mut state = LeaseState::default();
    state.grant(
        &NodeName::new("w1")?,
        false,
        false,
        "test",
        chrono::Utc::now(),
    )?;
    a.save(&state).await?;

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
        .save(&later)
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
    assert_eq!(leader.load().await?, Some(state));
    Ok(())
}
