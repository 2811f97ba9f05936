//! `steps.jsonl`: one JSON line per environment step, appended and flushed as the run goes, so a
//! killed run keeps every step it finished and `--resume` can continue from it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExperimentError;

/// One environment step as written to `steps.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The spec's name (unique within a run).
    pub spec: String,
    /// The data split seed.
    pub seed: u64,
    /// Which of the seed's side-by-side environments took the step (GRPO's groups; see
    /// `Agent::group_size`); 0, and left out of the log, without groups.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub member: u32,
    /// Episode number within this spec and seed, from 0.
    pub episode: u32,
    /// Step within the episode, from 0 (the first action of an episode is step 0).
    pub step: u32,
    /// Environment steps used so far for this spec and seed (all its members), this one
    /// included (1..=k).
    pub env_step: u32,
    /// sha256 of the observation the action answered (see `prompt_sha256`).
    pub prompt_sha256: String,
    /// The raw text the policy produced.
    pub generation: String,
    /// The action cut out of the generation (what was assembled into the program).
    pub action: String,
    pub reward: f64,
    /// Whether the action ran and produced predictions that could be scored.
    pub ran: bool,
    pub terminated: bool,
    pub truncated: bool,
    /// The error shown to the model in the reflection state (empty when the action ran).
    pub error: String,
    /// Wall-clock and CPU seconds of the evaluation, peak memory of the sandboxed program.
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    /// Seconds the policy spent producing this action (a batch's time split evenly over it).
    pub gen_s: f64,
}

/// Appends records to `steps.jsonl`, one flushed line each.
pub struct StepLog {
    path: PathBuf,
    file: File,
}

impl StepLog {
    /// Opens (creating if needed) `path` for appending.
    pub fn append(path: &Path) -> Result<StepLog, ExperimentError> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| ExperimentError::io(path, e))?;
        Ok(StepLog { path: path.to_path_buf(), file })
    }

    /// Writes one record as a single line and flushes it to the OS, so that a kill after this call
    /// cannot lose it. (A kill during the write leaves a partial last line, which `read_steps`
    /// discards.)
    pub fn write(&mut self, record: &StepRecord) -> Result<(), ExperimentError> {
        self.write_all(std::iter::once(record))
    }

    /// Writes several records (one round's steps) with a single write to the file and flushes
    /// them, so that a kill leaves all of them or, at worst, a partial last line.
    pub fn write_all<'a>(&mut self, records: impl IntoIterator<Item = &'a StepRecord>) -> Result<(), ExperimentError> {
        let mut text = String::new();
        for record in records {
            text.push_str(
                &serde_json::to_string(record)
                    .map_err(|e| ExperimentError::Io { path: self.path.clone(), source: std::io::Error::other(e) })?,
            );
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        self.file.write_all(text.as_bytes()).map_err(|e| ExperimentError::io(&self.path, e))?;
        self.file.flush().map_err(|e| ExperimentError::io(&self.path, e))
    }
}

/// Reads `steps.jsonl` for `--resume`. A last line without its newline (the process was killed
/// while writing it) is discarded and cut from the file, so appending continues on a clean line;
/// any other unreadable line is an error naming it.
pub fn read_steps(path: &Path) -> Result<Vec<StepRecord>, ExperimentError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ExperimentError::io(path, e)),
    };
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut good_len: u64 = 0;
    let mut line = String::new();
    let mut number = 0usize;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| ExperimentError::io(path, e))?;
        if n == 0 {
            break;
        }
        number += 1;
        if !line.ends_with('\n') {
            // Partial last line from a kill mid-write: drop it.
            truncate(path, good_len)?;
            break;
        }
        let text = line.trim();
        if !text.is_empty() {
            let record: StepRecord = serde_json::from_str(text).map_err(|e| ExperimentError::Resume {
                path: path.to_path_buf(),
                message: format!("line {number} is not a step record: {e}"),
            })?;
            records.push(record);
        }
        good_len += n as u64;
    }
    Ok(records)
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn truncate(path: &Path, len: u64) -> Result<(), ExperimentError> {
    let mut file = OpenOptions::new().write(true).open(path).map_err(|e| ExperimentError::io(path, e))?;
    file.set_len(len).map_err(|e| ExperimentError::io(path, e))?;
    file.seek(SeekFrom::End(0)).map_err(|e| ExperimentError::io(path, e))?;
    file.sync_all().map_err(|e| ExperimentError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(env_step: u32) -> StepRecord {
        StepRecord {
            spec: "s".into(),
            seed: 1,
            member: 0,
            episode: 0,
            step: env_step - 1,
            env_step,
            prompt_sha256: "ab".into(),
            generation: "g\n\"quoted\"".into(),
            action: "a".into(),
            reward: -1.0,
            ran: false,
            terminated: false,
            truncated: false,
            error: "NameError: x".into(),
            wall_s: 0.5,
            cpu_s: 0.25,
            peak_rss_mb: 10.0,
            gen_s: 1.0,
        }
    }

    #[test]
    fn round_trip_and_partial_last_line_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        let mut log = StepLog::append(&path).unwrap();
        log.write(&record(1)).unwrap();
        log.write(&record(2)).unwrap();
        drop(log);
        let full = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{full}{{\"spec\":\"s\",\"se")).unwrap();

        let records = read_steps(&path).unwrap();
        assert_eq!(records, vec![record(1), record(2)]);
        // The partial line was cut, so the next append starts on a fresh line.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), full);
        let mut log = StepLog::append(&path).unwrap();
        log.write(&record(3)).unwrap();
        assert_eq!(read_steps(&path).unwrap().len(), 3);
    }

    #[test]
    fn corrupt_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        std::fs::write(&path, "not json\n").unwrap();
        let err = read_steps(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_file_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_steps(&dir.path().join("none.jsonl")).unwrap().is_empty());
    }
}
