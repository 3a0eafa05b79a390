//! Issue 9, finding 4: missing state is not empty state.

use super::*;
use crate::store::memory::MemoryBackend;

fn initializing() -> EngineConfig {
    EngineConfig {
        initialize: true,
        ..config(1)
    }
}

#[tokio::test]
async fn an_empty_store_is_refused_unless_initialize_is_given() {
    let store = Arc::new(MemoryStore::new(None));
    let err = engine_with_config(store.clone(), config(1), Vec::new())
        .await
        .err()
        .expect("an empty store must be refused");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("start one coordinator once with --initialize"),
        "{message}"
    );
    assert!(message.contains("restore it"), "{message}");
    assert_eq!(store.saved(), None, "nothing was written");

    // With --initialize the state is created; tokens start above any token
    // an earlier, lost state can have handed out.
    let (engine, clock) = engine_with_config(store.clone(), initializing(), Vec::new())
        .await
        .unwrap();
    let initial = store.saved().unwrap();
    let floor = clock.0.lock().unwrap().timestamp_millis() as u64;
    assert_eq!(initial.last_token, floor);
    assert_eq!(initial.audit.back().unwrap().action, "initialize");
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    assert_eq!(next_grant(&mut a).await.fencing_token, floor + 1);
}

#[tokio::test]
async fn initialize_on_a_store_that_holds_state_is_refused() {
    let store = Arc::new(MemoryStore::default());
    let err = engine_with_config(store.clone(), initializing(), Vec::new())
        .await
        .err()
        .expect("--initialize over existing state must be refused");
    assert!(
        matches!(err, StoreError::AlreadyInitialized { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("remove --initialize"), "{err}");
    assert_eq!(store.saved(), Some(LeaseState::default()), "untouched");
}

#[tokio::test]
async fn state_deleted_under_a_running_leader_stops_it_instead_of_starting_empty() {
    let store = Arc::new(MemoryStore::default());
    let backend = store.backend().clone();
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ta = next_grant(&mut a).await.fencing_token;
    let mut refused = engine.refused();

    // The ConfigMap is deleted (or the data directory replaced).
    backend.delete();
    let err = engine.renew(&n("a"), ta).await.unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    // The next call reloads, finds nothing and refuses to run at all.
    let err = engine.renew(&n("a"), ta).await.unwrap_err();
    assert!(err.to_string().contains("no lease state in"), "{err}");
    let reason = refused.wait_for(Option::is_some).await.unwrap().clone();
    assert!(reason.unwrap().contains("--initialize"));
    // It stays refused, and wrote nothing.
    let err = engine.acquire(request("b")).await.unwrap_err();
    assert!(matches!(err, EngineError::Refused(_)), "{err}");
    assert_eq!(backend.stored(), None);
}

#[tokio::test]
async fn a_follower_that_takes_over_an_empty_store_refuses_to_run() {
    let backend = MemoryBackend::new();
    let store = Arc::new(backend.replica("a"));
    // Not leading: the engine starts and waits.
    let (engine, _) = engine_with_store(store, 1, Vec::new()).await;
    let mut refused = engine.refused();
    backend.elect("a");
    let reason = refused.wait_for(Option::is_some).await.unwrap().clone();
    assert!(
        reason
            .unwrap()
            .contains("no lease state in the memory store")
    );
    assert_eq!(backend.stored(), None);
}

#[tokio::test]
async fn replicas_started_on_an_empty_store_with_initialize_create_it_once() {
    let backend = MemoryBackend::new();
    // Both replicas start with --initialize while the store is empty (one
    // Deployment); neither leads yet.
    let (a, _) = engine_with_config(Arc::new(backend.replica("a")), initializing(), Vec::new())
        .await
        .unwrap();
    let (b, _) = engine_with_config(Arc::new(backend.replica("b")), initializing(), Vec::new())
        .await
        .unwrap();
    backend.elect("a");
    let (_, mut w) = a.acquire(request("w")).await.unwrap();
    let tw = next_grant(&mut w).await.fencing_token;
    // b takes over later: it loads what a created, it does not initialize.
    backend.elect("b");
    b.renew(&n("w"), tw).await.unwrap();
    assert_eq!(backend.stored().unwrap().last_token, tw);
    assert_eq!(*b.refused().borrow(), None);
    // A replica started with --initialize now is refused at once.
    let late = engine_with_config(Arc::new(backend.replica("c")), initializing(), Vec::new()).await;
    assert!(matches!(late, Err(StoreError::AlreadyInitialized { .. })));
}
