//! A highly available coordinator on etcd: two real coordinator processes
//! share one etcd; one leads, the other refuses calls naming the leader,
//! takes over when the leader dies with holders and tokens intact, and a
//! deposed leader cannot write.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_proto::v1::{ReleaseRequest, RenewRequest};
use baton_tests::etcd::coordinator::{
    Coordinator, acquire, assert_still_waiting, wait_for_reason, wait_granted,
};
use baton_tests::etcd::{EtcdCluster, serial};
use etcd_client::GetOptions;

/// A replica on `cluster`; the first one (`initialize`) creates the state.
fn replica(cluster: &EtcdCluster, id: &str, ttl: &str, initialize: bool) -> Result<Coordinator> {
    replica_with(cluster, id, ttl, initialize, &[])
}

fn replica_with(
    cluster: &EtcdCluster,
    id: &str,
    ttl: &str,
    initialize: bool,
    extra: &[&str],
) -> Result<Coordinator> {
    let endpoints = cluster.endpoints();
    let mut args = vec![
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
        "--etcd-election-ttl",
        ttl,
        "--etcd-probe-interval",
        "500ms",
        // The etcd node is declared: the workers here carry no member.
        "--etcd-member-map",
        "n1=n1",
    ];
    if initialize {
        args.push("--initialize");
    }
    args.extend_from_slice(extra);
    Coordinator::start(id, &args)
}

/// (holders, last_token) as stored in etcd.
async fn stored(cluster: &EtcdCluster) -> Result<(Vec<String>, u64)> {
    let (holders, last_token) = cluster.stored_state().await?;
    Ok((holders.into_keys().collect(), last_token))
}

/// Waits until an Acquire on `follower` is refused naming `leader`.
async fn refused_naming(follower: &Coordinator, leader: &str) -> Result<()> {
    let mut client = follower.client().await?;
    for _ in 0..100 {
        match acquire(&mut client, "w9", false).await {
            Err(e) => {
                let status = e
                    .downcast_ref::<tonic::Status>()
                    .context("not a gRPC status")?;
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                if status
                    .message()
                    .contains(&format!("the leader is {leader}"))
                {
                    return Ok(());
                }
            }
            Ok(_) => bail!("follower {} accepted an Acquire", follower.id),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("follower {} never named leader {leader}", follower.id)
}

/// Retries `call` while it answers UNAVAILABLE (a new leader's engine may
/// still be loading the state right after /readyz turned ready), bounded.
async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..100 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return Ok(other?),
        }
    }
    bail!("still unavailable")
}

#[tokio::test]
async fn the_follower_takes_over_with_holders_and_tokens_intact_and_no_double_grant() -> Result<()>
{
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let mut a = replica(&cluster, "a", "2s", true)?;
    a.wait_ready().await?;
    let b = replica(&cluster, "b", "2s", false)?;
    refused_naming(&b, "a").await?;
    assert!(!b.ready(), "a follower must not be ready");

    // Mid-rollout: w1 holds the baton, w2 waits.
    let mut ca = a.client().await?;
    let mut w1 = acquire(&mut ca, "w1", false).await?;
    let (t1, _) = wait_granted(&mut w1).await?;
    let mut w2 = acquire(&mut ca, "w2", false).await?;
    wait_for_reason(&mut w2, "concurrency limit").await?;

    a.kill();
    b.wait_ready().await?;
    let mut cb = b.client().await?;
    // The holder and its token survived: renewing with t1 works on b.
    retry_unavailable(|| {
        let mut cb = cb.clone();
        async move {
            cb.renew(RenewRequest {
                node: "w1".into(),
                fencing_token: t1,
            })
            .await
        }
    })
    .await?;
    // w2 reconnects to the new leader and still waits: no double grant.
    let mut w2 = acquire(&mut cb, "w2", false).await?;
    let reason = wait_for_reason(&mut w2, "concurrency limit").await?;
    assert!(reason.contains("w1 holds it"), "{reason}");
    assert_still_waiting(&mut w2, Duration::from_secs(2)).await?;
    assert_eq!(stored(&cluster).await?, (vec!["w1".to_string()], t1));

    cb.release(ReleaseRequest {
        node: "w1".into(),
        fencing_token: t1,
        reason: "done".into(),
    })
    .await?;
    let (t2, _) = wait_granted(&mut w2).await?;
    assert_eq!(
        t2,
        t1 + 1,
        "tokens continue where the old leader stopped; none is reused"
    );
    assert_eq!(stored(&cluster).await?, (vec!["w2".to_string()], t2));
    Ok(())
}

#[tokio::test]
async fn a_partitioned_old_leader_cannot_write() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    // a renews its election lease rarely (every 10s), so it does not notice
    // the loss by itself before it tries to write.
    let a = replica(&cluster, "a", "30s", true)?;
    a.wait_ready().await?;
    let b = replica(&cluster, "b", "2s", false)?;
    refused_naming(&b, "a").await?;
    let mut ca = a.client().await?;
    let mut w1 = acquire(&mut ca, "w1", false).await?;
    let (t1, _) = wait_granted(&mut w1).await?;

    // Partition a: freeze it and let its election lease go (revoked here,
    // as if it had expired while a could not reach etcd).
    a.stop();
    let mut etcd = cluster.client().await?;
    let keys = etcd
        .get("/baton/election", Some(GetOptions::new().with_prefix()))
        .await?;
    let a_key = keys
        .kvs()
        .iter()
        .find(|kv| kv.value() == b"a")
        .context("a's election key")?;
    etcd.lease_revoke(a_key.lease()).await?;
    b.wait_ready().await?;
    let mut cb = b.client().await?;
    retry_unavailable(|| {
        let mut cb = cb.clone();
        async move {
            cb.release(ReleaseRequest {
                node: "w1".into(),
                fencing_token: t1,
                reason: "done".into(),
            })
            .await
        }
    })
    .await?;
    let mut w2 = acquire(&mut cb, "w2", false).await?;
    let (t2, _) = wait_granted(&mut w2).await?;

    // a wakes up still believing it leads and that w1 holds t1. Issue 9,
    // finding 1: no answer from that memory, refusals and reads included
    // (a "w2 does not hold the baton" or a resumed grant of t1 to w1 would
    // be a lie a client acts on).
    a.cont();
    let stale_refusal = ca
        .renew(RenewRequest {
            node: "w2".into(),
            fencing_token: t2,
        })
        .await
        .expect_err("a does not lead");
    assert_eq!(
        stale_refusal.code(),
        tonic::Code::Unavailable,
        "{stale_refusal:?}"
    );
    match acquire(&mut ca, "w1", false).await {
        Err(e) => {
            let status = e.downcast_ref::<tonic::Status>().context("a gRPC status")?;
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        Ok(_) => bail!("the deposed leader answered an Acquire from its memory"),
    }
    let refused = ca
        .release(ReleaseRequest {
            node: "w1".into(),
            fencing_token: t1,
            reason: "stale".into(),
        })
        .await
        .expect_err("the deposed leader's write must be refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Nothing a wrote reached etcd: b's state stands.
    assert_eq!(stored(&cluster).await?, (vec!["w2".to_string()], t2));
    assert!(
        a.log().contains("stepping down") || !a.ready(),
        "{}",
        a.log()
    );
    Ok(())
}

#[tokio::test]
async fn a_new_etcd_prefix_is_refused_not_started_empty() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(1).await?;
    let mut a = replica(&cluster, "a", "2s", true)?;
    a.wait_ready().await?;
    let mut ca = a.client().await?;
    let mut w1 = acquire(&mut ca, "w1", false).await?;
    let (t1, _) = wait_granted(&mut w1).await?;
    a.kill();

    // Restarted with another --etcd-prefix (a typo, a changed manifest):
    // nothing there. It must not forget w1 and start again at token 1.
    let mut b = replica_with(&cluster, "b", "2s", false, &["--etcd-prefix", "/baton-new"])?;
    let status = b.wait_exit().await?;
    assert!(!status.success(), "{status}");
    let log = b.log();
    assert!(
        log.contains("no lease state in etcd key /baton-new/state"),
        "{log}"
    );
    assert!(log.contains("--initialize"), "{log}");
    let mut etcd = cluster.client().await?;
    assert!(etcd.get("/baton-new/state", None).await?.kvs().is_empty());

    // And --initialize over the real prefix is refused.
    let mut c = replica(&cluster, "c", "2s", true)?;
    assert!(!c.wait_exit().await?.success());
    assert!(c.log().contains("remove --initialize"), "{}", c.log());
    assert_eq!(stored(&cluster).await?, (vec!["w1".to_string()], t1));
    Ok(())
}

/// Red-team finding on issue 9 (4): the leader's election keep-alive talks
/// to one etcd member at a time. When that member hangs (a reboot, a
/// freeze: its TCP connection stays up, so nothing fails, it just stalls),
/// the keep-alive moves to another member in time and the leader keeps
/// leading. Cut off from every member, it still steps down before etcd
/// can have expired its lease.
#[tokio::test]
async fn the_leader_survives_a_hung_keep_alive_member_and_steps_down_in_time_when_all_hang()
-> Result<()> {
    use std::sync::{Arc, Mutex};

    use baton_coordinator::store::StateStore;
    use baton_coordinator::store::etcd::{EtcdStore, EtcdStoreSettings};
    use tokio::time::Instant;

    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    // Stopping etcd's own leader would add an etcd election to the test;
    // what is tested is the member under the keep-alive, so that one is a
    // follower: the keep-alive starts on the first endpoint.
    let etcd_leader = cluster.leader().await?;
    let mut names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
    names.sort_by_key(|n| *n == etcd_leader);
    let url_of = |name: &str| cluster.members[cluster.index(name)].client_url.clone();
    let ttl = Duration::from_secs(5);
    let store = EtcdStore::open(EtcdStoreSettings {
        endpoints: names.iter().map(|n| url_of(n)).collect(),
        tls: None,
        prefix: "/baton-keep-alive".to_string(),
        id: "a".to_string(),
        election_ttl: ttl,
        timeout: Duration::from_secs(2),
    })
    .await?;
    let mut leadership = store.leadership();
    let term = tokio::time::timeout(
        Duration::from_secs(30),
        leadership.wait_for(|l| l.is_leader),
    )
    .await
    .context("never elected")??
    .term;
    let mut through = None;
    for _ in 0..100 {
        through = store.kept_alive_by();
        if through.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let through = through.context("the lease was never kept alive")?;
    let hung = names
        .iter()
        .find(|n| url_of(n) == through)
        .context("keep-alive endpoint is no member")?
        .clone();
    assert_ne!(hung, etcd_leader);

    // Every leadership change from now on.
    let changes = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let changes = changes.clone();
        let mut leadership = store.leadership();
        tokio::spawn(async move {
            while leadership.changed().await.is_ok() {
                let now = leadership.borrow_and_update().clone();
                changes.lock().unwrap().push((Instant::now(), now));
            }
        })
    };

    cluster.stop(&hung);
    tokio::time::sleep(ttl * 2).await;
    let seen = changes.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "the leader stepped down while one of three members hung: {seen:?}"
    );
    let now = store.leadership().borrow().clone();
    assert!(now.is_leader && now.term == term, "{now:?}");
    let moved = store.kept_alive_by().context("kept alive")?;
    assert_ne!(moved, through, "the keep-alive never left the hung member");
    cluster.cont(&hung);
    cluster.wait_ready().await?;

    // Cut off from every member. Renewals succeed every TTL/4 until now, so
    // etcd renewed the lease at most TTL/4 ago: it lives at least another
    // 3/4 TTL. The leader must be gone before that.
    let cut = Instant::now();
    for name in &names {
        cluster.stop(name);
    }
    let mut leadership = store.leadership();
    tokio::time::timeout(ttl * 2, leadership.wait_for(|l| !l.is_leader))
        .await
        .context("never stepped down while cut off from etcd")??;
    let stepped_down_after = cut.elapsed();
    for name in &names {
        cluster.cont(name);
    }
    assert!(
        stepped_down_after < ttl * 3 / 4,
        "stepped down {stepped_down_after:?} after the cut; etcd may expire the lease {:?} after it",
        ttl * 3 / 4
    );
    recorder.abort();
    Ok(())
}
