//! The language-model policy: batched sampling from the model core, with each spec's stop
//! sequences and token budget, and the model's own chat template for chat-format specs.

use std::path::Path;
use std::time::Instant;

use envspec::data::SplitMix64;
use envspec::{ChatTemplate, Prompt, Spec};

use super::policy::{ActRequest, Action, Policy, PolicyError};

/// The paper's sampling temperature, used when neither the command line nor the spec sets one.
pub const DEFAULT_TEMPERATURE: f64 = 0.5;
/// The paper's top-k, likewise.
pub const DEFAULT_TOP_K: usize = 50;

/// How the model samples. The three sampling parameters override a spec's `training` block when
/// set; otherwise the spec's value applies, else the paper's default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplingConfig {
    /// Softmax temperature.
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens; `Some(0)` turns top-k off.
    pub top_k: Option<usize>,
    /// Nucleus sampling mass (off unless set).
    pub top_p: Option<f64>,
    /// Base seed; each batch's seed is derived from it and the batch's members, so the same
    /// requests get the same samples (also after `--resume`).
    pub seed: u64,
    /// At most this many prompts in one generation call (0 counts as 1).
    pub max_batch: usize,
}

/// Sampling parameters resolved for one spec.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

impl SamplingConfig {
    /// The parameters `spec` is sampled with: this config's, else the spec's, else the defaults.
    pub fn resolve(&self, spec: &Spec) -> Sampling {
        let t = &spec.training;
        let top_k = self.top_k.or(t.top_k).unwrap_or(DEFAULT_TOP_K);
        Sampling {
            temperature: self.temperature.or(t.temperature).unwrap_or(DEFAULT_TEMPERATURE),
            top_k: (top_k > 0).then_some(top_k),
            top_p: self.top_p.or(t.top_p),
        }
    }
}

/// Actions sampled from a language model.
pub struct LlmPolicy {
    loaded: trainer::LoadedModel,
    chat: Option<ChatTemplate>,
    sampling: SamplingConfig,
    adapter: Option<String>,
}

impl LlmPolicy {
    /// Loads a GGUF file or a Hugging Face folder on `device` (`cpu`, `cuda`, `cuda:N`).
    pub fn load(path: &Path, device: &str, sampling: SamplingConfig) -> Result<LlmPolicy, PolicyError> {
        let device = trainer::parse_device(device).map_err(|e| PolicyError::Model(e.to_string()))?;
        let loaded =
            trainer::load_model(path, &device).map_err(|e| PolicyError::Model(format!("{}: {e}", path.display())))?;
        LlmPolicy::new(loaded, sampling)
    }

    /// A policy over an already loaded model.
    pub fn new(loaded: trainer::LoadedModel, sampling: SamplingConfig) -> Result<LlmPolicy, PolicyError> {
        let chat = match &loaded.chat_template {
            Some(source) => {
                let bos = loaded.tokenizer.bos_token().unwrap_or_default().to_string();
                let eos = loaded.tokenizer.eos_token().unwrap_or_default().to_string();
                Some(ChatTemplate::new(source, &bos, &eos).map_err(|e| PolicyError::Render(e.to_string()))?)
            }
            None => None,
        };
        Ok(LlmPolicy { loaded, chat, sampling, adapter: None })
    }

    /// The model (for algorithms that train it).
    pub fn model(&self) -> &trainer::LoadedModel {
        &self.loaded
    }

    /// The model, mutably (to add or update adapters).
    pub fn model_mut(&mut self) -> &mut trainer::LoadedModel {
        &mut self.loaded
    }

    /// Sample with this LoRA adapter set (`None`: the base model).
    pub fn set_adapter(&mut self, adapter: Option<String>) {
        self.adapter = adapter;
    }

    /// Counts a state's tokens as this model will see it (chat template, then tokenizer), for
    /// specs' `prompt.max_tokens`.
    pub fn token_counter(&self) -> runtime::env::TokenCounter {
        let (tokenizer, chat) = (self.loaded.tokenizer.clone(), self.chat.clone());
        std::sync::Arc::new(move |prompt: &Prompt| {
            let text = prompt.to_text(chat.as_ref()).map_err(|e| e.to_string())?;
            Ok(tokenizer.encode(&text).map_err(|e| e.to_string())?.len())
        })
    }

    /// The exact text the model is given for a state.
    pub fn render(&self, prompt: &Prompt) -> Result<String, PolicyError> {
        prompt.to_text(self.chat.as_ref()).map_err(|e| PolicyError::Render(e.to_string()))
    }

    fn generate(&self, spec: &Spec, texts: &[String], seed: u64) -> Result<Vec<trainer::Completion>, PolicyError> {
        let sampling = self.sampling.resolve(spec);
        let cfg = trainer::GenerateConfig {
            max_new_tokens: spec.action.max_new_tokens,
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            stop: spec.action.stop.clone(),
            seed,
        };
        trainer::generate(&self.loaded.model, &self.loaded.tokenizer, texts, &cfg, self.adapter.as_deref())
            .map_err(|e| PolicyError::Model(e.to_string()))
    }
}

impl Policy for LlmPolicy {
    fn describe(&self) -> String {
        format!("language model {}", self.loaded.info.path.display())
    }

    fn act(&mut self, requests: &[ActRequest<'_>]) -> Result<Vec<Option<Action>>, PolicyError> {
        let mut out: Vec<Option<Action>> = vec![None; requests.len()];
        // Requests of one spec share stop sequences and token budget: one batch per spec.
        let mut groups: Vec<(&Spec, Vec<usize>)> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match groups.iter_mut().find(|(s, _)| std::ptr::eq(*s, r.spec)) {
                Some((_, members)) => members.push(i),
                None => groups.push((r.spec, vec![i])),
            }
        }
        for (spec, members) in groups {
            for chunk in members.chunks(self.sampling.max_batch.max(1)) {
                let texts = chunk.iter().map(|&i| self.render(requests[i].prompt)).collect::<Result<Vec<_>, _>>()?;
                let seed = batch_seed(self.sampling.seed, chunk.iter().map(|&i| &requests[i]));
                let start = Instant::now();
                let completions = self.generate(spec, &texts, seed)?;
                let per = start.elapsed().as_secs_f64() / chunk.len() as f64;
                if completions.len() != chunk.len() {
                    return Err(PolicyError::Model(format!(
                        "generate returned {} completions for {} prompts",
                        completions.len(),
                        chunk.len()
                    )));
                }
                for ((&i, text), c) in chunk.iter().zip(texts).zip(completions) {
                    out[i] = Some(Action {
                        generation: c.text,
                        prompt_text: Some(text),
                        tokens: c.tokens,
                        logprobs: c.logprobs,
                        gen_s: per,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// A sampling seed determined by the base seed and the batch's members (spec name, split seed,
/// environment step), so a resumed run samples what the uninterrupted one would have.
fn batch_seed<'a>(base: u64, members: impl Iterator<Item = &'a ActRequest<'a>>) -> u64 {
    let mut h = base;
    for r in members {
        for b in r.spec.name.bytes() {
            h = SplitMix64::new(h ^ u64::from(b)).next_u64();
        }
        h = SplitMix64::new(h ^ r.seed).next_u64();
        h = SplitMix64::new(h ^ u64::from(r.env_step)).next_u64();
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_comes_from_the_command_line_then_the_spec_then_the_paper() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("envs/balance_scale.yaml");
        let mut spec = envspec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        spec.training.temperature = None;
        spec.training.top_k = None;
        spec.training.top_p = None;
        let none = SamplingConfig::default();
        assert_eq!(none.resolve(&spec), Sampling { temperature: 0.5, top_k: Some(50), top_p: None });
        spec.training.temperature = Some(0.9);
        spec.training.top_k = Some(0);
        spec.training.top_p = Some(0.95);
        assert_eq!(none.resolve(&spec), Sampling { temperature: 0.9, top_k: None, top_p: Some(0.95) });
        let cli =
            SamplingConfig { temperature: Some(0.2), top_k: Some(5), top_p: Some(0.5), ..SamplingConfig::default() };
        assert_eq!(cli.resolve(&spec), Sampling { temperature: 0.2, top_k: Some(5), top_p: Some(0.5) });
    }
}
