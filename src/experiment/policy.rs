//! Policies: what produces the raw text an environment step receives.

use std::path::PathBuf;

use envspec::{Prompt, Spec};
use sha2::{Digest, Sha256};

/// One environment waiting for an action.
#[derive(Debug, Clone, Copy)]
pub struct ActRequest<'a> {
    pub spec: &'a Spec,
    /// The data split seed of the environment.
    pub seed: u64,
    /// Episode number within this spec and seed, from 0.
    pub episode: u32,
    /// Step within the episode, from 0.
    pub step: u32,
    /// The environment step this action will be, counted over all episodes of this spec and seed,
    /// from 1. Stateless policies (the scripted one) use it to stay right across `--resume`.
    pub env_step: u32,
    /// The observation to answer.
    pub prompt: &'a Prompt,
}

/// What a policy produced for one request.
#[derive(Debug, Clone, Default)]
pub struct Action {
    /// The raw generation; the environment cuts the action out of it.
    pub generation: String,
    /// The exact text the model was given, when a model produced the action (learners need it).
    pub prompt_text: Option<String>,
    /// Generated token ids and their log-probabilities under the sampling policy (empty for
    /// scripted actions).
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Seconds spent producing it (a batch's time split evenly over its members).
    pub gen_s: f64,
}

/// Errors of a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("could not render the prompt: {0}")]
    Render(String),
    #[error("model: {0}")]
    Model(String),
}

/// Produces actions for a batch of environments at once (so a model can batch its generation).
pub trait Policy {
    /// A short description for logs and `config.json`.
    fn describe(&self) -> String;

    /// One entry per request, in order: `Some(action)`, or `None` when this policy has no more
    /// actions for that environment (a scripted policy that ran out of files); the run loop then
    /// stops that spec and seed.
    fn act(&mut self, requests: &[ActRequest<'_>]) -> Result<Vec<Option<Action>>, PolicyError>;
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn act(&mut self, requests: &[ActRequest<'_>]) -> Result<Vec<Option<Action>>, PolicyError> {
        (**self).act(requests)
    }
}

/// sha256 (hex) of an observation, independent of how a policy renders it: a completion prompt's
/// text, or for chat the JSON array of `{"role", "content"}` messages.
pub fn prompt_sha256(prompt: &Prompt) -> String {
    let mut hasher = Sha256::new();
    match prompt {
        Prompt::Completion(text) => hasher.update(text.as_bytes()),
        Prompt::Chat(messages) => {
            let json: Vec<serde_json::Value> =
                messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
            hasher.update(serde_json::Value::Array(json).to_string().as_bytes());
        }
    }
    hex(&hasher.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_of_the_text() {
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            prompt_sha256(&Prompt::Completion("abc".into())),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
