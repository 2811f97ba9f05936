//! One process per run folder: an exclusive lock on `<run>/.lock`, held for the life of the
//! process. The kernel releases it when the process dies, however it dies, so a killed run can
//! be resumed at once, while a second process on a live run fails at once instead of
//! interleaving its steps with the first one's.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::Path;

use super::ExperimentError;

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run folder; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist), or fails with the holder's PID.
    pub fn acquire(dir: &Path) -> Result<RunLock, ExperimentError> {
        let path = dir.join(LOCK_FILE);
        let io = |e| ExperimentError::io(&path, e);
        let mut file =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                return Err(ExperimentError::Locked { dir: dir.to_path_buf(), pid });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's PID, for the message a second process prints.
        file.set_len(0).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
