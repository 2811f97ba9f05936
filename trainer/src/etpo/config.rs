//! ETPO hyper-parameters.

use serde::{Deserialize, Serialize};

use super::math::QReadout;
use super::optim::AdamWConfig;

/// Every ETPO hyper-parameter. Serde field names are the keys of a spec's `training` block
/// and of `--set key=value` style CLI overrides; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtpoConfig {
    /// β: weight of the KL(π‖ρ) penalty (paper: 0.01).
    pub beta: f64,
    /// γ: discount between actions (paper: 0.99).
    pub gamma: f64,
    /// λ: Polyak coefficient of the target Q-network, `θ̄ ← λθ̄ + (1−λ)θ` (default 0.995).
    pub polyak: f64,
    /// How Q-values are read out of the Q-network.
    pub q_readout: QReadout,
    /// ETPO(disc.) ablation (Appendix G): discount by γ inside actions too.
    pub discount_inside_actions: bool,
    /// ETPO(1-step) ablation (Appendix G): episodes of one step. The run loop honours this by
    /// forcing `max_steps = 1`; the trainer itself does not need it.
    pub single_step: bool,
    /// Huber threshold δ for the Q loss (`None`: plain squared error, as in Algorithm 1).
    pub huber_delta: Option<f64>,
    /// Optimiser of the Q-network's adapter.
    pub q_optim: AdamWConfig,
    /// Optimiser of the policy's adapter.
    pub policy_optim: AdamWConfig,
    /// Algorithm 1 updates φ against the Q-network after its step. With `true`, the Q-values
    /// read before the Q step are reused for the policy target (one forward pass less).
    pub policy_uses_pre_step_q: bool,
    /// Sequences per forward pass (gradients are accumulated over micro-batches).
    pub micro_batch: usize,
    /// LoRA rank of the three adapter sets.
    pub lora_rank: usize,
    /// LoRA scaling α (the delta is scaled by α/rank).
    pub lora_alpha: f64,
    /// Seed of the trainer's own random numbers (adapter initialisation).
    pub seed: u64,
}

impl Default for EtpoConfig {
    fn default() -> Self {
        EtpoConfig {
            beta: 0.01,
            gamma: 0.99,
            polyak: 0.995,
            q_readout: QReadout::default(),
            discount_inside_actions: false,
            single_step: false,
            huber_delta: None,
            q_optim: AdamWConfig::default(),
            policy_optim: AdamWConfig::default(),
            policy_uses_pre_step_q: false,
            micro_batch: 4,
            lora_rank: 8,
            lora_alpha: 16.0,
            seed: 0,
        }
    }
}

impl EtpoConfig {
    /// Check ranges; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!("beta must be a positive number, got {}", self.beta));
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(format!("gamma must be in [0, 1], got {}", self.gamma));
        }
        if !(0.0..=1.0).contains(&self.polyak) {
            return Err(format!("polyak must be in [0, 1], got {}", self.polyak));
        }
        if let Some(d) = self.huber_delta {
            if !(d > 0.0) {
                return Err(format!("huber_delta must be positive, got {d}"));
            }
        }
        if self.micro_batch == 0 {
            return Err("micro_batch must be at least 1".into());
        }
        if self.lora_rank == 0 {
            return Err("lora_rank must be at least 1".into());
        }
        for (key, o) in [("q_optim", &self.q_optim), ("policy_optim", &self.policy_optim)] {
            if !(o.lr > 0.0) {
                return Err(format!("{key}.lr must be positive, got {}", o.lr));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = EtpoConfig::default();
        assert_eq!((c.beta, c.gamma, c.polyak), (0.01, 0.99, 0.995));
        assert_eq!(c.q_readout, QReadout::LogRatio);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn partial_json_overrides_and_rejects_unknown_keys() {
        let c: EtpoConfig =
            serde_json::from_str(r#"{"beta": 0.1, "q_readout": "logits", "q_optim": {"lr": 0.001}}"#).unwrap();
        assert_eq!(c.beta, 0.1);
        assert_eq!(c.q_readout, QReadout::Logits);
        assert_eq!(c.q_optim.lr, 0.001);
        assert_eq!(c.q_optim.beta2, 0.999);
        assert!(serde_json::from_str::<EtpoConfig>(r#"{"betta": 0.1}"#).is_err());
        let bad = EtpoConfig { gamma: 1.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("gamma"));
    }
}
