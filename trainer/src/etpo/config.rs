//! ETPO hyper-parameters.

use serde::{Deserialize, Serialize};

use super::math::QReadout;
use super::optim::AdamWConfig;

/// Every ETPO hyper-parameter. Serde field names are the keys of a spec's `training` block
/// and of `--set key=value` style CLI overrides; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtpoConfig {
    /// β: weight of the KL(π‖ρ) penalty (default 0.1; the paper's 0.01 makes a reward gap of 1
    /// a log-ratio of 100 nats, beyond what the adapters move in a run: README, "ETPO").
    pub beta: f64,
    /// β at the last of [`EtpoConfig::planned_updates`], reached geometrically from `beta`
    /// ([`EtpoConfig::beta_at`]); `None` (default): `beta` throughout. Meant to make the small
    /// advantages of a converged run count for more in `π* ∝ ρ·exp(Q/β)`; on Balance Scale
    /// 0.1 → 0.02 made the target more random instead and the reward fell (README, "ETPO").
    pub beta_end: Option<f64>,
    /// γ: discount between actions (paper: 0.99).
    pub gamma: f64,
    /// λ: Polyak coefficient of the target Q-network, `θ̄ ← λθ̄ + (1−λ)θ` once per update
    /// (default 0.5: a reward must cross one bootstrap per token position and per step, and
    /// runs have tens of updates, not the paper's thousands).
    pub polyak: f64,
    /// Trace of the targets inside an action ([`super::math::tree_backup_targets`]): 0 is
    /// Eq. 6 as written (a reward moves one token back per update); up to 1 carries what
    /// followed each token taken back along the action in one update, cut at each token by π's
    /// probability of it (tree backup), so replayed actions keep unbiased targets. Default 1:
    /// on Balance Scale the decisive token was credited within 2 updates (README, "ETPO").
    pub trace_lambda: f64,
    /// How Q-values are read out of the Q-network.
    pub q_readout: QReadout,
    /// τ, the weight of ρ in the prior of the policy step's target, `ρ^τ·π_k^(1−τ)·exp(A/β)`
    /// with π_k the policy before the update ([`super::math::prior_mixed_target_logp`]): 1
    /// (default) is Eq. 7 as written, `π* ∝ ρ·exp(Q/β)`; 0 is a mirror-descent step from π_k,
    /// which stays put where the Q-network sees no difference between tokens. This is τ at
    /// the first update; see [`EtpoConfig::reference_weight_end`]. Default 1: 0 throughout never
    /// learnt the tiny model's two-step task, and 1 → 0 over a run collapsed Balance Scale after
    /// step 144 (README, "ETPO").
    pub reference_weight: f64,
    /// τ at the last of [`EtpoConfig::planned_updates`], reached linearly from
    /// `reference_weight` ([`EtpoConfig::reference_weight_at`]); `None`: the same throughout.
    pub reference_weight_end: Option<f64>,
    /// ETPO(disc.) ablation (Appendix G): discount by γ inside actions too.
    pub discount_inside_actions: bool,
    /// ETPO(1-step) ablation (Appendix G): episodes of one step. The run loop honours this by
    /// forcing `max_steps = 1`; the trainer itself does not need it.
    pub single_step: bool,
    /// Weight α of the conservative term added to the Q loss ([`super::math::conservative_term`],
    /// CQL with ρ as the prior: `α·(β·log E_ρ[exp(Q/β)] − Q(taken))`, with the dueling read-out
    /// `−α·β·log(π_Q(w|c)/ρ(w|c))`): it keeps the tokens never taken from being valued above
    /// the ones that were (0: off, Eq. 6's squared error alone). Default 0.3: without it the
    /// policy's entropy rose above ρ's and Balance Scale collapsed after 100 steps; at 1 the tiny
    /// model's two-step task was learnt on 2 of 4 seeds only (README, "ETPO").
    pub conservative: f64,
    /// Weight κ of `β·KL(π_Q‖ρ)` in the Q loss ([`super::math::q_reference_kl`]): a prior that
    /// holds the advantages of tokens no data speak for at zero, so that a target built on the
    /// previous policy (`reference_weight` < 1) is not multiplied by the Q-network's noise there.
    /// Default 0 (off) (README, "ETPO").
    pub q_reference_kl: f64,
    /// Huber threshold δ for the Q loss (`None`: plain squared error, as in Algorithm 1).
    pub huber_delta: Option<f64>,
    /// Optimiser of the Q-network's adapter.
    pub q_optim: AdamWConfig,
    /// Optimiser of the Q-network's value head ([`QReadout::Dueling`]).
    pub value_head_optim: AdamWConfig,
    /// Optimiser of the policy's adapter.
    pub policy_optim: AdamWConfig,
    /// Transitions Algorithm 1's data buffer D keeps (the newest; 0: no buffer, each update
    /// learns from its own batch only).
    pub replay_capacity: usize,
    /// Transitions drawn from D (without replacement) to train on beside each new batch.
    pub replay_sample: usize,
    /// Gradient steps of the Q-network per update, on the same targets (Algorithm 1: 1).
    pub q_epochs: usize,
    /// Gradient steps of the policy per update, against the same Q-values (Algorithm 1: 1).
    pub policy_epochs: usize,
    /// Trust region of the policy step, in nats per action token: when the mean
    /// KL(π_before‖π_after) over the mini-batch's action rows exceeds it, the adapter's change
    /// is scaled back along its direction (a line search, as in TRPO) until it does not.
    /// This is the region of the first update; it shrinks to [`EtpoConfig::policy_max_kl_end`]
    /// over a run. `None`: Eq. 7's steps as taken. Why: Adam moves every weight by about its
    /// learning rate whatever the gradient's size, so one noisy update can move π further than
    /// any loss term asks (README, "ETPO").
    pub policy_max_kl: Option<f64>,
    /// The trust region at the last of [`EtpoConfig::planned_updates`], reached linearly from
    /// `policy_max_kl` ([`EtpoConfig::policy_max_kl_at`]); `None`: the same at every update.
    /// Default 0.002, a tenth: with a constant region the policy kept moving by the region's
    /// whole step once the reward was reached, and drifted away from it (Balance Scale seed 1:
    /// last 64 of 256 steps +0.44 with a constant region, +0.70 shrinking; README "ETPO").
    pub policy_max_kl_end: Option<f64>,
    /// Updates the run will make (set by `etpo run` from its budget: steps × seeds ÷ update
    /// size); `None` (a trainer used on its own) keeps `policy_max_kl` at every update.
    pub planned_updates: Option<u64>,
    /// Algorithm 1 updates φ against the Q-network after its step. With `true`, the policy
    /// target is read from the Q-network as it was in the last Q epoch's pass, before that
    /// epoch's step (one forward pass less).
    pub policy_uses_pre_step_q: bool,
    /// Sequences per forward pass (gradients are accumulated over micro-batches).
    pub micro_batch: usize,
    /// Run a state prompt shared by several actions of a micro-batch once per network (its
    /// key/value cache is reused, gradients flow through it); `false` runs every sequence whole.
    pub share_prefixes: bool,
    /// LoRA rank of the three adapter sets.
    pub lora_rank: usize,
    /// LoRA scaling α (the delta is scaled by α/rank).
    pub lora_alpha: f64,
    /// Seed of the trainer's own random numbers (adapter initialisation).
    pub seed: u64,
}

/// The policy's default learning rate; the Q adapter's and the value head's follow from it
/// ([`EtpoConfig::set_lr`]). Chosen on SmolLM2-135M and Balance Scale, where 3e-4 left
/// KL(π‖ρ) below 0.03 nats per token after 4 updates (README, "ETPO").
pub const DEFAULT_LR: f64 = 2e-3;

/// The policy step's default trust region ([`EtpoConfig::policy_max_kl`]).
pub const DEFAULT_POLICY_MAX_KL: f64 = 0.02;

/// The default trust region at a run's last update ([`EtpoConfig::policy_max_kl_end`]).
pub const DEFAULT_POLICY_MAX_KL_END: f64 = 0.002;

impl Default for EtpoConfig {
    fn default() -> Self {
        let mut cfg = EtpoConfig {
            beta: 0.1,
            beta_end: None,
            gamma: 0.99,
            polyak: 0.5,
            trace_lambda: 1.0,
            q_readout: QReadout::default(),
            reference_weight: 1.0,
            reference_weight_end: None,
            discount_inside_actions: false,
            single_step: false,
            conservative: 0.3,
            q_reference_kl: 0.0,
            huber_delta: None,
            q_optim: AdamWConfig::default(),
            value_head_optim: AdamWConfig::default(),
            policy_optim: AdamWConfig::default(),
            replay_capacity: 256,
            replay_sample: 32,
            q_epochs: 4,
            policy_epochs: 2,
            policy_max_kl: Some(DEFAULT_POLICY_MAX_KL),
            policy_max_kl_end: Some(DEFAULT_POLICY_MAX_KL_END),
            planned_updates: None,
            policy_uses_pre_step_q: false,
            micro_batch: 4,
            share_prefixes: true,
            lora_rank: 8,
            lora_alpha: 16.0,
            seed: 0,
        };
        cfg.set_lr(DEFAULT_LR);
        cfg
    }
}

impl EtpoConfig {
    /// Applies a spec's `training` block: `lr` and `grad_clip` set both optimisers; keys that
    /// ETPO does not use (`epochs`, `clip_eps`, sampling keys, ...) are left to their owners.
    pub fn apply_spec(&mut self, t: &envspec::TrainingOverrides) {
        if let Some(lr) = t.lr {
            self.set_lr(lr);
        }
        if let Some(clip) = t.grad_clip {
            self.q_optim.max_grad_norm = Some(clip);
            self.value_head_optim.max_grad_norm = Some(clip);
            self.policy_optim.max_grad_norm = Some(clip);
        }
        if let Some(v) = t.beta {
            self.beta = v;
        }
        if let Some(v) = t.gamma {
            self.gamma = v;
        }
        if let Some(v) = t.polyak {
            self.polyak = v;
        }
        if let Some(v) = t.lora_rank {
            self.lora_rank = v;
        }
        if let Some(v) = t.lora_alpha {
            self.lora_alpha = v;
        }
    }

    /// One learning rate for all three optimisers, keeping the defaults' ratios: the policy's
    /// is `lr`, the Q adapter's `lr/3`, the value head's `lr` (3× the Q adapter's: the head
    /// must outpace the adapter, and at 10× it overshot its targets on Balance Scale; README,
    /// "ETPO").
    pub fn set_lr(&mut self, lr: f64) {
        self.policy_optim.lr = lr;
        self.q_optim.lr = lr / 3.0;
        self.value_head_optim.lr = lr;
    }

    /// The trust region of the update made after `updates_done` others: `policy_max_kl` at the
    /// first, `policy_max_kl_end` at the last of `planned_updates` and after it, linear in
    /// between, so that the policy's steps shrink as a fixed-budget run goes on.
    pub fn policy_max_kl_at(&self, updates_done: u64) -> Option<f64> {
        let start = self.policy_max_kl?;
        match (self.policy_max_kl_end, self.planned_updates) {
            (Some(end), Some(planned)) => Some(linear(start, end, updates_done, planned)),
            _ => Some(start),
        }
    }

    /// τ for the update made after `updates_done` others: `reference_weight` at the first,
    /// `reference_weight_end` at the last of `planned_updates` and after it, linear in between.
    pub fn reference_weight_at(&self, updates_done: u64) -> f64 {
        match (self.reference_weight_end, self.planned_updates) {
            (Some(end), Some(planned)) => linear(self.reference_weight, end, updates_done, planned),
            _ => self.reference_weight,
        }
    }

    /// β for the update made after `updates_done` others: `beta` at the first, `beta_end` at the
    /// last of `planned_updates` and after it, geometric in between (β scales the rewards'
    /// effect on log-probabilities, so equal ratios per update).
    pub fn beta_at(&self, updates_done: u64) -> f64 {
        match (self.beta_end, self.planned_updates) {
            (Some(end), Some(planned)) if planned > 1 => {
                let t = updates_done.min(planned - 1) as f64 / (planned - 1) as f64;
                self.beta * (end / self.beta).powf(t)
            }
            _ => self.beta,
        }
    }

    /// The configuration the update made after `updates_done` others runs with: its schedules
    /// resolved, `beta`, `policy_max_kl` and `reference_weight` as [`EtpoConfig::beta_at`],
    /// [`EtpoConfig::policy_max_kl_at`] and [`EtpoConfig::reference_weight_at`] set them, and
    /// no schedule left to apply.
    pub fn at_update(&self, updates_done: u64) -> EtpoConfig {
        EtpoConfig {
            beta: self.beta_at(updates_done),
            beta_end: None,
            policy_max_kl: self.policy_max_kl_at(updates_done),
            policy_max_kl_end: None,
            reference_weight: self.reference_weight_at(updates_done),
            reference_weight_end: None,
            ..self.clone()
        }
    }

    /// Sets one hyper-parameter from a CLI `KEY=VALUE` override; see [`set_key`].
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let next = set_key(self, key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Check ranges; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!("beta must be a positive number, got {}", self.beta));
        }
        if let Some(b) = self.beta_end {
            if !(b > 0.0 && b.is_finite()) {
                return Err(format!("beta_end must be a positive number (or null), got {b}"));
            }
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(format!("gamma must be in [0, 1], got {}", self.gamma));
        }
        if !(0.0..=1.0).contains(&self.polyak) {
            return Err(format!("polyak must be in [0, 1], got {}", self.polyak));
        }
        if !(0.0..=1.0).contains(&self.trace_lambda) {
            return Err(format!("trace_lambda must be in [0, 1], got {}", self.trace_lambda));
        }
        for (key, w) in
            [("reference_weight", Some(self.reference_weight)), ("reference_weight_end", self.reference_weight_end)]
        {
            if let Some(w) = w {
                if !(0.0..=1.0).contains(&w) {
                    return Err(format!("{key} must be in [0, 1], got {w}"));
                }
            }
        }
        if !(self.conservative >= 0.0 && self.conservative.is_finite()) {
            return Err(format!("conservative must be a number >= 0, got {}", self.conservative));
        }
        if !(self.q_reference_kl >= 0.0 && self.q_reference_kl.is_finite()) {
            return Err(format!("q_reference_kl must be a number >= 0, got {}", self.q_reference_kl));
        }
        if let Some(d) = self.huber_delta {
            if d.is_nan() || d <= 0.0 {
                return Err(format!("huber_delta must be positive, got {d}"));
            }
        }
        if let Some(d) = self.policy_max_kl {
            if d.is_nan() || d <= 0.0 {
                return Err(format!("policy_max_kl must be positive (or null for no trust region), got {d}"));
            }
        }
        if let Some(d) = self.policy_max_kl_end {
            if d.is_nan() || d <= 0.0 {
                return Err(format!(
                    "policy_max_kl_end must be positive (or null for a constant trust region), got {d}"
                ));
            }
        }
        if self.planned_updates == Some(0) {
            return Err("planned_updates must be at least 1 (or null)".into());
        }
        if self.micro_batch == 0 || self.q_epochs == 0 || self.policy_epochs == 0 {
            return Err("micro_batch, q_epochs and policy_epochs must be at least 1".into());
        }
        if self.lora_rank == 0 {
            return Err("lora_rank must be at least 1".into());
        }
        for (key, o) in [
            ("q_optim", &self.q_optim),
            ("value_head_optim", &self.value_head_optim),
            ("policy_optim", &self.policy_optim),
        ] {
            if o.lr.is_nan() || o.lr <= 0.0 {
                return Err(format!("{key}.lr must be positive, got {}", o.lr));
            }
        }
        Ok(())
    }
}

/// `start` at update 0, `end` at update `planned − 1` and after it, linear in between.
fn linear(start: f64, end: f64, updates_done: u64, planned: u64) -> f64 {
    if planned <= 1 {
        return start;
    }
    let t = updates_done.min(planned - 1) as f64 / (planned - 1) as f64;
    start + (end - start) * t
}

/// A copy of `cfg` with the (dotted) `key` set to `value`, for `--set key=value` overrides of
/// any serde configuration: `beta=0.05`, `q_optim.lr=3e-4`, `q_readout=logits`,
/// `huber_delta=null`. The value is read as JSON, or else as a string; unknown keys and
/// ill-typed values are errors naming the key.
pub fn set_key<T: Serialize + serde::de::DeserializeOwned>(cfg: &T, key: &str, value: &str) -> Result<T, String> {
    let mut root = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let mut node = &mut root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let obj =
            node.as_object_mut().ok_or_else(|| format!("`{}` is not a group of settings", parts[..i].join(".")))?;
        node = obj.get_mut(*part).ok_or_else(|| format!("unknown setting `{key}`"))?;
    }
    *node = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    serde_json::from_value(root).map_err(|e| format!("`{key}={value}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = EtpoConfig::default();
        assert_eq!((c.beta, c.gamma, c.polyak), (0.1, 0.99, 0.5));
        assert_eq!((c.q_epochs, c.policy_epochs, c.replay_capacity, c.replay_sample), (4, 2, 256, 32));
        assert_eq!(c.policy_optim.lr, 2e-3);
        assert!((c.q_optim.lr - 2e-3 / 3.0).abs() < 1e-15 && (c.value_head_optim.lr - 2e-3).abs() < 1e-15);
        assert_eq!(c.q_readout, QReadout::Dueling);
        assert_eq!(c.policy_max_kl, Some(0.02));
        assert_eq!((c.trace_lambda, c.conservative), (1.0, 0.3));
        assert!(c.validate().is_ok());
        let bad = EtpoConfig { trace_lambda: 1.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("trace_lambda must be in [0, 1]"));
        let bad = EtpoConfig { conservative: -0.1, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("conservative must be a number >= 0"));
        let bad = EtpoConfig { q_reference_kl: f64::NAN, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("q_reference_kl must be a number >= 0"));
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

#[cfg(test)]
mod override_tests {
    use super::*;

    #[test]
    fn cli_overrides_by_dotted_key() {
        let mut c = EtpoConfig::default();
        c.set("beta", "0.05").unwrap();
        c.set("q_optim.lr", "3e-4").unwrap();
        c.set("q_readout", "logits").unwrap();
        c.set("huber_delta", "1.5").unwrap();
        assert_eq!((c.beta, c.q_optim.lr, c.q_readout, c.huber_delta), (0.05, 3e-4, QReadout::Logits, Some(1.5)));
        assert!(c.set("betta", "1").unwrap_err().contains("unknown setting `betta`"));
        assert!(c.set("beta", "high").unwrap_err().contains("beta=high"));
        assert!(c.set("gamma", "2").unwrap_err().contains("gamma"));
        assert!(c.set("beta.x", "1").is_err());
        c.set("policy_max_kl", "null").unwrap();
        assert_eq!(c.policy_max_kl, None);
        assert!(c.set("policy_max_kl", "0").unwrap_err().contains("policy_max_kl must be positive"));
        assert!(c.set("policy_max_kl_end", "-1").unwrap_err().contains("policy_max_kl_end must be positive"));
        assert!(c.set("planned_updates", "0").unwrap_err().contains("planned_updates must be at least 1"));
    }

    #[test]
    fn the_trust_region_shrinks_linearly_over_the_planned_updates() {
        // 0.02 → 0.002 over 4 updates: steps of 0.006.
        let c = EtpoConfig { planned_updates: Some(4), ..Default::default() };
        let at: Vec<f64> = (0..6).map(|u| c.policy_max_kl_at(u).unwrap()).collect();
        for (got, want) in at.iter().zip([0.02, 0.014, 0.008, 0.002, 0.002, 0.002]) {
            assert!((got - want).abs() < 1e-12, "{at:?}");
        }
        // Without a plan, with one update planned, or without an end: the same region throughout.
        for c in [
            EtpoConfig::default(),
            EtpoConfig { planned_updates: Some(1), ..Default::default() },
            EtpoConfig { planned_updates: Some(4), policy_max_kl_end: None, ..Default::default() },
        ] {
            assert_eq!(c.policy_max_kl_at(3), Some(0.02));
        }
        let none = EtpoConfig { policy_max_kl: None, planned_updates: Some(4), ..Default::default() };
        assert_eq!(none.policy_max_kl_at(0), None);
    }

    #[test]
    fn beta_shrinks_geometrically_over_the_planned_updates() {
        // 0.1 → 0.0125 over 4 updates: halved at each.
        let c = EtpoConfig { beta_end: Some(0.0125), planned_updates: Some(4), ..Default::default() };
        let at: Vec<f64> = (0..5).map(|u| c.beta_at(u)).collect();
        for (got, want) in at.iter().zip([0.1, 0.05, 0.025, 0.0125, 0.0125]) {
            assert!((got - want).abs() < 1e-12, "{at:?}");
        }
        let resolved = c.at_update(2);
        assert!((resolved.beta - 0.025).abs() < 1e-12);
        assert!((resolved.policy_max_kl.unwrap() - 0.008).abs() < 1e-12, "{resolved:?}");
        assert_eq!(resolved.beta_at(0), resolved.beta, "nothing left to schedule");
        assert_eq!(resolved.policy_max_kl_at(0), resolved.policy_max_kl);
        assert_eq!(EtpoConfig { planned_updates: Some(4), ..Default::default() }.beta_at(3), 0.1);
        assert!(c.clone().set("beta_end", "0").unwrap_err().contains("beta_end must be a positive number"));
    }

    #[test]
    fn the_reference_weight_moves_linearly_over_the_planned_updates() {
        // τ 1 → 0 over 5 updates: steps of 0.25.
        let c = EtpoConfig { reference_weight_end: Some(0.0), planned_updates: Some(5), ..Default::default() };
        let at: Vec<f64> = (0..7).map(|u| c.reference_weight_at(u)).collect();
        assert_eq!(at, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]);
        let resolved = c.at_update(1);
        assert_eq!((resolved.reference_weight, resolved.reference_weight_end), (0.75, None));
        assert_eq!(EtpoConfig { planned_updates: Some(5), ..Default::default() }.reference_weight_at(4), 1.0);
        assert_eq!(EtpoConfig { reference_weight_end: Some(0.0), ..Default::default() }.reference_weight_at(4), 1.0);
        for (key, value) in [("reference_weight", "1.5"), ("reference_weight_end", "-0.1")] {
            let e = EtpoConfig::default().set(key, value).unwrap_err();
            assert!(e.contains(&format!("{key} must be in [0, 1]")), "{e}");
        }
    }

    #[test]
    fn spec_training_block() {
        let t = envspec::TrainingOverrides { lr: Some(1e-3), beta: Some(0.1), polyak: Some(0.9), ..Default::default() };
        let mut c = EtpoConfig::default();
        c.apply_spec(&t);
        assert_eq!((c.policy_optim.lr, c.beta, c.polyak, c.gamma), (1e-3, 0.1, 0.9, 0.99));
        assert!((c.q_optim.lr - 1e-3 / 3.0).abs() < 1e-15 && (c.value_head_optim.lr - 1e-3).abs() < 1e-15);
    }
}
