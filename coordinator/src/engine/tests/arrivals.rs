//! Issue 12: Acquires that arrive together share one store confirmation,
//! and that sharing never answers one from stale memory, never loses one,
//! and never leaves a caller that gave up in the queue.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use super::*;
use crate::state::LeaseError;
use crate::store::memory::{Faults, MemoryBackend};
use crate::store::{Loaded, Revision};

/// A replica's store whose confirmations are counted and, while gated,
/// decide at once (they read the truth when they start) but answer only
/// when the test lets them: a confirmation in flight while the world
/// changes.
struct GatedConfirms {
    inner: MemoryStore,
    started: AtomicUsize,
    gated: AtomicBool,
    gate: Semaphore,
}

impl GatedConfirms {
    fn new(inner: MemoryStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            started: AtomicUsize::new(0),
            gated: AtomicBool::new(false),
            gate: Semaphore::new(0),
        })
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.gated.store(true, Ordering::SeqCst);
    }

    /// Opens the gate for good.
    fn open(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

impl StateStore for GatedConfirms {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        self.inner.load()
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        self.inner.save(state, fence)
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            let decided = self.inner.confirm(fence).await;
            if self.gated.load(Ordering::SeqCst) {
                self.gate.acquire().await.expect("gate open").forget();
            }
            decided
        })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership()
    }

    fn kind(&self) -> &'static str {
        "gated"
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

/// Runs other tasks until `done` holds (bounded: a stall fails).
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

type Asking = tokio::task::JoinHandle<Result<(u64, Events), EngineError>>;

fn ask(engine: &Arc<Engine>, node: &str) -> Asking {
    let engine = engine.clone();
    let request = request(node);
    tokio::spawn(async move { engine.acquire(request).await })
}

/// Asks for each of `nodes` and waits until every request is on the
/// arrivals list (held up behind a confirmation in flight).
async fn ask_behind(engine: &Arc<Engine>, nodes: &[String]) -> Vec<Asking> {
    let before = engine.arrivals.len();
    let asking = nodes.iter().map(|n| ask(engine, n)).collect();
    until("the requests arrived", || {
        engine.arrivals.len() == before + nodes.len()
    })
    .await;
    asking
}

async fn queued(engine: &Arc<Engine>) -> Vec<String> {
    let inner = engine.inner.lock().await;
    let mut nodes: Vec<String> = inner.queue.waiters().map(|w| w.node.to_string()).collect();
    nodes.sort();
    nodes
}

fn names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn acquires_that_arrive_together_share_one_confirmation() {
    let store = GatedConfirms::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    store.close();
    // y's confirmation is in flight; 1,100 nodes ask meanwhile.
    let before = store.started();
    let y = ask(&engine, "y");
    until("y's confirmation started", || store.started() == before + 1).await;
    let fleet = ask_behind(&engine, &names("n", 1100)).await;
    store.open();
    // (Their streams stay open: a waiter whose stream closed leaves.)
    let mut streams = vec![y.await.unwrap().unwrap().1];
    for asking in fleet {
        streams.push(asking.await.unwrap().unwrap().1);
    }
    // y's own, then the 1,100 in holds of at most BATCH_MAX (512, 512, 76):
    // one confirmation per Acquire would have been 1,101.
    assert_eq!(store.started() - before, 4);
    assert_eq!(engine.snapshot().await.queue_length, 1101);
}

/// The hostile case: a request that arrives while a confirmation is in
/// flight must not be answered by it. Here the replica is deposed in
/// between and the new leader force-releases x: a resumed grant to x from
/// the old confirmation would send x to drain while another node is down.
#[tokio::test]
async fn an_acquire_that_arrives_during_a_confirmation_is_not_answered_by_it() {
    let backend = MemoryBackend::new();
    backend.put(&LeaseState::default());
    let a_store = GatedConfirms::new(backend.replica("a"));
    let b_store = Arc::new(backend.replica("b"));
    backend.elect("a");
    let (a, _) = engine_with_store(a_store.clone(), 1, Vec::new()).await;
    let (b, _) = engine_with_store(b_store, 1, Vec::new()).await;
    let (_, mut x) = a.acquire(request("x")).await.unwrap();
    let tx = next_grant(&mut x).await.fencing_token;

    a_store.close();
    let before = a_store.started();
    let w = ask(&a, "w");
    until("w's confirmation started", || {
        a_store.started() == before + 1
    })
    .await;
    // a freezes past its lease while that confirmation is on its way; b
    // leads and force-releases x. a has not noticed.
    backend.elect_quietly("b");
    backend.publish("b");
    assert_eq!(
        b.force_release(&n("x"), Some(tx), "op", "dead")
            .await
            .unwrap(),
        tx
    );
    // x's agent restarts and asks a again.
    let again = ask_behind(&a, &["x".to_string()]).await.remove(0);
    a_store.open();
    // w's answer came from a confirmation that started after w asked and
    // while a still led: as good as one of its own.
    w.await.unwrap().unwrap();
    // x's must not: the confirmation it gets is its own, and it fails.
    let err = again.await.unwrap().unwrap_err();
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::Unavailable,
        "x was answered from the memory of a deposed replica"
    );
}

#[tokio::test]
async fn a_caller_that_gives_up_before_its_answer_is_never_left_waiting() {
    let store = GatedConfirms::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    let tx = next_grant(&mut x).await.fencing_token;
    store.close();
    // The lock is busy (a save, a grant...). "kept" waits for it first and
    // will take everything that arrived; "early" gives up before that,
    // "late" while the batch's confirmation is in flight.
    let busy = engine.inner.lock().await;
    let kept = ask_behind(&engine, &["kept".into()]).await.remove(0);
    let mut asking = ask_behind(&engine, &["early".into(), "late".into()]).await;
    let late = asking.pop().unwrap();
    let early = asking.pop().unwrap();
    early.abort();
    assert!(early.await.unwrap_err().is_cancelled());
    let before = store.started();
    drop(busy);
    until("kept's batch is being confirmed", || {
        store.started() == before + 1
    })
    .await;
    late.abort();
    assert!(late.await.unwrap_err().is_cancelled());
    store.open();
    let (_, mut kept) = kept.await.unwrap().unwrap();
    assert_eq!(queued(&engine).await, vec!["kept".to_string()]);
    // Nobody who gave up is ever granted.
    engine.release(&n("x"), tx, "x", "done").await.unwrap();
    assert_eq!(next_grant(&mut kept).await.fencing_token, tx + 1);
    engine.grant_pass().await;
    let holders = store.inner.saved().unwrap().holders;
    assert_eq!(holders.keys().collect::<Vec<_>>(), vec![&n("kept")]);
}

#[tokio::test]
async fn a_holder_cancelled_during_the_shared_confirmation_leaves_nobody_unanswered() {
    let store = GatedConfirms::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    store.close();
    let busy = engine.inner.lock().await;
    let first = ask_behind(&engine, &["first".into()]).await.remove(0);
    let second = ask_behind(&engine, &["second".into()]).await.remove(0);
    let before = store.started();
    drop(busy);
    // "first" holds the lock and confirms for both; its client goes away.
    until("first's batch is being confirmed", || {
        store.started() == before + 1
    })
    .await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    store.open();
    // "second" was dropped unanswered with that batch: it asks again.
    let (_, mut events) = second.await.unwrap().unwrap();
    let (_, reason) = next_queued(&mut events).await;
    assert!(reason.contains("x holds it"), "{reason}");
    assert_eq!(queued(&engine).await, vec!["second".to_string()]);
}

#[tokio::test]
async fn a_failed_shared_confirmation_answers_every_acquire_it_held_and_queues_none() {
    let store = GatedConfirms::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    store.close();
    let before = store.started();
    let w = ask(&engine, "w");
    until("w's confirmation started", || store.started() == before + 1).await;
    let held = ask_behind(&engine, &names("n", 3)).await;
    store.inner.backend().inject(Faults {
        fail_confirms: 1,
        ..Faults::default()
    });
    store.open();
    let _w = w.await.unwrap().unwrap();
    for asking in held {
        let err = asking.await.unwrap().unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
    assert_eq!(queued(&engine).await, Vec::<String>::new());
    // The next one is answered again.
    engine.acquire(request("n0")).await.unwrap();
}

/// Red-team finding 1: under a steady stream of Acquires (one per half a
/// store round trip), callers already answered stood in the lock's line
/// and each took the next arrivals and confirmed before returning: answers
/// came at one per round trip, the backlog grew, and a release waited
/// behind all of it. Virtual time: every figure is exact.
#[tokio::test(start_paused = true)]
async fn a_steady_stream_of_acquires_holds_up_neither_its_answers_nor_a_release() {
    const RTT: std::time::Duration = std::time::Duration::from_millis(20);
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    let tx = next_grant(&mut x).await.fencing_token;
    store.backend().set_latency(RTT);
    let mut asking = Vec::new();
    let mut release = None;
    for i in 0..300 {
        let asker = engine.clone();
        asking.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let (_, events) = asker.acquire(request(&format!("n{i}"))).await.unwrap();
            (started.elapsed(), events)
        }));
        if i == 150 {
            let engine = engine.clone();
            release = Some(tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                engine.release(&n("x"), tx, "x", "done").await.unwrap();
                started.elapsed()
            }));
        }
        tokio::time::sleep(RTT / 2).await;
    }
    let mut slowest = std::time::Duration::ZERO;
    let mut streams = Vec::new();
    for a in asking {
        let (took, events) = a.await.unwrap();
        slowest = slowest.max(took);
        streams.push(events);
    }
    // The hold in progress, then the one that takes it: two round trips
    // (and the granter's pass); one per Acquire would be seconds.
    assert!(slowest <= RTT * 3, "an Acquire took {slowest:?}");
    let took = release.unwrap().await.unwrap();
    // The hold in progress, a batch taken meanwhile, the release's save and
    // the next grant's: about four round trips.
    assert!(took <= RTT * 6, "the release took {took:?}");
}

/// Red-team finding 2: a caller answered by another holder while it still
/// waited, that gave up before reading its answer, stayed queued (no
/// stream was built, so nothing withdrew it).
#[tokio::test]
async fn a_caller_that_leaves_with_its_answer_unread_is_withdrawn() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    let busy = engine.inner.lock().await;
    let h = ask_behind(&engine, &["h".into()]).await.remove(0);
    // w asks and waits behind h; h will answer it; w is never polled again.
    let mut w = Box::pin(engine.acquire(request("w")));
    assert!(futures::poll!(w.as_mut()).is_pending());
    drop(busy);
    let _h = h.await.unwrap().unwrap();
    // (w's turn at the lock came while it is not polled: nothing else can
    // take the lock until it is dropped.)
    drop(w);
    assert_eq!(
        engine.arrivals.departed_len(),
        1,
        "w had been answered and queued when it left"
    );
    engine.grant_pass().await;
    assert_eq!(queued(&engine).await, vec!["h".to_string()]);
}

/// Red-team finding 3: a second Acquire for a waiting node, whose caller
/// gave up during the shared confirmation, still replaced the live request
/// (told Superseded) and was then withdrawn: the node lost its place.
#[tokio::test]
async fn a_caller_that_gave_up_does_not_supersede_its_nodes_live_request() {
    let store = GatedConfirms::new(MemoryStore::default());
    let (engine, _) = engine_with_store(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    let (_, mut live) = engine.acquire(request("n")).await.unwrap();
    next_queued(&mut live).await;
    store.close();
    let busy = engine.inner.lock().await;
    let h = ask_behind(&engine, &["h".into()]).await.remove(0);
    let mut again = Box::pin(engine.acquire(request("n")));
    assert!(futures::poll!(again.as_mut()).is_pending());
    let before = store.started();
    drop(busy);
    until("h's batch is being confirmed", || {
        store.started() == before + 1
    })
    .await;
    drop(again);
    store.open();
    let _h = h.await.unwrap().unwrap();
    assert!(
        matches!(
            live.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty)
        ),
        "the live request was told something"
    );
    assert_eq!(
        queued(&engine).await,
        vec!["h".to_string(), "n".to_string()]
    );
}

fn hold(node: &str) -> AcquireRequest {
    AcquireRequest {
        manual: true,
        ..request(node)
    }
}

fn refused(answer: Result<(u64, Events), EngineError>) -> LeaseError {
    match answer {
        Err(EngineError::Lease(e)) => e,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("answered instead of refused"),
    }
}

/// Red-team finding on the backup capability: an agent that asked while
/// an operator held its node (`batonctl hold`, the runbook's way around
/// an older agent) was handed the hold's grant, resumed, and drained,
/// updated and rebooted the node under the operator's work (an older
/// agent without a backup); an agent whose need went away released the
/// operator's hold.
#[tokio::test]
async fn an_agent_is_never_handed_an_operators_hold() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut held) = engine.acquire(hold("cp")).await.unwrap();
    let token = next_grant(&mut held).await.fencing_token;
    for agent in [
        request("cp"),
        AcquireRequest {
            backs_up_control_plane: false,
            ..request("cp")
        },
    ] {
        let refusal = refused(engine.acquire(agent).await);
        assert_eq!(refusal, LeaseError::OperatorHold { node: n("cp") });
        assert_eq!(
            tonic::Status::from(EngineError::Lease(refusal)).code(),
            tonic::Code::FailedPrecondition
        );
    }
    // The operator's own process asking again still resumes it.
    let (_, mut again) = engine.acquire(hold("cp")).await.unwrap();
    assert_eq!(next_grant(&mut again).await.fencing_token, token);
    assert_eq!(
        store.saved().unwrap().holders[&n("cp")].fencing_token,
        token
    );
}

/// The same finding, the other way round: an agent's retry (its request
/// was superseded by the operator's hold) replaced the hold while it
/// waited its turn, and `batonctl hold` failed.
#[tokio::test]
async fn an_agents_request_does_not_replace_an_operators_queued_hold() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    let tx = next_grant(&mut x).await.fencing_token;
    let (_, mut agent) = engine.acquire(request("cp")).await.unwrap();
    next_queued(&mut agent).await;
    let (_, mut held) = engine.acquire(hold("cp")).await.unwrap();
    assert!(matches!(
        agent.recv().await,
        Some(Err(EngineError::Superseded(_)))
    ));
    let refusal = refused(engine.acquire(request("cp")).await);
    assert_eq!(refusal, LeaseError::OperatorHold { node: n("cp") });
    engine.release(&n("x"), tx, "x", "done").await.unwrap();
    assert_eq!(next_grant(&mut held).await.fencing_token, tx + 1);
}

/// An agent that cannot make control-plane backups (rolled back to an
/// older release) is not handed its node's grant while that grant still
/// needs a backup: it would drain without one. A current agent is.
#[tokio::test]
async fn an_agent_without_backups_is_not_handed_a_grant_that_still_needs_one() {
    let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
    let mut state = LeaseState::default();
    let token = state.grant(&n("cp"), true, false, "test", now).unwrap();
    state.holders.get_mut(&n("cp")).unwrap().backup_snapshot = Some("etcd-x.db".into());
    assert!(state.backup_missing(&n("cp")).is_some());
    let store = Arc::new(MemoryStore::new(Some(state)));
    let (engine, _) = engine_with(store, 1, Vec::new()).await;
    let older = AcquireRequest {
        backs_up_control_plane: false,
        ..request("cp")
    };
    let refusal = refused(engine.acquire(older).await);
    assert_eq!(refusal, LeaseError::BackupUnsupported { node: n("cp") });
    let (_, mut current) = engine.acquire(request("cp")).await.unwrap();
    let grant = next_grant(&mut current).await;
    assert_eq!((grant.fencing_token, grant.resumed), (token, true));
}

/// Red-team round 2, finding 1: callers carry deadlines. After one stall
/// of the lock as long as a deadline, the oldest caller got the lock with
/// less than a confirmation's time left and was cancelled mid-way, its
/// batch went back, and the next oldest got the lock exactly at that
/// deadline with only the gap to its predecessor left: while Acquires kept
/// coming closer together than one confirmation, none was answered again.
/// The batch's confirmation now runs to the end whatever its caller does.
/// Virtual time.
#[tokio::test(start_paused = true)]
async fn one_stall_as_long_as_a_deadline_does_not_stop_acquires_being_answered() {
    const RTT: std::time::Duration = std::time::Duration::from_millis(20);
    const DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store.clone(), 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    store.backend().set_latency(RTT);
    let start = tokio::time::Instant::now();
    {
        // The lock is busy for a deadline (a slow save, a new term's
        // reload during a store brown-out).
        let engine = engine.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let _busy = engine.inner.lock().await;
            tokio::time::sleep(DEADLINE).await;
        });
    }
    let mut asking = Vec::new();
    for i in 0..1600 {
        let engine = engine.clone();
        let at = start.elapsed();
        asking.push((
            at,
            tokio::spawn(async move {
                let answer =
                    tokio::time::timeout(DEADLINE, engine.acquire(request(&format!("n{i}"))));
                answer.await.map(|a| a.map(|(_, events)| events))
            }),
        ));
        tokio::time::sleep(RTT / 4).await;
    }
    let (mut late, mut answered) = (0, 0);
    let mut streams = Vec::new();
    for (at, asking) in asking {
        let answer = asking.await.unwrap();
        if at >= std::time::Duration::from_secs(4) {
            late += 1;
            if let Ok(Ok(events)) = answer {
                answered += 1;
                streams.push(events);
            }
        }
    }
    assert_eq!(late, 800);
    assert_eq!(answered, late, "asked long after the stall, answered");
}

/// Red-team round 2, finding 2: entries of callers that gave up while the
/// lock was busy stayed on the arrivals list until an Acquire took it.
/// They are pruned as the list grows.
#[tokio::test]
async fn arrivals_of_callers_that_gave_up_are_pruned_as_the_list_grows() {
    let store = Arc::new(MemoryStore::default());
    let (engine, _) = engine_with(store, 1, Vec::new()).await;
    let (_, mut x) = engine.acquire(request("x")).await.unwrap();
    next_grant(&mut x).await;
    let busy = engine.inner.lock().await;
    let gone = ask_behind(&engine, &names("g", 1024)).await;
    for asking in gone {
        asking.abort();
        assert!(asking.await.unwrap_err().is_cancelled());
    }
    assert_eq!(engine.arrivals.len(), 1024);
    let last = ask(&engine, "last");
    until("the last one arrived and the rest were pruned", || {
        engine.arrivals.len() == 1
    })
    .await;
    drop(busy);
    let _last = last.await.unwrap().unwrap();
    assert_eq!(queued(&engine).await, vec!["last".to_string()]);
}
