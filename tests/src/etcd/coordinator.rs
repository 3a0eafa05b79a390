//! `baton-coordinator` processes for the etcd scenarios: started with free
//! ports, their own data directory and `--insecure` (loopback only), killed
//! on drop. Helpers read Acquire streams with generous bounds that only
//! keep a broken test from hanging.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use baton_proto::v1::acquire_event::Event;
use baton_proto::v1::coordinator_client::CoordinatorClient;
use baton_proto::v1::{AcquireEvent, AcquireRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::ports::free_port;

/// How long a helper waits before it calls a scenario stuck.
pub const BOUND: Duration = Duration::from_secs(60);

/// A running coordinator process.
pub struct Coordinator {
    /// Its replica id.
    pub id: String,
    /// Its gRPC URL.
    pub grpc_url: String,
    /// Its metrics address.
    pub metrics_addr: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The program and its arguments, for [`Coordinator::restart`].
    command: Vec<String>,
    /// Its `RUST_LOG`.
    rust_log: String,
}

impl Coordinator {
    /// Starts `baton-coordinator serve --insecure` with `args` added. With
    /// the embedded store (no `--store` in `args`) its fresh data directory
    /// is initialized (`--initialize`); with a shared store the caller says
    /// which replica initializes.
    pub fn start(id: &str, args: &[&str]) -> Result<Self> {
        Self::start_binary(&crate::binary("baton-coordinator"), id, args)
    }

    /// A coordinator guarding `cluster` (probing every 500ms), with
    /// `extra` flags.
    pub fn guarding(cluster: &super::EtcdCluster, extra: &[&str]) -> Result<Self> {
        let endpoints = cluster.endpoints();
        let mut args = vec![
            "--etcd-endpoints",
            endpoints.as_str(),
            "--etcd-probe-interval",
            "500ms",
        ];
        args.extend_from_slice(extra);
        Self::start("c1", &args)
    }

    /// Like [`Coordinator::start`], with the binary at `binary` (for callers
    /// outside test executables, e.g. the bench).
    pub fn start_binary(binary: &std::path::Path, id: &str, args: &[&str]) -> Result<Self> {
        Self::start_binary_logging(binary, id, args, "info")
    }

    /// Like [`Coordinator::start_binary`], logging at `rust_log` (a bench
    /// whose log would otherwise fill the disk passes "warn").
    pub fn start_binary_logging(
        binary: &std::path::Path,
        id: &str,
        args: &[&str],
        rust_log: &str,
    ) -> Result<Self> {
        let mut all = vec!["--insecure"];
        all.extend_from_slice(args);
        Self::launch(binary, id, &all, rust_log)
    }

    /// Starts `binary serve` with `args` and no `--insecure`: the caller
    /// passes the authentication flags (the lab's mutual TLS).
    pub fn start_with_auth(binary: &std::path::Path, id: &str, args: &[&str]) -> Result<Self> {
        Self::launch(binary, id, args, "info")
    }

    fn launch(binary: &std::path::Path, id: &str, args: &[&str], rust_log: &str) -> Result<Self> {
        let grpc = free_port();
        let metrics = free_port();
        let mut me = Self {
            id: id.to_string(),
            grpc_url: format!("http://127.0.0.1:{grpc}"),
            metrics_addr: format!("127.0.0.1:{metrics}"),
            dir: tempfile::tempdir()?,
            child: None,
            command: Vec::new(),
            rust_log: rust_log.to_string(),
        };
        let data = me.dir.path().join("data");
        me.command = [
            binary.display().to_string(),
            "serve".into(),
            "--id".into(),
            id.into(),
        ]
        .into_iter()
        .chain(["--listen".into(), format!("127.0.0.1:{grpc}")])
        .chain(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")])
        .chain(["--data-dir".into(), data.display().to_string()])
        // The embedded store's fresh data directory is initialized on the
        // first start; with a shared store the caller says which replica
        // initializes (in `args`).
        .chain(
            (!args
                .iter()
                .any(|a| *a == "--store" || a.starts_with("--store=")))
            .then(|| "--initialize".to_string()),
        )
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
        me.spawn()?;
        Ok(me)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting baton-coordinator")?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts it again (after [`Coordinator::kill`], or killing it first)
    /// with the same id, flags, ports and data directory, but never
    /// `--initialize` (the state exists now, and a replica told to
    /// initialize refuses to start on it); its log continues. What a
    /// supervisor does.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.command.retain(|a| a != "--initialize");
        self.spawn()
    }

    /// True while the process has not been killed.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// How the process ended, if it exited on its own (`None` while it
    /// runs, or after [`Coordinator::kill`]); reaps it.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Where its log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("coordinator.log")
    }

    /// The default snapshot directory (`<data-dir>/etcd-snapshots`).
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("etcd-snapshots")
    }

    /// Its `/metrics` (the classic text format).
    pub fn metrics_text(&self) -> String {
        crate::coordinator::scrape(&self.metrics_addr)
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A gRPC client (retries while the process starts).
    pub async fn client(&self) -> Result<CoordinatorClient<Channel>> {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            match CoordinatorClient::connect(self.grpc_url.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "coordinator {} did not listen: {e}\n{}",
                        self.id,
                        self.log()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// True when /readyz answers 200 (this replica leads).
    pub fn ready(&self) -> bool {
        ready_at(&self.metrics_addr)
    }

    /// Waits until this replica leads.
    pub async fn wait_ready(&self) -> Result<()> {
        for _ in 0..(BOUND.as_millis() / 100) {
            if self.ready() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("coordinator {} never became ready\n{}", self.id, self.log())
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) until the process exits on its own; its exit status.
    pub async fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        for _ in 0..(BOUND.as_millis() / 100) {
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("coordinator {} did not exit\n{}", self.id, self.log())
    }

    /// Freezes the process (a partitioned or hung replica).
    pub fn stop(&self) {
        let _ = kill(self.pid(), Signal::SIGSTOP);
    }

    /// Thaws it.
    pub fn cont(&self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when the coordinator whose metrics listen on `metrics_addr`
/// answers /readyz with 200 (it leads). Blocks for at most about 2 s (a
/// frozen process accepts the connection but never answers).
pub fn ready_at(metrics_addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(metrics_addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
}

/// Opens an Acquire stream for `node`.
pub async fn acquire(
    client: &mut CoordinatorClient<Channel>,
    node: &str,
    control_plane: bool,
) -> Result<Streaming<AcquireEvent>> {
    Ok(client
        .acquire(AcquireRequest {
            node: node.to_string(),
            control_plane,
            reason: "test".to_string(),
            manual: false,
            labels: Default::default(),
            backs_up_control_plane: true,
        })
        .await?
        .into_inner())
}

/// What an Acquire stream said last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    /// Queued with this reason.
    Queued(String),
    /// Granted with this token.
    Granted(u64),
}

/// The next event, bounded.
pub async fn next(stream: &mut Streaming<AcquireEvent>) -> Result<Said> {
    let msg = tokio::time::timeout(BOUND, stream.message())
        .await
        .context("no Acquire event within the bound")??
        .context("the Acquire stream ended")?;
    match msg.event {
        Some(Event::Queued(q)) => Ok(Said::Queued(q.reason)),
        Some(Event::Granted(g)) => Ok(Said::Granted(g.fencing_token)),
        None => bail!("empty Acquire event"),
    }
}

/// Reads Queued events until one's reason contains `needle`; a grant first
/// is an error. Returns the reason.
pub async fn wait_for_reason(stream: &mut Streaming<AcquireEvent>, needle: &str) -> Result<String> {
    let mut seen = Vec::new();
    loop {
        match next(stream)
            .await
            .with_context(|| format!("waiting for a reason with {needle:?}; saw {seen:#?}"))?
        {
            Said::Queued(reason) if reason.contains(needle) => return Ok(reason),
            Said::Queued(reason) => seen.push(reason),
            Said::Granted(t) => bail!(
                "granted (token {t}) while waiting for a reason with {needle:?}; saw {seen:#?}"
            ),
        }
    }
}

/// Reads events until the grant; returns the token and every reason seen.
pub async fn wait_granted(stream: &mut Streaming<AcquireEvent>) -> Result<(u64, Vec<String>)> {
    let mut seen = Vec::new();
    loop {
        match next(stream)
            .await
            .with_context(|| format!("waiting for a grant; saw {seen:#?}"))?
        {
            Said::Queued(reason) => seen.push(reason),
            Said::Granted(t) => return Ok((t, seen)),
        }
    }
}

/// Watches the stream for `for_how_long` and fails if a grant arrives
/// (Queued updates are fine). Proves a node keeps waiting across several
/// probe rounds.
pub async fn assert_still_waiting(
    stream: &mut Streaming<AcquireEvent>,
    for_how_long: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + for_how_long;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return Ok(()),
            Ok(msg) => match msg?.and_then(|m| m.event) {
                Some(Event::Queued(_)) => continue,
                Some(Event::Granted(g)) => bail!(
                    "granted (token {}) but it must keep waiting",
                    g.fencing_token
                ),
                None => bail!("the Acquire stream ended while waiting"),
            },
        }
    }
}
