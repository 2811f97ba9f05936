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
use serde::{Deserialize, Serialize};

use crate::lora::{LoraAdapter, LoraConfig};
pub use crate::ops::frozen_linear;
use crate::ops::{attention, rms_norm, rope, swiglu};

/// Errors of the model core: loading, configuration, adapters, generation.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A required file is absent.
    #[error("{path}: not found; expected {expected}")]
    MissingFile {
        /// The path that was looked for.
        path: std::path::PathBuf,
        /// What should have been there.
        expected: String,
    },
    /// A file exists but its content is not something etpo can use.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A model configuration that this implementation does not support or that is inconsistent.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// No adapter set with this name exists.
    #[error("no adapter named {0:?}")]
    UnknownAdapter(String),
    /// An adapter set with this name exists already.
    #[error("an adapter named {0:?} exists already")]
    AdapterExists(String),
    /// Two adapter sets that must have the same shape do not.
    #[error("adapters {0:?} and {1:?} have different configurations")]
    AdapterMismatch(String, String),
    /// A device string that is not `cpu`, `cuda` or `cuda:N`, or a device that is not available.
    #[error("device: {0}")]
    Device(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Invalid arguments to a call (empty batch, inconsistent shapes, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of the model core.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Llama 3.1 style frequency scaling of the rotary embedding (`rope_scaling` with
/// `rope_type: "llama3"` in config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall scaling factor.
    pub factor: f64,
    /// Wavelengths shorter than `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// Wavelengths longer than `original / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// The shape of a Llama-family model (the fields of a Hugging Face config.json that matter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Optional Llama 3.1 frequency scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// Context length the model was trained for (informative; not enforced).
    pub max_position_embeddings: usize,
    /// The output projection is the transposed token embedding.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// A tiny shape for tests and examples: 2 layers, hidden 64, 4 query heads, 2 key/value
    /// heads (head width 16), feed-forward 128, untied embeddings.
    pub fn tiny(vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
        }
    }

    /// Checks that the shapes are consistent.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let positive = [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("head_dim", c.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ModelError::Config(format!("{name} must be positive")));
            }
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            return Err(ModelError::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!("head_dim ({}) must be even", c.head_dim)));
        }
        if c.rope_theta.is_nan() || c.rope_theta <= 0.0 {
            return Err(ModelError::Config("rope_theta must be positive".into()));
        }
        Ok(())
    }

    /// Number of parameters of the base model.
    pub fn num_parameters(&self) -> usize {
        let c = self;
        let h = c.hidden_size;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let per_layer = 2 * h + h * qd + 2 * h * kvd + qd * h + 3 * h * c.intermediate_size;
        let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * h };
        c.vocab_size * h + c.num_hidden_layers * per_layer + h + head
    }

    /// The rotary inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..d).step_by(2).map(|i| 1.0 / base.powf(i as f32 / d as f32)).collect();
        if let Some(s) = &self.rope_scaling {
            let old = s.original_max_position_embeddings as f32;
            let low_wavelen = old / s.low_freq_factor as f32;
            let high_wavelen = old / s.high_freq_factor as f32;
            let factor = s.factor as f32;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor as f32)
                        / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        inv
    }
}

/// The seven linear projections of a decoder block (the LoRA targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Projection {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// Feed-forward gate projection.
    Gate,
    /// Feed-forward up projection.
    Up,
    /// Feed-forward down projection.
    Down,
}

impl Projection {
    /// All projections, in block order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The parent module in a Hugging Face Llama block (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Parses a Hugging Face module name.
    pub fn from_hf_name(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.hf_name() == name)
    }

    /// (input, output) widths of this projection's weight in a model of shape `cfg`.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let kvd = cfg.num_key_value_heads * cfg.head_dim;
        match self {
            Projection::Q => (h, qd),
            Projection::K | Projection::V => (h, kvd),
            Projection::O => (qd, h),
            Projection::Gate | Projection::Up => (h, cfg.intermediate_size),
            Projection::Down => (cfg.intermediate_size, h),
        }
    }
}

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
}

/// Per-layer key/value cache for incremental decoding, with the attention mask and positions
/// of everything cached so far.
///
/// Two storage modes: [`KvCache::new`] concatenates (differentiable: gradients flow through a
/// cached prefix into the adapter that computed it), [`KvCache::with_capacity`] writes into a
/// pre-allocated buffer (fast generation, no gradients).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: Option<usize>,
    len: usize,
    /// `mask[b][t]`: 1 when cached position `t` of row `b` is a real token.
    mask: Vec<Vec<u8>>,
    /// Number of real tokens cached per row (the next position id).
    next_pos: Vec<usize>,
}

impl KvCache {
    /// An empty, growing, differentiable cache for `batch` rows.
    pub fn new(model: &Llama, batch: usize) -> KvCache {
        KvCache {
            layers: vec![None; model.cfg.num_hidden_layers],
            capacity: None,
            len: 0,
            mask: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// An empty cache pre-allocated for `max_len` positions (grows by `max_len` when exceeded).
    /// Writes copy into the buffer, so no gradient flows through it.
    pub fn with_capacity(model: &Llama, batch: usize, max_len: usize) -> KvCache {
        let mut c = KvCache::new(model, batch);
        c.capacity = Some(max_len.max(1));
        c
    }

    /// Number of cached positions (including padding).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.mask.len()
    }

    /// Keeps the given rows, in that order: drops finished sequences, or, with repeated indices,
    /// expands a shared prefix into several continuations (differentiable for a growing cache).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().any(|&r| r >= self.batch()) {
            return Err(ModelError::Invalid("select_rows: row out of range".into()));
        }
        if rows.is_empty() {
            return Err(ModelError::Invalid("select_rows: no rows kept".into()));
        }
        let dev = self.layers.iter().flatten().next().map(|(k, _)| k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
            for l in self.layers.iter_mut().flatten() {
                let k = l.0.index_select(&idx, 0)?;
                let v = l.1.index_select(&idx, 0)?;
                *l = (k, v);
            }
        }
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }

    /// Appends one layer's new keys/values `[B, kvH, T, D]`; returns all of them.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t_new = k.dim(2)?;
        let old = self.len;
        let (k_all, v_all) = match (self.capacity, self.layers[layer].take()) {
            (None, None) => (k.clone(), v.clone()),
            (None, Some((pk, pv))) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
            (Some(cap), prev) => {
                let (mut kb, mut vb) = match prev {
                    Some(p) => p,
                    None => {
                        let (b, h, _, d) = k.dims4()?;
                        let size = cap.max(t_new);
                        (
                            Tensor::zeros((b, h, size, d), k.dtype(), k.device())?,
                            Tensor::zeros((b, h, size, d), v.dtype(), v.device())?,
                        )
                    }
                };
                while old + t_new > kb.dim(2)? {
                    let grow = kb.dim(2)?.max(t_new);
                    let (b, h, _, d) = kb.dims4()?;
                    let zk = Tensor::zeros((b, h, grow, d), kb.dtype(), kb.device())?;
                    let zv = Tensor::zeros((b, h, grow, d), vb.dtype(), vb.device())?;
                    kb = Tensor::cat(&[&kb, &zk], 2)?;
                    vb = Tensor::cat(&[&vb, &zv], 2)?;
                }
                kb.slice_set(&k.contiguous()?, 2, old)?;
                vb.slice_set(&v.contiguous()?, 2, old)?;
                let ka = kb.narrow(2, 0, old + t_new)?;
                let va = vb.narrow(2, 0, old + t_new)?;
                self.layers[layer] = Some((kb, vb));
                return Ok((ka, va));
            }
        };
        self.layers[layer] = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }
}

/// Where the queries of one pass sit: rotary tables and the additive attention mask.
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
        Ok(Llama { cfg, w, inv_freq, adapters: BTreeMap::new(), device, dtype })
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
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        let dims = hidden.dims().to_vec();
        let h = *dims.last().ok_or_else(|| ModelError::Invalid("logits: scalar input".into()))?;
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x = hidden.reshape((n, h))?;
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
        self.run(input_ids, attention_mask, cache, opts, None)
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
        self.run(input_ids, attention_mask, cache, &ForwardOptions::default(), Some(merged))
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
        merged: Option<&MergedAdapter>,
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

        let mut x = self.w.embed.embedding(&input_ids.flatten_all()?)?; // [B*T, H]
        for (li, blk) in self.w.blocks.iter().enumerate() {
            let lora = adapter.map(|a| (a, li));
            let merged_w = merged.map(|m| &m.layers[li]);
            let lin = |x: &Tensor, p: Projection| -> Result<Tensor> {
                if let Some(w) = merged_w.and_then(|m| m[p as usize].as_ref()) {
                    return frozen_linear(x, w);
                }
                let w = &blk.proj[p as usize];
                match lora {
                    None => frozen_linear(x, w),
                    Some((a, li)) => a.linear(li, p, x, w, opts, self.dtype),
                }
            };
            let residual = x.clone();
            let h = rms_norm(&x, &blk.attn_norm, self.cfg.rms_norm_eps)?;
            let h = self.attention(&h, b, t, li, &geo, cache, &lin)?;
            x = (residual + h)?;
            let residual = x.clone();
            let h = rms_norm(&x, &blk.mlp_norm, self.cfg.rms_norm_eps)?;
            let gate = lin(&h, Projection::Gate)?;
            let up = lin(&h, Projection::Up)?;
            let h = lin(&swiglu(&gate, &up)?, Projection::Down)?;
            x = (residual + h)?;
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

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        layer: usize,
        geo: &PassGeometry,
        cache: &mut KvCache,
        lin: &dyn Fn(&Tensor, Projection) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let n_rep = nh / nkv;
        let q = lin(x, Projection::Q)?.reshape((b, t, nh, hd))?;
        let k = lin(x, Projection::K)?.reshape((b, t, nkv, hd))?;
        let v = lin(x, Projection::V)?.reshape((b, t, nkv, hd))?;
        let q = rope(&q, &geo.cos, &geo.sin)?.transpose(1, 2)?.contiguous()?;
        let k = rope(&k, &geo.cos, &geo.sin)?.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let tk = k.dim(2)?;
        // Grouped-query attention without repeating K/V: the n_rep query heads that share a
        // key/value head become extra rows of one matmul.
        // The 1/sqrt(d) scale goes on q, the smaller operand, not on the scores.
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q * scale)?.reshape((b, nkv, n_rep * t, hd))?;
        let mask = geo.mask.as_ref().map(|m| m.reshape((b, t, tk))).transpose()?;
        let out = attention(&q, &k, &v, mask.as_ref(), t)?; // [B, nkv, n_rep*T, D]
        let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        lin(&out, Projection::O)
    }

    // ----- adapter management (the LoRA maths lives in lora.rs) -----

    /// Adds an adapter set named `name` with fresh weights: A random (Kaiming-uniform, as PEFT,
    /// seed 0), B zero, so the model's output is unchanged until it is trained.
    pub fn add_adapter(&mut self, name: &str, cfg: &LoraConfig) -> Result<()> {
        self.add_adapter_seeded(name, cfg, 0)
    }

    /// [`Llama::add_adapter`] with an explicit seed for the initialisation of A.
    pub fn add_adapter_seeded(&mut self, name: &str, cfg: &LoraConfig, seed: u64) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(ModelError::AdapterExists(name.to_string()));
        }
        let a = LoraAdapter::new(&self.cfg, cfg, seed, &self.device)?;
        self.adapters.insert(name.to_string(), a);
        Ok(())
    }

    /// Inserts a ready adapter set (e.g. one read by [`crate::lora::LoraAdapter::load`]).
    pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(ModelError::AdapterExists(name.to_string()));
        }
        adapter.check_shapes(&self.cfg)?;
        self.adapters.insert(name.to_string(), adapter);
        Ok(())
    }

    /// Removes an adapter set, returning it.
    pub fn remove_adapter(&mut self, name: &str) -> Result<LoraAdapter> {
        self.adapters.remove(name).ok_or_else(|| ModelError::UnknownAdapter(name.to_string()))
    }

    /// The adapter set named `name`.
    pub fn adapter(&self, name: &str) -> Result<&LoraAdapter> {
        self.adapters.get(name).ok_or_else(|| ModelError::UnknownAdapter(name.to_string()))
    }

    /// Names of the adapter sets, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// The trainable tensors of one adapter set (empty when there is no such set), in a fixed
    /// order (layer, projection, A then B): give them to an optimiser.
    pub fn adapter_vars(&self, name: &str) -> Vec<candle_core::Var> {
        self.adapters.get(name).map(|a| a.vars()).unwrap_or_default()
    }

    /// Makes `to` an independent copy of `from` (created if absent; overwritten otherwise).
    pub fn copy_adapter(&mut self, from: &str, to: &str) -> Result<()> {
        let src = self.adapter(from)?;
        if let Some(dst) = self.adapters.get(to) {
            if dst.config() != src.config() {
                return Err(ModelError::AdapterMismatch(from.into(), to.into()));
            }
            dst.assign_from(src)?;
            return Ok(());
        }
        let copy = src.deep_copy()?;
        self.adapters.insert(to.to_string(), copy);
        Ok(())
    }

    /// Polyak averaging: `target <- lambda * target + (1 - lambda) * source`, for every tensor.
    pub fn polyak_update(&self, target: &str, source: &str, lambda: f64) -> Result<()> {
        let t = self.adapter(target)?;
        let s = self.adapter(source)?;
        if t.config() != s.config() {
            return Err(ModelError::AdapterMismatch(target.into(), source.into()));
        }
        t.polyak_from(s, lambda)
    }

    /// Writes an adapter set as PEFT files into the folder `dir` (`adapter_model.safetensors`
    /// and `adapter_config.json`).
    pub fn save_adapter(&self, name: &str, dir: &std::path::Path) -> Result<()> {
        self.adapter(name)?.save(dir)
    }

    /// Reads a PEFT adapter folder (or safetensors file) into a new set named `name`.
    pub fn load_adapter(&mut self, name: &str, path: &std::path::Path) -> Result<()> {
        let a = LoraAdapter::load(path, &self.cfg, &self.device)?;
        self.insert_adapter(name, a)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::D;

    /// A tiny random model on the CPU in f32.
    pub(crate) fn tiny(seed: u64) -> Llama {
        Llama::random(LlamaConfig::tiny(300), seed, &Device::Cpu, DType::F32).unwrap()
    }

    /// Left-pads `rows` into ids and mask tensors.
    pub(crate) fn batch(rows: &[Vec<u32>]) -> (Tensor, Tensor) {
        let t = rows.iter().map(Vec::len).max().unwrap();
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for r in rows {
            ids.extend(std::iter::repeat_n(7u32, t - r.len()).chain(r.iter().copied()));
            mask.extend(std::iter::repeat_n(0u32, t - r.len()).chain(std::iter::repeat_n(1, r.len())));
        }
        (
            Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap(),
            Tensor::from_vec(mask, (rows.len(), t), &Device::Cpu).unwrap(),
        )
    }

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn seq(n: usize, start: u32) -> Vec<u32> {
        (0..n as u32).map(|i| (start + 37 * i) % 300).collect()
    }

    #[test]
    fn padded_rows_match_unpadded_rows() {
        let m = tiny(1);
        let rows = vec![seq(9, 3), seq(5, 11), seq(1, 40)];
        let (ids, mask) = batch(&rows);
        let all = m.forward(&ids, Some(&mask), None).unwrap();
        let t = ids.dim(1).unwrap();
        for (i, r) in rows.iter().enumerate() {
            let (one, _) = batch(std::slice::from_ref(r));
            let alone = m.forward(&one, None, None).unwrap().squeeze(0).unwrap();
            let padded = all.get(i).unwrap().narrow(0, t - r.len(), r.len()).unwrap();
            assert!(max_abs_diff(&alone, &padded) < 1e-5, "row {i}");
        }
    }

    #[test]
    fn kv_cache_decoding_matches_full_forward() {
        let mut m = tiny(2);
        m.add_adapter_seeded("p", &LoraConfig::default(), 5).unwrap();
        randomize_b(&m, "p", 6);
        let rows = vec![seq(8, 1), seq(6, 2)];
        let (ids, mask) = batch(&rows);
        for adapter in [None, Some("p")] {
            let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
            let full = m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap();
            // Prompt of 3 positions, then one token at a time, then a chunk of 2.
            let mut cache = KvCache::with_capacity(&m, 2, 2);
            let mut parts = Vec::new();
            let steps = [(0, 3), (3, 1), (4, 1), (5, 1), (6, 2)];
            for (s, n) in steps {
                let h = m
                    .forward_step(
                        &ids.narrow(1, s, n).unwrap(),
                        Some(&mask.narrow(1, s, n).unwrap()),
                        &mut cache,
                        &opts,
                    )
                    .unwrap();
                parts.push(m.logits(&h).unwrap());
            }
            let inc = Tensor::cat(&parts, 1).unwrap();
            assert_eq!(cache.len(), 8);
            // Only real tokens are compared; padding rows attend to themselves only.
            let d = max_abs_diff(&full.get(0).unwrap(), &inc.get(0).unwrap()).max(max_abs_diff(
                &full.get(1).unwrap().narrow(0, 2, 6).unwrap(),
                &inc.get(1).unwrap().narrow(0, 2, 6).unwrap(),
            ));
            assert!(d < 1e-4, "adapter {adapter:?}: {d}");
        }
    }

    #[test]
    fn merged_adapter_decodes_like_the_unmerged_one() {
        let mut m = tiny(16);
        let cfg = LoraConfig { targets: vec![Projection::Q, Projection::K, Projection::Up], ..LoraConfig::default() };
        m.add_adapter_seeded("pi", &cfg, 1).unwrap();
        randomize_b(&m, "pi", 2);
        let merged = m.merge_adapter("pi").unwrap();
        let (ids, mask) = batch(&[seq(5, 1), seq(3, 2)]);
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
        let mut c1 = KvCache::with_capacity(&m, 2, 8);
        let mut c2 = KvCache::with_capacity(&m, 2, 8);
        let a = m.forward_step(&ids, Some(&mask), &mut c1, &opts).unwrap();
        let b = m.forward_step_merged(&ids, Some(&mask), &mut c2, &merged).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-4);
        let base = m.forward_hidden(&ids, Some(&mask), &ForwardOptions::default()).unwrap();
        assert!(max_abs_diff(&base, &b) > 1e-3, "the merge changed nothing");
        let next = Tensor::new(&[[9u32], [10]], &Device::Cpu).unwrap();
        let a = m.forward_step(&next, None, &mut c1, &opts).unwrap();
        let b = m.forward_step_merged(&next, None, &mut c2, &merged).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-4);
    }

    #[test]
    fn differentiable_cache_matches_preallocated_cache() {
        let m = tiny(3);
        let (ids, _) = batch(&[seq(6, 9)]);
        let opts = ForwardOptions::default();
        let mut a = KvCache::new(&m, 1);
        let mut b = KvCache::with_capacity(&m, 1, 16);
        for s in 0..6 {
            let x = ids.narrow(1, s, 1).unwrap();
            let ha = m.forward_step(&x, None, &mut a, &opts).unwrap();
            let hb = m.forward_step(&x, None, &mut b, &opts).unwrap();
            assert!(max_abs_diff(&ha, &hb) < 1e-6);
        }
    }

    #[test]
    fn gradients_flow_through_a_cached_prefix() {
        // Prompt once, expanded to two continuations: the gradient equals that of two full passes.
        let mut m = tiny(14);
        m.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
        randomize_b(&m, "pi", 2);
        let prompt = vec![4u32, 8, 15, 16];
        let conts = [vec![23u32, 42], vec![99u32, 7]];
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: true, dropout_seed: None };
        let loss_of =
            |logits: &Tensor| candle_nn::ops::log_softmax(logits, D::Minus1).unwrap().sqr().unwrap().sum_all().unwrap();

        let mut cache = KvCache::new(&m, 1);
        let (p_ids, _) = batch(std::slice::from_ref(&prompt));
        m.forward_step(&p_ids, None, &mut cache, &opts).unwrap();
        cache.select_rows(&[0, 0]).unwrap();
        let (c_ids, _) = batch(&conts);
        let h = m.forward_step(&c_ids, None, &mut cache, &opts).unwrap();
        let shared = loss_of(&m.logits(&h).unwrap()).backward().unwrap();

        let full: Vec<Vec<u32>> = conts.iter().map(|c| prompt.iter().chain(c).copied().collect()).collect();
        let (f_ids, _) = batch(&full);
        let logits = m.forward(&f_ids, None, Some("pi")).unwrap().narrow(1, 4, 2).unwrap();
        let separate = loss_of(&logits).backward().unwrap();
        for v in m.adapter_vars("pi") {
            let a = shared.get(v.as_tensor()).unwrap();
            let b = separate.get(v.as_tensor()).unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max_abs_diff(a, b) <= 1e-4 * (1.0 + scale));
        }
    }

    /// Gives every B of an adapter random values (a fresh adapter has B = 0).
    pub(crate) fn randomize_b(m: &Llama, name: &str, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for v in m.adapter_vars(name).iter().skip(1).step_by(2) {
            let r: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            v.set(&Tensor::from_vec(r, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }

    #[test]
    fn zero_initialised_adapter_leaves_logits_unchanged() {
        let mut m = tiny(4);
        m.add_adapter("q", &LoraConfig::default()).unwrap();
        let (ids, mask) = batch(&[seq(7, 5), seq(4, 8)]);
        let base = m.forward(&ids, Some(&mask), None).unwrap();
        // Tracked for gradients: the differentiable RMSNorm/softmax/rotary path.
        let adapted = m.forward(&ids, Some(&mask), Some("q")).unwrap();
        assert!(adapted.track_op());
        assert!(max_abs_diff(&base, &adapted) < 1e-5);
        // A nonzero update changes the logits, identically in the fused and differentiable paths.
        randomize_b(&m, "q", 1);
        let tracked = m.forward(&ids, Some(&mask), Some("q")).unwrap();
        let opts = ForwardOptions { adapter: Some("q"), track_grad: false, dropout_seed: None };
        let fused = m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap();
        assert!(!fused.track_op());
        assert!(max_abs_diff(&base, &tracked) > 1e-3);
        assert!(max_abs_diff(&fused, &tracked) < 1e-4);
    }

    #[test]
    fn gradients_reach_only_the_selected_adapter() {
        let mut m = tiny(5);
        let cfg = LoraConfig { targets: vec![Projection::Q, Projection::V, Projection::Down], ..LoraConfig::default() };
        m.add_adapter_seeded("pi", &cfg, 1).unwrap();
        m.add_adapter_seeded("q", &cfg, 2).unwrap();
        randomize_b(&m, "pi", 3);
        let (ids, mask) = batch(&[seq(5, 2), seq(3, 4)]);
        let logits = m.forward(&ids, Some(&mask), Some("pi")).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let pi = m.adapter_vars("pi");
        assert_eq!(pi.len(), 2 * 3 * 2);
        for v in &pi {
            let g = grads.get(v.as_tensor()).expect("every var of the selected adapter has a gradient");
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "zero gradient");
        }
        for v in m.adapter_vars("q") {
            assert!(grads.get(v.as_tensor()).is_none(), "gradient reached another adapter");
        }
        let w = m.weights();
        let base = [&w.embed, &w.norm, &w.blocks[0].proj[0], &w.blocks[1].attn_norm];
        for t in base {
            assert!(grads.get(t).is_none(), "gradient reached a base weight");
        }
        // With B = 0 (fresh adapter) A's gradient is exactly zero and B's is not.
        let logits = m.forward(&ids, Some(&mask), Some("q")).unwrap();
        let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let q = m.adapter_vars("q");
        let norm = |v: &candle_core::Var| {
            grads.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert_eq!(norm(&q[0]), 0.0);
        assert!(norm(&q[1]) > 0.0);
    }

    #[test]
    fn gradient_matches_finite_difference() {
        // The differentiable RMSNorm / softmax / rotary composition gives the true gradient.
        let mut m = tiny(6);
        let cfg = LoraConfig { targets: vec![Projection::K], rank: 2, ..LoraConfig::default() };
        m.add_adapter_seeded("a", &cfg, 1).unwrap();
        randomize_b(&m, "a", 2);
        let (ids, mask) = batch(&[seq(6, 1), seq(4, 3)]);
        let loss_of = |m: &Llama| -> Tensor {
            let l = m.forward(&ids, Some(&mask), Some("a")).unwrap();
            candle_nn::ops::log_softmax(&l, D::Minus1).unwrap().narrow(2, 5, 1).unwrap().sum_all().unwrap()
        };
        let grads = loss_of(&m).backward().unwrap();
        let var = &m.adapter_vars("a")[0]; // layer 0, A of k_proj
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let orig = var.as_detached_tensor().copy().unwrap();
        let flat = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for idx in [0usize, 17, 40] {
            let mut plus = flat.clone();
            plus[idx] += eps;
            var.set(&Tensor::from_vec(plus, orig.shape(), &Device::Cpu).unwrap()).unwrap();
            let lp = loss_of(&m).to_scalar::<f32>().unwrap();
            let mut minus = flat.clone();
            minus[idx] -= eps;
            var.set(&Tensor::from_vec(minus, orig.shape(), &Device::Cpu).unwrap()).unwrap();
            let lm = loss_of(&m).to_scalar::<f32>().unwrap();
            var.set(&orig).unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            assert!((fd - g[idx]).abs() < 2e-3 + 2e-2 * fd.abs(), "index {idx}: analytic {} vs numeric {fd}", g[idx]);
        }
    }

    #[test]
    fn polyak_update_follows_the_rule_exactly() {
        let mut m = tiny(7);
        m.add_adapter_seeded("q", &LoraConfig::default(), 1).unwrap();
        m.add_adapter_seeded("t", &LoraConfig::default(), 2).unwrap();
        randomize_b(&m, "q", 1);
        let before_t: Vec<Vec<f32>> =
            m.adapter_vars("t").iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
        let src: Vec<Vec<f32>> =
            m.adapter_vars("q").iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
        let lambda = 0.995;
        m.polyak_update("t", "q", lambda).unwrap();
        for ((v, t0), s) in m.adapter_vars("t").iter().zip(&before_t).zip(&src) {
            let got: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for ((g, a), b) in got.iter().zip(t0).zip(s) {
                let want = a * lambda as f32 + b * (1.0 - lambda) as f32;
                assert!((g - want).abs() <= 1e-7 * (1.0 + want.abs()), "{g} vs {want}");
            }
        }
        // lambda = 0 copies the source; the source is untouched.
        m.polyak_update("t", "q", 0.0).unwrap();
        for (v, s) in m.adapter_vars("t").iter().zip(&src) {
            assert_eq!(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), s);
        }
        assert!(m.polyak_update("t", "q", 1.5).is_err());
        assert!(matches!(m.polyak_update("t", "nope", 0.5), Err(ModelError::UnknownAdapter(_))));
    }

    #[test]
    fn copied_adapter_is_independent() {
        let mut m = tiny(8);
        m.add_adapter_seeded("q", &LoraConfig::default(), 1).unwrap();
        randomize_b(&m, "q", 1);
        m.copy_adapter("q", "target").unwrap();
        let (ids, _) = batch(&[seq(4, 1)]);
        let a = m.forward(&ids, None, Some("q")).unwrap();
        let b = m.forward(&ids, None, Some("target")).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        // Changing the source leaves the copy alone.
        randomize_b(&m, "q", 2);
        let b2 = m.forward(&ids, None, Some("target")).unwrap();
        assert_eq!(max_abs_diff(&b, &b2), 0.0);
        // Copying onto an existing adapter overwrites it in place (same Vars).
        let vars = m.adapter_vars("target");
        m.copy_adapter("q", "target").unwrap();
        let q_b = m.adapter_vars("q")[1].as_detached_tensor();
        assert_eq!(max_abs_diff(vars[1].as_tensor(), &q_b), 0.0, "the old handle sees the copy");
        let c = m.forward(&ids, None, Some("q")).unwrap();
        let d = m.forward(&ids, None, Some("target")).unwrap();
        assert_eq!(max_abs_diff(&c, &d), 0.0);
        m.remove_adapter("q").unwrap();
        assert_eq!(m.adapter_names(), vec!["target".to_string()]);
        assert!(m.forward(&ids, None, Some("q")).is_err());
        assert!(m.adapter_vars("q").is_empty());
        assert!(matches!(m.add_adapter("target", &LoraConfig::default()), Err(ModelError::AdapterExists(_))));
    }

    #[test]
    fn grouped_query_attention_equals_repeated_heads() {
        // A model with kv heads = query heads whose K/V weights repeat the GQA model's must give
        // the same logits.
        let gqa = tiny(9);
        let mut cfg = gqa.config().clone();
        cfg.num_key_value_heads = cfg.num_attention_heads;
        let mut w = gqa.weights().clone();
        let hd = cfg.head_dim;
        for b in w.blocks.iter_mut() {
            for p in [Projection::K, Projection::V] {
                let t = &b.proj[p as usize];
                let heads: Vec<Tensor> = (0..4).map(|h| t.narrow(0, (h / 2) * hd, hd).unwrap()).collect();
                b.proj[p as usize] = Tensor::cat(&heads, 0).unwrap();
            }
        }
        let mha = Llama::new(cfg, w).unwrap();
        let (ids, mask) = batch(&[seq(5, 1), seq(3, 2)]);
        let a = gqa.forward(&ids, Some(&mask), None).unwrap();
        let b = mha.forward(&ids, Some(&mask), None).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn rotary_frequencies_follow_the_formula() {
        let mut cfg = LlamaConfig::tiny(10);
        cfg.rope_theta = 100.0;
        cfg.head_dim = 4;
        cfg.hidden_size = 16;
        // 1 / 100^(0/4), 1 / 100^(2/4)
        assert_eq!(cfg.inv_freq(), vec![1.0, 0.1]);
        cfg.rope_scaling = Some(Llama3RopeScaling {
            factor: 8.0,
            high_freq_factor: 4.0,
            low_freq_factor: 1.0,
            original_max_position_embeddings: 64,
        });
        // wavelengths 2π (< 64/4: kept) and 20π ≈ 62.8 (between 16 and 64: smoothed)
        let inv = cfg.inv_freq();
        assert_eq!(inv[0], 1.0);
        let wl = 2.0 * std::f32::consts::PI / 0.1;
        let smooth = (64.0 / wl - 1.0) / 3.0;
        let want = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        assert!((inv[1] - want).abs() < 1e-7);
    }

    #[test]
    fn bf16_base_with_f32_adapters_trains() {
        // The CUDA configuration (bf16 base, f32 master adapters), exercised on the CPU.
        let m32 = tiny(15);
        let w = m32.weights();
        let to16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let w16 = LlamaWeights {
            embed: to16(&w.embed),
            blocks: w
                .blocks
                .iter()
                .map(|b| BlockWeights {
                    attn_norm: to16(&b.attn_norm),
                    proj: b.proj.clone().map(|p| to16(&p)),
                    mlp_norm: to16(&b.mlp_norm),
                })
                .collect(),
            norm: to16(&w.norm),
            lm_head: w.lm_head.as_ref().map(to16),
        };
        let mut m16 = Llama::new(m32.config().clone(), w16).unwrap();
        assert_eq!(m16.dtype(), DType::BF16);
        m16.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
        randomize_b(&m16, "pi", 2);
        let (ids, mask) = batch(&[seq(6, 1), seq(3, 2)]);
        let logits = m16.forward(&ids, Some(&mask), Some("pi")).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for v in m16.adapter_vars("pi") {
            assert_eq!(v.dtype(), DType::F32);
            assert_eq!(grads.get(v.as_tensor()).unwrap().dtype(), DType::F32);
        }
        let base16 = m16.forward(&ids, Some(&mask), None).unwrap();
        let base32 = m32.forward(&ids, Some(&mask), None).unwrap();
        assert!(max_abs_diff(&base16, &base32) < 0.05);
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
        let mut cache = KvCache::with_capacity(&m16, 2, 8);
        m16.forward_step(&ids, Some(&mask), &mut cache, &opts).unwrap();
        let next = Tensor::new(&[[3u32], [4]], &Device::Cpu).unwrap();
        assert_eq!(m16.forward_step(&next, None, &mut cache, &opts).unwrap().dims(), [2, 1, 64]);
    }

    #[test]
    fn inconsistent_weights_are_rejected() {
        let m = tiny(10);
        let mut w = m.weights().clone();
        w.blocks[1].proj[Projection::Up as usize] = Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap();
        let err = Llama::new(m.config().clone(), w).unwrap_err().to_string();
        assert!(err.contains("layer 1 up_proj"), "{err}");
        let mut cfg = LlamaConfig::tiny(10);
        cfg.num_key_value_heads = 3;
        assert!(cfg.validate().is_err());
    }
}
