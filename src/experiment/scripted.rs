//! The scripted policy: replays action files, for tests and for users who want to score their
//! own code through the same loop.

use std::path::{Path, PathBuf};

use super::policy::{ActRequest, Action, Policy, PolicyError};

/// Replays the files of a folder in name order: the environment's n-th step (counted over all
/// episodes of a spec and seed) gets the n-th file, raw, as if the model had written it (so the
/// spec's action extraction applies). If the folder has a subfolder named after a spec (its
/// `name`, or its file name without extension), that spec uses the subfolder's files instead.
/// When the files run out, that spec and seed stop.
pub struct ScriptedPolicy {
    dir: PathBuf,
}

impl ScriptedPolicy {
    /// A policy over `dir`, which must be a folder.
    pub fn new(dir: &Path) -> Result<ScriptedPolicy, PolicyError> {
        if !dir.is_dir() {
            return Err(PolicyError::Config(format!(
                "{}: the scripted policy needs a folder of action files",
                dir.display()
            )));
        }
        Ok(ScriptedPolicy { dir: dir.to_path_buf() })
    }

    /// The action files used for a spec, in order.
    pub fn files_for(&self, spec_name: &str, spec_path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
        let stem = spec_path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let folder = [spec_name, stem]
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| self.dir.join(n))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| self.dir.clone());
        list_files(&folder)
    }
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io = |e| PolicyError::Io { path: dir.to_path_buf(), source: e };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().map_err(io)?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(PolicyError::Config(format!("{}: no action files in this folder", dir.display())));
    }
    Ok(files)
}

impl Policy for ScriptedPolicy {
    fn describe(&self) -> String {
        format!("scripted actions from {}", self.dir.display())
    }

    fn act(&mut self, requests: &[ActRequest<'_>]) -> Result<Vec<Option<Action>>, PolicyError> {
        requests
            .iter()
            .map(|r| {
                let files = self.files_for(&r.spec.name, &r.spec.path)?;
                let Some(path) = files.get(r.env_step as usize - 1) else { return Ok(None) };
                let generation =
                    std::fs::read_to_string(path).map_err(|e| PolicyError::Io { path: path.clone(), source: e })?;
                Ok(Some(Action { generation, ..Action::default() }))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_name_order_and_per_spec_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("02.py"), "b").unwrap();
        std::fs::write(dir.path().join("01.py"), "a").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::create_dir(dir.path().join("iris")).unwrap();
        std::fs::write(dir.path().join("iris/1.py"), "c").unwrap();
        let p = ScriptedPolicy::new(dir.path()).unwrap();
        let names = |v: Vec<PathBuf>| {
            v.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        assert_eq!(names(p.files_for("other", Path::new("envs/other.yaml")).unwrap()), ["01.py", "02.py"]);
        assert_eq!(names(p.files_for("Iris data", Path::new("envs/iris.yaml")).unwrap()), ["1.py"]);
        assert!(ScriptedPolicy::new(&dir.path().join("01.py")).is_err());
    }
}
