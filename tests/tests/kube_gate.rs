//! The health gate in a (fake) cluster: with the node watch, a grant waits
//! while a node that does not hold the baton is not Ready, and while a
//! PodDisruptionBudget has fewer healthy pods than it desires (the fake
//! computes budgets' status from their pods, as the disruption controller
//! does); each with the reason, and the grant goes when it clears.

use std::time::Duration;

use anyhow::Result;
use baton_tests::coordinator::{InProcess, wait_granted, wait_reason};
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::fixtures::{node, pdb, pod};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_wait_for_ready_nodes_and_healthy_budgets() -> Result<()> {
    let fake = FakeApi::new();
    for n in ["n1", "n2", "n3"] {
        fake.put(node(n).build());
    }
    fake.put(node("n4").ready(false).build());
    fake.put(pod("web", "web-1").on("n3").label("app", "web").build());
    fake.put(pod("web", "web-2").on("n3").label("app", "web").build());
    fake.put(
        pdb("web", "web")
            .min_available(2)
            .selecting("app", "web")
            .build(),
    );
    let endpoint = fake.serve().await;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "healthGate:\n  interval: 1s\n")?;
    let c = InProcess::start(
        dir.path(),
        &[
            format!("--policy={}", policy.display()),
            "--watch-nodes".to_string(),
            format!("--kube-api-url={}", endpoint.url),
            // n4 being down must not hide behind the concurrency limit.
            "--max-concurrent=3".to_string(),
        ],
    )
    .await?;

    let mut n1 = c.acquire("n1", false).await?;
    let reason = wait_reason(&mut n1, "not Ready", Duration::from_secs(10)).await?;
    assert!(reason.contains("health gate: n4 not Ready"), "{reason}");
    fake.put(node("n4").build());
    let t1 = wait_granted(&mut n1, Duration::from_secs(10)).await?;

    // A budget's pod goes unready: below its desired health.
    let mut sick = pod("web", "web-2").on("n3").label("app", "web").build();
    sick["status"]["conditions"][0]["status"] = serde_json::json!("False");
    fake.put(sick);
    c.release("n1", t1).await?;
    let mut n2 = c.acquire("n2", false).await?;
    let reason = wait_reason(&mut n2, "PodDisruptionBudget", Duration::from_secs(10)).await?;
    assert!(
        reason.contains("web/web has 1 healthy pods, desires 2"),
        "{reason}"
    );
    fake.put(pod("web", "web-2").on("n3").label("app", "web").build());
    wait_granted(&mut n2, Duration::from_secs(10)).await?;
    Ok(())
}
