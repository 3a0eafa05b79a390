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

impl Replica {
    /// Waits (bounded) until the replica stops on its own; why it stopped.
    async fn stopped(self) -> Result<Result<(), server::ServeError>> {
        Ok(tokio::time::timeout(Duration::from_secs(20), self.running.done).await??)
    }
}

/// A replica; `--initialize` while the fake holds no state ConfigMap (a
/// new installation).
async fn replica(api_url: &str, id: &str, extra: &[&str]) -> Result<Replica> {
    let config = kube::Config::new(api_url.parse()?);
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(kube::Client::try_from(config)?, NS);
    let initialize = configmaps.get_opt("baton-state").await?.is_none();
    start_replica(api_url, id, extra, initialize).await
}

async fn start_replica(
    api_url: &str,
    id: &str,
    extra: &[&str],
    initialize: bool,
) -> Result<Replica> {
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
    // Every replica started before the state exists may carry the flag:
    // the first leader creates it, the others load it.
    if initialize {
        argv.push("--initialize");
    }
    // Short leases unless the test sets its own.
    if !extra.contains(&"--lease-duration") {
        argv.extend_from_slice(&["--lease-duration", "2s", "--lease-renew-deadline", "1400ms"]);
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

/// A cluster with node n1 (its agent's token is "agent-n1"), and replica
/// "coord-a" leading it.
async fn leading_over_n1() -> Result<(FakeApi, baton_tests::kube_fake::Endpoint, Replica)> {
    let fake = cluster(&[node("n1").build()]);
    agent_token(&fake, "agent-n1", "n1");
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &[]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    Ok((fake, endpoint, a))
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
        backs_up_control_plane: true,
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

/// `node` (an agent holding `token`) gives the baton back.
async fn release(r: &Replica, token: &str, node: &str, fencing_token: u64) -> Result<()> {
    CoordinatorClient::new(channel(r, token).await?)
        .release(baton_proto::v1::ReleaseRequest {
            node: node.to_string(),
            fencing_token,
            reason: "done".to_string(),
        })
        .await?;
    Ok(())
}

/// The audit `seen` as (action, node), oldest first.
fn audit_actions(seen: &StatusResponse) -> Vec<(&str, &str)> {
    seen.audit
        .iter()
        .map(|r| (r.action.as_str(), r.node.as_str()))
        .collect()
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
    // The audit is kept beside the state document, not in it, and the next
    // leader reads it back.
    // (written empty, for the previous release's reader: FORMAT_VERSION).
    assert_eq!(stored_state(&fake)["state"]["audit"], serde_json::json!([]));
    let cm = fake
        .get("v1/configmaps", NS, "baton-state")
        .context("state configmap")?;
    let audit: Vec<serde_json::Value> = serde_json::from_str(
        cm["data"]["audit.json"]
            .as_str()
            .context("audit.json key")?,
    )?;
    assert!(
        audit
            .iter()
            .any(|r| r["action"] == "grant" && r["node"] == "n1" && r["fencing_token"] == token),
        "{audit:?}"
    );
    assert!(
        seen.audit
            .iter()
            .any(|r| r.action == "grant" && r.node == "n1" && r.fencing_token == token),
        "{:?}",
        seen.audit
    );
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
    let (fake, _endpoint, a) = leading_over_n1().await?;
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
async fn a_hanging_state_write_is_bounded_and_the_state_re_read() -> Result<()> {
    let fake = cluster(&[node("n1").build()]);
    agent_token(&fake, "agent-n1", "n1");
    let endpoint = fake.serve().await;
    let a = replica(&endpoint.url, "coord-a", &[]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let mut stream = acquire(&a, "agent-n1", "n1", false).await?;
    let token = granted(&mut stream).await?;

    // The API server stops answering writes to the state object (the
    // Lease is still renewed). A save must not hold the engine, and with
    // it every call, for as long as the HTTP client is willing to wait.
    endpoint.stall_writes(Some("configmaps"));
    let stuck = tokio::time::timeout(Duration::from_secs(30), renew(&a, "agent-n1", "n1", token))
        .await
        .context("a renew whose save hangs must be answered, not wait for the API server")?;
    let err = stuck.expect_err("the save did not complete");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("no answer"), "{err}");
    // Whatever it answers (a replica that stepped down may refuse), it
    // answers: nothing waits behind the hanging save any more.
    let _ = tokio::time::timeout(Duration::from_secs(10), status(&a))
        .await
        .context("status must not wait behind a hanging save")?;

    // Answered again: the leader re-reads (the write may have landed) and
    // the holder keeps its token.
    endpoint.stall_writes(None);
    let mut renewed = false;
    for _ in 0..200 {
        if renew(&a, "agent-n1", "n1", token).await.is_ok() {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        renewed,
        "the holder could not renew after the API answered again"
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

/// Reads Queued events until one's reason contains `needle`; a grant first
/// fails the test.
async fn wait_for_reason(stream: &mut Streaming<AcquireEvent>, needle: &str) -> Result<String> {
    loop {
        match next(stream).await? {
            Event::Queued(q) if q.reason.contains(needle) => return Ok(q.reason),
            Event::Queued(_) => continue,
            Event::Granted(g) => anyhow::bail!(
                "granted (token {}) while it must wait for {needle:?}",
                g.fencing_token
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_ready_control_plane_node_holds_back_other_control_plane_nodes() -> Result<()> {
    let fake = cluster(&[
        node("cp-1").control_plane().build(),
        node("cp-2").control_plane().ready(false).build(),
        node("w1").build(),
    ]);
    for n in ["cp-1", "w1"] {
        agent_token(&fake, &format!("agent-{n}"), n);
    }
    let endpoint = fake.serve().await;
    // Room for three: the limit is not what holds cp-1 back.
    let a = replica(&endpoint.url, "coord-a", &["--max-concurrent", "3"]).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let mut cp1 = acquire(&a, "agent-cp-1", "cp-1", false).await?;
    let reason = wait_for_reason(&mut cp1, "control-plane node cp-2 is NotReady").await?;
    assert!(reason.contains("until it is Ready again"), "{reason}");
    // A worker is not held back by it.
    let mut w1 = acquire(&a, "agent-w1", "w1", false).await?;
    granted(&mut w1).await?;
    // cp-2 is back: cp-1 goes.
    fake.put(node("cp-2").control_plane().build());
    granted(&mut cp1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_facts_that_cannot_be_refreshed_expire_and_hold_grants_back() -> Result<()> {
    let fake = cluster(&[node("w1").build()]);
    let endpoint = fake.serve().await;
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().display().to_string();
    // The node watch alone (embedded store, no TokenReview): a partition
    // cuts off only the node facts.
    let argv = [
        "baton-coordinator",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--insecure",
        "--initialize",
        "--data-dir",
        &data_dir,
        "--watch-nodes",
        "--kube-api-url",
        &endpoint.url,
        "--node-facts-max-age",
        "2s",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let (_stop, stopped) = oneshot::channel::<()>();
    let running = server::start(*args, async move {
        let _ = stopped.await;
    })
    .await?;
    let mut client = CoordinatorClient::connect(format!("http://{}", running.grpc_addr)).await?;
    let request = || AcquireRequest {
        node: "w1".to_string(),
        control_plane: false,
        reason: "reboot required".to_string(),
        manual: false,
        labels: Default::default(),
        backs_up_control_plane: true,
    };
    let mut w1 = client.acquire(request()).await?.into_inner();
    let token = granted(&mut w1).await?;
    client
        .release(baton_proto::v1::ReleaseRequest {
            node: "w1".to_string(),
            fencing_token: token,
            reason: "done".to_string(),
        })
        .await?;

    // The API server becomes unreachable: the last list is kept, but only
    // for --node-facts-max-age; then nothing is known and nobody goes.
    endpoint.partition(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut w1 = client.acquire(request()).await?.into_inner();
    let reason = wait_for_reason(&mut w1, "node facts are unknown").await?;
    assert!(reason.contains("(limit 2s)"), "{reason}");
    assert!(
        reason.contains("503") || reason.contains("partitioned"),
        "{reason}"
    );
    endpoint.partition(false);
    granted(&mut w1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_state_configmap_stops_the_coordinator_instead_of_starting_empty() -> Result<()> {
    let (fake, endpoint, a) = leading_over_n1().await?;
    let mut stream = acquire(&a, "agent-n1", "n1", false).await?;
    let token = granted(&mut stream).await?;

    // Someone deletes the state ConfigMap while n1 is under maintenance.
    fake.remove("v1/configmaps", NS, "baton-state")
        .context("the state configmap existed")?;
    // The leader must not carry on from memory, nor start empty: its next
    // write conflicts, its reload finds nothing, and it stops.
    let refused = renew(&a, "agent-n1", "n1", token)
        .await
        .expect_err("no answer from memory the store no longer has");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    let _ = renew(&a, "agent-n1", "n1", token).await;
    let why = a.stopped().await?.expect_err("the coordinator stops");
    let message = why.to_string();
    assert!(
        message.contains("no lease state in configmap baton-system/baton-state"),
        "{message}"
    );
    assert!(message.contains("--initialize"), "{message}");
    assert!(
        fake.get("v1/configmaps", NS, "baton-state").is_none(),
        "nothing was written in its place"
    );

    // A restarted replica (without --initialize) refuses too, once it leads:
    // at start when it wins the Lease at once, or later.
    let why = match start_replica(&endpoint.url, "coord-b", &[], false).await {
        Err(e) => e.to_string(),
        Ok(b) => b
            .stopped()
            .await?
            .expect_err("an empty store is refused")
            .to_string(),
    };
    assert!(why.contains("no lease state"), "{why}");
    Ok(())
}

/// Issue 9, finding 8: whatever agents send, the state ConfigMap stays under
/// the API server's 1 MiB and every call keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worst_case_texts_keep_the_state_configmap_under_one_mebibyte() -> Result<()> {
    use baton_proto::v1::{ReleaseRequest, ReportRequest};
    let (fake, _endpoint, a) = leading_over_n1().await?;
    let mut client = CoordinatorClient::new(channel(&a, "agent-n1").await?);
    // The largest text accepted, made of the character JSON escapes worst
    // ('"' takes 2 bytes encoded).
    let reason = "\"".repeat(1024);
    let error = "\\".repeat(16 * 1024);
    let size = |fake: &FakeApi| {
        fake.get("v1/configmaps", NS, "baton-state")
            .map_or(0, |cm| {
                cm["data"]["state.json"].as_str().map_or(0, str::len)
            })
    };
    // 84 cycles pushed the ConfigMap past 1 MiB before the state had a
    // byte budget (with control characters; with these, 229 cycles).
    for cycle in 0..84 {
        let mut stream = client
            .acquire(AcquireRequest {
                node: "n1".into(),
                reason: reason.clone(),
                ..AcquireRequest::default()
            })
            .await
            .with_context(|| format!("acquire in cycle {cycle}, state {} bytes", size(&fake)))?
            .into_inner();
        let token = granted(&mut stream)
            .await
            .with_context(|| format!("grant in cycle {cycle}, state {} bytes", size(&fake)))?;
        if cycle % 7 == 0 {
            client
                .report(ReportRequest {
                    node: "n1".into(),
                    fencing_token: token,
                    phase: baton_proto::v1::Phase::Failed as i32,
                    message: reason.clone(),
                    error: error.clone(),
                    boot_id: "b".repeat(64),
                })
                .await
                .with_context(|| format!("report in cycle {cycle}, state {} bytes", size(&fake)))?;
        }
        client
            .release(ReleaseRequest {
                node: "n1".into(),
                fencing_token: token,
                reason: reason.clone(),
            })
            .await
            .with_context(|| format!("release in cycle {cycle}, state {} bytes", size(&fake)))?;
    }
    let stored = size(&fake);
    assert!(stored < 1024 * 1024, "{stored} bytes");
    let seen = status(&a).await?;
    assert!(!seen.audit.is_empty());

    // Control characters escape to 6 bytes each in JSON: refused, nothing
    // stored.
    let before = stored_state(&fake);
    for text in ["a\u{1}b", "\u{7f}", "x\u{1b}[31m", "\u{85}"] {
        let err = client
            .acquire(AcquireRequest {
                node: "n1".into(),
                reason: text.to_string(),
                ..AcquireRequest::default()
            })
            .await
            .expect_err("a control character is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{text:?}: {err}");
        assert!(err.message().contains("control character"), "{err}");
    }
    // Newlines and tabs are fine in an error report; bytes count, not
    // characters.
    let mut stream = client
        .acquire(AcquireRequest {
            node: "n1".into(),
            reason: "ok".into(),
            ..AcquireRequest::default()
        })
        .await?
        .into_inner();
    let token = granted(&mut stream).await?;
    let report = |error: String| ReportRequest {
        node: "n1".into(),
        fencing_token: token,
        phase: baton_proto::v1::Phase::Failed as i32,
        error,
        ..ReportRequest::default()
    };
    client.report(report("line 1\n\tline 2".into())).await?;
    let err = client
        .report(report("é".repeat(8 * 1024 + 1)))
        .await
        .expect_err("16385 bytes of UTF-8");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("16386 bytes"), "{err}");
    assert_ne!(stored_state(&fake), before, "the valid calls were stored");
    Ok(())
}

/// The red-team's F2 checked on this store: an upgrade from the previous
/// release, whose document embedded the audit. The ConfigMap store writes
/// the audit it read (the embedded records with it) to `audit.json` with the
/// first save, in the same replace, so a release made just before the
/// upgrade is still seen by the next leader (the health gate reads it).
/// (This store had no such gap; the test keeps it so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_audit_the_previous_release_embedded() -> Result<()> {
    let fake = cluster(&[node("n2").build()]);
    agent_token(&fake, "agent-n2", "n2");
    fake.put(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "baton-state", "namespace": NS},
        "data": {"state.json": baton_tests::previous_release::DOCUMENT},
    }));
    let endpoint = fake.serve().await;
    let a = start_replica(&endpoint.url, "coord-a", &[], false).await?;
    eventually("replica a to lead", || leads(&a)).await;
    // n2, granted before the upgrade, gives the baton back: the first save.
    release(&a, "agent-n2", "n2", 2).await?;
    let Replica { running, _stop } = a;
    drop(_stop);
    running.done.await??;
    let b = start_replica(&endpoint.url, "coord-b", &[], false).await?;
    eventually("replica b to lead", || leads(&b)).await;
    let seen = status(&b).await?;
    let actions = audit_actions(&seen);
    // The previous release's three records first (the first save after
    // the upgrade found n2 overdue: its renewal is from the day before).
    assert_eq!(
        actions[..3],
        [("grant", "n1"), ("release", "n1"), ("grant", "n2")],
        "{actions:?}"
    );
    assert_eq!(actions.last(), Some(&("release", "n2")), "{actions:?}");
    assert_eq!(stored_state(&fake)["state"]["audit"], serde_json::json!([]));
    Ok(())
}

/// A format-1 `state.json` put back (a restored pre-upgrade
/// backup applied over the live ConfigMap, which keeps the keys the backup
/// lacks) beside an `audit.json` the new release wrote: records numbered
/// like the document's own (the previous release numbered 1..len). The
/// leader must show, and keep, the document's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_document_keeps_its_own_records_over_audit_json() -> Result<()> {
    let fake = cluster(&[node("n2").build(), node("n3").build()]);
    agent_token(&fake, "agent-n3", "n3");
    let later = baton_tests::previous_release::later();
    let other_era: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        baton_tests::previous_release::DOCUMENT,
    )?["state"]["audit"]
        .clone();
    let audit_json: Vec<serde_json::Value> = other_era
        .as_array()
        .context("audit")?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r["number"] = serde_json::json!(i + 1);
            r
        })
        .collect();
    fake.put(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "baton-state", "namespace": NS},
        "data": {
            "state.json": later.to_string(),
            "audit.json": serde_json::Value::Array(audit_json).to_string(),
        },
    }));
    let endpoint = fake.serve().await;
    let a = start_replica(&endpoint.url, "coord-a", &[], false).await?;
    eventually("replica a to lead", || leads(&a)).await;
    let seen = status(&a).await?;
    let actions = audit_actions(&seen);
    assert_eq!(
        actions[..3],
        [("grant", "n2"), ("release", "n2"), ("grant", "n3")],
        "{actions:?}"
    );
    // The first save keeps them in audit.json, not a mix.
    release(&a, "agent-n3", "n3", 3).await?;
    let cm = fake
        .get("v1/configmaps", NS, "baton-state")
        .context("state configmap")?;
    let stored: Vec<serde_json::Value> =
        serde_json::from_str(cm["data"]["audit.json"].as_str().context("audit.json")?)?;
    let stored: Vec<(&str, &str)> = stored
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or(""),
                r["node"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        stored[..3],
        [("grant", "n2"), ("release", "n2"), ("grant", "n3")],
        "{stored:?}"
    );
    assert_eq!(stored.last(), Some(&("release", "n3")), "{stored:?}");
    Ok(())
}
