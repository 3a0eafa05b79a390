//! Pools and zones from the policy file, with labels standalone agents
//! send: pools run in parallel within their own limits and the global
//! one; a zone limit of one keeps other zones waiting; `batonctl plan`
//! shows the same.

use std::time::Duration;

use anyhow::Result;
use baton_proto::v1::{PlanRequest, Step};
use baton_tests::coordinator::{InProcess, wait_granted, wait_reason};

const POLICY: &str = r#"maxConcurrent: 3
pools:
  - name: db
    selector:
      matchLabels: {role: db}
    maxUnavailable: 1
  - name: web
    selector:
      matchExpressions:
        - {key: role, operator: In, values: [web, api]}
    maxUnavailable: "50%"
topology:
  maxZonesInMaintenance: 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_and_zones_hold_nodes_back_with_their_reasons() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY)?;
    let c = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;
    let zone = "topology.kubernetes.io/zone";

    let mut db1 = c
        .acquire_labeled("db1", &[("role", "db"), (zone, "a")])
        .await?;
    wait_granted(&mut db1, Duration::from_secs(5)).await?;
    let mut db2 = c
        .acquire_labeled("db2", &[("role", "db"), (zone, "a")])
        .await?;
    let reason = wait_reason(&mut db2, "pool db", Duration::from_secs(5)).await?;
    assert_eq!(reason, "pool db: 1 of 1 in maintenance (db1)");
    // web has 4 nodes that called in: 50% = 2.
    let mut webs = Vec::new();
    for w in ["web1", "web2", "web3", "web4"] {
        webs.push(
            c.acquire_labeled(w, &[("role", "web"), (zone, "a")])
                .await?,
        );
    }
    wait_granted(&mut webs[0], Duration::from_secs(5)).await?;
    wait_granted(&mut webs[1], Duration::from_secs(5)).await?;
    // (Its first reason may predate web4's call, when the pool was
    // smaller; the pool's size is the nodes that called in.)
    let reason = wait_reason(&mut webs[2], "concurrency limit", Duration::from_secs(5)).await?;
    assert!(reason.starts_with("concurrency limit: 3 of 3"), "{reason}");

    // api1 (zone b) waits too; the dry run gives the same reason.
    let mut other = c
        .acquire_labeled("api1", &[("role", "api"), (zone, "b")])
        .await?;
    wait_reason(&mut other, "concurrency limit", Duration::from_secs(5)).await?;
    let plan = c.admin().await?.plan(PlanRequest {}).await?.into_inner();
    let api1 = plan
        .entries
        .iter()
        .find(|e| e.node == "api1")
        .expect("api1 planned");
    assert!(api1.reason.starts_with("concurrency limit"), "{api1:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_zone_at_a_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "maxConcurrent: 5\ntopology:\n  maxZonesInMaintenance: 1\n",
    )?;
    let c = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;
    let zone = "topology.kubernetes.io/zone";
    let mut a1 = c.acquire_labeled("a1", &[(zone, "a")]).await?;
    let t = wait_granted(&mut a1, Duration::from_secs(5)).await?;
    let mut b1 = c.acquire_labeled("b1", &[(zone, "b")]).await?;
    let reason = wait_reason(&mut b1, "zone limit", Duration::from_secs(5)).await?;
    assert_eq!(
        reason,
        "zone limit: a in maintenance, at most 1 zone(s) at a time"
    );
    let mut a2 = c.acquire_labeled("a2", &[(zone, "a")]).await?;
    wait_granted(&mut a2, Duration::from_secs(5)).await?;
    c.release("a1", t).await?;
    let reason = wait_reason(&mut b1, "zone limit", Duration::from_secs(5)).await;
    // Still zone a (a2) in maintenance: b1 keeps waiting (no new reason is
    // sent, so the wait times out without a grant).
    assert!(reason.is_err_and(|e| e.to_string().contains("within")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_budget_pauses_the_rollout_with_its_reason() -> Result<()> {
    use baton_proto::v1::{Phase, ReportRequest, StatusRequest};
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "maxConcurrent: 3\nfailureBudget:\n  maxFailedNodes: 2\n",
    )?;
    let c = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;
    let mut tokens = Vec::new();
    for n in ["n1", "n2"] {
        let mut s = c.acquire(n, false).await?;
        tokens.push((n, wait_granted(&mut s, Duration::from_secs(5)).await?));
    }
    for (n, t) in &tokens {
        c.lease()
            .await?
            .report(ReportRequest {
                node: n.to_string(),
                fencing_token: *t,
                phase: Phase::Failed as i32,
                error: "update failed".into(),
                ..Default::default()
            })
            .await?;
    }
    let mut n3 = c.acquire("n3", false).await?;
    // Held at once by the rule; then paused, audited, by the budget.
    let reason = wait_reason(&mut n3, "failure budget", Duration::from_secs(5)).await?;
    assert!(reason.contains("failure budget spent: 2"), "{reason}");
    if !reason.starts_with("paused:") {
        let reason = wait_reason(&mut n3, "paused: failure budget", Duration::from_secs(5)).await?;
        assert!(
            reason.starts_with("paused: failure budget spent: 2 node(s) failed (n1, n2)"),
            "{reason}"
        );
    }
    let status = c
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    assert!(status.paused);
    let pause = status
        .audit
        .iter()
        .rev()
        .find(|a| a.action == "pause")
        .expect("audited");
    assert_eq!(pause.actor, "coordinator (failure budget)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_goes_alone_then_the_rest_after_the_soak() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "maxConcurrent: 3\ncanary:\n  soak: 2s\n")?;
    let c = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;
    let mut n1 = c.acquire("n1", false).await?;
    let t1 = wait_granted(&mut n1, Duration::from_secs(5)).await?;
    let mut n2 = c.acquire("n2", false).await?;
    let mut n3 = c.acquire("n3", false).await?;
    let reason = wait_reason(&mut n2, "canary", Duration::from_secs(5)).await?;
    assert!(
        reason == "canary of (no pool): n1 goes alone"
            || reason == "canary of (no pool): n1 is in maintenance; the others wait for it",
        "{reason}"
    );
    c.release("n1", t1).await?;
    wait_reason(&mut n2, "soaking until", Duration::from_secs(5)).await?;
    let soaked = std::time::Instant::now();
    wait_granted(&mut n2, Duration::from_secs(10)).await?;
    wait_granted(&mut n3, Duration::from_secs(10)).await?;
    assert!(
        soaked.elapsed() >= Duration::from_millis(1000),
        "granted before the soak ended"
    );
    Ok(())
}

/// The canary itself is not held back by the canary rule when it confirms
/// its destructive steps (Confirm re-runs the rule as if it asked now): it
/// is the node the others wait for. The others still wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_may_confirm_its_own_steps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "maxConcurrent: 3\ncanary:\n  soak: 2s\n")?;
    let c = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;
    let mut n1 = c.acquire("n1", false).await?;
    let t1 = wait_granted(&mut n1, Duration::from_secs(5)).await?;
    // Right after the grant (the tracker may not have seen it yet) ...
    assert_eq!(c.confirm("n1", t1, Step::Drain).await?, None);
    let mut n2 = c.acquire("n2", false).await?;
    wait_reason(&mut n2, "canary", Duration::from_secs(5)).await?;
    // ... and once the tracker has it in maintenance.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let snapshot = c.running.engine.snapshot().await;
        if snapshot
            .queue
            .iter()
            .any(|q| q.reason.contains("n1 is in maintenance"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tracker never saw n1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for step in [Step::Drain, Step::Update, Step::Reboot] {
        assert_eq!(c.confirm("n1", t1, step).await?, None, "{step:?}");
    }
    Ok(())
}
