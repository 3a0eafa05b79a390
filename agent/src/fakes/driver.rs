//! Runs agent processes over a [`Sim`] the way systemd would: an agent that
//! was killed or exited is started again after a second on the same state
//! directory, and a machine whose reboot time came goes down (the agent
//! with it) and boots again. Time is tokio's paused clock, so hours of
//! maintenance take milliseconds and every run replays exactly.

use super::{Sim, SimCoordinator, SimHost, SimNode, SimState};
use crate::agent::{Agent, Settings};
use crate::state::{AgentState, StateFile};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the sentinels are re-checked (the periodic wake).
const TICK: Duration = Duration::from_secs(60);
/// systemd's `RestartSec` (and the time a reboot takes to boot).
const RESTART: Duration = Duration::from_secs(1);
/// How often the stop condition is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Agent processes over one simulated machine and state directory.
pub struct Driver {
    /// The simulation.
    pub sim: Arc<Sim>,
    /// The agent's state directory.
    pub dir: tempfile::TempDir,
    /// The agent's settings.
    pub settings: Settings,
}

/// How one agent process ended.
enum Ended {
    Killed,
    Exited,
    MachineDown,
    Stop,
    Deadline,
}

/// Test settings: short timeouts so faults resolve quickly in virtual time.
pub fn settings() -> Settings {
    Settings {
        update: Some(crate::agent::Action::Command("apt-get -y upgrade".into())),
        post_check: None,
        update_timeout: Duration::from_secs(600),
        post_check_timeout: Duration::from_secs(60),
        reboot_timeout: Duration::from_secs(120),
        renew_interval: Duration::from_secs(5),
        retry_interval: Duration::from_secs(1),
        abort_backoff: Duration::from_secs(300),
        call_timeout: Duration::from_secs(10),
        ..Settings::default()
    }
}

impl Driver {
    /// A driver for `sim` with `settings` and a fresh state directory.
    pub fn new(sim: Arc<Sim>, settings: Settings) -> Self {
        Driver {
            sim,
            // tmpfs where there is one: thousands of runs fsync their
            // state, and only the order of writes matters here.
            dir: tempfile::tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .expect("temp dir"),
            settings,
        }
    }

    /// The agent's persisted state, if any.
    pub fn agent_state(&self) -> Option<AgentState> {
        let bytes = std::fs::read(self.dir.path().join("state.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Run agent processes until `stop` holds (true) or `limit` of
    /// virtual time passed (false).
    pub async fn run(
        &self,
        limit: Duration,
        stop: impl Fn(&SimState, Option<&AgentState>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.one_process(deadline, &stop).await {
                Ended::Stop => return true,
                Ended::Deadline => return false,
                Ended::MachineDown => self.sim.reboot_now(),
                Ended::Killed | Ended::Exited => {}
            }
            tokio::time::sleep(RESTART).await;
        }
    }

    async fn one_process(
        &self,
        deadline: Instant,
        stop: &impl Fn(&SimState, Option<&AgentState>) -> bool,
    ) -> Ended {
        let sim = &self.sim;
        sim.start_incarnation();
        let shutdown = CancellationToken::new();
        let mut agent = Agent::new(
            SimHost(sim.clone()),
            SimCoordinator(sim.clone()),
            SimNode(sim.clone()),
            StateFile::new(self.dir.path()).with_faults(sim.save_hook()),
            self.settings.clone(),
            shutdown.clone(),
        )
        .with_clock(sim.clock());
        let (tick, wakes) = watch::channel(0u64);
        let ticker = async {
            loop {
                tokio::time::sleep(TICK).await;
                tick.send_modify(|n| *n += 1);
            }
        };
        let machine_down = async {
            loop {
                let at = sim.state().reboot_at;
                match at {
                    Some(at) if at <= Instant::now() => return,
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => tokio::time::sleep(POLL).await,
                }
            }
        };
        let stopped = async {
            loop {
                let agent_state = self.agent_state();
                if stop(&sim.state(), agent_state.as_ref()) {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        };
        let ended = tokio::select! {
            biased;
            _ = sim.killed() => Ended::Killed,
            _ = machine_down => Ended::MachineDown,
            _ = stopped => Ended::Stop,
            _ = tokio::time::sleep_until(deadline) => Ended::Deadline,
            result = agent.run(wakes) => {
                if let Err(error) = result {
                    tracing::info!(%error, "agent exited");
                }
                Ended::Exited
            }
            () = ticker => Ended::Exited,
        };
        // The process is gone: nothing it did not persist survives.
        drop(agent);
        ended
    }
}
