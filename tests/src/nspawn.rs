//! Real systemd nodes in systemd-nspawn containers, for end-to-end tests of
//! baton-agent (needs root; CI runs the tests as root).
//!
//! - [`base_rootfs`] builds a Debian bookworm rootfs with debootstrap once and
//!   caches it under `target/nspawn/rootfs` (built in a temp dir and renamed
//!   into place, so an interrupted build never leaves half a rootfs).
//! - [`Node::boot`] copies it, installs the agent as a systemd service
//!   (binary bind-mounted read-only, settings in an EnvironmentFile), boots
//!   it with systemd-nspawn, and boots it again whenever it exits 133 (a
//!   reboot), recording every boot (boot_id, start and end) from the host.
//! - Dropping a [`Node`] kills the container and its supervisor, also when
//!   the test panics.
//!
//! The coordinator runs on the host ([`crate::coordinator`]); the nodes
//! share its loopback (no private network). Submodules: [`apt`] builds .deb
//! packages and a flat local apt repository; [`bins`] builds the agent;
//! [`cluster`] runs that coordinator and reads its view (holders, audit).

pub mod apt;
pub mod bins;
pub mod cluster;

use anyhow::{Context, Result, bail};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Fail clearly when not root: these tests need systemd-nspawn.
pub fn require_root() {
    crate::require_root("booting systemd-nspawn containers");
}

/// Wait until `check` returns Some, polling every 100 ms; fail after
/// `timeout` (a generous bound that only prevents hangs).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cached Debian rootfs, built on first use.
pub fn base_rootfs() -> Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = bins::target_dir().join("nspawn");
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&dir)?;
    // Serialize builds across test processes, too.
    let lock = fs::File::create(dir.join("rootfs.lock"))?;
    lock.lock()?;
    if rootfs.join("usr/lib/systemd/systemd").exists() {
        return Ok(rootfs);
    }
    let build = tempfile::Builder::new()
        .prefix("rootfs.build.")
        .tempdir_in(&dir)?;
    let target = build.path().join("rootfs");
    eprintln!("building the Debian rootfs with debootstrap (once) ...");
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,apt",
            "bookworm",
        ])
        .arg(&target)
        .arg(debian_mirror())
        .status()
        .context("running debootstrap (apt-get install debootstrap)")?;
    if !status.success() {
        bail!("debootstrap failed: {status}");
    }
    fs::rename(&target, &rootfs)?;
    Ok(rootfs)
}

/// The Debian mirror configured on this machine (deb.debian.org otherwise).
fn debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in entries.flatten() {
            if let Ok(t) = fs::read_to_string(e.path()) {
                texts.push(t);
            }
        }
    }
    for text in texts {
        for word in text.split_whitespace() {
            if word.starts_with("http") && word.trim_end_matches('/').ends_with("/debian") {
                return word.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// One boot of a node, as seen from the host.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The container's boot_id in this boot.
    pub boot_id: String,
    /// When systemd started (observed from the host).
    pub started: SystemTime,
    /// When systemd-nspawn exited (None while running).
    pub ended: Option<SystemTime>,
    /// systemd-nspawn's exit code (133 = reboot).
    pub exit_code: Option<i32>,
}

/// How to set up a node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// The node (and machine, and host) name.
    pub name: String,
    /// `BATON_*` settings for the agent (written to its EnvironmentFile).
    pub agent_env: Vec<(String, String)>,
    /// Files to write into the rootfs before the first boot (path relative
    /// to the rootfs root, contents).
    pub files: Vec<(String, String)>,
    /// A host directory bind-mounted read-only at /repo.
    pub repo: Option<PathBuf>,
    /// .deb files to install with dpkg in the rootfs before the first boot.
    pub preinstall: Vec<PathBuf>,
    /// The agent binary (None: the workspace's, built on demand by
    /// [`bins::agent_binary`]; callers outside test executables, such as
    /// the lab, pass the one next to them).
    pub agent_binary: Option<PathBuf>,
    /// More read-only bind mounts: (host path, path in the node).
    pub binds_ro: Vec<(PathBuf, String)>,
    /// systemd units (written with [`NodeSpec::unit`]) enabled in
    /// multi-user.target besides the agent's.
    pub units: Vec<String>,
}

impl NodeSpec {
    /// A node named `name` whose agent talks to `coordinator_url`.
    pub fn new(name: &str, coordinator_url: &str) -> Self {
        NodeSpec {
            name: name.to_string(),
            agent_env: vec![
                ("BATON_NODE".into(), name.into()),
                ("BATON_COORDINATOR".into(), coordinator_url.into()),
                ("BATON_INSECURE".into(), "true".into()),
                ("BATON_STATE_DIR".into(), "/var/lib/baton".into()),
                ("BATON_RENEW_INTERVAL".into(), "2s".into()),
                ("BATON_RETRY_INTERVAL".into(), "1s".into()),
                ("RUST_LOG".into(), "info,baton_agent=debug".into()),
            ],
            ..Default::default()
        }
    }

    /// Set an agent setting.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.agent_env.push((key.into(), value.into()));
        self
    }

    /// Drop an agent setting (e.g. `BATON_INSECURE` for mutual TLS).
    pub fn without_env(mut self, key: &str) -> Self {
        self.agent_env.retain(|(k, _)| k != key);
        self
    }

    /// Write a file into the rootfs before the first boot.
    pub fn file(mut self, path: &str, contents: &str) -> Self {
        self.files.push((path.into(), contents.into()));
        self
    }

    /// Install the systemd unit `name` (in /etc/systemd/system) and enable
    /// it in multi-user.target.
    pub fn unit(mut self, name: &str, contents: &str) -> Self {
        self.files
            .push((format!("etc/systemd/system/{name}"), contents.into()));
        self.units.push(name.into());
        self
    }

    /// Bind-mount the host's `host` read-only at `path` in the node.
    pub fn bind_ro(mut self, host: &Path, path: &str) -> Self {
        self.binds_ro.push((host.to_path_buf(), path.into()));
        self
    }
}

/// A running node. Dropping it kills the container.
pub struct Node {
    name: String,
    root: tempfile::TempDir,
    boots: Arc<Mutex<Vec<Boot>>>,
    pid1: Arc<AtomicI32>,
    nspawn: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    supervisor: Option<JoinHandle<()>>,
}

impl Node {
    /// Copy the base rootfs, install the agent and boot the node.
    pub fn boot(spec: NodeSpec) -> Result<Node> {
        require_root();
        let base = base_rootfs()?;
        let agent = match &spec.agent_binary {
            Some(path) => path.clone(),
            None => bins::agent_binary()?,
        };
        let root = tempfile::Builder::new()
            .prefix(&format!("baton-node-{}.", spec.name))
            .tempdir_in(bins::target_dir().join("nspawn"))?;
        let rootfs = root.path().join("rootfs");
        let status = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&base)
            .arg(&rootfs)
            .status()?;
        if !status.success() {
            bail!("copying the rootfs failed");
        }
        prepare_rootfs(&rootfs, &spec)?;
        let mut args = vec![
            "-D".to_string(),
            rootfs.display().to_string(),
            "--boot".into(),
            format!("--machine={}", spec.name),
            "--register=no".into(),
            "--keep-unit".into(),
            "-q".into(),
            format!("--bind-ro={}:/usr/local/bin/baton-agent", agent.display()),
        ];
        if let Some(repo) = &spec.repo {
            args.push(format!("--bind-ro={}:/repo", repo.display()));
        }
        for (host, path) in &spec.binds_ro {
            args.push(format!("--bind-ro={}:{path}", host.display()));
        }
        let log = root.path().join("console.log");
        let node = Node {
            name: spec.name.clone(),
            boots: Arc::default(),
            pid1: Arc::new(AtomicI32::new(0)),
            nspawn: Arc::new(AtomicI32::new(0)),
            stop: Arc::default(),
            supervisor: None,
            root,
        };
        let supervisor = Supervisor {
            name: spec.name.clone(),
            args,
            log,
            boots: node.boots.clone(),
            pid1: node.pid1.clone(),
            nspawn: node.nspawn.clone(),
            stop: node.stop.clone(),
        };
        let mut node = node;
        node.supervisor = Some(std::thread::spawn(move || supervisor.run()));
        node.wait_booted(1)?;
        Ok(node)
    }

    /// Kills the container now and keeps it from booting again (the rest
    /// of the clean-up happens on drop). Lets a caller stop many nodes at
    /// once before dropping them one by one.
    pub fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        kill_container(&self.pid1, &self.nspawn);
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's init (systemd) in the host's PID namespace, while up.
    pub fn pid1(&self) -> Option<i32> {
        Some(self.pid1.load(Ordering::SeqCst)).filter(|p| *p > 0)
    }

    /// The systemd-nspawn process of the current boot (the leader of its
    /// own process group), while it runs.
    pub fn nspawn_pid(&self) -> Option<i32> {
        Some(self.nspawn.load(Ordering::SeqCst)).filter(|p| *p > 0)
    }

    /// The node's root directory, as seen from the host.
    pub fn rootfs(&self) -> PathBuf {
        self.root.path().join("rootfs")
    }

    /// Every boot so far, oldest first.
    pub fn boots(&self) -> Vec<Boot> {
        self.boots.lock().unwrap().clone()
    }

    /// Wait until the node has booted `n` times (and is up).
    pub fn wait_booted(&self, n: usize) -> Result<Vec<Boot>> {
        wait_for(
            &format!("{} to boot {n} time(s)", self.name),
            Duration::from_secs(180),
            || {
                let boots = self.boots();
                (boots.len() >= n && self.pid1.load(Ordering::SeqCst) > 0).then_some(boots)
            },
        )
        .with_context(|| self.diagnostics())
    }

    /// Run a command inside the node (all its namespaces).
    pub fn exec(&self, command: &[&str]) -> Result<std::process::Output> {
        let pid = self.pid1.load(Ordering::SeqCst);
        if pid <= 0 {
            bail!("{} is not running", self.name);
        }
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .args(command)
            .stdin(Stdio::null())
            .output()?;
        Ok(out)
    }

    /// The agent's log (its unit appends stdout and stderr to a file).
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.rootfs().join("var/log/baton-agent.log")).unwrap_or_default()
    }

    /// The agent's persisted state file, if any.
    pub fn agent_state(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.rootfs().join("var/lib/baton/state.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The main PID (host namespace) of the agent's process, if running.
    pub fn agent_pid(&self) -> Option<i32> {
        let needle = format!("BATON_NODE={}", self.name);
        let cmd = "/usr/local/bin/baton-agent";
        fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            if !cmdline.starts_with(cmd.as_bytes()) {
                return None;
            }
            let environ = fs::read(e.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|kv| kv == needle.as_bytes())
                .then_some(pid)
        })
    }

    /// Boots, console and agent log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let console = fs::read_to_string(self.root.path().join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "node {}: boots {:?}\n--- console (last lines, newest first) ---\n{}\n--- agent log ---\n{}",
            self.name,
            self.boots(),
            tail.join("\n"),
            self.agent_log()
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        kill_container(&self.pid1, &self.nspawn);
        if let Some(handle) = self.supervisor.take() {
            let _ = handle.join();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

fn kill_container(pid1: &AtomicI32, nspawn: &AtomicI32) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let p = pid1.load(Ordering::SeqCst);
    if p > 0 {
        // Killing the container's init tears down its whole PID namespace.
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let n = nspawn.load(Ordering::SeqCst);
    if n > 0 {
        let _ = killpg(Pid::from_raw(n), Signal::SIGKILL);
    }
}

fn prepare_rootfs(rootfs: &Path, spec: &NodeSpec) -> Result<()> {
    let write = |rel: &str, contents: &str| -> Result<()> {
        let path = rootfs.join(rel.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap())?;
        fs::write(&path, contents).with_context(|| path.display().to_string())
    };
    write("etc/hostname", &format!("{}\n", spec.name))?;
    // Only the local repository: no network access from inside the nodes.
    write(
        "etc/apt/sources.list",
        if spec.repo.is_some() {
            "deb [trusted=yes] file:/repo ./\n"
        } else {
            ""
        },
    )?;
    let env: String = spec
        .agent_env
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"\n", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    write("etc/baton/agent.env", &env)?;
    write(
        "etc/systemd/system/baton-agent.service",
        "[Unit]\n\
         Description=Baton agent\n\
         After=dbus.service systemd-logind.service\n\
         \n\
         [Service]\n\
         EnvironmentFile=/etc/baton/agent.env\n\
         ExecStart=/usr/local/bin/baton-agent run\n\
         Restart=always\n\
         RestartSec=1\n\
         StandardOutput=append:/var/log/baton-agent.log\n\
         StandardError=append:/var/log/baton-agent.log\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
    )?;
    let wants = rootfs.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    for unit in std::iter::once("baton-agent.service").chain(spec.units.iter().map(String::as_str))
    {
        std::os::unix::fs::symlink(format!("../{unit}"), wants.join(unit))?;
    }
    // apt's timers would run apt behind the tests' back.
    for unit in ["apt-daily.timer", "apt-daily-upgrade.timer"] {
        let path = rootfs.join("etc/systemd/system").join(unit);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink("/dev/null", path)?;
    }
    for (rel, contents) in &spec.files {
        write(rel, contents)?;
    }
    for deb in &spec.preinstall {
        let name = deb.file_name().context("deb name")?;
        fs::copy(deb, rootfs.join("tmp").join(name))?;
        let status = Command::new("chroot")
            .arg(rootfs)
            .args(["dpkg", "-i"])
            .arg(Path::new("/tmp").join(name))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("dpkg -i {} in the rootfs failed", deb.display());
        }
    }
    Ok(())
}

/// Boots a node again and again while it exits 133 (reboot).
struct Supervisor {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    boots: Arc<Mutex<Vec<Boot>>>,
    pid1: Arc<AtomicI32>,
    nspawn: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
}

impl Supervisor {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(error) = self.boot_once() {
                eprintln!("node {}: {error:#}", self.name);
                break;
            }
        }
    }

    /// One boot; Ok(()) when the machine rebooted, Err when it stopped.
    fn boot_once(&self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new("systemd-nspawn")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting systemd-nspawn (apt-get install systemd-container)")?;
        let nspawn_pid = child.id() as i32;
        self.nspawn.store(nspawn_pid, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            kill_container(&self.pid1, &self.nspawn);
        }
        // The container's init is nspawn's child; its boot_id is readable
        // once it has become systemd (all mounts done).
        let found = wait_for("container init", Duration::from_secs(60), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(None);
            }
            let pid = child_of(nspawn_pid)?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if comm.trim() != "systemd" {
                return None;
            }
            let boot_id =
                fs::read_to_string(format!("/proc/{pid}/root/proc/sys/kernel/random/boot_id"))
                    .ok()?;
            Some(Some((pid, boot_id.trim().to_string())))
        });
        let index = match found {
            Ok(Some((pid, boot_id))) => {
                self.pid1.store(pid, Ordering::SeqCst);
                let mut boots = self.boots.lock().unwrap();
                boots.push(Boot {
                    boot_id,
                    started: SystemTime::now(),
                    ended: None,
                    exit_code: None,
                });
                Some(boots.len() - 1)
            }
            _ => None,
        };
        let status = child.wait()?;
        let ended = SystemTime::now();
        self.pid1.store(0, Ordering::SeqCst);
        if let Some(i) = index {
            let mut boots = self.boots.lock().unwrap();
            boots[i].ended = Some(ended);
            boots[i].exit_code = status.code();
        }
        if status.code() == Some(133) && index.is_some() {
            Ok(())
        } else {
            bail!("systemd-nspawn exited: {status}")
        }
    }
}

/// The first child process of `parent`.
fn child_of(parent: i32) -> Option<i32> {
    let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}
