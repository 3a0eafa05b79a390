//! Deciding that maintenance is needed: reboot sentinel files, the sentinel
//! command and the update check.
//!
//! [`Sentinels`] answers the question on demand. [`watch`] wakes the agent
//! when it should ask again: inotify on the sentinels' parent directories
//! (so a file that appears, disappears or is renamed into place is seen at
//! once), filtered to the sentinels' own names (`/run` sees many files
//! come and go; those are no reason to look again), plus a slow periodic
//! tick for the commands and for directories that do not exist yet.
//! Nothing polls in a tight loop.

use inotify::{Inotify, WatchMask};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// How the agent learns that maintenance is needed.
#[derive(Debug, Clone, Default)]
pub struct Sentinels {
    /// Files whose existence means "reboot required".
    pub files: Vec<PathBuf>,
    /// A command whose exit status 0 means "reboot required".
    pub command: Option<String>,
    /// A command whose exit status 0 means "updates are available".
    pub update_check: Option<String>,
    /// How long a command may run before it counts as "no".
    pub command_timeout: Duration,
}

impl Sentinels {
    /// The first sentinel file that exists.
    pub fn existing_file(&self) -> Option<&Path> {
        self.files.iter().map(PathBuf::as_path).find(|p| p.exists())
    }

    /// True when a sentinel file exists or the sentinel command exits 0.
    pub async fn reboot_required(&self) -> bool {
        if self.existing_file().is_some() {
            return true;
        }
        match &self.command {
            Some(cmd) => run_check(cmd, self.command_timeout).await,
            None => false,
        }
    }

    /// Why maintenance is needed now, or None.
    pub async fn maintenance_needed(&self) -> Option<String> {
        if let Some(file) = self.existing_file() {
            return Some(format!("{} exists", file.display()));
        }
        if let Some(cmd) = &self.command
            && run_check(cmd, self.command_timeout).await
        {
            return Some("reboot sentinel command says reboot".to_string());
        }
        if let Some(cmd) = &self.update_check
            && run_check(cmd, self.command_timeout).await
        {
            return Some("updates available".to_string());
        }
        None
    }
}

/// Run `command` with `/bin/sh -c`; true when it exits 0 within `timeout`.
/// A command that cannot start or times out counts as false (and is logged):
/// not knowing is never a reason to take a node down.
async fn run_check(command: &str, timeout: Duration) -> bool {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(timeout, child).await {
        Ok(Ok(status)) => status.success(),
        Ok(Err(error)) => {
            tracing::warn!(command, %error, "check command could not run");
            false
        }
        Err(_) => {
            tracing::warn!(command, ?timeout, "check command timed out");
            false
        }
    }
}

/// Watch the sentinels' parent directories and tick every `period`; every
/// change or tick bumps the returned counter, which the agent treats as "ask
/// again". The task ends when the receiver is dropped.
pub fn watch(files: &[PathBuf], period: Duration) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // (Re)create the inotify instance: a watched directory may have
            // been missing before, or been removed and created again.
            let mut events = match watch_dirs(&dirs) {
                Ok(events) => Some(events),
                Err(error) => {
                    tracing::warn!(%error, "inotify unavailable; relying on the periodic check");
                    None
                }
            };
            loop {
                let woke_by_inotify = tokio::select! {
                    _ = tx.closed() => return,
                    _ = interval.tick() => false,
                    event = next_event(&mut events, &names) => match event {
                        Some(Ok(Seen::Sentinel)) => true,
                        // Another file in the directory: not a wake.
                        Some(Ok(Seen::Other)) => continue,
                        _ => { events = None; false }
                    },
                };
                tx.send_modify(|n| *n += 1);
                if !woke_by_inotify && events.is_none() {
                    break;
                }
            }
        }
    });
    rx
}

type EventStream = inotify::EventStream<[u8; 1024]>;

/// What an inotify event was about.
enum Seen {
    /// A sentinel file, or the directory itself (removed, or the queue
    /// overflowed): look again.
    Sentinel,
    /// Another file in a watched directory.
    Other,
}

async fn next_event(
    events: &mut Option<EventStream>,
    names: &[std::ffi::OsString],
) -> Option<Result<Seen, std::io::Error>> {
    match events {
        Some(stream) => stream.next().await.map(|r| {
            r.map(|event| match &event.name {
                Some(name) if !names.iter().any(|n| n == name) => Seen::Other,
                _ => Seen::Sentinel,
            })
        }),
        None => std::future::pending().await,
    }
}

fn watch_dirs(dirs: &[PathBuf]) -> std::io::Result<EventStream> {
    let inotify = Inotify::init()?;
    let mut watched = 0;
    for dir in dirs {
        // Two defaults (/var/run and /run) are usually the same directory;
        // inotify then returns the same watch, which is fine.
        match inotify.watches().add(
            dir,
            WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::CLOSE_WRITE
                | WatchMask::DELETE_SELF,
        ) {
            Ok(_) => watched += 1,
            Err(error) => {
                tracing::debug!(dir = %dir.display(), %error, "cannot watch sentinel directory yet")
            }
        }
    }
    if watched == 0 {
        return Err(std::io::Error::other(
            "no sentinel directory can be watched",
        ));
    }
    inotify.into_event_stream([0u8; 1024])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_and_commands_decide() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reboot-required");
        let mut s = Sentinels {
            files: vec![dir.path().join("absent"), file.clone()],
            command_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        assert!(!s.reboot_required().await);
        assert_eq!(s.maintenance_needed().await, None);
        s.update_check = Some("exit 0".into());
        assert_eq!(
            s.maintenance_needed().await.as_deref(),
            Some("updates available")
        );
        assert!(!s.reboot_required().await);
        std::fs::write(&file, b"").unwrap();
        assert!(s.reboot_required().await);
        assert!(s.maintenance_needed().await.unwrap().contains("exists"));
        std::fs::remove_file(&file).unwrap();
        s.command = Some("exit 1".into());
        assert!(!s.reboot_required().await);
        s.command = Some("true".into());
        assert!(s.reboot_required().await);
    }

    #[tokio::test]
    async fn a_hung_command_counts_as_no() {
        assert!(!run_check("sleep 30", Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn inotify_wakes_on_create_without_waiting_for_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reboot-required");
        let mut wakes = watch(std::slice::from_ref(&file), Duration::from_secs(3600));
        // The first tick of an interval fires at once.
        wakes.changed().await.unwrap();
        wakes.borrow_and_update();
        std::fs::write(&file, b"").unwrap();
        tokio::time::timeout(Duration::from_secs(30), wakes.changed())
            .await
            .expect("inotify did not wake the agent")
            .unwrap();
    }

    /// Finding 4: other files coming and going in the directory are no
    /// wake; only the sentinel's name is.
    #[tokio::test]
    async fn inotify_wakes_only_for_the_sentinels_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reboot-required");
        let mut wakes = watch(std::slice::from_ref(&file), Duration::from_secs(3600));
        wakes.changed().await.unwrap();
        let start = *wakes.borrow_and_update();
        // Other files first, then the sentinel: the events arrive in this
        // order, so if the others woke the agent the counter would be
        // ahead by more than one once the sentinel's wake arrived.
        for n in 0..5 {
            std::fs::write(dir.path().join(format!("other-{n}")), b"x").unwrap();
            std::fs::remove_file(dir.path().join(format!("other-{n}"))).unwrap();
        }
        std::fs::write(&file, b"").unwrap();
        tokio::time::timeout(Duration::from_secs(30), wakes.changed())
            .await
            .expect("inotify did not wake the agent")
            .unwrap();
        // Let every queued event be handled (CREATE and CLOSE_WRITE of the
        // sentinel are two wakes).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let woke = *wakes.borrow_and_update() - start;
        assert!((1..=2).contains(&woke), "{woke} wakes");
    }
}
