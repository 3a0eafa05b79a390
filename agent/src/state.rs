//! The agent's persisted state: `STATE_DIR/state.json`.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory), so a
//! crash or a reboot leaves either the old or the new state, never a torn
//! one. A file that cannot be parsed is moved aside (`state.json.corrupt-N`)
//! and never deleted, so an operator can look at it.
//!
//! The directory is private to root (0700) and the files in it are 0600:
//! update logs may carry anything a package script printed. Update logs are
//! pruned to the newest [`KEEP_LOGS`].
//!
//! [`StateFile::with_faults`] is the seam of the crash-point tests: a hook
//! called before and after every write, which can fail the write or stop
//! the agent right there.

use crate::phase::Phase;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How many update and post-check logs are kept in the state directory.
pub const KEEP_LOGS: usize = 10;

/// What the agent must remember across restarts and reboots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The phase in progress.
    pub phase: Phase,
    /// The fencing token of the baton held (None when not holding).
    pub fencing_token: Option<u64>,
    /// The boot_id when the reboot was requested (set in `Rebooting`).
    pub boot_id_before_reboot: Option<String>,
    /// Why maintenance was needed.
    pub reason: String,
    /// The error that made the maintenance fail (set in `Failed`).
    pub error: Option<String>,
    /// The last lines of the update's output, kept for the reports.
    #[serde(default)]
    pub update_output: String,
    /// The fencing token of the grant for which the update was started
    /// (persisted right before it starts), so that a restarted agent
    /// follows that run instead of starting the update a second time.
    #[serde(default)]
    pub update_started: Option<u64>,
    /// How many times a reboot was requested in the current boot
    /// (`Rebooting`): bounded, so a machine that never goes down ends in
    /// Failed instead of a loop.
    #[serde(default)]
    pub reboot_requests: u32,
    /// Set after a maintenance ended: how long to hold back before asking
    /// again, and how many maintenances in a row the need survived.
    #[serde(default)]
    pub hold_back: Option<HoldBack>,
    /// The lease terms of the grant held (None when not holding, or from
    /// an older agent).
    #[serde(default)]
    pub lease: Option<LeaseTerms>,
    /// The fencing token of the grant that asked for a control-plane
    /// backup before the drain (saved with the grant), so that a restarted
    /// agent in Preparing makes and sends it again (the upload is
    /// idempotent) instead of draining without it.
    #[serde(default)]
    pub backup_required: Option<u64>,
    /// The fencing token of the grant whose `backup_required` this agent
    /// learned from the coordinator. A state saved by an older agent lacks
    /// it: the agent asks again before the drain instead of taking the
    /// missing field for "no backup needed".
    #[serde(default)]
    pub backup_learned: Option<u64>,
}

/// The lease terms a grant came with, kept so that a restarted agent
/// renews as often as the coordinator asked and knows how long the
/// coordinator lets a renewal count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// How often to renew, in milliseconds.
    pub renew_interval_ms: u64,
    /// How long a renewal counts before the holder is overdue, in
    /// milliseconds (None: the coordinator did not say).
    pub overdue_after_ms: Option<u64>,
}

/// A persisted hold-back: no new request for the baton before `until`
/// (milliseconds since the Unix epoch). Kept across restarts, so neither a
/// crash loop nor a force-release brings a failing or unsatisfiable need
/// straight back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldBack {
    /// The need the last maintenance was for.
    pub reason: String,
    /// Maintenances in a row after which the need was still there (or that
    /// did not finish): the hold-back doubles with each.
    pub streak: u32,
    /// Not before this time (ms since the epoch).
    pub until_ms: u64,
    /// Why the agent holds back, for logs and the node.
    pub why: String,
}

impl AgentState {
    /// The state of an agent that holds nothing.
    pub fn idle() -> Self {
        AgentState {
            phase: Phase::Idle,
            fencing_token: None,
            boot_id_before_reboot: None,
            reason: String::new(),
            error: None,
            update_output: String::new(),
            update_started: None,
            reboot_requests: 0,
            hold_back: None,
            lease: None,
            backup_required: None,
            backup_learned: None,
        }
    }
}

/// When the crash-point hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStage {
    /// Before anything is written.
    Before,
    /// After the new state is durable.
    After,
}

/// A hook around every save (crash-point tests): an error fails the save
/// with that error, at that stage.
pub type SaveHook = Arc<dyn Fn(SaveStage, &AgentState) -> io::Result<()> + Send + Sync>;

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or renaming the file failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Serializing the state failed (should not happen).
    #[error("serializing state: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// What loading the state file found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file: the agent never held the baton here (or released it).
    Missing,
    /// A valid state.
    Valid(Box<AgentState>),
    /// The file could not be parsed; it was moved to `moved_to`.
    Corrupt {
        /// Where the unreadable file now lives.
        moved_to: PathBuf,
        /// Why it could not be parsed.
        error: String,
    },
}

/// The state file in a state directory.
#[derive(Clone)]
pub struct StateFile {
    dir: PathBuf,
    hook: Option<SaveHook>,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile").field("dir", &self.dir).finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateFile {
    /// The state file in `dir` (created if missing on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateFile {
            dir: dir.into(),
            hook: None,
        }
    }

    /// The same file with `hook` run before and after every save (the
    /// crash-point tests stop or fail the agent there).
    pub fn with_faults(mut self, hook: SaveHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Create the directory if needed and make it private (0700).
    pub fn ensure_dir(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&self.dir))
    }

    /// Create (or truncate nothing of) a log file in the state directory,
    /// readable by root only, after pruning old logs so that at most
    /// [`KEEP_LOGS`] remain with the new one. Returns its path.
    pub fn private_log(&self, name: &str) -> Result<PathBuf, StateError> {
        self.ensure_dir()?;
        let path = self.dir.join(name);
        self.prune_logs(&path)?;
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Delete the oldest `*.log` files (by modification time) so that at
    /// most `KEEP_LOGS - 1` remain besides `keep`.
    fn prune_logs(&self, keep: &Path) -> Result<(), StateError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log") && p != keep)
            .map(|p| {
                let modified = fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (modified, p)
            })
            .collect();
        logs.sort();
        let excess = logs.len().saturating_sub(KEEP_LOGS - 1);
        for (_, old) in logs.into_iter().take(excess) {
            tracing::info!(log = %old.display(), "pruning an old update log");
            fs::remove_file(&old).map_err(io_err(&old))?;
        }
        Ok(())
    }

    /// The path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read the state. A corrupt file is moved aside and reported.
    pub fn load(&self) -> Result<Loaded, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(e) => return Err(io_err(&path)(e)),
        };
        match serde_json::from_slice::<AgentState>(&bytes) {
            Ok(state) => Ok(Loaded::Valid(Box::new(state))),
            Err(parse) => {
                let moved_to = (0u32..)
                    .map(|n| self.dir.join(format!("state.json.corrupt-{n}")))
                    .find(|p| !p.exists())
                    .unwrap_or_else(|| self.dir.join("state.json.corrupt"));
                fs::rename(&path, &moved_to).map_err(io_err(&path))?;
                sync_dir(&self.dir)?;
                Ok(Loaded::Corrupt {
                    moved_to,
                    error: parse.to_string(),
                })
            }
        }
    }

    /// Persist `state` atomically: temp file, fsync, rename, fsync the
    /// directory. When this returns Ok the state survives a power cut.
    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let path = self.path();
        if let Some(hook) = &self.hook {
            hook(SaveStage::Before, state).map_err(io_err(&path))?;
        }
        self.ensure_dir()?;
        let json = serde_json::to_vec_pretty(state)?;
        let tmp = self.dir.join("state.json.tmp");
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&json).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        if let Some(hook) = &self.hook {
            hook(SaveStage::After, state).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("baton"));
        assert!(matches!(file.load().unwrap(), Loaded::Missing));
        let state = AgentState {
            phase: Phase::Rebooting,
            fencing_token: Some(7),
            boot_id_before_reboot: Some("abc".into()),
            ..AgentState::idle()
        };
        file.save(&state).unwrap();
        match file.load().unwrap() {
            Loaded::Valid(s) => assert_eq!(*s, state),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!dir.path().join("baton/state.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        fs::write(file.path(), b"{\"phase\": \"rebo").unwrap();
        let moved = match file.load().unwrap() {
            Loaded::Corrupt { moved_to, .. } => moved_to,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(fs::read(&moved).unwrap(), b"{\"phase\": \"rebo");
        assert!(matches!(file.load().unwrap(), Loaded::Missing));
        // A second corrupt file does not overwrite the first one.
        fs::write(file.path(), b"garbage").unwrap();
        match file.load().unwrap() {
            Loaded::Corrupt { moved_to, .. } => assert_ne!(moved_to, moved),
            other => panic!("unexpected {other:?}"),
        }
        assert!(moved.exists());
    }

    #[test]
    fn an_old_state_file_without_the_new_fields_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        fs::write(
            file.path(),
            br#"{"phase":"rebooting","fencing_token":3,"boot_id_before_reboot":null,"reason":"r","error":null}"#,
        )
        .unwrap();
        match file.load().unwrap() {
            Loaded::Valid(s) => {
                assert_eq!(s.phase, Phase::Rebooting);
                assert_eq!(s.boot_id_before_reboot, None);
                assert_eq!(s.reboot_requests, 0);
                assert_eq!(s.hold_back, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_directory_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("baton");
        fs::create_dir(&state_dir).unwrap();
        fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let file = StateFile::new(&state_dir);
        file.save(&AgentState::idle()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(mode(&file.path()), 0o600);
        let log = file.private_log("update-1.log").unwrap();
        assert_eq!(mode(&log), 0o600);
    }

    #[test]
    fn logs_are_pruned_to_a_bounded_count() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        for token in 0..(KEEP_LOGS as u64 + 5) {
            let log = file.private_log(&format!("update-{token}.log")).unwrap();
            fs::write(&log, format!("run {token}")).unwrap();
            // Distinct modification times, oldest first.
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + token);
            File::options()
                .write(true)
                .open(&log)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        file.save(&AgentState::idle()).unwrap();
        let mut logs: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".log"))
            .collect();
        logs.sort();
        assert_eq!(logs.len(), KEEP_LOGS, "{logs:?}");
        // The newest are kept, the state file is never touched.
        assert!(logs.contains(&format!("update-{}.log", KEEP_LOGS as u64 + 4)));
        assert!(!logs.contains(&"update-0.log".to_string()));
        assert!(file.path().exists());
    }
}
