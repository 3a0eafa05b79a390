//! A harness for real etcd clusters (Debian's `etcd`, 3.4) on loopback: each
//! member gets free ports and its own data directory under a temp dir.
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
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions, MemberAddOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs scenarios with real processes one at a time within a test binary
/// (a panicking test releases it too).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A free TCP port on 127.0.0.1 (the listener is closed before use; the
/// race with other processes is accepted in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
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
}

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
        let n = names.len();
        let dir = tempfile::tempdir()?;
        let members: Vec<Member> = names
            .iter()
            .map(|name| {
                let name = name.clone();
                Member {
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(&name),
                    name,
                    child: None,
                    stopped: false,
                }
            })
            .collect();
        let mut cluster = Self {
            dir,
            members,
            quota_bytes,
        };
        let initial = cluster.initial_cluster(&[]);
        for i in 0..n {
            cluster.spawn(i, &initial, "new")?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
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
        let log_path = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
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
                if let Ok(mut c) = self.client_of(&m.name).await
                    && let Ok(s) = c.status().await
                    && s.leader() != 0
                    && c.get("ready-probe", None).await.is_ok()
                {
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
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
