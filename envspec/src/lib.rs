//! etpo environment specs: a YAML file declares one language MDP (task text, data, prompt
//! templates, how an action becomes a program, reward, limits), and [`load`] turns it into a
//! validated [`Spec`] or a [`SpecError`] listing every problem with its `file:line:column`.
//!
//! The format is documented in `envspec/FORMAT.md`; `etpo schema` prints its JSON Schema
//! ([`schema`]).

mod action;
pub mod data;
mod decode;
mod diag;
pub mod plain;
mod schema;
mod spec;
mod template;
mod yaml;

pub use action::{commented, dedent, extract, Extract};
pub use decode::{keys, load_str, DEFAULT_SKLEARN_ASSEMBLE};
pub use diag::{Diagnostic, SpecError};
pub use schema::schema;
pub use spec::{
    ActionSpec, Algorithm, Evaluation, Example, ExecLimits, GameSpec, Kind, Metric, Multiclass, PromptFormat,
    PromptSpec, RewardSpec, Spec, TrainingOverrides,
};
pub use template::{
    ChatMessage, ChatTemplate, GameContext, History, Prompt, RenderError, TaskContext, Turn, ASSEMBLE_VARIABLES,
    GAME_STEP_VARIABLES, GAME_VARIABLES, HISTORY_VARIABLES, REFLECTION_VARIABLES, TASK_VARIABLES,
};
pub use yaml::Pos;

use std::path::{Path, PathBuf};

/// Read, parse and validate a spec file: structure, types, values, data files (loaded once to
/// check them) and every template (rendered against a sample task).
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| SpecError::whole_file(path.to_path_buf(), format!("cannot read the spec file: {e}")))?;
    load_str(&source, path)
}

/// The spec files named by `paths`: files as given, and the `*.yaml`/`*.yml` files directly
/// inside folders, sorted. Folders are not searched recursively, so `envs/` does not pick up the
/// paper's settings in `envs/paper/`; name that folder to use them.
pub fn find_specs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SpecError> {
    let mut found = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| SpecError::whole_file(path.clone(), format!("cannot read the folder: {e}")))?;
            let mut specs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            if specs.is_empty() {
                return Err(SpecError::whole_file(
                    path.clone(),
                    "no *.yaml or *.yml spec files in this folder (sub-folders are not searched)",
                ));
            }
            specs.sort();
            found.extend(specs);
        } else if path.is_file() {
            found.push(path.clone());
        } else {
            return Err(SpecError::whole_file(path.clone(), "no such file or folder"));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_specs_lists_folders_flat_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["b.yaml", "a.yml", "notes.txt", "sub/c.yaml"] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), "").unwrap();
        }
        let single = d.join("notes.txt");
        let found = find_specs(&[d.to_path_buf(), single.clone()]).unwrap();
        assert_eq!(found, vec![d.join("a.yml"), d.join("b.yaml"), single]);
        let err = find_specs(&[d.join("sub/missing.yaml")]).unwrap_err();
        assert_eq!(err.to_string(), format!("{}: error: no such file or folder", d.join("sub/missing.yaml").display()));
    }
}
