//! A real `baton-coordinator` process on loopback, and `batonctl` against it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::binary;

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
