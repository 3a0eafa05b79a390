//! Red-team finding on issue 9: node facts (read by the guards) and the
//! unavailable nodes (read by the concurrency limit) change together. A
//! decision taken at any moment while the node watch publishes sees the old
//! facts with the old outages, or both new: never fresh facts (which lift
//! the "facts unknown" hold) with an unavailable set that does not yet
//! count the outage they report.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use super::*;
use crate::kube::nodes::{NodeFact, NodeFacts, NodeGuard, publish_facts};

fn ready(ready: bool) -> NodeFact {
    NodeFact {
        ready,
        control_plane: false,
        internal_ips: Vec::new(),
        labels: BTreeMap::new(),
    }
}

fn cluster(w2_ready: bool) -> impl FnOnce(&mut BTreeMap<String, NodeFact>) {
    move |m| {
        *m = [
            ("w1".to_string(), ready(true)),
            ("w2".to_string(), ready(w2_ready)),
        ]
        .into()
    }
}

#[tokio::test(start_paused = true)]
async fn a_decision_never_sees_fresh_node_facts_without_the_outages_they_report() {
    let facts = Arc::new(NodeFacts::new(StdDuration::from_secs(60)));
    let guard: Arc<dyn GrantGuard> = Arc::new(NodeGuard::new(facts.clone()));
    let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
    // No granter task: the test takes the granter's decisions itself, at
    // the moments that hurt.
    let engine = Engine::new(
        Arc::new(MemoryStore::default()),
        config(1),
        vec![guard],
        Vec::new(),
        Arc::new(move || now),
        Metrics::new(),
    )
    .await
    .unwrap();
    publish_facts(&engine, &facts, cluster(true), false).await;
    let (_, _w1) = engine.acquire(request("w1")).await.unwrap();

    // The API server stops answering: the facts go stale and hold w1 back.
    // Meanwhile w2 goes down.
    tokio::time::advance(StdDuration::from_secs(61)).await;
    let inner = engine.inner.lock().await;
    let held = engine.decide_now(&inner, now);
    assert_eq!(held.grant, None);
    assert!(
        held.reason_at(0)
            .unwrap()
            .text
            .contains("node facts are unknown"),
        "{held:?}"
    );

    // The watch comes back with w2 NotReady while a decision is under way
    // (the granter holds the engine's lock).
    let publisher = {
        let (engine, facts) = (engine.clone(), facts.clone());
        tokio::spawn(async move { publish_facts(&engine, &facts, cluster(false), false).await })
    };
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    let racing = engine.decide_now(&inner, now);
    assert_eq!(
        racing.grant, None,
        "w1 was granted from fresh facts while w2's outage was not counted yet: {racing:?}"
    );
    drop(inner);
    publisher.await.unwrap();

    // Both new: w2's outage takes the only slot.
    let inner = engine.inner.lock().await;
    let after = engine.decide_now(&inner, now);
    assert_eq!(after.grant, None);
    assert!(
        after
            .reason_at(0)
            .unwrap()
            .text
            .contains("w2 is unavailable"),
        "{after:?}"
    );
}
