//! What goes into a sandbox ([`Job`], [`Limits`]) and what comes out ([`Outcome`]).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Resource limits for one action. `Default` gives safe limits for small tabular tasks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock seconds from the start of the action to its result.
    pub wall_s: f64,
    /// CPU seconds of the action's process (all its threads).
    pub cpu_s: f64,
    /// Memory the action may allocate beyond the warm worker it is forked from, in MiB.
    pub memory_mb: u64,
    /// Captured stdout + stderr kept, in KiB; the rest is read and discarded.
    pub output_kb: u64,
    /// Processes (and threads) the whole sandbox may hold at once.
    pub max_processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { wall_s: 30.0, cpu_s: 30.0, memory_mb: 1024, output_kb: 64, max_processes: 64 }
    }
}

impl From<&envspec::ExecLimits> for Limits {
    /// The limits a spec declares (`limits:`), field for field.
    fn from(l: &envspec::ExecLimits) -> Self {
        Limits {
            wall_s: l.wall_s,
            cpu_s: l.cpu_s,
            memory_mb: l.memory_mb,
            output_kb: l.output_kb,
            max_processes: l.max_processes,
        }
    }
}

/// One action to evaluate. The validation labels are deliberately absent: they never enter the
/// sandbox, the caller scores the returned probabilities itself.
#[derive(Debug, Clone)]
pub struct Job {
    /// Python source that defines `build_model(x_train, y_train)`, returning a fitted classifier
    /// (an unfitted scikit-learn estimator is fitted on `x_train, y_train` by the runtime).
    pub program: String,
    pub x_train: Vec<Vec<f64>>,
    /// Class indices in `0..n_classes`.
    pub y_train: Vec<usize>,
    pub x_val: Vec<Vec<f64>>,
    pub n_classes: usize,
    pub limits: Limits,
}

/// The result of evaluating one [`Job`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Probabilities: one row per `x_val` row, `n_classes` finite columns; column `k` is class `k`.
    /// If the estimator's `classes_` lacks some class, that column is zero.
    pub result: Result<Vec<Vec<f64>>, ActionError>,
    /// Wall-clock seconds of the action (fork to result), as seen by the worker.
    pub wall_s: f64,
    /// CPU seconds (user + system) of the action's process and its reaped children.
    pub cpu_s: f64,
    /// Peak resident memory of the action's process, in MiB.
    pub peak_rss_mb: f64,
    /// The first `output_kb` of what the program printed (stdout and stderr interleaved).
    pub output: String,
}

/// Why an action failed, in a form the model can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionError {
    pub kind: ActionErrorKind,
    /// Shown to the model in the reflection state: exception type and message, the failing line
    /// of the program, no sandbox paths; or a sentence naming the limit that was hit.
    pub message: String,
}

/// The class of an [`ActionError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionErrorKind {
    /// The program does not compile (reported without running it).
    Syntax,
    /// An exception while defining or calling `build_model`, or a missing `build_model`.
    Exception,
    /// The wall-clock or CPU-time limit was hit.
    Timeout,
    /// The memory limit was hit.
    Memory,
    /// The output limit was hit in a way that stopped the program (file size limit).
    Output,
    /// `predict_proba` is missing, raised, or returned unusable values (shape, NaN, classes).
    BadPredictions,
    /// The program's process was killed by a signal (crash, or it killed itself).
    Killed,
}

impl fmt::Display for ActionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ActionError {}

impl ActionError {
    pub(crate) fn new(kind: ActionErrorKind, message: impl Into<String>) -> Self {
        ActionError { kind, message: message.into() }
    }
}
