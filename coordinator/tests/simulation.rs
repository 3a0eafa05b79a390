//! Deterministic simulation of the coordinator engine (issue 9).
//!
//! Two or three replicas run the real [`Engine`] over one strict in-memory
//! store ([`MemoryBackend`]: leadership terms, compare-and-swap on the
//! state's revision, elections and depositions the replicas hear about late
//! or not at all, saves that fail, saves that happen but whose answer is
//! lost, failing confirmations and loads, latency past the store timeout).
//! Agents and an operator call them; replicas crash and restart; the wall
//! clock jumps both ways; grant preparations are slow, hang past their
//! timeout or fail. Everything runs on one thread under tokio's paused
//! clock, driven by a seeded random schedule, so a seed is a replayable
//! history.
//!
//! After every step a checker looks at the store's truth and at what every
//! client was told:
//! - no token is ever stored for two nodes, and the last token never goes
//!   back (the store's oracle sees every write);
//! - holders stay within the limit, never two control-plane nodes;
//! - no holder disappears without a release or force-release for it;
//! - every answer other than UNAVAILABLE (acks, refusals, reads, resumed
//!   grants) comes from the replica that truly leads, and agrees with the
//!   stored state at that moment: an "ok" to a renewal is never given for a
//!   token that is not current, a refusal never for one that is;
//! - every grant an agent receives was stored for that node;
//! - after the run settles (a healthy store, everyone told who leads), no
//!   agent still waits on the leader for a baton its node holds in the
//!   store (a grant whose answer was lost reaches its waiter).
//!
//! Environment: `BATON_SIM_SEEDS` (how many seeds, default 2000),
//! `BATON_SIM_SEED` (replay one seed and print its trace),
//! `BATON_SIM_STEPS` (steps per seed, default 150).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use baton_coordinator::engine::{
    AcquireRequest, AcquireUpdate, Engine, EngineConfig, EngineError, GrantPreparer,
};
use baton_coordinator::metrics::Metrics;
use baton_coordinator::node::NodeName;
use baton_coordinator::policy::{Policy, Waiter};
use baton_coordinator::state::{LeaseState, Phase, Progress};
use baton_coordinator::store::memory::{Faults, MemoryBackend};
use chrono::{DateTime, Duration, TimeZone, Utc};
use futures::future::BoxFuture;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::task::JoinHandle;
use tonic::Code;

/// splitmix64: small, fast and the same everywhere.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

/// A grant preparation (the etcd snapshot) that is usually quick, sometimes
/// slow, sometimes hangs past the prepare timeout, sometimes fails.
struct SlowPreparer(Mutex<Rng>);

impl GrantPreparer for SlowPreparer {
    fn prepare<'a>(&'a self, _: &'a Waiter) -> BoxFuture<'a, Result<(), String>> {
        let (millis, fail) = {
            let mut rng = self.0.lock().unwrap();
            let millis = match rng.below(20) {
                0..=11 => 0,
                12..=16 => rng.below(10_000),
                _ => 20_000 + rng.below(40_000),
            };
            (millis, rng.chance(5))
        };
        Box::pin(async move {
            tokio::time::sleep(StdDuration::from_millis(millis)).await;
            if fail {
                Err("sim: snapshot failed".to_string())
            } else {
                Ok(())
            }
        })
    }
}

type Events = mpsc::UnboundedReceiver<Result<AcquireUpdate, EngineError>>;

struct Replica {
    name: String,
    incarnation: u32,
    engine: Option<Arc<Engine>>,
    granter: Option<JoinHandle<()>>,
}

impl Replica {
    fn id(&self) -> String {
        format!("{}#{}", self.name, self.incarnation)
    }
}

struct Agent {
    node: NodeName,
    control_plane: bool,
    /// An open Acquire stream and the replica it is on.
    waiting: Option<(usize, Events)>,
    /// The token this agent believes it holds.
    holding: Option<u64>,
    /// Tokens it held before (a restarted agent may present one).
    old_tokens: Vec<u64>,
}

/// What happened in a run, to see that the schedule reaches the
/// interesting cases.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    grants: u64,
    acks: u64,
    refusals: u64,
    unavailable: u64,
    force_releases: u64,
    elections: u64,
    crashes: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.grants += o.grants;
        self.acks += o.acks;
        self.refusals += o.refusals;
        self.unavailable += o.unavailable;
        self.force_releases += o.force_releases;
        self.elections += o.elections;
        self.crashes += o.crashes;
    }
}

struct Sim {
    stats: Stats,
    rng: Rng,
    backend: Arc<MemoryBackend>,
    replicas: Vec<Replica>,
    agents: Vec<Agent>,
    clock: Arc<Mutex<DateTime<Utc>>>,
    config: EngineConfig,
    trace: Vec<String>,
    started: tokio::time::Instant,
    step: usize,
    /// Nodes a release or force-release was asked for during this step.
    removals: BTreeSet<NodeName>,
    previous_holders: BTreeMap<NodeName, u64>,
    previous_last_token: u64,
}

fn n(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}

fn code(e: &EngineError) -> Code {
    baton_coordinator::status_map::code(e)
}

impl Sim {
    async fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let backend = MemoryBackend::new();
        backend.put(&LeaseState::default());
        let clock = Arc::new(Mutex::new(
            Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
        ));
        let max_concurrent = 1 + rng.below(2) as u32;
        let config = EngineConfig {
            overdue_after: Duration::seconds(60),
            prepare_timeout: StdDuration::from_secs(30),
            store_timeout: StdDuration::from_secs(5),
            ..EngineConfig::new(
                Policy {
                    max_concurrent,
                    ..Policy::default()
                },
                "sim",
            )
        };
        let names = ["a", "b", "c"];
        let replicas = (0..2 + rng.below(2) as usize)
            .map(|i| Replica {
                name: names[i].to_string(),
                incarnation: 0,
                engine: None,
                granter: None,
            })
            .collect();
        let agents = ["cp-1", "cp-2", "cp-3", "w-1", "w-2"]
            .iter()
            .map(|name| Agent {
                node: n(name),
                control_plane: name.starts_with("cp"),
                waiting: None,
                holding: None,
                old_tokens: Vec::new(),
            })
            .collect();
        let mut sim = Self {
            stats: Stats::default(),
            rng,
            backend,
            replicas,
            agents,
            clock,
            config,
            trace: Vec::new(),
            started: tokio::time::Instant::now(),
            step: 0,
            removals: BTreeSet::new(),
            previous_holders: BTreeMap::new(),
            previous_last_token: 0,
        };
        sim.log(format!(
            "seed {seed}: {} replicas, max_concurrent {max_concurrent}",
            sim.replicas.len()
        ));
        for r in 0..sim.replicas.len() {
            sim.start_replica(r).await;
        }
        let first = sim.replicas[0].id();
        sim.backend.elect(&first);
        sim.log(format!("elect {first} (published)"));
        sim
    }

    fn log(&mut self, line: String) {
        let at = self.started.elapsed().as_millis();
        self.trace
            .push(format!("#{:<4} t={at:>8}ms  {line}", self.step));
    }

    async fn start_replica(&mut self, r: usize) {
        self.replicas[r].incarnation += 1;
        let id = self.replicas[r].id();
        let store = Arc::new(self.backend.replica(&id));
        let clock = self.clock.clone();
        let preparer = Arc::new(SlowPreparer(Mutex::new(Rng(self.rng.next()))));
        let config = EngineConfig {
            coordinator_id: id.clone(),
            ..self.config.clone()
        };
        match Engine::new(
            store,
            config,
            Vec::new(),
            vec![preparer],
            Arc::new(move || *clock.lock().unwrap()),
            Metrics::new(),
        )
        .await
        {
            Ok(engine) => {
                self.replicas[r].granter = Some(tokio::spawn(engine.clone().run_granter()));
                self.replicas[r].engine = Some(engine);
                self.log(format!("start {id}"));
            }
            Err(e) => self.log(format!("start {id} failed: {e}")),
        }
    }

    fn crash_replica(&mut self, r: usize) {
        if let Some(granter) = self.replicas[r].granter.take() {
            granter.abort();
        }
        self.replicas[r].engine = None;
        let id = self.replicas[r].id();
        self.stats.crashes += 1;
        self.log(format!("crash {id}"));
    }

    /// A replica for a client call: usually one that believes it leads (as
    /// a Service routes to the Ready pod), sometimes any.
    fn target(&mut self) -> Option<(usize, Arc<Engine>, String)> {
        let believers: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| {
                self.replicas[r]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.leadership().is_leader)
            })
            .collect();
        let r = match self.rng.pick(&believers) {
            Some(&r) if self.rng.chance(75) => r,
            _ => self.rng.below(self.replicas.len() as u64) as usize,
        };
        let engine = self.replicas[r].engine.clone()?;
        Some((r, engine, self.replicas[r].id()))
    }

    fn truth(&self) -> LeaseState {
        self.backend
            .stored()
            .expect("the simulation never deletes the state")
    }

    fn holds(&self, node: &NodeName, token: u64) -> bool {
        self.backend.inspect(|state| {
            state
                .and_then(|s| s.holders.get(node))
                .is_some_and(|h| h.fencing_token == token)
        })
    }

    /// Every answer that is not UNAVAILABLE comes from the true leader.
    fn answered_by_leader(&mut self, replica: &str, what: &str) -> Result<(), String> {
        self.stats.acks += 1;
        let (leader, term) = self.backend.leader();
        if leader.as_deref() != Some(replica) {
            return Err(format!(
                "{what}: answered by {replica}, but the leader is {leader:?} (term {term})"
            ));
        }
        Ok(())
    }

    /// Classifies an error answer: UNAVAILABLE is always allowed; anything
    /// else is an answer and must come from the leader.
    fn refused(&mut self, replica: &str, what: &str, e: &EngineError) -> Result<Code, String> {
        let c = code(e);
        match c {
            Code::Unavailable => {
                self.stats.unavailable += 1;
                Ok(c)
            }
            Code::FailedPrecondition => {
                self.answered_by_leader(replica, what)?;
                self.stats.refusals += 1;
                Ok(c)
            }
            other => Err(format!("{what}: unexpected answer {other:?}: {e}")),
        }
    }

    /// Checks an error answer to a call carrying `token` for `node`: a
    /// refusal must come from the leader and be true of the store. Returns
    /// whether it was a refusal (the agent then knows its token is gone).
    fn refused_token(
        &mut self,
        replica: &str,
        what: &str,
        e: &EngineError,
        node: &NodeName,
        token: u64,
    ) -> Result<bool, String> {
        let c = self.refused(replica, what, e)?;
        self.log(format!("{what} on {replica}: {c:?} {e}"));
        if c != Code::FailedPrecondition {
            return Ok(false);
        }
        if self.holds(node, token) {
            return Err(format!(
                "{what}: refused by {replica}, but it is current: {e}"
            ));
        }
        Ok(true)
    }

    async fn run_step(&mut self) -> Result<(), String> {
        self.step += 1;
        match self.rng.below(100) {
            0..=17 => self.acquire().await?,
            18..=35 => self.renew_or_report().await?,
            36..=45 => self.release().await?,
            46..=48 => self.stale_call().await?,
            49..=51 => self.force_release().await?,
            52 => self.pause_or_resume().await?,
            53..=56 => self.status().await?,
            57..=60 => self.leadership(),
            61 => self.crash_or_restart().await,
            62..=64 => self.clock_jump(),
            65..=67 => self.faults(),
            68..=69 => self.agent_restart(),
            _ => self.advance().await,
        }
        self.poll_streams()?;
        self.check()
    }

    async fn acquire(&mut self) -> Result<(), String> {
        let idle: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].waiting.is_none() && self.agents[i].holding.is_none())
            .collect();
        let Some(&i) = self.rng.pick(&idle) else {
            return Ok(());
        };
        let Some((r, engine, id)) = self.target() else {
            return Ok(());
        };
        let (node, control_plane) = (self.agents[i].node.clone(), self.agents[i].control_plane);
        let result = engine
            .acquire(AcquireRequest {
                node: node.clone(),
                control_plane,
                reason: "sim".to_string(),
                manual: false,
                backs_up_control_plane: true,
            })
            .await;
        match result {
            Ok((_, mut events)) => {
                self.answered_by_leader(&id, &format!("acquire {node}"))?;
                match events.try_recv() {
                    // The granter may grant it (a save of its own) before
                    // the Acquire's answer reached the caller: the Acquires
                    // of a batch are answered by a task of their own.
                    Ok(Ok(AcquireUpdate::Granted(g))) if !g.resumed => {
                        self.take_grant(i, g.fencing_token, &format!("at once by {id}"))?;
                    }
                    Ok(Ok(AcquireUpdate::Granted(g))) => {
                        if !self.holds(&node, g.fencing_token) {
                            return Err(format!(
                                "acquire {node} on {id}: immediate grant {g:?} that the store does not hold"
                            ));
                        }
                        self.log(format!(
                            "acquire {node} on {id}: resumed token {}",
                            g.fencing_token
                        ));
                        self.agents[i].holding = Some(g.fencing_token);
                    }
                    _ => {
                        self.log(format!("acquire {node} on {id}: queued"));
                        self.agents[i].waiting = Some((r, events));
                    }
                }
            }
            Err(e) => {
                let c = self.refused(&id, &format!("acquire {node}"), &e)?;
                self.log(format!("acquire {node} on {id}: {c:?} {e}"));
            }
        }
        Ok(())
    }

    fn holder_agents(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].holding.is_some())
            .collect()
    }

    /// The agent learned its token is not current (refused): it stops.
    fn lost(&mut self, i: usize) {
        if let Some(token) = self.agents[i].holding.take() {
            self.agents[i].old_tokens.push(token);
        }
    }

    async fn renew_or_report(&mut self) -> Result<(), String> {
        let Some(&i) = self.rng.pick(&self.holder_agents()) else {
            return Ok(());
        };
        let token = self.agents[i].holding.expect("a holder");
        self.renew_with(i, token).await
    }

    async fn renew_with(&mut self, i: usize, token: u64) -> Result<(), String> {
        let Some((_, engine, id)) = self.target() else {
            return Ok(());
        };
        let node = self.agents[i].node.clone();
        let report = self.rng.chance(40);
        let result = if report {
            let phases = [
                Phase::Draining,
                Phase::Updating,
                Phase::Rebooting,
                Phase::Verifying,
                Phase::Failed,
            ];
            let phase = *self.rng.pick(&phases).unwrap();
            let progress = Progress {
                phase,
                boot_id: format!("boot-{}", self.rng.below(3)),
                message: "sim".to_string(),
                error: String::new(),
            };
            engine.report(&node, token, progress).await
        } else {
            engine.renew(&node, token).await.map(|_| ())
        };
        let what = format!(
            "{} {node} token {token}",
            if report { "report" } else { "renew" }
        );
        match result {
            Ok(()) => {
                self.answered_by_leader(&id, &what)?;
                if !self.holds(&node, token) {
                    return Err(format!(
                        "{what}: ok from {id}, but the store does not hold it"
                    ));
                }
                self.log(format!("{what} on {id}: ok"));
            }
            Err(e) => {
                if self.refused_token(&id, &what, &e, &node, token)?
                    && self.agents[i].holding == Some(token)
                {
                    self.lost(i);
                }
            }
        }
        Ok(())
    }

    async fn release(&mut self) -> Result<(), String> {
        let Some(&i) = self.rng.pick(&self.holder_agents()) else {
            return Ok(());
        };
        let Some((_, engine, id)) = self.target() else {
            return Ok(());
        };
        let node = self.agents[i].node.clone();
        let token = self.agents[i].holding.expect("a holder");
        self.removals.insert(node.clone());
        let what = format!("release {node} token {token}");
        match engine.release(&node, token, node.as_str(), "done").await {
            Ok(()) => {
                self.answered_by_leader(&id, &what)?;
                if self.holds(&node, token) {
                    return Err(format!(
                        "{what}: ok from {id}, but the store still holds it"
                    ));
                }
                self.lost(i);
                self.log(format!("{what} on {id}: ok"));
            }
            Err(e) => {
                if self.refused_token(&id, &what, &e, &node, token)? {
                    self.lost(i);
                }
            }
        }
        Ok(())
    }

    /// An agent presents a token it held before (it restarted from an old
    /// record, or was force-released while away).
    async fn stale_call(&mut self) -> Result<(), String> {
        let with_old: Vec<usize> = (0..self.agents.len())
            .filter(|&i| !self.agents[i].old_tokens.is_empty())
            .collect();
        let Some(&i) = self.rng.pick(&with_old) else {
            return Ok(());
        };
        let token = *self.rng.pick(&self.agents[i].old_tokens).unwrap();
        self.renew_with(i, token).await
    }

    async fn force_release(&mut self) -> Result<(), String> {
        // Usually a node that holds the baton (its node died), sometimes any.
        let holders: Vec<NodeName> = self.backend.inspect(|s| {
            s.map(|s| s.holders.keys().cloned().collect())
                .unwrap_or_default()
        });
        let node = match self.rng.pick(&holders) {
            Some(node) if self.rng.chance(80) => node.clone(),
            _ => {
                let i = self.rng.below(self.agents.len() as u64) as usize;
                self.agents[i].node.clone()
            }
        };
        let Some((_, engine, id)) = self.target() else {
            return Ok(());
        };
        self.removals.insert(node.clone());
        let what = format!("force-release {node}");
        match engine.force_release(&node, None, "operator", "sim").await {
            Ok(token) => {
                self.answered_by_leader(&id, &what)?;
                if self.holds(&node, token) {
                    return Err(format!(
                        "{what}: ok from {id}, but the store still holds it"
                    ));
                }
                // The agent is not told: it finds out at its next call.
                self.stats.force_releases += 1;
                self.log(format!("{what} on {id}: ok, token {token}"));
            }
            Err(e) => {
                let c = self.refused(&id, &what, &e)?;
                let holds = self
                    .backend
                    .inspect(|s| s.is_some_and(|s| s.holders.contains_key(&node)));
                if c == Code::FailedPrecondition && holds {
                    return Err(format!(
                        "{what}: refused by {id}, but it holds the baton: {e}"
                    ));
                }
                self.log(format!("{what} on {id}: {c:?} {e}"));
            }
        }
        Ok(())
    }

    async fn pause_or_resume(&mut self) -> Result<(), String> {
        let Some((_, engine, id)) = self.target() else {
            return Ok(());
        };
        let pause = self.rng.chance(30);
        let result = if pause {
            engine.pause("operator", "sim").await
        } else {
            engine.resume("operator").await
        };
        let what = if pause { "pause" } else { "resume" };
        match result {
            Ok(changed) => {
                self.answered_by_leader(&id, what)?;
                if self
                    .backend
                    .inspect(|s| s.is_some_and(|s| s.paused.is_some()))
                    != pause
                {
                    return Err(format!("{what}: ok from {id}, but the store disagrees"));
                }
                self.log(format!("{what} on {id}: ok (changed: {changed})"));
            }
            Err(e) => {
                let c = self.refused(&id, what, &e)?;
                self.log(format!("{what} on {id}: {c:?} {e}"));
            }
        }
        Ok(())
    }

    async fn status(&mut self) -> Result<(), String> {
        let Some((_, engine, id)) = self.target() else {
            return Ok(());
        };
        match engine.confirmed_snapshot().await {
            Ok(snapshot) => {
                self.answered_by_leader(&id, "status")?;
                let truth = self.truth();
                if snapshot.state != truth {
                    let brief = |s: &LeaseState| {
                        format!(
                            "holders {:?}, last token {}, paused {}, {} audit records",
                            s.holders
                                .iter()
                                .map(|(n, h)| (n.as_str(), h.fencing_token))
                                .collect::<Vec<_>>(),
                            s.last_token,
                            s.paused.is_some(),
                            s.audit.len()
                        )
                    };
                    return Err(format!(
                        "status from {id} differs from the store:\n  told   {}\n  stored {}",
                        brief(&snapshot.state),
                        brief(&truth)
                    ));
                }
                self.log(format!("status on {id}: ok"));
            }
            Err(e) => {
                let c = self.refused(&id, "status", &e)?;
                self.log(format!("status on {id}: {c:?} {e}"));
            }
        }
        Ok(())
    }

    fn leadership(&mut self) {
        let alive: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| self.replicas[r].engine.is_some())
            .collect();
        match self.rng.below(6) {
            0 | 1 => {
                if let Some(&r) = self.rng.pick(&alive) {
                    let id = self.replicas[r].id();
                    let quietly = self.rng.chance(50);
                    self.stats.elections += 1;
                    let term = if quietly {
                        self.backend.elect_quietly(&id)
                    } else {
                        self.backend.elect(&id)
                    };
                    self.log(format!(
                        "elect {id} in term {term}{}",
                        if quietly { " (nobody told)" } else { "" }
                    ));
                }
            }
            2 => {
                let quietly = self.rng.chance(50);
                if quietly {
                    self.backend.depose_quietly();
                } else {
                    self.backend.depose();
                }
                self.log(format!(
                    "depose the leader{}",
                    if quietly { " (nobody told)" } else { "" }
                ));
            }
            3 => {
                if let Some(&r) = self.rng.pick(&alive) {
                    let id = self.replicas[r].id();
                    self.backend.publish(&id);
                    self.log(format!("tell {id} who leads"));
                }
            }
            _ => {
                self.backend.publish_all();
                self.log("tell every replica who leads".to_string());
            }
        }
    }

    async fn crash_or_restart(&mut self) {
        let r = self.rng.below(self.replicas.len() as u64) as usize;
        if self.replicas[r].engine.is_some() {
            self.crash_replica(r);
        } else {
            self.start_replica(r).await;
        }
    }

    fn clock_jump(&mut self) {
        let seconds = if self.rng.chance(70) {
            self.rng.below(7200) as i64
        } else {
            -(self.rng.below(600) as i64)
        };
        *self.clock.lock().unwrap() += Duration::seconds(seconds);
        self.log(format!("wall clock jumps {seconds}s"));
    }

    fn faults(&mut self) {
        let mut faults = Faults::default();
        match self.rng.below(6) {
            0 => faults.fail_saves = 1 + self.rng.below(2) as usize,
            1 => faults.lose_save_answers = 1,
            2 => faults.fail_confirms = 1 + self.rng.below(2) as usize,
            3 => faults.fail_loads = 1,
            _ => {
                let latency = *self.rng.pick(&[0u64, 0, 0, 10, 10, 500, 6000]).unwrap();
                self.backend.set_latency(StdDuration::from_millis(latency));
                self.log(format!("store latency {latency}ms"));
                return;
            }
        }
        self.log(format!("inject {faults:?}"));
        self.backend.inject(faults);
    }

    /// An agent process restarts: it forgets its stream and what it holds
    /// (it will ask again and be told it holds, if it does).
    fn agent_restart(&mut self) {
        let i = self.rng.below(self.agents.len() as u64) as usize;
        self.agents[i].waiting = None;
        if let Some(token) = self.agents[i].holding.take() {
            self.agents[i].old_tokens.push(token);
        }
        let node = self.agents[i].node.clone();
        self.log(format!("agent {node} restarts"));
    }

    /// Time passes. A lease nobody renews (no leader, or a crashed one)
    /// expires meanwhile, and a live replica wins the next campaign.
    async fn advance(&mut self) {
        let millis = self.rng.below(3000);
        tokio::time::sleep(StdDuration::from_millis(millis)).await;
        let (leader, _) = self.backend.leader();
        let leader_alive = self
            .replicas
            .iter()
            .any(|r| r.engine.is_some() && Some(r.id()) == leader);
        let alive: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.engine.is_some())
            .map(Replica::id)
            .collect();
        if !leader_alive
            && self.rng.chance(60)
            && let Some(id) = self.rng.pick(&alive).cloned()
        {
            self.stats.elections += 1;
            let term = self.backend.elect(&id);
            self.log(format!("{id} wins the campaign: term {term}"));
        }
    }

    /// Agent `i` takes a grant of `token` (streamed, or found at once on
    /// its Acquire's stream): the store must have stored it for its node.
    fn take_grant(&mut self, i: usize, token: u64, how: &str) -> Result<(), String> {
        let node = self.agents[i].node.clone();
        let stored_for = self.backend.oracle().tokens.get(&token).cloned();
        if stored_for.as_deref() != Some(node.as_str()) {
            return Err(format!(
                "{node} was granted token {token} {how}, which the store has for {stored_for:?}"
            ));
        }
        self.log(format!("{node} granted token {token} {how}"));
        self.stats.grants += 1;
        self.agents[i].holding = Some(token);
        Ok(())
    }

    /// Delivers what the Acquire streams carry.
    fn poll_streams(&mut self) -> Result<(), String> {
        for i in 0..self.agents.len() {
            let Some((r, mut events)) = self.agents[i].waiting.take() else {
                continue;
            };
            let node = self.agents[i].node.clone();
            let replica = self.replicas[r].id();
            loop {
                match events.try_recv() {
                    Ok(Ok(AcquireUpdate::Queued { .. })) => {}
                    Ok(Ok(AcquireUpdate::Granted(g))) => {
                        self.take_grant(i, g.fencing_token, &format!("by {replica}"))?;
                        break;
                    }
                    Ok(Err(e)) => {
                        self.log(format!("{node}'s acquire on {replica} ended: {e}"));
                        break;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.log(format!("{node}'s acquire on {replica} dropped"));
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        self.agents[i].waiting = Some((r, events));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        let oracle = self.backend.oracle();
        if let Some(v) = oracle.violations.first() {
            return Err(format!("the store saw a broken rule: {v}"));
        }
        let truth = self.truth();
        let limit = self.config.policy.max_concurrent as usize;
        if truth.holders.len() > limit {
            return Err(format!(
                "{} holders over the limit of {limit}: {:?}",
                truth.holders.len(),
                truth.holders.keys().collect::<Vec<_>>()
            ));
        }
        let control_plane = truth.holders.values().filter(|h| h.control_plane).count();
        if control_plane > 1 {
            return Err(format!("{control_plane} control-plane holders"));
        }
        if truth.last_token < self.previous_last_token {
            return Err(format!(
                "the last token went back from {} to {}",
                self.previous_last_token, truth.last_token
            ));
        }
        for (node, token) in &self.previous_holders {
            let still = truth
                .holders
                .get(node)
                .is_some_and(|h| h.fencing_token == *token);
            if !still && !self.removals.contains(node) {
                return Err(format!(
                    "{node} (token {token}) was forgotten without a release or force-release"
                ));
            }
        }
        self.previous_holders = truth
            .holders
            .iter()
            .map(|(n, h)| (n.clone(), h.fencing_token))
            .collect();
        self.previous_last_token = truth.last_token;
        self.removals.clear();
        Ok(())
    }
}

impl Sim {
    /// After settling: no agent still waits on the leader for a baton the
    /// store says its node holds (a grant saved but whose answer was lost
    /// must reach its waiter once the leader reloads).
    fn no_stranded_grant(&self) -> Result<(), String> {
        let truth = self.truth();
        let (leader, _) = self.backend.leader();
        for agent in &self.agents {
            let Some((r, _)) = &agent.waiting else {
                continue;
            };
            let replica = &self.replicas[*r];
            if replica.engine.is_none() || Some(replica.id()) != leader {
                continue;
            }
            if let Some(h) = truth.holders.get(&agent.node) {
                return Err(format!(
                    "{} holds token {} in the store, but its Acquire on the leader {} still waits",
                    agent.node,
                    h.fencing_token,
                    replica.id()
                ));
            }
        }
        Ok(())
    }
}

/// Runs one seed: whether every invariant held (or which broke), and the
/// trace.
fn run_seed(seed: u64, steps: usize) -> (Result<(), String>, Vec<String>, Stats) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut sim = Sim::new(seed).await;
        let mut result = Ok(());
        for _ in 0..steps {
            result = sim.run_step().await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            // Let every replica settle: everyone learns who leads, then
            // time passes and the streams deliver.
            sim.step += 1;
            sim.backend.clear_faults();
            sim.backend.set_latency(StdDuration::ZERO);
            sim.backend.publish_all();
            sim.log(
                "settle: the store is healthy, every replica learns who leads, wait 5s".to_string(),
            );
            tokio::time::sleep(StdDuration::from_secs(5)).await;
            result = sim
                .poll_streams()
                .and_then(|()| sim.check())
                .and_then(|()| sim.no_stranded_grant());
        }
        if let Err(reason) = &result {
            sim.log(format!("BROKEN: {reason}"));
        }
        (result, std::mem::take(&mut sim.trace), sim.stats)
    })
}

/// A seed that broke an invariant: the seed, the reason, the trace.
type Failure = (u64, String, Vec<String>);

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn seeded_schedules_keep_the_safety_invariants() {
    let steps = env_number("BATON_SIM_STEPS", 150) as usize;
    if let Ok(seed) = std::env::var("BATON_SIM_SEED") {
        let seed: u64 = seed.parse().expect("BATON_SIM_SEED is a number");
        let (result, trace, _) = run_seed(seed, steps);
        println!("{}", trace.join("\n"));
        match result {
            Ok(()) => println!("seed {seed}: all invariants held"),
            Err(reason) => panic!("seed {seed}: {reason}"),
        }
        return;
    }
    let seeds = env_number("BATON_SIM_SEEDS", 2000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let started = Instant::now();
    let results: Vec<(Stats, Option<Failure>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut stats = Stats::default();
                    for seed in (0..seeds).filter(|s| s % threads == t) {
                        let (result, trace, seen) = run_seed(seed, steps);
                        stats += seen;
                        if let Err(reason) = result {
                            return (stats, Some((seed, reason, trace)));
                        }
                    }
                    (stats, None)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a simulation thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut stats = Stats::default();
    for (seen, _) in &results {
        stats += *seen;
    }
    println!(
        "{seeds} seeds x {steps} steps in {:.1}s: {:.0} seeds/s on {threads} thread(s); {stats:?}",
        elapsed.as_secs_f64(),
        seeds as f64 / elapsed.as_secs_f64()
    );
    let failures: Vec<_> = results.into_iter().filter_map(|(_, f)| f).collect();
    if let Some((seed, reason, trace)) = failures.into_iter().min_by_key(|f| f.0) {
        println!("{}", trace.join("\n"));
        panic!(
            "seed {seed} broke an invariant: {reason}\nreplay: BATON_SIM_SEED={seed} cargo test -p baton-coordinator --test simulation -- --nocapture"
        );
    }
    // The schedule must reach the cases that matter, or the test proves
    // nothing.
    assert!(
        stats.grants > seeds && stats.force_releases > seeds / 4 && stats.refusals > seeds,
        "the schedule is too tame: {stats:?}"
    );
}
