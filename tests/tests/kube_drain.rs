//! The agent's Kubernetes node operations against the fake API server:
//! cordon, drain through evictions (PDB 429s waited out, timeouts aborted),
//! uncordon that respects an earlier cordon, Ready after reboot,
//! annotations, the holding label, Events and blocking pods.

use std::time::Duration;

use baton_agent::kubernetes::{
    CordonOutcome, KubeError, KubeNodeOps, KubernetesArgs, NodeAnnotations, Transition,
    UncordonOutcome,
};
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::fixtures::{node, pdb, pod};
use serde_json::Value;

/// Waits (bounded, so a broken build fails instead of hanging) until `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting for: {what}");
}

fn args(drain_timeout: Duration) -> KubernetesArgs {
    KubernetesArgs {
        drain_timeout,
        ..KubernetesArgs::default()
    }
}

async fn ops(fake: &FakeApi, name: &str, args: KubernetesArgs) -> KubeNodeOps {
    KubeNodeOps::new(fake.client().await, name, args)
}

fn node_obj(fake: &FakeApi, name: &str) -> Value {
    fake.get("v1/nodes", "", name).expect("node exists")
}

fn unschedulable(fake: &FakeApi, name: &str) -> bool {
    node_obj(fake, name)["spec"]["unschedulable"]
        .as_bool()
        .unwrap_or(false)
}

fn evictions_of(fake: &FakeApi, pod: &str) -> Vec<u16> {
    fake.served()
        .into_iter()
        .filter(|s| s.path.ends_with(&format!("/pods/{pod}/eviction")))
        .map(|s| s.status)
        .collect()
}

#[tokio::test]
async fn drain_waits_out_a_disruption_budget_then_succeeds() {
    let fake = FakeApi::new();
    fake.put(node("n1").build());
    fake.put(node("n2").build());
    fake.put(
        pod("apps", "web-1")
            .on("n1")
            .owned_by("ReplicaSet")
            .label("app", "web")
            .build(),
    );
    fake.put(pod("apps", "api-1").on("n1").owned_by("ReplicaSet").build());
    fake.put(
        pod("kube-system", "proxy-n1")
            .on("n1")
            .owned_by("DaemonSet")
            .build(),
    );
    fake.put(pod("kube-system", "etcd-n1").on("n1").mirror().build());
    fake.put(
        pod("apps", "web-elsewhere")
            .on("n2")
            .owned_by("ReplicaSet")
            .build(),
    );
    fake.put(
        pdb("apps", "web")
            .min_available(1)
            .selecting("app", "web")
            .build(),
    );
    let ops = ops(&fake, "n1", args(Duration::from_secs(60))).await;

    assert_eq!(ops.cordon().await.unwrap(), CordonOutcome::Cordoned);
    assert!(unschedulable(&fake, "n1"));
    let drain = tokio::spawn({
        let ops = ops.clone();
        async move { ops.drain().await }
    });
    // The budget refuses while web-1 is the only healthy web pod...
    eventually("a 429 for web-1", || {
        evictions_of(&fake, "web-1").contains(&429)
    })
    .await;
    assert!(fake.get("v1/pods", "apps", "web-1").is_some());
    // ...until its replacement is Ready on another node.
    fake.put(
        pod("apps", "web-2")
            .on("n2")
            .owned_by("ReplicaSet")
            .label("app", "web")
            .build(),
    );
    let report = drain
        .await
        .unwrap()
        .expect("drain succeeds once the budget allows");

    assert!(report.budget_refusals >= 1);
    assert_eq!(report.evicted.len(), 2, "{report:?}");
    assert!(fake.get("v1/pods", "apps", "web-1").is_none());
    assert!(fake.get("v1/pods", "apps", "api-1").is_none());
    // DaemonSet and mirror pods are untouched, as are other nodes' pods.
    for (ns, name) in [
        ("kube-system", "proxy-n1"),
        ("kube-system", "etcd-n1"),
        ("apps", "web-elsewhere"),
    ] {
        assert!(
            fake.get("v1/pods", ns, name).is_some(),
            "{ns}/{name} was removed"
        );
        assert!(
            evictions_of(&fake, name).is_empty(),
            "{ns}/{name} was evicted"
        );
    }
    assert_eq!(report.skipped.len(), 2, "{report:?}");

    assert_eq!(ops.uncordon().await.unwrap(), UncordonOutcome::Uncordoned);
    assert!(!unschedulable(&fake, "n1"));
    assert!(node_obj(&fake, "n1")["metadata"]["annotations"]["baton.dev/cordoned"].is_null());
}

#[tokio::test]
async fn drain_that_times_out_aborts_and_uncordons() {
    let fake = FakeApi::new();
    fake.put(node("n1").build());
    fake.put(
        pod("apps", "db-0")
            .on("n1")
            .owned_by("StatefulSet")
            .label("app", "db")
            .build(),
    );
    fake.put(
        pdb("apps", "db")
            .min_available(1)
            .selecting("app", "db")
            .build(),
    );
    let ops = ops(&fake, "n1", args(Duration::from_secs(2))).await;

    ops.cordon().await.unwrap();
    let err = ops
        .drain()
        .await
        .expect_err("the budget never allows the eviction");
    match &err {
        KubeError::DrainTimeout { pending, .. } => {
            assert_eq!(pending.len(), 1);
            assert!(
                pending[0].contains("apps/db-0") && pending[0].contains("PodDisruptionBudget"),
                "{pending:?}"
            );
        }
        other => panic!("expected a drain timeout, got {other}"),
    }
    assert!(evictions_of(&fake, "db-0").iter().all(|s| *s == 429));
    assert_eq!(
        ops.abort(&err.to_string()).await.unwrap(),
        UncordonOutcome::Uncordoned
    );
    assert!(!unschedulable(&fake, "n1"));
    assert!(fake.get("v1/pods", "apps", "db-0").is_some());
    let error = node_obj(&fake, "n1")["metadata"]["annotations"]["baton.dev/last-error"].clone();
    assert!(
        error
            .as_str()
            .is_some_and(|e| e.contains("drain timed out")),
        "{error}"
    );
}

#[tokio::test]
async fn node_cordoned_before_baton_stays_cordoned() {
    let fake = FakeApi::new();
    fake.put(node("n1").unschedulable().build());
    fake.put(pod("apps", "web-1").on("n1").owned_by("ReplicaSet").build());
    let ops = ops(&fake, "n1", args(Duration::from_secs(30))).await;

    assert_eq!(ops.cordon().await.unwrap(), CordonOutcome::AlreadyCordoned);
    // Repeating the step (an agent restart) changes nothing.
    assert_eq!(ops.cordon().await.unwrap(), CordonOutcome::Unchanged);
    ops.drain().await.unwrap();
    assert_eq!(
        ops.abort("operator asked").await.unwrap(),
        UncordonOutcome::LeftCordoned
    );
    assert!(unschedulable(&fake, "n1"));
    // A later uncordon does not touch a node Baton did not cordon.
    assert_eq!(
        ops.uncordon().await.unwrap(),
        UncordonOutcome::NotCordonedByBaton
    );
    assert!(unschedulable(&fake, "n1"));
}

#[tokio::test]
async fn unmanaged_and_emptydir_pods_refuse_the_drain_unless_allowed() {
    let fake = FakeApi::new();
    fake.put(node("n1").build());
    fake.put(pod("apps", "bare").on("n1").build());
    fake.put(
        pod("apps", "cache")
            .on("n1")
            .owned_by("ReplicaSet")
            .empty_dir()
            .build(),
    );
    fake.put(pod("apps", "web").on("n1").owned_by("ReplicaSet").build());
    let refusing = ops(&fake, "n1", args(Duration::from_secs(30))).await;
    match refusing.drain().await {
        Err(KubeError::DrainRefused(pods)) => {
            let all = pods.join("\n");
            assert!(
                all.contains("apps/bare") && all.contains("--evict-unmanaged-pods"),
                "{all}"
            );
            assert!(
                all.contains("apps/cache") && all.contains("--delete-emptydir-data"),
                "{all}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        fake.served().iter().all(|s| !s.path.ends_with("/eviction")),
        "nothing may be evicted"
    );

    let allowing = ops(
        &fake,
        "n1",
        KubernetesArgs {
            evict_unmanaged_pods: true,
            delete_emptydir_data: true,
            drain_pod_selector: None,
            ..args(Duration::from_secs(30))
        },
    )
    .await;
    let report = allowing.drain().await.unwrap();
    assert_eq!(report.evicted.len(), 3, "{report:?}");
}

#[tokio::test]
async fn drain_pod_selector_limits_the_evictions() {
    let fake = FakeApi::new();
    fake.put(node("n1").build());
    fake.put(
        pod("apps", "web")
            .on("n1")
            .owned_by("ReplicaSet")
            .label("drain", "yes")
            .build(),
    );
    fake.put(pod("apps", "keep").on("n1").owned_by("ReplicaSet").build());
    let ops = ops(
        &fake,
        "n1",
        KubernetesArgs {
            drain_pod_selector: Some("drain=yes".to_string()),
            ..args(Duration::from_secs(30))
        },
    )
    .await;
    ops.drain().await.unwrap();
    assert!(fake.get("v1/pods", "apps", "web").is_none());
    assert!(fake.get("v1/pods", "apps", "keep").is_some());
}

#[tokio::test]
async fn wait_ready_needs_the_new_boot_and_times_out_otherwise() {
    let fake = FakeApi::new();
    fake.put(node("n1").ready(false).boot_id("boot-1").build());
    let ops = ops(&fake, "n1", KubernetesArgs::default()).await;

    let err = ops
        .wait_ready(Some("boot-2"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::NotReady { .. }), "{err}");
    // Ready but still the old boot: not yet.
    fake.put(node("n1").ready(true).boot_id("boot-1").build());
    let waiting = tokio::spawn({
        let ops = ops.clone();
        async move {
            ops.wait_ready(Some("boot-2"), Duration::from_secs(60))
                .await
        }
    });
    eventually("the watch to start", || {
        fake.served()
            .iter()
            .any(|s| s.path == "/api/v1/nodes" && s.status == 200)
    })
    .await;
    assert!(!waiting.is_finished());
    fake.put(node("n1").ready(true).boot_id("boot-2").build());
    waiting.await.unwrap().expect("ready after the new boot");
}

#[tokio::test]
async fn annotations_label_events_and_blocking_pods_are_visible() {
    let fake = FakeApi::new();
    fake.put(node("n1").build());
    fake.put(
        pod("backup", "nightly")
            .on("n1")
            .owned_by("Job")
            .label("baton.dev/blocks", "true")
            .build(),
    );
    let ops = ops(
        &fake,
        "n1",
        KubernetesArgs {
            blocking_pod_selectors: vec!["baton.dev/blocks=true".to_string()],
            ..KubernetesArgs::default()
        },
    )
    .await;

    ops.annotate(&NodeAnnotations {
        phase: Some("Draining".to_string()),
        fencing_token: Some(7),
        ..NodeAnnotations::default()
    })
    .await
    .unwrap();
    ops.set_holding(true).await.unwrap();
    let n = node_obj(&fake, "n1");
    assert_eq!(n["metadata"]["annotations"]["baton.dev/phase"], "Draining");
    assert_eq!(n["metadata"]["annotations"]["baton.dev/fencing-token"], "7");
    assert_eq!(n["metadata"]["labels"]["baton.dev/holding"], "true");
    ops.set_holding(false).await.unwrap();
    assert!(node_obj(&fake, "n1")["metadata"]["labels"]["baton.dev/holding"].is_null());

    ops.record_event(&Transition::warning(
        "BatonDrainTimedOut",
        "drain timed out",
    ))
    .await
    .unwrap();
    let events = fake.list("v1/events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["involvedObject"]["kind"], "Node");
    assert_eq!(events[0]["involvedObject"]["name"], "n1");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["metadata"]["namespace"], "default");

    let blocking = ops.blocking_pods().await.unwrap();
    assert_eq!(blocking.len(), 1);
    assert!(blocking[0].starts_with("backup/nightly"), "{blocking:?}");
    let mut done = fake.get("v1/pods", "backup", "nightly").unwrap();
    done["status"]["phase"] = "Succeeded".into();
    fake.put(done);
    assert!(ops.blocking_pods().await.unwrap().is_empty());
}

#[tokio::test]
async fn node_ops_prepare_finish_and_a_drain_timeout_gives_the_node_back() {
    use baton_agent::node_ops::{NodeOps, NodeOpsError};

    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let fake = FakeApi::new();
    fake.put(node("n1").boot_id(boot_id.trim()).build());
    fake.put(node("n2").build());
    fake.put(pod("apps", "web-1").on("n1").owned_by("ReplicaSet").build());
    let ops = ops(&fake, "n1", args(Duration::from_secs(30))).await;

    ops.prepare().await.unwrap();
    let n = node_obj(&fake, "n1");
    assert_eq!(n["spec"]["unschedulable"], true);
    assert_eq!(n["metadata"]["labels"]["baton.dev/holding"], "true");
    assert_eq!(n["metadata"]["annotations"]["baton.dev/phase"], "Drained");
    assert!(fake.get("v1/pods", "apps", "web-1").is_none());
    ops.wait_ready_after_boot().await.unwrap();
    ops.finish().await.unwrap();
    let n = node_obj(&fake, "n1");
    assert!(n["spec"]["unschedulable"] != true);
    assert!(n["metadata"]["labels"]["baton.dev/holding"].is_null());
    assert_eq!(n["metadata"]["annotations"]["baton.dev/phase"], "Done");
    assert!(n["metadata"]["annotations"]["baton.dev/last-maintenance"].is_string());
    let reasons: Vec<String> = fake
        .list("v1/events")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect();
    for reason in [
        "BatonDraining",
        "BatonDrained",
        "BatonNodeReady",
        "BatonMaintenanceDone",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }

    // n2: a budget that never allows the eviction.
    fake.put(
        pod("apps", "db-0")
            .on("n2")
            .owned_by("StatefulSet")
            .label("app", "db")
            .build(),
    );
    fake.put(
        pdb("apps", "db")
            .min_available(1)
            .selecting("app", "db")
            .build(),
    );
    let n2 = KubeNodeOps::new(fake.client().await, "n2", args(Duration::from_secs(1)));
    match n2.prepare().await {
        Err(NodeOpsError::Kubernetes(KubeError::DrainTimeout { .. })) => {}
        other => panic!("expected a drain timeout, got {other:?}"),
    }
    assert!(!unschedulable(&fake, "n2"), "the node is given back");
    let aborted = fake.list("v1/events").into_iter().any(|e| {
        e["reason"] == "BatonMaintenanceAborted"
            && e["involvedObject"]["name"] == "n2"
            && e["type"] == "Warning"
    });
    assert!(aborted);
}

/// Finding 7: an API server that answers 503 for a while (a partition, an
/// overloaded server) is waited out instead of failing the maintenance on
/// the first error: cordon, drain, uncordon and readiness all go through
/// once it answers again.
#[tokio::test]
async fn transient_api_errors_are_retried_not_fatal() {
    let fake = FakeApi::new();
    fake.put(node("n1").ready(true).boot_id("boot-2").build());
    fake.put(pod("apps", "web-1").on("n1").owned_by("ReplicaSet").build());
    let endpoint = fake.serve().await;
    let ops = KubeNodeOps::new(endpoint.client(), "n1", args(Duration::from_secs(60)));
    for step in ["cordon", "drain", "uncordon", "ready"] {
        let answered = fake.served().len();
        endpoint.partition(true);
        let run = tokio::spawn({
            let ops = ops.clone();
            async move {
                match step {
                    "cordon" => ops.cordon().await.map(|_| ()),
                    "drain" => ops.drain().await.map(|_| ()),
                    "uncordon" => ops.uncordon().await.map(|_| ()),
                    _ => {
                        ops.wait_ready(Some("boot-2"), Duration::from_secs(60))
                            .await
                    }
                }
            }
        });
        eventually(&format!("{step}: a 503 answered"), || {
            fake.served()[answered..].iter().any(|s| s.status == 503)
        })
        .await;
        assert!(!run.is_finished(), "{step} gave up on the first error");
        endpoint.partition(false);
        run.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{step} failed: {e}"));
    }
    assert!(!unschedulable(&fake, "n1"));
    assert!(fake.get("v1/pods", "apps", "web-1").is_none(), "evicted");
}
