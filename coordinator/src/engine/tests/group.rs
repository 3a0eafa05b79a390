//! Issue 12, group commit of concurrent holder changes: renewals and
//! reports pending together are saved in one write, and each caller is
//! answered as if its change had been committed alone.

use super::*;
use crate::store::memory::Faults;

/// Three holders (limit 3) over `store`, with their tokens.
async fn three_holders(store: &Arc<MemoryStore>) -> (Arc<Engine>, Vec<(NodeName, u64)>) {
    let (engine, _) = engine_with(store.clone(), 3, Vec::new()).await;
    let mut holders = Vec::new();
    for node in ["a", "b", "c"] {
        let (_, mut events) = engine.acquire(request(node)).await.unwrap();
        holders.push((n(node), next_grant(&mut events).await.fencing_token));
    }
    (engine, holders)
}

fn rebooting(message: &str) -> Progress {
    Progress {
        phase: Phase::Rebooting,
        message: message.to_string(),
        ..Progress::default()
    }
}

/// Starts `calls` while the engine's lock is held, so they all join one
/// group; returns their handles once every one is pending.
async fn in_one_group<T: Send + 'static>(
    engine: &Arc<Engine>,
    calls: Vec<BoxFuture<'static, Result<T, EngineError>>>,
) -> Vec<tokio::task::JoinHandle<Result<T, EngineError>>> {
    let lock = engine.inner.lock().await;
    let count = calls.len();
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    while engine.pending_changes().len() < count {
        tokio::task::yield_now().await;
    }
    drop(lock);
    handles
}

fn report_call(
    engine: &Arc<Engine>,
    node: &NodeName,
    token: u64,
    message: &str,
) -> BoxFuture<'static, Result<(), EngineError>> {
    let (engine, node, progress) = (engine.clone(), node.clone(), rebooting(message));
    Box::pin(async move { engine.report(&node, token, progress).await })
}

#[tokio::test]
async fn reports_pending_together_are_one_durable_write() {
    let store = Arc::new(MemoryStore::default());
    let (engine, holders) = three_holders(&store).await;
    let before = store.backend().writes();
    let calls = holders
        .iter()
        .map(|(node, token)| report_call(&engine, node, *token, "going down"))
        .collect();
    for handle in in_one_group(&engine, calls).await {
        handle.await.unwrap().unwrap();
    }
    assert_eq!(
        store.backend().writes(),
        before + 1,
        "one save for the group"
    );
    let stored = store.saved().unwrap();
    for (node, _) in &holders {
        assert_eq!(stored.holders[node].phase, Phase::Rebooting);
    }
}

/// The save of a group fails: none of its changes is applied, in memory
/// or in the store, and every caller hears the error (none hears "ok").
#[tokio::test]
async fn a_failed_group_save_applies_nothing_and_every_caller_hears_it() {
    let store = Arc::new(MemoryStore::default());
    let (engine, holders) = three_holders(&store).await;
    store.fail_next_saves(1);
    let calls = holders
        .iter()
        .map(|(node, token)| report_call(&engine, node, *token, "going down"))
        .collect();
    for handle in in_one_group(&engine, calls).await {
        let err = handle.await.unwrap().unwrap_err();
        assert_eq!(crate::status_map::code(&err), tonic::Code::Unavailable);
    }
    let stored = store.saved().unwrap();
    let memory = engine.snapshot().await.state;
    for (node, _) in &holders {
        assert_eq!(stored.holders[node].phase, Phase::Granted);
        assert_eq!(memory.holders[node].phase, Phase::Granted);
    }
}

/// The save of a group happens but its answer is lost (a crash of the
/// link between): every caller hears an error, and the store holds all of
/// the group's changes or none, never part of it.
#[tokio::test]
async fn a_group_whose_save_answer_is_lost_is_stored_whole() {
    let store = Arc::new(MemoryStore::default());
    let (engine, holders) = three_holders(&store).await;
    store.backend().inject(Faults {
        lose_save_answers: 1,
        ..Faults::default()
    });
    let calls = holders
        .iter()
        .map(|(node, token)| report_call(&engine, node, *token, "going down"))
        .collect();
    for handle in in_one_group(&engine, calls).await {
        handle.await.unwrap().unwrap_err();
    }
    let stored = store.saved().unwrap();
    let phases: Vec<Phase> = holders
        .iter()
        .map(|(n, _)| stored.holders[n].phase)
        .collect();
    assert_eq!(
        phases,
        vec![Phase::Rebooting; 3],
        "all of the group, stored"
    );
    // The memory is reloaded before the next answer: it says so too.
    let snapshot = engine.confirmed_snapshot().await.unwrap();
    assert_eq!(snapshot.state.holders[&n("b")].phase, Phase::Rebooting);
}

/// One change of a group is refused (a stale token): its caller hears the
/// refusal; the others are saved and answered as if it never came.
#[tokio::test]
async fn a_refused_change_does_not_affect_the_rest_of_its_group() {
    let store = Arc::new(MemoryStore::default());
    let (engine, holders) = three_holders(&store).await;
    let before = store.backend().writes();
    let (a, ta) = holders[0].clone();
    let calls = vec![
        report_call(&engine, &a, ta, "a"),
        report_call(&engine, &holders[1].0, ta, "b with a's token"),
        report_call(&engine, &holders[2].0, holders[2].1, "c"),
    ];
    let results: Vec<_> = futures::future::join_all(in_one_group(&engine, calls).await)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let refused = results[1].as_ref().unwrap_err();
    assert_eq!(
        crate::status_map::code(refused),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(store.backend().writes(), before + 1);
    let stored = store.saved().unwrap();
    assert_eq!(stored.holders[&a].phase, Phase::Rebooting);
    assert_eq!(stored.holders[&holders[1].0].phase, Phase::Granted);
    assert_eq!(stored.holders[&holders[2].0].message, "c");
}

/// A group is decided on the memory current when it is committed, never
/// on what was current when its changes arrived: here a new term brings a
/// store in which `a` was force-released by another leader, so `a`'s
/// pending renewal is refused and nothing of it is written.
#[tokio::test]
async fn a_group_is_decided_on_the_memory_of_its_commit() {
    let backend = crate::store::memory::MemoryBackend::new();
    backend.put(&LeaseState::default());
    let a_store = Arc::new(backend.replica("x"));
    let b_store = Arc::new(backend.replica("y"));
    backend.elect("x");
    let (x, _) = engine_with_store(a_store, 3, Vec::new()).await;
    let (y, _) = engine_with_store(b_store, 3, Vec::new()).await;
    let (_, mut events) = x.acquire(request("a")).await.unwrap();
    let ta = next_grant(&mut events).await.fencing_token;

    let lock = x.inner.lock().await;
    let renew = {
        let x = x.clone();
        tokio::spawn(async move { x.renew(&n("a"), ta).await })
    };
    while x.pending_changes().is_empty() {
        tokio::task::yield_now().await;
    }
    // While a's renewal waits: y leads, force-releases a; x leads again.
    backend.elect("y");
    y.force_release(&n("a"), Some(ta), "op", "dead")
        .await
        .unwrap();
    backend.elect("x");
    drop(lock);
    let err = renew.await.unwrap().unwrap_err();
    assert_eq!(
        crate::status_map::code(&err),
        tonic::Code::FailedPrecondition
    );
    assert!(!backend.stored().unwrap().holders.contains_key(&n("a")));
}

/// A caller that gives up while its change waits is left out of the group
/// (nobody would hear the answer); the others are saved.
#[tokio::test]
async fn a_cancelled_caller_is_left_out_of_the_group() {
    let store = Arc::new(MemoryStore::default());
    let (engine, holders) = three_holders(&store).await;
    let lock = engine.inner.lock().await;
    let gone = tokio::spawn(report_call(&engine, &holders[0].0, holders[0].1, "gone"));
    let kept = tokio::spawn(report_call(&engine, &holders[1].0, holders[1].1, "kept"));
    while engine.pending_changes().len() < 2 {
        tokio::task::yield_now().await;
    }
    gone.abort();
    let _ = gone.await;
    drop(lock);
    kept.await.unwrap().unwrap();
    let stored = store.saved().unwrap();
    assert_eq!(stored.holders[&holders[0].0].phase, Phase::Granted);
    assert_eq!(stored.holders[&holders[1].0].message, "kept");
}
