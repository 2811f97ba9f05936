//! One Llama-family decoder in candle, with named LoRA adapter sets over one frozen base.
//!
//! Covers SmolLM2, Llama 2/3 and CodeLlama: RMSNorm, rotary embeddings (the Hugging Face
//! "rotate half" layout), grouped-query attention, SwiGLU and tied or untied embeddings.
//!
//! The base weights are plain tensors, never `Var`s, so a backward pass gives gradients to the
//! selected adapter only. The non-linear pieces (RMSNorm, softmax, rotary embedding, the frozen
//! linear layers) live in [`crate::ops`], which gives them fused kernels with backward passes.
//!
//! Padding is on the left. Positions are counted over real tokens only (`cumsum(mask) - 1`), as
//! transformers' `generate` does, so a padded prompt sees exactly the positions it would see alone.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::lora::LoraAdapter;
pub use crate::ops::frozen_linear;
use crate::ops::{attention as attention_op, rms_norm, rope, swiglu};

mod adapters;
mod checkpoint;
mod config;
mod flops;
mod kv_cache;
mod quantized;
#[cfg(test)]
pub(crate) mod tests;

use crate::bf16::{Bf16Matrix, FrozenWeight, MatmulPrecision};
pub use crate::error::{ModelError, Result};
pub use config::{Llama3RopeScaling, LlamaConfig, Projection};
pub use flops::{Flops, PassFlops};
pub use kv_cache::KvCache;
pub use quantized::{GenerationWeights, QuantizedWeights};

/// The frozen weights of one decoder block. Linear weights are `[out, in]` as in PyTorch, with
/// query and key rows in the Hugging Face (rotate-half) order.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// RMSNorm scale before attention (`input_layernorm`).
    pub attn_norm: Tensor,
    /// The projections, indexed by `Projection as usize`.
    pub proj: [Tensor; 7],
    /// RMSNorm scale before the feed-forward layer (`post_attention_layernorm`).
    pub mlp_norm: Tensor,
}

/// The frozen weights of a whole model.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// Token embedding `[vocab, hidden]`.
    pub embed: Tensor,
    /// Decoder blocks.
    pub blocks: Vec<BlockWeights>,
    /// Final RMSNorm scale.
    pub norm: Tensor,
    /// Output projection `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// The adapter set to apply; `None` is the frozen base model.
    pub adapter: Option<&'a str>,
    /// Keep the adapter's tensors in the autograd graph (training). When false the adapter is
    /// applied detached and the fused no-backward kernels are used.
    pub track_grad: bool,
    /// Seed of the LoRA dropout masks; `None` applies no dropout (evaluation).
    pub dropout_seed: Option<u64>,
}

/// An adapter folded into copies of the weights it adapts (see [`Llama::merge_adapter`]).
#[derive(Debug, Clone)]
pub struct MergedAdapter {
    /// `layers[i][p as usize]`: the merged weight, `None` where the adapter has no pair.
    layers: Vec<[Option<Tensor>; 7]>,
}

/// A Llama-family decoder: one frozen base plus named LoRA adapter sets.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    w: LlamaWeights,
    inv_freq: Vec<f32>,
    adapters: BTreeMap<String, LoraAdapter>,
    device: Device,
    dtype: DType,
    /// What generation samples with, and the quantised copies once made (`quantized.rs`).
    generation: GenerationWeights,
    quantized: std::sync::OnceLock<QuantizedWeights>,
    /// The matrix-product work of every pass so far ([`Llama::flops`]).
    flops: flops::FlopCounter,
    /// Whether training passes recompute their blocks in the backward pass
    /// ([`Llama::set_activation_checkpointing`]), and the adapter gradients those recomputations
    /// leave for [`Llama::backward`].
    recompute_blocks: bool,
    checkpoint_grads: std::sync::Arc<checkpoint::Gradients>,
    /// The precision of the products by the frozen weights in exact passes, and the bf16 copies
    /// of the weights when it is bf16 ([`Llama::set_matmul_precision`]).
    matmul: MatmulPrecision,
    bf16: Option<std::sync::Arc<Bf16Weights>>,
}

/// bf16 copies of a model's frozen linear weights, for products in bf16 ([`crate::bf16`]).
#[derive(Debug)]
struct Bf16Weights {
    /// `proj[layer][p as usize]`.
    proj: Vec<[std::sync::Arc<Bf16Matrix>; 7]>,
    /// The output projection (the embedding's copy when the two are tied).
    head: std::sync::Arc<Bf16Matrix>,
}

/// The weights one pass multiplies by.
#[derive(Clone, Copy)]
enum Base<'a> {
    /// The frozen base, the adapter (if any) applied as it is.
    Exact,
    /// An adapter folded into copies of the weights it adapts.
    Merged(&'a MergedAdapter),
    /// Quantised copies of the base, the adapter (if any) added in f32.
    Quantized(&'a QuantizedWeights),
}

/// Where the queries of one pass sit: rotary tables and the additive attention mask.
#[derive(Clone)]
struct PassGeometry {
    /// `[B, T, D/2]` cos and sin of the new positions (model dtype).
    cos: Tensor,
    sin: Tensor,
    /// Additive mask `[B, 1, 1, Tq, Tk]` (0 or a large negative), `None` when nothing is masked
    /// and the pass is a single query.
    mask: Option<Tensor>,
}

const MASKED: f32 = -1.0e30;

impl Llama {
    /// Builds a model from its configuration and frozen weights. All weights must be on one
    /// device and share one floating dtype.
    pub fn new(cfg: LlamaConfig, w: LlamaWeights) -> Result<Llama> {
        cfg.validate()?;
        if w.blocks.len() != cfg.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "config has {} layers but {} blocks of weights were given",
                cfg.num_hidden_layers,
                w.blocks.len()
            )));
        }
        let expect = |t: &Tensor, shape: &[usize], what: &str| -> Result<()> {
            if t.dims() != shape {
                return Err(ModelError::Config(format!(
                    "{what}: shape {:?}, expected {shape:?} from the configuration",
                    t.dims()
                )));
            }
            Ok(())
        };
        let h = cfg.hidden_size;
        expect(&w.embed, &[cfg.vocab_size, h], "token embedding")?;
        expect(&w.norm, &[h], "final norm")?;
        if let Some(head) = &w.lm_head {
            expect(head, &[cfg.vocab_size, h], "output projection")?;
        }
        for (i, b) in w.blocks.iter().enumerate() {
            expect(&b.attn_norm, &[h], &format!("layer {i} input_layernorm"))?;
            expect(&b.mlp_norm, &[h], &format!("layer {i} post_attention_layernorm"))?;
            for p in Projection::ALL {
                let (i_dim, o_dim) = p.dims(&cfg);
                expect(&b.proj[p as usize], &[o_dim, i_dim], &format!("layer {i} {}", p.hf_name()))?;
            }
        }
        let device = w.embed.device().clone();
        let dtype = w.embed.dtype();
        let inv_freq = cfg.inv_freq();
        Ok(Llama {
            cfg,
            w,
            inv_freq,
            adapters: BTreeMap::new(),
            device,
            dtype,
            generation: GenerationWeights::Exact,
            quantized: std::sync::OnceLock::new(),
            flops: flops::FlopCounter::default(),
            recompute_blocks: false,
            checkpoint_grads: Default::default(),
            matmul: MatmulPrecision::F32,
            bf16: None,
        })
    }

    /// A randomly initialised model (normal weights with std 0.02, unit norms), for tests and
    /// benchmarks. Deterministic in `seed`.
    pub fn random(cfg: LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Llama> {
        use rand::{Rng, SeedableRng};
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
            // Box-Muller; rand 0.9 has no normal distribution without rand_distr.
            let n = shape.0 * shape.1;
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                let u2: f32 = rng.random::<f32>();
                let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                v.push(r * (2.0 * std::f32::consts::PI * u2).cos());
                v.push(r * (2.0 * std::f32::consts::PI * u2).sin());
            }
            v.truncate(n);
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let h = cfg.hidden_size;
        let embed = normal((cfg.vocab_size, h))?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for p in Projection::ALL {
                let (i, o) = p.dims(&cfg);
                proj.push(normal((o, i))?);
            }
            let proj: [Tensor; 7] = proj.try_into().map_err(|_| ModelError::Invalid("seven projections".into()))?;
            blocks.push(BlockWeights {
                attn_norm: Tensor::ones(h, dtype, device)?,
                proj,
                mlp_norm: Tensor::ones(h, dtype, device)?,
            });
        }
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(normal((cfg.vocab_size, h))?) };
        let norm = Tensor::ones(h, dtype, device)?;
        Llama::new(cfg, LlamaWeights { embed, blocks, norm, lm_head })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the frozen weights and of the activations (f32 on CPU, bf16 on CUDA).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The frozen weights.
    pub fn weights(&self) -> &LlamaWeights {
        &self.w
    }

    /// The matrix-product operations of the passes this model has run so far (forward, and
    /// backward for passes that tracked an adapter's gradients; see [`Flops`] for what is
    /// counted). Take the difference of two readings to count one piece of work.
    pub fn flops(&self) -> Flops {
        self.flops.get()
    }

    /// The precision of the products by the frozen linear weights in the passes that use them
    /// as they are (training, log-probabilities, perplexity; generation from quantised copies is
    /// not affected): f32 (the default of [`Llama::new`]) or, on the CPU, bf16 operands with f32
    /// accumulation (see [`crate::bf16`]; the loader picks with
    /// [`MatmulPrecision::for_this_machine`]). bf16 keeps a bf16 copy of every linear weight and
    /// of the output projection, half the size of the f32 base; f32 drops it.
    ///
    /// # Errors
    /// bf16 for a model that is not f32 on the CPU, or where no bf16 BLAS is loaded.
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        if precision == self.matmul {
            return Ok(());
        }
        self.bf16 = match precision {
            MatmulPrecision::F32 => None,
            MatmulPrecision::Bf16 => {
                if !self.device.is_cpu() || self.dtype != DType::F32 {
                    return Err(ModelError::Invalid(format!(
                        "bf16 products are for f32 models on the CPU, not {:?} on {:?}",
                        self.dtype, self.device
                    )));
                }
                if crate::blas::bf16_blas().is_none() {
                    return Err(ModelError::Invalid(crate::bf16::NO_BF16_BLAS.into()));
                }
                let copy = |t: &Tensor| Bf16Matrix::from_tensor(t).map(std::sync::Arc::new);
                let mut proj = Vec::with_capacity(self.w.blocks.len());
                for b in &self.w.blocks {
                    let ws: Vec<_> = b.proj.iter().map(copy).collect::<Result<_>>()?;
                    proj.push(ws.try_into().map_err(|_| ModelError::Invalid("seven projections expected".into()))?);
                }
                let head = copy(self.w.lm_head.as_ref().unwrap_or(&self.w.embed))?;
                Some(std::sync::Arc::new(Bf16Weights { proj, head }))
            }
        };
        self.matmul = precision;
        Ok(())
    }

    /// The precision of the products by the frozen weights ([`Llama::set_matmul_precision`]).
    pub fn matmul_precision(&self) -> MatmulPrecision {
        self.matmul
    }

    /// Activation checkpointing for training passes (off by default): a pass that tracks an
    /// adapter's gradients keeps each decoder block's input and output only, and runs the block
    /// again during the backward pass to get what it needs. The peak memory of a training step
    /// then grows with the layers by one `[tokens, hidden + 2·kv]` tensor per block instead of
    /// every intermediate, for one more forward pass of work. Gradients are the same (to float
    /// rounding); take them with [`Llama::backward`].
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.recompute_blocks = on;
    }

    /// Whether [`Llama::set_activation_checkpointing`] is on.
    pub fn activation_checkpointing(&self) -> bool {
        self.recompute_blocks
    }

    /// The gradients of `loss`: `loss.backward()`, plus the adapter gradients of the blocks that
    /// activation checkpointing ran again (they are outside candle's graph, which sees each such
    /// block as one op of its input). Use this instead of `Tensor::backward` for any loss of a
    /// training pass.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        // Whatever an earlier plain `Tensor::backward` left does not belong to this loss.
        self.checkpoint_grads.take();
        let mut grads = loss.backward()?;
        for (var, g) in self.checkpoint_grads.take() {
            let sum = match grads.remove(&var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&var, sum);
        }
        Ok(grads)
    }

    /// Full-sequence forward for training and scoring: logits `[B, T, V]` in f32, tracking
    /// gradients of the adapter (if any).
    ///
    /// `input_ids`: `[B, T]` u32. `attention_mask`: `[B, T]` (any integer or float dtype),
    /// 1 for tokens and 0 for left padding; `None` means no padding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&str>,
    ) -> Result<Tensor> {
        let opts = ForwardOptions { adapter, track_grad: true, dropout_seed: None };
        let hidden = self.forward_hidden(input_ids, attention_mask, &opts)?;
        self.logits(&hidden)
    }

    /// Full-sequence forward up to the final norm: hidden states `[B, T, hidden]` in the model
    /// dtype. Take the rows you need and call [`Llama::logits`] to save memory on big vocabularies.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let (b, _) = input_ids.dims2()?;
        let mut cache = KvCache::new(self, b);
        self.forward_step(input_ids, attention_mask, &mut cache, opts)
    }

    /// Output projection of (final-normed) hidden states of any leading shape: logits in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = FrozenWeight {
            tensor: self.w.lm_head.as_ref().unwrap_or(&self.w.embed),
            bf16: self.bf16.as_ref().map(|w| &w.head),
        };
        let dims = hidden.dims().to_vec();
        let h = *dims.last().ok_or_else(|| ModelError::Invalid("logits: scalar input".into()))?;
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x = hidden.reshape((n, h))?;
        let work = self.cfg.head_flops(n);
        // Frozen head: its backward pass is the input's gradient alone, one product.
        self.flops.add(work, hidden.track_op().then_some(work));
        let y = frozen_linear(&x, head)?.to_dtype(DType::F32)?;
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(self.cfg.vocab_size);
        Ok(y.reshape(out)?)
    }

    /// Incremental forward: runs the new tokens `[B, Tq]` after what `cache` holds, appends
    /// their keys/values, and returns their final-normed hidden states `[B, Tq, hidden]`.
    ///
    /// `attention_mask` covers the new tokens only (`[B, Tq]`, 1 = token, 0 = padding);
    /// `None` means all are tokens. Padding may be on the left (prompts) or on the right
    /// (continuations of different lengths); padded positions take no position id. After an
    /// error the cache must not be used again.
    pub fn forward_step(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        self.run(input_ids, attention_mask, cache, opts, Base::Exact)
    }

    /// [`Llama::forward_step`] with an adapter folded into the weights by
    /// [`Llama::merge_adapter`]: no gradients, no per-projection LoRA products (faster decoding).
    pub fn forward_step_merged(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        merged: &MergedAdapter,
    ) -> Result<Tensor> {
        if merged.layers.len() != self.cfg.num_hidden_layers {
            return Err(ModelError::Invalid("merged adapter made for another model".into()));
        }
        self.run(input_ids, attention_mask, cache, &ForwardOptions::default(), Base::Merged(merged))
    }

    /// Folds an adapter into copies of the weights it adapts: `W + (alpha / r) B A`, computed in
    /// f32 and stored in the model dtype. Costs one copy of every adapted weight; use it for a
    /// generation call and drop it (it does not follow later changes of the adapter).
    pub fn merge_adapter(&self, name: &str) -> Result<MergedAdapter> {
        let a = self.adapter(name)?;
        let scale = a.config().scale();
        let mut layers = Vec::with_capacity(self.cfg.num_hidden_layers);
        for (li, blk) in self.w.blocks.iter().enumerate() {
            let mut slots: [Option<Tensor>; 7] = Default::default();
            for p in Projection::ALL {
                if let Some(pair) = a.pair(li, p) {
                    let delta = (pair.b.as_detached_tensor().matmul(&pair.a.as_detached_tensor())? * scale)?;
                    let w = (blk.proj[p as usize].to_dtype(DType::F32)? + delta)?.to_dtype(self.dtype)?;
                    slots[p as usize] = Some(w);
                }
            }
            layers.push(slots);
        }
        Ok(MergedAdapter { layers })
    }

    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        opts: &ForwardOptions,
        base: Base,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if b != cache.batch() {
            return Err(ModelError::Invalid(format!("batch of {b} rows but the cache holds {}", cache.batch())));
        }
        if t == 0 {
            return Err(ModelError::Invalid("forward on an empty sequence".into()));
        }
        let new_mask: Vec<Vec<u8>> = match attention_mask {
            None => vec![vec![1; t]; b],
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(ModelError::Invalid(format!(
                        "attention mask of shape {:?}, expected [{b}, {t}]",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|x| u8::from(x != 0.0)).collect())
                    .collect()
            }
        };
        let adapter = match opts.adapter {
            None => None,
            Some(name) => Some(self.adapters.get(name).ok_or_else(|| ModelError::UnknownAdapter(name.to_string()))?),
        };
        let geo = self.geometry(cache, &new_mask)?;
        let work = self.cfg.pass_flops(b, t, cache.len);
        let tracked = opts.track_grad && adapter.is_some();
        self.flops.add(work.forward(), tracked.then(|| work.backward()));

        // Activation checkpointing (see `checkpoint.rs`) applies to training passes through the
        // exact weights with a growing cache; `recompute` holds what its blocks share.
        let recompute = match (adapter, base) {
            (Some(a), Base::Exact) if tracked && self.recompute_blocks && cache.grows() => {
                Some(checkpoint::Pass::new(self, a, &geo, (b, t), opts.dropout_seed))
            }
            _ => None,
        };
        let mut checkpointed = 0;
        let mut x = self.w.embed.embedding(&input_ids.flatten_all()?)?; // [B*T, H]
        for (li, blk) in self.w.blocks.iter().enumerate() {
            if let Some(pass) = &recompute {
                if let Some(y) = pass.block(li, &x, cache)? {
                    x = y;
                    checkpointed += 1;
                    continue;
                }
            }
            let lora = adapter.map(|a| (a, li));
            let lin = |x: &Tensor, p: Projection| -> Result<Tensor> {
                match base {
                    Base::Exact => {}
                    Base::Merged(m) => {
                        if let Some(w) = m.layers[li][p as usize].as_ref() {
                            return frozen_linear(x, FrozenWeight::exact(w));
                        }
                    }
                    Base::Quantized(q) => {
                        let y = q.linear(li, p, x)?;
                        return match lora {
                            None => Ok(y),
                            Some((a, li)) => a.add_delta(li, p, x, y),
                        };
                    }
                }
                let w = FrozenWeight {
                    tensor: &blk.proj[p as usize],
                    bf16: self.bf16.as_ref().map(|w| &w.proj[li][p as usize]),
                };
                match lora {
                    None => frozen_linear(x, w),
                    Some((a, li)) => a.linear(li, p, x, w, opts, self.dtype),
                }
            };
            x = block(&self.cfg, blk, &geo, (b, t), &x, &lin, &mut |k, v| cache.append(li, k, v))?;
        }
        // The backward pass runs the checkpointed blocks forward again.
        if checkpointed > 0 {
            let per_block = work.forward() / self.cfg.num_hidden_layers as f64;
            self.flops.add(0.0, Some(per_block * checkpointed as f64));
        }
        let x = rms_norm(&x, &self.w.norm, self.cfg.rms_norm_eps)?;
        // Positions and mask advance once every layer has its keys/values (after an error the
        // cache is inconsistent and must be dropped, as documented on forward_step).
        for (row, m) in cache.mask.iter_mut().zip(&new_mask) {
            m.iter().for_each(|&v| row.push(v));
        }
        for (p, m) in cache.next_pos.iter_mut().zip(&new_mask) {
            *p += m.iter().map(|&v| v as usize).sum::<usize>();
        }
        cache.len += t;
        Ok(x.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Rotary tables of the new positions and the attention mask over cached + new keys.
    fn geometry(&self, cache: &KvCache, new_mask: &[Vec<u8>]) -> Result<PassGeometry> {
        let b = new_mask.len();
        let t = new_mask[0].len();
        let past = cache.len;
        let tk = past + t;
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        let mut any_masked = false;
        for (row, m) in new_mask.iter().enumerate() {
            let mut pos = cache.next_pos[row];
            for &tok in m {
                // Padding takes the position of the next real token; it is masked anyway.
                for &f in &self.inv_freq {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
                if tok == 1 {
                    pos += 1;
                } else {
                    any_masked = true;
                }
            }
            any_masked |= cache.mask[row].contains(&0);
        }
        let cos = Tensor::from_vec(cos, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        let mask = if !any_masked && t == 1 {
            None
        } else {
            let mut m = vec![0f32; b * t * tk];
            for (row, (past_mask, new_row)) in cache.mask.iter().zip(new_mask).enumerate() {
                let keys: Vec<u8> = past_mask.iter().chain(new_row.iter()).copied().collect();
                for q in 0..t {
                    let qa = past + q;
                    let base = (row * t + q) * tk;
                    for k in 0..tk {
                        // A query always sees itself, so a padding row is never fully masked.
                        let visible = k == qa || (k < qa && keys[k] == 1);
                        if !visible {
                            m[base + k] = MASKED;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(m, (b, 1, 1, t, tk), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok(PassGeometry { cos, sin, mask })
    }
}

/// Multiplies by one projection of a block (adapted or not, exact or quantised weights).
type Linear<'a> = dyn Fn(&Tensor, Projection) -> Result<Tensor> + 'a;

/// Takes a block's new keys and values and returns all those its queries attend to.
type KvAppend<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<(Tensor, Tensor)> + 'a;

/// One decoder block over `x` `[B*T, H]` (`bt` = (B, T)): attention and the feed-forward layer,
/// each after its RMSNorm and added to its input. `lin` multiplies by a projection (adapted or
/// not); `kv` receives the block's new keys and values `[B, kvH, T, D]` and returns all the keys
/// and values the queries attend to (the cache's, or a checkpoint's past followed by the new).
fn block(
    cfg: &LlamaConfig,
    w: &BlockWeights,
    geo: &PassGeometry,
    bt: (usize, usize),
    x: &Tensor,
    lin: &Linear<'_>,
    kv: &mut KvAppend<'_>,
) -> Result<Tensor> {
    let h = rms_norm(x, &w.attn_norm, cfg.rms_norm_eps)?;
    let h = attention(cfg, &h, bt, geo, lin, kv)?;
    let x = (x + h)?;
    let h = rms_norm(&x, &w.mlp_norm, cfg.rms_norm_eps)?;
    let gate = lin(&h, Projection::Gate)?;
    let up = lin(&h, Projection::Up)?;
    let h = lin(&swiglu(&gate, &up)?, Projection::Down)?;
    Ok((x + h)?)
}

/// Grouped-query attention of one block (see [`block`] for `lin` and `kv`).
fn attention(
    cfg: &LlamaConfig,
    x: &Tensor,
    (b, t): (usize, usize),
    geo: &PassGeometry,
    lin: &Linear<'_>,
    kv: &mut KvAppend<'_>,
) -> Result<Tensor> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let n_rep = nh / nkv;
    let q = lin(x, Projection::Q)?.reshape((b, t, nh, hd))?;
    let k = lin(x, Projection::K)?.reshape((b, t, nkv, hd))?;
    let v = lin(x, Projection::V)?.reshape((b, t, nkv, hd))?;
    let q = rope(&q, &geo.cos, &geo.sin)?.transpose(1, 2)?.contiguous()?;
    let k = rope(&k, &geo.cos, &geo.sin)?.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    let (k, v) = kv(&k, &v)?;
    let tk = k.dim(2)?;
    // Grouped-query attention without repeating K/V: the n_rep query heads that share a
    // key/value head become extra rows of one matmul.
    // The 1/sqrt(d) scale goes on q, the smaller operand, not on the scores.
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q * scale)?.reshape((b, nkv, n_rep * t, hd))?;
    let mask = geo.mask.as_ref().map(|m| m.reshape((b, t, tk))).transpose()?;
    let out = attention_op(&q, &k, &v, mask.as_ref(), t)?; // [B, nkv, n_rep*T, D]
    let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
    lin(&out, Projection::O)
}
