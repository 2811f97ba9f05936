//! The experiment loop of `etpo run`: policies (a model, or scripted action files), the run loop
//! over specs × seeds with an algorithm that may learn between rounds (the Reflection baseline
//! learns nothing), and the run folder's outputs: `steps.jsonl`, `summary.csv`, `summary.md`,
//! `best_reward.png`.
//!
//! - [`Policy`] produces raw generations for a batch of waiting environments: [`LlmPolicy`]
//!   (batched sampling, per-spec stop sequences and budget, the model's chat template) or
//!   [`ScriptedPolicy`] (action files).
//! - [`run_loop`] drives one [`Environment`] per spec and seed: each round the policy acts
//!   for every environment with budget left, the environments evaluate in parallel threads over
//!   one shared worker pool, each step is appended to `steps.jsonl` and flushed, and the
//!   [`Agent`] sees the round's [`FinishedStep`]s. Episodes restart after they end until the
//!   budget k is used. An [`Environment`] is a local `runtime::env::Env`, or a [`RemoteEnv`]:
//!   an episode on one of several `etpo serve` servers (`etpo run --remote`), moved to another
//!   server by replaying its steps when its server fails.
//! - [`Trained`] is the ETPO / PPO-KL / GRPO agent: it trains the model's policy adapter on the
//!   rounds' transitions and keeps `metrics.jsonl`, `batch_reward.png`, checkpoints and replay data.
//! - Resuming: the log is the truth. Steps in it are never re-run; a half-written last line is
//!   dropped; an episode in progress continues from the reflection state rebuilt from its last
//!   recorded action and error (`Env::restore`; a game's, and a remote one's, by replaying its
//!   recorded steps, checked against the log).

use std::path::{Path, PathBuf};

pub mod environment;
pub mod held_out;
pub mod llm;
pub mod lock;
pub mod paper;
pub mod plot;
pub mod policy;
pub mod provenance;
pub mod record;
pub mod remote;
pub mod runner;
pub mod scripted;
pub mod summary;
pub mod trained;

pub use environment::{Environment, Environments};
pub use llm::{LlmPolicy, Sampling, SamplingConfig, DEFAULT_TEMPERATURE, DEFAULT_TOP_K};
pub use policy::{hex, prompt_sha256, ActRequest, Action, Policy, PolicyError};
pub use record::{read_steps, StepLog, StepRecord};
pub use remote::{RemoteEnv, RemoteError, RemoteSpec, Servers};
pub use runner::{run_loop, Agent, FinishedStep, LoopOutcome, Observer, Quiet, Reflection, SpecRun};
pub use scripted::ScriptedPolicy;
pub use summary::{SeedStats, SpecStats};
pub use trained::{MetricsRecord, TrainSchedule, Trained, TrainerConfig};

/// Errors of the experiment loop and its outputs.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error("could not draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error(transparent)]
    Env(#[from] runtime::env::EnvError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("algorithm: {0}")]
    Algorithm(String),
    #[error("{0}")]
    Internal(String),
    #[error("{} is in use by another etpo process{}; wait for it to end (or stop it), then --resume", dir.display(), pid.map_or(String::new(), |p| format!(" (pid {p})")))]
    Locked { dir: PathBuf, pid: Option<u32> },
}

impl ExperimentError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ExperimentError {
        ExperimentError::Io { path: path.to_path_buf(), source }
    }
}
