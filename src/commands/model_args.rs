//! The arguments every command that loads a model shares: `--model`, `--device`,
//! `--generation-weights`, `--activation-checkpointing` and, where an adapter can be applied,
//! `--adapter`.

use std::path::PathBuf;

use anyhow::Context;

/// `--model`, `--device`, `--generation-weights` and `--activation-checkpointing`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face folder [default: the embedded SmolLM2-135M-Instruct GGUF]
    #[arg(long = "model", id = "model", value_name = "PATH")]
    pub path: Option<PathBuf>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights to sample with on the CPU: `quantized` (copies of the linear weights in blocks of
    /// 32, exact for a Q4_1/Q8_0 GGUF such as the default model's; activations and adapters in
    /// f32) or `f32` (the training weights) [default: quantized for an f32 model on the CPU]
    #[arg(long, value_name = "f32|quantized")]
    pub generation_weights: Option<String>,
    /// Training passes keep each decoder block's input and output only and compute the block
    /// again in the backward pass: an update's memory no longer grows with everything every
    /// block computes, for one more forward pass of work; the gradients are the same
    #[arg(long)]
    pub activation_checkpointing: bool,
}

impl ModelArgs {
    /// The model file or folder: `--model`, else the default model.
    pub fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(trainer::default_model_path)
    }

    /// Loads the model on the device, with the path in any error, sampling with
    /// `--generation-weights` when given.
    pub fn load(&self) -> anyhow::Result<trainer::LoadedModel> {
        let weights = self.generation_weights()?;
        let device = trainer::parse_device(&self.device)?;
        let path = self.path();
        let mut loaded =
            trainer::load_model(&path, &device).with_context(|| format!("loading the model {}", path.display()))?;
        if let Some(w) = weights {
            loaded.model.set_generation_weights(w);
        }
        loaded.model.set_activation_checkpointing(self.activation_checkpointing);
        Ok(loaded)
    }

    /// `--generation-weights`, parsed (`None`: the loader's choice).
    pub fn generation_weights(&self) -> anyhow::Result<Option<trainer::GenerationWeights>> {
        self.generation_weights
            .as_deref()
            .map(trainer::GenerationWeights::parse)
            .transpose()
            .context("--generation-weights")
    }
}

/// `--adapter`.
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterArg {
    /// A LoRA adapter folder (PEFT layout, as `etpo run` saves them) to apply
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl AdapterArg {
    /// Loads `--adapter` into `model` as the adapter set `name`; returns the name to pass to
    /// forward passes (`None`: the base model).
    pub fn apply(&self, model: &mut trainer::Llama, name: &'static str) -> anyhow::Result<Option<&'static str>> {
        let Some(dir) = &self.adapter else { return Ok(None) };
        model.load_adapter(name, dir).with_context(|| format!("loading the adapter {}", dir.display()))?;
        Ok(Some(name))
    }
}
