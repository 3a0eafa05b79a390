//! The etcd quorum guard against real etcd clusters (Debian's etcd on
//! loopback) and a real coordinator process: which nodes are granted and
//! the exact reasons the others wait.

use anyhow::Result;
use std::time::Duration;

use baton_tests::etcd::coordinator::{
    Coordinator, acquire, assert_still_waiting, wait_for_reason, wait_granted,
};
use baton_tests::etcd::{EtcdCluster, serial};

/// A coordinator guarding `cluster`, with `extra` flags.
fn guarded(cluster: &EtcdCluster, extra: &[&str]) -> Result<Coordinator> {
    Coordinator::guarding(cluster, extra)
}

#[tokio::test]
async fn three_members_all_healthy_grant_an_etcd_node() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(3).await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let (token, _) = wait_granted(&mut n1).await?;
    // A new installation's tokens start at its time in milliseconds.
    assert!(token > 1_000_000_000_000, "{token}");
    Ok(())
}

#[tokio::test]
async fn five_members_all_healthy_grant_an_etcd_node() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(5).await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    let mut n3 = acquire(&mut client, "n3", true).await?;
    wait_granted(&mut n3).await?;
    Ok(())
}

#[tokio::test]
async fn a_killed_member_holds_back_other_etcd_nodes_but_not_workers() -> Result<()> {
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    // The etcd nodes are declared, so a worker is known to carry no member
    // (standalone, nothing else could say so before n2 and n3 ever asked).
    let coordinator = guarded(
        &cluster,
        &[
            "--max-concurrent",
            "2",
            "--etcd-member-map",
            "n1=n1,n2=n2,n3=n3",
        ],
    )?;
    cluster.kill("n2");
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let reason = wait_for_reason(&mut n1, "etcd: member n2 unhealthy").await?;
    assert!(
        reason.ends_with("taking n1 down would leave 1 of 3 voting members, quorum is 2"),
        "{reason}"
    );
    assert!(reason.contains("connection refused"), "{reason}");
    let mut worker = acquire(&mut client, "w1", false).await?;
    wait_granted(&mut worker).await?;
    // n1 keeps waiting after the worker's grant.
    assert_still_waiting(&mut n1, Duration::from_secs(3)).await?;
    Ok(())
}

#[tokio::test]
async fn five_members_with_one_killed_wait_unless_degraded_is_allowed() -> Result<()> {
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(5).await?;
    cluster.kill("n5");
    let strict = guarded(&cluster, &[])?;
    let mut client = strict.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let reason = wait_for_reason(&mut n1, "member n5 unhealthy").await?;
    assert!(
        reason.contains("would leave 3 of 5 voting members (quorum is 3)"),
        "{reason}"
    );
    drop(n1);
    drop(strict);
    let degraded = guarded(&cluster, &["--etcd-allow-degraded"])?;
    let mut client = degraded.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    wait_granted(&mut n1).await?;
    Ok(())
}

#[tokio::test]
async fn a_stopped_member_is_detected_as_unhealthy() -> Result<()> {
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    let coordinator = guarded(&cluster, &[])?;
    cluster.stop("n3");
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let reason = wait_for_reason(&mut n1, "member n3 unhealthy").await;
    cluster.cont("n3");
    let reason = reason?;
    assert!(reason.contains("no answer within"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn a_nospace_alarm_blocks() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start_with(3, Some(1024 * 1024)).await?;
    cluster.fill_until_nospace().await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let reason = wait_for_reason(&mut n1, "etcd: alarm NOSPACE").await?;
    assert!(reason.contains("until it is cleared"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn a_learner_blocks() -> Result<()> {
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    cluster.add_learner("l1").await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    // Until the learner has started it shows as an unstarted member; both block.
    let reason = wait_for_reason(&mut n1, "member l1 is a learner").await?;
    assert!(reason.contains("membership is changing"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn a_two_member_cluster_never_grants() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(2).await?;
    let coordinator = guarded(&cluster, &["--etcd-allow-degraded", "--etcd-allow-outage"])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    wait_for_reason(&mut n1, "a 2-member cluster loses quorum").await?;
    // Several more probe rounds later it still has not been granted.
    assert_still_waiting(&mut n1, Duration::from_secs(3)).await?;
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_never_grants() -> Result<()> {
    let _serial = serial().await;
    let port = baton_tests::ports::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let coordinator = Coordinator::start("c1", &["--etcd-endpoints", &endpoint])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let reason = wait_for_reason(&mut n1, "etcd: cannot read the cluster (").await?;
    assert!(reason.contains("connection refused"), "{reason}");
    let mut w1 = acquire(&mut client, "w1", false).await?;
    wait_for_reason(&mut w1, "cannot tell whether node w1 carries a member").await?;
    Ok(())
}

#[tokio::test]
async fn the_leaders_node_gets_leadership_moved_away_first() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(3).await?;
    let coordinator = guarded(&cluster, &[])?;
    let leader = cluster.leader().await?;
    let mut client = coordinator.client().await?;
    let mut stream = acquire(&mut client, &leader, true).await?;
    wait_granted(&mut stream).await?;
    let now = cluster.leader().await?;
    assert_ne!(
        now, leader,
        "etcd leadership must have moved off {leader} before the grant"
    );
    assert!(
        coordinator.log().contains("etcd leadership moved"),
        "{}",
        coordinator.log()
    );
    Ok(())
}

#[tokio::test]
async fn the_snapshot_is_verified_and_loads_with_etcdctl() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(3).await?;
    let mut kv = cluster.client().await?;
    kv.put("app/key", "value", None).await?;
    let coordinator = guarded(&cluster, &["--etcd-snapshot-keep", "1"])?;
    let mut client = coordinator.client().await?;
    // A second etcd node (after the first released and counted back) makes
    // a second snapshot; with --etcd-snapshot-keep 1 only it remains.
    granted_and_released(&mut client, "n1").await?;
    let mut n2 = acquire(&mut client, "n2", true).await?;
    wait_granted(&mut n2).await?;
    let mut dbs: Vec<_> = std::fs::read_dir(coordinator.snapshot_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    dbs.sort();
    let names: Vec<String> = dbs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 2, "one snapshot and its checksum: {names:?}");
    let db = dbs
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "db"))
        .expect("a .db file");
    let bytes = std::fs::read(db)?;
    assert_eq!(bytes.len() % 512, 32);
    use sha2::Digest;
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    assert_eq!(sha2::Sha256::digest(body).as_slice(), trailer);
    let sum = std::fs::read_to_string(db.with_extension("db.sha256"))?;
    assert!(
        sum.starts_with(&hex(&sha2::Sha256::digest(&bytes))),
        "{sum}"
    );
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(db)
        .output()?;
    assert!(
        out.status.success(),
        "etcdctl snapshot status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(status["totalKey"].as_u64().unwrap_or(0) >= 1, "{status}");
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_node_counts_back_only_after_its_member_is_healthy_again() -> Result<()> {
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    let coordinator = guarded(&cluster, &["--etcd-back-after", "4"])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let (t1, _) = wait_granted(&mut n1).await?;
    // n1 "reboots": its member goes down; the agent releases when done, but
    // here it releases while the member is still down.
    cluster.kill("n1");
    use baton_proto::v1::ReleaseRequest;
    client
        .release(ReleaseRequest {
            node: "n1".into(),
            fencing_token: t1,
            reason: "done".into(),
        })
        .await?;
    let mut n2 = acquire(&mut client, "n2", true).await?;
    // While its member is down, n1 does not count as back.
    wait_for_reason(
        &mut n2,
        "node n1 (member n1) is not verified back yet (0 of 4 healthy checks in a row)",
    )
    .await?;
    cluster.restart("n1")?;
    // Healthy again: it counts passes in a row before it is back.
    wait_for_reason(
        &mut n2,
        "node n1 (member n1) is not verified back yet (1 of 4",
    )
    .await?;
    let (t2, _) = wait_granted(&mut n2).await?;
    assert!(t2 > t1);
    Ok(())
}

#[tokio::test]
async fn standalone_a_member_on_no_known_node_holds_back_nodes_that_might_carry_it() -> Result<()> {
    let _serial = serial().await;
    // etcd-a runs on the host the agents call w1, but nothing says so.
    let mut cluster = EtcdCluster::start_named(&["etcd-a", "n2", "n3"]).await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    // w1's agent does not claim to be control-plane; before, it passed for
    // a plain worker and went down with no quorum check at all.
    let mut w1 = acquire(&mut client, "w1", false).await?;
    let reason = wait_for_reason(&mut w1, "etcd-a").await?;
    assert!(reason.contains("on no known node"), "{reason}");
    assert!(reason.contains("--etcd-member-map NODE="), "{reason}");
    assert!(reason.contains("--etcd-exempt-node w1"), "{reason}");
    assert_still_waiting(&mut w1, Duration::from_secs(2)).await?;
    drop(w1);
    drop(coordinator);

    // Mapped: w1 is the etcd node it is, and gets the quorum check (a
    // frozen member holds it back) and the snapshot.
    // n3 is frozen before this coordinator's first probe, so no health
    // data it ever has says all is well.
    cluster.stop("n3");
    let coordinator = guarded(&cluster, &["--etcd-member-map", "w1=etcd-a"])?;
    let mut client = coordinator.client().await?;
    let mut w1 = acquire(&mut client, "w1", false).await?;
    let reason = wait_for_reason(&mut w1, "member n3 unhealthy").await;
    cluster.cont("n3");
    let reason = reason?;
    assert!(reason.contains("taking etcd-a down"), "{reason}");
    wait_granted(&mut w1).await?;
    assert!(
        std::fs::read_dir(coordinator.snapshot_dir())?.count() >= 2,
        "a verified snapshot (and its checksum) before the grant"
    );
    Ok(())
}

#[tokio::test]
async fn confirm_says_wait_while_a_member_is_frozen_after_the_grant() -> Result<()> {
    use baton_proto::v1::{ConfirmRequest, Step};
    let _serial = serial().await;
    let mut cluster = EtcdCluster::start(3).await?;
    let coordinator = guarded(&cluster, &[])?;
    let mut client = coordinator.client().await?;
    let mut n1 = acquire(&mut client, "n1", true).await?;
    let (token, _) = wait_granted(&mut n1).await?;
    let ask = || ConfirmRequest {
        node: "n1".into(),
        fencing_token: token,
        step: Step::Reboot as i32,
    };
    // A control-plane etcd node's grant is held until its backup is kept.
    let held = client.confirm(ask()).await?.into_inner();
    assert!(
        !held.proceed && held.reason.contains("control-plane backup"),
        "{held:?}"
    );
    send_backup(&mut client, "n1", token, b"pki and kubeadm config").await?;
    // Polls Confirm (bounded) until its answer satisfies `done`.
    async fn until(
        client: &mut baton_proto::v1::coordinator_client::CoordinatorClient<
            tonic::transport::Channel,
        >,
        request: impl Fn() -> ConfirmRequest,
        done: impl Fn(&baton_proto::v1::ConfirmResponse) -> bool,
    ) -> Result<baton_proto::v1::ConfirmResponse> {
        let mut seen = Vec::new();
        for _ in 0..150 {
            let answer = client.confirm(request()).await?.into_inner();
            if done(&answer) {
                return Ok(answer);
            }
            seen.push(answer.reason);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("Confirm never gave the awaited answer; saw {seen:#?}")
    }
    until(&mut client, ask, |a| a.proceed).await?;

    // The drain took a while; meanwhile n2 hung. Rebooting n1 now would
    // leave 1 of 3.
    cluster.stop("n2");
    let wait = until(&mut client, ask, |a| {
        !a.proceed && a.reason.contains("member n2 unhealthy")
    })
    .await;
    cluster.cont("n2");
    let wait = wait?;
    assert!(
        wait.reason
            .contains("taking n1 down would leave 1 of 3 voting members"),
        "{}",
        wait.reason
    );
    assert!(wait.retry_after.is_some() && wait.overdue_at.is_some());
    // n2 is back: n1 may reboot.
    until(&mut client, ask, |a| a.proceed).await?;
    Ok(())
}

/// Sends `archive` as `node`'s control-plane backup for the grant `token`.
async fn send_backup(
    client: &mut baton_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    node: &str,
    token: u64,
    archive: &[u8],
) -> Result<()> {
    use baton_proto::v1::{BackupChunk, BackupHeader, backup_chunk::Chunk};
    use sha2::Digest;
    let chunks = vec![
        BackupChunk {
            chunk: Some(Chunk::Header(BackupHeader {
                node: node.into(),
                fencing_token: token,
                sha256: hex(&sha2::Sha256::digest(archive)),
                size: archive.len() as u64,
            })),
        },
        BackupChunk {
            chunk: Some(Chunk::Data(archive.to_vec())),
        },
    ];
    client.upload_backup(futures::stream::iter(chunks)).await?;
    Ok(())
}

/// Acquires the baton for etcd node `node`, waits for the grant and
/// releases it; returns the token.
async fn granted_and_released(
    client: &mut baton_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    node: &str,
) -> Result<u64> {
    let mut stream = acquire(client, node, true).await?;
    let (token, _) = wait_granted(&mut stream).await?;
    client
        .release(baton_proto::v1::ReleaseRequest {
            node: node.into(),
            fencing_token: token,
            reason: "done".into(),
        })
        .await?;
    Ok(token)
}

/// Issue 9, finding 6: "counts as back" survives a coordinator restart right
/// after a release, so the next etcd node does not go on one healthy probe.
#[tokio::test]
async fn counts_as_back_survives_a_coordinator_restart() -> Result<()> {
    let _serial = serial().await;
    let cluster = EtcdCluster::start(3).await?;
    let mut coordinator = guarded(&cluster, &["--etcd-back-after", "6"])?;
    let mut client = coordinator.client().await?;
    let t1 = granted_and_released(&mut client, "n1").await?;
    // The coordinator crashes right after the release and comes back.
    coordinator.restart()?;
    let mut client = coordinator.client().await?;
    let mut n2 = acquire(&mut client, "n2", true).await?;
    // n1's member is healthy, but that alone is one probe: n1 must pass
    // its rounds again before another etcd node goes down.
    wait_for_reason(&mut n2, "node n1 (member n1) is not verified back yet (").await?;
    let (t2, reasons) = wait_granted(&mut n2).await?;
    assert!(t2 > t1);
    assert!(
        reasons.iter().any(|r| r.contains("(5 of 6")),
        "every round counted: {reasons:#?}"
    );
    Ok(())
}
