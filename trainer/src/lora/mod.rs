//! LoRA adapter sets: `y = W x + (alpha / r) * B A dropout(x)` on chosen projections of every block.
//!
//! An adapter set is a [`LoraAdapter`]; a [`crate::Llama`] holds several by name over one frozen
//! base and picks one per forward pass. The trainable tensors are candle `Var`s kept in f32 (master
//! weights); they are cast to the model dtype in the forward pass.
//!
//! Files follow PEFT (`peft.rs`: [`LoraAdapter::save`], [`LoraAdapter::load`]).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::bf16::FrozenWeight;
use crate::model::{frozen_linear, ForwardOptions, LlamaConfig, ModelError, Projection, Result};

/// Shape and hyper-parameters of an adapter set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of the update `B A`.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training passes with a dropout seed only).
    pub dropout: f64,
    /// The projections that get an adapter.
    pub targets: Vec<Projection>,
    /// The blocks that get adapters (PEFT's `layers_to_transform`); `None` means all.
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraConfig {
    /// Rank 8, alpha 16, no dropout, all seven projections.
    fn default() -> Self {
        LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: Projection::ALL.to_vec(), layers: None }
    }
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether block `layer` gets adapters.
    pub fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(ModelError::Config("LoRA rank must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Config(format!("LoRA dropout must be in [0, 1), got {}", self.dropout)));
        }
        if self.targets.is_empty() {
            return Err(ModelError::Config("LoRA needs at least one target projection".into()));
        }
        Ok(())
    }
}

/// The two factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
}

/// One named adapter set: a [`LoraPair`] per (block, target projection).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    cfg: LoraConfig,
    /// `layers[i][p as usize]`.
    layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraAdapter {
    /// A fresh adapter set for a model of shape `model`: A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's
    /// Kaiming-uniform initialisation, B = 0. Deterministic in `seed`.
    pub fn new(model: &LlamaConfig, cfg: &LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        cfg.validate()?;
        check_layers(cfg, model)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for li in 0..model.num_hidden_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for p in Projection::ALL {
                if !cfg.targets.contains(&p) || !cfg.adapts_layer(li) {
                    continue;
                }
                let (i, o) = p.dims(model);
                let bound = 1.0 / (i as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * i).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Tensor::from_vec(a, (cfg.rank, i), device)?;
                let b = Tensor::zeros((o, cfg.rank), DType::F32, device)?;
                slots[p as usize] = Some(LoraPair { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)? });
            }
            layers.push(slots);
        }
        Ok(LoraAdapter { cfg: cfg.clone(), layers })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// The factors of one (block, projection), if adapted.
    pub fn pair(&self, layer: usize, p: Projection) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p as usize].as_ref())
    }

    /// All trainable tensors, ordered by layer, projection, then A before B.
    pub fn vars(&self) -> Vec<Var> {
        self.pairs().flat_map(|(_, _, pr)| [pr.a.clone(), pr.b.clone()]).collect()
    }

    fn pairs(&self) -> impl Iterator<Item = (usize, Projection, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(li, slots)| {
            Projection::ALL.into_iter().filter_map(move |p| slots[p as usize].as_ref().map(|pr| (li, p, pr)))
        })
    }

    /// The adapted projection `x · wᵀ + scale · dropout(x) · Aᵀ · Bᵀ` for (layer, p), `w` being
    /// the frozen weight `[out, in]` (with its bf16 copy where products by it run in bf16) and `x`
    /// `[N, in]`; the frozen projection alone where this set does not adapt (layer, p). One fused
    /// op where [`crate::ops::lora_linear`] has one and no dropout applies; frozen_linear plus
    /// candle's products otherwise.
    pub(crate) fn linear(
        &self,
        layer: usize,
        p: Projection,
        x: &Tensor,
        w: FrozenWeight<'_>,
        opts: &ForwardOptions,
        dtype: DType,
    ) -> Result<Tensor> {
        let Some(pair) = self.pair(layer, p) else {
            return frozen_linear(x, w);
        };
        let (a, b) = if opts.track_grad {
            (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
        } else {
            (pair.a.as_detached_tensor(), pair.b.as_detached_tensor())
        };
        let xin = match opts.dropout_seed {
            Some(seed) if self.cfg.dropout > 0.0 => {
                let stream = seed ^ ((layer as u64) << 8 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                dropout(x, self.cfg.dropout, stream)?
            }
            _ => {
                if let Some(y) = crate::ops::lora_linear(x, w, &a, &b, self.cfg.scale())? {
                    return Ok(y);
                }
                x.clone()
            }
        };
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        // The scale goes on the rank-r intermediate, the smallest tensor of the product.
        let delta = (xin.matmul(&a.t()?)? * self.cfg.scale())?.matmul(&b.t()?)?;
        Ok((frozen_linear(x, w)? + delta)?)
    }

    /// `y + scale · x · Aᵀ · Bᵀ` for (layer, p) with the adapter detached and no dropout, `y` being
    /// `x` times a base weight computed elsewhere (the quantised generation weights); `y` itself
    /// where this set does not adapt (layer, p). The term added is the one [`LoraAdapter::linear`]
    /// adds without dropout: the same f32 tensors, through the same BLAS products on the CPU.
    pub(crate) fn add_delta(&self, layer: usize, p: Projection, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(pair) = self.pair(layer, p) else {
            return Ok(y);
        };
        let (a, b) = (pair.a.as_detached_tensor(), pair.b.as_detached_tensor());
        if let Some(out) = crate::ops::lora_add(x, &y, &a, &b, self.cfg.scale())? {
            return Ok(out);
        }
        let dtype = y.dtype();
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let delta = (x.to_dtype(dtype)?.matmul(&a.t()?)? * self.cfg.scale())?.matmul(&b.t()?)?;
        Ok((y + delta)?)
    }

    /// An independent copy (new storage).
    pub fn deep_copy(&self) -> Result<LoraAdapter> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for slots in &self.layers {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (i, s) in slots.iter().enumerate() {
                if let Some(pr) = s {
                    out[i] = Some(LoraPair {
                        a: Var::from_tensor(&pr.a.as_detached_tensor())?,
                        b: Var::from_tensor(&pr.b.as_detached_tensor())?,
                    });
                }
            }
            layers.push(out);
        }
        Ok(LoraAdapter { cfg: self.cfg.clone(), layers })
    }

    /// Overwrites every tensor with `src`'s values (same configuration required).
    pub fn assign_from(&self, src: &LoraAdapter) -> Result<()> {
        self.zip_with(src, |d, s| Ok(d.set(&s.as_detached_tensor().copy()?)?))
    }

    /// `self <- lambda * self + (1 - lambda) * src`, tensor by tensor.
    pub fn polyak_from(&self, src: &LoraAdapter, lambda: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&lambda) {
            return Err(ModelError::Invalid(format!("Polyak lambda must be in [0, 1], got {lambda}")));
        }
        self.zip_with(src, |d, s| {
            let new =
                (d.as_detached_tensor().affine(lambda, 0.0)? + s.as_detached_tensor().affine(1.0 - lambda, 0.0)?)?;
            Ok(d.set(&new)?)
        })
    }

    fn zip_with(&self, src: &LoraAdapter, f: impl Fn(&Var, &Var) -> Result<()>) -> Result<()> {
        let (dv, sv) = (self.vars(), src.vars());
        let same_shapes = dv.len() == sv.len() && dv.iter().zip(&sv).all(|(a, b)| a.dims() == b.dims());
        if self.cfg != src.cfg || self.layers.len() != src.layers.len() || !same_shapes {
            return Err(ModelError::Invalid("adapters of different shapes".into()));
        }
        for (d, s) in dv.iter().zip(sv.iter()) {
            f(d, s)?;
        }
        Ok(())
    }

    /// Checks that the adapter fits a model of shape `model`.
    pub fn check_shapes(&self, model: &LlamaConfig) -> Result<()> {
        if self.layers.len() != model.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "adapter has {} layers, the model {}",
                self.layers.len(),
                model.num_hidden_layers
            )));
        }
        for (li, p, pr) in self.pairs() {
            let (i, o) = p.dims(model);
            if pr.a.dims() != [self.cfg.rank, i] || pr.b.dims() != [o, self.cfg.rank] {
                return Err(ModelError::Config(format!(
                    "adapter layer {li} {}: A {:?} / B {:?} do not fit the model (expected [{}, {i}] / [{o}, {}])",
                    p.hf_name(),
                    pr.a.dims(),
                    pr.b.dims(),
                    self.cfg.rank,
                    self.cfg.rank
                )));
            }
        }
        Ok(())
    }
}

fn check_layers(cfg: &LoraConfig, model: &LlamaConfig) -> Result<()> {
    if let Some(&bad) = cfg.layers.iter().flatten().find(|&&l| l >= model.num_hidden_layers) {
        return Err(ModelError::Config(format!(
            "LoRA layer {bad} does not exist (the model has {} blocks)",
            model.num_hidden_layers
        )));
    }
    Ok(())
}

/// Inverted dropout with a seeded mask (reproducible across runs and resumes).
fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p) as f32;
    let n = x.elem_count();
    let m: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * m)?)
}

mod peft;
pub use peft::{peft_tensor_name, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{batch, max_abs_diff, randomize_b, tiny};
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("etpo-lora-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn fresh_adapter_follows_peft_initialisation() {
        let m = crate::model::LlamaConfig::tiny(300);
        let cfg =
            LoraConfig { rank: 4, alpha: 8.0, targets: vec![Projection::Q, Projection::Down], ..LoraConfig::default() };
        let a = LoraAdapter::new(&m, &cfg, 3, &Device::Cpu).unwrap();
        assert_eq!(a.vars().len(), 2 * 2 * 2);
        let q = a.pair(0, Projection::Q).unwrap();
        assert_eq!(q.a.dims(), [4, 64]);
        assert_eq!(q.b.dims(), [64, 4]);
        let down = a.pair(1, Projection::Down).unwrap();
        assert_eq!(down.a.dims(), [4, 128]);
        let bound = 1.0 / 128f32.sqrt();
        let vals: Vec<f32> = down.a.flatten_all().unwrap().to_vec1().unwrap();
        assert!(vals.iter().all(|v| v.abs() <= bound) && vals.iter().any(|v| v.abs() > bound / 2.0));
        assert!(down.b.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&v| v == 0.0));
        assert!(a.pair(0, Projection::K).is_none());
        assert_eq!(cfg.scale(), 2.0);
        // Same seed, same A.
        let b = LoraAdapter::new(&m, &cfg, 3, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(q.a.as_tensor(), b.pair(0, Projection::Q).unwrap().a.as_tensor()), 0.0);
    }

    #[test]
    fn save_and_load_round_trip_with_peft_names() {
        let mut m = tiny(11);
        let cfg = LoraConfig {
            rank: 4,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![Projection::Q, Projection::V, Projection::Gate],
            layers: None,
        };
        m.add_adapter_seeded("pi", &cfg, 1).unwrap();
        randomize_b(&m, "pi", 2);
        let dir = scratch("roundtrip");
        m.save_adapter("pi", &dir).unwrap();

        let tensors = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert_eq!(tensors.len(), 2 * 3 * 2);
        let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
        assert_eq!(a.dims(), [4, 64]);
        let b = &tensors["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"];
        assert_eq!(b.dims(), [128, 4]);
        assert!(tensors.contains_key("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["r"], 4);
        assert_eq!(json["lora_alpha"], 16.0);
        assert_eq!(json["lora_dropout"], 0.05);
        assert_eq!(json["target_modules"], serde_json::json!(["q_proj", "v_proj", "gate_proj"]));

        m.load_adapter("copy", &dir).unwrap();
        assert_eq!(m.adapter("copy").unwrap().config(), &cfg);
        let (ids, mask) = batch(&[vec![1, 2, 3, 4], vec![5, 6]]);
        let x = m.forward(&ids, Some(&mask), Some("pi")).unwrap();
        let y = m.forward(&ids, Some(&mask), Some("copy")).unwrap();
        assert_eq!(max_abs_diff(&x, &y), 0.0);
        // Loading by the safetensors file path works too; the loaded Vars are trainable.
        m.load_adapter("copy2", &dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        assert!(m.adapter_vars("copy2").iter().all(|v| v.as_tensor().is_variable()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn adapters_on_some_layers_round_trip_as_layers_to_transform() {
        let mut m = tiny(14);
        let cfg = LoraConfig { rank: 2, layers: Some(vec![1]), ..LoraConfig::default() };
        m.add_adapter_seeded("pi", &cfg, 1).unwrap();
        assert_eq!(m.adapter_vars("pi").len(), 7 * 2);
        assert!(m.adapter("pi").unwrap().pair(0, Projection::Q).is_none());
        randomize_b(&m, "pi", 2);
        let dir = scratch("layers");
        m.save_adapter("pi", &dir).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(json["layers_to_transform"], serde_json::json!([1]));
        m.load_adapter("back", &dir).unwrap();
        let (ids, _) = batch(&[vec![1, 2, 3]]);
        let a = m.forward(&ids, None, Some("pi")).unwrap();
        let b = m.forward(&ids, None, Some("back")).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        // PEFT also writes a single index.
        let mut json = json;
        json["layers_to_transform"] = serde_json::json!(1);
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), json.to_string()).unwrap();
        m.load_adapter("back1", &dir).unwrap();
        assert_eq!(m.adapter("back1").unwrap().config().layers, Some(vec![1]));
        // Polyak and copies refuse adapters over other layers.
        m.add_adapter("all", &LoraConfig { rank: 2, ..LoraConfig::default() }).unwrap();
        assert!(m.polyak_update("all", "pi", 0.5).is_err());
        assert!(m.add_adapter("bad", &LoraConfig { layers: Some(vec![2]), ..LoraConfig::default() }).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_adapter_files_are_clear_errors() {
        let mut m = tiny(12);
        let dir = scratch("bad");
        let err = m.load_adapter("x", &dir).unwrap_err();
        assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
        assert!(err.to_string().contains("adapter_config.json"), "{err}");

        m.add_adapter("pi", &LoraConfig::default()).unwrap();
        m.save_adapter("pi", &dir).unwrap();
        // A model with another shape rejects it.
        let mut other = crate::model::Llama::random(
            crate::model::LlamaConfig { num_hidden_layers: 1, ..crate::model::LlamaConfig::tiny(300) },
            1,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let err = other.load_adapter("x", &dir).unwrap_err().to_string();
        assert!(err.contains("unexpected tensor base_model.model.model.layers.1"), "{err}");

        std::fs::remove_file(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
        let err = m.load_adapter("x", &dir).unwrap_err().to_string();
        assert!(err.contains("adapter_model.safetensors"), "{err}");

        std::fs::write(
            dir.join(ADAPTER_CONFIG_FILE),
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}"#,
        )
        .unwrap();
        let err = m.load_adapter("x", &dir).unwrap_err().to_string();
        assert!(err.contains("target_modules must be a list"), "{err}");
        std::fs::write(
            dir.join(ADAPTER_CONFIG_FILE),
            r#"{"peft_type": "IA3", "r": 8, "lora_alpha": 16, "target_modules": []}"#,
        )
        .unwrap();
        let err = m.load_adapter("x", &dir).unwrap_err().to_string();
        assert!(err.contains("only LORA"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = Tensor::ones((50, 40), DType::F32, &Device::Cpu).unwrap();
        let a: Vec<f32> = dropout(&x, 0.25, 9).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = dropout(&x, 0.25, 9).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.05, "{dropped}");
        // Training passes with a dropout seed differ from evaluation passes; without one they match.
        let mut m = tiny(13);
        let cfg = LoraConfig { dropout: 0.5, ..LoraConfig::default() };
        m.add_adapter("pi", &cfg).unwrap();
        randomize_b(&m, "pi", 1);
        let (ids, _) = batch(&[vec![1, 2, 3]]);
        let eval = m.forward(&ids, None, Some("pi")).unwrap();
        let opts = ForwardOptions { adapter: Some("pi"), track_grad: true, dropout_seed: Some(4) };
        let train = m.logits(&m.forward_hidden(&ids, None, &opts).unwrap()).unwrap();
        assert!(max_abs_diff(&eval, &train) > 1e-4);
    }
}
