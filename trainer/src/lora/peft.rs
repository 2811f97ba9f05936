//! The PEFT adapter folder: `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), and `adapter_config.json` with `r`, `lora_alpha`,
//! `lora_dropout`, `target_modules` (and `layers_to_transform` when not every block is adapted).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{check_layers, LoraAdapter, LoraConfig, LoraPair};
use crate::error::bad;
use crate::model::{LlamaConfig, ModelError, Projection, Result};

/// File names of a PEFT adapter folder.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// See [`ADAPTER_WEIGHTS_FILE`].
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// The PEFT tensor name of one factor.
pub fn peft_tensor_name(layer: usize, p: Projection, factor: char) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}.lora_{factor}.weight", p.hf_parent(), p.hf_name())
}

/// The subset of PEFT's adapter_config.json that etpo reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    /// An index or a list of indices; absent or null means every block.
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    // Variants of LoRA etpo does not implement; read only to refuse them.
    #[serde(default, skip_serializing)]
    use_dora: bool,
    #[serde(default, skip_serializing)]
    lora_bias: bool,
    #[serde(default, skip_serializing)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

impl LoraAdapter {
    /// The tensors under their PEFT names (f32, on the adapter's device).
    pub fn peft_tensors(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        for (li, p, pr) in self.pairs() {
            m.insert(peft_tensor_name(li, p, 'A'), pr.a.as_detached_tensor());
            m.insert(peft_tensor_name(li, p, 'B'), pr.b.as_detached_tensor());
        }
        m
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created if
    /// needed). Each file is written to a temporary name and renamed, so a crash never leaves a
    /// half-written file under the final name.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        let tmp = dir.join(format!(".{ADAPTER_WEIGHTS_FILE}.tmp"));
        candle_core::safetensors::save(&self.peft_tensors(), &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(|e| io_err(&weights, e))?;

        let cfg = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: self.cfg.rank,
            lora_alpha: self.cfg.alpha,
            lora_dropout: self.cfg.dropout,
            target_modules: serde_json::Value::Array(
                self.cfg.targets.iter().map(|p| serde_json::Value::String(p.hf_name().into())).collect(),
            ),
            bias: Some("none".into()),
            fan_in_fan_out: false,
            use_rslora: false,
            inference_mode: true,
            base_model_name_or_path: None,
            layers_to_transform: self.cfg.layers.as_ref().map(|l| serde_json::json!(l)),
            use_dora: false,
            lora_bias: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
        };
        let json =
            serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::Invalid(format!("adapter config: {e}")))?;
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let tmp = dir.join(format!(".{ADAPTER_CONFIG_FILE}.tmp"));
        std::fs::write(&tmp, json).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        Ok(())
    }

    /// Reads a PEFT adapter: a folder with `adapter_config.json` and `adapter_model.safetensors`,
    /// or the safetensors file itself (its folder must hold the config). The tensors must fit
    /// `model`; every layer must have every target projection.
    pub fn load(path: &Path, model: &LlamaConfig, device: &Device) -> Result<LoraAdapter> {
        let (dir, weights) = if path.is_dir() {
            (path.to_path_buf(), path.join(ADAPTER_WEIGHTS_FILE))
        } else {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        };
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let cfg_text = read_to_string(&cfg_path, "a PEFT adapter_config.json")?;
        let pc: PeftConfig =
            serde_json::from_str(&cfg_text).map_err(|e| bad(&cfg_path, format!("not a PEFT LoRA config: {e}")))?;
        if pc.peft_type != "LORA" {
            return Err(bad(&cfg_path, format!("peft_type {:?}; only LORA is supported", pc.peft_type)));
        }
        let unsupported = [
            ("use_rslora", pc.use_rslora),
            ("fan_in_fan_out", pc.fan_in_fan_out),
            ("use_dora", pc.use_dora),
            ("lora_bias", pc.lora_bias),
            ("rank_pattern", !pc.rank_pattern.is_empty()),
            ("alpha_pattern", !pc.alpha_pattern.is_empty()),
            ("bias other than \"none\"", pc.bias.as_deref().is_some_and(|b| b != "none")),
        ];
        if let Some((what, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(bad(&cfg_path, format!("{what} is not supported (plain LoRA only)")));
        }
        let targets = match &pc.target_modules {
            serde_json::Value::Array(v) => v
                .iter()
                .map(|m| {
                    m.as_str().and_then(Projection::from_hf_name).ok_or_else(|| {
                        bad(&cfg_path, format!("unsupported target module {m}; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            other => {
                return Err(bad(&cfg_path, format!("target_modules must be a list of module names, got {other}")))
            }
        };
        let layers = match &pc.layers_to_transform {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize]),
            Some(serde_json::Value::Array(v)) => Some(
                v.iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| bad(&cfg_path, format!("layers_to_transform: {x} is not a layer index")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => {
                return Err(bad(&cfg_path, format!("layers_to_transform must be an index or a list, got {other}")))
            }
        };
        let cfg = LoraConfig { rank: pc.r, alpha: pc.lora_alpha, dropout: pc.lora_dropout, targets, layers };
        cfg.validate().map_err(|e| bad(&cfg_path, e.to_string()))?;
        check_layers(&cfg, model).map_err(|e| bad(&cfg_path, e.to_string()))?;

        if !weights.is_file() {
            return Err(ModelError::MissingFile {
                path: weights,
                expected: format!("the adapter weights ({ADAPTER_WEIGHTS_FILE})"),
            });
        }
        let mut tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| bad(&weights, format!("cannot read safetensors: {e}")))?;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for li in 0..model.num_hidden_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for &p in cfg.targets.iter().filter(|_| cfg.adapts_layer(li)) {
                let mut take = |f: char| -> Result<Var> {
                    let name = peft_tensor_name(li, p, f);
                    let t = tensors.remove(&name).ok_or_else(|| bad(&weights, format!("missing tensor {name}")))?;
                    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
                };
                let a = take('A')?;
                let b = take('B')?;
                slots[p as usize] = Some(LoraPair { a, b });
            }
            layers.push(slots);
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(bad(
                &weights,
                format!(
                    "unexpected tensor {extra} (for a {}-layer model with targets {:?})",
                    model.num_hidden_layers, cfg.targets
                ),
            ));
        }
        let adapter = LoraAdapter { cfg, layers };
        adapter.check_shapes(model).map_err(|e| bad(&weights, e.to_string()))?;
        Ok(adapter)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.to_path_buf(), source }
}

fn read_to_string(path: &Path, expected: &str) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ModelError::MissingFile { path: PathBuf::from(path), expected: expected.into() })
        }
        Err(e) => Err(io_err(path, e)),
    }
}
