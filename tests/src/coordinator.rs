//! A real `baton-coordinator` process on loopback, and `batonctl` against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::binary;
use crate::ports::free_port;

/// A coordinator process. Killed on drop.
pub struct CoordinatorProcess {
    child: Option<Child>,
    /// gRPC URL (http://127.0.0.1:PORT).
    pub url: String,
    /// Metrics address (127.0.0.1:PORT).
    pub metrics: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    port: u16,
    metrics_port: u16,
}

impl CoordinatorProcess {
    /// Starts `baton-coordinator serve --insecure` on free ports with
    /// `extra` arguments (and `--initialize` while the data directory holds
    /// no state), and waits until it answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut me = Self {
            child: None,
            url: String::new(),
            metrics: String::new(),
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            port: free_port(),
            metrics_port: free_port(),
        };
        me.url = format!("http://127.0.0.1:{}", me.port);
        me.metrics = format!("127.0.0.1:{}", me.metrics_port);
        me.spawn();
        me
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary("baton-coordinator"))
            .arg("serve")
            .arg("--insecure")
            .arg(format!("--listen=127.0.0.1:{}", self.port))
            .arg(format!("--metrics-listen=127.0.0.1:{}", self.metrics_port))
            .arg(format!("--data-dir={}", self.data_dir.display()))
            // A data directory without state is a new installation; later
            // starts find the state and must not initialize.
            .args((!self.data_dir.join("state.json").exists()).then_some("--initialize"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning baton-coordinator");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "coordinator exited with {status} during start; log:\n{}",
                    self.log_text()
                );
            }
            if self.ctl(&["status", "-o", "json"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "coordinator did not answer in 30s; log:\n{}",
            self.log_text()
        );
    }

    /// The process log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs batonctl against this coordinator.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).output().expect("running batonctl")
    }

    /// A batonctl command against this coordinator (to spawn it yourself).
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("batonctl"));
        cmd.arg("--insecure")
            .arg(format!("--coordinator={}", self.url))
            .args(args);
        cmd
    }

    /// `batonctl status -o json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "-o", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends `signal` without waiting (SIGSTOP / SIGCONT to freeze and
    /// thaw it).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid() {
            kill(Pid::from_raw(pid), signal).unwrap();
        }
    }

    /// `GET /metrics` as a scraper that does not ask for OpenMetrics (curl,
    /// `promtool check metrics`) sees it: the body of the classic text format.
    pub fn metrics_text(&self) -> String {
        scrape(&self.metrics)
    }

    /// Sends `signal` and waits for the process to exit; returns its status.
    pub fn signal_and_wait(&mut self, signal: Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        child.wait().unwrap()
    }

    /// Starts the process again with the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET /metrics` from `addr` without asking for OpenMetrics: the body of
/// the classic text format.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a chunked /metrics body: {head}"
    );
    body.to_string()
}

/// A coordinator inside the test process (`server::start`), plaintext and
/// unauthenticated, on free loopback ports. Stops when dropped.
pub struct InProcess {
    /// The running server.
    pub running: baton_coordinator::server::Running,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl InProcess {
    /// Starts `serve --insecure` with its data under `dir` (`--initialize`
    /// while it holds no state) and `extra` arguments (e.g. `--policy=FILE`).
    pub async fn start(dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        use clap::Parser;
        let mut argv = vec![
            "baton-coordinator".to_string(),
            "serve".to_string(),
            "--insecure".to_string(),
            "--listen=127.0.0.1:0".to_string(),
            "--metrics-listen=127.0.0.1:0".to_string(),
            format!("--data-dir={}", dir.join("data").display()),
        ];
        // A new data directory is initialized; a restart finds the state
        // and must not initialize it again.
        if !dir.join("data").join("state.json").exists() {
            argv.push("--initialize".to_string());
        }
        argv.extend(extra.iter().cloned());
        let baton_coordinator::config::Command::Serve(args) =
            baton_coordinator::config::Cli::try_parse_from(argv)?.command;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = baton_coordinator::server::start(*args, async move {
            let _ = stopped.await;
        })
        .await?;
        Ok(Self {
            running,
            _stop: stop,
        })
    }

    /// Starts with the node watch on the (fake) API server at
    /// `kube_api_url` and `policy` written to `dir/policy.yaml`.
    pub async fn in_cluster(dir: &Path, policy: &str, kube_api_url: &str) -> anyhow::Result<Self> {
        let path = dir.join("policy.yaml");
        std::fs::write(&path, policy)?;
        Self::start(
            dir,
            &[
                format!("--policy={}", path.display()),
                "--watch-nodes".to_string(),
                format!("--kube-api-url={kube_api_url}"),
            ],
        )
        .await
    }

    /// Its `/metrics` page in the classic text format.
    pub async fn metrics_text(&self) -> String {
        let addr = self.running.metrics_addr.to_string();
        tokio::task::spawn_blocking(move || scrape(&addr))
            .await
            .expect("scraping /metrics")
    }

    /// Waits until the `/metrics` page has a line starting with `series`
    /// (e.g. `name{labels} 1`); returns the page.
    pub async fn until_metric(&self, series: &str) -> anyhow::Result<String> {
        for _ in 0..100 {
            let text = self.metrics_text().await;
            if text.lines().any(|l| l.starts_with(series)) {
                return Ok(text);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::bail!("no `{series}` on /metrics:\n{}", self.metrics_text().await)
    }

    /// A lease client.
    pub async fn lease(
        &self,
    ) -> anyhow::Result<
        baton_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    > {
        Ok(
            baton_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
                "http://{}",
                self.running.grpc_addr
            ))
            .await?,
        )
    }

    /// An admin client.
    pub async fn admin(
        &self,
    ) -> anyhow::Result<baton_proto::v1::admin_client::AdminClient<tonic::transport::Channel>> {
        Ok(baton_proto::v1::admin_client::AdminClient::connect(format!(
            "http://{}",
            self.running.grpc_addr
        ))
        .await?)
    }

    /// Queues `node` and returns its Acquire stream.
    pub async fn acquire(
        &self,
        node: &str,
        control_plane: bool,
    ) -> anyhow::Result<tonic::Streaming<baton_proto::v1::AcquireEvent>> {
        let request = baton_proto::v1::AcquireRequest {
            node: node.to_string(),
            control_plane,
            reason: "test".to_string(),
            // As a current agent says.
            backs_up_control_plane: true,
            ..Default::default()
        };
        Ok(self.lease().await?.acquire(request).await?.into_inner())
    }

    /// Queues `node` with `labels` (as `baton-agent --label` sends them).
    pub async fn acquire_labeled(
        &self,
        node: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<tonic::Streaming<baton_proto::v1::AcquireEvent>> {
        let request = baton_proto::v1::AcquireRequest {
            node: node.to_string(),
            reason: "test".to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            backs_up_control_plane: true,
            ..Default::default()
        };
        Ok(self.lease().await?.acquire(request).await?.into_inner())
    }

    /// Asks, as holder `node` with `token`, whether it may take `step`
    /// now: `None` to proceed, else the reason to wait.
    pub async fn confirm(
        &self,
        node: &str,
        token: u64,
        step: baton_proto::v1::Step,
    ) -> anyhow::Result<Option<String>> {
        let answer = self
            .lease()
            .await?
            .confirm(baton_proto::v1::ConfirmRequest {
                node: node.to_string(),
                fencing_token: token,
                step: step as i32,
            })
            .await?
            .into_inner();
        Ok((!answer.proceed).then_some(answer.reason))
    }

    /// Releases `node`'s baton.
    pub async fn release(&self, node: &str, token: u64) -> anyhow::Result<()> {
        self.lease()
            .await?
            .release(baton_proto::v1::ReleaseRequest {
                node: node.to_string(),
                fencing_token: token,
                reason: "done".to_string(),
            })
            .await?;
        Ok(())
    }
}

/// Reads an Acquire stream until a Queued reason contains `needle`; fails
/// on a grant, the stream's end, or after `limit`.
pub async fn wait_reason(
    stream: &mut tonic::Streaming<baton_proto::v1::AcquireEvent>,
    needle: &str,
    limit: Duration,
) -> anyhow::Result<String> {
    use baton_proto::v1::acquire_event::Event;
    let wait = async {
        loop {
            match stream.message().await?.and_then(|e| e.event) {
                Some(Event::Queued(q)) if q.reason.contains(needle) => return Ok(q.reason),
                Some(Event::Queued(_)) => {}
                Some(Event::Granted(_)) => {
                    anyhow::bail!("granted while waiting for a reason containing {needle:?}")
                }
                None => anyhow::bail!("the stream ended"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| anyhow::anyhow!("no reason containing {needle:?} within {limit:?}"))?
}

/// Reads an Acquire stream until the grant; returns the fencing token.
/// Fails with "no grant in time" after `limit`.
pub async fn wait_granted(
    stream: &mut tonic::Streaming<baton_proto::v1::AcquireEvent>,
    limit: Duration,
) -> anyhow::Result<u64> {
    use baton_proto::v1::acquire_event::Event;
    let wait = async {
        loop {
            match stream.message().await?.and_then(|e| e.event) {
                Some(Event::Granted(g)) => return Ok(g.fencing_token),
                Some(Event::Queued(_)) => {}
                None => anyhow::bail!("the stream ended"),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| anyhow::anyhow!("no grant in time ({limit:?})"))?
}
