//! GRPO, the group-relative baseline of DeepSeekMath (Shao et al. 2024), as TRL and verl run it.
//!
//! - **Groups.** The run loop steps `group_size` (G) environments of each seed side by side
//!   from the same first state, and the transitions they take at the same step of their
//!   episodes form a group ([`Transition::group`]): at the first state these are G samples of
//!   one state, as in TRL and verl; at later steps G rollouts of the same task at the same
//!   depth, as verl-agent's trajectory-level groups. Transitions without a group key are grouped
//!   by identical state (token ids). A group of one gets advantage 0: it has no comparison, and
//!   GRPO has no critic to supply one (its tokens still feel the KL term).
//! - **What is compared.** The return of the step, `G_t = r_t + γ·G_{t+1}` along the episode
//!   inside the batch ([`returns`]), so that a reward reaches the steps before it (in one-step
//!   episodes this is the reward, GRPO's outcome reward).
//! - **Advantage** of each member: `(G − mean_g) / (std_g + ε)`, std the sample standard
//!   deviation of the group as in TRL; without the division (`scale_rewards: false`) it is
//!   Dr. GRPO's (Liu et al. 2025). The same advantage for every token of the action.
//! - **Loss per token**: the clipped surrogate `−min(r_j A, clip(r_j, 1−ε, 1+ε) A)` with
//!   `r_j = π(w^j|…)/π_old(w^j|…)`, plus `β·k3` with the k3 estimator of KL(π‖ρ) on the taken
//!   token, `k3 = exp(log ρ − log π) − (log ρ − log π) − 1` (DeepSeekMath, Eq. 4); averaged over
//!   all action tokens of the batch (token-level averaging, as DAPO and TRL's default).
//!
//! The policy is the [`POLICY`] adapter set, as for ETPO and PPO-KL; ρ is the base model.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::etpo::batch::{accumulate_grads, hidden_rows, logp_from_hidden, token_tensor};
use crate::etpo::{checkpoint, math, AdamW, AdamWConfig, TrainError, Transition, UpdateMetrics, POLICY};
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::ppo::{validate_clipped, ClippedPolicyKeys};

const FORMAT: &str = "etpo-grpo-checkpoint/1";

/// Every GRPO hyper-parameter (keys of `--set`; unknown keys are rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// β: weight of the KL(π‖ρ) loss term (TRL's default 0.04).
    pub beta: f64,
    /// γ: discount of the returns compared within a group.
    pub gamma: f64,
    /// ε of the clipped ratio.
    pub clip: f64,
    /// Optimisation epochs over each batch (TRL's `num_iterations`); with 1 the ratio is 1 and
    /// the clip never acts.
    pub epochs: usize,
    /// Divide by the group's standard deviation (GRPO); `false` is Dr. GRPO.
    pub scale_rewards: bool,
    /// G: environments of each seed stepped side by side, whose actions at the same step are
    /// compared (TRL's `num_generations`, 8 there too). They share the seed's step budget.
    pub group_size: u32,
    /// Optimiser of the policy's adapter.
    pub policy_optim: AdamWConfig,
    /// Sequences per forward pass (gradients are accumulated over micro-batches).
    pub micro_batch: usize,
    /// Run a state prompt shared by several actions of a micro-batch once.
    pub share_prefixes: bool,
    /// LoRA rank of the policy's adapter set.
    pub lora_rank: usize,
    /// LoRA scaling α.
    pub lora_alpha: f64,
    /// Seed of the adapter initialisation.
    pub seed: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            beta: 0.04,
            gamma: 0.99,
            clip: 0.2,
            epochs: 2,
            scale_rewards: true,
            group_size: 8,
            policy_optim: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() },
            micro_batch: 4,
            share_prefixes: true,
            lora_rank: 8,
            lora_alpha: 16.0,
            seed: 0,
        }
    }
}

impl GrpoConfig {
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

    /// Sets one hyper-parameter from a CLI `KEY=VALUE` override.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let next = crate::etpo::config::set_key(self, key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Check ranges; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        validate_clipped(self.beta, self.gamma, self.clip)?;
        if self.epochs == 0 || self.micro_batch == 0 || self.lora_rank == 0 || self.group_size == 0 {
            return Err("epochs, micro_batch, lora_rank and group_size must be at least 1".into());
        }
        if self.policy_optim.lr.is_nan() || self.policy_optim.lr <= 0.0 {
            return Err(format!("policy_optim.lr must be positive, got {}", self.policy_optim.lr));
        }
        Ok(())
    }
}

/// The discounted return `G_t = r_t + γ·G_{t+1}` of every transition, following episodes through
/// the batch as [`crate::ppo::gae`] does (an episode that continues past the batch is cut there).
pub fn returns(batch: &[Transition], gamma: f64) -> Vec<f64> {
    let rewards: Vec<f64> = batch.iter().map(|t| t.reward).collect();
    crate::ppo::gae(batch, &rewards, gamma, 1.0)
}

/// What a transition is compared with: its [`Transition::group`] key, else its state.
#[derive(Debug, PartialEq, Eq, Hash)]
enum GroupKey<'a> {
    Key(u64),
    State(&'a [u32]),
}

/// The groups of `batch`, as lists of indices (see [`GroupKey`]).
fn groups(batch: &[Transition]) -> Vec<Vec<usize>> {
    let mut groups: HashMap<GroupKey<'_>, Vec<usize>> = HashMap::new();
    for (i, t) in batch.iter().enumerate() {
        let key = t.group.map_or(GroupKey::State(t.state.as_slice()), GroupKey::Key);
        groups.entry(key).or_default().push(i);
    }
    groups.into_values().collect()
}

/// Group-relative advantages of `values` (one per transition): transitions with the same
/// [`Transition::group`] key (without one, the same state) form a group; each gets
/// `(v − mean) / (std + 1e-4)` with the group's sample standard deviation (`scale: false`:
/// `v − mean`). A group of one gets 0.
pub fn group_advantages(batch: &[Transition], values: &[f64], scale: bool) -> Vec<f64> {
    let mut adv = vec![0.0; batch.len()];
    for members in &groups(batch) {
        let n = members.len();
        if n < 2 {
            continue;
        }
        let mean = members.iter().map(|&i| values[i]).sum::<f64>() / n as f64;
        let var = members.iter().map(|&i| (values[i] - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let denom = if scale { var.sqrt() + 1e-4 } else { 1.0 };
        for &i in members {
            adv[i] = (values[i] - mean) / denom;
        }
    }
    adv
}

/// GRPO over a [`Llama`]: the [`POLICY`] adapter set and its optimiser.
pub struct GrpoTrainer {
    cfg: GrpoConfig,
    pi_opt: AdamW,
    updates: u64,
}

impl GrpoTrainer {
    /// Adds the [`POLICY`] adapter set to `model` (B = 0: π starts equal to ρ).
    pub fn new(model: &mut Llama, cfg: GrpoConfig) -> Result<GrpoTrainer, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        let lora = LoraConfig { rank: cfg.lora_rank, alpha: cfg.lora_alpha, ..LoraConfig::default() };
        model.add_adapter_seeded(POLICY, &lora, cfg.seed)?;
        let pi_opt = AdamW::new(crate::etpo::trainer::named(model.adapter_vars(POLICY)), cfg.policy_optim)?;
        Ok(GrpoTrainer { cfg, pi_opt, updates: 0 })
    }

    /// The configuration.
    pub fn config(&self) -> &GrpoConfig {
        &self.cfg
    }

    /// Updates done so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// One GRPO update on `batch` (transitions sampled by the current policy). The metrics'
    /// `q_target_mean` is the mean return, `q_taken_mean` the fraction of transitions in a group
    /// of two or more, `q_loss` the mean k3 KL term; `kl` and `entropy` are of the policy before
    /// the update.
    pub fn update(&mut self, model: &Llama, batch: &[Transition]) -> Result<UpdateMetrics, TrainError> {
        let (batch, spans, mut m) = crate::etpo::trainer::prepare_update(batch)?;
        let (batch, total_tokens) = (&batch, m.action_tokens);
        let cfg = self.cfg.clone();
        let mb = cfg.micro_batch;

        // Old and reference log-probabilities of the taken tokens, and the advantages.
        let start = Instant::now();
        let (mut old_logp, mut ref_logp) = (Vec::new(), Vec::new());
        let (mut kl_sum, mut ent_sum) = (0f64, 0f64);
        for (ci, chunk) in spans.chunks(mb).enumerate() {
            let ts = &batch[ci * mb..ci * mb + chunk.len()];
            let tokens = token_tensor(model, crate::etpo::trainer::chunk_actions(ts))?;
            let share = cfg.share_prefixes;
            let ref_lp = logp_from_hidden(model, &hidden_rows(model, chunk, None, false, share)?)?;
            let pol_lp = logp_from_hidden(model, &hidden_rows(model, chunk, Some(POLICY), false, share)?)?;
            kl_sum += math::kl_rows(&pol_lp, &ref_lp)?.sum_all()?.to_scalar::<f32>()? as f64;
            ent_sum += math::entropy_rows(&pol_lp)?.sum_all()?.to_scalar::<f32>()? as f64;
            old_logp.push(math::taken_values(&pol_lp, &tokens)?.detach());
            ref_logp.push(math::taken_values(&ref_lp, &tokens)?.detach());
        }
        m.kl = kl_sum / total_tokens as f64;
        m.entropy = ent_sum / total_tokens as f64;
        let returns = returns(batch, cfg.gamma);
        let advantages = group_advantages(batch, &returns, cfg.scale_rewards);
        m.q_target_mean = returns.iter().sum::<f64>() / batch.len() as f64;
        m.q_taken_mean =
            groups(batch).iter().filter(|g| g.len() > 1).map(Vec::len).sum::<usize>() as f64 / batch.len() as f64;
        m.times.targets_s = start.elapsed().as_secs_f64();

        // Policy: clipped surrogate plus β·k3, `epochs` full-batch steps.
        let start = Instant::now();
        let pi_vars = self.pi_opt.vars().to_vec();
        let (mut clipped, mut approx_kl) = (0f64, 0f64);
        for epoch in 0..cfg.epochs {
            let mut grads = vec![None; pi_vars.len()];
            let (mut loss_sum, mut k3_sum) = (0f64, 0f64);
            for (ci, chunk) in spans.chunks(mb).enumerate() {
                let ts = &batch[ci * mb..ci * mb + chunk.len()];
                let rows: usize = chunk.iter().map(|s| s.len).sum();
                let tokens = token_tensor(model, crate::etpo::trainer::chunk_actions(ts))?;
                let adv: Vec<f32> = ts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, t)| std::iter::repeat_n(advantages[ci * mb + i] as f32, t.action.len()))
                    .collect();
                let adv = Tensor::from_vec(adv, rows, model.device())?;
                let logits = model.logits(&hidden_rows(model, chunk, Some(POLICY), true, cfg.share_prefixes)?)?;
                // Fused: no [rows × vocabulary] log-softmax is kept for the backward pass.
                let logp = crate::ops::taken_log_softmax(&logits, &tokens.to_vec1::<u32>()?)?;
                let log_ratio = (&logp - &old_logp[ci])?;
                let ratio = log_ratio.exp()?;
                let surrogate = (&ratio * &adv)?.minimum(&(ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip)? * &adv)?)?;
                // k3 = exp(log ρ − log π) − (log ρ − log π) − 1 ≥ 0, an unbiased estimate of KL(π‖ρ).
                let d = (&ref_logp[ci] - &logp)?;
                let k3 = ((d.exp()? - &d)? - 1.0)?;
                let per_token = ((surrogate.neg()? + (&k3 * cfg.beta)?)?.sum_all()? / total_tokens as f64)?;
                loss_sum += per_token.to_scalar::<f32>()? as f64;
                k3_sum += k3.sum_all()?.to_scalar::<f32>()? as f64;
                if epoch + 1 == cfg.epochs {
                    let r = ratio.to_vec1::<f32>()?;
                    clipped += r.iter().filter(|&&x| (x as f64 - 1.0).abs() > cfg.clip).count() as f64;
                    approx_kl += log_ratio.neg()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
                accumulate_grads(&mut grads, &pi_vars, &model.backward(&per_token)?)?;
            }
            let norm = self.pi_opt.step(&grads)?;
            if epoch == 0 {
                m.policy_loss = loss_sum;
                m.policy_grad_norm = norm;
                m.q_loss = k3_sum / total_tokens as f64;
            }
        }
        m.clip_fraction = Some(clipped / total_tokens as f64);
        m.approx_kl_old_new = Some(approx_kl / total_tokens as f64);
        m.times.policy_step_s = start.elapsed().as_secs_f64();
        self.updates += 1;
        Ok(m)
    }

    /// Writes the policy adapter, the optimiser's state, the counters, the configuration and the
    /// caller's `extra` state to one file, atomically.
    pub fn save_checkpoint(&self, model: &Llama, path: &Path, extra: &serde_json::Value) -> Result<(), TrainError> {
        let mut tensors = checkpoint::var_tensors(&format!("adapter.{POLICY}"), &model.adapter_vars(POLICY));
        tensors.extend(checkpoint::optim_tensors("optim.policy", &self.pi_opt));
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("config".to_string(), crate::etpo::trainer::json(&self.cfg)?);
        meta.insert("updates".to_string(), self.updates.to_string());
        meta.insert("policy_steps".to_string(), self.pi_opt.steps().to_string());
        meta.insert("extra".to_string(), crate::etpo::trainer::json(extra)?);
        checkpoint::write_atomic(path, &tensors, meta)
    }

    /// Restores a checkpoint written by [`GrpoTrainer::save_checkpoint`]; returns the caller's
    /// `extra` state.
    pub fn load_checkpoint(&mut self, model: &Llama, path: &Path) -> Result<serde_json::Value, TrainError> {
        let (tensors, meta) = checkpoint::read(path, model.device())?;
        checkpoint::check_format(path, &meta, FORMAT, "a GRPO trainer checkpoint")?;
        checkpoint::restore_vars(path, &tensors, &format!("adapter.{POLICY}"), &model.adapter_vars(POLICY))?;
        let pi_steps: u64 = checkpoint::meta_json(path, &meta, "policy_steps")?;
        checkpoint::restore_optim(path, &tensors, "optim.policy", &mut self.pi_opt, pi_steps)?;
        self.updates = checkpoint::meta_json(path, &meta, "updates")?;
        checkpoint::meta_json(path, &meta, "extra")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(state: u32, reward: f64, next: Option<u32>) -> Transition {
        Transition { state: vec![state], action: vec![1], reward, next_state: next.map(|n| vec![n]), group: None }
    }

    #[test]
    fn group_advantages_by_hand() {
        // State 7: rewards 1, 0, 0, 1 (mean 0.5, sample std √(1/3) = 0.57735); state 8: one
        // transition (no comparison); state 9: 2 and 2 (std 0).
        let batch = [
            t(7, 1.0, None),
            t(7, 0.0, None),
            t(8, 5.0, None),
            t(7, 0.0, None),
            t(7, 1.0, None),
            t(9, 2.0, None),
            t(9, 2.0, None),
        ];
        let r: Vec<f64> = batch.iter().map(|t| t.reward).collect();
        let scaled = group_advantages(&batch, &r, true);
        let a = 0.5 / (1.0f64 / 3.0).sqrt();
        let expect = [a, -a, 0.0, -a, a, 0.0, 0.0];
        for (x, e) in scaled.iter().zip(expect) {
            assert!((x - e).abs() < 1e-3, "{scaled:?}");
        }
        let plain = group_advantages(&batch, &r, false);
        assert_eq!(plain, vec![0.5, -0.5, 0.0, -0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn group_keys_decide_the_groups_before_states() {
        // Key 3: states 1 and 2 with rewards 1 and 0 (different states, one group: ±0.5 without
        // the scale); key 4: state 1 alone (0, although another transition has state 1); no key:
        // the two of state 5 (2 and 0: ±1).
        let keyed = |state, reward, key| Transition { group: Some(key), ..t(state, reward, None) };
        let batch = [keyed(1, 1.0, 3), keyed(2, 0.0, 3), keyed(1, 9.0, 4), t(5, 2.0, None), t(5, 0.0, None)];
        let r: Vec<f64> = batch.iter().map(|t| t.reward).collect();
        assert_eq!(group_advantages(&batch, &r, false), vec![0.5, -0.5, 0.0, 1.0, -1.0]);
        // With the scale: each pair's sample std is |a − b|/√2, so ±1/√2 (up to the 1e-4).
        let scaled = group_advantages(&batch, &r, true);
        let a = 0.5 / (0.5f64).sqrt();
        for (x, e) in scaled.iter().zip([a, -a, 0.0, a, -a]) {
            assert!((x - e).abs() < 1e-3, "{scaled:?}");
        }
    }

    #[test]
    fn returns_follow_the_episode_through_the_batch() {
        // 1 → 2 → end: G = 0 + 0.5·3 = 1.5 and 3; a lone step keeps its reward.
        let batch = [t(1, 0.0, Some(2)), t(2, 3.0, None), t(5, -1.0, Some(6))];
        assert_eq!(returns(&batch, 0.5), vec![1.5, 3.0, -1.0]);
    }
}
