//! Integer copies of the frozen linear weights, for sampling only.
//!
//! Decoding on the CPU reads every weight once per step, so it is bound by memory traffic: f32
//! weights cost four bytes a parameter. A [`QuantizedWeights`] holds copies of the seven
//! projections of every block and of the output projection in blocks of 32 ([`crate::quant`]):
//! exact 4-bit blocks (`d · q + m`, 0.75 bytes a weight) where the f32 weights have that form, as
//! those dequantised from a Q4_1 GGUF do (the default model's projections), else 8-bit blocks
//! rounded as Q8_0 rounds (1.125 bytes; exact for weights dequantised from Q8_0, as the default
//! model's embedding and output projection). [`Llama::forward_step_quantized`] runs a pass with
//! them: each projection is `x · W_qᵀ`, each block of weights turned back into f32 in registers
//! and multiplied by the f32 activations (only the weights' storage changes), plus, where the
//! selected adapter has a pair, the LoRA term `scale · (x · Aᵀ) · Bᵀ` computed in f32 from the
//! adapter's own tensors, through the products the f32 path uses. The adapters are therefore never quantised and always current:
//! copies made once serve every later adapter update, since the base never changes.
//!
//! Everything that is trained on, or computes log-probabilities for training, uses the f32 path
//! ([`Llama::forward`], [`Llama::forward_hidden`], [`Llama::forward_step`]); the quantised pass has
//! no backward pass. What [`crate::generate`] uses is chosen by [`Llama::set_generation_weights`].

use candle_core::{DType, Device, Tensor};

use super::{Llama, ModelError, Projection, Result};
use crate::ops::with_f32;
use crate::quant::{Format, QMatrix, BLOCK};

/// The weights [`crate::generate`] multiplies by when sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationWeights {
    /// The model's own (training-precision) weights, with the adapter merged into a copy of them
    /// for long generations (see [`Llama::merge_adapter`]).
    Exact,
    /// Integer copies of the linear weights (made on first use and kept; see the module
    /// documentation), adapters in f32. CPU and f32 models only; elsewhere generation uses the
    /// exact weights.
    Quantized,
}

impl GenerationWeights {
    /// What [`crate::load_model`] sets for f32 models on the CPU.
    pub const CPU_DEFAULT: GenerationWeights = GenerationWeights::Quantized;

    /// Parses `f32` (or `exact`) and `quantized`, case-insensitive.
    pub fn parse(s: &str) -> Result<GenerationWeights> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "exact" => Ok(GenerationWeights::Exact),
            "quantized" => Ok(GenerationWeights::Quantized),
            other => Err(ModelError::Invalid(format!("generation weights {other:?}: expected f32 or quantized"))),
        }
    }

    /// The name [`GenerationWeights::parse`] reads back: `f32` or `quantized`.
    pub fn name(self) -> &'static str {
        match self {
            GenerationWeights::Exact => "f32",
            GenerationWeights::Quantized => "quantized",
        }
    }
}

/// Integer copies of a model's linear weights (see the module documentation).
#[derive(Debug, Clone)]
pub struct QuantizedWeights {
    /// `layers[i][p as usize]`.
    layers: Vec<[QMatrix; 7]>,
    /// The output projection (the embedding when tied).
    head: QMatrix,
}

impl QuantizedWeights {
    /// Bytes held by the copies.
    pub fn size_in_bytes(&self) -> usize {
        self.matrices().map(QMatrix::size_in_bytes).sum()
    }

    /// How many of the matrices are exact 4-bit copies, out of how many.
    pub fn exact_4bit(&self) -> (usize, usize) {
        (self.matrices().filter(|m| m.format() == Format::Q4).count(), self.matrices().count())
    }

    /// A one-line description: bytes and formats.
    pub fn describe(&self) -> String {
        let (q4, all) = self.exact_4bit();
        format!(
            "{:.0} MB: {q4} of {all} weight matrices exact in 4 bits (d·q+m), the others 8-bit (Q8_0's rounding)",
            self.size_in_bytes() as f64 / 1e6
        )
    }

    fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers.iter().flatten().chain(std::iter::once(&self.head))
    }

    /// `x · W_qᵀ` for projection `p` of block `layer` (`x`: `[N, in]` f32 on the CPU).
    pub(super) fn linear(&self, layer: usize, p: Projection, x: &Tensor) -> Result<Tensor> {
        times(&self.layers[layer][p as usize], x)
    }

    /// Logits `[N, vocab]` of final-normed hidden states `[N, hidden]`.
    pub(super) fn head(&self, x: &Tensor) -> Result<Tensor> {
        times(&self.head, x)
    }
}

/// `x · wᵀ` for a 2-D f32 CPU `x`.
fn times(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.cols() || x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Err(ModelError::Invalid(format!(
            "quantised product: input [{m}, {k}] {:?} against weights [{}, {}] (f32 on the CPU expected)",
            x.dtype(),
            w.rows(),
            w.cols()
        )));
    }
    let y =
        with_f32(&[x], |v| w.matmul_t(v[0], m)).map_err(|e| ModelError::Invalid(format!("quantised product: {e}")))?;
    Ok(Tensor::from_vec(y, (m, w.rows()), &Device::Cpu)?)
}

impl Llama {
    /// Integer copies of the seven projections of every block and of the output projection (see
    /// the module documentation). CPU, f32 models whose weights' input widths are multiples of 32
    /// only ([`Llama::can_quantize`]).
    pub fn quantize_weights(&self) -> Result<QuantizedWeights> {
        if !self.can_quantize() {
            return Err(ModelError::Invalid(format!(
                "quantised generation weights need an f32 model on the CPU whose widths are multiples of {BLOCK}; \
                 this one is {:?} on {:?}",
                self.dtype,
                self.device.location()
            )));
        }
        // Read in place: a copy of the (tied) output projection alone would be 113 MB on the
        // default model.
        let quantize = |w: &Tensor| -> Result<QMatrix> {
            let (n, k) = w.dims2()?;
            with_f32(&[w], |v| QMatrix::new(v[0], n, k))
                .map_err(|e| ModelError::Invalid(format!("quantised copies: {e}")))
        };
        let mut layers = Vec::with_capacity(self.w.blocks.len());
        for blk in &self.w.blocks {
            let slots = blk.proj.iter().map(quantize).collect::<Result<Vec<_>>>()?;
            let slots: [QMatrix; 7] = slots.try_into().map_err(|_| ModelError::Invalid("seven projections".into()))?;
            layers.push(slots);
        }
        let head = quantize(self.w.lm_head.as_ref().unwrap_or(&self.w.embed))?;
        Ok(QuantizedWeights { layers, head })
    }

    /// Whether [`Llama::quantize_weights`] can make copies of this model: f32 on the CPU, every
    /// weight's input width a multiple of 32.
    pub fn can_quantize(&self) -> bool {
        let c = &self.cfg;
        self.device.is_cpu()
            && self.dtype == DType::F32
            && [c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim]
                .iter()
                .all(|k| k.is_multiple_of(BLOCK))
    }

    /// What [`crate::generate`] multiplies by (see [`GenerationWeights`]).
    pub fn generation_weights(&self) -> GenerationWeights {
        self.generation
    }

    /// Chooses the weights [`crate::generate`] samples with. [`Llama::new`] starts with
    /// [`GenerationWeights::Exact`]; [`crate::load_model`] sets [`GenerationWeights::CPU_DEFAULT`]
    /// for f32 models on the CPU. Copies made earlier are kept (see [`Llama::drop_quantized`]).
    pub fn set_generation_weights(&mut self, weights: GenerationWeights) {
        self.generation = weights;
    }

    /// Frees the quantised copies (they are made again when generation needs them).
    pub fn drop_quantized(&mut self) {
        self.quantized = std::sync::OnceLock::new();
    }

    /// The quantised copies generation uses: `None` for [`GenerationWeights::Exact`] or a model
    /// that cannot be quantised ([`Llama::can_quantize`]). Made on the first call (about a second
    /// for a 135M model on 2 cores) and kept with the model.
    pub fn generation_quantized(&self) -> Result<Option<&QuantizedWeights>> {
        if self.generation != GenerationWeights::Quantized || !self.can_quantize() {
            return Ok(None);
        }
        if let Some(q) = self.quantized.get() {
            return Ok(Some(q));
        }
        let q = self.quantize_weights()?;
        Ok(Some(self.quantized.get_or_init(|| q)))
    }

    /// [`Llama::forward_step`] on quantised copies of the linear weights, with the adapter named
    /// `adapter` (if any) added in f32 and detached, no dropout. For sampling: there is no backward
    /// pass. Returns final-normed hidden states; take logits with [`Llama::logits_quantized`] (or
    /// [`Llama::logits`] for the f32 output projection).
    pub fn forward_step_quantized(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut super::KvCache,
        adapter: Option<&str>,
        weights: &QuantizedWeights,
    ) -> Result<Tensor> {
        if weights.layers.len() != self.cfg.num_hidden_layers {
            return Err(ModelError::Invalid("quantised weights made for another model".into()));
        }
        let opts = super::ForwardOptions { adapter, track_grad: false, dropout_seed: None };
        self.run(input_ids, attention_mask, cache, &opts, super::Base::Quantized(weights))
    }

    /// [`Llama::logits`] through the quantised output projection of `weights`.
    pub fn logits_quantized(&self, hidden: &Tensor, weights: &QuantizedWeights) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = *dims.last().ok_or_else(|| ModelError::Invalid("logits: scalar input".into()))?;
        let n: usize = dims[..dims.len() - 1].iter().product();
        let y = weights.head(&hidden.reshape((n, h))?)?.to_dtype(DType::F32)?;
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(self.cfg.vocab_size);
        Ok(y.reshape(out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{generate_with, GenerateConfig};
    use crate::lora::LoraConfig;
    use crate::model::tests::{batch, randomize_b, tiny};
    use crate::model::{ForwardOptions, KvCache};

    /// max |a - b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// A tiny model with an adapter on every projection whose B is random (a fresh one has B = 0).
    fn adapted(seed: u64) -> Llama {
        let mut m = tiny(seed);
        m.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
        randomize_b(&m, "pi", 2);
        m
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![vec![5, 17, 99, 3, 250, 8, 1], vec![42], vec![7, 7, 7, 120, 64]]
    }

    /// Logits `[B, T, V]` of the prompts (left-padded) in one pass of the f32 or the quantised path.
    fn logits(m: &Llama, adapter: Option<&str>, q: Option<&QuantizedWeights>) -> Tensor {
        let (ids, mask) = batch(&prompts());
        let mut cache = KvCache::with_capacity(m, 3, 8);
        match q {
            Some(q) => {
                let h = m.forward_step_quantized(&ids, Some(&mask), &mut cache, adapter, q).unwrap();
                m.logits_quantized(&h, q).unwrap()
            }
            None => {
                let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
                m.logits(&m.forward_step(&ids, Some(&mask), &mut cache, &opts).unwrap()).unwrap()
            }
        }
    }

    #[test]
    fn quantized_pass_with_an_adapter_stays_near_the_f32_pass() {
        let m = adapted(41);
        let q = m.quantize_weights().unwrap();
        for adapter in [None, Some("pi")] {
            let e = rel_err(&logits(&m, adapter, Some(&q)), &logits(&m, adapter, None));
            // Measured 1.2e-2 without and 1.3e-2 with the adapter (max |difference| / max |logit|):
            // the random weights are rounded to 8 bits too here, and the tiny model's logits are
            // small (std-0.02 weights). On the default model, whose weights are copied exactly,
            // it is smaller (`trainer/tests/integration/default_model.rs`).
            assert!(e < 2.5e-2, "adapter {adapter:?}: relative error {e}");
        }
    }

    #[test]
    fn adapters_change_the_quantized_pass_as_they_change_the_f32_pass() {
        let m = adapted(42);
        let q = m.quantize_weights().unwrap();
        let change_q = (logits(&m, Some("pi"), Some(&q)) - logits(&m, None, Some(&q))).unwrap();
        let change_f = (logits(&m, Some("pi"), None) - logits(&m, None, None)).unwrap();
        let size = change_f.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(size > 1e-2, "the adapter changes nothing ({size})");
        let e = rel_err(&change_q, &change_f);
        // Measured 1.3e-2 (the adapter moves the logits by up to 0.76).
        assert!(e < 2.5e-2, "relative error of the adapter's effect {e}");
    }

    /// One projection: the quantised path adds the adapter's term exactly as the f32 path does.
    #[test]
    fn the_adapter_term_is_the_f32_paths() {
        let m = adapted(43);
        let q = m.quantize_weights().unwrap();
        let a = m.adapter("pi").unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
        for (li, p) in [(0, Projection::Q), (1, Projection::Down), (1, Projection::Gate)] {
            let x = if p == Projection::Down {
                Tensor::randn(0f32, 1.0, (5, 128), &Device::Cpu).unwrap()
            } else {
                x.clone()
            };
            let w = &m.w.blocks[li].proj[p as usize];
            let w = crate::bf16::FrozenWeight::exact(w);
            let exact = (a.linear(li, p, &x, w, &opts, DType::F32).unwrap()
                - crate::ops::frozen_linear(&x, w).unwrap())
            .unwrap();
            let base = q.linear(li, p, &x).unwrap();
            let added = (a.add_delta(li, p, &x, base.clone()).unwrap() - base).unwrap();
            let e = rel_err(&added, &exact);
            // Measured 6e-8 to 8e-8: the same products, the sums rounded once more.
            assert!(e < 1e-6, "layer {li} {p:?}: {e}");
        }
    }

    #[test]
    fn greedy_generation_equals_the_f32_paths_and_prompts_stay_exact() {
        let mut m = adapted(44);
        let letters =
            |ids: &[u32]| -> Result<String> { Ok(ids.iter().map(|&i| char::from(b'a' + (i % 26) as u8)).collect()) };
        let cfg = GenerateConfig { max_new_tokens: 12, temperature: 0.0, ..GenerateConfig::default() };
        for adapter in [None, Some("pi")] {
            m.set_generation_weights(GenerationWeights::Exact);
            let exact = generate_with(&m, &prompts(), &cfg, adapter, None, 0, &letters).unwrap();
            m.set_generation_weights(GenerationWeights::Quantized);
            let q8 = generate_with(&m, &prompts(), &cfg, adapter, None, 0, &letters).unwrap();
            for (e, q) in exact.iter().zip(&q8) {
                assert_eq!(e.tokens, q.tokens, "adapter {adapter:?}");
                // The first token comes from the prompt pass, which keeps the exact weights.
                assert_eq!(e.logprobs[0], q.logprobs[0]);
                for (x, y) in e.logprobs.iter().zip(&q.logprobs) {
                    assert!((x - y).abs() < 2e-2, "log-probabilities {x} vs {y}");
                }
            }
            // Batched rows equal rows alone on the quantised path too: the integer products are
            // row by row, but BLAS sums the prompt pass and the adapter's terms in another order
            // for another number of rows, and rounding the activations to 8 bits can turn such a
            // difference of an ulp into one of a step (measured: 3e-4).
            for (p, b) in prompts().iter().zip(&q8) {
                let alone = generate_with(&m, std::slice::from_ref(p), &cfg, adapter, None, 0, &letters).unwrap();
                assert_eq!(alone[0].tokens, b.tokens);
                for (x, y) in alone[0].logprobs.iter().zip(&b.logprobs) {
                    assert!((x - y).abs() < 2e-3, "log-probabilities alone {x} and batched {y}");
                }
            }
        }
    }

    #[test]
    fn generation_weights_are_chosen_per_model() {
        let mut m = tiny(45);
        assert_eq!(m.generation_weights(), GenerationWeights::Exact);
        assert!(m.generation_quantized().unwrap().is_none());
        assert!(m.can_quantize());
        m.set_generation_weights(GenerationWeights::Quantized);
        let q = m.generation_quantized().unwrap().expect("copies");
        // Random weights: 8 bits per weight and one f32 per 32, 1.125 bytes per weight of the
        // projections and the output projection.
        let c = m.config();
        let per_layer: usize = Projection::ALL.iter().map(|p| p.dims(c).0 * p.dims(c).1).sum();
        let weights = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size;
        assert_eq!(q.size_in_bytes(), weights * 9 / 8);
        assert_eq!(q.exact_4bit(), (0, 15));
        m.drop_quantized();
        assert!(m.generation_quantized().unwrap().is_some());
        assert_eq!(GenerationWeights::parse("Quantized").unwrap(), GenerationWeights::Quantized);
        assert_eq!(GenerationWeights::parse("f32").unwrap(), GenerationWeights::Exact);
        assert!(GenerationWeights::parse("q4").is_err());
        let bf16 = Llama::random(crate::LlamaConfig::tiny(300), 1, &Device::Cpu, DType::BF16).unwrap();
        assert!(!bf16.can_quantize());
        assert!(bf16.quantize_weights().is_err());
    }
}
