//! Red-team finding on issue 9: a grant whose save landed in the store but
//! whose answer was lost (an error after the write, or the store timeout
//! firing after it). The reloaded state says the node holds the baton while
//! its waiter is still queued: the waiter must hear its grant (resumed, with
//! the stored token and phase), and nothing else may be granted for it.

use std::time::Duration as StdDuration;

use super::*;
use crate::store::memory::Faults;
use crate::store::{Loaded, Revision};

/// Waits (bounded, so a stall fails instead of hanging) for the waiter's
/// grant.
async fn grant_within(events: &mut Events, limit: StdDuration) -> Grant {
    tokio::time::timeout(limit, next_grant(events))
        .await
        .expect("the waiter never heard its grant although the store holds it")
}

#[tokio::test(start_paused = true)]
async fn a_grant_saved_but_answered_with_an_error_reaches_its_waiter() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    store.backend().inject(Faults {
        lose_save_answers: 1,
        ..Faults::default()
    });
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    let grant = grant_within(&mut x, StdDuration::from_secs(30)).await;
    let stored = store.saved().unwrap();
    assert_eq!(stored.holders[&n("x")].fencing_token, grant.fencing_token);
    assert_eq!(stored.last_token, grant.fencing_token, "granted only once");
    assert!(grant.resumed, "the grant came from the reloaded state");
    assert_eq!(grant.phase, stored.holders[&n("x")].phase);
    let snap = engine.snapshot().await;
    assert!(snap.queue.is_empty(), "x must leave the queue");
    // The engine goes on answering from the stored state.
    engine.renew(&n("x"), grant.fencing_token).await.unwrap();
    assert_eq!(engine.metrics.store_errors.get(), 1, "no refusal loop");
}

/// A store whose saves land and then never answer (the engine's store
/// timeout fires after the write).
struct WritesThenHangs {
    inner: MemoryStore,
    hang_next: std::sync::atomic::AtomicBool,
}

impl StateStore for WritesThenHangs {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        self.inner.load()
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            let saved = self.inner.save(state, fence).await;
            if self
                .hang_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                futures::future::pending::<()>().await;
            }
            saved
        })
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.confirm(fence)
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership()
    }

    fn kind(&self) -> &'static str {
        "hanging"
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_saved_but_timed_out_reaches_its_waiter_and_nobody_else_is_granted() {
    let store = Arc::new(WritesThenHangs {
        inner: MemoryStore::default(),
        hang_next: false.into(),
    });
    let backend = store.inner.backend().clone();
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    store
        .hang_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    let (_, mut y) = engine.acquire(request("y")).await.unwrap();
    let grant = grant_within(&mut x, StdDuration::from_secs(60)).await;
    let stored = backend.stored().unwrap();
    assert_eq!(stored.holders.len(), 1);
    assert_eq!(stored.holders[&n("x")].fencing_token, grant.fencing_token);
    assert!(grant.resumed);
    // y waits behind x, which holds the baton now.
    let reason = loop {
        let (_, reason) = next_queued(&mut y).await;
        if reason.contains("x holds it") {
            break reason;
        }
    };
    assert!(reason.contains("1 of 1"), "{reason}");
    engine
        .release(&n("x"), grant.fencing_token, "x", "done")
        .await
        .unwrap();
    let gy = grant_within(&mut y, StdDuration::from_secs(30)).await;
    assert_eq!(gy.fencing_token, grant.fencing_token + 1);
}

/// Red-team finding on the fix above: the reload that finds the lost grant
/// can be cancelled (a client hangs up, a timeout) after the memory was
/// loaded but before the grant was resumed. The next call resumes it; it
/// is never skipped for good.
#[tokio::test(start_paused = true)]
async fn a_resume_cut_off_by_a_cancelled_call_is_done_by_the_next_call() {
    let store = Arc::new(MemoryStore::default());
    // No granter task: the test runs the passes, so no background reload
    // resumes the grant before the call that is cut off.
    let engine = Engine::over(store.clone(), "test").await;
    store.backend().inject(Faults {
        lose_save_answers: 1,
        ..Faults::default()
    });
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    engine.grant_pass().await;
    assert!(store.saved().unwrap().holders.contains_key(&n("x")));

    // Every store call now takes 1 s: the read below loads (1 s), then is
    // cut off while the resume waits for its confirmation.
    store.backend().set_latency(StdDuration::from_secs(1));
    let cut = tokio::time::timeout(StdDuration::from_millis(1500), engine.confirmed_snapshot());
    assert!(cut.await.is_err(), "the read was cut off");
    store.backend().set_latency(StdDuration::ZERO);

    engine.confirmed_snapshot().await.unwrap();
    match x.try_recv() {
        Ok(Ok(AcquireUpdate::Granted(g))) => assert!(g.resumed),
        other => panic!("x never heard the grant the store holds: {other:?}"),
    }
}
