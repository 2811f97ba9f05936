//! ETPO: entropy-regularised token-level policy optimisation (Wen et al. 2024).
//!
//! - [`math`]: the equations (soft Bellman targets of Eq. 6 in [`math::soft_bellman_targets`],
//!   the Q read-outs, the Q loss, the policy loss of Eq. 7) as functions on tensors of logits.
//! - [`EtpoTrainer`]: the networks (policy π, Q-network Q, target Q̄ as LoRA adapter sets over
//!   one frozen base, Q and Q̄ each with a value head, ρ = the base without adapter), one update
//!   per batch of [`Transition`]s over it and a sample of Algorithm 1's data buffer,
//!   checkpoints.
//! - [`AdamW`]: the optimiser, with its state open for checkpoints.
//! - [`eval`]: token log-likelihood / perplexity, to check that training left the LM intact.
//! - The PPO-KL baseline is [`crate::ppo`].

pub(crate) mod batch;
pub(crate) mod checkpoint;
pub mod config;
pub mod eval;
pub mod math;
pub mod optim;
pub(crate) mod trainer;

pub use config::EtpoConfig;
pub use math::QReadout;
pub use optim::{AdamW, AdamWConfig};
pub use trainer::{EtpoTrainer, PhaseTimes, UpdateMetrics, POLICY, Q, Q_TARGET};

/// One environment step as the trainers consume it: all token ids exactly as the model saw
/// and produced them (chat template applied, no re-tokenisation).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    /// The state prompt `s_t` (the full text the model was conditioned on).
    pub state: Vec<u32>,
    /// The action `a_t`: the tokens the policy sampled after `state` (at least one), including a
    /// generated end-of-sequence or stop token if the generation ended with one.
    pub action: Vec<u32>,
    /// `r(s_t, a_t)`.
    pub reward: f64,
    /// The next state prompt `s_{t+1}` to bootstrap from, or `None` when the return ends here
    /// (the episode terminated; the paper also treats reaching the step limit as done).
    pub next_state: Option<Vec<u32>>,
    /// Transitions that GRPO compares with each other share this key (the steps taken side by
    /// side by one seed's group of environments); `None`: those with identical states are
    /// compared. ETPO and PPO-KL do not use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
}

/// Errors of the trainers.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: std::path::PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}
