//! Monitors that do not trust Baton, sampled from the host:
//! - [`hosts`]: nodes down at the same time, from the host's boot records (a
//!   node is down from the moment its container stops until its agent runs
//!   again in the next boot): never more than `--max-concurrent`, never two
//!   etcd nodes;
//! - [`members`]: etcd members down at the same time, from etcd's own view
//!   (each member asked through its own endpoint): never more than one;
//! - [`write_probe`]: a write every 100 ms through a member that is up;
//!   every write must be committed within the deadline (quorum was never
//!   lost);
//! - [`readiness`]: which coordinator answers ready (the lab's view of the
//!   leader, which also steers the front).
//!
//! Each records what it sees in [`Seen`] and every violation at once (with
//! when and why); the end-of-run checks live in [`super::verdicts`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_tests::nspawn::Node;
use chrono::Utc;
use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::nodes::{Plan, scan_processes};
use super::seen::{BootSeen, Probe, Shared, Time};

/// How often the host and etcd are sampled.
const SAMPLE: Duration = Duration::from_millis(100);

async fn tick(interval: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(interval) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Host records: boots of every node, whether its agent runs, and from those
/// the down intervals; checks the concurrency limits on every sample.
pub async fn hosts(
    nodes: Arc<Vec<Node>>,
    plans: Vec<Plan>,
    max_concurrent: usize,
    shared: Shared,
    cancel: CancellationToken,
) {
    // Per node: the index of the boot whose end opened the current down
    // interval.
    let mut down_from_boot: BTreeMap<String, usize> = BTreeMap::new();
    let mut in_violation = false;
    while tick(SAMPLE, &cancel).await {
        let agents = tokio::task::spawn_blocking(|| scan_processes().agents)
            .await
            .unwrap_or_default();
        let now = Utc::now();
        let mut seen = shared.lock();
        for node in nodes.iter() {
            let boots: Vec<BootSeen> = node
                .boots()
                .into_iter()
                .map(|b| BootSeen {
                    boot_id: b.boot_id,
                    started: b.started.into(),
                    ended: b.ended.map(Into::into),
                    exit_code: b.exit_code,
                })
                .collect();
            let entry = seen.nodes.entry(node.name().to_string()).or_default();
            let last = boots.len().saturating_sub(1);
            match down_from_boot.get(node.name()).copied() {
                None => {
                    if let Some(ended) = boots.last().and_then(|b| b.ended) {
                        entry.down.push((ended, None));
                        down_from_boot.insert(node.name().to_string(), last);
                    }
                }
                Some(index) => {
                    if boots.len() > index + 1 && agents.contains_key(node.name()) {
                        if let Some(open) = entry.down.last_mut() {
                            open.1 = Some(now);
                        }
                        down_from_boot.remove(node.name());
                    }
                }
            }
            entry.boots = boots;
        }
        let down: Vec<&Plan> = plans
            .iter()
            .filter(|p| down_from_boot.contains_key(&p.name))
            .collect();
        let etcd_down = down.iter().filter(|p| p.is_etcd()).count();
        let bad = down.len() > max_concurrent || etcd_down > 1;
        if bad && !in_violation {
            let names: Vec<&str> = down.iter().map(|p| p.name.as_str()).collect();
            seen.violation(
                "nodes-down",
                now,
                format!(
                    "{} nodes down at once ({}), {etcd_down} of them etcd nodes; the limit is {max_concurrent} and one etcd node",
                    names.len(),
                    names.join(", ")
                ),
            );
        }
        in_violation = bad;
    }
}

/// A client of one member only (so it asks exactly that member).
async fn member_client(url: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    Client::connect([url], Some(options)).await.ok()
}

/// etcd's own view: every member asked for its Status through its own
/// endpoint; one that does not answer within a second is down.
pub async fn members(plans: Vec<Plan>, shared: Shared, cancel: CancellationToken) {
    let members: Vec<(String, String)> = plans
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.client_url()?)))
        .collect();
    let mut clients: BTreeMap<String, Client> = BTreeMap::new();
    let mut in_violation = false;
    while tick(Duration::from_millis(250), &cancel).await {
        let mut answers = Vec::new();
        for (name, url) in &members {
            if !clients.contains_key(name)
                && let Some(c) = member_client(url).await
            {
                clients.insert(name.clone(), c);
            }
            let answer = match clients.get_mut(name) {
                Some(c) => tokio::time::timeout(Duration::from_secs(1), c.status())
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            if answer.is_none() {
                clients.remove(name);
            }
            answers.push((name.clone(), answer));
        }
        let now = Utc::now();
        let mut seen = shared.lock();
        let mut down = Vec::new();
        for (name, answer) in answers {
            let entry = seen.members.entry(name.clone()).or_default();
            let up = answer.is_some();
            entry.leader = answer
                .as_ref()
                .and_then(|s| s.header().map(|h| h.member_id() == s.leader()))
                .unwrap_or(false);
            if up != entry.up || entry.down.is_empty() && !up {
                if up {
                    if let Some(open) = entry.down.last_mut().filter(|d| d.1.is_none()) {
                        open.1 = Some(now);
                    }
                } else {
                    entry.down.push((now, None));
                }
            }
            entry.up = up;
            if !up {
                down.push(name);
            }
        }
        let bad = down.len() > 1;
        if bad && !in_violation {
            seen.violation(
                "etcd-members-down",
                now,
                format!(
                    "{} etcd members down at once ({}): quorum needs all but one of 3",
                    down.len(),
                    down.join(", ")
                ),
            );
        }
        in_violation = bad;
    }
}

/// The members the probe may write through now: their node is up (host
/// view) and the lab has not paused them.
fn writable(shared: &Shared, plans: &[Plan]) -> Vec<(String, String)> {
    let seen = shared.lock();
    plans
        .iter()
        .filter(|p| {
            let node_up = seen
                .nodes
                .get(&p.name)
                .is_none_or(|n| n.down.last().is_none_or(|d| d.1.is_some()));
            let paused = seen
                .faults
                .iter()
                .any(|f| f.kind == "pause-etcd-member" && f.until.is_none() && f.target == p.name);
            node_up && !paused
        })
        .filter_map(|p| Some((p.name.clone(), p.client_url()?)))
        .collect()
}

/// One probe write: tries members that are up, one after another, until it
/// is committed or the deadline passes.
async fn probe_once(
    shared: Shared,
    plans: Arc<Vec<Plan>>,
    seq: u64,
    deadline: Duration,
    clients: Arc<tokio::sync::Mutex<BTreeMap<String, Client>>>,
) {
    let at = Utc::now();
    let started = tokio::time::Instant::now();
    let end = started + deadline;
    let mut last_error = String::from("no member was up");
    let mut attempt = 0usize;
    while tokio::time::Instant::now() < end {
        let candidates = writable(&shared, &plans);
        if candidates.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let (name, url) = &candidates[(seq as usize + attempt) % candidates.len()];
        attempt += 1;
        let client = {
            let cached = clients.lock().await.get(name).cloned();
            match cached {
                Some(c) => Some(c),
                None => member_client(url).await,
            }
        };
        let Some(mut client) = client else {
            last_error = format!("{name}: cannot connect");
            continue;
        };
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let put = client.put("/lab/probe", seq.to_string(), None);
        match tokio::time::timeout(left.min(Duration::from_secs(2)), put).await {
            Ok(Ok(_)) => {
                clients.lock().await.insert(name.clone(), client);
                shared.lock().probes.push(Probe {
                    at,
                    latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                    ok: true,
                    via: name.clone(),
                });
                return;
            }
            Ok(Err(e)) => last_error = format!("{name}: {e}"),
            Err(_) => last_error = format!("{name}: no answer"),
        }
        clients.lock().await.remove(name);
    }
    let mut seen = shared.lock();
    seen.probes.push(Probe {
        at,
        latency_ms: deadline.as_secs_f64() * 1000.0,
        ok: false,
        via: last_error.clone(),
    });
    seen.violation(
        "etcd-writes",
        at,
        format!(
            "a write started at {} was not committed within {} (last error: {last_error}): quorum was lost",
            at.format("%H:%M:%S%.3f"),
            humantime_secs(deadline)
        ),
    );
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Writes every 100 ms through a member that is up (each write on its own
/// task, so a slow one does not delay the next; at most 100 in flight).
pub async fn write_probe(
    plans: Vec<Plan>,
    deadline: Duration,
    shared: Shared,
    cancel: CancellationToken,
) {
    let plans = Arc::new(plans);
    let clients = Arc::new(tokio::sync::Mutex::new(BTreeMap::new()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(100));
    let mut seq = 0u64;
    let mut interval = tokio::time::interval(SAMPLE);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = cancel.cancelled() => break,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        seq += 1;
        let task = probe_once(
            shared.clone(),
            plans.clone(),
            seq,
            deadline,
            clients.clone(),
        );
        tokio::spawn(async move {
            task.await;
            drop(permit);
        });
    }
    // Let the writes in flight finish (each is bounded by the deadline).
    let _ = in_flight.acquire_many(100).await;
}

/// Which coordinator answers ready, every 100 ms: steers the front and
/// records the lab's view of the leader.
pub async fn readiness(
    replicas: Vec<(String, String)>,
    ready: watch::Sender<Vec<bool>>,
    shared: Shared,
    cancel: CancellationToken,
) {
    while tick(SAMPLE, &cancel).await {
        let answers = futures_join(&replicas).await;
        let ready_ids: Vec<String> = replicas
            .iter()
            .zip(&answers)
            .filter(|(_, r)| **r)
            .map(|((id, _), _)| id.clone())
            .collect();
        ready.send_replace(answers);
        let now: Time = Utc::now();
        let mut seen = shared.lock();
        let previous = seen.leader().map(str::to_string);
        let leader = match ready_ids.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            several => {
                seen.several_ready.push((now, several.to_vec()));
                previous
                    .clone()
                    .filter(|p| several.contains(p))
                    .or_else(|| several.first().cloned())
            }
        };
        if seen.leaders.is_empty() || leader != previous {
            seen.leaders.push((now, leader.clone()));
            let line = match &leader {
                Some(l) => format!("coordinator {l} leads"),
                None => "no coordinator is ready".to_string(),
            };
            seen.note(line);
        }
    }
}

async fn futures_join(replicas: &[(String, String)]) -> Vec<bool> {
    let probes: Vec<_> = replicas
        .iter()
        .map(|(_, metrics)| {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                super::front::probe_ready(&metrics, Duration::from_secs(1)).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for p in probes {
        out.push(p.await.unwrap_or(false));
    }
    out
}
