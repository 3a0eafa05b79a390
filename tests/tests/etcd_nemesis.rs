//! Fault injection against real etcd: three coordinators on `--store etcd`
//! (each also running the etcd quorum guard), ten lease clients (three
//! control-plane nodes carrying the etcd members, seven workers) acquiring,
//! renewing, reporting, confirming and releasing as fast as they can, and a
//! seeded nemesis that freezes the leading coordinator past its election
//! TTL (SIGSTOP, then SIGCONT), kills and restarts it (SIGKILL), and pauses
//! etcd members. Every call is recorded with its invocation and completion
//! time and its outcome; the checker (`baton_tests::etcd::history`) then
//! verifies that tokens are unique and only grow, that no more nodes held
//! the baton at once than the limit (and never two control-plane nodes),
//! and that no holder was lost.
//!
//! `BATON_NEMESIS_SEED` replays a fault schedule (the seed is printed);
//! `BATON_NEMESIS_SECS` changes how long faults are injected (default 60).
//! The whole history is written next to the printed path when the check
//! fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_proto::v1::acquire_event::Event;
use baton_proto::v1::coordinator_client::CoordinatorClient;
use baton_proto::v1::{
    AcquireRequest, ConfirmRequest, Phase, ReleaseRequest, RenewRequest, ReportRequest, Step,
};
use baton_tests::etcd::coordinator::{Coordinator, ready_at};
use baton_tests::etcd::history::{Call, History, Op, Outcome, check};
use baton_tests::etcd::{EtcdCluster, serial};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// The nodes: (name, control-plane). n1..n3 carry the etcd members.
const NODES: [(&str, bool); 10] = [
    ("n1", true),
    ("n2", true),
    ("n3", true),
    ("w1", false),
    ("w2", false),
    ("w3", false),
    ("w4", false),
    ("w5", false),
    ("w6", false),
    ("w7", false),
];
const MAX_CONCURRENT: usize = 2;
const ELECTION_TTL: Duration = Duration::from_secs(2);
/// Every unary call's deadline (a frozen coordinator accepts connections
/// but never answers).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an Acquire stream may stay silent before the client asks again
/// (a frozen leader's stream just stops).
const STREAM_SILENCE: Duration = Duration::from_secs(4);

/// One client's connections to every coordinator.
struct Lease {
    node: &'static str,
    control_plane: bool,
    clients: Vec<CoordinatorClient<Channel>>,
    names: Vec<String>,
    /// The coordinator to ask next.
    next: usize,
    history: Arc<History>,
    rng: StdRng,
}

/// What a client believed when it stopped.
#[derive(Debug)]
enum End {
    Holding(u64),
    NotHolding,
}

fn outcome_of(status: &tonic::Status) -> Outcome {
    match status.code() {
        tonic::Code::FailedPrecondition => Outcome::Refused(status.message().to_string()),
        tonic::Code::Unavailable if status.message().contains("not the leader") => {
            Outcome::NotLeader(status.message().to_string())
        }
        _ => Outcome::Unknown(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// True when the answer says nothing or comes from a replica that does not
/// lead: ask the next coordinator.
fn try_another(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Unknown(_) | Outcome::NotLeader(_))
}

impl Lease {
    fn new(
        node: &'static str,
        control_plane: bool,
        urls: &[String],
        history: Arc<History>,
        seed: u64,
    ) -> Self {
        let clients = urls
            .iter()
            .map(|u| {
                let channel = Endpoint::from_shared(u.clone())
                    .expect("url")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(CALL_TIMEOUT)
                    .connect_lazy();
                CoordinatorClient::new(channel)
            })
            .collect();
        Self {
            node,
            control_plane,
            clients,
            names: urls.to_vec(),
            next: 0,
            history,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Starts a call sequence at a random coordinator: a client that only
    /// ever asked the one that answered last would never notice a replica
    /// that answers from stale memory after a freeze.
    fn scatter(&mut self) {
        self.next = self.rng.gen_range(0..self.clients.len());
    }

    fn op(&self, call: Call, token: u64, at: usize, invoked: Duration, outcome: Outcome) -> Op {
        Op {
            node: self.node.to_string(),
            control_plane: self.control_plane,
            call,
            token,
            coordinator: self.names[at].clone(),
            invoked,
            completed: self.history.now(),
            outcome,
        }
    }

    /// One unary call to the coordinator in turn, recorded. Returns the
    /// outcome; a replica that is not the leader or does not answer moves
    /// the turn on.
    async fn unary(&mut self, call: Call, token: u64) -> Outcome {
        let at = self.next;
        let mut client = self.clients[at].clone();
        let node = self.node.to_string();
        let invoked = self.history.now();
        let result = match call {
            Call::Renew => client
                .renew(RenewRequest {
                    node,
                    fencing_token: token,
                })
                .await
                .map(|_| String::new()),
            Call::Report => client
                .report(ReportRequest {
                    node,
                    fencing_token: token,
                    phase: Phase::Draining as i32,
                    message: "nemesis".into(),
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
            Call::Confirm => client
                .confirm(ConfirmRequest {
                    node,
                    fencing_token: token,
                    step: Step::Reboot as i32,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    if r.proceed {
                        "proceed".to_string()
                    } else {
                        format!("wait: {}", r.reason)
                    }
                }),
            Call::Release => client
                .release(ReleaseRequest {
                    node,
                    fencing_token: token,
                    reason: "nemesis".into(),
                })
                .await
                .map(|_| String::new()),
            Call::Acquire => unreachable!("acquire streams"),
        };
        let outcome = match result {
            Ok(text) => Outcome::Ok(text),
            Err(status) => outcome_of(&status),
        };
        if try_another(&outcome) {
            self.next = (self.next + 1) % self.clients.len();
        }
        self.history
            .record(self.op(call, token, at, invoked, outcome.clone()));
        outcome
    }

    /// Tries each coordinator once until one gives a definite answer.
    async fn definite(&mut self, call: Call, token: u64) -> Option<Outcome> {
        self.scatter();
        for _ in 0..self.clients.len() {
            let outcome = self.unary(call, token).await;
            if !try_another(&outcome) {
                return Some(outcome);
            }
        }
        None
    }

    /// Asks for the baton until granted; `None` when told to stop first.
    async fn acquire(&mut self, stop: &watch::Receiver<bool>) -> Option<u64> {
        self.scatter();
        loop {
            if *stop.borrow() {
                return None;
            }
            let at = self.next;
            let invoked = self.history.now();
            let request = AcquireRequest {
                node: self.node.to_string(),
                control_plane: self.control_plane,
                reason: "nemesis".into(),
                manual: false,
                labels: Default::default(),
                backs_up_control_plane: true,
            };
            let outcome = match self.clients[at].clone().acquire(request).await {
                Err(status) => outcome_of(&status),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        let event = tokio::select! {
                            event = tokio::time::timeout(STREAM_SILENCE, stream.message()) => event,
                            _ = wait_stop(stop.clone()) => return None,
                        };
                        match event {
                            Err(_) => break Outcome::Unknown("the stream went silent".into()),
                            Ok(Err(status)) => break outcome_of(&status),
                            Ok(Ok(None)) => break Outcome::Unknown("the stream ended".into()),
                            Ok(Ok(Some(m))) => match m.event {
                                Some(Event::Granted(g)) => {
                                    break Outcome::Granted {
                                        token: g.fencing_token,
                                        resumed: g.resumed,
                                    };
                                }
                                _ => continue,
                            },
                        }
                    }
                }
            };
            let granted = match outcome {
                Outcome::Granted { token, .. } => Some(token),
                _ => None,
            };
            if granted.is_none() {
                self.next = (self.next + 1) % self.clients.len();
            }
            self.history
                .record(self.op(Call::Acquire, 0, at, invoked, outcome.clone()));
            if granted.is_some() {
                return granted;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn wait_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One client: acquire, hold (renew, report, confirm), release, repeat.
async fn client(
    node: &'static str,
    control_plane: bool,
    urls: Vec<String>,
    history: Arc<History>,
    stop: watch::Receiver<bool>,
    seed: u64,
) -> End {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lease = Lease::new(node, control_plane, &urls, history, rng.r#gen());
    loop {
        let Some(token) = lease.acquire(&stop).await else {
            return End::NotHolding;
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(300..1200));
        let mut lost = false;
        let mut first = true;
        while tokio::time::Instant::now() < until && !lost {
            if *stop.borrow() {
                return End::Holding(token);
            }
            let call = match (first, rng.gen_range(0..4)) {
                (true, _) => Call::Report,
                (false, 0) => Call::Confirm,
                _ => Call::Renew,
            };
            first = false;
            lost = matches!(lease.definite(call, token).await, Some(Outcome::Refused(_)));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if *stop.borrow() && !lost {
            return End::Holding(token);
        }
        if !lost {
            // Release until a definite answer; after the stop, for a bounded
            // while only (the history says how it ended).
            lease.scatter();
            let mut tries = 0;
            loop {
                let outcome = lease.unary(Call::Release, token).await;
                if !try_another(&outcome) {
                    break;
                }
                tries += 1;
                if *stop.borrow() && tries > 20 {
                    return End::NotHolding;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
    }
}

/// The fault the nemesis injects next.
#[derive(Clone, Copy, Debug)]
enum Fault {
    FreezeLeader,
    KillLeader,
    PauseMember,
}

/// The index of the coordinator whose /readyz says it leads.
async fn leader(addrs: &[String]) -> Option<usize> {
    for (i, addr) in addrs.iter().enumerate() {
        let addr = addr.clone();
        if tokio::task::spawn_blocking(move || ready_at(&addr))
            .await
            .unwrap_or(false)
        {
            return Some(i);
        }
    }
    None
}

/// Injects faults until `until`; returns what it did, one line each.
async fn nemesis(
    coordinators: Arc<Mutex<Vec<Coordinator>>>,
    cluster: Arc<Mutex<EtcdCluster>>,
    history: Arc<History>,
    seed: u64,
    until: Duration,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let addrs: Vec<String> = coordinators
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.metrics_addr.clone())
        .collect();
    let members: Vec<String> = cluster
        .lock()
        .unwrap()
        .members
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let mut log = Vec::new();
    let mut say = |history: &History, what: String| {
        let line = format!("[{:>8.3}s] {what}", history.now().as_secs_f64());
        eprintln!("nemesis: {line}");
        log.push(line);
    };
    while history.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..4000))).await;
        let fault = match rng.gen_range(0..10) {
            0..=3 => Fault::FreezeLeader,
            4..=6 => Fault::KillLeader,
            _ => Fault::PauseMember,
        };
        match fault {
            Fault::FreezeLeader | Fault::KillLeader => {
                let Some(i) = leader(&addrs).await else {
                    say(&history, "no coordinator leads right now; skipping".into());
                    continue;
                };
                let id = coordinators.lock().unwrap()[i].id.clone();
                if matches!(fault, Fault::FreezeLeader) {
                    let frozen = ELECTION_TTL + Duration::from_millis(rng.gen_range(1000..3000));
                    coordinators.lock().unwrap()[i].stop();
                    say(
                        &history,
                        format!("SIGSTOP leader {id} for {}ms", frozen.as_millis()),
                    );
                    tokio::time::sleep(frozen).await;
                    coordinators.lock().unwrap()[i].cont();
                    say(&history, format!("SIGCONT {id}"));
                } else {
                    coordinators.lock().unwrap()[i].kill();
                    say(&history, format!("SIGKILL leader {id}"));
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2500))).await;
                    let restarted = coordinators.lock().unwrap()[i].restart();
                    say(&history, format!("restart {id}: {restarted:?}"));
                }
            }
            Fault::PauseMember => {
                let member = members[rng.gen_range(0..members.len())].clone();
                let paused = Duration::from_millis(rng.gen_range(1000..4000));
                cluster.lock().unwrap().stop(&member);
                say(
                    &history,
                    format!("SIGSTOP etcd member {member} for {}ms", paused.as_millis()),
                );
                tokio::time::sleep(paused).await;
                cluster.lock().unwrap().cont(&member);
                say(&history, format!("SIGCONT etcd member {member}"));
            }
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_hold_their_promises_under_a_nemesis() -> Result<()> {
    let _serial = serial().await;
    let seed: u64 = match std::env::var("BATON_NEMESIS_SEED") {
        Ok(s) => s.parse().context("BATON_NEMESIS_SEED")?,
        Err(_) => rand::random(),
    };
    let secs: u64 = std::env::var("BATON_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("nemesis seed {seed} (replay with BATON_NEMESIS_SEED={seed}), {secs}s of faults");

    let cluster = EtcdCluster::start(3).await?;
    let endpoints = cluster.endpoints();
    let ttl = format!("{}s", ELECTION_TTL.as_secs());
    let max = MAX_CONCURRENT.to_string();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoints,
        "--etcd-election-ttl",
        &ttl,
        "--etcd-probe-interval",
        "500ms",
        "--max-concurrent",
        &max,
        "--renew-interval",
        "1s",
        "--overdue-after",
        "60s",
        // Standalone: declare the etcd nodes, so workers are known to carry
        // no member even before n1..n3 asked a freshly elected leader.
        "--etcd-member-map",
        "n1=n1,n2=n2,n3=n3",
    ];
    // c1 creates the state (--initialize, on its first start only); the
    // others join once it exists.
    let mut first = args.to_vec();
    first.push("--initialize");
    let c1 = Coordinator::start("c1", &first)?;
    c1.wait_ready().await?;
    let coordinators = vec![
        c1,
        Coordinator::start("c2", &args)?,
        Coordinator::start("c3", &args)?,
    ];
    coordinators[1].client().await?;
    let urls: Vec<String> = coordinators.iter().map(|c| c.grpc_url.clone()).collect();
    let addrs: Vec<String> = coordinators
        .iter()
        .map(|c| c.metrics_addr.clone())
        .collect();
    for _ in 0..300 {
        if leader(&addrs).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let coordinators = Arc::new(Mutex::new(coordinators));
    let cluster = Arc::new(Mutex::new(cluster));

    let history = Arc::new(History::new());
    let (stop_tx, stop) = watch::channel(false);
    let clients: Vec<_> = NODES
        .iter()
        .enumerate()
        .map(|(i, (node, cp))| {
            tokio::spawn(client(
                node,
                *cp,
                urls.clone(),
                history.clone(),
                stop.clone(),
                seed.wrapping_add(i as u64 + 1),
            ))
        })
        .collect();
    let faults = nemesis(
        coordinators.clone(),
        cluster.clone(),
        history.clone(),
        seed,
        Duration::from_secs(secs),
    )
    .await;

    // Heal (every fault undoes itself; make sure), let the clients see a
    // healthy system for a moment, then stop them where they are.
    {
        let mut cs = coordinators.lock().unwrap();
        for c in cs.iter_mut() {
            c.cont();
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true)?;
    let mut ends = BTreeMap::new();
    for (task, (node, _)) in clients.into_iter().zip(NODES) {
        let end = tokio::time::timeout(Duration::from_secs(90), task)
            .await
            .with_context(|| format!("client {node} did not stop"))??;
        ends.insert(node, end);
    }
    for _ in 0..300 {
        if leader(&addrs).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = Arc::try_unwrap(cluster)
        .map_err(|_| anyhow::anyhow!("cluster still shared"))?
        .into_inner()
        .unwrap();
    let (holders, last_token) = cluster.stored_state().await?;

    let ops = history.ops();
    let (summary, mut violations) = check(&ops, MAX_CONCURRENT, &holders);
    let highest = ops
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::Granted { token, .. } => Some(token),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    if last_token < highest {
        violations.push(baton_tests::etcd::history::Violation {
            what: format!(
                "the stored last token {last_token} is below token {highest} that a client was granted"
            ),
            ops: Vec::new(),
        });
    }
    let mut grants_by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for op in &ops {
        if matches!(op.outcome, Outcome::Granted { resumed: false, .. }) {
            *grants_by_node.entry(op.node.as_str()).or_default() += 1;
        }
    }
    eprintln!("nemesis: faults injected:\n  {}", faults.join("\n  "));
    eprintln!("nemesis: fresh grants by node: {grants_by_node:?}");
    eprintln!(
        "nemesis: {} ops, {} fresh grants, {} resumed, {} releases, {} without a definite answer, at most {} holders at once; clients at the end: {ends:?}; stored holders {holders:?}, last token {last_token}",
        ops.len(),
        summary.grants,
        summary.resumed,
        summary.releases,
        summary.unknown,
        summary.max_holds
    );
    // The checker's reading of the history agrees with what the clients
    // believed (a check of the checker).
    let believed: BTreeMap<String, u64> = ends
        .iter()
        .filter_map(|(node, end)| match end {
            End::Holding(token) => Some((node.to_string(), *token)),
            End::NotHolding => None,
        })
        .collect();
    if believed != summary.holding_at_end {
        violations.push(baton_tests::etcd::history::Violation {
            what: format!(
                "the clients ended holding {believed:?}, the history says {:?}",
                summary.holding_at_end
            ),
            ops: Vec::new(),
        });
    }
    if summary.grants < 20 {
        bail!(
            "only {} grants in {secs}s: the run exercised too little to mean anything",
            summary.grants
        );
    }
    if !violations.is_empty() {
        let path = std::env::temp_dir().join(format!("baton-nemesis-{seed}.history"));
        let text: Vec<String> = ops.iter().map(ToString::to_string).collect();
        std::fs::write(&path, text.join("\n"))?;
        let shown: Vec<String> = violations
            .iter()
            .take(10)
            .map(ToString::to_string)
            .collect();
        let coordinator_logs: Vec<String> = coordinators
            .lock()
            .unwrap()
            .iter()
            .map(|c| format!("{}: {}", c.id, c.log().lines().count()))
            .collect();
        bail!(
            "seed {seed}: {} violation(s) (full history: {}; log lines {coordinator_logs:?}):\n{}",
            violations.len(),
            path.display(),
            shown.join("\n")
        );
    }
    Ok(())
}
