//! `cargo xtask bench agent`: the agent's idle cost and its reaction time.
//!
//! Runs a `baton-agent` (by default the release build beside this tool) on
//! the host against a coordinator on the embedded store and a private
//! dbus-daemon (the agent connects to D-Bus at start but talks to systemd
//! only during maintenance, which this bench never reaches):
//! - idle: RSS (VmRSS, max of 1 s samples) and CPU time (utime + stime from
//!   /proc) over `--duration` seconds (default 60) after a short warm-up;
//! - reaction: the time from creating the reboot sentinel to the node being
//!   queued at the coordinator, observed on the Admin Watch stream (so it
//!   includes the agent's inotify wake-up, its need check, the Acquire call
//!   and the coordinator recording it). Granting is paused, so the node stays
//!   queued; removing the sentinel makes the agent withdraw before the next
//!   sample. The agent's check interval is an hour: only inotify can wake it.
//!
//! Writes `agent.json` into `--out DIR` (default `target/bench`; the bus,
//! the logs and the agent's and coordinator's state go under
//! `DIR/agent-work`) and prints a table ([`report`]).
//!
//! A bench that did not do its job fails: when the agent or the coordinator
//! exits, dbus-daemon cannot be started, the agent does not queue or
//! withdraw within `--timeout`, or the idle RSS is over its budget, the
//! run ends at once, the report says why in its `verdict`, and the bench
//! exits non-zero after writing it (devtools/tests/bench_agent.rs runs it
//! small, so a bench that broke fails the suite).

mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_proto::v1::admin_client::AdminClient;
use baton_proto::v1::{PauseRequest, StatusResponse, WatchRequest};

use crate::args::Args;
use crate::procstat::{cpu_seconds, rss_kib};
use crate::util::{
    Build, Proc, connect, job_done, log_tail, release_dir, start_embedded_coordinator,
    workspace_root,
};
use report::{Budget, Idle, Measured};

const USAGE: &str = "bench agent [--duration SECS (default 60)] [--samples N (default 20)] \
[--agent PATH] [--coordinator PATH] [--out DIR (default: target/bench)] \
[--max-idle-rss-kib N|none (default: 10240 for a release agent, none otherwise)] \
[--timeout SECS (default 10: to queue, and to withdraw, per sample)]";

/// How long the agent runs before the idle measurement starts (it
/// connects to D-Bus, reads its state and sets up its inotify watch).
const WARM_UP: Duration = Duration::from_secs(2);

/// How often the bench looks whether its processes are still running, so
/// an exit ends the run promptly rather than at the next timeout.
const LIVENESS_POLL: Duration = Duration::from_millis(100);

/// The node name the agent runs as.
const NODE: &str = "bench-1";

struct Options {
    duration: Duration,
    samples: usize,
    agent: PathBuf,
    coordinator: PathBuf,
    out: PathBuf,
    /// `None`: the default for the agent's build ([`Budget::default_for`]).
    budget: Option<Budget>,
    timeout: Duration,
}

fn parse(args: &[String]) -> Result<Options> {
    let release = release_dir();
    let mut opts = Options {
        duration: Duration::from_secs(60),
        samples: 20,
        agent: release.join("baton-agent"),
        coordinator: release.join("baton-coordinator"),
        out: workspace_root().join("target/bench"),
        budget: None,
        timeout: Duration::from_secs(10),
    };
    let mut args = Args::new(args, USAGE);
    while let Some(flag) = args.flag() {
        match flag.as_str() {
            "--duration" => opts.duration = args.seconds()?,
            "--timeout" => opts.timeout = args.seconds()?,
            "--samples" => opts.samples = args.at_least(1)?,
            "--agent" => opts.agent = PathBuf::from(args.value()?),
            "--coordinator" => opts.coordinator = PathBuf::from(args.value()?),
            "--out" => opts.out = PathBuf::from(args.value()?),
            "--max-idle-rss-kib" => opts.budget = Some(Budget::parse(&args.value()?)?),
            other => bail!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    Ok(opts)
}

/// Runs the bench; `args` are the words after `bench agent`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let work = opts.out.join("agent-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("run"))
        .with_context(|| format!("creating {}", work.display()))?;
    let build = Build::of(&opts.agent);
    let budget = opts.budget.unwrap_or_else(|| Budget::default_for(build));

    // Whatever was measured before a failure stays in the report.
    let mut measured = Measured::default();
    let failure = measure(&opts, &work, &mut measured)
        .err()
        .map(|e| format!("{e:#}"));
    let setup = report::Setup {
        agent: &opts.agent,
        build,
        coordinator: &opts.coordinator,
        duration: opts.duration,
        samples_asked: opts.samples,
        budget,
    };
    let report = report::build(&setup, &measured, failure);
    let path = opts.out.join("agent.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    report::print_table(&report);
    println!("\nwritten to {}", path.display());
    let failures = report::failures(&report);
    let written = format!("report written to {}", path.display());
    job_done("bench agent", &written, &failures)
}

/// Starts the bus, the coordinator and the agent under `work`, and fills
/// `measured` as far as the run gets; an error says what stopped it.
fn measure(opts: &Options, work: &Path, measured: &mut Measured) -> Result<()> {
    let mut procs = Processes::default();
    // A private bus, so the bench needs neither root nor a system bus.
    let bus_path = work.join("bus");
    let bus_address = format!("unix:path={}", bus_path.display());
    let bus_log = work.join("dbus-daemon.log");
    let bus = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--nopidfile"])
        .arg(format!("--address={bus_address}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&bus_log)?)
        .spawn()
        .context(
            "dbus-daemon could not be started (it comes with Debian's dbus package; \
             `cargo xtask deps` installs it)",
        )?;
    procs.watch("dbus-daemon", Proc(bus), bus_log);
    procs.wait_for("the D-Bus socket", || bus_path.exists())?;

    let coordinator_log = work.join("coordinator.log");
    let mut coordinator = start_embedded_coordinator(
        &opts.coordinator,
        work.join("coordinator"),
        &coordinator_log,
        &[],
    )?;
    coordinator.wait_listening(&coordinator_log)?;
    let url = format!("http://127.0.0.1:{}", coordinator.port);
    procs.watch("the coordinator", coordinator.process, coordinator_log);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut admin = AdminClient::new(runtime.block_on(connect(&url))?);
    runtime
        .block_on(admin.pause(PauseRequest {
            reason: "bench: keep the agent queued".into(),
        }))
        .context("pausing the coordinator")?;

    let sentinel = work.join("run/reboot-required");
    let agent_log = work.join("agent.log");
    let agent = Command::new(&opts.agent)
        .args(["run", "--node", NODE, "--insecure", "--coordinator", &url])
        .arg(format!("--state-dir={}", work.join("state").display()))
        .arg(format!("--reboot-sentinel={}", sentinel.display()))
        .arg(format!("--dbus-address={bus_address}"))
        .args(["--check-interval", "1h"])
        .env("RUST_LOG", "info")
        // Its log is a file, whose end a failure quotes in the report.
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log)?)
        .spawn()
        .with_context(|| format!("starting {}", opts.agent.display()))?;
    let pid = agent.id();
    procs.watch("the agent", Proc(agent), agent_log);

    procs.sleep(WARM_UP, "at start")?;
    measured.idle = Some(measure_idle(&mut procs, pid, opts.duration)?);
    runtime.block_on(measure_reaction(
        &mut admin,
        &sentinel,
        opts,
        &mut procs,
        &mut measured.latencies,
    ))
}

/// One process the bench started, killed when dropped.
struct Watched {
    /// What to call it in a message ("the agent").
    name: &'static str,
    process: Proc,
    log: PathBuf,
}

/// The processes a run depends on, in the order they were started.
#[derive(Default)]
struct Processes(Vec<Watched>);

impl Drop for Processes {
    /// Stops them in the reverse order: the agent before the coordinator
    /// and the bus it talks to, so its log ends without their errors.
    fn drop(&mut self) {
        while let Some(last) = self.0.pop() {
            drop(last);
        }
    }
}

impl Processes {
    fn watch(&mut self, name: &'static str, process: Proc, log: PathBuf) {
        self.0.push(Watched { name, process, log });
    }

    /// An error naming the first process that has exited, `when` (e.g.
    /// "while idle"), with its exit status and the end of its log.
    fn alive(&mut self, when: &str) -> Result<()> {
        for w in &mut self.0 {
            if let Some(status) = w.process.0.try_wait()? {
                bail!(
                    "{} exited {when} ({status}); its log ({}) ends:\n{}",
                    w.name,
                    w.log.display(),
                    log_tail(&w.log, 10)
                );
            }
        }
        Ok(())
    }

    /// Sleeps `duration`, ending early with an error when a process exits.
    fn sleep(&mut self, duration: Duration, when: &str) -> Result<()> {
        let end = Instant::now() + duration;
        loop {
            self.alive(when)?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(LIVENESS_POLL));
        }
    }

    /// Waits (at most 30 s) until `ok`, ending early when a process exits.
    fn wait_for(&mut self, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            self.alive(&format!("before {what} appeared"))?;
            if Instant::now() > deadline {
                bail!("timed out after 30 s waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn measure_idle(procs: &mut Processes, pid: u32, duration: Duration) -> Result<Idle> {
    const WHEN: &str = "while idle";
    // Reads a figure of the agent's; when that fails because it exited,
    // the error says so with its status rather than "no such file".
    let read = |procs: &mut Processes, what: fn(u32) -> Result<f64>| -> Result<f64> {
        what(pid).or_else(|e| {
            procs.alive(WHEN)?;
            Err(e)
        })
    };
    let rss = |pid| rss_kib(pid).map(|kib| kib as f64);
    let start_cpu = read(procs, cpu_seconds)?;
    let start = Instant::now();
    let mut rss_max = read(procs, rss)?;
    while start.elapsed() < duration {
        procs.sleep(Duration::from_secs(1).min(duration), WHEN)?;
        rss_max = rss_max.max(read(procs, rss)?);
    }
    Ok(Idle {
        rss_kib_max: rss_max as u64,
        rss_kib_end: read(procs, rss)? as u64,
        cpu_seconds: read(procs, cpu_seconds)? - start_cpu,
    })
}

fn queued(status: &StatusResponse) -> bool {
    status.queue.iter().any(|q| q.node == NODE)
}

/// Creates and removes the sentinel `opts.samples` times, pushing each
/// sentinel-to-queued time onto `latencies` as it is measured.
async fn measure_reaction(
    admin: &mut AdminClient<tonic::transport::Channel>,
    sentinel: &Path,
    opts: &Options,
    procs: &mut Processes,
    latencies: &mut Vec<Duration>,
) -> Result<()> {
    let mut watch = admin
        .watch(WatchRequest {})
        .await
        .context("opening the coordinator's Watch stream")?
        .into_inner();
    for sample in 1..=opts.samples {
        let which = format!("sample {sample} of {}", opts.samples);
        let created = Instant::now();
        std::fs::write(sentinel, b"")
            .with_context(|| format!("creating {}", sentinel.display()))?;
        let step = format!(
            "queue within {} s of the sentinel's creation",
            opts.timeout.as_secs()
        );
        until(&mut watch, queued, opts.timeout, procs, &step, &which).await?;
        latencies.push(created.elapsed());
        std::fs::remove_file(sentinel)
            .with_context(|| format!("removing {}", sentinel.display()))?;
        let step = format!(
            "withdraw within {} s of the sentinel's removal",
            opts.timeout.as_secs()
        );
        until(
            &mut watch,
            |s| !queued(s),
            opts.timeout,
            procs,
            &step,
            &which,
        )
        .await?;
    }
    Ok(())
}

/// Reads `watch` until a state satisfies `done`; an error when `timeout`
/// passes first ("the agent did not `step` (`which`)"), when a process
/// exits, or when the stream ends.
async fn until(
    watch: &mut tonic::Streaming<StatusResponse>,
    done: impl Fn(&StatusResponse) -> bool,
    timeout: Duration,
    procs: &mut Processes,
    step: &str,
    which: &str,
) -> Result<()> {
    let when = format!("while the bench waited for the agent to {step} ({which})");
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout(LIVENESS_POLL, watch.message()).await {
            Ok(Ok(Some(state))) if done(&state) => return Ok(()),
            Ok(Ok(Some(_))) => {}
            Ok(ended) => {
                // The stream ends when the coordinator does: give its exit
                // a moment to be seen, so the error names the cause.
                procs.sleep(Duration::from_secs(1), &when)?;
                match ended {
                    Err(status) => {
                        bail!("the coordinator's Watch stream failed ({which}): {status}")
                    }
                    Ok(_) => bail!("the coordinator ended its Watch stream ({which})"),
                }
            }
            Err(_elapsed) => procs.alive(&when)?,
        }
        if Instant::now() > deadline {
            bail!("the agent did not {step} ({which})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &str) -> Vec<String> {
        words.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_take_their_value_after_a_space_or_an_equals_sign() {
        let opts = parse(&args(
            "--agent /a/debug/baton-agent --duration=3 --samples 4 --timeout=5 --out /o --max-idle-rss-kib none",
        ))
        .unwrap();
        assert_eq!(opts.agent, Path::new("/a/debug/baton-agent"));
        assert_eq!(opts.duration, Duration::from_secs(3));
        assert_eq!(opts.samples, 4);
        assert_eq!(opts.timeout, Duration::from_secs(5));
        assert_eq!(opts.out, Path::new("/o"));
        assert_eq!(opts.budget, Some(Budget::None));
        // Without the flag the budget follows the agent's build.
        assert_eq!(parse(&[]).unwrap().budget, None);
    }

    #[test]
    fn bad_flags_are_refused_with_the_usage() {
        for (words, says) in [
            ("--duration 0", "at least 1 second"),
            ("--samples 0", "at least 1"),
            ("--timeout soon", "not a whole number"),
            ("--max-idle-rss-kib 10MB", "a positive number of KiB"),
            ("--agent", "--agent needs a value; usage: bench agent"),
            (
                "--waiters 3",
                "unknown argument --waiters; usage: bench agent",
            ),
        ] {
            let error = format!("{:#}", parse(&args(words)).err().expect(words));
            assert!(error.contains(says), "{words}: {error}");
        }
    }
}
