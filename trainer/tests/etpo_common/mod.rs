//! Shared helpers of the ETPO / PPO-KL tests: a tiny random model, a sampler and a one-token
//! reward task.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use trainer::etpo::Transition;
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
            Transition { state: PROMPT.to_vec(), action, reward, next_state: None }
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
