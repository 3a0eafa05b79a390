//! The simulated fleet: N agents in this process, each with its own
//! Acquire stream, sharing a few HTTP/2 connections. They all ask at once;
//! each one, once granted, behaves like a real agent (reports its phases,
//! renews, holds the baton a short random time, releases) or, in instant
//! mode, releases at once (a pure handoff chain: one save per handoff is the
//! most a store can do).
//!
//! Handoff latency is measured on the client's clock: from a holder sending
//! Release to the next waiter receiving its grant. With more than one holder
//! at a time, only a release of a full house (every slot held, or freed by
//! a release still owed its grant) frees a slot a waiter needs; such
//! releases are paired in order with the grants that follow (first in,
//! first out). Grants into slots that were free anyway (the first
//! `max_concurrent`, or slots freed while those were still coming) are no
//! handoffs. Exact for one holder, within the spread of concurrent releases
//! otherwise.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_proto::v1::{self as pb, acquire_event::Event, coordinator_client::CoordinatorClient};
use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tonic::transport::Channel;

/// How a simulated agent behaves once granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    /// Reports Draining, renews, reports Rebooting then Verifying with a new
    /// boot_id, holding the baton a random time in between, then releases.
    Real,
    /// Releases as soon as it is granted.
    Instant,
}

impl AgentMode {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            AgentMode::Real => "real",
            AgentMode::Instant => "instant",
        }
    }
}

/// One fleet run's settings.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// How many agents ask.
    pub agents: usize,
    /// The coordinator's `--max-concurrent` (to pair releases with grants).
    pub max_concurrent: usize,
    /// Agent behaviour.
    pub mode: AgentMode,
    /// The longest random hold (real mode), split between the phases.
    pub hold_max: Duration,
    /// Seed of the hold times.
    pub seed: u64,
    /// Give up after this long.
    pub deadline: Duration,
}

/// What the fleet saw.
pub struct Outcome {
    /// Every agent was granted and released within the deadline.
    pub finished: bool,
    /// From the first Acquire to the last Release answered (or the deadline).
    pub elapsed: Duration,
    /// Grants received.
    pub grants: u64,
    /// Release → next grant, µs.
    pub handoffs: Histogram<u64>,
    /// Acquire sent → first answer (Queued or Granted), µs.
    pub first_answer: Histogram<u64>,
    /// When the last agent heard its first answer (the ask storm is over).
    pub all_answered: Option<Duration>,
    /// Queued updates received in all.
    pub queued_updates: u64,
    /// Agents that failed (call errors).
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Every grant in order: when it came (since the start) and its
    /// handoff latency (µs; `None` for a grant into a free slot). Shows
    /// whether a grant costs more while the queue is long.
    pub grant_log: Vec<(Duration, Option<u64>)>,
    /// The distinct fencing tokens the grants carried: as many as
    /// [`Outcome::grants`] unless two grants shared one.
    pub tokens: BTreeSet<u64>,
}

struct Tally {
    /// Releases of a full house (every slot held) not yet followed by the
    /// grant they made possible.
    pending_releases: VecDeque<Instant>,
    /// Grants held now (granted, Release not yet sent).
    held: u64,
    grants: u64,
    handoffs: Histogram<u64>,
    first_answer: Histogram<u64>,
    answered: usize,
    all_answered: Option<Duration>,
    errors: u64,
    first_error: Option<String>,
    grant_log: Vec<(Duration, Option<u64>)>,
    tokens: BTreeSet<u64>,
}

impl Tally {
    fn new(agents: usize) -> Result<Self> {
        Ok(Self {
            pending_releases: VecDeque::new(),
            held: 0,
            grants: 0,
            handoffs: Histogram::new(3)?,
            first_answer: Histogram::new(3)?,
            answered: 0,
            all_answered: None,
            errors: 0,
            first_error: None,
            grant_log: Vec::with_capacity(agents),
            tokens: BTreeSet::new(),
        })
    }

    /// A grant at `now`: a handoff when it follows a release of a full
    /// house (its latency in µs), else a grant into a slot that was free
    /// anyway (the first `max_concurrent`, or a slot freed while the first
    /// ones were still being granted), which is no handoff.
    fn granted(&mut self, now: Instant) -> Option<u64> {
        self.grants += 1;
        self.held += 1;
        let released = self.pending_releases.pop_front()?;
        let us = (now - released).as_micros() as u64;
        let _ = self.handoffs.record(us);
        Some(us)
    }

    /// A holder sends its Release at `now`. Only a release of a full house
    /// (every slot held, or freed by a release still owed its grant) makes
    /// a waiter's grant possible; pairing every release
    /// with the next grant in order would pair grants with releases made
    /// while the first `max` grants were still coming, many places early.
    fn releasing(&mut self, now: Instant, max: u64) {
        // Slots in use: held, or freed by a release whose grant is still
        // owed.
        if self.held + self.pending_releases.len() as u64 >= max {
            self.pending_releases.push_back(now);
        }
        self.held = self.held.saturating_sub(1);
    }
}

struct Shared {
    /// Counted apart from the tally: every Queued update bumps it.
    queued_updates: AtomicU64,
    tally: std::sync::Mutex<Tally>,
    finished: AtomicUsize,
    all_finished: Notify,
    start: Instant,
    fleet: Fleet,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answered(&self, asked: Instant) {
        let mut t = self.tally();
        let _ = t.first_answer.record(asked.elapsed().as_micros() as u64);
        t.answered += 1;
        if t.answered == self.fleet.agents {
            t.all_answered = Some(self.start.elapsed());
        }
    }

    fn granted(&self, token: u64) {
        let now = Instant::now();
        let mut t = self.tally();
        t.tokens.insert(token);
        let handoff = t.granted(now);
        t.grant_log.push((now - self.start, handoff));
    }

    fn releasing(&self) {
        let max = self.fleet.max_concurrent as u64;
        self.tally().releasing(Instant::now(), max);
    }

    fn done(&self, result: Result<()>) {
        if let Err(e) = result {
            let mut t = self.tally();
            t.errors += 1;
            t.first_error.get_or_insert_with(|| format!("{e:#}"));
        }
        if self.finished.fetch_add(1, Ordering::AcqRel) + 1 == self.fleet.agents {
            self.all_finished.notify_one();
        }
    }
}

/// Runs the fleet against the coordinator behind `channels` (agents are
/// spread evenly over them) and returns what it saw; agents still running
/// at the deadline are abandoned.
pub async fn run(fleet: Fleet, channels: &[Channel]) -> Result<Outcome> {
    if channels.is_empty() {
        bail!("no connections");
    }
    let shared = Arc::new(Shared {
        tally: std::sync::Mutex::new(Tally::new(fleet.agents)?),
        queued_updates: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
        all_finished: Notify::new(),
        start: Instant::now(),
        fleet: fleet.clone(),
    });
    let mut tasks = Vec::with_capacity(fleet.agents);
    for i in 0..fleet.agents {
        let client = CoordinatorClient::new(channels[i % channels.len()].clone());
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let result = agent(i, client, &shared).await;
            shared.done(result);
        }));
    }
    let finished = tokio::time::timeout(fleet.deadline, shared.all_finished.notified())
        .await
        .is_ok();
    let elapsed = shared.start.elapsed();
    for task in &tasks {
        task.abort();
    }
    let t = shared.tally();
    Ok(Outcome {
        finished,
        elapsed,
        grants: t.grants,
        handoffs: t.handoffs.clone(),
        first_answer: t.first_answer.clone(),
        all_answered: t.all_answered,
        queued_updates: shared.queued_updates.load(Ordering::Relaxed),
        errors: t.errors,
        first_error: t.first_error.clone(),
        grant_log: t.grant_log.clone(),
        tokens: t.tokens.clone(),
    })
}

/// One agent: ask, wait, (work,) release.
async fn agent(i: usize, mut client: CoordinatorClient<Channel>, shared: &Shared) -> Result<()> {
    let node = format!("fleet-{i:05}");
    let asked = Instant::now();
    let mut stream = client
        .acquire(pb::AcquireRequest {
            node: node.clone(),
            control_plane: false,
            reason: "kernel security update (bench)".into(),
            manual: false,
            labels: Default::default(),
            backs_up_control_plane: true,
        })
        .await
        .context("acquire")?
        .into_inner();
    let mut first = true;
    let token = loop {
        let event = stream
            .message()
            .await
            .context("acquire stream")?
            .context("the acquire stream ended without a grant")?;
        if first {
            shared.answered(asked);
            first = false;
        }
        match event.event {
            Some(Event::Granted(g)) => break g.fencing_token,
            Some(Event::Queued(_)) => {
                shared.queued_updates.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    };
    shared.granted(token);
    drop(stream);
    if shared.fleet.mode == AgentMode::Real {
        let hold = shared
            .fleet
            .hold_max
            .mul_f64(unit(shared.fleet.seed ^ i as u64));
        let report = |phase: pb::Phase, boot_id: &str| pb::ReportRequest {
            node: node.clone(),
            fencing_token: token,
            phase: phase as i32,
            boot_id: boot_id.to_string(),
            message: format!("bench: {}", phase.as_str_name()),
            error: String::new(),
        };
        client.report(report(pb::Phase::Draining, "")).await?;
        client
            .renew(pb::RenewRequest {
                node: node.clone(),
                fencing_token: token,
            })
            .await?;
        tokio::time::sleep(hold / 2).await;
        let before = format!("boot-{i}-a");
        client.report(report(pb::Phase::Rebooting, &before)).await?;
        tokio::time::sleep(hold / 2).await;
        let after = format!("boot-{i}-b");
        client.report(report(pb::Phase::Verifying, &after)).await?;
    }
    shared.releasing();
    client
        .release(pb::ReleaseRequest {
            node,
            fencing_token: token,
            reason: "maintenance done (bench)".into(),
        })
        .await
        .context("release")?;
    Ok(())
}

/// A number in [0, 1) from `seed` (splitmix64's finalizer): each agent's
/// hold time is fixed by the seed, so runs are comparable.
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With 3 slots, a release made while the first grants were still
    /// coming freed a slot nobody waited for: the grants after it are no
    /// handoffs, and the next release of a full house pairs with the next
    /// grant (the old in-order pairing paired the 4th grant with the first
    /// release, many places early).
    #[test]
    fn only_a_release_of_a_full_house_pairs_with_the_next_grant() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Tally::new(8).unwrap();
        assert_eq!(t.granted(at(0)), None);
        assert_eq!(t.granted(at(1)), None);
        t.releasing(at(2), 3);
        assert_eq!(t.granted(at(3)), None);
        assert_eq!(t.granted(at(4)), None);
        t.releasing(at(10), 3);
        assert_eq!(t.granted(at(13)), Some(3_000));
        t.releasing(at(20), 3);
        t.releasing(at(21), 3);
        assert_eq!(t.granted(at(25)), Some(5_000));
        assert_eq!(t.granted(at(26)), Some(5_000), "both slots were needed");
        assert_eq!(t.granted(at(27)), None, "no release is owed a grant");
        assert_eq!(t.handoffs.len(), 3);
    }
}
