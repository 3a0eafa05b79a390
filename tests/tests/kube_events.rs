//! The coordinator's Kubernetes Events against the fake API server: read
//! back through a real `kube::Client` with a field selector on the
//! involved object, as `kubectl describe` reads them.
//!
//! - a node's grant and a stuck-lock release are Events on its Node (with
//!   the node's name as uid, which `kubectl describe node` looks for), a
//!   webhook that gave an event up one on the Lease;
//! - a refused policy reload is a Warning on the coordinators' Lease with
//!   the file's line, a good one a Normal Event, and both are counted on
//!   `/metrics`;
//! - the health gate records one Event per change of what it waits for,
//!   not one per look, and status shows the gate, its cause and reason;
//! - an Event API that answers 500 or 429, or hangs, never holds a grant
//!   back: the Events are dropped and counted.

use std::time::Duration;

use anyhow::{Result, bail};
use baton_proto::v1::StatusRequest;
use baton_tests::coordinator::{InProcess, wait_granted, wait_reason};
use baton_tests::kube_fake::events::{events_about, until_event};
use baton_tests::kube_fake::fixtures::node;
use baton_tests::kube_fake::{Endpoint, FakeApi};
use k8s_openapi::api::core::v1::Event;

/// A coordinator with the node watch on a fake cluster.
struct Cluster {
    fake: FakeApi,
    endpoint: Endpoint,
    /// A client of the fake, to read Events back.
    client: kube::Client,
    c: InProcess,
    _dir: tempfile::TempDir,
}

/// Starts a coordinator with `policy` on a fake cluster holding Ready
/// `nodes` (and whatever `fake` already holds). Bind `_dir` when taking
/// the result apart: the coordinator's data lives there.
async fn cluster(fake: FakeApi, nodes: &[&str], policy: &str) -> Result<Cluster> {
    for n in nodes {
        fake.put(node(n).build());
    }
    let endpoint = fake.serve().await;
    let client = endpoint.client();
    let dir = tempfile::tempdir()?;
    let c = InProcess::in_cluster(dir.path(), policy, &endpoint.url).await?;
    Ok(Cluster {
        fake,
        endpoint,
        client,
        c,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_stuck_lock_releases_are_events_on_the_node() -> Result<()> {
    let Cluster {
        fake,
        client,
        c,
        _dir,
        ..
    } = cluster(
        FakeApi::new(),
        &["n1", "n2"],
        "stuckLocks:\n  deletedNodeGrace: 1s\nwebhooks:\n  - url: http://127.0.0.1:1/hook\n    maxAttempts: 1\n    timeout: 1s\n",
    )
    .await?;

    let mut n1 = c.acquire("n1", false).await?;
    let t1 = wait_granted(&mut n1, Duration::from_secs(10)).await?;
    let granted = until_event(&client, "Node", "n1", "BatonGranted").await?;
    assert_eq!(granted.type_.as_deref(), Some("Normal"));
    assert!(
        granted
            .message
            .as_deref()
            .is_some_and(|m| m.contains(&format!("token {t1}"))),
        "{granted:?}"
    );
    // As the kubelet's: the uid is the node's name (kubectl describe node).
    assert_eq!(granted.involved_object.uid.as_deref(), Some("n1"));

    let mut n2 = c.acquire("n2", false).await?;
    fake.remove("v1/nodes", "", "n1");
    wait_granted(&mut n2, Duration::from_secs(10)).await?;
    let released = until_event(&client, "Node", "n1", "BatonStuckLockReleased").await?;
    assert_eq!(released.type_.as_deref(), Some("Warning"));
    assert!(
        released
            .message
            .as_deref()
            .is_some_and(|m| m.contains("Node object was deleted")),
        "{released:?}"
    );
    until_event(&client, "Node", "n2", "BatonGranted").await?;

    // The webhook nobody answers gave its events up: a Warning on the Lease
    // naming the hook by position and host.
    let given_up = until_event(&client, "Lease", "baton-coordinator", "WebhookGivenUp").await?;
    assert_eq!(given_up.type_.as_deref(), Some("Warning"));
    assert!(
        given_up.message.as_deref().is_some_and(
            |m| m.starts_with("webhook 1:127.0.0.1:1 gave up on the granted event of node n1")
        ),
        "{given_up:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_is_a_warning_with_the_line_and_a_good_one_a_new_generation() -> Result<()>
{
    let Cluster {
        client, c, _dir, ..
    } = cluster(FakeApi::new(), &["n1"], "maxConcurrent: 1\n").await?;
    let path = _dir.path().join("policy.yaml");

    // Line 3 is wrong: refused, the running policy stays.
    std::fs::write(
        &path,
        "maxConcurrent: 1\npools: []\nfailureBudget: {maxFailedNodes: many}\n",
    )?;
    let refused = until_event(&client, "Lease", "baton-coordinator", "PolicyReloadRefused").await?;
    assert_eq!(refused.type_.as_deref(), Some("Warning"));
    let message = refused.message.unwrap_or_default();
    assert!(message.contains("policy.yaml:3"), "{message}");
    let metrics = c.metrics_text().await;
    assert!(
        metrics.contains("baton_policy_reloads_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("baton_policy_reload_refused 1"),
        "{metrics}"
    );
    let s = c
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    let rollout = s.rollout.expect("the rollout's status");
    assert_eq!(rollout.policy_generation, 1);
    assert!(
        rollout.policy_reload_error.contains("policy.yaml:3"),
        "{rollout:?}"
    );

    // A good file: in force, a Normal Event, generation 2.
    std::fs::write(&path, "maxConcurrent: 2\n")?;
    let reloaded = until_event(&client, "Lease", "baton-coordinator", "PolicyReloaded").await?;
    assert!(
        reloaded
            .message
            .as_deref()
            .is_some_and(|m| m.contains("generation 2")),
        "{reloaded:?}"
    );
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("baton_policy_generation 2"), "{metrics}");
    assert!(
        metrics.contains("baton_policy_reload_refused 0"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_records_one_event_per_change_of_what_it_waits_for() -> Result<()> {
    let fake = FakeApi::new();
    fake.put(node("n4").ready(false).build());
    let Cluster {
        fake,
        client,
        c,
        _dir,
        ..
    } = cluster(
        fake,
        &["n1", "n2", "n3"],
        "maxConcurrent: 3\nhealthGate:\n  interval: 1s\n",
    )
    .await?;

    let mut n1 = c.acquire("n1", false).await?;
    wait_reason(&mut n1, "n4 not Ready", Duration::from_secs(10)).await?;
    let waiting = until_event(&client, "Lease", "baton-coordinator", "HealthGateWaiting").await?;
    assert!(
        waiting
            .message
            .as_deref()
            .is_some_and(|m| m.contains("n4 not Ready")),
        "{waiting:?}"
    );
    // Status shows the gate, its cause and its reason.
    let s = c
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    let rollout = s.rollout.expect("the rollout's status");
    assert!(!rollout.gate_open);
    assert_eq!(rollout.gate_cause, "nodes_not_ready");
    assert!(rollout.gate_reason.contains("n4 not Ready"), "{rollout:?}");
    let metrics = c.metrics_text().await;
    assert!(metrics.contains("baton_health_gate_open 0"), "{metrics}");
    assert!(
        metrics.contains("baton_health_gate_waiting{cause=\"nodes_not_ready\"} 1"),
        "{metrics}"
    );

    // Another node goes down: the sentence changes, what the gate waits
    // for does not; many looks later there is still one such Event.
    fake.put(node("n3").ready(false).build());
    wait_reason(&mut n1, "n3, n4 not Ready", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gate_events: Vec<Event> = events_about(&client, "Lease", "baton-coordinator")
        .await?
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("HealthGateWaiting"))
        .collect();
    assert_eq!(gate_events.len(), 1, "{gate_events:?}");
    assert_eq!(gate_events[0].count, Some(1), "{gate_events:?}");

    // Healthy again: the grant goes, and the gate says it is open.
    fake.put(node("n3").build());
    fake.put(node("n4").build());
    wait_granted(&mut n1, Duration::from_secs(10)).await?;
    until_event(&client, "Lease", "baton-coordinator", "HealthGateOpen").await?;
    Ok(())
}

/// `baton_kube_events_dropped_total{result="api_error"}` now.
async fn dropped(c: &InProcess) -> f64 {
    c.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("baton_kube_events_dropped_total{result=\"api_error\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

/// Waits until more than `before` Events were dropped.
async fn until_dropped_over(c: &InProcess, before: f64) -> Result<f64> {
    for _ in 0..150 {
        let now = dropped(c).await;
        if now > before {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no Event dropped after {before}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_api_that_fails_or_hangs_never_holds_a_grant_back() -> Result<()> {
    let Cluster {
        fake,
        endpoint,
        c,
        _dir,
        ..
    } = cluster(FakeApi::new(), &["n1", "n2", "n3", "n4"], "{}\n").await?;

    // 500, then 429: each grant goes, its Event is dropped and counted.
    let mut count = 0.0;
    for (node, code) in [("n1", 500), ("n2", 429)] {
        endpoint.fail_writes(Some(("events", code)));
        let mut stream = c.acquire(node, false).await?;
        let token = wait_granted(&mut stream, Duration::from_secs(10)).await?;
        c.release(node, token).await?;
        count = until_dropped_over(&c, count).await?;
    }
    // The API hangs: grants still go one after another, while the writer
    // waits out its timeout and drops.
    endpoint.fail_writes(None);
    endpoint.stall_writes(Some("events"));
    for node in ["n3", "n4", "n1"] {
        let mut stream = c.acquire(node, false).await?;
        let token = wait_granted(&mut stream, Duration::from_secs(10)).await?;
        c.release(node, token).await?;
    }
    until_dropped_over(&c, count).await?;
    assert!(
        fake.list("v1/events").is_empty(),
        "no Event got through: {:?}",
        fake.list("v1/events")
    );
    endpoint.stall_writes(None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_soak_and_failure_budget_show_in_status_metrics_and_events() -> Result<()> {
    use baton_proto::v1::{Phase, ReportRequest};
    let Cluster {
        client, c, _dir, ..
    } = cluster(
        FakeApi::new(),
        &["n1", "n2", "n3"],
        "maxConcurrent: 3\ncanary:\n  soak: 3s\nfailureBudget:\n  maxFailedNodes: 1\n",
    )
    .await?;

    // The canary goes, releases, and the others wait out the soak.
    let mut n1 = c.acquire("n1", false).await?;
    let t1 = wait_granted(&mut n1, Duration::from_secs(10)).await?;
    let mut n2 = c.acquire("n2", false).await?;
    wait_reason(&mut n2, "canary", Duration::from_secs(5)).await?;
    c.release("n1", t1).await?;
    let soaking = until_event(&client, "Lease", "baton-coordinator", "CanarySoaking").await?;
    assert!(
        soaking
            .message
            .as_deref()
            .is_some_and(|m| m.contains("pool (no pool): canary n1 released")),
        "{soaking:?}"
    );
    c.until_metric("baton_canary_soaking{pool=\"(no pool)\"} 1")
        .await?;
    let s = c
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    let canary = &s.rollout.expect("the rollout's status").canaries[0];
    assert_eq!(
        (
            canary.pool.as_str(),
            canary.phase.as_str(),
            canary.node.as_str()
        ),
        ("(no pool)", "soaking", "n1")
    );
    assert!(canary.soak_until.is_some());
    let t2 = wait_granted(&mut n2, Duration::from_secs(10)).await?;
    until_event(&client, "Lease", "baton-coordinator", "CanarySoakDone").await?;

    // n2 fails: the budget of one is spent, the rollout pauses itself.
    c.lease()
        .await?
        .report(ReportRequest {
            node: "n2".into(),
            fencing_token: t2,
            phase: Phase::Failed as i32,
            error: "apt failed".into(),
            ..Default::default()
        })
        .await?;
    let failed = until_event(&client, "Node", "n2", "BatonFailed").await?;
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    let paused = until_event(
        &client,
        "Lease",
        "baton-coordinator",
        "RolloutPausedByFailureBudget",
    )
    .await?;
    assert_eq!(paused.type_.as_deref(), Some("Warning"));
    let metrics = c.until_metric("baton_paused_by_failure_budget 1").await?;
    for series in [
        "baton_failure_budget_spent{pool=\"(no pool)\"} 1",
        "baton_failure_budget_remaining 0",
        "baton_failure_budget_max 1",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    let s = c
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    let rollout = s.rollout.expect("the rollout's status");
    assert!(s.paused && rollout.paused_by_failure_budget, "{rollout:?}");
    assert_eq!(
        (rollout.failure_budget_max, rollout.failure_budget_remaining),
        (1, 0)
    );
    assert_eq!(rollout.failures.len(), 1);
    assert_eq!(
        (
            rollout.failures[0].pool.as_str(),
            rollout.failures[0].failed
        ),
        ("(no pool)", 1)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_count_on_one_event_long_messages_are_cut_and_followers_write_nothing() -> Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use baton_coordinator::kube::events::{
        EventRecorder, EventTarget, MESSAGE_BYTES, RolloutEvent, Subject,
    };
    let fake = FakeApi::new();
    let endpoint = fake.serve().await;
    let client = endpoint.client();
    let leads = Arc::new(AtomicBool::new(true));
    let recorder = {
        let leads = leads.clone();
        EventRecorder::start(
            EventTarget {
                client: client.clone(),
                namespace: "baton-system".into(),
                lease_name: "baton-coordinator".into(),
                instance: "c0".into(),
            },
            baton_coordinator::metrics::Metrics::new().rollout,
            Arc::new(move || leads.load(Ordering::SeqCst)),
        )
    };
    let event =
        |message: &str| RolloutEvent::warning(Subject::Node("n1".into()), "BatonFailed", message);
    for _ in 0..3 {
        recorder.record(event("apt failed"));
    }
    // Far over the API's limit: the fake refuses such a message (422), so
    // it arrives only if cut.
    recorder.record(event(&"x".repeat(10 * MESSAGE_BYTES)));
    let mut events = Vec::new();
    for _ in 0..100 {
        events = events_about(&client, "Node", "n1").await?;
        if events.len() == 2 && events.iter().any(|e| e.count == Some(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let repeated = events
        .iter()
        .find(|e| e.message.as_deref() == Some("apt failed"))
        .expect("the repeated Event");
    assert_eq!(repeated.count, Some(3), "{events:?}");
    let long = events
        .iter()
        .find(|e| e.message.as_deref() != Some("apt failed"))
        .expect("the long Event, cut");
    let message = long.message.clone().unwrap_or_default();
    assert!(message.len() <= MESSAGE_BYTES && message.ends_with('…'));

    // A replica that stopped leading writes nothing more.
    leads.store(false, Ordering::SeqCst);
    recorder.record(event("after losing leadership"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(events_about(&client, "Node", "n1").await?.len(), 2);
    Ok(())
}
