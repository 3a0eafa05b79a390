//! Stuck locks against the Kubernetes fake: a holder whose Node object is
//! deleted is released (audited) after the grace time, and the next node
//! goes; a Node that comes back within the grace keeps its baton; an
//! overdue holder is force-released only when the policy says so.

use std::time::Duration;

use anyhow::Result;
use baton_proto::v1::{StatusRequest, StatusResponse};
use baton_tests::coordinator::{InProcess, wait_granted, wait_reason};
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::fixtures::node;

async fn start(
    fake_url: &str,
    dir: &std::path::Path,
    policy: &str,
    extra: &[&str],
) -> Result<InProcess> {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy)?;
    let mut args = vec![
        format!("--policy={}", path.display()),
        "--watch-nodes".to_string(),
        format!("--kube-api-url={fake_url}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    InProcess::start(dir, &args).await
}

async fn status(c: &InProcess) -> Result<StatusResponse> {
    Ok(c.admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner())
}

fn holds(s: &StatusResponse, node: &str) -> bool {
    s.holders.iter().any(|h| h.node == node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_node_is_deleted_is_released_with_an_audit_record() -> Result<()> {
    let fake = FakeApi::new();
    for n in ["n1", "n2", "n3"] {
        fake.put(node(n).build());
    }
    let endpoint = fake.serve().await;
    let dir = tempfile::tempdir()?;
    let c = start(
        &endpoint.url,
        dir.path(),
        "stuckLocks:\n  deletedNodeGrace: 1s\n",
        &[],
    )
    .await?;

    let mut n1 = c.acquire("n1", false).await?;
    wait_granted(&mut n1, Duration::from_secs(10)).await?;
    let mut n2 = c.acquire("n2", false).await?;
    wait_reason(&mut n2, "concurrency limit", Duration::from_secs(5)).await?;

    // n1's Node is deleted and re-created within the grace: it keeps the baton.
    let n1_object = fake.remove("v1/nodes", "", "n1").expect("n1 exists");
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.put(n1_object);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        holds(&status(&c).await?, "n1"),
        "released although its Node came back"
    );

    // Deleted for good: released, audited, and n2 goes.
    fake.remove("v1/nodes", "", "n1");
    wait_granted(&mut n2, Duration::from_secs(10)).await?;
    let s = status(&c).await?;
    assert!(!holds(&s, "n1"));
    let record = s
        .audit
        .iter()
        .find(|a| a.action == "force-release" && a.node == "n1")
        .expect("an audit record of the release");
    assert!(record.actor.contains("stuck-lock policy"), "{record:?}");
    assert!(
        record.reason.contains("Node object was deleted"),
        "{record:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_holders_are_force_released_only_when_the_policy_says_so() -> Result<()> {
    let fake = FakeApi::new();
    for n in ["n1", "n2"] {
        fake.put(node(n).build());
    }
    let endpoint = fake.serve().await;

    // Off by default: an overdue holder keeps the baton.
    let dir = tempfile::tempdir()?;
    let c = start(&endpoint.url, dir.path(), "{}\n", &["--overdue-after=1s"]).await?;
    let mut n1 = c.acquire("n1", false).await?;
    wait_granted(&mut n1, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = status(&c).await?;
    assert!(holds(&s, "n1") && s.holders[0].overdue, "{s:?}");
    drop(c);

    // With stuckLocks.forceReleaseOverdueAfter: released, audited.
    let dir = tempfile::tempdir()?;
    let c = start(
        &endpoint.url,
        dir.path(),
        "stuckLocks:\n  forceReleaseOverdueAfter: 2s\n",
        &["--overdue-after=1s"],
    )
    .await?;
    let mut n1 = c.acquire("n1", false).await?;
    wait_granted(&mut n1, Duration::from_secs(10)).await?;
    let mut n2 = c.acquire("n2", false).await?;
    wait_granted(&mut n2, Duration::from_secs(10)).await?;
    let s = status(&c).await?;
    let record = s
        .audit
        .iter()
        .find(|a| a.action == "force-release" && a.node == "n1")
        .expect("an audit record of the force-release");
    assert!(
        record.reason.contains("forceReleaseOverdueAfter"),
        "{record:?}"
    );
    Ok(())
}
