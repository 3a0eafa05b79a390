//! The agent's maintenance flow in Kubernetes mode, end to end inside one
//! process: the real `Agent` loop with `KubeNodeOps` against the fake
//! Kubernetes API, a real coordinator (`baton_coordinator::server::start`,
//! `--insecure`, embedded store) over gRPC, and a stub host OS (no systemd
//! here; it records updates and reboots instead of doing them).
//!
//! Scenarios: a kernel-like update that needs a reboot (cordon, drain,
//! update, reboot: the agent is stopped as the machine goes down and
//! started again on the same state directory with a new boot_id; Ready,
//! uncordon, release); a drain held up by a PodDisruptionBudget past
//! `--drain-timeout` aborts the maintenance (node uncordoned, baton released
//! with the reason, no update, no reboot); a blocking pod keeps the agent
//! from asking for the baton until it is gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use baton_agent::agent::{Action, Agent, Settings};
use baton_agent::coordinator::{BearerToken, GrpcCoordinator};
use baton_agent::host::{HostError, HostOs, Inhibitor, Job, UnitOutcome};
use baton_agent::kubernetes::visibility::{WAITING_ANNOTATION, phase_name};
use baton_agent::kubernetes::{KubeNodeOps, KubernetesArgs};
use baton_agent::phase::Phase;
use baton_agent::state::StateFile;
use baton_coordinator::config::{Cli, Command};
use baton_coordinator::server::{self, Running};
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::fixtures::{node, pdb, pod};
use clap::Parser;
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// A host whose updates succeed and that records reboots instead of doing
/// them. It needs maintenance while updates are pending or a reboot is
/// required; with `kernel` set, the update asks for a reboot (like a
/// kernel package), and a reboot request stops the running agent the way
/// the machine going down would.
#[derive(Clone, Default)]
struct StubHost {
    jobs: Arc<Mutex<Vec<Job>>>,
    reboots: Arc<Mutex<u32>>,
    updates_pending: Arc<Mutex<bool>>,
    reboot_required: Arc<Mutex<bool>>,
    kernel: bool,
    boot_id: Arc<Mutex<String>>,
    /// Cancelled by a reboot request (the machine goes down).
    going_down: Arc<Mutex<Option<CancellationToken>>>,
}

impl StubHost {
    fn new(kernel: bool) -> Self {
        StubHost {
            kernel,
            updates_pending: Arc::new(Mutex::new(true)),
            boot_id: Arc::new(Mutex::new("boot-a".into())),
            ..StubHost::default()
        }
    }

    /// The machine came back: another boot, /run cleared.
    fn booted(&self, boot_id: &str) {
        *self.boot_id.lock().unwrap() = boot_id.into();
        *self.reboot_required.lock().unwrap() = false;
    }
}

impl HostOs for StubHost {
    async fn boot_id(&self) -> Result<String, HostError> {
        Ok(self.boot_id.lock().unwrap().clone())
    }
    async fn maintenance_needed(&self) -> Result<Option<String>, HostError> {
        Ok(if *self.reboot_required.lock().unwrap() {
            Some("/run/reboot-required exists".into())
        } else {
            (*self.updates_pending.lock().unwrap()).then(|| "updates available".into())
        })
    }
    async fn reboot_required(&self) -> Result<bool, HostError> {
        Ok(*self.reboot_required.lock().unwrap())
    }
    async fn run(&self, job: &Job, _timeout: Duration) -> Result<UnitOutcome, HostError> {
        self.jobs.lock().unwrap().push(job.clone());
        *self.updates_pending.lock().unwrap() = false;
        if self.kernel {
            *self.reboot_required.lock().unwrap() = true;
        }
        Ok(UnitOutcome {
            success: true,
            detail: "done".into(),
            output_tail: String::new(),
        })
    }
    async fn stop(&self, _job: &Job) -> Result<(), HostError> {
        // Runs end at once here: nothing is ever left running to stop.
        Ok(())
    }
    async fn reboot_inhibitors(&self) -> Result<Vec<Inhibitor>, HostError> {
        Ok(Vec::new())
    }
    async fn reboot(&self) -> Result<(), HostError> {
        *self.reboots.lock().unwrap() += 1;
        if let Some(down) = self.going_down.lock().unwrap().as_ref() {
            down.cancel();
        }
        Ok(())
    }
}

/// The kubelet of the fake node reports this machine's boot (the agent
/// checks it after maintenance).
fn this_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// A coordinator on 127.0.0.1 with an embedded store; stops when dropped.
struct Coordinator {
    running: Running,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn coordinator() -> Result<Coordinator> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().display().to_string();
    let argv = [
        "baton-coordinator",
        "serve",
        "--insecure",
        "--initialize",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir,
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = server::start(*args, async move {
        let _ = stopped.await;
    })
    .await?;
    Ok(Coordinator {
        running,
        _stop: stop,
        _dir: dir,
    })
}

fn settings() -> Settings {
    Settings {
        update: Some(Action::Command("apt-get -y upgrade".into())),
        update_timeout: Duration::from_secs(60),
        post_check_timeout: Duration::from_secs(60),
        reboot_timeout: Duration::from_secs(60),
        renew_interval: Duration::from_secs(1),
        retry_interval: Duration::from_millis(200),
        // Long enough that the agent does not ask again during the test.
        abort_backoff: Duration::from_secs(3600),
        ..Settings::default()
    }
}

/// A running agent for node n1 and the handles to drive it.
struct RunningAgent {
    host: StubHost,
    tick: watch::Sender<u64>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), baton_agent::agent::AgentError>>,
    _dir: Arc<tempfile::TempDir>,
}

async fn agent(fake: &FakeApi, coordinator: &Coordinator, args: KubernetesArgs) -> RunningAgent {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    start_agent(fake, coordinator, args, StubHost::new(false), dir).await
}

/// An agent process over `host` keeping its state in `dir` (a restarted
/// agent gets the same ones).
async fn start_agent(
    fake: &FakeApi,
    coordinator: &Coordinator,
    args: KubernetesArgs,
    host: StubHost,
    dir: Arc<tempfile::TempDir>,
) -> RunningAgent {
    let url = format!("http://{}", coordinator.running.grpc_addr);
    let grpc = GrpcCoordinator::new(&url, None, BearerToken::none(), "n1", false).unwrap();
    let ops = KubeNodeOps::new(fake.client().await, "n1", args);
    let shutdown = CancellationToken::new();
    *host.going_down.lock().unwrap() = Some(shutdown.clone());
    let mut agent = Agent::new(
        host.clone(),
        grpc,
        ops,
        StateFile::new(dir.path()),
        settings(),
        shutdown.clone(),
    );
    let (tick, wakes) = watch::channel(0);
    let done = tokio::spawn(async move { agent.run(wakes).await });
    RunningAgent {
        host,
        tick,
        shutdown,
        done,
        _dir: dir,
    }
}

impl RunningAgent {
    async fn stop(self) {
        self.shutdown.cancel();
        self.done.await.unwrap().unwrap();
    }
}

/// Waits (bounded, so a broken build fails instead of hanging) until `cond`.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting for: {what}");
}

fn node_obj(fake: &FakeApi) -> Value {
    fake.get("v1/nodes", "", "n1").expect("node exists")
}

fn unschedulable(fake: &FakeApi) -> bool {
    node_obj(fake)["spec"]["unschedulable"]
        .as_bool()
        .unwrap_or(false)
}

fn annotation(fake: &FakeApi, key: &str) -> Option<String> {
    node_obj(fake)["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

fn event_reasons(fake: &FakeApi) -> Vec<String> {
    fake.list("v1/events")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

/// Lists of all pods the fake answered (the blocking-pod check).
fn pod_lists(fake: &FakeApi) -> usize {
    fake.served()
        .iter()
        .filter(|s| s.method == "GET" && s.path == "/api/v1/pods")
        .count()
}

/// The holder's phase and whether n1 was released, from the coordinator.
async fn coordinator_view(coordinator: &Coordinator) -> (Option<String>, bool) {
    let snapshot = coordinator.running.engine.snapshot().await;
    let phase = snapshot
        .state
        .holders
        .values()
        .next()
        .map(|h| format!("{:?}", h.phase));
    let released = snapshot
        .state
        .audit
        .iter()
        .any(|a| a.action == "release" && a.node == "n1");
    (phase, released)
}

#[tokio::test]
async fn an_update_that_needs_a_reboot_drains_reboots_and_gives_the_node_back() -> Result<()> {
    let fake = FakeApi::new();
    fake.put(node("n1").boot_id(&this_boot_id()).build());
    fake.put(pod("apps", "web-1").on("n1").owned_by("ReplicaSet").build());
    let coordinator = coordinator().await?;
    let host = StubHost::new(true);
    let dir = Arc::new(tempfile::tempdir()?);
    let before = start_agent(
        &fake,
        &coordinator,
        KubernetesArgs::default(),
        host.clone(),
        dir.clone(),
    )
    .await;
    // The reboot request stops the agent, as the machine going down would.
    tokio::time::timeout(Duration::from_secs(30), before.done)
        .await
        .expect("the agent asked for a reboot")??;
    assert_eq!(*host.reboots.lock().unwrap(), 1);
    assert_eq!(host.jobs.lock().unwrap().len(), 1, "the update ran");
    assert!(unschedulable(&fake), "cordoned across the reboot");
    assert!(fake.get("v1/pods", "apps", "web-1").is_none(), "drained");
    let (phase, released) = coordinator_view(&coordinator).await;
    assert_eq!(phase.as_deref(), Some("Rebooting"));
    assert!(!released, "not released before the reboot");
    // The machine comes back with another boot_id; systemd starts the
    // agent again on the same state directory.
    host.booted("boot-b");
    let after = start_agent(
        &fake,
        &coordinator,
        KubernetesArgs::default(),
        host.clone(),
        dir,
    )
    .await;
    eventually("the baton released after the reboot", async || {
        coordinator_view(&coordinator).await.1
    })
    .await;
    assert!(!unschedulable(&fake), "uncordoned");
    assert_eq!(*host.reboots.lock().unwrap(), 1, "one reboot");
    assert_eq!(host.jobs.lock().unwrap().len(), 1, "the update ran once");
    eventually("the node shows the agent idle", async || {
        annotation(&fake, "baton.dev/phase").as_deref() == Some(phase_name(Phase::Idle))
    })
    .await;
    after.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_blocked_by_a_budget_past_the_timeout_aborts_and_releases() -> Result<()> {
    let fake = FakeApi::new();
    fake.put(node("n1").boot_id(&this_boot_id()).build());
    fake.put(
        pod("apps", "web-1")
            .on("n1")
            .owned_by("ReplicaSet")
            .label("app", "web")
            .build(),
    );
    fake.put(
        pdb("apps", "web")
            .min_available(1)
            .selecting("app", "web")
            .build(),
    );
    let coordinator = coordinator().await?;
    let args = KubernetesArgs {
        drain_timeout: Duration::from_secs(2),
        ..KubernetesArgs::default()
    };
    let agent = agent(&fake, &coordinator, args).await;
    let engine = coordinator.running.engine.clone();

    eventually("the baton released after the aborted drain", async || {
        engine
            .snapshot()
            .await
            .state
            .audit
            .iter()
            .any(|a| a.action == "release" && a.node == "n1")
    })
    .await;
    // The release is followed by the node showing the agent idle again.
    eventually("the node shows the agent idle", async || {
        annotation(&fake, "baton.dev/phase").as_deref() == Some(phase_name(Phase::Idle))
    })
    .await;
    let snapshot = engine.snapshot().await;
    assert!(
        snapshot.state.holders.is_empty(),
        "no holder after the abort"
    );
    let release = snapshot
        .state
        .audit
        .iter()
        .find(|a| a.action == "release" && a.node == "n1")
        .unwrap();
    assert!(
        release.reason.contains("drain timed out"),
        "the release says why: {release:?}"
    );
    // The node is back in service, not marked as holding, and says why.
    assert!(!unschedulable(&fake), "uncordoned");
    assert!(node_obj(&fake)["metadata"]["labels"]["baton.dev/holding"].is_null());
    let last_error = annotation(&fake, "baton.dev/last-error").unwrap_or_default();
    assert!(last_error.contains("drain timed out"), "{last_error}");
    // Events are written best effort and may trail the annotations.
    for reason in ["BatonGranted", "BatonAborting", "BatonReleased"] {
        eventually(&format!("the {reason} event"), async || {
            event_reasons(&fake).iter().any(|r| r == reason)
        })
        .await;
    }
    // The pod the budget protects still runs; nothing was updated or rebooted.
    assert!(fake.get("v1/pods", "apps", "web-1").is_some());
    assert!(agent.host.jobs.lock().unwrap().is_empty());
    assert_eq!(*agent.host.reboots.lock().unwrap(), 0);
    agent.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_blocking_pod_keeps_the_agent_from_asking_until_it_is_gone() -> Result<()> {
    let fake = FakeApi::new();
    fake.put(node("n1").boot_id(&this_boot_id()).build());
    fake.put(
        pod("ci", "job-1")
            .on("n1")
            .owned_by("Job")
            .label("app", "ci")
            .build(),
    );
    let coordinator = coordinator().await?;
    let args = KubernetesArgs {
        blocking_pod_selectors: vec!["app=ci".into()],
        ..KubernetesArgs::default()
    };
    let agent = agent(&fake, &coordinator, args).await;
    let engine = coordinator.running.engine.clone();

    eventually("the waiting annotation", async || {
        annotation(&fake, WAITING_ANNOTATION).is_some()
    })
    .await;
    let waiting = annotation(&fake, WAITING_ANNOTATION).unwrap();
    assert!(waiting.contains("ci/job-1"), "{waiting}");
    // The Event is written after the annotation, best effort.
    eventually("the BatonBlocked event", async || {
        event_reasons(&fake).iter().any(|r| r == "BatonBlocked")
    })
    .await;
    // Periodic ticks re-check; while the pod runs the agent never asks.
    for n in 1..=3 {
        let before = pod_lists(&fake);
        agent.tick.send(n)?;
        eventually("the blocking pods re-checked", async || {
            pod_lists(&fake) > before
        })
        .await;
        let snapshot = engine.snapshot().await;
        assert!(snapshot.queue.is_empty(), "no request while blocked");
        assert!(snapshot.state.holders.is_empty());
    }
    assert!(
        !engine
            .snapshot()
            .await
            .state
            .audit
            .iter()
            .any(|a| a.action == "grant"),
        "never granted while blocked"
    );

    // The pod finishes: the next tick asks, and the maintenance runs.
    fake.remove("v1/pods", "ci", "job-1");
    agent.tick.send(4)?;
    eventually("the maintenance done and the baton released", async || {
        engine
            .snapshot()
            .await
            .state
            .audit
            .iter()
            .any(|a| a.action == "release" && a.node == "n1")
    })
    .await;
    assert_eq!(annotation(&fake, WAITING_ANNOTATION), None);
    assert_eq!(agent.host.jobs.lock().unwrap().len(), 1, "the update ran");
    // The phase annotation follows the release (Done, then Idle).
    eventually("the phase annotation back to idle", async || {
        annotation(&fake, "baton.dev/phase").as_deref() == Some(phase_name(Phase::Idle))
    })
    .await;
    agent.stop().await;
    Ok(())
}

/// The control-plane backup adds kubeadm's ClusterConfiguration from the
/// kube-system/kubeadm-config ConfigMap; a cluster without it (not kubeadm)
/// adds nothing, which is no error.
#[tokio::test]
async fn the_backup_reads_the_kubeadm_config_map_when_there_is_one() -> Result<()> {
    use baton_agent::node_ops::NodeOps;
    let fake = FakeApi::new();
    let ops = KubeNodeOps::new(fake.client().await, "n1", KubernetesArgs::default());
    assert!(ops.kubeadm_config().await?.is_empty());
    fake.put(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": "kind: ClusterConfiguration\n"},
    }));
    assert_eq!(
        ops.kubeadm_config().await?,
        vec![(
            "ClusterConfiguration".to_string(),
            "kind: ClusterConfiguration\n".to_string()
        )]
    );
    Ok(())
}
