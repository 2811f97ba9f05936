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

/// Generations of at least this many new tokens run with the adapter merged into the weights
/// (CPU only; see [`Llama::merge_adapter`]).
pub const MERGE_MIN_NEW_TOKENS: usize = 64;

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
        GenerateConfig {
            max_new_tokens: 128,
            temperature: 0.5,
            top_k: Some(50),
            top_p: None,
            stop: Vec::new(),
            seed: 0,
        }
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
    // Rows with the same prompt (a training batch samples several actions per state) share one
    // prompt pass: its keys and values are copied to each of them before the first step.
    let mut distinct: Vec<&[u32]> = Vec::new();
    let prompt_of: Vec<usize> = prompts
        .iter()
        .map(|p| {
            distinct.iter().position(|d| *d == p.as_slice()).unwrap_or_else(|| {
                distinct.push(p);
                distinct.len() - 1
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(distinct.len() * max_len);
    let mut mask = Vec::with_capacity(distinct.len() * max_len);
    for p in &distinct {
        let padn = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad_id, padn).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, padn).chain(std::iter::repeat_n(1u32, p.len())));
    }
    let ids = Tensor::from_vec(ids, (distinct.len(), max_len), dev)?;
    let mask = Tensor::from_vec(mask, (distinct.len(), max_len), dev)?;

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
    // Quantised copies of the base (the model's choice, `Llama::set_generation_weights`; CPU and
    // f32 only; exact for the default GGUF) with the adapter added in f32 for the decoding steps,
    // which read every weight for one token per row: under a third of the bytes of f32. The
    // prompt pass multiplies many rows by each weight, where the f32 products through BLAS are
    // faster, so it keeps the f32 weights: prompt positions are always the training-precision
    // model's, sampled positions the copies'.
    let quantized = model.generation_quantized()?;
    // With the exact weights on the CPU, the 14 small LoRA products per block cost 5-15% of a
    // decoding step (measured on SmolLM2-135M, batch 8); folding the adapter into a copy of the
    // weights removes them but costs about as much as a few dozen steps, so it pays only for long
    // generations. On a GPU the products are cheap and memory is dear: the adapter is applied as
    // it is. Quantised weights are never merged: the adapter stays exact.
    let merged = match adapter {
        Some(name) if quantized.is_none() && model.device().is_cpu() && cfg.max_new_tokens >= MERGE_MIN_NEW_TOKENS => {
            Some(model.merge_adapter(name)?)
        }
        _ => None,
    };
    // One pass and the logits of its last positions; `prompt` selects the exact weights.
    let pass = |ids: &Tensor, mask: Option<&Tensor>, cache: &mut KvCache, prompt: bool| -> Result<Vec<Vec<f32>>> {
        let (hidden, q) = match (quantized.filter(|_| !prompt), &merged) {
            (Some(q), _) => (model.forward_step_quantized(ids, mask, cache, adapter, q)?, Some(q)),
            (None, Some(m)) => (model.forward_step_merged(ids, mask, cache, m)?, None),
            (None, None) => (model.forward_step(ids, mask, cache, &opts)?, None),
        };
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        let logits = match q {
            Some(q) => model.logits_quantized(&last, q)?,
            None => model.logits(&last)?,
        };
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    let mut cache = KvCache::with_capacity(model, distinct.len(), max_len + cfg.max_new_tokens);
    let mut logits = pass(&ids, Some(&mask), &mut cache, true)?;
    if distinct.len() < b {
        cache.select_rows(&prompt_of)?;
        logits = prompt_of.iter().map(|&i| logits[i].clone()).collect();
    }
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
        logits = on_pool(|| pass(&ids, None, &mut cache, false))?;
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

/// Runs `f` on a thread of rayon's pool and waits for it. A decoding step's products split over
/// the pool (`quant.rs`, `blas.rs`): asked from a thread outside it, every split is handed over
/// through the kernel (a futex wake-up and a wait, about 200 times per step); from a worker, the
/// splits go through rayon's own queues and the calling thread takes one part itself.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
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

/// Draws one token from `logits` under `cfg`; returns it with its untempered log-probability.
pub fn sample(logits: &[f32], cfg: &GenerateConfig, rng: &mut impl Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let token = if cfg.temperature == 0.0 { argmax(logits) } else { sample_tempered(logits, max, cfg, rng) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{randomize_b, tiny};
    use crate::LoraConfig;

    fn letters(ids: &[u32]) -> Result<String> {
        Ok(ids.iter().map(|&i| char::from(b'a' + (i % 26) as u8)).collect())
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![vec![5, 17, 99, 3, 250, 8, 1], vec![42], vec![7, 7, 7, 120]]
    }

    fn run(m: &Llama, p: &[Vec<u32>], cfg: &GenerateConfig, eos: Option<u32>) -> Vec<Completion> {
        generate_with(m, p, cfg, None, eos, 0, &letters).unwrap()
    }

    #[test]
    fn batched_greedy_equals_each_prompt_alone() {
        let m = tiny(21);
        let cfg = GenerateConfig { max_new_tokens: 12, temperature: 0.0, ..GenerateConfig::default() };
        let batched = run(&m, &prompts(), &cfg, None);
        for (p, b) in prompts().iter().zip(&batched) {
            let alone = run(&m, std::slice::from_ref(p), &cfg, None);
            assert_eq!(alone[0].tokens, b.tokens);
            assert_eq!(b.tokens.len(), 12);
            assert_eq!(b.finish, FinishReason::Length);
            assert_eq!(b.prompt_tokens, p.len());
            for (x, y) in alone[0].logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rows_with_one_prompt_share_its_pass_and_sample_as_if_alone() {
        let m = tiny(24);
        let p = prompts();
        // Repeated prompts, not next to each other, among distinct ones; sampled, so each row
        // must keep its own random stream.
        let batch = vec![p[0].clone(), p[1].clone(), p[0].clone(), p[2].clone(), p[0].clone(), p[1].clone()];
        let cfg =
            GenerateConfig { max_new_tokens: 10, temperature: 1.2, top_k: None, seed: 5, ..GenerateConfig::default() };
        let shared = run(&m, &batch, &cfg, None);
        // Each row as the padded batch of all-distinct prompts would run it: a batch in which
        // the row's prompt is the only copy (the others get one token more, so none repeats).
        for (row, c) in shared.iter().enumerate() {
            let others: Vec<Vec<u32>> = batch
                .iter()
                .enumerate()
                .map(|(i, q)| if i == row { q.clone() } else { [q.as_slice(), &[i as u32 + 200]].concat() })
                .collect();
            let distinct = run(&m, &others, &cfg, None);
            assert_eq!(c.tokens, distinct[row].tokens, "row {row}");
            for (x, y) in c.logprobs.iter().zip(&distinct[row].logprobs) {
                assert!((x - y).abs() < 1e-5, "row {row}");
            }
        }
        assert_ne!(shared[0].tokens, shared[2].tokens, "the copies of a prompt sample on their own streams");
    }

    #[test]
    fn logprobs_are_the_untempered_policy_of_a_full_forward() {
        let mut m = tiny(22);
        m.add_adapter("pi", &LoraConfig::default()).unwrap();
        randomize_b(&m, "pi", 3);
        // Short generations apply the adapter as it is, long ones merge it into the weights.
        for n in [6, MERGE_MIN_NEW_TOKENS] {
            let cfg = GenerateConfig {
                max_new_tokens: n,
                temperature: 0.7,
                top_k: Some(5),
                seed: 4,
                ..GenerateConfig::default()
            };
            let out = generate_with(&m, &prompts(), &cfg, Some("pi"), None, 0, &letters).unwrap();
            for (p, c) in prompts().iter().zip(&out) {
                assert_eq!(c.tokens.len(), n);
                let full: Vec<u32> = p.iter().chain(&c.tokens).copied().collect();
                let ids = Tensor::new(full.as_slice(), m.device()).unwrap().unsqueeze(0).unwrap();
                let logits = m.forward(&ids, None, Some("pi")).unwrap().squeeze(0).unwrap();
                let lp = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
                for (j, (&tok, &got)) in c.tokens.iter().zip(&c.logprobs).enumerate() {
                    let want = lp[p.len() - 1 + j][tok as usize];
                    assert!((got - want).abs() < 1e-4, "token {j}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn sampling_is_reproducible_per_seed() {
        let m = tiny(23);
        let cfg = GenerateConfig {
            max_new_tokens: 10,
            temperature: 1.5,
            top_k: None,
            top_p: Some(0.95),
            seed: 7,
            ..GenerateConfig::default()
        };
        let a = run(&m, &prompts(), &cfg, None);
        let b = run(&m, &prompts(), &cfg, None);
        assert_eq!(a, b);
        let c = run(&m, &prompts(), &GenerateConfig { seed: 8, ..cfg.clone() }, None);
        assert_ne!(a.iter().map(|x| &x.tokens).collect::<Vec<_>>(), c.iter().map(|x| &x.tokens).collect::<Vec<_>>());
        // top-k 1 is greedy whatever the temperature.
        let k1 = run(&m, &prompts(), &GenerateConfig { top_k: Some(1), top_p: None, ..cfg.clone() }, None);
        let greedy = run(&m, &prompts(), &GenerateConfig { temperature: 0.0, ..cfg }, None);
        for (x, y) in k1.iter().zip(&greedy) {
            assert_eq!(x.tokens, y.tokens);
        }
    }

    #[test]
    fn stop_strings_and_eos_end_completions() {
        let m = tiny(24);
        let cfg = GenerateConfig { max_new_tokens: 10, temperature: 0.0, ..GenerateConfig::default() };
        let free = run(&m, &prompts()[..1], &cfg, None).remove(0);
        assert_eq!(free.text, letters(&free.tokens).unwrap());
        // Stop on the text of tokens 3..5: the text is cut before it, generation stops at token 5.
        let stop = free.text[3..5].to_string();
        let first = free.text.find(&stop).unwrap();
        let stopped =
            run(&m, &prompts()[..1], &GenerateConfig { stop: vec!["zzzz".into(), stop.clone()], ..cfg.clone() }, None)
                .remove(0);
        assert_eq!(stopped.finish, FinishReason::Stop);
        assert_eq!(stopped.text, free.text[..first]);
        assert_eq!(stopped.tokens, free.tokens[..first + 2]);
        // EOS: the first occurrence of the third token ends the completion; it is not in the text.
        let eos = free.tokens[2];
        let at = free.tokens.iter().position(|&t| t == eos).unwrap();
        let ended = run(&m, &prompts()[..1], &cfg, Some(eos)).remove(0);
        assert_eq!(ended.finish, FinishReason::Eos);
        assert_eq!(ended.tokens, free.tokens[..=at]);
        assert_eq!(ended.text, letters(&free.tokens[..at]).unwrap());
        // Rows that end early leave the batch; the others are unaffected.
        let mixed = run(&m, &prompts(), &cfg, Some(eos));
        let alone = run(&m, &prompts()[1..], &cfg, Some(eos));
        let key = |c: &Completion| (c.tokens.clone(), c.text.clone(), c.finish);
        assert_eq!(key(&mixed[0]), key(&ended));
        for (x, y) in mixed[1..].iter().zip(&alone) {
            assert_eq!(key(x), key(y));
        }
    }

    #[test]
    fn sample_respects_top_k_top_p_and_temperature() {
        use rand::SeedableRng;
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let log_z = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut counts = [0usize; 4];
        let cfg = GenerateConfig { temperature: 1.0, top_k: Some(3), top_p: None, ..GenerateConfig::default() };
        for _ in 0..20_000 {
            let (t, lp) = sample(&logits, &cfg, &mut rng);
            assert!((lp - (logits[t as usize] - log_z)).abs() < 1e-6);
            counts[t as usize] += 1;
        }
        assert_eq!(counts[3], 0, "outside the top 3");
        // Renormalised over the top 3: e^2, e^1, e^0 over their sum.
        let z: f64 = [2f64, 1.0, 0.0].iter().map(|x| x.exp()).sum();
        for (i, &n) in counts.iter().take(3).enumerate() {
            let want = (2.0 - i as f64).exp() / z;
            assert!((n as f64 / 20_000.0 - want).abs() < 0.015, "token {i}");
        }
        // top-p 0.5 keeps only the first token (its probability is 0.64).
        let cfg = GenerateConfig { temperature: 1.0, top_k: None, top_p: Some(0.5), ..GenerateConfig::default() };
        assert!((0..100).all(|_| sample(&logits, &cfg, &mut rng).0 == 0));
        // A very low temperature is greedy in effect.
        let cfg = GenerateConfig { temperature: 1e-3, top_k: None, ..GenerateConfig::default() };
        assert!((0..100).all(|_| sample(&logits, &cfg, &mut rng).0 == 0));
    }

    #[test]
    fn invalid_requests_are_errors() {
        let m = tiny(25);
        let cfg = GenerateConfig::default();
        assert!(generate_with(&m, &[vec![]], &cfg, None, None, 0, &letters).is_err());
        assert!(generate_with(&m, &[vec![300]], &cfg, None, None, 0, &letters).is_err());
        assert!(generate_with(&m, &[vec![1]], &cfg, Some("nope"), None, 0, &letters).is_err());
        let bad = GenerateConfig { top_p: Some(0.0), ..GenerateConfig::default() };
        assert!(generate_with(&m, &[vec![1]], &bad, None, None, 0, &letters).is_err());
        assert!(generate_with(&m, &[], &cfg, None, None, 0, &letters).unwrap().is_empty());
    }
}
