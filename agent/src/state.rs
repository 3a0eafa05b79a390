//! The agent's persisted state: `STATE_DIR/state.json`.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory), so a
//! crash or a reboot leaves either the old or the new state, never a torn
//! one. A file that cannot be parsed is moved aside (`state.json.corrupt-N`)
//! and never deleted, so an operator can look at it.

use crate::phase::Phase;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
        }
    }
}

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
    Valid(AgentState),
    /// The file could not be parsed; it was moved to `moved_to`.
    Corrupt {
        /// Where the unreadable file now lives.
        moved_to: PathBuf,
        /// Why it could not be parsed.
        error: String,
    },
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
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
        StateFile { dir: dir.into() }
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
            Ok(state) => Ok(Loaded::Valid(state)),
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
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let json = serde_json::to_vec_pretty(state)?;
        let tmp = self.dir.join("state.json.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&json).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)
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
            Loaded::Valid(s) => assert_eq!(s, state),
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
}
