//! Coordinator.Confirm over gRPC on 127.0.0.1:0: the holder's token is
//! checked, the lease renewed, every guard re-run for the holder, and the
//! answer comes only from the leader.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_coordinator::auth::Unauthenticated;
use baton_coordinator::engine::{Engine, EngineConfig, system_clock};
use baton_coordinator::metrics::Metrics;
use baton_coordinator::policy::{GrantGuard, Policy, Waiter};
use baton_coordinator::service::Services;
use baton_coordinator::state::LeaseState;
use baton_coordinator::store::memory::MemoryStore;
use baton_proto::v1::{
    self as pb, admin_server::AdminServer, coordinator_client::CoordinatorClient,
    coordinator_server::CoordinatorServer,
};
use chrono::{DateTime, Utc};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::{Channel, Server};

/// A guard the test switches; it records the holders it was shown, and
/// what each waiter's request said about control-plane backups.
#[derive(Default)]
struct Switch {
    refuse: Mutex<Option<String>>,
    holders_seen: Mutex<Vec<String>>,
    backs_up_seen: Mutex<BTreeMap<String, bool>>,
}

impl GrantGuard for Switch {
    fn check(&self, waiter: &Waiter, state: &LeaseState, _: DateTime<Utc>) -> Result<(), String> {
        *self.holders_seen.lock().unwrap() =
            state.holders.keys().map(ToString::to_string).collect();
        self.backs_up_seen
            .lock()
            .unwrap()
            .insert(waiter.node.to_string(), waiter.backs_up_control_plane);
        self.refuse.lock().unwrap().clone().map_or(Ok(()), Err)
    }
}

struct Served {
    client: CoordinatorClient<Channel>,
    store: Arc<MemoryStore>,
    guard: Arc<Switch>,
}

async fn serve() -> Served {
    let store = Arc::new(MemoryStore::new(Some(LeaseState::default())));
    let guard = Arc::new(Switch::default());
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            renew_interval: chrono::Duration::seconds(1),
            overdue_after: chrono::Duration::seconds(60),
            ..EngineConfig::new(Policy::default(), "confirm-test")
        },
        vec![guard.clone() as Arc<dyn GrantGuard>],
        Vec::new(),
        system_clock(),
        Metrics::new(),
    )
    .await
    .unwrap();
    tokio::spawn(engine.clone().run_granter());
    let services = Services::new(engine, Arc::new(Unauthenticated));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(CoordinatorServer::new(services.clone()))
            .add_service(AdminServer::new(services))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        client,
        store,
        guard,
    }
}

async fn granted(client: &mut CoordinatorClient<Channel>, node: &str) -> u64 {
    let mut stream = client
        .acquire(pb::AcquireRequest {
            node: node.into(),
            control_plane: true,
            reason: "test".into(),
            manual: false,
            labels: Default::default(),
            backs_up_control_plane: true,
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("granted in time")
            .unwrap()
            .expect("stream open");
        if let Some(pb::acquire_event::Event::Granted(g)) = event.event {
            return g.fencing_token;
        }
    }
}

fn confirm(node: &str, fencing_token: u64, step: pb::Step) -> pb::ConfirmRequest {
    pb::ConfirmRequest {
        node: node.into(),
        fencing_token,
        step: step as i32,
    }
}

#[tokio::test]
async fn confirm_re_runs_the_guards_for_the_holder() {
    let Served {
        mut client, guard, ..
    } = serve().await;
    let token = granted(&mut client, "n1").await;

    let ok = client
        .confirm(confirm("n1", token, pb::Step::Reboot))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.proceed, "{ok:?}");
    assert!(ok.reason.is_empty());
    assert!(ok.overdue_at.is_some());
    // The holder was not counted against itself.
    assert!(guard.holders_seen.lock().unwrap().is_empty());

    *guard.refuse.lock().unwrap() = Some("etcd: member n2 unhealthy (no answer)".into());
    for step in [
        pb::Step::Drain,
        pb::Step::Update,
        pb::Step::Reboot,
        pb::Step::Unspecified,
    ] {
        let wait = client
            .confirm(confirm("n1", token, step))
            .await
            .unwrap()
            .into_inner();
        assert!(!wait.proceed, "{step:?}: {wait:?}");
        assert_eq!(wait.reason, "etcd: member n2 unhealthy (no answer)");
        let retry = wait.retry_after.expect("retry_after set");
        assert!(retry.seconds > 0 || retry.nanos > 0, "{retry:?}");
    }
    *guard.refuse.lock().unwrap() = None;
    assert!(
        client
            .confirm(confirm("n1", token, pb::Step::Reboot))
            .await
            .unwrap()
            .into_inner()
            .proceed
    );

    // A stale token, another node's, and a malformed step.
    for (node, t) in [("n1", token + 1), ("n2", token)] {
        let err = client
            .confirm(confirm(node, t, pb::Step::Reboot))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{node}/{t}: {err}");
    }
    let err = client
        .confirm(pb::ConfirmRequest {
            node: "n1".into(),
            fencing_token: token,
            step: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn only_the_leader_confirms() {
    let Served {
        mut client, store, ..
    } = serve().await;
    let token = granted(&mut client, "n1").await;
    // Another replica leads now, and nobody told this one: its very next
    // answer must not be a "proceed" from memory.
    store.backend().elect_quietly("other");
    let err = client
        .confirm(confirm("n1", token, pb::Step::Reboot))
        .await
        .expect_err("a replica that does not lead must not confirm");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

/// `AcquireRequest.backs_up_control_plane` reaches the grant rule (the
/// etcd guard judges by it) as the client sent it; an older agent leaves
/// it out, which reads as false. An operator's hold needs no backup from
/// an agent and counts as one that makes it.
#[tokio::test]
async fn the_backup_capability_reaches_the_grant_rule_as_sent() {
    let Served {
        mut client, guard, ..
    } = serve().await;
    // Nobody is granted: each waiter stays in the queue and is judged.
    *guard.refuse.lock().unwrap() = Some("held for the test".into());
    let mut streams = Vec::new();
    for (node, backs_up, manual) in [
        ("n1", true, false),
        ("n2", false, false),
        ("n3", false, true),
    ] {
        let request = pb::AcquireRequest {
            node: node.into(),
            control_plane: true,
            reason: "test".into(),
            manual,
            labels: Default::default(),
            backs_up_control_plane: backs_up,
        };
        streams.push(client.acquire(request).await.unwrap().into_inner());
    }
    let expected: BTreeMap<String, bool> = [("n1", true), ("n2", false), ("n3", true)]
        .map(|(n, b)| (n.to_string(), b))
        .into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if *guard.backs_up_seen.lock().unwrap() == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the guard saw {:?}",
            guard.backs_up_seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(streams);
}
