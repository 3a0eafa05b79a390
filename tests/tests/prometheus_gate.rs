//! The health gate and the alert blockers against a real Prometheus
//! (Debian's package) scraping an exporter this test runs, with alert
//! rules loaded: grants wait, with the reason, while the alert fires or
//! the gate's query returns anything, and go when it clears; with
//! Prometheus gone, grants are held (fail closed).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_coordinator::config::{Cli, Command};
use baton_coordinator::rollout::http::HttpClient;
use baton_coordinator::rollout::prometheus::query;
use baton_coordinator::server::{self, Running};
use baton_proto::v1::acquire_event::Event;
use baton_proto::v1::coordinator_client::CoordinatorClient;
use baton_proto::v1::{AcquireEvent, AcquireRequest, ReleaseRequest};
use baton_tests::prometheus::{Exporter, Prometheus};
use clap::Parser;
use tokio::sync::oneshot;
use tonic::Streaming;
use tonic::transport::Channel;

const RULES: &str = r#"groups:
  - name: baton-test
    rules:
      - alert: TestAlarm
        expr: baton_test_alarm > 0
        labels:
          severity: critical
"#;

async fn coordinator(dir: &std::path::Path, policy: &str) -> Result<(Running, oneshot::Sender<()>)> {
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy)?;
    let argv = [
        "baton-coordinator",
        "serve",
        "--insecure",
        "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0",
        &format!("--data-dir={}", dir.join("data").display()),
        &format!("--policy={}", policy_path.display()),
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = server::start(*args, async move {
        let _ = stopped.await;
    })
    .await?;
    Ok((running, stop))
}

async fn client(r: &Running) -> Result<CoordinatorClient<Channel>> {
    Ok(CoordinatorClient::connect(format!("http://{}", r.grpc_addr)).await?)
}

async fn acquire(r: &Running, node: &str) -> Result<Streaming<AcquireEvent>> {
    let request = AcquireRequest {
        node: node.to_string(),
        reason: "test".to_string(),
        ..Default::default()
    };
    Ok(client(r).await?.acquire(request).await?.into_inner())
}

/// Reads Queued events until one's reason contains `needle` (failing on a
/// grant or after `limit`).
async fn wait_reason(stream: &mut Streaming<AcquireEvent>, needle: &str, limit: Duration) -> Result<String> {
    let wait = async {
        loop {
            match stream.message().await?.and_then(|e| e.event) {
                Some(Event::Queued(q)) if q.reason.contains(needle) => return Ok(q.reason),
                Some(Event::Queued(_)) => {}
                Some(Event::Granted(_)) => bail!("granted while waiting for a reason containing {needle:?}"),
                None => bail!("stream ended"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .with_context(|| format!("no reason containing {needle:?} within {limit:?}"))?
}

async fn wait_granted(stream: &mut Streaming<AcquireEvent>, limit: Duration) -> Result<u64> {
    let wait = async {
        loop {
            match stream.message().await?.and_then(|e| e.event) {
                Some(Event::Granted(g)) => return Ok(g.fencing_token),
                Some(Event::Queued(_)) => {}
                None => bail!("stream ended"),
            }
        }
    };
    tokio::time::timeout(limit, wait).await.context("no grant in time")?
}

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
    bail!("`{promql}` never became {}", if want_empty { "empty" } else { "non-empty" })
}

async fn release(r: &Running, node: &str, token: u64) -> Result<()> {
    client(r)
        .await?
        .release(ReleaseRequest {
            node: node.to_string(),
            fencing_token: token,
            reason: "done".to_string(),
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_wait_for_alerts_and_the_gate_query_against_real_prometheus() -> Result<()> {
    let exporter = Exporter::start(&[("baton_test_alarm", 1.0), ("baton_test_unhealthy", 0.0)]).await;
    let mut prom = Prometheus::start(exporter.addr, RULES);
    until_query(&prom, "ALERTS{alertname=\"TestAlarm\",alertstate=\"firing\"}", false).await?;

    let dir = tempfile::tempdir()?;
    let policy = format!(
        "prometheus:\n  url: {}\n  interval: 1s\n  timeout: 2s\nalertBlockers:\n  alerts: [TestAlarm]\nhealthGate:\n  nodesReady: false\n  podDisruptionBudgets: false\n  query: baton_test_unhealthy > 0\n",
        prom.url
    );
    let (coord, _stop) = coordinator(dir.path(), &policy).await?;

    // The alert fires: n1 waits, and says why.
    let mut n1 = acquire(&coord, "n1").await?;
    let reason = wait_reason(&mut n1, "TestAlarm firing", Duration::from_secs(20)).await?;
    assert!(reason.starts_with("alert blocker"), "{reason}");
    // Still not granted a few rounds later.
    let early = wait_granted(&mut n1, Duration::from_secs(3)).await;
    assert!(
        early.as_ref().is_err_and(|e| e.to_string().contains("no grant in time")),
        "granted (or gone) while the alert fires: {early:?}"
    );

    // The alert clears: n1 goes.
    exporter.set("baton_test_alarm", 0.0);
    let t1 = wait_granted(&mut n1, Duration::from_secs(30)).await?;

    // The gate's query returns a series: after n1 releases, n2 waits.
    exporter.set("baton_test_unhealthy", 1.0);
    until_query(&prom, "baton_test_unhealthy > 0", false).await?;
    release(&coord, "n1", t1).await?;
    let mut n2 = acquire(&coord, "n2").await?;
    let reason = wait_reason(&mut n2, "returned 1 series", Duration::from_secs(20)).await?;
    assert!(reason.contains("baton_test_unhealthy"), "{reason}");
    exporter.set("baton_test_unhealthy", 0.0);
    let t2 = wait_granted(&mut n2, Duration::from_secs(30)).await?;

    // Prometheus goes away: nothing is granted, and the reason says why.
    prom.kill();
    release(&coord, "n2", t2).await?;
    let mut n3 = acquire(&coord, "n3").await?;
    let reason = wait_reason(&mut n3, "fail closed", Duration::from_secs(20)).await?;
    assert!(reason.contains(&prom.url), "{reason}");
    Ok(())
}
