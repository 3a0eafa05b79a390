//! `baton-devtools lab` (`cargo xtask lab`): a whole rollout through real
//! etcd and real reboots, watched from outside.
//!
//! The lab boots `--nodes` etcd nodes and `--workers` workers as
//! systemd-nspawn containers ([`nodes`]; each etcd node runs its member as a
//! systemd unit on its own loopback address), makes a CA and certificates
//! ([`certs`]), starts two coordinators on the host with `--store etcd` on
//! that same cluster, the etcd guard, verified snapshots and mutual TLS,
//! behind one front address that routes to the ready replica ([`front`]),
//! then publishes version 2 of a package in the nodes' apt repository. The
//! agents notice it, and Baton rolls it through the cluster.
//!
//! Meanwhile [`monitors`] watch from outside Baton (boot records, etcd's own
//! view, a write probe), [`observer`] follows Baton's own account for the
//! progress display ([`progress`]) and the phase figures, and with
//! `--chaos` [`chaos`] injects faults. At the end [`verdicts`] judges the
//! run and [`report`] writes `report.json` and `report.html`.
//!
//! Everything the lab starts is stopped when it ends, fails, panics or is
//! interrupted (kill-on-drop guards and a signal handler; [`leftovers`]
//! also cleans up after a lab that was killed outright). `--keep` leaves the
//! cluster running until Ctrl-C and prints the batonctl commands.

mod backups;
mod certs;
mod chaos;
mod front;
mod leftovers;
mod monitors;
mod nodes;
mod observer;
mod progress;
mod report;
mod seen;
mod verdicts;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use baton_tests::etcd::coordinator::Coordinator;
use baton_tests::nspawn::{Node, apt};
use chrono::Utc;
use clap::Parser;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use seen::{NodeSeen, Shared};

/// `baton-devtools lab`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "baton-devtools lab",
    about = "Roll an OS update through a lab cluster of real systemd nodes carrying a real etcd cluster, and watch it from outside."
)]
pub struct LabArgs {
    /// etcd nodes (each carries a member of the cluster; at least 3, so one
    /// can go down without losing quorum).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    pub nodes: u64,
    /// Worker nodes (no etcd member).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=16))]
    pub workers: u64,
    /// How many nodes may hold the baton at once (etcd nodes: one at a time
    /// whatever this says).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub max_concurrent: u64,
    /// Inject faults during the rollout (see the README).
    #[arg(long)]
    pub chaos: bool,
    /// The chaos seed (default: random, printed).
    #[arg(long, requires = "chaos")]
    pub seed: Option<u64>,
    /// Leave the cluster running after the rollout (until Ctrl-C) and print
    /// the batonctl commands to explore it.
    #[arg(long)]
    pub keep: bool,
    /// Where the report and the run's files go (default: target/lab).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The first three octets of the etcd members' loopback addresses.
    #[arg(long, default_value = "127.0.1")]
    pub subnet: String,
    /// The coordinators' election TTL, in seconds.
    #[arg(long, default_value_t = 5)]
    pub election_ttl: u64,
    /// A probe write not committed within this many seconds means quorum
    /// was lost.
    #[arg(long, default_value_t = 5.0)]
    pub probe_deadline: f64,
    /// Give up on the rollout after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// How often agents check for updates (seconds).
    #[arg(long, default_value_t = 2)]
    pub check_interval: u64,
}

/// Runs the lab with the words after `lab`; Err when it could not run or a
/// monitor found a violation.
pub fn main(args: &[String]) -> Result<()> {
    let opts = LabArgs::try_parse_from(
        std::iter::once("baton-devtools lab".to_string()).chain(args.iter().cloned()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let interrupted = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        };
        tokio::select! {
            r = run(opts) => r,
            signal = interrupted => {
                eprintln!("\nlab: {signal}: stopping every container and process the lab started ...");
                Err(anyhow::anyhow!("interrupted by {signal}"))
            }
        }
    });
    // Blocking work still under way (a node still booting) ends and drops
    // (stops) what it made before the runtime goes.
    runtime.shutdown_timeout(Duration::from_secs(120));
    outcome
}

fn program(name: &str) -> Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (cargo xtask lab installs it)"))
}

/// The lab's running parts; dropping it stops them all.
struct Cluster {
    coordinators: Arc<Mutex<Vec<Coordinator>>>,
    nodes: Arc<Vec<Node>>,
    front_url: String,
    ca: PathBuf,
    admin: certs::Pair,
    cancel: CancellationToken,
}

impl Drop for Cluster {
    /// Stops everything: the tasks, the coordinators, every container at
    /// once, then each node's clean-up (removing its root directory takes a
    /// while) in parallel.
    fn drop(&mut self) {
        self.cancel.cancel();
        for c in self
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            c.kill();
        }
        for node in self.nodes.iter() {
            node.kill();
        }
        let nodes = std::mem::replace(&mut self.nodes, Arc::new(Vec::new()));
        // Tasks still winding down may hold the nodes for a moment longer;
        // then the last of them drops them (already killed).
        if let Ok(nodes) = Arc::try_unwrap(nodes) {
            let cleanups: Vec<_> = nodes
                .into_iter()
                .map(|node| std::thread::spawn(move || drop(node)))
                .collect();
            for cleanup in cleanups {
                let _ = cleanup.join();
            }
        }
    }
}

async fn run(opts: LabArgs) -> Result<()> {
    ensure!(
        baton_tests::is_root(),
        "the lab boots systemd-nspawn containers: run it as root (cargo xtask lab)"
    );
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| baton_tests::nspawn::bins::target_dir().join("lab"));
    std::fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    leftovers::clean(&out);
    let dir = out.join("run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(out.join("report.json"));
    let _ = std::fs::remove_file(out.join("report.html"));

    let bin = crate::util::release_dir();
    let agent = bin.join("baton-agent");
    let coordinator_bin = bin.join("baton-coordinator");
    for b in [&agent, &coordinator_bin, &bin.join("batonctl")] {
        ensure!(
            b.exists(),
            "{} is missing (cargo xtask lab builds it)",
            b.display()
        );
    }
    let (etcd, etcdctl) = (program("etcd")?, program("etcdctl")?);

    let plans = nodes::plan(opts.nodes as usize, opts.workers as usize, &opts.subnet);
    let shared = Shared::default();
    {
        let mut seen = shared.lock();
        for p in &plans {
            seen.nodes.insert(
                p.name.clone(),
                NodeSeen {
                    etcd: p.is_etcd(),
                    phase: "booting".into(),
                    ..Default::default()
                },
            );
        }
        seen.note(format!(
            "lab: {} etcd nodes + {} workers, max concurrent {}{}",
            opts.nodes,
            opts.workers,
            opts.max_concurrent,
            if opts.chaos { ", chaos" } else { "" }
        ));
    }
    let cancel = CancellationToken::new();

    // Certificates, the package and the repository.
    let ca = certs::LabCa::create(&dir.join("tls"))?;
    let server = ca.server()?;
    let admin = ca.admin()?;
    let v1 = apt::build_deb(&dir.join("debs"), nodes::PACKAGE, "1", None)?;
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo)?;
    apt::write_packages_index(&repo)?;

    // The front first: the agents' settings carry its address.
    let (ready_tx, ready_rx) = watch::channel(vec![false, false]);

    println!(
        "lab: booting {} nodes (the first run builds a Debian rootfs with debootstrap) ...",
        plans.len()
    );
    let node_files = dir.join("nodes");
    // The coordinators listen on ports chosen when they start, so the front
    // is started first on its own port and told the backends later.
    let backends: Arc<Mutex<Vec<std::net::SocketAddr>>> = Arc::default();
    let front_addr = front::start(backends.clone(), ready_rx, cancel.clone()).await?;
    let front_url = format!("https://127.0.0.1:{}", front_addr.port());
    let check_interval = format!("{}s", opts.check_interval);
    let specs = plans
        .iter()
        .map(|p| {
            nodes::spec(
                p,
                &plans,
                &nodes::Inputs {
                    agent: &agent,
                    etcd: &etcd,
                    etcdctl: &etcdctl,
                    repo: &repo,
                    v1: &v1,
                    ca: &ca,
                    dir: &node_files,
                    coordinator_url: &front_url,
                    check_interval: &check_interval,
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let booted = tokio::task::spawn_blocking(move || nodes::boot_all(specs)).await??;
    let cluster = Cluster {
        coordinators: Arc::default(),
        nodes: Arc::new(booted),
        front_url: front_url.clone(),
        ca: ca.ca.clone(),
        admin: admin.clone(),
        cancel: cancel.clone(),
    };
    let bookkeeping = tokio::spawn(leftovers::track(
        out.clone(),
        cluster.nodes.clone(),
        cluster.coordinators.clone(),
        cancel.clone(),
    ));
    shared
        .lock()
        .note("nodes booted; waiting for the etcd cluster");
    let endpoints: Vec<String> = plans.iter().filter_map(|p| p.client_url()).collect();
    wait_etcd(&endpoints).await?;

    // Two coordinators on the etcd store of the cluster being rolled.
    let ttl = Duration::from_secs(opts.election_ttl);
    // Every etcd node is declared with its member (they share names), so
    // the guard never has to wait to learn which node carries which member.
    let member_map: Vec<String> = plans
        .iter()
        .filter(|p| p.client_url().is_some())
        .map(|p| format!("{0}={0}", p.name))
        .collect();
    for id in ["coord-a", "coord-b"] {
        let snapshots = dir.join(id).join("snapshots");
        let mut args: Vec<String> = vec![
            "--store=etcd".into(),
            format!("--etcd-endpoints={}", endpoints.join(",")),
            format!("--etcd-election-ttl={}s", opts.election_ttl),
            format!("--etcd-snapshot-dir={}", snapshots.display()),
            // Room for every control-plane node's pair, with retries.
            "--etcd-snapshot-keep=10".into(),
            format!("--max-concurrent={}", opts.max_concurrent),
            format!("--tls-cert={}", server.cert.display()),
            format!("--tls-key={}", server.key.display()),
            format!("--client-ca={}", ca.ca.display()),
            format!("--etcd-member-map={}", member_map.join(",")),
        ];
        // The lab's etcd cluster is new: the first replica initializes the
        // state, the second (and every restart) finds it.
        if id == "coord-a" {
            args.push("--initialize".into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let c = Coordinator::start_with_auth(&coordinator_bin, id, &refs)?;
        if id == "coord-a" {
            // The second replica must not find the store before it exists:
            // an empty store is refused without --initialize.
            c.wait_ready().await?;
        }
        let grpc: std::net::SocketAddr = c
            .grpc_url
            .trim_start_matches("http://")
            .parse()
            .context("coordinator address")?;
        backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(grpc);
        cluster
            .coordinators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c);
    }
    let replicas: Vec<(String, String)> = cluster
        .coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| (c.id.clone(), c.metrics_addr.clone()))
        .collect();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(monitors::readiness(
        replicas,
        ready_tx,
        shared.clone(),
        cancel.clone(),
    )));
    wait_until(Duration::from_secs(60), "a coordinator to lead", || {
        shared.lock().leader().is_some()
    })
    .await?;

    // Baton's own account, the monitors, the display.
    let status_channel =
        observer::admin_channel(&front_url, &ca.ca, &admin, Some(Duration::from_secs(5)))?;
    let watch_channel = observer::admin_channel(&front_url, &ca.ca, &admin, None)?;
    tasks.push(tokio::spawn(observer::follow(
        watch_channel,
        shared.clone(),
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(monitors::hosts(
        cluster.nodes.clone(),
        plans.clone(),
        opts.max_concurrent as usize,
        shared.clone(),
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(monitors::members(
        plans.clone(),
        shared.clone(),
        cancel.clone(),
    )));
    let probe_deadline = Duration::from_secs_f64(opts.probe_deadline);
    tasks.push(tokio::spawn(monitors::write_probe(
        plans.clone(),
        probe_deadline,
        shared.clone(),
        cancel.clone(),
    )));
    let display_cancel = CancellationToken::new();
    let display = tokio::spawn(progress::show(shared.clone(), display_cancel.clone()));

    let agents_up = wait_until(Duration::from_secs(60), "every agent to run", || {
        let agents = nodes::scan_processes().agents;
        plans.iter().all(|p| agents.contains_key(&p.name))
    })
    .await;
    if let Err(e) = agents_up {
        display_cancel.cancel();
        let _ = display.await;
        return Err(e.context(diagnostics(&cluster.nodes)));
    }

    // The update.
    apt::build_deb(
        &repo,
        nodes::PACKAGE,
        "2",
        Some(
            "# Like a kernel package: some work, then ask for a reboot.\nsleep 2\ntouch /var/run/reboot-required",
        ),
    )?;
    apt::write_packages_index(&repo)?;
    {
        let mut seen = shared.lock();
        seen.started = Some(Utc::now());
        seen.note("published baton-demo 2 in the nodes' apt repository: the rollout starts");
    }
    let seed = opts.seed.unwrap_or_else(rand::random);
    let chaos_task = opts.chaos.then(|| {
        let plan = chaos::ChaosPlan::new(seed, &plans);
        shared.lock().note(format!(
            "chaos seed {seed}: kill the leader at the first {}, kill {}'s agent mid-update, pause an etcd member {:.1} s, freeze the leader TTL+{:.1} s",
            plan.kill_leader_at,
            plan.agent_victim,
            plan.member_pause.as_secs_f64(),
            plan.freeze_extra.as_secs_f64()
        ));
        tokio::spawn(chaos::run(
            plan,
            chaos::Targets {
                coordinators: cluster.coordinators.clone(),
                nodes: cluster.nodes.clone(),
                plans: plans.clone(),
                election_ttl: ttl,
            },
            shared.clone(),
            cancel.clone(),
        ))
    });

    // Until every node has finished, one failed, or the time is up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.timeout);
    let mut finished_in_time = false;
    loop {
        {
            let seen = shared.lock();
            if seen.done() == plans.len() {
                finished_in_time = true;
                break;
            }
            if seen.nodes.values().any(|n| n.phase == "failed") {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            let mut seen = shared.lock();
            seen.violation(
                "rollout",
                Utc::now(),
                format!("the rollout did not finish within {} s", opts.timeout),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    {
        let mut seen = shared.lock();
        let last_release = seen
            .nodes
            .values()
            .flat_map(|n| n.releases.iter().map(|(t, ..)| *t))
            .max();
        seen.finished = Some(
            last_release
                .unwrap_or_else(Utc::now)
                .max(seen.started.unwrap_or_default()),
        );
        seen.note("every node is done; watching a few more seconds for late surprises");
    }
    // Late reboots or lost writes after the last release still count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(task) = chaos_task {
        if finished_in_time {
            // Faults not yet injected will not be: the rollout is over.
            task.abort();
        }
        let _ = task.await;
    }

    // The final facts, read from the nodes and the coordinator.
    let status = observer::status(&status_channel).await;
    let mut facts = verdicts::FinalFacts {
        max_concurrent: opts.max_concurrent as usize,
        probe_deadline,
        chaos: opts.chaos,
        finished_in_time,
        ..Default::default()
    };
    match &status {
        Ok(status) => {
            observer::record(&shared, status);
            facts.audit = status
                .audit
                .iter()
                .filter_map(|a| {
                    let t = a.time.as_ref()?;
                    Some((
                        chrono::DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32)?,
                        a.action.clone(),
                        a.node.clone(),
                        a.fencing_token,
                    ))
                })
                .collect();
        }
        Err(e) => shared
            .lock()
            .violation("rollout", Utc::now(), format!("no final status: {e:#}")),
    }
    facts.backups = backups::scan(&[
        &dir.join("coord-a").join("snapshots"),
        &dir.join("coord-b").join("snapshots"),
    ]);
    for node in cluster.nodes.iter() {
        let version = node
            .exec(&["dpkg-query", "-W", "-f", "${Version}", nodes::PACKAGE])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        facts.versions.insert(node.name().to_string(), version);
        facts
            .timings
            .insert(node.name().to_string(), nodes::timings(&node.rootfs()));
    }
    display_cancel.cancel();
    let _ = display.await;

    let settings = report::Settings {
        etcd_nodes: opts.nodes as usize,
        workers: opts.workers as usize,
        max_concurrent: opts.max_concurrent as usize,
        chaos_seed: opts.chaos.then_some(seed),
        election_ttl_seconds: ttl.as_secs_f64(),
        probe_deadline_seconds: probe_deadline.as_secs_f64(),
    };
    let observations = observations(&cluster);
    let (figures, verdicts) = {
        let mut seen = shared.lock();
        seen.observations = observations.clone();
        chaos::describe_effects(&mut seen);
        let figures = verdicts::figures(&seen, &facts);
        let verdicts = verdicts::verdicts(&seen, &facts, &figures);
        report::write(&out, &settings, &seen, &figures, &verdicts)?;
        (figures, verdicts)
    };
    println!("{}", verdicts::table(&figures, &verdicts, &observations));
    println!(
        "report: {} and {}",
        out.join("report.html").display(),
        out.join("report.json").display()
    );

    if opts.keep {
        keep(&cluster, &dir, &bin)?;
        tokio::signal::ctrl_c().await?;
        println!("lab: stopping ...");
    }
    cancel.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let _ = bookkeeping.await;
    drop(cluster);
    leftovers::forget(&out);
    let failed: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.ok)
        .map(|v| format!("{}: {}", v.monitor, v.summary))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} monitor(s) found violations:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// What the logs say that no verdict covers: agent reports the coordinator
/// refused, and coordinators that stepped down (leadership changes).
fn observations(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for node in cluster.nodes.iter() {
        let log = node.agent_log();
        let failed: Vec<String> = log
            .lines()
            .filter(|l| l.contains("report failed"))
            .map(strip_ansi)
            .collect();
        if !failed.is_empty() {
            let mut why: Vec<&str> = failed
                .iter()
                .filter_map(|l| l.split("error=").nth(1))
                .collect();
            why.sort_unstable();
            why.dedup();
            out.push(format!(
                "agent on {}: {} progress report(s) failed: {}",
                node.name(),
                failed.len(),
                why.join("; ")
            ));
        }
    }
    for c in cluster
        .coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let log = c.log();
        let downs: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("stepping down as coordinator leader"))
            .collect();
        if !downs.is_empty() {
            let mut why: Vec<String> = log
                .lines()
                .map(strip_ansi)
                .filter(|l| l.contains("coordinator election: retrying"))
                .filter_map(|l| l.split("error=").nth(1).map(str::to_string))
                .collect();
            why.sort_unstable();
            why.dedup();
            why.truncate(3);
            out.push(format!(
                "coordinator {} stepped down {} time(s) while leading ({})",
                c.id,
                downs.len(),
                why.join("; ")
            ));
        }
    }
    out
}

/// Log lines without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_string()
}

/// Waits until every etcd member answers Status with a leader.
async fn wait_etcd(endpoints: &[String]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for url in endpoints {
        loop {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2));
            if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], Some(options)).await
                && let Ok(s) = c.status().await
                && s.leader() != 0
                && c.get("/lab/ready", None).await.is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("etcd member {url} did not become ready within 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn diagnostics(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(Node::diagnostics)
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `--keep`: print how to explore the running cluster.
fn keep(cluster: &Cluster, dir: &Path, bin: &Path) -> Result<()> {
    let env = dir.join("batonctl.env");
    std::fs::write(
        &env,
        format!(
            "BATON_COORDINATOR={}\nBATON_CA={}\nBATON_CERT={}\nBATON_KEY={}\n",
            cluster.front_url,
            cluster.ca.display(),
            cluster.admin.cert.display(),
            cluster.admin.key.display()
        ),
    )?;
    let ctl = bin.join("batonctl");
    println!(
        "\nthe cluster keeps running until Ctrl-C. Explore it with batonctl (admin certificate):\n"
    );
    println!("    set -a; . {}; set +a", env.display());
    println!("    {} status", ctl.display());
    println!("    {} status --watch", ctl.display());
    println!("    {} pause --reason 'looking around'", ctl.display());
    println!("    {} resume", ctl.display());
    println!("\nnodes (nsenter -t PID -a to enter one):");
    for node in cluster.nodes.iter() {
        println!(
            "    {:<10} pid {}  rootfs {}",
            node.name(),
            node.pid1().unwrap_or(0),
            node.rootfs().display()
        );
    }
    let coordinators = cluster
        .coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    println!("\ncoordinators:");
    for c in coordinators.iter() {
        println!(
            "    {} grpc {} metrics http://{}/metrics log {}",
            c.id,
            c.grpc_url.replace("http://", "https://"),
            c.metrics_addr,
            c.log_path().display()
        );
    }
    Ok(())
}
