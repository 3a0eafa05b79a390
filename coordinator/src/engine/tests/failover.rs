//! Issue 9, findings 1 and 2: two replicas over one strict store. A replica
//! that was deposed without noticing never answers from its stale memory,
//! and one that leads again never overwrites what the other leader did.

use tokio::sync::Notify;

use super::*;
use crate::store::memory::MemoryBackend;

fn code(e: EngineError) -> tonic::Code {
    tonic::Status::from(e).code()
}

/// Two replicas "a" and "b" over an initialized backend; "a" leads.
async fn pair(
    a_preparers: Vec<Arc<dyn GrantPreparer>>,
) -> (Arc<MemoryBackend>, Arc<Engine>, Arc<Engine>) {
    let backend = MemoryBackend::new();
    backend.put(&LeaseState::default());
    let a_store = Arc::new(backend.replica("a"));
    let b_store = Arc::new(backend.replica("b"));
    backend.elect("a");
    let (a, _) = engine_with_store(a_store, 1, a_preparers).await;
    let (b, _) = engine_with_store(b_store, 1, Vec::new()).await;
    (backend, a, b)
}

#[tokio::test]
async fn a_deposed_replica_never_answers_from_stale_memory() {
    let (backend, a, b) = pair(Vec::new()).await;
    let (_, mut w1) = a.acquire(request("w1")).await.unwrap();
    let t1 = next_grant(&mut w1).await.fencing_token;

    // a freezes past its lease; b leads. a has not noticed.
    backend.elect_quietly("b");
    backend.publish("b");
    // On b an operator force-releases w1 (its node died) and w2 is granted.
    assert_eq!(
        b.force_release(&n("w1"), Some(t1), "op", "dead")
            .await
            .unwrap(),
        t1
    );
    let (_, mut w2) = b.acquire(request("w2")).await.unwrap();
    let t2 = next_grant(&mut w2).await.fencing_token;

    // a wakes up believing it leads and that w1 holds t1. Whatever it is
    // asked, it must not answer from that memory: the dangerous one is an
    // "ok" to w1's renewal, after which w1 would reboot while w2 is down.
    let unavailable = tonic::Code::Unavailable;
    assert_eq!(code(a.renew(&n("w1"), t1).await.unwrap_err()), unavailable);
    let progress = Progress {
        phase: Phase::Rebooting,
        ..Progress::default()
    };
    let report = a.report(&n("w1"), t1, progress).await.unwrap_err();
    assert_eq!(code(report), unavailable);
    let release = a.release(&n("w1"), t1, "w1", "done").await.unwrap_err();
    assert_eq!(code(release), unavailable);
    // Refusals from stale memory are answers too.
    assert_eq!(code(a.renew(&n("w2"), t2).await.unwrap_err()), unavailable);
    let forced = a
        .force_release(&n("w2"), None, "op", "x")
        .await
        .unwrap_err();
    assert_eq!(code(forced), unavailable);
    assert_eq!(code(a.pause("op", "x").await.unwrap_err()), unavailable);
    assert_eq!(code(a.resume("op").await.unwrap_err()), unavailable);
    // Reads and resumed grants too.
    assert_eq!(code(a.confirmed_snapshot().await.unwrap_err()), unavailable);
    assert_eq!(
        code(a.acquire(request("w1")).await.unwrap_err()),
        unavailable
    );

    // Nothing a did reached the store, and b answers from the truth.
    let stored = backend.stored().unwrap();
    assert_eq!(stored.holders.keys().collect::<Vec<_>>(), vec![&n("w2")]);
    assert_eq!(stored.last_token, t2);
    b.renew(&n("w2"), t2).await.unwrap();
    let refused = b.renew(&n("w1"), t1).await.unwrap_err();
    assert_eq!(code(refused), tonic::Code::FailedPrecondition);

    // Once a hears it lost, it names the leader.
    backend.publish("a");
    let err = a.renew(&n("w2"), t2).await.unwrap_err();
    assert!(err.to_string().contains("the leader is b"), "{err}");
}

/// A preparer that waits until the test lets it finish.
#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

impl GrantPreparer for Gate {
    fn prepare<'a>(&'a self, _: &'a Waiter) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.entered.notify_one();
            self.release.notified().await;
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_replica_leading_again_after_a_slow_preparation_never_reuses_a_token() {
    let gate = Arc::new(Gate::default());
    let (backend, a, b) = pair(vec![gate.clone()]).await;
    // a decides to grant x and starts preparing it (an etcd snapshot).
    let (_, mut x) = a.acquire(request("x")).await.unwrap();
    gate.entered.notified().await;

    // Meanwhile a's lease lapses, b leads and grants y the next token, b's
    // lease lapses and a wins again. a's notifications only ever said "you
    // lead" (the flip to follower and back was missed), in a new term.
    backend.elect_quietly("b");
    backend.publish("b");
    let (_, mut y) = b.acquire(request("y")).await.unwrap();
    let ty = next_grant(&mut y).await.fencing_token;
    backend.depose_quietly();
    backend.elect_quietly("a");
    backend.publish("a");
    gate.release.notify_one();

    // a must not grant x with y's token (nor at all: y holds the baton).
    let told = loop {
        match x.recv().await.expect("x's stream ends with an answer") {
            Ok(AcquireUpdate::Queued { .. }) => {}
            other => break other,
        }
    };
    assert!(
        matches!(told, Err(EngineError::NotLeader { .. })),
        "x must be sent to ask again in the new term, got {told:?}"
    );
    let stored = backend.stored().unwrap();
    assert_eq!(stored.holders.keys().collect::<Vec<_>>(), vec![&n("y")]);
    assert_eq!(stored.last_token, ty);
    // The store's compare-and-swap would have refused a grant decided from
    // the old memory; the new term alone must make a reload it first.
    assert_eq!(
        a.metrics.store_errors.get(),
        0,
        "a decided from stale memory and tried to save it"
    );

    // x asks again and waits behind y; a answers from the reloaded state.
    let (_, mut x) = a.acquire(request("x")).await.unwrap();
    let (_, reason) = next_queued(&mut x).await;
    assert!(reason.contains("y holds it"), "{reason}");
    a.release(&n("y"), ty, "y", "done").await.unwrap();
    gate.release.notify_one();
    let tx = next_grant(&mut x).await.fencing_token;
    assert_eq!(tx, ty + 1);
}

/// A preparer that never finishes.
struct Stuck;

impl GrantPreparer for Stuck {
    fn prepare<'a>(&'a self, _: &'a Waiter) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(futures::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_preparation_that_hangs_is_bounded_and_the_node_keeps_waiting() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, vec![Arc::new(Stuck)]).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let (_, reason) = next_queued(&mut a).await;
    assert!(reason.contains("took longer than 300s"), "{reason}");
    assert!(store.saved().unwrap().holders.is_empty());
    // The engine still answers while the preparation is retried.
    engine.confirmed_snapshot().await.unwrap();
}

/// Turns leadership over to "b" and back to "a" (a new term) while "a"
/// is deciding, with "b" having granted y meanwhile.
struct FlipWhileDeciding {
    backend: Arc<MemoryBackend>,
    granted_by_b: LeaseState,
    done: std::sync::atomic::AtomicBool,
}

impl GrantGuard for FlipWhileDeciding {
    fn check(&self, _: &Waiter, _: &LeaseState, _: DateTime<Utc>) -> Result<(), String> {
        if !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.backend.put(&self.granted_by_b);
            self.backend.elect_quietly("b");
            self.backend.elect_quietly("a");
            self.backend.publish("a");
        }
        Ok(())
    }
}

/// Red-team finding on issue 9: a grant decided from one term's memory is
/// never saved onto the memory a new term reloaded (where y holds the only
/// slot): it is decided again there, and the granter keeps running.
#[tokio::test]
async fn a_grant_decided_before_a_new_term_is_never_saved_onto_its_state() {
    let backend = MemoryBackend::new();
    backend.put(&LeaseState::default());
    let store = Arc::new(backend.replica("a"));
    backend.elect("a");
    let mut granted_by_b = LeaseState::default();
    granted_by_b
        .grant(&n("y"), false, false, "b granted it", Utc::now())
        .unwrap();
    let guard = Arc::new(FlipWhileDeciding {
        backend: backend.clone(),
        granted_by_b,
        done: Default::default(),
    });
    let a = Engine::new(
        store,
        config(1),
        vec![guard as Arc<dyn GrantGuard>],
        Vec::new(),
        system_clock(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let granter = tokio::spawn(a.clone().run_granter());
    let (_, mut x) = a.acquire(request("x")).await.unwrap();
    let told = tokio::time::timeout(std::time::Duration::from_secs(10), x.recv())
        .await
        .expect("x is told something");
    assert!(
        !matches!(told, Some(Ok(AcquireUpdate::Granted(_)))),
        "x was granted on top of y: {told:?}"
    );
    let stored = backend.stored().unwrap();
    assert_eq!(
        stored.holders.keys().collect::<Vec<_>>(),
        vec![&n("y")],
        "the limit is 1 and y holds it"
    );
    // x asks again in the new term: it waits behind y.
    let (_, mut x) = a.acquire(request("x")).await.unwrap();
    let (position, reason) = next_queued(&mut x).await;
    assert_eq!(position, 1, "{reason}");
    assert!(!granter.is_finished(), "the granter is still running");
    assert_eq!(backend.stored().unwrap().holders.len(), 1);
}
