//! YAML tree -> [`Spec`], collecting every problem of the file with its position.
//!
//! [`load_str`] walks the tree with a `Decoder`, whose methods live in three rooms:
//! - `readers`: typed reads of one node (a string, a number in range, one of a set of names, a
//!   mapping with known keys), each reporting what it expected where it found something else;
//! - `sections`: one method per section of the format (`dataset`, `prompt`, `action`, ...),
//!   checking what the section means (defaults, what a game may not have);
//! - `templates`: every template rendered against a sample context, errors placed at the
//!   offending variable inside the file.

mod readers;
mod sections;
mod templates;
#[cfg(test)]
mod tests;

use crate::diag::{Diagnostic, SpecError};
use crate::spec::Spec;
use crate::yaml::{self, Node, Pos};
use std::path::{Path, PathBuf};

/// The keys each section accepts (also the JSON Schema's properties; a test keeps them in sync).
pub mod keys {
    pub const TOP: &[&str] = &[
        "name",
        "description",
        "kind",
        "dataset",
        "game",
        "prompt",
        "examples",
        "action",
        "reward",
        "max_steps",
        "limits",
        "training",
    ];
    pub const DATASET: &[&str] =
        &["source", "train_fraction", "test_fraction", "seeds", "max_samples", "drop", "features"];
    pub const GAME: &[&str] = &["module", "seeds", "fuel", "memory_mb", "observation_kb"];
    pub const SOURCE: &[&str] = &["builtin", "csv", "arff", "target"];
    pub const PROMPT: &[&str] =
        &["format", "template", "reflection", "system", "user", "assistant", "turns", "max_tokens"];
    pub const PROMPT_COMPLETION: &[&str] = &["format", "template", "reflection", "max_tokens"];
    pub const PROMPT_CHAT: &[&str] = &["format", "system", "user", "assistant", "reflection", "turns", "max_tokens"];
    pub const EXAMPLE: &[&str] = &["task", "action"];
    pub const ACTION: &[&str] = &["extract", "stop", "max_new_tokens", "assemble"];
    pub const REWARD: &[&str] = &["metric", "multiclass", "failure_reward", "evaluation"];
    pub const EVALUATION: &[&str] = &["mean_of_splits"];
    pub const LIMITS: &[&str] = &["wall_s", "cpu_s", "memory_mb", "output_kb", "max_processes"];
    pub const TRAINING: &[&str] = &[
        "algorithm",
        "steps",
        "batch_size",
        "lr",
        "beta",
        "gamma",
        "polyak",
        "temperature",
        "top_k",
        "top_p",
        "lora_rank",
        "lora_alpha",
        "epochs",
        "grad_clip",
        "clip_eps",
    ];
}

/// What `kind:` names (the variants of [`Kind`] without their sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindName {
    Sklearn,
    Wasm,
}

impl KindName {
    /// The names of `kind:`.
    pub const NAMES: &'static [(&'static str, KindName)] = &[("sklearn", KindName::Sklearn), ("wasm", KindName::Wasm)];
}

/// The default assembly for `kind: sklearn`: the action is the body of the paper's `build_model`.
pub const DEFAULT_SKLEARN_ASSEMBLE: &str =
    "import numpy as np\n\n\ndef build_model(x_train: np.ndarray, y_train: np.ndarray):\n    {{ action }}\n";

/// The default chat `assistant` message replaying a failed action.
pub const DEFAULT_CHAT_ASSISTANT: &str = "```python\n{{ action }}\n```";

/// The default assembly for `kind: wasm`: the game receives the action itself.
pub const DEFAULT_GAME_ASSEMBLE: &str = "{{ action }}";

/// The default number of new tokens per action.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// The default number of new tokens per action of a game (one line).
pub const DEFAULT_GAME_MAX_NEW_TOKENS: usize = 32;

/// The default `max_steps` (the paper's 5).
pub const DEFAULT_MAX_STEPS: u32 = 5;

/// Parse and validate a spec's text; `path` names the file in diagnostics and its folder
/// anchors relative paths.
pub fn load_str(source: &str, path: &Path) -> Result<Spec, SpecError> {
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut d = Decoder { diags: Vec::new(), base_dir, templates: Vec::new(), source_pos: None, game: false };
    let spec = match yaml::parse(source) {
        Err(e) => {
            d.diags.push(Diagnostic::at(e.pos, e.message));
            None
        }
        Ok((root, duplicates)) => {
            for e in duplicates {
                d.diags.push(Diagnostic::at(e.pos, e.message));
            }
            match root {
                None => {
                    d.error(Pos { line: 1, col: 1 }, "the spec file is empty; expected a mapping with at least `name`, `description`, `dataset` and `prompt`");
                    None
                }
                Some(root) => d.spec(&root, path),
            }
        }
    };
    match spec {
        Some(spec) if d.diags.is_empty() => Ok(spec),
        _ => {
            d.diags.sort_by_key(|x| x.pos);
            Err(SpecError { file: path.to_path_buf(), diagnostics: d.diags })
        }
    }
}

/// What a template renders to, which decides its variables.
#[derive(Clone, Copy, PartialEq)]
enum TemplateRole {
    Initial,
    Reflection,
    Assemble,
}

struct Decoder {
    diags: Vec<Diagnostic>,
    base_dir: PathBuf,
    /// Templates to check once the sample context is known: (path, node, role).
    templates: Vec<(String, Node, TemplateRole)>,
    /// Where `dataset.source` is written, for data loading errors.
    source_pos: Option<Pos>,
    /// The spec is `kind: wasm` (decides defaults and template variables).
    game: bool,
}
