//! Batched sampling with a KV cache: left padding, temperature, top-k, top-p, stop strings, EOS.
//!
//! Reproducible: each batch row samples from its own random stream, seeded by the call's seed and
//! the row's index, so the same call gives the same completions.
//!
//! The log-probabilities returned are those of the *policy*: `log softmax(logits)` at temperature 1,
//! before top-k/top-p, for the token that was sampled. This is `log π(token | prefix)`, what RL
//! objectives need; the sampling distribution (tempered, truncated) is only a way of exploring.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{ForwardOptions, KvCache, Llama, ModelError, Result};
use crate::tokenizer::Tokenizer;

/// How to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    /// Upper bound on generated tokens per completion.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: Option<f64>,
    /// Stop when the decoded completion contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Seed of the sampling streams.
    pub seed: u64,
}

impl Default for GenerateConfig {
    /// The paper's sampling: temperature 0.5, top-k 50; 128 new tokens; seed 0.
    fn default() -> Self {
        GenerateConfig { max_new_tokens: 128, temperature: 0.5, top_k: Some(50), top_p: None, stop: Vec::new(), seed: 0 }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model produced the end-of-sequence token.
    Eos,
    /// The text reached a stop string.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The decoded completion, cut before the first stop string; the EOS token is not written.
    pub text: String,
    /// Every sampled token, including the EOS token or the token that completed a stop string.
    pub tokens: Vec<u32>,
    /// `log π(token)` under the untempered policy, one per token.
    pub logprobs: Vec<f32>,
    /// Length of the prompt in tokens (without padding).
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// Encodes `prompts` with `tok` and samples one completion for each (batched, left-padded).
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompts: &[String],
    cfg: &GenerateConfig,
    adapter: Option<&str>,
) -> Result<Vec<Completion>> {
    let ids = prompts
        .iter()
        .map(|p| tok.encode(p).map_err(|e| ModelError::Tokenizer(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    generate_ids(model, tok, &ids, cfg, adapter)
}

/// [`generate`] from token ids.
pub fn generate_ids(
    model: &Llama,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    adapter: Option<&str>,
) -> Result<Vec<Completion>> {
    let decode = |ids: &[u32]| tok.decode(ids).map_err(|e| ModelError::Tokenizer(e.to_string()));
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    generate_with(model, prompts, cfg, adapter, tok.eos_token_id(), pad, &decode)
}

/// The generation loop, with the tokenizer reduced to what it needs: the EOS id, a padding id
/// (any valid id; it is masked) and a decoder for stop strings and the final text.
pub fn generate_with(
    model: &Llama,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    adapter: Option<&str>,
    eos: Option<u32>,
    pad_id: u32,
    decode: &dyn Fn(&[u32]) -> Result<String>,
) -> Result<Vec<Completion>> {
    validate(cfg)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = model.config().vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Invalid(format!("prompt {i} is empty (no tokens)")));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Invalid(format!("prompt {i}: token id {bad} outside the vocabulary ({vocab})")));
        }
    }
    let b = prompts.len();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let dev = model.device();
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask = Vec::with_capacity(b * max_len);
    for p in prompts {
        let padn = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad_id, padn).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, padn).chain(std::iter::repeat_n(1u32, p.len())));
    }
    let ids = Tensor::from_vec(ids, (b, max_len), dev)?;
    let mask = Tensor::from_vec(mask, (b, max_len), dev)?;

    let mut rngs: Vec<rand::rngs::StdRng> =
        (0..b).map(|row| rand::rngs::StdRng::seed_from_u64(row_seed(cfg.seed, row))).collect();
    let mut out: Vec<Completion> = prompts
        .iter()
        .map(|p| Completion {
            text: String::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            prompt_tokens: p.len(),
            finish: FinishReason::Length,
        })
        .collect();
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }

    let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
    let mut cache = KvCache::with_capacity(model, b, max_len + cfg.max_new_tokens);
    let hidden = model.forward_step(&ids, Some(&mask), &mut cache, &opts)?;
    let mut logits = last_logits(model, &hidden)?;
    // `active[i]` is the completion index of cache row i.
    let mut active: Vec<usize> = (0..b).collect();
    let mut texts: Vec<Option<String>> = vec![None; b];
    for step in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &ci) in active.iter().enumerate() {
            let l = &logits[row];
            let (token, logprob) = sample(l, cfg, &mut rngs[ci]);
            let c = &mut out[ci];
            c.tokens.push(token);
            c.logprobs.push(logprob);
            if Some(token) == eos {
                c.finish = FinishReason::Eos;
                continue;
            }
            if !cfg.stop.is_empty() {
                let text = decode(&c.tokens)?;
                if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    c.finish = FinishReason::Stop;
                    texts[ci] = Some(text[..cut].to_string());
                    continue;
                }
            }
            if step + 1 < cfg.max_new_tokens {
                keep.push(row);
                next.push(token);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.select_rows(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let ids = Tensor::from_vec(next, (active.len(), 1), dev)?;
        let hidden = model.forward_step(&ids, None, &mut cache, &opts)?;
        logits = last_logits(model, &hidden)?;
    }
    for (c, t) in out.iter_mut().zip(texts) {
        c.text = match t {
            Some(t) => t,
            None => {
                let n = c.tokens.len() - usize::from(c.finish == FinishReason::Eos);
                decode(&c.tokens[..n])?
            }
        };
    }
    Ok(out)
}

fn validate(cfg: &GenerateConfig) -> Result<()> {
    if !(cfg.temperature >= 0.0 && cfg.temperature.is_finite()) {
        return Err(ModelError::Invalid(format!("temperature must be >= 0, got {}", cfg.temperature)));
    }
    if cfg.top_k == Some(0) {
        return Err(ModelError::Invalid("top_k must be at least 1".into()));
    }
    if let Some(p) = cfg.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ModelError::Invalid(format!("top_p must be in (0, 1], got {p}")));
        }
    }
    if cfg.stop.iter().any(String::is_empty) {
        return Err(ModelError::Invalid("stop strings must not be empty".into()));
    }
    Ok(())
}

/// splitmix64 of (seed, row): independent, well-mixed streams per row.
fn row_seed(seed: u64, row: usize) -> u64 {
    let mut z = seed ^ (row as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Logits of the last position of each row, in f32 on the host.
fn last_logits(model: &Llama, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?;
    let logits = model.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?;
    Ok(logits.to_vec2::<f32>()?)
}

/// Draws one token from `logits` under `cfg`; returns it with its untempered log-probability.
pub fn sample(logits: &[f32], cfg: &GenerateConfig, rng: &mut impl Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let token = if cfg.temperature == 0.0 {
        argmax(logits)
    } else {
        sample_tempered(logits, max, cfg, rng)
    };
    (token as u32, logits[token] - log_z)
}

fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

fn sample_tempered(logits: &[f32], max: f32, cfg: &GenerateConfig, rng: &mut impl Rng) -> usize {
    let inv_t = (1.0 / cfg.temperature) as f32;
    // Candidates: tokens within e^-30 of the best after temperature (the rest cannot be drawn in
    // f32 and barely move a top-p boundary), then the top-k of those.
    let floor = -30.0 / inv_t;
    let mut cand: Vec<(usize, f32)> =
        logits.iter().enumerate().filter(|(_, &l)| l - max >= floor).map(|(i, &l)| (i, (l - max) * inv_t)).collect();
    let by_logit_desc = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = cfg.top_k {
        if cand.len() > k {
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
        }
    }
    cand.sort_by(by_logit_desc);
    let mut probs: Vec<f64> = cand.iter().map(|&(_, s)| (s as f64).exp()).collect();
    if let Some(p) = cfg.top_p {
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut n = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q / total;
            if acc >= p {
                n = i + 1;
                break;
            }
        }
        probs.truncate(n);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return cand[i].0;
        }
        u -= q;
    }
    cand[probs.len() - 1].0
}
