//! The coordinator in a (fake) cluster: `--store kubernetes` with Lease
//! election and failover, compare-and-swap on the state object, TokenReview
//! authentication bound to the agent's node, and the node watch (NotReady
//! nodes hold the rollout, control-plane nodes go one at a time).

use std::time::Duration;

use anyhow::{Context, Result};
use baton_coordinator::config::{Cli, Command};
use baton_coordinator::server::{self, Running};
use baton_proto::v1::acquire_event::Event;
use baton_proto::v1::admin_client::AdminClient;
use baton_proto::v1::coordinator_client::CoordinatorClient;
use baton_proto::v1::{AcquireEvent, AcquireRequest, RenewRequest, StatusRequest, StatusResponse};
use baton_tests::kube_fake::fixtures::{node, pod};
use baton_tests::kube_fake::{FakeApi, FakeToken};
use clap::Parser;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const NS: &str = "baton-system";
const AGENT_SA: &str = "system:serviceaccount:baton-system:baton-agent";

/// A coordinator replica and the way to stop it.
struct Replica {
    running: Running,
    _stop: oneshot::Sender<()>,
}

async fn replica(api_url: &str, id: &str, extra: &[&str]) -> Result<Replica> {
    let mut argv = vec![
        "baton-coordinator",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--store",
        "kubernetes",
        "--id",
        id,
        "--kube-api-url",
        api_url,
        "--kube-namespace",
        NS,
        "--token-review",
        "--kube-admin",
        "ops",
        "--lease-retry-period",
        "250ms",
    ];
    // Short leases unless the test sets its own.
    if !extra.contains(&"--lease-duration") {
        argv.extend_from_slice(&["--lease-duration", "2s", "--lease-renew-deadline", "1500ms"]);
    }
    argv.extend_from_slice(extra);
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = server::start(*args, async move {
        let _ = stopped.await;
    })
    .await?;
    Ok(Replica {
        running,
        _stop: stop,
    })
}

/// Waits (bounded, so a broken build fails instead of hanging) until `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up waiting for: {what}");
}

fn leads(r: &Replica) -> bool {
    r.running.engine.leadership().is_leader
}

fn agent_token(fake: &FakeApi, token: &str, node: &str) {
    fake.issue_token(
        token,
        FakeToken {
            username: AGENT_SA.to_string(),
            audiences: vec!["baton".to_string()],
            extra: [
                (
                    "authentication.kubernetes.io/node-name".to_string(),
                    vec![node.to_string()],
                ),
                (
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec![format!("baton-agent-{node}")],
                ),
            ]
            .into(),
            ..FakeToken::default()
        },
    );
}

fn cluster(nodes: &[serde_json::Value]) -> FakeApi {
    let fake = FakeApi::new();
    for n in nodes {
        fake.put(n.clone());
    }
    fake.issue_token(
        "ops-token",
        FakeToken {
            username: "ops".to_string(),
            audiences: vec!["baton".to_string()],
            ..FakeToken::default()
        },
    );
    fake
}

/// Adds the bearer token to every request.
type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Authed = InterceptedService<Channel, AddToken>;

async fn channel(r: &Replica, token: &str) -> Result<Authed> {
    let channel = Channel::from_shared(format!("http://{}", r.running.grpc_addr))?
        .connect()
        .await?;
    let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
    let add: AddToken = Box::new(move |mut req: Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    });
    Ok(InterceptedService::new(channel, add))
}

async fn acquire(
    r: &Replica,
    token: &str,
    node: &str,
    control_plane: bool,
) -> Result<Streaming<AcquireEvent>, Status> {
    let mut client = CoordinatorClient::new(
        channel(r, token)
            .await
            .map_err(|e| Status::internal(e.to_string()))?,
    );
    let request = AcquireRequest {
        node: node.to_string(),
        control_plane,
        reason: "reboot required".to_string(),
        manual: false,
        labels: Default::default(),
    };
    Ok(client.acquire(request).await?.into_inner())
}

/// The next event of an Acquire stream.
async fn next(stream: &mut Streaming<AcquireEvent>) -> Result<Event> {
    stream
        .message()
        .await?
        .and_then(|e| e.event)
        .context("acquire stream ended")
}

async fn granted(stream: &mut Streaming<AcquireEvent>) -> Result<u64> {
    loop {
        if let Event::Granted(g) = next(stream).await? {
            return Ok(g.fencing_token);
        }
    }
}

async fn status(r: &Replica) -> Result<StatusResponse> {
    let mut admin = AdminClient::new(channel(r, "ops-token").await?);
    Ok(admin.status(StatusRequest {}).await?.into_inner())
}

async fn renew(r: &Replica, token: &str, node: &str, fencing_token: u64) -> Result<(), Status> {
    let mut client = CoordinatorClient::new(
        channel(r, token)
            .await
            .map_err(|e| Status::internal(e.to_string()))?,
    );
    client
        .renew(RenewRequest {
            node: node.to_string(),
            fencing_token,
        })
        .await
        .map(|_| ())
}

fn stored_state(fake: &FakeApi) -> serde_json::Value {
    let cm = fake
        .get("v1/configmaps", NS, "baton-state")
        .expect("state configmap exists");
    serde_json::from_str(cm["data"]["state.json"].as_str().expect("state.json key"))
        .expect("state json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_lease_lost_the_other_replica_takes_over_with_state_intact() -> Result<()> {
    let fake = cluster(&[node("n1").build(), node("n2").build()]);
    agent_token(&fake, "agent-n1", "n1");
    let (to_a, to_b) = (fake.serve().await, fake.serve().await);
    let a = replica(&to_a.url, "coord-a", &[]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let b = replica(&to_b.url, "coord-b", &[]).await?;

    let mut stream = acquire(&a, "agent-n1", "n1", false).await?;
    let token = granted(&mut stream).await?;
    assert!(!leads(&b), "only one replica leads");

    // Replica a loses the API server: it cannot renew, steps down, and b
    // takes the Lease over once it expired.
    to_a.partition(true);
    eventually("replica a to step down", || !leads(&a)).await;
    eventually("replica b to lead", || leads(&b)).await;
    let lease = fake
        .get("coordination.k8s.io/v1/leases", NS, "baton-coordinator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "coord-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    let seen = status(&b).await?;
    assert_eq!(seen.holders.len(), 1);
    assert_eq!(seen.holders[0].node, "n1");
    assert_eq!(seen.holders[0].fencing_token, token);
    assert_eq!(seen.last_fencing_token, token);
    renew(&b, "agent-n1", "n1", token).await?;
    // The deposed replica refuses agents instead of answering from stale state.
    let refused = renew(&a, "agent-n1", "n1", token)
        .await
        .expect_err("a no longer leads");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_hands_over_while_its_own_node_holds_the_baton() -> Result<()> {
    let fake = cluster(&[node("n1").build(), node("n2").build()]);
    agent_token(&fake, "agent-n1", "n1");
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &["--node-name", "n1"]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let b = replica(&endpoint.url, "coord-b", &["--node-name", "n2"]).await?;

    // Granting n1 makes the replica on n1 step aside, so n1 can be drained
    // (only the leader is Ready, and the budget protects Ready pods).
    let mut stream = acquire(&a, "agent-n1", "n1", false).await?;
    let token = granted(&mut stream).await?;
    eventually("replica b to lead", || leads(&b)).await;
    assert!(!leads(&a));
    let seen = status(&b).await?;
    assert_eq!(seen.holders.len(), 1);
    assert_eq!(seen.holders[0].fencing_token, token);
    renew(&b, "agent-n1", "n1", token).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_hands_the_lease_over() -> Result<()> {
    let fake = cluster(&[node("n1").build()]);
    let endpoint = fake.serve().await;
    // A long lease: without the release, b could not lead within this test.
    let slow = ["--lease-duration", "300s", "--lease-renew-deadline", "200s"];
    let a = replica(&endpoint.url, "coord-a", &slow).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let b = replica(&endpoint.url, "coord-b", &slow).await?;

    let Replica {
        running,
        _stop: stop,
    } = a;
    drop(stop);
    running.done.await??;
    let lease = fake
        .get("coordination.k8s.io/v1/leases", NS, "baton-coordinator")
        .context("lease")?;
    assert_ne!(lease["spec"]["holderIdentity"], "coord-a", "{lease}");
    eventually("replica b to lead", || leads(&b)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_write_is_re_read_never_overwritten() -> Result<()> {
    let fake = cluster(&[node("n1").build()]);
    agent_token(&fake, "agent-n1", "n1");
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &[]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let mut stream = acquire(&a, "agent-n1", "n1", false).await?;
    let token = granted(&mut stream).await?;

    // Another writer releases n1 behind the leader's back.
    let mut cm = fake
        .get("v1/configmaps", NS, "baton-state")
        .expect("state configmap");
    let mut state = stored_state(&fake);
    state["state"]["holders"] = serde_json::json!({});
    cm["data"]["state.json"] = serde_json::Value::String(state.to_string());
    fake.put(cm);

    // The leader's next write conflicts; it re-reads instead of overwriting.
    let first = renew(&a, "agent-n1", "n1", token)
        .await
        .expect_err("the save conflicts");
    assert_eq!(first.code(), Code::Unavailable, "{first}");
    eventually("the leader to re-read and lead again", || leads(&a)).await;
    let mut last = None;
    for _ in 0..100 {
        match renew(&a, "agent-n1", "n1", token).await {
            Err(e) if e.code() == Code::FailedPrecondition => {
                last = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let last = last.context("renew was never refused as from a non-holder")?;
    assert!(last.message().contains("n1"), "{last}");
    assert_eq!(
        stored_state(&fake)["state"]["holders"],
        serde_json::json!({})
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_and_cross_node_tokens_are_refused() -> Result<()> {
    let fake = cluster(&[node("n1").build(), node("n2").build()]);
    agent_token(&fake, "agent-n1", "n1");
    fake.issue_token(
        "web-token",
        FakeToken {
            username: "system:serviceaccount:default:web".to_string(),
            audiences: vec!["baton".to_string()],
            extra: [(
                "authentication.kubernetes.io/node-name".to_string(),
                vec!["n1".to_string()],
            )]
            .into(),
            ..FakeToken::default()
        },
    );
    fake.issue_token(
        "apiserver-audience",
        FakeToken {
            username: AGENT_SA.to_string(),
            audiences: vec!["https://kubernetes.default.svc".to_string()],
            ..FakeToken::default()
        },
    );
    // An older token with no node claim: the coordinator looks its pod up.
    let agent_pod = fake.put(
        pod(NS, "baton-agent-x2")
            .on("n2")
            .owned_by("DaemonSet")
            .build(),
    );
    fake.issue_token(
        "agent-pod-only",
        FakeToken {
            username: AGENT_SA.to_string(),
            audiences: vec!["baton".to_string()],
            extra: [
                (
                    "authentication.kubernetes.io/pod-name".to_string(),
                    vec!["baton-agent-x2".to_string()],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_string(),
                    vec![
                        agent_pod["metadata"]["uid"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ],
                ),
            ]
            .into(),
            ..FakeToken::default()
        },
    );
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &[]).await?;
    eventually("replica a to lead", || leads(&a)).await;

    let code = |r: Result<Streaming<AcquireEvent>, Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(acquire(&a, "forged", "n1", false).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(acquire(&a, "apiserver-audience", "n1", false).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(acquire(&a, "web-token", "n1", false).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(acquire(&a, "agent-n1", "n2", false).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(acquire(&a, "agent-pod-only", "n1", false).await),
        Some(Code::PermissionDenied)
    );
    let mut own = acquire(&a, "agent-pod-only", "n2", false).await?;
    granted(&mut own).await?;
    // An accepted token is reviewed once, not on every call.
    let reviews = || {
        fake.served()
            .iter()
            .filter(|s| s.path.ends_with("/tokenreviews"))
            .count()
    };
    let before = reviews();
    status(&a).await?;
    status(&a).await?;
    assert_eq!(reviews(), before + 1);
    // No bearer token at all.
    let mut bare = CoordinatorClient::connect(format!("http://{}", a.running.grpc_addr)).await?;
    let err = bare
        .renew(RenewRequest {
            node: "n1".to_string(),
            fencing_token: 1,
        })
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_node_holds_the_rollout_and_control_plane_goes_one_at_a_time() -> Result<()> {
    let fake = cluster(&[
        node("w1").build(),
        node("w2").ready(false).build(),
        node("cp-1").control_plane().build(),
        node("cp-2").control_plane().build(),
    ]);
    for n in ["w1", "cp-1", "cp-2"] {
        agent_token(&fake, &format!("agent-{n}"), n);
    }
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &["--max-concurrent", "2"]).await?;
    eventually("replica a to lead", || leads(&a)).await;

    // cp-1 is granted (its agent does not even claim to be control-plane;
    // the node label says so).
    let mut cp1 = acquire(&a, "agent-cp-1", "cp-1", false).await?;
    granted(&mut cp1).await?;
    // With cp-1 holding and w2 NotReady, the limit of 2 is used up.
    let mut w1 = acquire(&a, "agent-w1", "w1", false).await?;
    let reason = loop {
        match next(&mut w1).await? {
            Event::Queued(q) if q.reason.contains("unavailable") => break q.reason,
            Event::Queued(_) => continue,
            Event::Granted(_) => anyhow::bail!("w1 granted while w2 is NotReady"),
        }
    };
    assert!(reason.contains("w2 is unavailable"), "{reason}");

    // w2 comes back: w1 goes.
    fake.put(node("w2").build());
    granted(&mut w1).await?;

    // The limit allows another holder after w1 releases, but not a second
    // control-plane node.
    let mut cp2 = acquire(&a, "agent-cp-2", "cp-2", false).await?;
    let mut client = CoordinatorClient::new(channel(&a, "agent-w1").await?);
    let w1_token = status(&a)
        .await?
        .holders
        .iter()
        .find(|h| h.node == "w1")
        .map(|h| h.fencing_token)
        .context("w1 holds")?;
    client
        .release(baton_proto::v1::ReleaseRequest {
            node: "w1".to_string(),
            fencing_token: w1_token,
            reason: "done".to_string(),
        })
        .await?;
    let reason = loop {
        match next(&mut cp2).await? {
            Event::Queued(q) if q.reason.contains("control-plane") => break q.reason,
            Event::Queued(_) => continue,
            Event::Granted(_) => anyhow::bail!("a second control-plane node was granted"),
        }
    };
    assert!(reason.contains("cp-1"), "{reason}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_notready_nodes_lets_the_rollout_go_on() -> Result<()> {
    let fake = cluster(&[node("w1").build(), node("w2").ready(false).build()]);
    agent_token(&fake, "agent-w1", "w1");
    agent_token(&fake, "agent-ghost", "ghost");
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &["--ignore-notready-nodes"]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    // A node the cluster does not know waits, whatever its token says.
    let mut ghost = acquire(&a, "agent-ghost", "ghost", false).await?;
    loop {
        match next(&mut ghost).await? {
            Event::Queued(q) if q.reason.contains("not a Node") => break,
            // Before the first node list every node waits.
            Event::Queued(q) if q.reason.contains("has not been read") => continue,
            Event::Queued(q) => anyhow::bail!("unexpected reason: {}", q.reason),
            Event::Granted(_) => anyhow::bail!("a node unknown to the cluster was granted"),
        }
    }
    drop(ghost);
    let mut w1 = acquire(&a, "agent-w1", "w1", false).await?;
    granted(&mut w1).await?;
    Ok(())
}
