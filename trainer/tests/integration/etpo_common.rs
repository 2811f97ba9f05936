//! Shared helpers of the ETPO / PPO-KL tests: a tiny random model, a sampler and the reward
//! tasks: the decisive token last ([`batch`]), first ([`Task::FirstToken`]) or in an earlier step
//! ([`Task::TwoStep`]).

use candle_core::{DType, Device, Tensor};
use trainer::etpo::{AdamWConfig, EtpoConfig, Transition};
use trainer::model::{Llama, LlamaConfig};

/// A 2-layer model over a 16-token vocabulary. Its output projection is untied and scaled up
/// (std 0.15 instead of 0.02): after the final RMSNorm, logits are bounded by the head's row
/// norms, and adapters, which do not touch the head, could otherwise move π only a little.
pub fn tiny_model(seed: u64) -> Llama {
    let cfg = LlamaConfig {
        vocab_size: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
    };
    let random = Llama::random(cfg.clone(), seed, &Device::Cpu, DType::F32).expect("tiny model");
    let mut w = random.weights().clone();
    w.lm_head = w.lm_head.map(|h| (h * 7.5).expect("scale the head"));
    Llama::new(cfg, w).expect("tiny model")
}

/// ETPO's shipped defaults with the learning rates of the tiny model (its adapters are rank 4
/// over a 32-wide model, so they take larger steps than the defaults, which are set for
/// SmolLM2-135M).
pub fn tiny_etpo_config() -> EtpoConfig {
    let lr = |lr: f64| AdamWConfig { lr, ..Default::default() };
    EtpoConfig {
        q_optim: lr(3e-3),
        value_head_optim: lr(1e-2),
        policy_optim: lr(1e-2),
        lora_rank: 4,
        lora_alpha: 8.0,
        ..Default::default()
    }
}

/// A small deterministic generator (SplitMix64) so that tests sample reproducibly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The next-token distribution of `adapter` after `context`.
pub fn next_probs(model: &Llama, context: &[u32], adapter: Option<&str>) -> Vec<f32> {
    let ids = Tensor::new(context, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&ids, None, adapter).unwrap().detach();
    let last = logits.squeeze(0).unwrap().get(context.len() - 1).unwrap();
    candle_nn::ops::softmax_last_dim(&last.unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

fn sample(p: &[f32], rng: &mut Rng) -> u32 {
    let u = rng.next_f64() as f32;
    let mut acc = 0.0;
    for (i, &x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i as u32;
        }
    }
    (p.len() - 1) as u32
}

/// Samples an action of `len` tokens from `adapter` after `state`.
pub fn sample_action(model: &Llama, state: &[u32], len: usize, adapter: Option<&str>, rng: &mut Rng) -> Vec<u32> {
    let mut ctx = state.to_vec();
    let mut action = Vec::with_capacity(len);
    for _ in 0..len {
        let w = sample(&next_probs(model, &ctx, adapter), rng);
        ctx.push(w);
        action.push(w);
    }
    action
}

/// The task's fixed prompt.
pub const PROMPT: [u32; 4] = [1, 9, 3, 12];
/// The rewarded token: the action's last token.
pub const GOOD: u32 = 5;

/// One batch of single-step episodes with 2-token actions: reward `sign` when the action's
/// second token is [`GOOD`].
pub fn batch(model: &Llama, adapter: Option<&str>, n: usize, sign: f64, rng: &mut Rng) -> Vec<Transition> {
    (0..n)
        .map(|_| {
            let action = sample_action(model, &PROMPT, 2, adapter, rng);
            let reward = if action[1] == GOOD { sign } else { 0.0 };
            Transition { state: PROMPT.to_vec(), action, reward, next_state: None, group: None }
        })
        .collect()
}

/// The policy's expected reward on the task, exactly: `sign · Σ_w π(w|s) π(GOOD|s, w)`.
pub fn expected_reward(model: &Llama, adapter: &str, sign: f64) -> f64 {
    let first = next_probs(model, &PROMPT, Some(adapter));
    let mut total = 0.0;
    for (w, p) in first.iter().enumerate() {
        let mut ctx = PROMPT.to_vec();
        ctx.push(w as u32);
        total += *p as f64 * next_probs(model, &ctx, Some(adapter))[GOOD as usize] as f64;
    }
    sign * total
}

/// All tensors of one adapter set, flattened.
pub fn adapter_values(model: &Llama, name: &str) -> Vec<Vec<f32>> {
    model.adapter_vars(name).iter().map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
}

/// Largest absolute difference between two flattened adapter sets.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// A task of 2-token actions after [`PROMPT`] whose reward is decided by a token that is not the
/// last thing the model writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Task {
    /// One step; reward 1 when the action's **first** token is [`GOOD`].
    FirstToken,
    /// Two steps; step 1 is unrewarded, step 2 (state: the prompt, step 1's action and
    /// [`SEPARATOR`]) gets reward 1 when step 1's first token was [`GOOD`], whatever step 2 wrote.
    TwoStep,
}

/// Ends step 1's action in the state of step 2.
pub const SEPARATOR: u32 = 15;

impl Task {
    /// `n` transitions sampled from `adapter` (`n / 2` episodes for [`Task::TwoStep`]).
    pub fn batch(self, model: &Llama, adapter: Option<&str>, n: usize, rng: &mut Rng) -> Vec<Transition> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let a1 = sample_action(model, &PROMPT, 2, adapter, rng);
            let r = if a1[0] == GOOD { 1.0 } else { 0.0 };
            match self {
                Task::FirstToken => out.push(Transition {
                    state: PROMPT.to_vec(),
                    action: a1,
                    reward: r,
                    next_state: None,
                    group: None,
                }),
                Task::TwoStep => {
                    let s1 = self.second_state(&a1);
                    let a2 = sample_action(model, &s1, 2, adapter, rng);
                    out.push(Transition {
                        state: PROMPT.to_vec(),
                        action: a1,
                        reward: 0.0,
                        next_state: Some(s1.clone()),
                        group: None,
                    });
                    out.push(Transition { state: s1, action: a2, reward: r, next_state: None, group: None });
                }
            }
        }
        out
    }

    /// The state of step 2 after step 1's action `a1`.
    pub fn second_state(self, a1: &[u32]) -> Vec<u32> {
        [PROMPT.as_slice(), a1, &[SEPARATOR]].concat()
    }

    /// The probability that the policy writes the decisive token: P(first token = GOOD | PROMPT).
    pub fn p_good(self, model: &Llama, adapter: &str) -> f64 {
        next_probs(model, &PROMPT, Some(adapter))[GOOD as usize] as f64
    }
}
