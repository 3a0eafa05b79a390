//! The coordinator under test, one fresh process per run (so its peak RSS
//! is that run's), on the embedded store or on a real 3-member etcd
//! cluster, and the floor of one save on that store.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use baton_tests::etcd::EtcdCluster;
use baton_tests::etcd::coordinator::Coordinator;
use etcd_client::GetOptions;
use hdrhistogram::Histogram;

use crate::floor;
use crate::util::{EmbeddedCoordinator, log_tail, start_embedded_coordinator};

/// Where the state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// `--store embedded` (a file under the data directory).
    Embedded,
    /// `--store etcd` on a 3-member cluster started for the bench.
    Etcd,
}

impl Store {
    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Store::Embedded => "embedded",
            Store::Etcd => "etcd",
        }
    }
}

/// What a run needs that outlives it (the etcd cluster).
pub struct Backend {
    etcd: Option<EtcdCluster>,
    binary: PathBuf,
    /// Where the coordinators' data directories and logs go (`--out`).
    out: PathBuf,
    runs: usize,
}

impl Backend {
    /// Starts what `store` needs; coordinators will run `binary` and keep
    /// their data and logs under `out`.
    pub async fn start(store: Store, binary: PathBuf, out: PathBuf) -> Result<Self> {
        let etcd = match store {
            Store::Embedded => None,
            Store::Etcd => Some(EtcdCluster::start(3).await?),
        };
        Ok(Self {
            etcd,
            binary,
            out,
            runs: 0,
        })
    }

    /// What the etcd members counted so far (summed over the members; the
    /// proposals committed as the most any member counts): how many
    /// requests of each kind a grant costs. Empty on the embedded store.
    pub fn etcd_counters(&self) -> Result<BTreeMap<String, f64>> {
        let mut sums = BTreeMap::new();
        for member in self.etcd.iter().flat_map(|c| &c.members) {
            let addr = member
                .client_url
                .strip_prefix("http://")
                .unwrap_or(&member.client_url);
            for (name, value) in etcd_metrics(addr)? {
                let slot = sums.entry(name.clone()).or_insert(0.0);
                if name == "proposals_committed" {
                    *slot = f64::max(*slot, value);
                } else {
                    *slot += value;
                }
            }
        }
        Ok(sums)
    }

    /// Starts a fresh coordinator allowing `max_concurrent` holders.
    pub async fn coordinator(&mut self, max_concurrent: usize) -> Result<Target> {
        self.runs += 1;
        let max = max_concurrent.to_string();
        match &self.etcd {
            None => {
                let log = self
                    .out
                    .join(format!("fleet-coordinator-{}.log", self.runs));
                let mut coordinator = start_embedded_coordinator(
                    &self.binary,
                    self.out.join(format!("fleet-data-{}", self.runs)),
                    &log,
                    &["--max-concurrent", &max],
                )?;
                coordinator.wait_listening(&log)?;
                Ok(Target {
                    url: format!("http://127.0.0.1:{}", coordinator.port),
                    pid: coordinator.process.0.id(),
                    kind: Kind::Embedded {
                        data: coordinator.data.clone(),
                        coordinator,
                    },
                })
            }
            Some(cluster) => {
                let endpoints = cluster.endpoints();
                let member_map = crate::bench_etcd::member_map(cluster);
                let prefix = format!("/fleet-{}", self.runs);
                let args = [
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    endpoints.as_str(),
                    "--etcd-prefix",
                    prefix.as_str(),
                    "--max-concurrent",
                    max.as_str(),
                    "--etcd-member-map",
                    member_map.as_str(),
                    // Each run has its own, new prefix.
                    "--initialize",
                ];
                let mut coordinator =
                    Coordinator::start_binary_logging(&self.binary, "fleet", &args, "warn")?;
                wait_leading(&mut coordinator).await?;
                Ok(Target {
                    url: coordinator.grpc_url.clone(),
                    pid: coordinator.pid().as_raw() as u32,
                    kind: Kind::Etcd {
                        coordinator: Box::new(coordinator),
                        client: Box::new(cluster.client().await?),
                        prefix,
                    },
                })
            }
        }
    }
}

/// Waits (bounded) until `coordinator` leads; an error with its exit
/// status and log when it exits first.
pub async fn wait_leading(coordinator: &mut Coordinator) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = coordinator.exit_status() {
            bail!(
                "the coordinator exited at start ({status}); its log ({}) ends:\n{}",
                coordinator.log_path().display(),
                log_tail(&coordinator.log_path(), 10)
            );
        }
        if coordinator.ready() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the coordinator did not lead within 60 s; its log ({}) ends:\n{}",
                coordinator.log_path().display(),
                log_tail(&coordinator.log_path(), 10)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum Kind {
    Embedded {
        coordinator: EmbeddedCoordinator,
        data: PathBuf,
    },
    Etcd {
        coordinator: Box<Coordinator>,
        client: Box<etcd_client::Client>,
        prefix: String,
    },
}

/// A running coordinator; killed when dropped.
pub struct Target {
    /// Its gRPC URL.
    pub url: String,
    /// Its process id (for /proc).
    pub pid: u32,
    kind: Kind,
}

/// One save's floor on the run's store.
pub struct SaveFloor {
    /// Size of the stored state, bytes (the size the floor writes).
    pub state_bytes: usize,
    /// One save's latency, µs.
    pub save_us: Histogram<u64>,
    /// Sequential saves per second (raw etcd txn/s on the etcd store).
    pub saves_per_s: f64,
}

/// Saves sampled while the fleet runs (see [`Target::sample_saves`]).
pub struct SaveSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Histogram<u64>>>,
}

impl SaveSampler {
    /// Stops sampling; returns the save times seen, µs.
    pub async fn finish(self) -> Result<Histogram<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// How often the sampler saves while the fleet runs: often enough for a
/// distribution, rarely enough not to load the disk (or etcd) it measures.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

impl Target {
    /// How the coordinator ended, when it exited (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<String> {
        let status = match &mut self.kind {
            Kind::Embedded { coordinator, .. } => coordinator.process.0.try_wait().ok().flatten(),
            Kind::Etcd { coordinator, .. } => coordinator.exit_status(),
        };
        status.map(|s| s.to_string())
    }

    /// Samples one save every [`SAMPLE_EVERY`] while the fleet runs, on the
    /// same disk (or etcd cluster) and under the same load as the
    /// coordinator's saves: the floor of this run, not of a quieter moment.
    pub async fn sample_saves(&self) -> Result<SaveSampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = match &self.kind {
            Kind::Embedded { data, .. } => {
                let data = data.clone();
                let dir = data.join("floor-during");
                std::fs::create_dir_all(&dir)?;
                tokio::task::spawn_blocking(move || {
                    let mut saves = Histogram::<u64>::new(3)?;
                    while !flag.load(Ordering::Relaxed) {
                        let size = std::fs::metadata(data.join("state.json"))
                            .map(|m| m.len() as usize)
                            .unwrap_or(4096);
                        saves.record(floor::atomic_write(&dir, &vec![b'x'; size])?)?;
                        std::thread::sleep(SAMPLE_EVERY);
                    }
                    Ok(saves)
                })
            }
            Kind::Etcd { client, prefix, .. } => {
                let mut client = (**client).clone();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let guard = floor::etcd_guard(&mut client).await?;
                    let mut saves = Histogram::<u64>::new(3)?;
                    while !flag.load(Ordering::Relaxed) {
                        let size = state_bytes(&mut client, &prefix).await?;
                        let doc = vec![b'x'; size];
                        saves.record(floor::etcd_txn(&mut client, guard, &doc).await?)?;
                        tokio::time::sleep(SAMPLE_EVERY).await;
                    }
                    Ok(saves)
                })
            }
        };
        Ok(SaveSampler { stop, task })
    }

    /// How many saves the coordinator made so far, when the store says
    /// (the embedded store's generation, which grows by one per save).
    pub fn saves_so_far(&self) -> Option<u64> {
        match &self.kind {
            Kind::Embedded { data, .. } => {
                let doc = std::fs::read(data.join("state.json")).ok()?;
                let doc: serde_json::Value = serde_json::from_slice(&doc).ok()?;
                doc["generation"].as_u64()
            }
            Kind::Etcd { .. } => None,
        }
    }

    /// Measures one save of a state of the size now stored: an atomic file
    /// write, or a guarded etcd transaction on the same cluster.
    pub async fn save_floor(&mut self, samples: usize) -> Result<SaveFloor> {
        match &mut self.kind {
            Kind::Embedded { data, .. } => {
                let state_bytes = std::fs::metadata(data.join("state.json"))
                    .map(|m| m.len() as usize)
                    .unwrap_or(4096);
                let started = std::time::Instant::now();
                let save_us = floor::atomic_writes(&data.join("floor"), state_bytes, samples)?;
                Ok(SaveFloor {
                    state_bytes,
                    save_us,
                    saves_per_s: samples as f64 / started.elapsed().as_secs_f64(),
                })
            }
            Kind::Etcd { client, prefix, .. } => {
                let state_bytes = state_bytes(client, prefix).await?;
                let (save_us, saves_per_s) = floor::etcd_txns(client, state_bytes, samples).await?;
                Ok(SaveFloor {
                    state_bytes,
                    save_us,
                    saves_per_s,
                })
            }
        }
    }
}

/// The size of the state document under `prefix`: the largest value there
/// (the rest are election keys); 4 KiB before the first save.
async fn state_bytes(client: &mut etcd_client::Client, prefix: &str) -> Result<usize> {
    Ok(client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?
        .kvs()
        .iter()
        .map(|kv| kv.value().len())
        .max()
        .unwrap_or(4096))
}

/// The counters of one etcd member's `/metrics` (plain HTTP on its client
/// address) that tell what a grant costs there: gRPC calls by method,
/// raft proposals committed, WAL fsyncs.
fn etcd_metrics(addr: &str) -> Result<Vec<(String, f64)>> {
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    let mut out = Vec::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = if key == "etcd_server_proposals_committed_total" {
            "proposals_committed".to_string()
        } else if key == "etcd_disk_wal_fsync_duration_seconds_count" {
            "wal_fsyncs".to_string()
        } else if let Some(labels) = key.strip_prefix("grpc_server_handled_total{") {
            let Some(method) = grpc_method(labels) else {
                continue;
            };
            format!("grpc_{method}")
        } else if let Some(labels) = key.strip_prefix("grpc_server_msg_received_total{") {
            // Streams (keep-alives, watches) count their messages here.
            let Some(method) = grpc_method(labels) else {
                continue;
            };
            format!("msgs_{method}")
        } else {
            continue;
        };
        out.push((name, value));
    }
    Ok(out)
}

/// The `grpc_method` label of a metric's labels.
fn grpc_method(labels: &str) -> Option<&str> {
    labels
        .split(',')
        .find_map(|l| l.strip_prefix("grpc_method=\""))
        .and_then(|m| m.strip_suffix('"'))
}
