//! Adapter-set management of a [`Llama`]: adding, copying, Polyak-averaging, saving and loading
//! named LoRA sets (the LoRA maths lives in `lora.rs`).

use super::Llama;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, LoraConfig};

impl Llama {
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
