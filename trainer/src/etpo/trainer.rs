//! The ETPO trainer: Algorithm 1's update over LoRA adapter sets of one frozen base model.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::batch::{accumulate_grads, hidden_rows, logit_rows, logp_from_hidden, token_tensor, RowSpan};
use super::checkpoint;
use super::math;
use super::{AdamW, EtpoConfig, TrainError, Transition};
use crate::lora::LoraConfig;
use crate::model::Llama;
use crate::value_head::ValueHead;

/// Adapter set of the policy π_φ (generate with this one).
pub const POLICY: &str = "policy";
/// Adapter set of the soft Q-network Q_θ.
pub const Q: &str = "q";
/// Adapter set of the target Q-network Q_θ̄ (Polyak average of Q_θ).
pub const Q_TARGET: &str = "q_target";

const FORMAT: &str = "etpo-checkpoint/2";

/// Wall-clock seconds of the phases of one update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Forward passes of ρ, π and Q̄ and the soft Bellman targets (Eq. 6).
    pub targets_s: f64,
    /// Q-network forward, backward and optimiser step.
    pub q_step_s: f64,
    /// Policy forward, backward and optimiser step (with the Q read-out it needs).
    pub policy_step_s: f64,
    /// Polyak update of the target network.
    pub polyak_s: f64,
}

/// What one update measured. Losses are means over the batch's action tokens, taken before
/// the optimiser steps; `kl` and `entropy` are of the policy before the update.
///
/// PPO-KL fills the same record: `q_loss` is its value head's loss, `q_target_mean` the mean
/// KL-shaped reward, `q_taken_mean` the mean `V(s)`, and `times.q_step_s` the value head's
/// steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateMetrics {
    /// Mean squared (or Huber) error of Q on the taken tokens, plus the conservative term and
    /// the `q_reference_kl` term when they are set.
    pub q_loss: f64,
    /// Mean per-token KL(π ‖ target of Eq. 7).
    pub policy_loss: f64,
    /// Mean per-token KL(π‖ρ) at the action positions.
    pub kl: f64,
    /// Mean per-token entropy of π at the action positions.
    pub entropy: f64,
    /// ETPO only: mean per-token entropy of Eq. 7's target (`π* ∝ ρ·exp(Q/β)`; with a
    /// `reference_weight` τ below 1, `∝ ρ^τ·π_k^(1−τ)·exp(A/β)`) at the action positions, from
    /// the Q-network the policy step follows. Beside `entropy`: whether π moves
    /// because its target does.
    #[serde(default)]
    pub target_entropy: Option<f64>,
    /// ETPO only: mean per-token entropy of `∝ ρ·exp(Q/β)` (with the dueling read-out, the
    /// Q-network's own distribution π_Q) at the action positions: `target_entropy` when
    /// `reference_weight` is 1, and what the Q-network alone asks for otherwise.
    #[serde(default)]
    pub q_entropy: Option<f64>,
    /// ETPO only: mean per-token entropy of ρ at the same action positions, the yardstick of
    /// `target_entropy` and `q_entropy`: the contexts the policy visits change over a run, and
    /// ρ's entropy with them.
    #[serde(default)]
    pub reference_entropy: Option<f64>,
    /// Mean reward of the batch's transitions.
    pub batch_reward: f64,
    /// Mean soft Bellman target.
    pub q_target_mean: f64,
    /// Mean Q of the taken tokens.
    pub q_taken_mean: f64,
    /// Mean soft value `V(s)` of the batch's states (Eq. 6 bracket with the target network);
    /// PPO-KL: its value head's mean `V(s)`.
    #[serde(default)]
    pub start_value_mean: f64,
    /// ETPO only: mean over action rows of the target network's advantage of the token taken,
    /// `Q̄(c, w) − β·log E_ρ[exp(Q̄(c,·)/β)]` (dueling: `β·log(π_Q̄(w|c)/ρ(w|c))`). Negative
    /// means the Q-network has come to prefer tokens the policy does not take.
    #[serde(default)]
    pub q_taken_log_ratio_mean: Option<f64>,
    /// Gradient norms before clipping (of the first epoch).
    pub q_grad_norm: f64,
    pub policy_grad_norm: f64,
    /// Action tokens in the batch.
    pub action_tokens: usize,
    /// Number of transitions.
    pub transitions: usize,
    /// ETPO only: transitions replayed from the data buffer beside them.
    #[serde(default)]
    pub replayed: usize,
    /// ETPO only: mean per-token KL(π_before‖π_after) over the mini-batch's action rows after
    /// the policy step (and its trust region), and the fraction of the step kept (1: all).
    #[serde(default)]
    pub policy_step_kl: Option<f64>,
    #[serde(default)]
    pub policy_step_scale: Option<f64>,
    /// ETPO only: the trust region's KL checks, each a forward pass of π over the mini-batch
    /// (1: the whole step was inside the region).
    #[serde(default)]
    pub policy_step_checks: Option<usize>,
    /// ETPO only: the trust region this update's step was held to
    /// ([`EtpoConfig::policy_max_kl_at`]).
    #[serde(default)]
    pub policy_step_max_kl: Option<f64>,
    /// ETPO only: the β this update ran with ([`EtpoConfig::beta_at`]).
    #[serde(default)]
    pub beta: Option<f64>,
    /// ETPO only: the weight τ of ρ in the policy target's prior this update ran with
    /// ([`EtpoConfig::reference_weight_at`]).
    #[serde(default)]
    pub reference_weight: Option<f64>,
    /// PPO-KL only: fraction of action tokens whose ratio left the clip range (last epoch).
    pub clip_fraction: Option<f64>,
    /// PPO-KL only: mean per-token `log π_old − log π_new` over the taken tokens (last epoch).
    pub approx_kl_old_new: Option<f64>,
    /// Wall-clock time of the phases.
    pub times: PhaseTimes,
}

/// ETPO over a [`Llama`]: owns the optimisers; the networks are the model's adapter sets
/// [`POLICY`], [`Q`] and [`Q_TARGET`], and ρ is the model without adapter.
///
/// The model is passed to each call rather than held, so the caller can generate with
/// `adapter = Some(POLICY)` between updates.
pub struct EtpoTrainer {
    cfg: EtpoConfig,
    q_opt: AdamW,
    /// The Q-network's value head has its own optimiser (its own learning rate).
    head_opt: AdamW,
    pi_opt: AdamW,
    /// Value heads of Q_θ and Q̄ (read by [`math::QReadout::Dueling`]; kept at zero otherwise).
    q_head: ValueHead,
    q_target_head: ValueHead,
    /// Algorithm 1's data buffer D: past transitions, oldest first, at most `replay_capacity`.
    replay: std::collections::VecDeque<Transition>,
    /// Seed of the replay sampler (the configuration's at creation; restored from checkpoints).
    replay_seed: u64,
    updates: u64,
}

/// One soft Q-network: an adapter set of the model and its value head.
#[derive(Clone, Copy)]
struct QNet<'a> {
    adapter: &'static str,
    head: &'a ValueHead,
}

impl EtpoTrainer {
    /// Adds the three adapter sets to `model` (π and Q fresh with B = 0, so both start equal to
    /// ρ; Q̄ a copy of Q), the Q-networks' value heads (at zero) and the optimisers. Fails if any
    /// of the names exists already.
    pub fn new(model: &mut Llama, cfg: EtpoConfig) -> Result<EtpoTrainer, TrainError> {
        cfg.validate().map_err(TrainError::Config)?;
        let lora = lora_config(&cfg);
        model.add_adapter_seeded(POLICY, &lora, cfg.seed)?;
        model.add_adapter_seeded(Q, &lora, cfg.seed.wrapping_add(1))?;
        model.copy_adapter(Q, Q_TARGET)?;
        let hidden = model.config().hidden_size;
        let q_head = ValueHead::zeros(hidden, model.device())?;
        let q_target_head = ValueHead::zeros(hidden, model.device())?;
        let q_opt = AdamW::new(named(model.adapter_vars(Q)), cfg.q_optim)?;
        let head_opt = AdamW::new(named(q_head.vars()), cfg.value_head_optim)?;
        let pi_opt = AdamW::new(named(model.adapter_vars(POLICY)), cfg.policy_optim)?;
        let replay = std::collections::VecDeque::new();
        let replay_seed = cfg.seed;
        Ok(EtpoTrainer { cfg, q_opt, head_opt, pi_opt, q_head, q_target_head, replay, replay_seed, updates: 0 })
    }

    fn q_net(&self) -> QNet<'_> {
        QNet { adapter: Q, head: &self.q_head }
    }

    fn q_target_net(&self) -> QNet<'_> {
        QNet { adapter: Q_TARGET, head: &self.q_target_head }
    }

    /// The configuration.
    pub fn config(&self) -> &EtpoConfig {
        &self.cfg
    }

    /// Updates done so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Transitions in the data buffer D.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// One update of Algorithm 1 on `batch`, the newly collected transitions: the mini-batch is
    /// `batch` plus `replay_sample` transitions drawn from the data buffer D of earlier ones
    /// (soft Q-learning is off-policy: Eq. 6's targets use the current π whoever sampled the
    /// action); soft Bellman targets (Eq. 6) from π, Q̄ and ρ; `q_epochs` gradient steps of Q on
    /// the squared error against them; `policy_epochs` steps of π on the KL of Eq. 7 against the
    /// (updated) Q-network; the Polyak update of Q̄; then `batch` joins D.
    ///
    /// `batch_reward`, `transitions` and `action_tokens` of the metrics describe `batch`; the
    /// losses are over the whole mini-batch.
    ///
    /// Memory: no `[action tokens × vocabulary]` tensor outlives its micro-batch, so the peak
    /// grows with the mini-batch's tokens times the model's width, not times its vocabulary
    /// (`trainer/tests/update_memory.rs`). Between phases the update keeps ρ's log-probability
    /// of each token taken (all the dueling Q loss needs of ρ) and the final hidden states of
    /// ρ, of π before the step and of the Q-network after its steps; the output layer is
    /// frozen, so one product turns them back into the distributions Eq. 7's target, the
    /// mixed prior and the trust region read.
    pub fn update(&mut self, model: &Llama, batch: &[Transition]) -> Result<UpdateMetrics, TrainError> {
        validate_batch(batch)?;
        let fresh = batch;
        let mut minibatch = fresh.to_vec();
        minibatch.extend(self.replay_sample());
        let (batch, spans, mut m) = prepare_update(&minibatch)?;
        let total_tokens = m.action_tokens;
        let batch = &batch;
        let cfg = self.cfg.at_update(self.updates);
        let mb = cfg.micro_batch;

        // ---- Targets (Eq. 6): soft values of every action context and of the next states.
        let start = Instant::now();
        let phase = compute_targets(model, batch, &spans, &cfg, self.q_target_net())?;
        let (targets, ref_logp_taken) = (phase.targets, phase.ref_logp_taken);
        let (ref_hidden, policy_hidden) = (phase.ref_hidden, phase.policy_hidden);
        m.kl = phase.kl_sum / total_tokens as f64;
        m.entropy = phase.entropy_sum / total_tokens as f64;
        m.reference_entropy = Some(phase.reference_entropy_sum / total_tokens as f64);
        m.q_target_mean = targets.iter().map(|&x| x as f64).sum::<f64>() / total_tokens as f64;
        m.start_value_mean = phase.start_value_mean;
        m.beta = Some(cfg.beta);
        m.reference_weight = Some(cfg.reference_weight);
        m.q_taken_log_ratio_mean = Some(phase.taken_log_ratio_mean);
        m.times.targets_s = start.elapsed().as_secs_f64();

        // ---- Q steps: θ ← θ − α ∇ mean (q − q_targ)², the targets held fixed.
        let start = Instant::now();
        let q_vars: Vec<_> = self.q_opt.vars().iter().chain(self.head_opt.vars()).cloned().collect();
        let n_adapter = self.q_opt.vars().len();
        // The Q-network's final hidden states at every row, from the last Q epoch's pass when
        // `policy_uses_pre_step_q`, else read after the Q steps: Eq. 7's target comes from them.
        let mut q_hidden: Vec<Tensor> = Vec::new();
        for epoch in 0..cfg.q_epochs {
            let mut grads: Vec<Option<Tensor>> = vec![None; q_vars.len()];
            let (mut row0, mut q_taken_sum, mut loss_sum) = (0usize, 0f64, 0f64);
            let keep_hidden = cfg.policy_uses_pre_step_q && epoch + 1 == cfg.q_epochs;
            for (ci, chunk) in spans.chunks(mb).enumerate() {
                let rows: usize = chunk.iter().map(|s| s.len).sum();
                let tokens = token_tensor(model, chunk_actions(&batch[ci * mb..ci * mb + chunk.len()]))?;
                let tg = Tensor::from_slice(&targets[row0..row0 + rows], rows, model.device())?;
                let reference = Reference { logp_taken: &ref_logp_taken[ci], hidden: &ref_hidden[ci] };
                let q_step = q_loss_chunk(model, chunk, &tokens, &tg, reference, &cfg, self.q_net(), keep_hidden)?;
                let loss = (q_step.loss * (rows as f64 / total_tokens as f64))?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                q_taken_sum += q_step.taken.sum_all()?.to_scalar::<f32>()? as f64;
                accumulate_grads(&mut grads, &q_vars, &model.backward(&loss)?)?;
                q_hidden.extend(q_step.hidden);
                row0 += rows;
            }
            let norm = self.q_opt.step(&grads[..n_adapter])?;
            if cfg.q_readout == math::QReadout::Dueling {
                self.head_opt.step(&grads[n_adapter..])?;
            }
            if epoch == 0 {
                m.q_loss = loss_sum;
                m.q_taken_mean = q_taken_sum / total_tokens as f64;
                m.q_grad_norm = norm;
            }
        }
        m.times.q_step_s = start.elapsed().as_secs_f64();

        // ---- Policy steps (Eq. 7): φ ← φ − α ∇ mean KL(π ‖ target(Q_θ)).
        let start = Instant::now();
        let pi_vars = self.pi_opt.vars().to_vec();
        let max_kl = cfg.policy_max_kl;
        // The trust region moves the adapter back towards these weights.
        let pi_before = match max_kl {
            Some(_) => pi_vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        if q_hidden.is_empty() {
            for chunk in spans.chunks(mb) {
                q_hidden.push(hidden_rows(model, chunk, Some(Q), false, cfg.share_prefixes)?);
            }
        }
        for epoch in 0..cfg.policy_epochs {
            let mut grads: Vec<Option<Tensor>> = vec![None; pi_vars.len()];
            let mut loss_sum = 0f64;
            let (mut target_entropy_sum, mut q_entropy_sum) = (0f64, 0f64);
            for (ci, chunk) in spans.chunks(mb).enumerate() {
                // The Q-network does not move during the policy steps: every epoch regresses on
                // the same target, read again from the kept hidden states.
                let eq7 = math::policy_target_from_q_logits(&model.logits(&q_hidden[ci])?, cfg.q_readout, cfg.beta)?;
                let target = if cfg.reference_weight < 1.0 {
                    let ref_logp = logp_from_hidden(model, &ref_hidden[ci])?;
                    let previous = logp_from_hidden(model, &policy_hidden[ci])?;
                    math::prior_mixed_target_logp(&eq7, &ref_logp, &previous, cfg.reference_weight)?
                } else {
                    eq7.clone()
                };
                if epoch == 0 {
                    q_entropy_sum += math::entropy_rows(&eq7)?.sum_all()?.to_scalar::<f32>()? as f64;
                    target_entropy_sum += math::entropy_rows(&target)?.sum_all()?.to_scalar::<f32>()? as f64;
                }
                let loss = (policy_loss_chunk(model, chunk, &target, &cfg)? / total_tokens as f64)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                accumulate_grads(&mut grads, &pi_vars, &model.backward(&loss)?)?;
            }
            let norm = self.pi_opt.step(&grads)?;
            if epoch == 0 {
                m.policy_loss = loss_sum;
                m.policy_grad_norm = norm;
                m.target_entropy = Some(target_entropy_sum / total_tokens as f64);
                m.q_entropy = Some(q_entropy_sum / total_tokens as f64);
            }
        }
        if let Some(max_kl) = max_kl {
            let step = trust_region(model, &spans, &policy_hidden, &pi_vars, &pi_before, max_kl, &cfg)?;
            m.policy_step_kl = Some(step.kl / total_tokens as f64);
            m.policy_step_scale = Some(step.scale);
            m.policy_step_checks = Some(step.checks);
            m.policy_step_max_kl = Some(max_kl);
        }
        m.times.policy_step_s = start.elapsed().as_secs_f64();

        // ---- θ̄ ← λθ̄ + (1−λ)θ (adapter and value head).
        let start = Instant::now();
        model.polyak_update(Q_TARGET, Q, cfg.polyak)?;
        self.q_target_head.polyak_from(&self.q_head, cfg.polyak)?;
        m.times.polyak_s = start.elapsed().as_secs_f64();
        self.updates += 1;
        self.remember(fresh);
        m.transitions = fresh.len();
        m.action_tokens = fresh.iter().map(|t| t.action.len()).sum();
        m.batch_reward = fresh.iter().map(|t| t.reward).sum::<f64>() / fresh.len() as f64;
        m.replayed = minibatch.len() - fresh.len();
        Ok(m)
    }

    /// `replay_sample` transitions of D, without replacement, drawn by a generator seeded with
    /// the trainer's seed and update count (so a resumed run draws the same ones).
    fn replay_sample(&self) -> Vec<Transition> {
        let n = self.cfg.replay_sample.min(self.replay.len());
        let mut rng = SplitMix(self.replay_seed ^ self.updates.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut idx: Vec<usize> = (0..self.replay.len()).collect();
        // Partial Fisher-Yates: the first n entries are the sample.
        for i in 0..n {
            let j = i + (rng.next() % (idx.len() - i) as u64) as usize;
            idx.swap(i, j);
        }
        let mut chosen = idx[..n].to_vec();
        chosen.sort_unstable();
        chosen.into_iter().map(|i| self.replay[i].clone()).collect()
    }

    /// Adds `batch` to D, dropping the oldest transitions beyond `replay_capacity`.
    fn remember(&mut self, batch: &[Transition]) {
        if self.cfg.replay_capacity == 0 {
            return;
        }
        self.replay.extend(batch.iter().cloned());
        while self.replay.len() > self.cfg.replay_capacity {
            self.replay.pop_front();
        }
    }

    /// The soft value of each state, the bracket of Eq. 6 at its first-token row,
    /// `V(s) = Σ_w π(w|s)·Q_θ(s, w) − β·KL(π‖ρ)(s)`, with the online Q-network Q_θ: what the
    /// trainer believes the entropy-regularised return of π from `s` is.
    pub fn state_values(&self, model: &Llama, states: &[Vec<u32>]) -> Result<Vec<f64>, TrainError> {
        if states.iter().any(|s| s.is_empty()) {
            return Err(TrainError::Batch("empty state".into()));
        }
        let spans: Vec<RowSpan> = states.iter().map(|s| RowSpan::state(s)).collect();
        let mut out = Vec::with_capacity(states.len());
        for chunk in spans.chunks(self.cfg.micro_batch) {
            out.extend(soft_value_rows(model, chunk, &self.cfg.at_update(self.updates), self.q_net(), None)?.values);
        }
        Ok(out)
    }

    /// The per-token soft Bellman targets (Eq. 6) of each transition of `batch`, in batch order,
    /// from the current π, Q̄ and ρ (what the next [`EtpoTrainer::update`] regresses Q on).
    pub fn targets(&self, model: &Llama, batch: &[Transition]) -> Result<Vec<Vec<f64>>, TrainError> {
        validate_batch(batch)?;
        let spans: Vec<RowSpan> = batch.iter().map(|t| RowSpan::action(&t.state, &t.action)).collect();
        let flat =
            compute_targets(model, batch, &spans, &self.cfg.at_update(self.updates), self.q_target_net())?.targets;
        let mut out = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for t in batch {
            out.push(flat[offset..offset + t.action.len()].iter().map(|&x| x as f64).collect());
            offset += t.action.len();
        }
        Ok(out)
    }

    /// Writes the three adapter sets, both optimisers' states, the counters, the configuration
    /// and the caller's `extra` state (RNG, environment counters, replay data, ...) to one file,
    /// atomically.
    pub fn save_checkpoint(&self, model: &Llama, path: &Path, extra: &serde_json::Value) -> Result<(), TrainError> {
        let mut tensors = Vec::new();
        for name in [POLICY, Q, Q_TARGET] {
            tensors.extend(checkpoint::var_tensors(&format!("adapter.{name}"), &model.adapter_vars(name)));
        }
        tensors.extend(checkpoint::var_tensors("value_head.q", &self.q_head.vars()));
        tensors.extend(checkpoint::var_tensors("value_head.q_target", &self.q_target_head.vars()));
        tensors.extend(checkpoint::optim_tensors("optim.q", &self.q_opt));
        tensors.extend(checkpoint::optim_tensors("optim.q_head", &self.head_opt));
        tensors.extend(checkpoint::optim_tensors("optim.policy", &self.pi_opt));
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("config".to_string(), json(&self.cfg)?);
        meta.insert("updates".to_string(), self.updates.to_string());
        meta.insert("q_steps".to_string(), self.q_opt.steps().to_string());
        meta.insert("q_head_steps".to_string(), self.head_opt.steps().to_string());
        meta.insert("policy_steps".to_string(), self.pi_opt.steps().to_string());
        meta.insert("replay".to_string(), json(&self.replay)?);
        meta.insert("replay_seed".to_string(), self.replay_seed.to_string());
        meta.insert("extra".to_string(), json(extra)?);
        checkpoint::write_atomic(path, &tensors, meta)
    }

    /// Restores a checkpoint written by [`EtpoTrainer::save_checkpoint`] into this trainer and
    /// `model`'s adapter sets; returns the caller's `extra` state. The trainer's configuration
    /// must have the same LoRA shape (other hyper-parameters may differ: the new ones apply).
    pub fn load_checkpoint(&mut self, model: &Llama, path: &Path) -> Result<serde_json::Value, TrainError> {
        let (tensors, meta) = checkpoint::read(path, model.device())?;
        checkpoint::check_format(path, &meta, FORMAT, "an ETPO trainer checkpoint")?;
        for name in [POLICY, Q, Q_TARGET] {
            checkpoint::restore_vars(path, &tensors, &format!("adapter.{name}"), &model.adapter_vars(name))?;
        }
        checkpoint::restore_vars(path, &tensors, "value_head.q", &self.q_head.vars())?;
        checkpoint::restore_vars(path, &tensors, "value_head.q_target", &self.q_target_head.vars())?;
        let q_steps: u64 = checkpoint::meta_json(path, &meta, "q_steps")?;
        let pi_steps: u64 = checkpoint::meta_json(path, &meta, "policy_steps")?;
        checkpoint::restore_optim(path, &tensors, "optim.q", &mut self.q_opt, q_steps)?;
        let head_steps: u64 = checkpoint::meta_json(path, &meta, "q_head_steps")?;
        checkpoint::restore_optim(path, &tensors, "optim.q_head", &mut self.head_opt, head_steps)?;
        checkpoint::restore_optim(path, &tensors, "optim.policy", &mut self.pi_opt, pi_steps)?;
        self.updates = checkpoint::meta_json(path, &meta, "updates")?;
        self.replay = checkpoint::meta_json(path, &meta, "replay")?;
        self.replay_seed = checkpoint::meta_json(path, &meta, "replay_seed")?;
        checkpoint::meta_json(path, &meta, "extra")
    }
}

/// SplitMix64, the replay sampler's generator (small, seedable, no state to save).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The model-side LoRA configuration of the trainer's adapter sets.
pub(crate) fn lora_config(cfg: &EtpoConfig) -> LoraConfig {
    LoraConfig { rank: cfg.lora_rank, alpha: cfg.lora_alpha, ..LoraConfig::default() }
}

/// Variables named by index (checkpoint keys of the optimiser state).
pub(crate) fn named(vars: Vec<candle_core::Var>) -> Vec<(String, candle_core::Var)> {
    vars.into_iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect()
}

pub(crate) fn json<T: Serialize + ?Sized>(v: &T) -> Result<String, TrainError> {
    serde_json::to_string(v).map_err(|e| TrainError::Config(format!("cannot serialise: {e}")))
}

/// What both trainers do first: checks `batch`, groups it by state, and returns it with one row
/// span per action and the metrics that follow from the batch alone.
pub(crate) fn prepare_update(
    batch: &[Transition],
) -> Result<(Vec<Transition>, Vec<RowSpan>, UpdateMetrics), TrainError> {
    validate_batch(batch)?;
    let batch = group_by_state(batch);
    let spans: Vec<RowSpan> = batch.iter().map(|t| RowSpan::action(&t.state, &t.action)).collect();
    let m = UpdateMetrics {
        transitions: batch.len(),
        action_tokens: batch.iter().map(|t| t.action.len()).sum(),
        batch_reward: batch.iter().map(|t| t.reward).sum::<f64>() / batch.len() as f64,
        ..Default::default()
    };
    Ok((batch, spans, m))
}

/// The batch reordered so that transitions from the same state are adjacent (stable, in order
/// of first appearance): micro-batches then share state prefixes. Losses are sums over
/// transitions, so the order does not change the update.
pub(crate) fn group_by_state(batch: &[Transition]) -> Vec<Transition> {
    let mut order: Vec<&[u32]> = Vec::new();
    for t in batch {
        if !order.contains(&t.state.as_slice()) {
            order.push(&t.state);
        }
    }
    let mut out = Vec::with_capacity(batch.len());
    for s in order {
        out.extend(batch.iter().filter(|t| t.state == s).cloned());
    }
    out
}

/// All action tokens of `batch`, in order.
pub(crate) fn chunk_actions(batch: &[Transition]) -> Vec<u32> {
    batch.iter().flat_map(|t| t.action.iter().copied()).collect()
}

pub(crate) fn validate_batch(batch: &[Transition]) -> Result<(), TrainError> {
    if batch.is_empty() {
        return Err(TrainError::Batch("no transitions".into()));
    }
    for (i, t) in batch.iter().enumerate() {
        if t.state.is_empty() {
            return Err(TrainError::Batch(format!("transition {i}: empty state")));
        }
        if t.action.is_empty() {
            return Err(TrainError::Batch(format!("transition {i}: empty action (an action has at least one token)")));
        }
        if !t.reward.is_finite() {
            return Err(TrainError::Batch(format!("transition {i}: reward {} is not finite", t.reward)));
        }
        if t.next_state.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(TrainError::Batch(format!("transition {i}: empty next state")));
        }
    }
    Ok(())
}

/// Q-values `[rows, V]` at the rows of `spans` from one Q-network, per the configured read-out
/// (detached).
fn q_rows(
    model: &Llama,
    spans: &[RowSpan],
    net: QNet<'_>,
    ref_logp: &Tensor,
    cfg: &EtpoConfig,
) -> Result<Tensor, TrainError> {
    let hidden = hidden_rows(model, spans, Some(net.adapter), false, cfg.share_prefixes)?;
    let logits = model.logits(&hidden)?;
    let value = match cfg.q_readout {
        math::QReadout::Dueling => Some(net.head.values(&hidden)?),
        math::QReadout::Logits => None,
    };
    Ok(math::q_values(&logits, value.as_ref(), ref_logp, cfg.q_readout, cfg.beta)?.detach())
}

/// What the Q loss reads of ρ at the rows of one micro-batch, both kept from the target phase.
#[derive(Clone, Copy)]
struct Reference<'a> {
    /// ρ's log-probability of each token taken, `[rows]`: all the dueling read-out needs.
    logp_taken: &'a Tensor,
    /// ρ's final hidden states, `[rows, hidden]`: its full distribution, one product away.
    hidden: &'a Tensor,
}

/// What one micro-batch's pass of the Q-network gives the Q step.
struct QStep {
    /// The Q loss, mean over the rows (gradients reach the Q-network only).
    loss: Tensor,
    /// `Q(c, w)` of the tokens taken, `[rows]`.
    taken: Tensor,
    /// The pass's final hidden states (detached), when asked for (`policy_uses_pre_step_q`).
    hidden: Option<Tensor>,
}

/// The Q loss of one micro-batch, with the Q-values of the taken tokens and, when
/// `keep_hidden`, the pass's final hidden states.
///
/// Under the dueling read-out the loss needs ρ only at the taken tokens. The logits read-out
/// and the `q_reference_kl` term need ρ's full distribution: it is read from ρ's kept hidden
/// states through the output layer.
#[allow(clippy::too_many_arguments)]
fn q_loss_chunk(
    model: &Llama,
    spans: &[RowSpan],
    tokens: &Tensor,
    targets: &Tensor,
    reference: Reference<'_>,
    cfg: &EtpoConfig,
    net: QNet<'_>,
    keep_hidden: bool,
) -> Result<QStep, TrainError> {
    let hidden = hidden_rows(model, spans, Some(net.adapter), true, cfg.share_prefixes)?;
    let logits = model.logits(&hidden)?;
    let needs_full_reference = cfg.q_readout == math::QReadout::Logits || cfg.q_reference_kl > 0.0;
    let (taken, conservative, reference_kl) = if needs_full_reference {
        let ref_logp = logp_from_hidden(model, reference.hidden)?;
        let value = match cfg.q_readout {
            math::QReadout::Dueling => Some(net.head.values(&hidden)?),
            math::QReadout::Logits => None,
        };
        let q = math::q_values(&logits, value.as_ref(), &ref_logp, cfg.q_readout, cfg.beta)?;
        let taken = math::taken_values(&q, tokens)?;
        let conservative = math::conservative_term(&q, &taken, &ref_logp, cfg.beta)?;
        let reference_kl = match cfg.q_reference_kl > 0.0 {
            true => Some(math::q_reference_kl(&q, &ref_logp, cfg.beta)?),
            false => None,
        };
        (taken, conservative, reference_kl)
    } else {
        let value = net.head.values(&hidden)?;
        // log π_Q of the taken tokens, fused: no [rows × vocabulary] log-softmax is kept.
        let q_logp_taken = crate::ops::taken_log_softmax(&logits, &tokens.to_vec1::<u32>()?)?;
        let taken = math::dueling_taken_values(&q_logp_taken, reference.logp_taken, &value, cfg.beta)?;
        (taken.clone(), math::dueling_conservative_term(&value, &taken)?, None)
    };
    let mut loss = math::q_loss(&taken, targets, cfg.huber_delta)?;
    if cfg.conservative > 0.0 {
        loss = (loss + (conservative.mean_all()? * cfg.conservative)?)?;
    }
    if let Some(term) = reference_kl {
        loss = (loss + (term.mean_all()? * cfg.q_reference_kl)?)?;
    }
    let hidden = keep_hidden.then(|| hidden.detach());
    Ok(QStep { loss, taken, hidden })
}

/// The summed per-token policy loss (Eq. 7, [`math::policy_kl_rows`]) of one micro-batch
/// against `target` (constants: [`math::policy_target_from_q_logits`], or the mixed prior's);
/// gradients reach the policy adapter only.
fn policy_loss_chunk(
    model: &Llama,
    spans: &[RowSpan],
    target: &Tensor,
    cfg: &EtpoConfig,
) -> Result<Tensor, TrainError> {
    let logits = logit_rows(model, spans, Some(POLICY), true, cfg.share_prefixes)?;
    Ok(math::policy_kl_rows(&logits, target)?.sum_all()?)
}

/// What the target phase of an update produces.
struct TargetPhase {
    /// Per-token targets of every action, in batch order.
    targets: Vec<f32>,
    /// ρ's log-probability of each token taken, `[rows]` per micro-batch (detached): all the
    /// Q loss needs of ρ under the dueling read-out.
    ref_logp_taken: Vec<Tensor>,
    /// ρ's and π's final hidden states at the action rows, `[rows, hidden]` per micro-batch
    /// (detached): their distributions, one product with the frozen output layer away.
    ref_hidden: Vec<Tensor>,
    policy_hidden: Vec<Tensor>,
    /// Sums over action rows of KL(π‖ρ), of π's entropy and of ρ's.
    kl_sum: f64,
    entropy_sum: f64,
    reference_entropy_sum: f64,
    /// Mean soft value `V(s)` (Eq. 6 bracket, target network) of the batch's states.
    start_value_mean: f64,
    /// Mean over action rows of `Q̄(c, w) − β·log E_ρ[exp(Q̄(c,·)/β)]` for the token taken
    /// (with the dueling read-out, `β·log(π_Q̄(w|c)/ρ(w|c))`).
    taken_log_ratio_mean: f64,
}

/// The soft Bellman targets of Eq. 6 for `batch` (`spans` are its action spans): soft values of
/// every action context from π, the target network `q_bar` and ρ, and of every next state.
fn compute_targets(
    model: &Llama,
    batch: &[Transition],
    spans: &[RowSpan],
    cfg: &EtpoConfig,
    q_bar: QNet<'_>,
) -> Result<TargetPhase, TrainError> {
    let mb = cfg.micro_batch;
    let total_tokens: usize = batch.iter().map(|t| t.action.len()).sum();
    let mut ref_logp_taken: Vec<Tensor> = Vec::new();
    let (mut ref_hidden, mut policy_hidden): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let mut row_values: Vec<f64> = Vec::with_capacity(total_tokens);
    let (mut kl_sum, mut entropy_sum, mut reference_entropy_sum) = (0f64, 0f64, 0f64);
    let (mut taken_q, mut taken_prob): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut log_ratio_sum = 0f64;
    for (ci, chunk) in spans.chunks(mb).enumerate() {
        let tokens = token_tensor(model, chunk_actions(&batch[ci * mb..ci * mb + chunk.len()]))?;
        let rows = soft_value_rows(model, chunk, cfg, q_bar, Some(&tokens))?;
        row_values.extend(rows.values);
        let taken = rows.taken.expect("tokens were given");
        taken_q.extend(taken.q);
        taken_prob.extend(taken.prob);
        log_ratio_sum += taken.log_ratio_sum;
        ref_logp_taken.push(taken.ref_logp);
        ref_hidden.push(rows.ref_hidden);
        policy_hidden.push(rows.policy_hidden);
        kl_sum += rows.kl_sum;
        entropy_sum += rows.entropy_sum;
        reference_entropy_sum += rows.reference_entropy_sum;
    }
    // V(s) of each batch state is the value of its first action row; next states that are not
    // batch states get their own forward passes.
    let mut state_value: HashMap<&[u32], f64> = HashMap::new();
    let mut offset = 0;
    for t in batch {
        state_value.entry(&t.state).or_insert(row_values[offset]);
        offset += t.action.len();
    }
    let start_value_mean = state_value.values().sum::<f64>() / state_value.len() as f64;
    let mut extra: Vec<&[u32]> = Vec::new();
    for t in batch {
        if let Some(s) = &t.next_state {
            if !state_value.contains_key(s.as_slice()) && !extra.contains(&s.as_slice()) {
                extra.push(s);
            }
        }
    }
    let extra_spans: Vec<RowSpan> = extra.iter().map(|s| RowSpan::state(s)).collect();
    let mut extra_values = Vec::with_capacity(extra.len());
    for chunk in extra_spans.chunks(mb) {
        extra_values.extend(soft_value_rows(model, chunk, cfg, q_bar, None)?.values);
    }
    for (s, v) in extra.iter().zip(extra_values) {
        state_value.insert(s, v);
    }
    let mut targets: Vec<f32> = Vec::with_capacity(total_tokens);
    let mut offset = 0;
    for t in batch {
        let n = t.action.len();
        let inside = &row_values[offset + 1..offset + n];
        let next = t.next_state.as_ref().map(|s| state_value[s.as_slice()]);
        let mut tg = math::soft_bellman_targets(inside, t.reward, next, cfg.gamma, cfg.discount_inside_actions);
        let f = if cfg.discount_inside_actions { cfg.gamma } else { 1.0 };
        let rows = offset..offset + n;
        math::tree_backup_targets(&mut tg, &taken_q[rows.clone()], &taken_prob[rows], cfg.trace_lambda, f);
        targets.extend(tg.iter().map(|&x| x as f32));
        offset += n;
    }
    let taken_log_ratio_mean = log_ratio_sum / total_tokens as f64;
    Ok(TargetPhase {
        targets,
        ref_logp_taken,
        ref_hidden,
        policy_hidden,
        kl_sum,
        entropy_sum,
        reference_entropy_sum,
        start_value_mean,
        taken_log_ratio_mean,
    })
}

/// What [`soft_value_rows`] reads at the rows of one micro-batch.
struct SoftValueRows {
    /// The soft value (Eq. 6 bracket) of every row.
    values: Vec<f64>,
    /// ρ's and π's final hidden states at the rows (detached).
    ref_hidden: Tensor,
    policy_hidden: Tensor,
    /// Sums over the rows of KL(π‖ρ), of π's entropy and of ρ's.
    kl_sum: f64,
    entropy_sum: f64,
    reference_entropy_sum: f64,
    /// At action rows, what the token taken there reads.
    taken: Option<TakenRows>,
}

/// Per action row, for the token taken: `Q̄(c, w)`, `π(w|c)`, and the sum over the rows of its
/// advantage over the soft value under ρ (see [`TargetPhase::taken_log_ratio_mean`]).
struct TakenRows {
    q: Vec<f64>,
    prob: Vec<f64>,
    log_ratio_sum: f64,
    /// ρ's log-probability of the token, `[rows]` (detached).
    ref_logp: Tensor,
}

/// For one micro-batch of spans: `V(c) = Σ_w π(w|c)·Q(c, w) − β·KL(π‖ρ)(c)` at every row with
/// the Q-network `net`, and what it was computed from.
fn soft_value_rows(
    model: &Llama,
    spans: &[RowSpan],
    cfg: &EtpoConfig,
    net: QNet<'_>,
    tokens: Option<&Tensor>,
) -> Result<SoftValueRows, TrainError> {
    let share = cfg.share_prefixes;
    let ref_hidden = hidden_rows(model, spans, None, false, share)?;
    let policy_hidden = hidden_rows(model, spans, Some(POLICY), false, share)?;
    let ref_logp = logp_from_hidden(model, &ref_hidden)?;
    let pol_lp = logp_from_hidden(model, &policy_hidden)?;
    let q = q_rows(model, spans, net, &ref_logp, cfg)?;
    let values = math::soft_values(&pol_lp, &q, &ref_logp, cfg.beta)?;
    let kl_sum = math::kl_rows(&pol_lp, &ref_logp)?.sum_all()?.to_scalar::<f32>()? as f64;
    let entropy_sum = math::entropy_rows(&pol_lp)?.sum_all()?.to_scalar::<f32>()? as f64;
    let reference_entropy_sum = math::entropy_rows(&ref_logp)?.sum_all()?.to_scalar::<f32>()? as f64;
    let values = values.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let taken = match tokens {
        None => None,
        Some(tokens) => {
            let q_taken = math::taken_values(&q, tokens)?;
            let prob = math::taken_values(&pol_lp, tokens)?.exp()?;
            let advantage = (&q_taken - math::soft_value_under_reference(&q, &ref_logp, cfg.beta)?)?;
            let to_f64 = |t: &Tensor| -> Result<Vec<f64>, TrainError> {
                Ok(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
            };
            let log_ratio_sum = advantage.sum_all()?.to_scalar::<f32>()? as f64;
            let ref_logp = math::taken_values(&ref_logp, tokens)?;
            Some(TakenRows { q: to_f64(&q_taken)?, prob: to_f64(&prob)?, log_ratio_sum, ref_logp })
        }
    };
    Ok(SoftValueRows { values, ref_hidden, policy_hidden, kl_sum, entropy_sum, reference_entropy_sum, taken })
}

/// The policy step's trust region ([`EtpoConfig::policy_max_kl`]): while the summed per-token
/// KL(π_before‖π_now) over the action rows exceeds `max_kl` per token, the adapter is moved
/// back to `before + s·(after − before)`, with `s` shrunk by the excess to the power `1/p`
/// (KL ≈ c·s^p: p = 2 for small steps, then the power the last two checks measured). Returns
/// where the step was left.
///
/// π_before's distributions are read from its final hidden states of the target phase
/// (`before_hidden`, per micro-batch) through the output layer.
fn trust_region(
    model: &Llama,
    spans: &[RowSpan],
    before_hidden: &[Tensor],
    vars: &[candle_core::Var],
    before: &[Tensor],
    max_kl: f64,
    cfg: &EtpoConfig,
) -> Result<TrustRegionStep, TrainError> {
    let tokens: usize = spans.iter().map(|s| s.len).sum();
    let after: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    // The KL sum with the adapter at `before + s·(after − before)`.
    let kl_at = |scale: f64| -> Result<f64, TrainError> {
        if scale != 1.0 {
            for ((v, b), a) in vars.iter().zip(before).zip(&after) {
                v.set(&(b + ((a - b)? * scale)?)?)?;
            }
        }
        let mut sum = 0f64;
        for (ci, chunk) in spans.chunks(cfg.micro_batch).enumerate() {
            let was = logp_from_hidden(model, &before_hidden[ci])?;
            let now = logp_from_hidden(model, &hidden_rows(model, chunk, Some(POLICY), false, cfg.share_prefixes)?)?;
            sum += math::kl_rows(&was, &now)?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sum)
    };
    shrink_step(kl_at, max_kl * tokens as f64)
}

/// The line search of [`trust_region`]: `kl_at(s)` is the KL sum with the fraction `s` of the
/// step (called with 1 first, then with smaller fractions), `target` the largest allowed. At
/// most seven checks.
fn shrink_step(
    mut kl_at: impl FnMut(f64) -> Result<f64, TrainError>,
    target: f64,
) -> Result<TrustRegionStep, TrainError> {
    let (mut kl, mut scale, mut checks) = (kl_at(1.0)?, 1.0f64, 1usize);
    let mut previous: Option<(f64, f64)> = None;
    for _ in 0..6 {
        if kl <= target {
            break;
        }
        // KL ≈ c·s^p: p = 2 for small steps; from the last two checks once there are two. Large
        // first steps are far from small: there KL grows more slowly than s², and the square
        // root alone took up to seven checks (each a forward pass of π over the mini-batch).
        let p = match previous {
            Some((s0, kl0)) if s0 > scale && kl0 > kl && kl > 0.0 => {
                ((kl0 / kl).ln() / (s0 / scale).ln()).clamp(0.5, 4.0)
            }
            _ => 2.0,
        };
        previous = Some((scale, kl));
        scale *= 0.95 * (target / kl).powf(1.0 / p);
        kl = kl_at(scale)?;
        checks += 1;
    }
    Ok(TrustRegionStep { kl, scale, checks })
}

/// Where [`trust_region`] left the policy step.
struct TrustRegionStep {
    /// Summed per-token KL(π_before‖π_now) over the action rows.
    kl: f64,
    /// The fraction of the step kept.
    scale: f64,
    /// KL checks made (each a forward pass of π over the mini-batch); 1: the step was inside.
    checks: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use candle_core::{DType, Device};

    fn tiny() -> Llama {
        let cfg = LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(12) };
        Llama::random(cfg, 4, &Device::Cpu, DType::F32).unwrap()
    }

    /// Which adapter sets received a non-zero gradient from `loss`.
    fn touched(model: &Llama, loss: &Tensor) -> Vec<&'static str> {
        let grads = loss.backward().unwrap();
        [POLICY, Q, Q_TARGET]
            .into_iter()
            .filter(|name| {
                model.adapter_vars(name).iter().any(|v| {
                    grads
                        .get(v.as_tensor())
                        .is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
                })
            })
            .collect()
    }

    #[test]
    fn each_loss_reaches_only_its_own_adapter() {
        let mut model = tiny();
        let cfg = EtpoConfig { beta: 0.5, q_reference_kl: 1.0, ..Default::default() };
        let trainer = EtpoTrainer::new(&mut model, cfg.clone()).unwrap();
        let spans = vec![RowSpan::action(&[1, 2, 3], &[4, 5]), RowSpan::action(&[6], &[7, 8, 9])];
        let tokens = token_tensor(&model, vec![4, 5, 7, 8, 9]).unwrap();
        let targets = Tensor::new(&[1.0f32, -1.0, 0.5, 2.0, 0.0], &Device::Cpu).unwrap();
        let ref_hidden = hidden_rows(&model, &spans, None, false, true).unwrap();
        let ref_taken = math::taken_values(&logp_from_hidden(&model, &ref_hidden).unwrap(), &tokens).unwrap();
        let reference = Reference { logp_taken: &ref_taken, hidden: &ref_hidden };
        // Both read-outs, and the dueling one's two ways to its loss: ρ at the taken tokens only
        // (no `q_reference_kl`), or ρ's full distribution.
        for (readout, q_reference_kl) in
            [(math::QReadout::Logits, 1.0), (math::QReadout::Dueling, 1.0), (math::QReadout::Dueling, 0.0)]
        {
            let cfg = EtpoConfig { q_readout: readout, q_reference_kl, ..cfg.clone() };
            let step = q_loss_chunk(&model, &spans, &tokens, &targets, reference, &cfg, trainer.q_net(), true).unwrap();
            assert_eq!(touched(&model, &step.loss), vec![Q], "{readout} κ={q_reference_kl}");
            // A target that differs from π, so that the policy loss has a gradient.
            let kept = step.hidden.expect("asked for");
            let kept = math::policy_target_from_q_logits(&model.logits(&kept).unwrap(), readout, cfg.beta).unwrap();
            let shifted = (kept + targets.unsqueeze(1).unwrap().broadcast_as((5, 12)).unwrap()).unwrap();
            let target = math::log_softmax(&shifted).unwrap();
            let pi_loss = policy_loss_chunk(&model, &spans, &target, &cfg).unwrap();
            assert_eq!(touched(&model, &pi_loss), vec![POLICY], "{readout}");
        }
    }

    /// The checks [`shrink_step`] makes on `KL(s) = c·s^p`, the KL sum it ends at, and the
    /// checks the square-root rule alone (p = 2 always) made.
    fn line_search(c: f64, p: f64, target: f64) -> (usize, f64, usize) {
        let step = shrink_step(|s| Ok(c * s.powf(p)), target).unwrap();
        assert!((step.kl - c * step.scale.powf(p)).abs() < 1e-9);
        let (mut kl, mut s, mut sqrt_checks) = (c, 1.0f64, 1);
        for _ in 0..6 {
            if kl <= target {
                break;
            }
            s *= 0.95 * (target / kl).sqrt();
            kl = c * s.powf(p);
            sqrt_checks += 1;
        }
        (step.checks, step.kl, sqrt_checks)
    }

    #[test]
    fn the_trust_regions_line_search_measures_how_kl_grows() {
        // Inside already: one check.
        assert_eq!(line_search(0.5, 2.0, 1.0).0, 1);
        // Quadratic, 100× over: s = 0.095 at the second check, KL = 0.9025 × target.
        let (checks, kl, _) = line_search(100.0, 2.0, 1.0);
        assert_eq!(checks, 2);
        assert!((kl - 0.9025).abs() < 1e-9, "{kl}");
        // Linear (a large first step, where KL grows more slowly than s²), 100× over: the square
        // root makes s = 0.095, KL 9.5; the measured p = 1 then gives s = 0.95/9.5 · 0.095 and
        // KL = 0.95 at the third check, where the square root alone needs all seven (9.5, 2.93,
        // 1.63, 1.21, 1.05, then 0.97).
        let (checks, kl, sqrt_checks) = line_search(100.0, 1.0, 1.0);
        assert_eq!((checks, sqrt_checks), (3, 7));
        assert!((kl - 0.95).abs() < 1e-9, "{kl}");
        // Growing faster than s² only overshoots towards a smaller step: still inside at once.
        let (checks, kl, _) = line_search(100.0, 3.0, 1.0);
        assert_eq!(checks, 2);
        assert!(kl < 1.0);
    }

    #[test]
    fn activation_checkpointing_gives_the_same_updates() {
        // Actions sharing their states (the prompt runs once, gradients reach it through the
        // cache), micro-batches of two, two updates (the second replays the first's batch).
        let batch = vec![
            Transition {
                state: vec![1, 2, 3],
                action: vec![4, 5, 6],
                reward: 1.0,
                next_state: Some(vec![7, 8]),
                group: None,
            },
            Transition { state: vec![1, 2, 3], action: vec![9, 10], reward: -1.0, next_state: None, group: None },
            Transition { state: vec![7, 8], action: vec![11, 4], reward: 0.5, next_state: None, group: None },
        ];
        let cfg = EtpoConfig { micro_batch: 2, replay_sample: 2, ..Default::default() };
        let run = |checkpoint: bool| -> (Vec<Tensor>, UpdateMetrics) {
            let lcfg = LlamaConfig { tie_word_embeddings: true, num_hidden_layers: 3, ..LlamaConfig::tiny(12) };
            let mut model = Llama::random(lcfg, 4, &Device::Cpu, DType::F32).unwrap();
            model.set_activation_checkpointing(checkpoint);
            let mut trainer = EtpoTrainer::new(&mut model, cfg.clone()).unwrap();
            trainer.update(&model, &batch).unwrap();
            let m = trainer.update(&model, &batch[1..]).unwrap();
            let vars = [POLICY, Q].iter().flat_map(|a| model.adapter_vars(a)).map(|v| v.as_detached_tensor()).collect();
            (vars, m)
        };
        let (plain, pm) = run(false);
        let (checkpointed, cm) = run(true);
        for (i, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "tensor {i} differs by {d}");
        }
        assert!((pm.q_loss - cm.q_loss).abs() < 1e-5 * pm.q_loss.abs().max(1.0));
        assert!((pm.policy_grad_norm - cm.policy_grad_norm).abs() < 1e-4 * pm.policy_grad_norm.max(1.0));
        assert!(pm.policy_grad_norm > 0.0 && pm.q_grad_norm > 0.0);
    }

    #[test]
    fn invalid_batches_are_rejected_with_the_reason() {
        let ok = Transition { state: vec![1], action: vec![2], reward: 0.0, next_state: None, group: None };
        assert!(validate_batch(std::slice::from_ref(&ok)).is_ok());
        let cases = [
            (vec![], "no transitions"),
            (vec![Transition { action: vec![], ..ok.clone() }], "empty action"),
            (vec![Transition { state: vec![], ..ok.clone() }], "empty state"),
            (vec![Transition { reward: f64::NAN, ..ok.clone() }], "not finite"),
            (vec![Transition { next_state: Some(vec![]), ..ok.clone() }], "empty next state"),
        ];
        for (batch, why) in cases {
            let e = validate_batch(&batch).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
