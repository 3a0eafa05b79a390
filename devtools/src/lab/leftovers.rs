//! What a lab that was killed outright (SIGKILL, a lost terminal) leaves
//! behind is cleaned up by the next run: while it runs, the lab keeps a list
//! of the processes it started (each with its start time, so a recycled PID
//! is never touched) and of its nodes' directories in
//! `<out>/processes.json`; the next run kills exactly those processes and
//! removes those directories before it starts. A run that ends normally
//! removes the list.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_tests::etcd::coordinator::Coordinator;
use baton_tests::nspawn::Node;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Serialize, Deserialize, Default)]
struct Started {
    /// (pid, start time in clock ticks, is a process group leader).
    processes: Vec<(i32, u64, bool)>,
    /// Node root directories.
    dirs: Vec<PathBuf>,
}

fn list(out: &Path) -> PathBuf {
    out.join("processes.json")
}

/// A process's start time (field 22 of /proc/PID/stat), to tell it from a
/// later process that got the same PID.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count fields after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills what a previous run left and removes its node directories.
pub fn clean(out: &Path) {
    let Ok(text) = std::fs::read_to_string(list(out)) else {
        return;
    };
    let Ok(started) = serde_json::from_str::<Started>(&text) else {
        let _ = std::fs::remove_file(list(out));
        return;
    };
    let mut killed = 0;
    for (pid, start, group) in &started.processes {
        if start_time(*pid) != Some(*start) {
            continue;
        }
        let target = Pid::from_raw(*pid);
        let _ = kill(target, Signal::SIGCONT);
        let _ = if *group {
            killpg(target, Signal::SIGKILL)
        } else {
            kill(target, Signal::SIGKILL)
        };
        killed += 1;
    }
    if killed > 0 {
        eprintln!("lab: stopped {killed} process(es) a previous run left behind");
        std::thread::sleep(Duration::from_millis(500));
    }
    for dir in &started.dirs {
        if dir.exists() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let _ = std::fs::remove_file(list(out));
}

fn snapshot(nodes: &[Node], coordinators: &Mutex<Vec<Coordinator>>) -> Started {
    let mut started = Started::default();
    let mut add = |pid: i32, group: bool| {
        if let Some(t) = start_time(pid) {
            started.processes.push((pid, t, group));
        }
    };
    for node in nodes {
        if let Some(pid) = node.nspawn_pid() {
            add(pid, true);
        }
        if let Some(pid) = node.pid1() {
            add(pid, false);
        }
        if let Some(root) = node.rootfs().parent() {
            started.dirs.push(root.to_path_buf());
        }
    }
    for c in coordinators
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        if c.running() {
            add(c.pid().as_raw(), false);
        }
    }
    started
}

/// Rewrites the list every second until `cancel`.
pub async fn track(
    out: PathBuf,
    nodes: Arc<Vec<Node>>,
    coordinators: Arc<Mutex<Vec<Coordinator>>>,
    cancel: CancellationToken,
) {
    loop {
        let started = snapshot(&nodes, &coordinators);
        if let Ok(text) = serde_json::to_string(&started) {
            let tmp = list(&out).with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, list(&out));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Forgets the list after a clean stop.
pub fn forget(out: &Path) {
    let _ = std::fs::remove_file(list(out));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_readable_and_stable() {
        let me = std::process::id() as i32;
        let a = start_time(me).expect("own stat");
        assert_eq!(start_time(me), Some(a));
    }
}
