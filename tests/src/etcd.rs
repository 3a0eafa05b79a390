//! A harness for real etcd clusters (Debian's `etcd`, 3.4) on loopback: each
//! member gets free ports ([`crate::ports`], outside the kernel's ephemeral
//! range) and its own data directory under a temp dir. A new cluster whose
//! member exits before the cluster has formed (its port taken after all) is
//! started again on fresh ports, a bounded number of times.
//! Members can be SIGKILLed, SIGSTOPped (hung), restarted and added as
//! learners; a tiny `--quota-backend-bytes` provokes a NOSPACE alarm.
//!
//! Every process started here is killed when the cluster is dropped, even
//! when the test panics (stopped members get SIGCONT first). Tests that use
//! real processes take [`serial`] so that only one such scenario runs at a
//! time on a small machine.
//!
//! [`coordinator`] starts `baton-coordinator` processes against a cluster;
//! [`history`] records what lease clients saw and checks Baton's promises
//! over it.

pub mod coordinator;
pub mod history;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions, MemberAddOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::ports::free_port;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs scenarios with real processes one at a time within a test binary
/// (a panicking test releases it too).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// The etcd binary (Debian installs it to /usr/bin/etcd).
pub fn etcd_binary() -> PathBuf {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "etcd is not installed: `apt-get install -y etcd-server etcd-client` (cargo xtask test does it)"
    );
}

/// One member of a test cluster.
pub struct Member {
    /// The member (and node) name.
    pub name: String,
    /// Its client URL.
    pub client_url: String,
    /// Its peer URL.
    pub peer_url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// A cluster of real etcd processes.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    /// The members, in start order.
    pub members: Vec<Member>,
    quota_bytes: Option<u64>,
    start_attempts: usize,
}

/// How many times a new cluster is started on fresh ports before giving up.
const START_ATTEMPTS: usize = 3;

/// How long a new cluster may take to form (etcd needs ~1 s; a loaded
/// 2-core machine running a test suite, much more). A member that exits
/// ends the wait at once, so only a cluster that hangs waits this long.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl EtcdCluster {
    /// Starts members named `n1`..`nN` and waits until every one answers.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_with(n, None).await
    }

    /// Like [`EtcdCluster::start`], with a backend quota (tiny quotas
    /// provoke NOSPACE).
    pub async fn start_with(n: usize, quota_bytes: Option<u64>) -> Result<Self> {
        let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        Self::start_members(&names, quota_bytes).await
    }

    /// Starts members with these names (e.g. one named unlike any node).
    pub async fn start_named(names: &[&str]) -> Result<Self> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Self::start_members(&names, None).await
    }

    async fn start_members(names: &[String], quota_bytes: Option<u64>) -> Result<Self> {
        Self::start_members_checked(names, quota_bytes, |_, _| {}).await
    }

    /// Starts a new cluster of `names` and waits until it has formed. A
    /// member that exits before it has (its port taken between choosing it
    /// and binding it: "address already in use") makes the whole cluster
    /// start again on fresh ports with empty data directories, up to
    /// [`START_ATTEMPTS`] times: every member's peer URL is in the others'
    /// `--initial-cluster`, so one member cannot move alone before the
    /// cluster has formed. `before_spawn(attempt, members)` runs right
    /// before each attempt's members start (a test takes a port there).
    async fn start_members_checked(
        names: &[String],
        quota_bytes: Option<u64>,
        mut before_spawn: impl FnMut(usize, &[Member]),
    ) -> Result<Self> {
        let mut cluster = Self {
            dir: tempfile::tempdir()?,
            members: Vec::new(),
            quota_bytes,
            start_attempts: 0,
        };
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            cluster.kill_all();
            cluster.start_attempts = attempt;
            cluster.members = names
                .iter()
                .map(|name| Member {
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    data_dir: cluster.dir.path().join(name),
                    name: name.clone(),
                    child: None,
                    stopped: false,
                })
                .collect();
            for (i, m) in cluster.members.iter().enumerate() {
                // A member of a failed attempt may have written its data
                // directory with the old cluster's identity; its log is
                // kept aside (this attempt reads its own for failures).
                let _ = std::fs::remove_dir_all(&m.data_dir);
                let log = cluster.log_path(i);
                let _ = std::fs::rename(
                    &log,
                    log.with_extension(format!("attempt-{}.log", attempt - 1)),
                );
            }
            before_spawn(attempt, &cluster.members);
            let initial = cluster.initial_cluster(&[]);
            for i in 0..cluster.members.len() {
                cluster.spawn(i, &initial, "new")?;
            }
            match cluster.wait_formed().await? {
                None => return Ok(cluster),
                Some(exited) => failures.push(format!("attempt {attempt}: {exited}")),
            }
        }
        cluster.kill_all();
        bail!(
            "the etcd cluster did not start in {START_ATTEMPTS} attempts on fresh ports:\n{}\n(logs in {})",
            failures.join("\n"),
            cluster.dir.path().display()
        )
    }

    /// Waits (bounded) until every member of a new cluster answers Status
    /// with a leader and serves a read. `Some(why)` when a member exited
    /// first (why: its name, exit status and the end of its log), so the
    /// caller can start again on fresh ports; an error when the cluster
    /// did not form in time with every member still running.
    async fn wait_formed(&mut self) -> Result<Option<String>> {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        let mut ready = vec![false; self.members.len()];
        loop {
            for i in 0..self.members.len() {
                if let Some(exited) = self.exited_at_start(i) {
                    return Ok(Some(exited));
                }
            }
            for (i, m) in self.members.iter().enumerate() {
                if !ready[i] {
                    ready[i] = self.answers(&m.name).await;
                }
            }
            if ready.iter().all(|r| *r) {
                return Ok(None);
            }
            if std::time::Instant::now() > deadline {
                let waiting: Vec<&str> = self
                    .members
                    .iter()
                    .zip(&ready)
                    .filter(|(_, r)| !**r)
                    .map(|(m, _)| m.name.as_str())
                    .collect();
                bail!(
                    "etcd member(s) {} did not become ready within {READY_TIMEOUT:?}; see {}",
                    waiting.join(", "),
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Why member `i` cannot join a forming cluster: it exited (reaped
    /// here), or it logged that its address was taken (etcd exits then; the
    /// log can say so first). `None` while it runs normally.
    fn exited_at_start(&mut self, i: usize) -> Option<String> {
        let log_path = self.log_path(i);
        let m = &mut self.members[i];
        let status = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let taken = log.contains("address already in use");
        if status.is_none() && !taken {
            return None;
        }
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Some(format!(
            "member {} ({}, {}) {}; its log ends: {}",
            m.name,
            m.client_url,
            m.peer_url,
            status.map_or(
                "logged \"address already in use\"".to_string(),
                |s| format!("exited ({s})")
            ),
            tail.join(" | ")
        ))
    }

    /// True when member `name` answers Status with a leader and a read.
    async fn answers(&self, name: &str) -> bool {
        if let Ok(mut c) = self.client_of(name).await
            && let Ok(s) = c.status().await
            && s.leader() != 0
            && c.get("ready-probe", None).await.is_ok()
        {
            return true;
        }
        false
    }

    /// How many starts the cluster took (1 unless a port was taken).
    pub fn start_attempts(&self) -> usize {
        self.start_attempts
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// Kills and reaps every member (a failed start, or drop).
    fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn initial_cluster(&self, extra: &[(&str, &str)]) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .chain(extra.iter().map(|(n, u)| format!("{n}={u}")))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, initial_cluster: &str, state: &str) -> Result<()> {
        let log_path = self.log_path(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let m = &mut self.members[i];
        let mut cmd = Command::new(etcd_binary());
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "baton-test"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(q) = self.quota_bytes {
            cmd.args(["--quota-backend-bytes", &q.to_string()]);
        }
        m.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting etcd member {}", m.name))?,
        );
        m.stopped = false;
        Ok(())
    }

    /// The client endpoints, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the member named `name`.
    pub fn index(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// A client connected to member `name` only.
    pub async fn client_of(&self, name: &str) -> Result<Client> {
        let url = &self.members[self.index(name)].client_url;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Ok(Client::connect([url.as_str()], Some(opts)).await?)
    }

    /// A client over every member that runs.
    pub async fn client(&self) -> Result<Client> {
        let urls: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some() && !m.stopped)
            .map(|m| m.client_url.as_str())
            .collect();
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Ok(Client::connect(urls, Some(opts)).await?)
    }

    /// Waits until every running member answers Status with a leader
    /// (bounded, to not hang).
    pub async fn wait_ready(&self) -> Result<()> {
        for m in self
            .members
            .iter()
            .filter(|m| m.child.is_some() && !m.stopped)
        {
            let mut ok = false;
            for _ in 0..300 {
                if self.answers(&m.name).await {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !ok {
                bail!(
                    "etcd member {} did not become ready; see {}",
                    m.name,
                    self.dir.path().display()
                );
            }
        }
        Ok(())
    }

    /// The name of the current leader.
    pub async fn leader(&self) -> Result<String> {
        let mut c = self.client().await?;
        let leader = c.status().await?.leader();
        let list = c.member_list().await?;
        list.members()
            .iter()
            .find(|m| m.id() == leader)
            .map(|m| m.name().to_string())
            .context("leader not in the member list")
    }

    fn signal(&self, name: &str, signal: Signal) {
        let m = &self.members[self.index(name)];
        if let Some(child) = &m.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// SIGKILLs member `name` (a node that went down) and reaps it.
    pub fn kill(&mut self, name: &str) {
        let i = self.index(name);
        if self.members[i].stopped {
            self.signal(name, Signal::SIGCONT);
        }
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs member `name` (a hung node).
    pub fn stop(&mut self, name: &str) {
        self.signal(name, Signal::SIGSTOP);
        let i = self.index(name);
        self.members[i].stopped = true;
    }

    /// SIGCONTs a stopped member.
    pub fn cont(&mut self, name: &str) {
        self.signal(name, Signal::SIGCONT);
        let i = self.index(name);
        self.members[i].stopped = false;
    }

    /// Starts a killed member again with its data (the same member ID).
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        let initial = self.initial_cluster(&[]);
        self.spawn(i, &initial, "existing")
    }

    /// Adds a learner named `name` with the member API and starts it.
    pub async fn add_learner(&mut self, name: &str) -> Result<()> {
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut c = self.client().await?;
        // etcd refuses membership changes until its members have been
        // connected for a while ("unhealthy cluster"): retry, bounded.
        let mut tries = 0;
        loop {
            match c
                .member_add(
                    [peer.as_str()],
                    Some(MemberAddOptions::new().with_is_learner()),
                )
                .await
            {
                Ok(_) => break,
                Err(e) if tries < 100 && e.to_string().contains("unhealthy cluster") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("adding a learner"),
            }
        }
        let initial = self.initial_cluster(&[(name, &peer)]);
        self.members.push(Member {
            name: name.to_string(),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: peer,
            data_dir: self.dir.path().join(name),
            child: None,
            stopped: false,
        });
        let i = self.members.len() - 1;
        self.spawn(i, &initial, "existing")
    }

    /// The coordinators' state as `--store etcd` keeps it under the default
    /// prefix: holders (node → fencing token) and the last token.
    pub async fn stored_state(&self) -> Result<(BTreeMap<String, u64>, u64)> {
        let mut c = self.client().await?;
        let resp = c.get("/baton/state", None).await?;
        let kv = resp.kvs().first().context("no state in etcd")?;
        let doc: serde_json::Value = serde_json::from_slice(kv.value())?;
        let holders = doc["state"]["holders"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(node, h)| (node.clone(), h["fencing_token"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok((holders, doc["state"]["last_token"].as_u64().unwrap_or(0)))
    }

    /// Fills the backend until etcd refuses writes (needs a tiny quota).
    pub async fn fill_until_nospace(&self) -> Result<()> {
        let mut c = self.client().await?;
        let value = vec![b'x'; 64 * 1024];
        for i in 0..10_000 {
            if let Err(e) = c.put(format!("fill/{i}"), value.clone(), None).await {
                if e.to_string().contains("space") {
                    return Ok(());
                }
                bail!("unexpected error filling etcd: {e}");
            }
        }
        bail!("etcd never ran out of space")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    fn port_of(url: &str) -> u16 {
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Someone takes member n2's peer port between the harness choosing it
    /// and etcd binding it (what an outgoing connection did to a CI run):
    /// n2 exits with "address already in use", and the harness starts the
    /// cluster again on fresh ports instead of failing the test.
    #[tokio::test]
    async fn a_cluster_whose_port_was_taken_before_it_bound_starts_on_fresh_ports() {
        let _serial = serial().await;
        let names: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let mut squatter = None;
        let cluster = EtcdCluster::start_members_checked(&names, None, |attempt, members| {
            if attempt == 1 {
                let port = port_of(&members[1].peer_url);
                squatter = Some(TcpListener::bind(("127.0.0.1", port)).expect("taking the port"));
            }
        })
        .await
        .expect("the cluster starts despite the taken port");
        let taken = squatter.as_ref().unwrap().local_addr().unwrap().port();
        assert_eq!(cluster.start_attempts(), 2);
        for m in &cluster.members {
            assert_ne!(
                port_of(&m.peer_url),
                taken,
                "{} kept the taken port",
                m.name
            );
        }
        let first_log =
            std::fs::read_to_string(cluster.dir.path().join("n2.attempt-1.log")).unwrap();
        assert!(
            first_log.contains("address already in use"),
            "n2's first log: {first_log}"
        );
        let mut client = cluster.client().await.unwrap();
        client.put("after-restart", "yes", None).await.unwrap();
        let got = client.get("after-restart", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"yes");
    }
}
