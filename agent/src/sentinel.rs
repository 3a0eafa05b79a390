//! Deciding that maintenance is needed: reboot sentinel files, the sentinel
//! command and the update check.
//!
//! [`Sentinels`] answers the question on demand, in three ways: yes, no, or
//! "cannot tell" ([`SentinelError`]). "No" needs every source to say no: a
//! sentinel path that is missing (and not a dangling symlink), a command
//! that exits non-zero. Anything else that is not a plain yes (a directory
//! or a FIFO where the file should be, a permission or I/O error, a look
//! at the file or a command that does not finish within the check
//! timeout, a command the shell cannot run or that dies of a signal) is an
//! error, never read as "no": after an update, "no" would release the
//! baton without the reboot the update asked for. Each caller decides what
//! the safe side is (see the agent's steps). A plain yes from any source
//! wins over another source's error.
//!
//! Looking at the files runs on a thread of its own under the check
//! timeout (a `stat` on a hung mount never returns), with at most
//! [`MAX_LOOKS_IN_FLIGHT`] such threads at a time.
//!
//! [`watch`] wakes the agent
//! when it should ask again: inotify on the sentinels' parent directories
//! (so a file that appears, disappears or is renamed into place is seen at
//! once), filtered to the sentinels' own names (`/run` sees many files
//! come and go; those are no reason to look again), plus a slow periodic
//! tick for the commands and for directories that do not exist yet.
//! Nothing polls in a tight loop.

use inotify::{Inotify, WatchMask};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// The most threads looking at sentinel files at once: a look that hangs
/// (a dead network mount) keeps its thread; further checks fail at once
/// instead of piling threads up.
pub const MAX_LOOKS_IN_FLIGHT: usize = 4;

/// Why a sentinel check has no answer. Never means "no".
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    /// The sentinel path cannot be looked at (permission, I/O error, a
    /// file where a directory should be, a symlink loop).
    #[error("cannot look at reboot sentinel {}: {source}", path.display())]
    Unreadable {
        /// The sentinel path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Something other than a file is at the sentinel path.
    #[error("reboot sentinel {} is {what}, not a file", path.display())]
    NotAFile {
        /// The sentinel path.
        path: PathBuf,
        /// What is there ("a directory", "a FIFO", "a dangling symlink").
        what: &'static str,
    },
    /// The check did not finish within the check timeout.
    #[error("{what} did not finish within {}", humantime::format_duration(*timeout))]
    TimedOut {
        /// The file look or the command.
        what: String,
        /// The check timeout.
        timeout: Duration,
    },
    /// A check command gave no answer (it could not run, the shell could
    /// not find or execute it, or it died of a signal).
    #[error("check command `{command}`: {why}")]
    Command {
        /// The command.
        command: String,
        /// What went wrong.
        why: String,
    },
}

/// What is at a sentinel path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing (and no symlink either).
    Missing,
    /// A regular file (directly or through a symlink).
    File,
    /// Something else: a directory, a FIFO, a socket, a device, a dangling
    /// symlink.
    Other(&'static str),
}

/// How sentinel paths are looked at: [`look`] on the real filesystem;
/// tests pass a fake one. Runs on a thread of its own and may block.
#[derive(Clone)]
pub struct Probe(pub Arc<LookFn>);

/// A function that says what is at a path.
pub type LookFn = dyn Fn(&Path) -> io::Result<Entry> + Send + Sync;

impl Default for Probe {
    fn default() -> Self {
        Probe(Arc::new(look))
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

/// What is at `path` on the real filesystem, without opening it (a FIFO
/// is never read). A path whose last component is a symlink to nothing is
/// [`Entry::Other`], not missing: something put it there.
pub fn look(path: &Path) -> io::Result<Entry> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(kind(meta.file_type())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            match std::fs::symlink_metadata(path) {
                Ok(link) if link.file_type().is_symlink() => Ok(Entry::Other("a dangling symlink")),
                // Created between the two looks.
                Ok(meta) => Ok(kind(meta.file_type())),
                Err(again) if again.kind() == io::ErrorKind::NotFound => Ok(Entry::Missing),
                Err(again) => Err(again),
            }
        }
        Err(error) => Err(error),
    }
}

fn kind(t: std::fs::FileType) -> Entry {
    if t.is_file() {
        Entry::File
    } else if t.is_dir() {
        Entry::Other("a directory")
    } else if t.is_fifo() {
        Entry::Other("a FIFO")
    } else if t.is_socket() {
        Entry::Other("a socket")
    } else if t.is_block_device() || t.is_char_device() {
        Entry::Other("a device")
    } else {
        Entry::Other("not a regular file")
    }
}

/// How the agent learns that maintenance is needed.
#[derive(Debug, Clone, Default)]
pub struct Sentinels {
    /// Files whose existence means "reboot required".
    pub files: Vec<PathBuf>,
    /// A command whose exit status 0 means "reboot required" (another
    /// non-zero status means no; 126 and 127, the shell's "cannot run
    /// it", and a death by signal are errors).
    pub command: Option<String>,
    /// A command whose exit status 0 means "updates are available" (the
    /// same rules).
    pub update_check: Option<String>,
    /// How long a command, or looking at the files, may take before the
    /// check is an error.
    pub command_timeout: Duration,
    /// How the files are looked at.
    pub probe: Probe,
    /// Threads looking at the files now.
    pub looks_in_flight: Arc<AtomicUsize>,
}

impl Sentinels {
    /// The first sentinel file that exists; an error when none exists but
    /// one could not be looked at or is not a file.
    pub async fn existing_file(&self) -> Result<Option<&Path>, SentinelError> {
        let found = self.look_all().await?;
        let mut error = None;
        for (path, entry) in self.files.iter().zip(found) {
            match entry {
                Ok(Entry::File) => return Ok(Some(path)),
                Ok(Entry::Missing) => {}
                Ok(Entry::Other(what)) => {
                    error.get_or_insert(SentinelError::NotAFile {
                        path: path.clone(),
                        what,
                    });
                }
                Err(source) => {
                    error.get_or_insert(SentinelError::Unreadable {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        error.map_or(Ok(None), Err)
    }

    /// Look at every file on a thread of its own, within the timeout.
    async fn look_all(&self) -> Result<Vec<io::Result<Entry>>, SentinelError> {
        if self.files.is_empty() {
            return Ok(Vec::new());
        }
        let timed_out = || SentinelError::TimedOut {
            what: "looking at the reboot sentinels".to_string(),
            timeout: self.command_timeout,
        };
        let in_flight = self.looks_in_flight.clone();
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_LOOKS_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            // Earlier looks still hang: this one would too.
            return Err(timed_out());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let files = self.files.clone();
        let probe = self.probe.clone();
        let thread_count = in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("sentinel-look".into())
            .spawn(move || {
                let found: Vec<_> = files.iter().map(|f| (probe.0)(f)).collect();
                thread_count.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(found);
            });
        if let Err(source) = spawned {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SentinelError::Unreadable {
                path: self.files[0].clone(),
                source,
            });
        }
        match tokio::time::timeout(self.command_timeout, rx).await {
            Ok(Ok(found)) => Ok(found),
            // The thread panicked (a probe bug): no answer.
            Ok(Err(_)) => Err(SentinelError::Unreadable {
                path: self.files[0].clone(),
                source: io::Error::other("the look ended without an answer"),
            }),
            Err(_) => Err(timed_out()),
        }
    }

    /// Whether a sentinel file exists or the sentinel command exits 0. A
    /// yes from either wins; otherwise an error of either is the answer.
    pub async fn reboot_required(&self) -> Result<bool, SentinelError> {
        Ok(self.reboot_reason().await?.is_some())
    }

    /// Why a reboot is required, or None; errors as [`Self::reboot_required`].
    async fn reboot_reason(&self) -> Result<Option<String>, SentinelError> {
        let file = match self.existing_file().await {
            Ok(Some(file)) => return Ok(Some(format!("{} exists", file.display()))),
            Ok(None) => Ok(()),
            Err(error) => Err(error),
        };
        if let Some(cmd) = &self.command
            && run_check(cmd, self.command_timeout).await?
        {
            return Ok(Some("reboot sentinel command says reboot".to_string()));
        }
        file.map(|()| None)
    }

    /// Why maintenance is needed now, or None. A yes from any source wins;
    /// "no" needs every source to say no; otherwise the first error.
    pub async fn maintenance_needed(&self) -> Result<Option<String>, SentinelError> {
        let reboot = match self.reboot_reason().await {
            Ok(Some(why)) => return Ok(Some(why)),
            Ok(None) => Ok(()),
            Err(error) => Err(error),
        };
        if let Some(cmd) = &self.update_check
            && run_check(cmd, self.command_timeout).await?
        {
            return Ok(Some("updates available".to_string()));
        }
        reboot.map(|()| None)
    }
}

/// Run `command` with `/bin/sh -c`: true when it exits 0 within `timeout`,
/// false for another exit status; an error when it cannot start, times
/// out, dies of a signal, or the shell cannot find or run it (126, 127).
/// Not knowing is never read as "no".
async fn run_check(command: &str, timeout: Duration) -> Result<bool, SentinelError> {
    let failed = |why: String| SentinelError::Command {
        command: command.to_string(),
        why,
    };
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(timeout, child).await {
        Ok(Ok(status)) => match status.code() {
            Some(0) => Ok(true),
            Some(code @ (126 | 127)) => Err(failed(format!(
                "the shell could not run it (exit status {code})"
            ))),
            Some(_) => Ok(false),
            None => Err(failed(format!("ended without an exit status ({status})"))),
        },
        Ok(Err(error)) => Err(failed(format!("cannot start /bin/sh: {error}"))),
        Err(_) => Err(SentinelError::TimedOut {
            what: format!("check command `{command}`"),
            timeout,
        }),
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

    fn sentinels(files: Vec<PathBuf>) -> Sentinels {
        Sentinels {
            files,
            command_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn files_and_commands_decide() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reboot-required");
        let mut s = sentinels(vec![dir.path().join("absent"), file.clone()]);
        assert!(!s.reboot_required().await.unwrap());
        assert_eq!(s.maintenance_needed().await.unwrap(), None);
        s.update_check = Some("exit 0".into());
        assert_eq!(
            s.maintenance_needed().await.unwrap().as_deref(),
            Some("updates available")
        );
        assert!(!s.reboot_required().await.unwrap());
        std::fs::write(&file, b"").unwrap();
        assert!(s.reboot_required().await.unwrap());
        assert!(
            s.maintenance_needed()
                .await
                .unwrap()
                .unwrap()
                .contains("exists")
        );
        std::fs::remove_file(&file).unwrap();
        s.command = Some("exit 1".into());
        assert!(!s.reboot_required().await.unwrap());
        s.command = Some("true".into());
        assert!(s.reboot_required().await.unwrap());
    }

    /// Red-team finding 1: a command that hangs, cannot be run or dies of
    /// a signal is no answer, never "no".
    #[tokio::test]
    async fn a_command_without_an_answer_is_an_error_not_a_no() {
        let t = Duration::from_millis(200);
        for command in ["sleep 30", "/nonexistent/check", "kill -9 $$", "exit 126"] {
            let error = run_check(command, t).await.unwrap_err().to_string();
            assert!(error.contains("check command"), "{command}: {error}");
        }
        assert!(!run_check("exit 1", t).await.unwrap());
        let s = Sentinels {
            command: Some("sleep 30".into()),
            update_check: Some("exit 1".into()),
            command_timeout: t,
            ..Default::default()
        };
        assert!(s.reboot_required().await.is_err());
        assert!(s.maintenance_needed().await.is_err());
        // A plain yes from another source still wins.
        let s = Sentinels {
            update_check: Some("true".into()),
            ..s
        };
        assert_eq!(
            s.maintenance_needed().await.unwrap().as_deref(),
            Some("updates available")
        );
    }

    /// Red-team finding 1: whatever is at the sentinel path that is not a
    /// file or nothing (a directory, a dangling symlink, a FIFO, a symlink
    /// loop, a file where a directory should be) is an error, on the real
    /// filesystem; the FIFO is never opened.
    #[tokio::test]
    async fn odd_things_at_the_sentinel_path_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        std::fs::create_dir(p("a-dir")).unwrap();
        std::os::unix::fs::symlink(p("nowhere"), p("dangling")).unwrap();
        nix::unistd::mkfifo(&p("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink(p("loop-b"), p("loop-a")).unwrap();
        std::os::unix::fs::symlink(p("loop-a"), p("loop-b")).unwrap();
        std::fs::write(p("plain"), b"").unwrap();
        let cases = [
            ("a-dir".to_string(), "is a directory"),
            ("dangling".to_string(), "is a dangling symlink"),
            ("fifo".to_string(), "is a FIFO"),
            ("loop-a".to_string(), "cannot look at"),
            ("plain/reboot-required".to_string(), "cannot look at"),
        ];
        for (name, expect) in cases {
            let s = sentinels(vec![p("absent"), p(&name)]);
            let error = tokio::time::timeout(Duration::from_secs(30), s.reboot_required())
                .await
                .expect("the check must not block")
                .unwrap_err()
                .to_string();
            assert!(error.contains(expect), "{name}: {error}");
            assert!(s.maintenance_needed().await.is_err(), "{name}");
        }
        // A symlink to a file is the file; an existing sentinel wins over
        // an odd one.
        std::os::unix::fs::symlink(p("plain"), p("link")).unwrap();
        let s = sentinels(vec![p("a-dir"), p("link")]);
        assert!(s.reboot_required().await.unwrap());
    }

    /// Red-team finding 1: errors the real filesystem gives only to
    /// unprivileged users (the tests run as root), through a fake probe.
    #[tokio::test]
    async fn a_permission_error_is_an_error() {
        let s = Sentinels {
            probe: Probe(Arc::new(|_: &Path| {
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            })),
            ..sentinels(vec![PathBuf::from("/run/reboot-required")])
        };
        let error = s.reboot_required().await.unwrap_err().to_string();
        assert!(error.contains("/run/reboot-required"), "{error}");
        assert!(error.contains("permission denied"), "{error}");
    }

    /// Red-team finding 1: a look that blocks (here: a probe that reads a
    /// FIFO nobody writes, as a naive check or a hung mount would) ends in
    /// an error at the timeout, and hung looks are bounded.
    #[tokio::test]
    async fn a_look_that_blocks_times_out_and_hung_looks_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("reboot-required");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let s = Sentinels {
            probe: Probe(Arc::new(|path: &Path| {
                std::fs::read(path).map(|_| Entry::File)
            })),
            command_timeout: Duration::from_millis(100),
            ..sentinels(vec![fifo.clone()])
        };
        for _ in 0..MAX_LOOKS_IN_FLIGHT + 2 {
            let error = tokio::time::timeout(Duration::from_secs(30), s.reboot_required())
                .await
                .expect("the check must not block")
                .unwrap_err();
            assert!(matches!(error, SentinelError::TimedOut { .. }), "{error}");
        }
        assert_eq!(
            s.looks_in_flight.load(Ordering::SeqCst),
            MAX_LOOKS_IN_FLIGHT
        );
        // Let the blocked readers go (each open for writing releases one).
        while s.looks_in_flight.load(Ordering::SeqCst) > 0 {
            use std::os::unix::fs::OpenOptionsExt;
            // Non-blocking: with no reader left, the open fails instead
            // of waiting for one.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo);
            std::thread::sleep(Duration::from_millis(10));
        }
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
