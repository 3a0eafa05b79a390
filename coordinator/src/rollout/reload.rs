//! The policy in force, and reloading it: on SIGHUP and whenever the file
//! (or, for a mounted ConfigMap, its directory) changes. A reload that
//! fails any check is refused with the line and the reason, logged and
//! kept for `batonctl policy`; the running policy stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::sync::watch;
use tracing::{info, warn};

use super::load::{FlagDefaults, Loaded, PolicyError, load};
use crate::engine::Engine;

/// How often the file is checked even without an inotify event (inotify
/// can miss changes on some mounts).
pub const RECHECK_EVERY: Duration = Duration::from_secs(30);

/// The policy in force and where it is reloaded from. Cheap to share.
pub struct PolicyHandle {
    current: watch::Sender<Arc<Loaded>>,
    path: Option<PathBuf>,
    flags: FlagDefaults,
    last_error: Mutex<Option<(PolicyError, DateTime<Utc>)>>,
    /// Policies put in force since the start (1 = the first).
    generation: std::sync::atomic::AtomicU64,
    /// Told of every reload attempt (metrics, Events); must not block.
    listeners: Mutex<Vec<ReloadListener>>,
}

/// Told of every reload attempt, under no lock of the engine's.
pub type ReloadListener = Box<dyn Fn(&ReloadOutcome) + Send + Sync>;

/// What one reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// A new policy is in force.
    Changed {
        /// Its generation.
        generation: u64,
        /// Where it came from.
        source: String,
        /// Its file's SHA-256.
        sha256: String,
    },
    /// The file did not change.
    Unchanged,
    /// Refused; the running policy stays.
    Refused(PolicyError),
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The new policy is in force.
    Changed,
    /// The file's bytes did not change.
    Unchanged,
}

impl PolicyHandle {
    /// Loads the policy for the first time: an error here stops the start.
    pub fn load(
        path: Option<PathBuf>,
        flags: FlagDefaults,
        now: DateTime<Utc>,
    ) -> Result<Arc<Self>, PolicyError> {
        let loaded = load(path.as_deref(), &flags, now)?;
        Ok(Arc::new(Self {
            current: watch::channel(Arc::new(loaded)).0,
            path,
            flags,
            last_error: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(1),
            listeners: Mutex::new(Vec::new()),
        }))
    }

    /// How many policies were put in force since the start (1 = the one
    /// the coordinator started with).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Calls `listener` after every reload attempt.
    pub fn on_reload(&self, listener: ReloadListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
    }

    fn tell(&self, outcome: &ReloadOutcome) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            listener(outcome);
        }
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.borrow().clone()
    }

    /// Changes whenever a new policy is put in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Loaded>> {
        self.current.subscribe()
    }

    /// The last refused reload, if the last attempt failed.
    pub fn last_error(&self) -> Option<(PolicyError, DateTime<Utc>)> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again; puts it in force if it changed and passes
    /// every check. On an error the policy in force stays.
    pub fn reload(&self, now: DateTime<Utc>) -> Result<Reloaded, PolicyError> {
        let result = load(self.path.as_deref(), &self.flags, now);
        let (answer, outcome) = {
            let mut last_error = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Err(e) => {
                    warn!(error = %e, "policy reload refused; the running policy stays");
                    *last_error = Some((e.clone(), now));
                    (Err(e.clone()), ReloadOutcome::Refused(e))
                }
                Ok(loaded) if loaded.sha256 == self.current().sha256 => {
                    *last_error = None;
                    (Ok(Reloaded::Unchanged), ReloadOutcome::Unchanged)
                }
                Ok(loaded) => {
                    *last_error = None;
                    info!(source = %loaded.source, sha256 = %loaded.sha256, "policy reloaded");
                    let outcome = ReloadOutcome::Changed {
                        generation: self
                            .generation
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            + 1,
                        source: loaded.source.clone(),
                        sha256: loaded.sha256.clone(),
                    };
                    self.current.send_replace(Arc::new(loaded));
                    (Ok(Reloaded::Changed), outcome)
                }
            }
        };
        self.tell(&outcome);
        answer
    }

    /// Keeps `engine`'s grant rule on the policy in force and reloads on
    /// SIGHUP, on file changes and every [`RECHECK_EVERY`]. Runs until
    /// the engine shuts down.
    pub async fn run(self: Arc<Self>, engine: Arc<Engine>) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot install a SIGHUP handler; reloading on file changes only");
                None
            }
        };
        let mut changes = self.subscribe();
        let mut events = self.path.as_ref().and_then(|p| match watch_dir(p) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, path = %p.display(), "cannot watch the policy file; reloading on SIGHUP and every 30s");
                None
            }
        });
        let mut recheck = tokio::time::interval(RECHECK_EVERY);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        engine.set_policy(changes.borrow_and_update().engine_policy.clone());
        // The engine's changes include its shutdown: this task (which holds
        // the engine, and so its store) must end with it.
        let mut engine_changes = engine.subscribe();
        loop {
            let reload = tokio::select! {
                closed = engine_changes.changed() => {
                    if closed.is_err() || engine.is_shutting_down().await { return; }
                    false
                }
                changed = changes.changed() => {
                    if changed.is_err() { return; }
                    engine.set_policy(changes.borrow_and_update().engine_policy.clone());
                    false
                }
                _ = next_signal(&mut hup) => { info!("SIGHUP: reloading the policy"); true }
                event = next_event(&mut events) => {
                    if event.is_none() { events = None; }
                    // A ConfigMap update or an editor's save is a burst of
                    // events: let it settle, then read the file once.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drain(&mut events);
                    true
                }
                _ = recheck.tick() => {
                    if engine.is_shutting_down().await { return; }
                    true
                }
            };
            if reload && self.path.is_some() {
                let _ = self.reload(Utc::now());
            }
        }
    }
}

async fn next_signal(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

type EventStream = inotify::EventStream<[u8; 1024]>;

/// Drops the events already queued (one reload covers them).
fn drain(events: &mut Option<EventStream>) {
    use futures::FutureExt;
    if let Some(stream) = events {
        while let Some(Some(_)) = stream.next().now_or_never() {}
    }
}

async fn next_event(events: &mut Option<EventStream>) -> Option<()> {
    match events {
        Some(stream) => stream.next().await.and_then(|r| r.ok()).map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Watches the file's directory: editors replace files by renaming, and a
/// mounted ConfigMap swaps a symlink, neither of which a watch on the file
/// itself would follow.
fn watch_dir(path: &std::path::Path) -> std::io::Result<EventStream> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::CLOSE_WRITE
            | WatchMask::MODIFY,
    )?;
    inotify.into_event_stream([0u8; 1024])
}
