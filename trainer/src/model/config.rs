//! A Llama-family configuration (Hugging Face `config.json` names) and the names of the
//! projections LoRA can adapt.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

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
