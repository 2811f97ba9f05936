//! Typed reads of one YAML node for the [`Decoder`]: each pushes a diagnostic naming what it
//! expected, and returns `None`, when the node is not that.

use crate::diag::{did_you_mean, Diagnostic};
use crate::yaml::{Node, Pos, Typed, Value};

use super::Decoder;

/// A mapping section: its pairs and where it was introduced.
pub(super) struct Section<'n> {
    pub(super) path: String,
    pub(super) pos: Pos,
    pub(super) pairs: &'n [(Node, Node)],
}

impl<'n> Section<'n> {
    pub(super) fn get(&self, key: &str) -> Option<&'n Node> {
        self.pairs.iter().find(|(k, _)| key_text(k) == Some(key)).map(|(_, v)| v)
    }

    /// The value, unless missing or null (`key:` with nothing, `~`).
    pub(super) fn opt(&self, key: &str) -> Option<&'n Node> {
        self.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn key_pos(&self, key: &str) -> Option<Pos> {
        self.pairs.iter().find(|(k, _)| key_text(k) == Some(key)).map(|(k, _)| k.pos)
    }

    pub(super) fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

pub(super) fn key_text(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

pub(super) fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => text.clone(),
        _ => node.describe().to_string(),
    }
}

impl Decoder {
    pub(super) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::at(pos, message));
    }

    pub(super) fn error_help(&mut self, pos: Pos, message: impl Into<String>, help: Option<String>) {
        self.diags.push(Diagnostic::at(pos, message).with_help(help));
    }

    /// Check that `node` is a mapping with only `allowed` keys.
    pub(super) fn section<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        pos: Pos,
        allowed: &[&str],
    ) -> Option<Section<'n>> {
        let Value::Map(pairs) = &node.value else {
            let what = if path.is_empty() { "the spec".to_string() } else { format!("`{path}`") };
            self.error(
                node.pos,
                format!("{what} must be a mapping (keys: {}), found {}", allowed.join(", "), node.describe()),
            );
            return None;
        };
        for (key, _) in pairs {
            match key_text(key) {
                Some(k) if allowed.contains(&k) => {}
                Some(k) => {
                    let place = if path.is_empty() { "at the top level".to_string() } else { format!("in `{path}`") };
                    self.error_help(
                        key.pos,
                        format!("unknown key `{k}` {place}; expected one of: {}", allowed.join(", ")),
                        did_you_mean(k, allowed.iter().copied()),
                    );
                }
                None => self.error(key.pos, format!("keys must be plain names, found {}", key.describe())),
            }
        }
        Some(Section { path: path.to_string(), pos, pairs })
    }

    pub(super) fn required<'n>(&mut self, sec: &Section<'n>, key: &str, what: &str) -> Option<&'n Node> {
        let node = sec.get(key);
        if node.is_none() {
            let place = if sec.path.is_empty() { "the spec".to_string() } else { format!("`{}`", sec.path) };
            self.error(sec.pos, format!("{place} is missing the required key `{key}` ({what})"));
        }
        node
    }

    pub(super) fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match node.typed() {
            Some(Typed::Null) | None => {
                self.error(node.pos, format!("`{field}` must be a string, found {}", node.describe()));
                None
            }
            Some(_) => Some(scalar_text(node)),
        }
    }

    pub(super) fn number(&mut self, node: &Node, field: &str) -> Option<f64> {
        match node.typed() {
            Some(Typed::Int(v)) => Some(v as f64),
            Some(Typed::Float(v)) if v.is_finite() => Some(v),
            _ => {
                let found = if matches!(node.value, Value::Scalar { .. }) {
                    format!("{} `{}`", node.describe(), scalar_text(node))
                } else {
                    node.describe().to_string()
                };
                self.error(node.pos, format!("`{field}` must be a number, found {found}"));
                None
            }
        }
    }

    pub(super) fn integer(&mut self, node: &Node, field: &str) -> Option<i128> {
        match node.typed() {
            Some(Typed::Int(v)) => Some(v),
            _ => {
                let found = if matches!(node.value, Value::Scalar { .. }) {
                    format!("{} `{}`", node.describe(), scalar_text(node))
                } else {
                    node.describe().to_string()
                };
                self.error(node.pos, format!("`{field}` must be an integer, found {found}"));
                None
            }
        }
    }

    /// An integer `>= min` that fits in u64.
    pub(super) fn int_at_least(&mut self, node: &Node, field: &str, min: u64, meaning: &str) -> Option<u64> {
        let v = self.integer(node, field)?;
        if v < min as i128 || v > u64::MAX as i128 {
            self.error(node.pos, format!("`{field}` must be {meaning} (an integer >= {min}), found {v}"));
            return None;
        }
        Some(v as u64)
    }

    /// A number satisfying `ok`, described by `meaning` when it does not.
    pub(super) fn float_where(&mut self, node: &Node, field: &str, ok: fn(f64) -> bool, meaning: &str) -> Option<f64> {
        let v = self.number(node, field)?;
        if !ok(v) {
            self.error(node.pos, format!("`{field}` must be {meaning}, found {}", scalar_text(node)));
            return None;
        }
        Some(v)
    }

    pub(super) fn choice<T: Clone>(&mut self, node: &Node, field: &str, options: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, field)?;
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == text) {
            return Some(v.clone());
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.error_help(
            node.pos,
            format!("unknown value `{text}` for `{field}`; expected one of: {}", names.join(", ")),
            did_you_mean(&text, names.iter().copied()),
        );
        None
    }
}
