//! `--chaos`: faults injected during the rollout, chosen by a seed and
//! triggered by what the lab sees (so a seed replays the same plan):
//! 1. SIGKILL the leading coordinator when the first node starts updating
//!    (or rebooting, by the seed); a second later it is started again, as a
//!    supervisor would;
//! 2. SIGKILL the agent of one node (by the seed) right after its update
//!    started (its update script recorded the start on the node's disk);
//!    systemd restarts it inside the node;
//! 3. SIGSTOP the etcd member of a node that is not in maintenance right
//!    after an etcd node released, while another etcd node waits, for a few
//!    seconds: the guard must hold the waiting etcd node with a visible
//!    reason, and go on after SIGCONT;
//! 4. SIGSTOP the leading coordinator while a node holds the baton, past
//!    its election TTL, then SIGCONT.
//!
//! Every fault goes into [`Seen::faults`] with when, whom and what Baton
//! did about it as seen from outside.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_tests::etcd::coordinator::Coordinator;
use baton_tests::nspawn::Node;
use chrono::Utc;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::nodes::{Plan, scan_processes, timings};
use super::seen::{Fault, Seen, Shared};

/// The fault plan a seed gives.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    /// Kill the leader when the first node reaches this phase.
    pub kill_leader_at: &'static str,
    /// The node whose agent is killed mid-update.
    pub agent_victim: String,
    /// How long the etcd member stays paused.
    pub member_pause: Duration,
    /// How long past the election TTL the leader stays frozen.
    pub freeze_extra: Duration,
}

impl ChaosPlan {
    /// The plan for `seed` over `plans`.
    pub fn new(seed: u64, plans: &[Plan]) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let kill_leader_at = if rng.gen_bool(0.5) {
            "updating"
        } else {
            "rebooting"
        };
        let agent_victim = plans[rng.gen_range(0..plans.len())].name.clone();
        Self {
            kill_leader_at,
            agent_victim,
            member_pause: Duration::from_millis(rng.gen_range(6000..9000)),
            freeze_extra: Duration::from_millis(rng.gen_range(2000..4000)),
        }
    }
}

/// What chaos acts on.
pub struct Targets {
    /// The two coordinators.
    pub coordinators: Arc<Mutex<Vec<Coordinator>>>,
    /// The nodes.
    pub nodes: Arc<Vec<Node>>,
    /// The nodes' plans.
    pub plans: Vec<Plan>,
    /// The coordinators' election TTL.
    pub election_ttl: Duration,
}

async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Waits (polling every 100 ms) until `check` is Some; None on cancel.
async fn until<T>(cancel: &CancellationToken, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if !sleep(Duration::from_millis(100), cancel).await {
            return None;
        }
    }
}

fn signal(pid: i32, signal: Signal) -> bool {
    kill(Pid::from_raw(pid), signal).is_ok()
}

fn push_fault(seen: &mut Seen, kind: &str, target: &str, detail: String) -> usize {
    seen.note(format!("CHAOS {kind}: {detail}"));
    seen.faults.push(Fault {
        at: Utc::now(),
        until: None,
        kind: kind.into(),
        target: target.into(),
        detail,
        effect: String::new(),
    });
    seen.faults.len() - 1
}

/// Runs the plan until every fault was injected or `cancel`.
pub async fn run(plan: ChaosPlan, targets: Targets, shared: Shared, cancel: CancellationToken) {
    let agent = tokio::spawn(kill_agent(
        plan.clone(),
        targets.nodes.clone(),
        shared.clone(),
        cancel.clone(),
    ));
    kill_leader(&plan, &targets, &shared, &cancel).await;
    pause_member(&plan, &targets, &shared, &cancel).await;
    freeze_leader(&plan, &targets, &shared, &cancel).await;
    let _ = agent.await;
}

/// The lab's current leader's index among the coordinators.
fn leader_index(targets: &Targets, shared: &Shared) -> Option<usize> {
    let leader = shared.lock().leader()?.to_string();
    let coordinators = targets
        .coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    coordinators.iter().position(|c| c.id == leader)
}

async fn kill_leader(
    plan: &ChaosPlan,
    targets: &Targets,
    shared: &Shared,
    cancel: &CancellationToken,
) {
    let phase = plan.kill_leader_at;
    let Some(index) = until(cancel, || {
        let reached = shared
            .lock()
            .nodes
            .values()
            .any(|n| n.phases.iter().any(|(_, p, _)| p == phase));
        if reached {
            leader_index(targets, shared)
        } else {
            None
        }
    })
    .await
    else {
        return;
    };
    let id = {
        let mut coordinators = targets
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        coordinators[index].kill();
        coordinators[index].id.clone()
    };
    let at = push_fault(
        &mut shared.lock(),
        "kill-coordinator",
        &id,
        format!("SIGKILL the leading coordinator {id} when the first node reached {phase}"),
    );
    if !sleep(Duration::from_secs(1), cancel).await {
        return;
    }
    let restarted = {
        let mut coordinators = targets
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        coordinators[index].restart()
    };
    let mut seen = shared.lock();
    seen.faults[at].until = Some(Utc::now());
    match restarted {
        Ok(()) => seen.note(format!("coordinator {id} started again (as a follower)")),
        Err(e) => seen.note(format!("could not start coordinator {id} again: {e:#}")),
    }
}

async fn kill_agent(
    plan: ChaosPlan,
    nodes: Arc<Vec<Node>>,
    shared: Shared,
    cancel: CancellationToken,
) {
    let Some(node) = nodes.iter().find(|n| n.name() == plan.agent_victim) else {
        return;
    };
    let rootfs = node.rootfs();
    let name = node.name().to_string();
    let Some(pid) = until(&cancel, || {
        let started = timings(&rootfs)
            .iter()
            .any(|(what, _)| what == "update-start");
        if started {
            scan_processes().agents.get(&name).copied()
        } else {
            None
        }
    })
    .await
    else {
        return;
    };
    if !signal(pid, Signal::SIGKILL) {
        return;
    }
    let at = push_fault(
        &mut shared.lock(),
        "kill-agent",
        &name,
        format!("SIGKILL the agent of {name} (pid {pid}) while its update runs"),
    );
    let killed_at = tokio::time::Instant::now();
    let back = tokio::time::timeout(
        Duration::from_secs(30),
        until(&cancel, || {
            scan_processes()
                .agents
                .get(&name)
                .copied()
                .filter(|p| *p != pid)
        }),
    )
    .await;
    let mut seen = shared.lock();
    seen.faults[at].effect = match back {
        Ok(Some(new)) => format!(
            "systemd restarted the agent (pid {new}) after {:.1} s",
            killed_at.elapsed().as_secs_f64()
        ),
        _ => "the agent did not come back within 30 s".into(),
    };
}

/// The pause: right after an etcd node released while another etcd node
/// waits for the guard (its reason starts with "etcd:"), pause the member of a third etcd node (neither the one that just
/// came back nor the one waiting). If an etcd node turns out to hold the
/// baton already (the lab was too slow), the member is let go at once and
/// the lab tries again at the next etcd release.
async fn pause_member(
    plan: &ChaosPlan,
    targets: &Targets,
    shared: &Shared,
    cancel: &CancellationToken,
) {
    let etcd: Vec<&Plan> = targets.plans.iter().filter(|p| p.is_etcd()).collect();
    if etcd.len() < 3 {
        shared
            .lock()
            .note("CHAOS pause-etcd-member skipped: fewer than 3 etcd nodes");
        return;
    }
    let mut releases_seen = 0usize;
    loop {
        let Some((released, waiting, victim)) = until(cancel, || {
            let seen = shared.lock();
            let start = seen.started?;
            let releases: Vec<(&String, chrono::DateTime<Utc>)> = etcd
                .iter()
                .filter_map(|p| {
                    let n = seen.nodes.get(&p.name)?;
                    n.releases
                        .iter()
                        .filter(|(t, ..)| *t >= start)
                        .map(|(t, ..)| (&p.name, *t))
                        .next_back()
                })
                .collect();
            if releases.len() <= releases_seen {
                return None;
            }
            let (released, _) = releases.iter().max_by_key(|(_, t)| *t)?;
            // The guard itself must be what holds the waiting etcd node
            // (not the concurrency limit), so its reason can show the pause.
            let waiting = etcd.iter().find(|p| {
                seen.nodes
                    .get(&p.name)
                    .is_some_and(|n| n.phase == "waiting" && n.reason.starts_with("etcd:"))
            })?;
            let holding = etcd
                .iter()
                .any(|p| seen.nodes.get(&p.name).is_some_and(|n| n.token != 0));
            if holding {
                return None;
            }
            let victim = etcd
                .iter()
                .find(|p| p.name != **released && p.name != waiting.name)?;
            Some((
                (*released).clone(),
                waiting.name.clone(),
                victim.name.clone(),
            ))
        })
        .await
        else {
            return;
        };
        releases_seen += 1;
        let Some(pid) = scan_processes().members.get(&victim).copied() else {
            continue;
        };
        if !signal(pid, Signal::SIGSTOP) {
            continue;
        }
        let index = push_fault(
            &mut shared.lock(),
            "pause-etcd-member",
            &victim,
            format!(
                "SIGSTOP etcd member {victim} (pid {pid}) for {:.1} s, right after {released} released, while {waiting} waits",
                plan.member_pause.as_secs_f64()
            ),
        );
        let raced = {
            let seen = shared.lock();
            etcd.iter()
                .any(|p| seen.nodes.get(&p.name).is_some_and(|n| n.token != 0))
        };
        if raced {
            signal(pid, Signal::SIGCONT);
            let mut seen = shared.lock();
            seen.faults[index].until = Some(Utc::now());
            seen.faults[index].effect =
                "an etcd node already held the baton; let go at once, trying again later".into();
            seen.faults[index].kind = "pause-etcd-member-aborted".into();
            continue;
        }
        sleep(plan.member_pause, cancel).await;
        signal(pid, Signal::SIGCONT);
        let mut seen = shared.lock();
        let until = Utc::now();
        let fault_at = seen.faults[index].at;
        seen.faults[index].until = Some(until);
        let reasons: Vec<String> = seen
            .nodes
            .get(&waiting)
            .map(|n| {
                n.reasons
                    .iter()
                    .filter(|(t, _)| *t >= fault_at)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default();
        seen.faults[index].effect = match reasons.iter().find(|r| r.contains(&victim)) {
            Some(r) => format!("{waiting} was held: \"{r}\""),
            // No coordinator answered Status during the whole pause (the
            // leader was changing hands): nothing to read, so only the
            // grant check (no etcd node granted during the pause) can
            // judge; say so instead of passing silently.
            None if reasons.is_empty() => format!(
                "{waiting} was held, but no reason could be read during the pause (no coordinator answered Status)"
            ),
            None => format!("{waiting} showed no reason naming {victim} (reasons: {reasons:?})"),
        };
        return;
    }
}

async fn freeze_leader(
    plan: &ChaosPlan,
    targets: &Targets,
    shared: &Shared,
    cancel: &CancellationToken,
) {
    let Some((index, pid)) = until(cancel, || {
        let holding = shared.lock().nodes.values().any(|n| n.token != 0);
        if !holding {
            return None;
        }
        let index = leader_index(targets, shared)?;
        let coordinators = targets
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let c = &coordinators[index];
        c.running().then(|| (index, c.pid().as_raw()))
    })
    .await
    else {
        return;
    };
    let id = targets
        .coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner())[index]
        .id
        .clone();
    let freeze = targets.election_ttl + plan.freeze_extra;
    signal(pid, Signal::SIGSTOP);
    let at = push_fault(
        &mut shared.lock(),
        "freeze-coordinator",
        &id,
        format!(
            "SIGSTOP the leading coordinator {id} for {:.1} s (election TTL {:.0} s) while a node holds the baton",
            freeze.as_secs_f64(),
            targets.election_ttl.as_secs_f64()
        ),
    );
    sleep(freeze, cancel).await;
    signal(pid, Signal::SIGCONT);
    shared.lock().faults[at].until = Some(Utc::now());
}

/// Fills in what each coordinator fault led to, from the leader timeline.
pub fn describe_effects(seen: &mut Seen) {
    let leaders = seen.leaders.clone();
    for fault in seen.faults.iter_mut() {
        if !fault.kind.ends_with("-coordinator") {
            continue;
        }
        let next = leaders
            .iter()
            .filter(|(t, l)| *t > fault.at && l.is_some())
            .find(|(_, l)| l.as_deref() != Some(fault.target.as_str()));
        fault.effect = match next {
            Some((t, Some(l))) => format!(
                "{l} took over after {:.1} s",
                (*t - fault.at).num_milliseconds() as f64 / 1000.0
            ),
            _ => "no other coordinator took over".into(),
        };
    }
}
