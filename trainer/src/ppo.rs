//! PPO-KL, the paper's baseline: action-level PPO as in RLHF.
//!
//! - Reward of an action: `r − β·log(π(a|s)/ρ(a|s))`, with `log π(a|s) = Σ_j log π(w^j|s, w^{1:j-1})`
//!   under the policy that sampled the batch (the paper, Section 5.2).
//! - Advantage: GAE(γ, λ) over the episode (Schulman et al. 2016; λ = 0.95 as in the ETPO
//!   authors' code), see [`gae`]: `A_t = δ_t + γλ·A_{t+1}` with `δ_t = r_KL + γ·V(s_{t+1}) − V(s_t)`,
//!   so a reward reaches the steps before it (a one-step TD advantage, λ = 0, does not carry it
//!   back over three steps). Normalised over the batch; the same advantage for every token of
//!   the action.
//! - Policy loss: the clipped surrogate `−min(ρ_j A, clip(ρ_j, 1−ε, 1+ε) A)` with per-token
//!   ratios `ρ_j = π_new(w^j|…)/π_old(w^j|…)`, averaged over action tokens, for several epochs.
//! - Value head: a linear map of the frozen base's last hidden state at the state's last token,
//!   trained on the λ-return `A_t + V(s_t)`.
//!
//! The policy is the [`POLICY`] adapter set (the same name as ETPO's, so generation code is
//! shared); ρ is the base without adapter.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::etpo::batch::{accumulate_grads, hidden_rows, logp_from_hidden, token_tensor, RowSpan};
use crate::etpo::{checkpoint, math, AdamW, AdamWConfig, TrainError, Transition, UpdateMetrics, POLICY};
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::value_head::ValueHead;

const FORMAT: &str = "etpo-ppo-kl-checkpoint/1";

/// Every PPO-KL hyper-parameter (keys of a spec's `training` block; unknown keys are rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// β: weight of the per-action KL penalty in the reward (as ETPO's, 0.01).
    pub beta: f64,
    /// γ: discount between actions.
    pub gamma: f64,
    /// λ of GAE: 0 is the one-step TD advantage, 1 the Monte-Carlo return minus `V(s)`.
    pub gae_lambda: f64,
    /// ε of the clipped ratio.
    pub clip: f64,
    /// Optimisation epochs over each batch.
    pub epochs: usize,
    /// Normalise advantages over the batch (mean 0, std 1).
    pub normalize_advantages: bool,
    /// Optimiser of the policy's adapter.
    pub policy_optim: AdamWConfig,
    /// Optimiser of the value head.
    pub value_optim: AdamWConfig,
    /// Sequences per forward pass (gradients are accumulated over micro-batches).
    pub micro_batch: usize,
    /// Run a state prompt shared by several actions of a micro-batch once (see
    /// `EtpoConfig::share_prefixes`).
    pub share_prefixes: bool,
    /// LoRA rank of the policy's adapter set.
    pub lora_rank: usize,
    /// LoRA scaling α.
    pub lora_alpha: f64,
    /// Seed of the adapter initialisation.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            beta: 0.01,
            gamma: 0.99,
            gae_lambda: 0.95,
            clip: 0.2,
            epochs: 4,
            normalize_advantages: true,
            policy_optim: AdamWConfig::default(),
            value_optim: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() },
            micro_batch: 4,
            share_prefixes: true,
            lora_rank: 8,
            lora_alpha: 16.0,
            seed: 0,
        }
    }
}

impl PpoConfig {
    /// Applies a spec's `training` block (`lr` and `grad_clip` set the policy's optimiser,
    /// `clip_eps` the ratio clip).
    pub fn apply_spec(&mut self, t: &envspec::TrainingOverrides) {
        ClippedPolicyKeys {
            policy_optim: &mut self.policy_optim,
            beta: &mut self.beta,
            gamma: &mut self.gamma,
            epochs: &mut self.epochs,
            clip: &mut self.clip,
            lora_rank: &mut self.lora_rank,
            lora_alpha: &mut self.lora_alpha,
        }
        .apply(t);
    }

    /// Sets one hyper-parameter from a CLI `KEY=VALUE` override (see
    /// [`crate::etpo::config::set_key`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let next = crate::etpo::config::set_key(self, key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Check ranges; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        validate_clipped(self.beta, self.gamma, self.clip)?;
        if !(0.0..=1.0).contains(&self.gae_lambda) {
            return Err(format!("gae_lambda must be in [0, 1], got {}", self.gae_lambda));
        }
        if self.epochs == 0 || self.micro_batch == 0 || self.lora_rank == 0 {
            return Err("epochs, micro_batch and lora_rank must be at least 1".into());
        }
        Ok(())
    }
}

/// The `training` keys that PPO-KL and GRPO share, pointing at either's fields.
pub(crate) struct ClippedPolicyKeys<'a> {
    pub policy_optim: &'a mut AdamWConfig,
    pub beta: &'a mut f64,
    pub gamma: &'a mut f64,
    pub epochs: &'a mut usize,
    pub clip: &'a mut f64,
    pub lora_rank: &'a mut usize,
    pub lora_alpha: &'a mut f64,
}

impl ClippedPolicyKeys<'_> {
    /// Applies a spec's `training` block: `lr` and `grad_clip` set the policy's optimiser,
    /// `clip_eps` the ratio clip, the others their namesakes.
    pub(crate) fn apply(self, t: &envspec::TrainingOverrides) {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut self.policy_optim.lr, t.lr);
        set(&mut self.policy_optim.max_grad_norm, t.grad_clip.map(Some));
        set(self.beta, t.beta);
        set(self.gamma, t.gamma);
        set(self.clip, t.clip_eps);
        set(self.lora_alpha, t.lora_alpha);
        set(self.epochs, t.epochs);
        set(self.lora_rank, t.lora_rank);
    }
}

/// The ranges PPO-KL and GRPO share; the message names the offending key.
pub(crate) fn validate_clipped(beta: f64, gamma: f64, clip: f64) -> Result<(), String> {
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(format!("beta must be a non-negative number, got {beta}"));
    }
    if !(0.0..=1.0).contains(&gamma) {
        return Err(format!("gamma must be in [0, 1], got {gamma}"));
    }
    if !(clip > 0.0 && clip < 1.0) {
        return Err(format!("clip must be in (0, 1), got {clip}"));
    }
    Ok(())
}

/// Generalised advantage estimates `A_t = δ_t + γλ·A_{t+1}` of the transitions of `batch`, from
/// their TD errors `deltas[t] = r_t + γ·V(s_{t+1}) − V(s_t)`.
///
/// Episodes are followed through the batch: the successors of a transition are the batch's
/// transitions whose state is its next state. With none (the episode ended, or continues past
/// the batch, whose `V(s_{t+1})` is then the bootstrap already in δ) `A_t = δ_t`; with several
/// (two rollouts reached the same state) their mean advantage is used. A chain that comes back to
/// a state it passed through is cut there.
pub fn gae(batch: &[Transition], deltas: &[f64], gamma: f64, lambda: f64) -> Vec<f64> {
    let mut by_state: HashMap<&[u32], Vec<usize>> = HashMap::new();
    for (i, t) in batch.iter().enumerate() {
        by_state.entry(t.state.as_slice()).or_default().push(i);
    }
    // Depth-first with an explicit stack, so long episodes cannot overflow the call stack.
    let mut adv: Vec<Option<f64>> = vec![None; batch.len()];
    let mut on_path = vec![false; batch.len()];
    for root in 0..batch.len() {
        let mut stack = vec![(root, false)];
        while let Some((i, children_done)) = stack.pop() {
            if adv[i].is_some() {
                continue;
            }
            let succ: Vec<usize> = batch[i]
                .next_state
                .as_ref()
                .and_then(|s| by_state.get(s.as_slice()))
                .map(|v| v.iter().copied().filter(|&j| !on_path[j] || adv[j].is_some()).collect())
                .unwrap_or_default();
            if !children_done {
                on_path[i] = true;
                stack.push((i, true));
                stack.extend(succ.iter().filter(|&&j| adv[j].is_none()).map(|&j| (j, false)));
                continue;
            }
            let known: Vec<f64> = succ.iter().filter_map(|&j| adv[j]).collect();
            let tail = if known.is_empty() { 0.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
            adv[i] = Some(deltas[i] + gamma * lambda * tail);
            on_path[i] = false;
        }
    }
    adv.into_iter().map(|a| a.unwrap_or(0.0)).collect()
}

/// PPO-KL over a [`Llama`]: the [`POLICY`] adapter set plus a value head on the frozen base.
pub struct PpoTrainer {
    cfg: PpoConfig,
    pi_opt: AdamW,
    value_opt: AdamW,
    /// The critic `V(s)` on the frozen base's hidden state.
    value_head: ValueHead,
    updates: u64,
}

/// Per-action quantities of the sampling policy, computed once per update.
struct Rollout {
    /// `log π_old(w^j|…)` of every action token, per micro-batch.
    old_logp: Vec<Tensor>,
    /// Base hidden state at each transition's last state token, per micro-batch (`[b, H]`).
    state_features: Vec<Tensor>,
    advantages: Vec<f32>,
    value_targets: Vec<f32>,
}

impl PpoTrainer {
    /// Adds the [`POLICY`] adapter set to `model` (B = 0: π starts equal to ρ) and a zero value
    /// head.
    pub fn new(model: &mut Llama, cfg: PpoConfig) -> Result<PpoTrainer, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        let lora = LoraConfig { rank: cfg.lora_rank, alpha: cfg.lora_alpha, ..LoraConfig::default() };
        model.add_adapter_seeded(POLICY, &lora, cfg.seed)?;
        let value_head = ValueHead::zeros(model.config().hidden_size, model.device())?;
        let pi_opt = AdamW::new(crate::etpo::trainer::named(model.adapter_vars(POLICY)), cfg.policy_optim)?;
        let head_vars = ["w", "b"].into_iter().map(String::from).zip(value_head.vars()).collect();
        let value_opt = AdamW::new(head_vars, cfg.value_optim)?;
        Ok(PpoTrainer { cfg, pi_opt, value_opt, value_head, updates: 0 })
    }

    /// The configuration.
    pub fn config(&self) -> &PpoConfig {
        &self.cfg
    }

    /// Updates done so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// `V(s)` from base hidden states `[N, H]`.
    fn values(&self, features: &Tensor) -> Result<Tensor, TrainError> {
        Ok(self.value_head.values(features)?)
    }

    /// One PPO-KL update on `batch` (transitions sampled by the current policy). `q_loss` of the
    /// returned metrics is the value head's loss; `kl` and `entropy` are of the policy before
    /// the update.
    pub fn update(&mut self, model: &Llama, batch: &[Transition]) -> Result<UpdateMetrics, TrainError> {
        let (batch, spans, mut m) = crate::etpo::trainer::prepare_update(batch)?;
        let (batch, total_tokens) = (&batch, m.action_tokens);
        let cfg = self.cfg.clone();
        let mb = cfg.micro_batch;

        let start = Instant::now();
        let rollout = self.rollout(model, batch, &spans, &mut m)?;
        m.times.targets_s = start.elapsed().as_secs_f64();

        // Value head: regression on the TD targets, one step per epoch (features are constants).
        let start = Instant::now();
        let value_vars = self.value_opt.vars().to_vec();
        for epoch in 0..cfg.epochs {
            let mut grads = vec![None; value_vars.len()];
            let mut loss_sum = 0.0;
            for (ci, feats) in rollout.state_features.iter().enumerate() {
                let lo = ci * mb;
                let n = feats.dim(0)?;
                let tg = Tensor::from_slice(&rollout.value_targets[lo..lo + n], n, model.device())?;
                let loss = ((self.values(feats)? - tg)?.sqr()?.sum_all()? / batch.len() as f64)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                accumulate_grads(&mut grads, &value_vars, &model.backward(&loss)?)?;
            }
            if epoch == 0 {
                m.q_loss = loss_sum;
                m.q_grad_norm = self.value_opt.step(&grads)?;
            } else {
                self.value_opt.step(&grads)?;
            }
        }
        m.times.q_step_s = start.elapsed().as_secs_f64();

        // Policy: clipped surrogate, `epochs` full-batch steps.
        let start = Instant::now();
        let pi_vars = self.pi_opt.vars().to_vec();
        let (mut clipped, mut approx_kl) = (0f64, 0f64);
        for epoch in 0..cfg.epochs {
            let mut grads = vec![None; pi_vars.len()];
            let mut loss_sum = 0.0;
            let mut row0 = 0;
            for (ci, chunk) in spans.chunks(mb).enumerate() {
                let ts = &batch[ci * mb..ci * mb + chunk.len()];
                let rows: usize = chunk.iter().map(|s| s.len).sum();
                let tokens = token_tensor(model, crate::etpo::trainer::chunk_actions(ts))?;
                // The action's advantage repeated over its tokens.
                let adv: Vec<f32> = ts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, t)| std::iter::repeat_n(rollout.advantages[ci * mb + i], t.action.len()))
                    .collect();
                let adv = Tensor::from_vec(adv, rows, model.device())?;
                let logits = model.logits(&hidden_rows(model, chunk, Some(POLICY), true, cfg.share_prefixes)?)?;
                // Fused: no [rows × vocabulary] log-softmax is kept for the backward pass.
                let logp = crate::ops::taken_log_softmax(&logits, &tokens.to_vec1::<u32>()?)?;
                let log_ratio = (&logp - &rollout.old_logp[ci])?;
                let ratio = log_ratio.exp()?;
                let unclipped = (&ratio * &adv)?;
                let clipped_ratio = ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip)?;
                let surrogate = unclipped.minimum(&(clipped_ratio * &adv)?)?;
                let loss = (surrogate.sum_all()?.neg()? / total_tokens as f64)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                if epoch == cfg.epochs - 1 {
                    let r = ratio.to_vec1::<f32>()?;
                    clipped += r.iter().filter(|&&x| (x as f64 - 1.0).abs() > cfg.clip).count() as f64;
                    approx_kl += log_ratio.neg()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
                accumulate_grads(&mut grads, &pi_vars, &model.backward(&loss)?)?;
                row0 += rows;
            }
            assert_eq!(row0, total_tokens);
            let norm = self.pi_opt.step(&grads)?;
            if epoch == 0 {
                m.policy_loss = loss_sum;
                m.policy_grad_norm = norm;
            }
        }
        m.clip_fraction = Some(clipped / total_tokens as f64);
        m.approx_kl_old_new = Some(approx_kl / total_tokens as f64);
        m.times.policy_step_s = start.elapsed().as_secs_f64();
        self.updates += 1;
        Ok(m)
    }

    /// Log-probabilities of the sampling policy and ρ, the KL-shaped rewards, values and
    /// advantages.
    fn rollout(
        &self,
        model: &Llama,
        batch: &[Transition],
        spans: &[RowSpan],
        m: &mut UpdateMetrics,
    ) -> Result<Rollout, TrainError> {
        let cfg = &self.cfg;
        let mb = cfg.micro_batch;
        let mut old_logp = Vec::new();
        let mut state_features = Vec::new();
        let mut action_log_ratio = Vec::with_capacity(batch.len());
        let (mut kl_sum, mut ent_sum) = (0f64, 0f64);
        for (ci, chunk) in spans.chunks(mb).enumerate() {
            let ts = &batch[ci * mb..ci * mb + chunk.len()];
            let tokens = token_tensor(model, crate::etpo::trainer::chunk_actions(ts))?;
            let base_hidden = hidden_rows(model, chunk, None, false, cfg.share_prefixes)?;
            let ref_lp = logp_from_hidden(model, &base_hidden)?;
            let pol_lp = logp_from_hidden(model, &hidden_rows(model, chunk, Some(POLICY), false, cfg.share_prefixes)?)?;
            kl_sum += math::kl_rows(&pol_lp, &ref_lp)?.sum_all()?.to_scalar::<f32>()? as f64;
            ent_sum += math::entropy_rows(&pol_lp)?.sum_all()?.to_scalar::<f32>()? as f64;
            let pol_taken = math::taken_values(&pol_lp, &tokens)?;
            let ref_taken = math::taken_values(&ref_lp, &tokens)?;
            let diff = (&pol_taken - &ref_taken)?.to_vec1::<f32>()?;
            // The first row of each action span is the state's last token.
            let mut first_rows = Vec::with_capacity(chunk.len());
            let mut row = 0;
            for (t, s) in ts.iter().zip(chunk) {
                first_rows.push(row as u32);
                action_log_ratio.push(diff[row..row + t.action.len()].iter().map(|&x| x as f64).sum::<f64>());
                row += s.len;
            }
            let idx = Tensor::from_vec(first_rows, chunk.len(), model.device())?;
            state_features.push(base_hidden.index_select(&idx, 0)?.detach());
            old_logp.push(pol_taken.detach());
        }
        let total_tokens = m.action_tokens as f64;
        m.kl = kl_sum / total_tokens;
        m.entropy = ent_sum / total_tokens;

        // V(s) of batch states; next states that are not batch states get a base forward pass.
        let mut state_values: Vec<f64> = Vec::with_capacity(batch.len());
        for f in &state_features {
            state_values.extend(self.values(f)?.to_vec1::<f32>()?.into_iter().map(f64::from));
        }
        let mut known: HashMap<&[u32], f64> = HashMap::new();
        for (t, v) in batch.iter().zip(&state_values) {
            known.entry(&t.state).or_insert(*v);
        }
        let mut extra: Vec<&[u32]> = Vec::new();
        for t in batch {
            if let Some(s) = &t.next_state {
                if !known.contains_key(s.as_slice()) && !extra.contains(&s.as_slice()) {
                    extra.push(s);
                }
            }
        }
        let extra_spans: Vec<RowSpan> = extra.iter().map(|s| RowSpan::state(s)).collect();
        let mut extra_values = Vec::new();
        for chunk in extra_spans.chunks(mb) {
            let feats = hidden_rows(model, chunk, None, false, cfg.share_prefixes)?.detach();
            extra_values.extend(self.values(&feats)?.to_vec1::<f32>()?.into_iter().map(f64::from));
        }
        for (s, v) in extra.iter().zip(extra_values) {
            known.insert(s, v);
        }

        let mut deltas = Vec::with_capacity(batch.len());
        let mut shaped_sum = 0.0;
        for (i, t) in batch.iter().enumerate() {
            let shaped = t.reward - cfg.beta * action_log_ratio[i];
            shaped_sum += shaped;
            let next = t.next_state.as_ref().map_or(0.0, |s| known[s.as_slice()]);
            deltas.push(shaped + cfg.gamma * next - state_values[i]);
        }
        let mut advantages = gae(batch, &deltas, cfg.gamma, cfg.gae_lambda);
        let value_targets: Vec<f32> = advantages.iter().zip(&state_values).map(|(a, v)| (a + v) as f32).collect();
        m.q_target_mean = shaped_sum / batch.len() as f64;
        m.q_taken_mean = state_values.iter().sum::<f64>() / batch.len() as f64;
        m.start_value_mean = m.q_taken_mean;
        if cfg.normalize_advantages && advantages.len() > 1 {
            let n = advantages.len() as f64;
            let mean = advantages.iter().sum::<f64>() / n;
            let std = (advantages.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n).sqrt();
            for a in &mut advantages {
                *a = (*a - mean) / (std + 1e-8);
            }
        }
        Ok(Rollout {
            old_logp,
            state_features,
            advantages: advantages.into_iter().map(|a| a as f32).collect(),
            value_targets,
        })
    }

    /// Writes the policy adapter, the value head, both optimisers' states, the counters, the
    /// configuration and the caller's `extra` state to one file, atomically.
    pub fn save_checkpoint(&self, model: &Llama, path: &Path, extra: &serde_json::Value) -> Result<(), TrainError> {
        let mut tensors = checkpoint::var_tensors(&format!("adapter.{POLICY}"), &model.adapter_vars(POLICY));
        tensors.extend(checkpoint::var_tensors("value_head", &self.value_head.vars()));
        tensors.extend(checkpoint::optim_tensors("optim.policy", &self.pi_opt));
        tensors.extend(checkpoint::optim_tensors("optim.value", &self.value_opt));
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("config".to_string(), crate::etpo::trainer::json(&self.cfg)?);
        meta.insert("updates".to_string(), self.updates.to_string());
        meta.insert("policy_steps".to_string(), self.pi_opt.steps().to_string());
        meta.insert("value_steps".to_string(), self.value_opt.steps().to_string());
        meta.insert("extra".to_string(), crate::etpo::trainer::json(extra)?);
        checkpoint::write_atomic(path, &tensors, meta)
    }

    /// Restores a checkpoint written by [`PpoTrainer::save_checkpoint`]; returns the caller's
    /// `extra` state.
    pub fn load_checkpoint(&mut self, model: &Llama, path: &Path) -> Result<serde_json::Value, TrainError> {
        let (tensors, meta) = checkpoint::read(path, model.device())?;
        checkpoint::check_format(path, &meta, FORMAT, "a PPO-KL trainer checkpoint")?;
        checkpoint::restore_vars(path, &tensors, &format!("adapter.{POLICY}"), &model.adapter_vars(POLICY))?;
        checkpoint::restore_vars(path, &tensors, "value_head", &self.value_head.vars())?;
        let pi_steps: u64 = checkpoint::meta_json(path, &meta, "policy_steps")?;
        let value_steps: u64 = checkpoint::meta_json(path, &meta, "value_steps")?;
        checkpoint::restore_optim(path, &tensors, "optim.policy", &mut self.pi_opt, pi_steps)?;
        checkpoint::restore_optim(path, &tensors, "optim.value", &mut self.value_opt, value_steps)?;
        self.updates = checkpoint::meta_json(path, &meta, "updates")?;
        checkpoint::meta_json(path, &meta, "extra")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_training_block_reaches_ppo_and_grpo_alike() {
        let t = envspec::TrainingOverrides {
            lr: Some(5e-4),
            grad_clip: Some(0.5),
            beta: Some(0.2),
            gamma: Some(0.9),
            epochs: Some(3),
            clip_eps: Some(0.1),
            lora_rank: Some(4),
            lora_alpha: Some(8.0),
            polyak: Some(0.7), // ETPO's: ignored here
            ..Default::default()
        };
        let mut ppo = PpoConfig::default();
        ppo.apply_spec(&t);
        let mut grpo = crate::grpo::GrpoConfig::default();
        grpo.apply_spec(&t);
        let read = |o: &AdamWConfig, beta, gamma, epochs, clip, rank, alpha| {
            (o.lr, o.max_grad_norm, beta, gamma, epochs, clip, rank, alpha)
        };
        let want = (5e-4, Some(0.5), 0.2, 0.9, 3, 0.1, 4, 8.0);
        let p = &ppo;
        assert_eq!(read(&p.policy_optim, p.beta, p.gamma, p.epochs, p.clip, p.lora_rank, p.lora_alpha), want);
        let g = &grpo;
        assert_eq!(read(&g.policy_optim, g.beta, g.gamma, g.epochs, g.clip, g.lora_rank, g.lora_alpha), want);
        // The value head's optimiser is PPO's own: the block's `lr` is the policy's.
        assert_eq!(ppo.value_optim, PpoConfig::default().value_optim);
        assert_eq!(ppo.validate(), Ok(()));
        ppo.clip = 1.0;
        assert_eq!(ppo.validate(), Err("clip must be in (0, 1), got 1".into()));
        grpo.gamma = 1.5;
        assert_eq!(grpo.validate(), Err("gamma must be in [0, 1], got 1.5".into()));
    }

    fn step(state: u32, next: Option<u32>) -> Transition {
        Transition { state: vec![state], action: vec![1], reward: 0.0, next_state: next.map(|s| vec![s]), group: None }
    }

    #[test]
    fn gae_by_hand() {
        // Episode 10 → 11 → 12 → end, given out of order, plus a one-step episode 20 → end and
        // a transition whose next state (31) is not in the batch.
        let batch = [step(12, None), step(10, Some(11)), step(20, None), step(11, Some(12)), step(30, Some(31))];
        let deltas = [0.5, 1.0, -2.0, 0.25, 3.0];
        let (g, l) = (0.9, 0.5);
        let a = gae(&batch, &deltas, g, l);
        let a12 = 0.5;
        let a11 = 0.25 + g * l * a12;
        let a10 = 1.0 + g * l * a11;
        let want = [a12, a10, -2.0, a11, 3.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {want:?}");
        }
        // λ = 0 is the one-step TD advantage; λ = 1, γ = 1 the sum of the TD errors ahead.
        assert_eq!(gae(&batch, &deltas, g, 0.0), deltas.to_vec());
        let mc = gae(&batch, &deltas, 1.0, 1.0);
        assert!((mc[1] - (1.0 + 0.25 + 0.5)).abs() < 1e-12);
    }

    #[test]
    fn gae_averages_shared_successors_and_cuts_cycles() {
        // Two transitions from state 2 (two samples); state 1 leads to 2.
        let batch = [step(1, Some(2)), step(2, None), step(2, None)];
        let a = gae(&batch, &[0.0, 1.0, 3.0], 1.0, 1.0);
        assert_eq!(a, vec![2.0, 1.0, 3.0]);
        // 5 → 6 → 5: finite, each sees the other once at most.
        let cyc = [step(5, Some(6)), step(6, Some(5))];
        let a = gae(&cyc, &[1.0, 1.0], 1.0, 1.0);
        assert!(a.iter().all(|x| x.is_finite() && *x >= 1.0 && *x <= 2.0), "{a:?}");
        // A self-loop.
        assert_eq!(gae(&[step(7, Some(7))], &[1.5], 1.0, 1.0), vec![1.5]);
    }
}
