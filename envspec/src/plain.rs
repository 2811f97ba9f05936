//! Small YAML files that are not specs (an experiment grid, ...): a top-level mapping whose keys
//! are checked against a list, with the values as JSON for serde, and errors placed at
//! `file:line:col` like a spec's.

use std::path::Path;

use crate::diag::{did_you_mean, Diagnostic, SpecError};
use crate::yaml::{self, Node, Typed, Value};
use crate::Pos;

/// One key of the mapping: its name, where its value is, and the value as JSON (YAML 1.2 core
/// schema: plain `3` is a number, `true` a boolean, `null` or `~` null; quoted text a string).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub pos: Pos,
    pub value: serde_json::Value,
}

/// Reads `path` as a YAML mapping whose keys are among `allowed` (an unknown key is an error at
/// its position, with a did-you-mean). An empty file is an empty mapping.
pub fn read_mapping(path: &Path, allowed: &[&str]) -> Result<Vec<Entry>, SpecError> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| SpecError::whole_file(path.to_path_buf(), format!("cannot read the file: {e}")))?;
    let fail = |diagnostics: Vec<Diagnostic>| SpecError { file: path.to_path_buf(), diagnostics };
    let root = match yaml::parse(&source) {
        Ok((root, errors)) if errors.is_empty() => root,
        Ok((_, errors)) => return Err(fail(errors.into_iter().map(|e| Diagnostic::at(e.pos, e.message)).collect())),
        Err(e) => return Err(fail(vec![Diagnostic::at(e.pos, e.message)])),
    };
    let Some(root) = root else {
        return Ok(Vec::new());
    };
    let Value::Map(pairs) = &root.value else {
        let found = root.describe();
        return Err(fail(vec![Diagnostic::at(
            root.pos,
            format!("expected a mapping of: {}, found {found}", allowed.join(", ")),
        )]));
    };
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (k, v) in pairs {
        let key = match k.typed() {
            Some(Typed::Str(s)) => s.to_string(),
            _ => {
                problems.push(Diagnostic::at(k.pos, format!("keys are names, found {}", k.describe())));
                continue;
            }
        };
        if !allowed.contains(&key.as_str()) {
            let mut d = Diagnostic::at(k.pos, format!("unknown key `{key}`; expected one of: {}", allowed.join(", ")));
            d.help = did_you_mean(&key, allowed.iter().copied());
            problems.push(d);
            continue;
        }
        out.push(Entry { key, pos: v.pos, value: to_json(v) });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(fail(problems))
    }
}

fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &node.value {
        Value::Seq(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(pairs) => {
            J::Object(pairs.iter().map(|(k, v)| (scalar_text(k), to_json(v))).collect::<serde_json::Map<String, J>>())
        }
        Value::Scalar { .. } => match node.typed() {
            Some(Typed::Null) | None => J::Null,
            Some(Typed::Bool(b)) => J::Bool(b),
            Some(Typed::Int(i)) => i64::try_from(i).map_or_else(|_| J::String(i.to_string()), J::from),
            Some(Typed::Float(f)) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
            Some(Typed::Str(s)) => J::String(s.to_string()),
        },
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => text.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_becomes_json_entries_and_unknown_keys_are_placed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.yaml");
        std::fs::write(&path, "specs: [envs/a.yaml]\nseeds: [0, 1]\nsteps: 8\nset:\n  beta: 0.3\nname: \"7\"\n")
            .unwrap();
        let got = read_mapping(&path, &["specs", "seeds", "steps", "set", "name"]).unwrap();
        let json: Vec<(&str, String)> = got.iter().map(|e| (e.key.as_str(), e.value.to_string())).collect();
        assert_eq!(
            json,
            [
                ("specs", r#"["envs/a.yaml"]"#.to_string()),
                ("seeds", "[0,1]".into()),
                ("steps", "8".into()),
                ("set", r#"{"beta":0.3}"#.into()),
                ("name", r#""7""#.into())
            ]
        );
        assert_eq!(got[2].pos, Pos { line: 3, col: 8 });
        std::fs::write(&path, "seeds: [0]\nsteep: 8\n").unwrap();
        let e = read_mapping(&path, &["seeds", "steps"]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:2:1: error: unknown key `steep`; expected one of: seeds, steps\n  help: did you mean `steps`?",
                path.display()
            )
        );
        std::fs::write(&path, "- a\n").unwrap();
        assert!(read_mapping(&path, &["a"])
            .unwrap_err()
            .to_string()
            .ends_with("expected a mapping of: a, found a list"));
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_mapping(&path, &["a"]).unwrap(), vec![]);
    }
}
