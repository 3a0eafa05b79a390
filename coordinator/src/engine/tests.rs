//! Engine tests over the in-memory store: grants reach waiters, failed saves
//! change nothing, overdue holders keep the baton, leadership is honoured.

use std::sync::{Arc, Mutex};

use chrono::{Duration, TimeZone, Utc};

use super::*;
use crate::state::Phase;
use crate::store::memory::MemoryStore;

mod arrivals;
mod failover;
mod initialize;
mod lost_answer;
mod node_facts;

struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

fn n(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

fn config(max: u32) -> EngineConfig {
    EngineConfig {
        overdue_after: Duration::seconds(60),
        ..EngineConfig::new(
            Policy {
                max_concurrent: max,
                ..Policy::default()
            },
            "test",
        )
    }
}

async fn engine_with(
    store: Arc<MemoryStore>,
    max: u32,
    preparers: Vec<Arc<dyn GrantPreparer>>,
) -> (Arc<Engine>, Arc<TestClock>) {
    engine_with_store(store, max, preparers).await
}

async fn engine_with_store(
    store: Arc<dyn StateStore>,
    max: u32,
    preparers: Vec<Arc<dyn GrantPreparer>>,
) -> (Arc<Engine>, Arc<TestClock>) {
    engine_with_config(store, config(max), preparers)
        .await
        .unwrap()
}

async fn engine_with_config(
    store: Arc<dyn StateStore>,
    config: EngineConfig,
    preparers: Vec<Arc<dyn GrantPreparer>>,
) -> Result<(Arc<Engine>, Arc<TestClock>), StoreError> {
    let clock = Arc::new(TestClock(Mutex::new(
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
    )));
    let c = clock.clone();
    let engine = Engine::new(
        store,
        config,
        Vec::new(),
        preparers,
        Arc::new(move || *c.0.lock().unwrap()),
        Metrics::new(),
    )
    .await?;
    tokio::spawn(engine.clone().run_granter());
    Ok((engine, clock))
}

fn request(node: &str) -> AcquireRequest {
    AcquireRequest {
        node: n(node),
        control_plane: false,
        reason: "test".into(),
        manual: false,
        backs_up_control_plane: true,
    }
}

type Events = AcquireEvents;

async fn next_grant(events: &mut Events) -> Grant {
    loop {
        match events.recv().await.expect("stream open").expect("no error") {
            AcquireUpdate::Granted(g) => return g,
            AcquireUpdate::Queued { .. } => {}
        }
    }
}

async fn next_queued(events: &mut Events) -> (u32, String) {
    match events.recv().await.expect("stream open").expect("no error") {
        AcquireUpdate::Queued {
            position, reason, ..
        } => (position, reason),
        AcquireUpdate::Granted(g) => panic!("unexpected grant {g:?}"),
    }
}

#[tokio::test]
async fn handoff_in_fifo_order_with_growing_tokens() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    let (_, mut c) = engine.acquire(request("c")).await.unwrap();
    assert_eq!(next_queued(&mut b).await.0, 1);
    let (pos, reason) = next_queued(&mut c).await;
    assert_eq!(pos, 2);
    assert_eq!(reason, "concurrency limit: 1 of 1 in use (a holds it)");
    // The grant was saved before it was delivered.
    assert_eq!(
        store.saved().unwrap().holders[&n("a")].fencing_token,
        ga.fencing_token
    );

    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap();
    let gb = next_grant(&mut b).await;
    assert!(gb.fencing_token > ga.fencing_token);
    engine
        .release(&n("b"), gb.fencing_token, "b", "done")
        .await
        .unwrap();
    let gc = next_grant(&mut c).await;
    assert!(gc.fencing_token > gb.fencing_token);
    assert_eq!(engine.metrics.handoffs.get(), 2);
}

#[tokio::test]
async fn a_failed_save_changes_nothing() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let before = engine.snapshot().await.state;
    store.fail_next_saves(1);
    let err = engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Store(_)), "{err}");
    assert_eq!(engine.snapshot().await.state, before);
    // The same release succeeds once the store works again.
    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap();
    assert!(store.saved().unwrap().holders.is_empty());
}

#[tokio::test]
async fn overdue_holder_keeps_the_baton_until_force_released() {
    let store = Arc::new(MemoryStore::default());
    let (engine, clock) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    next_queued(&mut b).await;
    clock.advance(Duration::hours(3));
    engine.poke();
    // Wait until the engine has audited the overdue holder.
    let mut changes = engine.subscribe();
    loop {
        let snap = engine.snapshot().await;
        if snap.state.audit.iter().any(|a| a.action == "overdue") {
            assert!(snap.overdue.contains(&n("a")));
            assert!(
                snap.state.holders.contains_key(&n("a")),
                "an overdue holder must keep the baton"
            );
            assert_eq!(snap.queue.len(), 1, "b must still wait");
            break;
        }
        changes.changed().await.unwrap();
    }
    // Renewing clears overdue; the baton stays.
    engine.renew(&n("a"), ga.fencing_token).await.unwrap();
    assert!(engine.snapshot().await.overdue.is_empty());
    let token = engine
        .force_release(&n("a"), Some(ga.fencing_token), "op", "node died")
        .await
        .unwrap();
    assert_eq!(token, ga.fencing_token);
    let gb = next_grant(&mut b).await;
    assert!(gb.fencing_token > ga.fencing_token);
    let audit = engine.snapshot().await.state.audit;
    let forced = audit.iter().find(|a| a.action == "force-release").unwrap();
    assert_eq!(
        (forced.actor.as_str(), forced.reason.as_str()),
        ("op", "node died")
    );
}

#[tokio::test]
async fn acquire_by_a_holder_resumes_its_grant() {
    let (engine, _) = engine_with(Arc::new(MemoryStore::default()), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    engine
        .report(
            &n("a"),
            ga.fencing_token,
            Progress {
                phase: Phase::Rebooting,
                boot_id: "b1".into(),
                ..Progress::default()
            },
        )
        .await
        .unwrap();
    let (_, mut again) = engine.acquire(request("a")).await.unwrap();
    let resumed = next_grant(&mut again).await;
    assert!(resumed.resumed);
    assert_eq!(resumed.fencing_token, ga.fencing_token);
    assert_eq!(resumed.phase, Phase::Rebooting);
}

#[tokio::test]
async fn withdrawn_and_superseded_requests_leave_the_queue() {
    let (engine, _) = engine_with(Arc::new(MemoryStore::default()), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (ticket_b, b) = engine.acquire(request("b")).await.unwrap();
    let (_, mut c1) = engine.acquire(request("c")).await.unwrap();
    let (_, mut c2) = engine.acquire(request("c")).await.unwrap();
    loop {
        match c1.recv().await.unwrap() {
            Err(EngineError::Superseded(node)) => {
                assert_eq!(node, n("c"));
                break;
            }
            Ok(AcquireUpdate::Queued { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(b);
    engine.withdraw(&n("b"), ticket_b).await;
    assert_eq!(engine.snapshot().await.queue.len(), 1);
    engine
        .release(&n("a"), ga.fencing_token, "a", "")
        .await
        .unwrap();
    assert!(!next_grant(&mut c2).await.resumed);
}

struct FailingPreparer(Mutex<u32>);

impl GrantPreparer for FailingPreparer {
    fn prepare<'a>(&'a self, _: &'a Waiter) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut left = self.0.lock().unwrap();
            if *left == 0 {
                Ok(())
            } else {
                *left -= 1;
                Err("etcd: snapshot failed (disk full)".to_string())
            }
        })
    }
}

#[tokio::test]
async fn failed_preparation_keeps_the_node_waiting_with_the_reason() {
    let preparer = Arc::new(FailingPreparer(Mutex::new(1)));
    let (engine, clock) = engine_with(Arc::new(MemoryStore::default()), 1, vec![preparer]).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let (_, reason) = next_queued(&mut a).await;
    assert!(
        reason.starts_with("etcd: snapshot failed (disk full)"),
        "{reason}"
    );
    assert!(engine.snapshot().await.state.holders.is_empty());
    clock.advance(Duration::seconds(11));
    engine.poke();
    let ga = next_grant(&mut a).await;
    assert_eq!(ga.fencing_token, 1);
}

#[tokio::test]
async fn followers_refuse_and_a_new_leader_resumes_the_state() {
    let store = Arc::new(MemoryStore::default());
    let backend = store.backend().clone();
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    next_queued(&mut b).await;
    let other = Arc::new(backend.replica("other"));
    backend.elect("other");
    // The waiter is sent away, naming the leader.
    let err = loop {
        if let Err(e) = b.recv().await.unwrap() {
            break e;
        }
    };
    assert!(err.to_string().contains("the leader is other"), "{err}");
    let err = engine.renew(&n("a"), ga.fencing_token).await.unwrap_err();
    assert!(matches!(err, EngineError::NotLeader { .. }));
    // The other replica released a and granted z meanwhile; this one picks
    // that up on return.
    let (other_engine, _) = engine_with(other, 1, Vec::new()).await;
    other_engine
        .release(&n("a"), ga.fencing_token, "a", "")
        .await
        .unwrap();
    let (_, mut z) = other_engine.acquire(request("z")).await.unwrap();
    let tz = next_grant(&mut z).await.fencing_token;
    backend.elect("memory");
    let mut changes = engine.subscribe();
    loop {
        let snap = engine.snapshot().await;
        if snap.state.holders.contains_key(&n("z")) {
            assert_eq!(snap.state.last_token, tz);
            break;
        }
        changes.changed().await.unwrap();
    }
    engine.renew(&n("z"), tz).await.unwrap();
}

/// A handoff does not cost a message to every waiter: with 1,000 waiting,
/// 100 handoffs send a few position updates in all, not one per waiter per
/// handoff (the holder's name in the shared reason changes every time).
#[tokio::test]
async fn handoffs_do_not_message_every_waiter() {
    let (engine, _) = engine_with(Arc::new(MemoryStore::default()), 1, Vec::new()).await;
    let (_, mut first) = engine.acquire(request("h")).await.unwrap();
    let mut holder = (n("h"), next_grant(&mut first).await.fencing_token);
    let mut waiters = Vec::new();
    for i in 0..1000 {
        waiters.push(engine.acquire(request(&format!("w{i}"))).await.unwrap().1);
    }
    for w in &mut waiters {
        next_queued(w).await;
    }
    let handoffs = 100;
    let mut updates = 0;
    for (i, w) in waiters.iter_mut().enumerate().take(handoffs) {
        engine
            .release(&holder.0, holder.1, "test", "done")
            .await
            .unwrap();
        let token = loop {
            match w.recv().await.unwrap().unwrap() {
                AcquireUpdate::Granted(g) => break g.fencing_token,
                AcquireUpdate::Queued { .. } => updates += 1,
            }
        };
        holder = (n(&format!("w{i}")), token);
    }
    for w in &mut waiters[handoffs..] {
        while let Ok(Ok(AcquireUpdate::Queued { .. })) = w.try_recv() {
            updates += 1;
        }
    }
    assert!(
        updates < handoffs * 20,
        "{updates} Queued updates for {handoffs} handoffs with 1,000 waiting"
    );
}

/// Group commit: a release whose slot goes at once to the next waiter is
/// saved together with that grant, in one durable write, and the grant is
/// told only after that write.
#[tokio::test]
async fn a_handoff_is_one_durable_write() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    next_queued(&mut b).await;
    let before = store.backend().writes();
    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap();
    let gb = next_grant(&mut b).await;
    assert_eq!(
        store.backend().writes(),
        before + 1,
        "the release and the grant are one write"
    );
    let stored = store.saved().unwrap();
    assert_eq!(stored.holders[&n("b")].fencing_token, gb.fencing_token);
    assert!(!stored.holders.contains_key(&n("a")));
}

/// When the one write of a handoff fails, neither the release nor the
/// grant happened: the waiter hears nothing and the holder keeps the baton
/// until a release is saved.
#[tokio::test]
async fn a_failed_handoff_write_grants_nobody() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    next_queued(&mut b).await;
    store.fail_next_saves(1);
    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap_err();
    let snap = engine.snapshot().await;
    assert!(snap.state.holders.contains_key(&n("a")));
    assert_eq!(snap.queue_length, 1);
    while let Ok(update) = b.try_recv() {
        assert!(
            !matches!(update, Ok(AcquireUpdate::Granted(_))),
            "granted although nothing was saved"
        );
    }
    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap();
    assert!(next_grant(&mut b).await.fencing_token > ga.fencing_token);
}

/// The store moved on behind this replica's memory (a save whose answer
/// was lost, another writer): a read reloads and answers from the store's
/// state, confirmed, instead of failing UNAVAILABLE; it never answers
/// from the memory the store refused.
#[tokio::test]
async fn a_read_after_the_store_moved_on_answers_from_the_reloaded_state() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    assert!(
        engine
            .confirmed_snapshot()
            .await
            .unwrap()
            .state
            .holders
            .is_empty()
    );

    let mut moved = LeaseState::default();
    moved
        .grant(&n("w1"), false, false, "elsewhere", Utc::now())
        .unwrap();
    store.backend().put(&moved);

    let snap = engine.confirmed_snapshot().await.unwrap();
    assert_eq!(snap.state, moved);
}

/// A store that goes back behind a running coordinator (an older backup
/// restored) never makes it hand out a token it already handed out.
#[tokio::test]
async fn a_store_restored_to_an_older_state_never_reissues_a_token() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let older = store.saved().unwrap();
    let (_, mut events) = engine.acquire(request("w1")).await.unwrap();
    tokio::spawn(engine.clone().run_granter());
    let first = next_grant(&mut events).await.fencing_token;
    engine.release(&n("w1"), first, "w1", "done").await.unwrap();

    store.backend().put(&older);
    let snap = engine.confirmed_snapshot().await.unwrap();
    assert!(
        snap.state.last_token >= first,
        "{} < {first}",
        snap.state.last_token
    );
    let (_, mut events) = engine.acquire(request("w2")).await.unwrap();
    let second = next_grant(&mut events).await.fencing_token;
    assert!(second > first, "token {second} reissued after {first}");
}

/// Like the policy's canary rule: every node but `a` waits while the audit
/// shows `a`'s grant (a guard judging by history).
struct AfterCanary;

impl GrantGuard for AfterCanary {
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        _: DateTime<Utc>,
    ) -> Result<(), String> {
        let went_first = state
            .audit
            .iter()
            .any(|r| r.action == "grant" && r.node == "a");
        if candidate.node.as_str() != "a" && went_first {
            return Err("canary a went first".to_string());
        }
        Ok(())
    }
    fn reads_audit(&self) -> bool {
        true
    }
}

/// A group commit decides on a copy holding only its own change's audit
/// records; a guard that judges by the audit must not be asked there (it
/// would not see the canary's grant and let the next node through in the
/// release's own write).
#[tokio::test]
async fn a_guard_reading_the_audit_is_not_asked_on_a_group_commit_copy() {
    let engine = Engine::new(
        Arc::new(MemoryStore::default()),
        config(1),
        vec![Arc::new(AfterCanary) as Arc<dyn GrantGuard>],
        Vec::new(),
        Arc::new(Utc::now),
        Metrics::new(),
    )
    .await
    .unwrap();
    tokio::spawn(engine.clone().run_granter());
    let (_, mut a) = engine.acquire(request("a")).await.unwrap();
    let ga = next_grant(&mut a).await;
    let (_, mut b) = engine.acquire(request("b")).await.unwrap();
    engine
        .release(&n("a"), ga.fencing_token, "a", "done")
        .await
        .unwrap();
    assert!(
        !engine.snapshot().await.state.holders.contains_key(&n("b")),
        "b was granted in the canary's release write"
    );
    loop {
        let (_, reason) = next_queued(&mut b).await;
        if reason == "canary a went first" {
            break;
        }
    }
}
