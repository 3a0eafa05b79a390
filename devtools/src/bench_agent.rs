//! `cargo xtask bench agent [--duration SECS] [--samples N]`: the agent's
//! idle cost and its reaction time.
//!
//! Runs a release `baton-agent` on the host against a release coordinator
//! and a private dbus-daemon (the agent connects to D-Bus at start but talks
//! to systemd only during maintenance, which this bench never reaches):
//! - idle: RSS (VmRSS, max of 1 s samples) and CPU time (utime + stime from
//!   /proc) over `--duration` seconds (default 60) after a short warm-up;
//! - reaction: the time from creating the reboot sentinel to the node being
//!   queued at the coordinator, observed on the Admin Watch stream (so it
//!   includes the agent's inotify wake-up, its need check, the Acquire call
//!   and the coordinator recording it). Granting is paused, so the node stays
//!   queued; removing the sentinel makes the agent withdraw before the next
//!   sample. The agent's check interval is an hour: only inotify can wake it.
//!
//! Writes target/bench/agent.json and prints a table.

use crate::procstat::{cpu_seconds, rss_kib};
use crate::util::{Proc, connect, release_dir, workspace_root};
use anyhow::{Context, Result, bail};
use baton_proto::v1::admin_client::AdminClient;
use baton_proto::v1::{PauseRequest, StatusResponse, WatchRequest};
use baton_tests::ports::free_port;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    duration: Duration,
    samples: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        duration: Duration::from_secs(60),
        samples: 20,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().context("missing value");
        match arg.as_str() {
            "--duration" => opts.duration = Duration::from_secs(value()?.parse()?),
            "--samples" => opts.samples = value()?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: bench agent [--duration SECS] [--samples N]"
            ),
        }
    }
    Ok(opts)
}

/// Runs the bench.
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let root = workspace_root();
    let work = root.join("target/bench/agent-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("run"))?;
    let release = release_dir();

    // A private bus, so the bench needs neither root nor a system bus.
    let bus_path = work.join("bus");
    let bus_address = format!("unix:path={}", bus_path.display());
    let _bus = Proc(
        Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={bus_address}"))
            .stdout(Stdio::null())
            .spawn()
            .context("starting dbus-daemon (apt-get install dbus)")?,
    );
    wait_until("the D-Bus socket", || bus_path.exists())?;

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = Proc(
        Command::new(release.join("baton-coordinator"))
            .args(["serve", "--insecure", "--initialize"])
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--data-dir={}", work.join("coordinator").display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("coordinator.log"))?)
            .spawn()
            .context("starting baton-coordinator")?,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut admin = AdminClient::new(runtime.block_on(connect(&url))?);
    runtime.block_on(admin.pause(PauseRequest {
        reason: "bench: keep the agent queued".into(),
    }))?;

    let sentinel = work.join("run/reboot-required");
    let agent = Proc(
        Command::new(release.join("baton-agent"))
            .args([
                "run",
                "--node",
                "bench-1",
                "--insecure",
                "--coordinator",
                &url,
            ])
            .arg(format!("--state-dir={}", work.join("state").display()))
            .arg(format!("--reboot-sentinel={}", sentinel.display()))
            .arg(format!("--dbus-address={bus_address}"))
            .args(["--check-interval", "1h"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("agent.log"))?)
            .spawn()
            .context("starting baton-agent")?,
    );
    let pid = agent.0.id();

    // Idle: warm up, then sample.
    std::thread::sleep(Duration::from_secs(2));
    let idle = measure_idle(pid, opts.duration)?;

    // Reaction: sentinel created -> queued at the coordinator.
    let latencies = runtime.block_on(measure_reaction(&mut admin, &sentinel, opts.samples))?;
    drop(agent);

    let mut sorted = latencies.clone();
    sorted.sort();
    let pct = |p: f64| -> f64 {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i].as_secs_f64() * 1000.0
    };
    let report = serde_json::json!({
        "idle_seconds": opts.duration.as_secs_f64(),
        "idle_rss_kib_max": idle.rss_kib_max,
        "idle_rss_kib_end": idle.rss_kib_end,
        "idle_cpu_seconds": idle.cpu_seconds,
        "idle_cpu_percent": idle.cpu_seconds / opts.duration.as_secs_f64() * 100.0,
        "sentinel_to_queued_ms": {
            "samples": sorted.len(),
            "p50": pct(0.5),
            "p90": pct(0.9),
            "max": pct(1.0),
        },
    });
    let out = root.join("target/bench/agent.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("baton-agent (release)                     value");
    println!(
        "idle RSS, max over {:>4.0} s            {:>8} KiB",
        opts.duration.as_secs_f64(),
        idle.rss_kib_max
    );
    println!(
        "idle CPU                           {:>10.3} s ({:.3} %)",
        idle.cpu_seconds,
        idle.cpu_seconds / opts.duration.as_secs_f64() * 100.0
    );
    println!("sentinel -> queued p50             {:>10.2} ms", pct(0.5));
    println!("sentinel -> queued p90             {:>10.2} ms", pct(0.9));
    println!(
        "sentinel -> queued max             {:>10.2} ms  ({} samples)",
        pct(1.0),
        sorted.len()
    );
    println!("\nwritten to {}", out.display());
    Ok(())
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

struct Idle {
    rss_kib_max: u64,
    rss_kib_end: u64,
    cpu_seconds: f64,
}

fn measure_idle(pid: u32, duration: Duration) -> Result<Idle> {
    let start_cpu = cpu_seconds(pid)?;
    let start = Instant::now();
    let mut rss_max = rss_kib(pid)?;
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1).min(duration));
        rss_max = rss_max.max(rss_kib(pid).context("the agent exited while idle")?);
    }
    Ok(Idle {
        rss_kib_max: rss_max,
        rss_kib_end: rss_kib(pid)?,
        cpu_seconds: cpu_seconds(pid)? - start_cpu,
    })
}

fn queued(status: &StatusResponse) -> bool {
    status.queue.iter().any(|q| q.node == "bench-1")
}

async fn measure_reaction(
    admin: &mut AdminClient<tonic::transport::Channel>,
    sentinel: &Path,
    samples: usize,
) -> Result<Vec<Duration>> {
    let mut watch = admin.watch(WatchRequest {}).await?.into_inner();
    let mut latencies = Vec::new();
    let timeout = Duration::from_secs(30);
    for _ in 0..samples {
        let created = Instant::now();
        std::fs::write(sentinel, b"")?;
        loop {
            let state = tokio::time::timeout(timeout, watch.message())
                .await
                .context("the agent did not queue within 30 s")??
                .context("watch ended")?;
            if queued(&state) {
                latencies.push(created.elapsed());
                break;
            }
        }
        std::fs::remove_file(sentinel)?;
        loop {
            let state = tokio::time::timeout(timeout, watch.message())
                .await
                .context("the agent did not withdraw within 30 s")??
                .context("watch ended")?;
            if !queued(&state) {
                break;
            }
        }
    }
    Ok(latencies)
}
