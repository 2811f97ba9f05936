//! The arguments every command that loads a model shares: `--model`, `--device` and, where an
//! adapter can be applied, `--adapter`.

use std::path::PathBuf;

use anyhow::Context;

/// `--model` and `--device`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face folder [default: the embedded SmolLM2-135M-Instruct GGUF]
    #[arg(long = "model", id = "model", value_name = "PATH")]
    pub path: Option<PathBuf>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// The model file or folder: `--model`, else the default model.
    pub fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(trainer::default_model_path)
    }

    /// Loads the model on the device, with the path in any error.
    pub fn load(&self) -> anyhow::Result<trainer::LoadedModel> {
        let device = trainer::parse_device(&self.device)?;
        let path = self.path();
        trainer::load_model(&path, &device).with_context(|| format!("loading the model {}", path.display()))
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
