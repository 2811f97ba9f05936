//! Located spec errors.

use crate::yaml::Pos;
use std::fmt;
use std::path::PathBuf;

/// One problem in a spec file, at a 1-based line and column where one is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Where the problem is; `None` for problems with the file as a whole (it cannot be read).
    pub pos: Option<Pos>,
    /// What is wrong and what was expected.
    pub message: String,
    /// A suggestion, e.g. "did you mean `name`?".
    pub help: Option<String>,
}

impl Diagnostic {
    pub(crate) fn at(pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic { pos: Some(pos), message: message.into(), help: None }
    }

    pub(crate) fn with_help(mut self, help: Option<String>) -> Diagnostic {
        self.help = help;
        self
    }
}

/// Every problem found in one spec file. Displays one `file:line:col: error: message` line per
/// diagnostic, each followed by an indented `help:` line when there is a suggestion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct SpecError {
    /// The spec file as the user named it.
    pub file: PathBuf,
    /// Sorted by position; never empty.
    pub diagnostics: Vec<Diagnostic>,
}

impl SpecError {
    pub(crate) fn whole_file(file: PathBuf, message: impl Into<String>) -> SpecError {
        SpecError { file, diagnostics: vec![Diagnostic { pos: None, message: message.into(), help: None }] }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match d.pos {
                Some(p) => write!(f, "{}:{}:{}: error: {}", self.file.display(), p.line, p.col, d.message)?,
                None => write!(f, "{}: error: {}", self.file.display(), d.message)?,
            }
            if let Some(help) = &d.help {
                write!(f, "\n  help: {help}")?;
            }
        }
        Ok(())
    }
}

/// "did you mean `x`?" for the closest candidate, if one is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&lower, &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        // The first of equally close candidates wins (`max_by` would pick the last).
        .fold(None, |best: Option<(f64, &str)>, (score, c)| match best {
            Some((b, _)) if b >= score => best,
            _ => Some((score, c)),
        })
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_one_located_line_per_diagnostic() {
        let err = SpecError {
            file: "envs/x.yaml".into(),
            diagnostics: vec![
                Diagnostic::at(Pos { line: 3, col: 1 }, "unknown key `nmae`")
                    .with_help(Some("did you mean `name`?".into())),
                Diagnostic { pos: None, message: "whole".into(), help: None },
            ],
        };
        assert_eq!(
            err.to_string(),
            "envs/x.yaml:3:1: error: unknown key `nmae`\n  help: did you mean `name`?\nenvs/x.yaml: error: whole"
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("nmae", ["name", "description"]), Some("did you mean `name`?".into()));
        assert_eq!(did_you_mean("max_step", ["max_steps", "limits"]), Some("did you mean `max_steps`?".into()));
        assert_eq!(did_you_mean("zzz", ["name", "description"]), None);
    }
}
