//! The health gate and the alert blockers against a real Prometheus
//! (Debian's package) scraping an exporter this test runs, with alert
//! rules loaded: grants wait, with the reason, while the alert fires or
//! the gate's query returns anything, and go when it clears; with
//! Prometheus gone, grants are held (fail closed). Metrics, status and
//! (in a fake cluster) Events show the alert firing and clearing.

use std::time::Duration;

use anyhow::{Result, bail};
use baton_coordinator::rollout::http::HttpClient;
use baton_coordinator::rollout::prometheus::query;
use baton_tests::coordinator::{InProcess, wait_granted, wait_reason};
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::events::until_event;
use baton_tests::kube_fake::fixtures::node;
use baton_tests::prometheus::{Exporter, Prometheus};

const RULES: &str = r#"groups:
  - name: baton-test
    rules:
      - alert: TestAlarm
        expr: baton_test_alarm > 0
        labels:
          severity: critical
"#;

/// Waits until `promql` returns `want_empty` (Prometheus scraped and evaluated).
async fn until_query(prom: &Prometheus, promql: &str, want_empty: bool) -> Result<()> {
    let http = HttpClient::new();
    for _ in 0..200 {
        if let Ok(series) = query(&http, &prom.url, promql, Duration::from_secs(2)).await
            && series.is_empty() == want_empty
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "`{promql}` never became {}",
        if want_empty { "empty" } else { "non-empty" }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_wait_for_alerts_and_the_gate_query_against_real_prometheus() -> Result<()> {
    let exporter =
        Exporter::start(&[("baton_test_alarm", 1.0), ("baton_test_unhealthy", 0.0)]).await;
    let mut prom = Prometheus::start(exporter.addr, RULES);
    until_query(
        &prom,
        "ALERTS{alertname=\"TestAlarm\",alertstate=\"firing\"}",
        false,
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let policy = format!(
        "prometheus:\n  url: {}\n  interval: 1s\n  timeout: 2s\nalertBlockers:\n  alerts: [TestAlarm]\nhealthGate:\n  nodesReady: false\n  podDisruptionBudgets: false\n  query: baton_test_unhealthy > 0\n",
        prom.url
    );
    // In a (fake) cluster, so the alert blockers' Events are recorded.
    let fake = FakeApi::new();
    for n in ["n1", "n2", "n3"] {
        fake.put(node(n).build());
    }
    let endpoint = fake.serve().await;
    let coord = InProcess::in_cluster(dir.path(), &policy, &endpoint.url).await?;
    let client = endpoint.client();

    // The alert fires: n1 waits, and says why.
    let mut n1 = coord.acquire("n1", false).await?;
    let reason = wait_reason(&mut n1, "TestAlarm firing", Duration::from_secs(20)).await?;
    assert!(reason.starts_with("alert blocker"), "{reason}");
    // ... and the metrics and status say so.
    coord
        .until_metric("baton_alert_blocker_firing{alert=\"TestAlarm\"} 1")
        .await?;
    let metrics = coord
        .until_metric("baton_health_gate_waiting{cause=\"alert_firing\"} 1")
        .await?;
    assert!(metrics.contains("baton_health_gate_open 0"), "{metrics}");
    let status = coord
        .admin()
        .await?
        .status(baton_proto::v1::StatusRequest {})
        .await?
        .into_inner();
    let rollout = status.rollout.expect("the rollout's status");
    assert_eq!(rollout.alerts_firing, ["TestAlarm"]);
    assert_eq!(rollout.gate_cause, "alert_firing");
    let firing = until_event(&client, "Lease", "baton-coordinator", "AlertBlockerFiring").await?;
    assert!(
        firing
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("alert TestAlarm fires")),
        "{firing:?}"
    );
    // Still not granted a few rounds later.
    let early = wait_granted(&mut n1, Duration::from_secs(3)).await;
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.to_string().contains("no grant in time")),
        "granted (or gone) while the alert fires: {early:?}"
    );

    // The alert clears: n1 goes.
    exporter.set("baton_test_alarm", 0.0);
    let t1 = wait_granted(&mut n1, Duration::from_secs(30)).await?;
    coord
        .until_metric("baton_alert_blocker_firing{alert=\"TestAlarm\"} 0")
        .await?;
    until_event(&client, "Lease", "baton-coordinator", "AlertBlockerCleared").await?;

    // The gate's query returns a series: after n1 releases, n2 waits.
    exporter.set("baton_test_unhealthy", 1.0);
    until_query(&prom, "baton_test_unhealthy > 0", false).await?;
    coord.release("n1", t1).await?;
    let mut n2 = coord.acquire("n2", false).await?;
    let reason = wait_reason(&mut n2, "returned 1 series", Duration::from_secs(20)).await?;
    assert!(reason.contains("baton_test_unhealthy"), "{reason}");
    exporter.set("baton_test_unhealthy", 0.0);
    let t2 = wait_granted(&mut n2, Duration::from_secs(30)).await?;

    // Prometheus goes away: nothing is granted, and the reason says why.
    prom.kill();
    coord.release("n2", t2).await?;
    let mut n3 = coord.acquire("n3", false).await?;
    let reason = wait_reason(&mut n3, "fail closed", Duration::from_secs(20)).await?;
    assert!(reason.contains(&prom.url), "{reason}");
    Ok(())
}
