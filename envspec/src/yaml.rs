//! A small YAML document tree that remembers where every node came from.
//!
//! Spec diagnostics must point at `file:line:column`, so the loader works on this tree rather than
//! on serde: saphyr-parser's events carry positions, and we keep them on every key and value.
//! Scalars stay text plus their quoting style; the decoder in `spec.rs` interprets them with the
//! YAML 1.2 core schema (`true`, `12`, `0.5`, `null`), and only where a field asks for that type.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use std::collections::HashMap;

/// A 1-based line and column in the spec file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn from_span(span: &Span) -> Pos {
        Pos { line: span.start.line(), col: span.start.col() + 1 }
    }
}

/// How a scalar was written; block scalars (`|`, `>`) start their text on the next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Quoted,
    Block,
}

/// One node of a YAML document.
#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The content of a node.
#[derive(Debug, Clone)]
pub enum Value {
    Scalar {
        text: String,
        style: Style,
    },
    Seq(Vec<Node>),
    /// Keys in file order; duplicates are reported by the parser, the first one is kept.
    Map(Vec<(Node, Node)>),
}

/// A plain scalar's meaning under the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Typed<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Node {
    /// The scalar's type under the YAML 1.2 core schema; quoted and block scalars are strings.
    pub fn typed(&self) -> Option<Typed<'_>> {
        match &self.value {
            Value::Scalar { text, style: Style::Plain } => Some(core_schema(text)),
            Value::Scalar { text, .. } => Some(Typed::Str(text)),
            _ => None,
        }
    }

    /// What the node is, for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match &self.value {
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
            Value::Scalar { .. } => match self.typed() {
                Some(Typed::Null) => "nothing (null)",
                Some(Typed::Bool(_)) => "a boolean",
                Some(Typed::Int(_)) => "an integer",
                Some(Typed::Float(_)) => "a number",
                _ => "a string",
            },
        }
    }

    /// Whether the node is an empty value (`key:` with nothing after it, `~` or `null`).
    pub fn is_null(&self) -> bool {
        matches!(self.typed(), Some(Typed::Null))
    }
}

fn core_schema(text: &str) -> Typed<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Typed::Null,
        "true" | "True" | "TRUE" => return Typed::Bool(true),
        "false" | "False" | "FALSE" => return Typed::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Typed::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Typed::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Typed::Float(f64::NAN),
        _ => {}
    }
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let negative = text.starts_with('-');
    if let Some(hex) = body.strip_prefix("0x") {
        if let Ok(v) = i128::from_str_radix(hex, 16) {
            return Typed::Int(if negative { -v } else { v });
        }
    } else if let Some(oct) = body.strip_prefix("0o") {
        if let Ok(v) = i128::from_str_radix(oct, 8) {
            return Typed::Int(if negative { -v } else { v });
        }
    } else if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(v) = text.parse::<i128>() {
            return Typed::Int(v);
        }
    }
    // The core schema's float: digits with a '.' and/or an exponent (no "1_000", no "inf").
    let looks_float = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && body.bytes().any(|b| b.is_ascii_digit());
    if looks_float {
        if let Ok(v) = text.parse::<f64>() {
            return Typed::Float(v);
        }
    }
    Typed::Str(text)
}

/// A syntax problem found while parsing; the decoder turns it into a diagnostic.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parse one YAML document. Returns `Ok(None)` for an empty file. Duplicate keys are reported as
/// errors in the second list while the tree is still returned, so that the decoder can report the
/// rest of the file's problems too.
pub fn parse(source: &str) -> Result<(Option<Node>, Vec<SyntaxError>), SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(source);
    let mut documents = 0usize;
    let mut root: Option<Node> = None;
    for event in &mut parser {
        let (event, span) = event.map_err(|e| SyntaxError {
            pos: Pos { line: e.marker().line(), col: e.marker().col() + 1 },
            message: format!("invalid YAML: {}", e.info()),
        })?;
        let pos = Pos::from_span(&span);
        match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message: "a spec file holds exactly one YAML document; found a second `---`".to_string(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let style = match style {
                    ScalarStyle::Plain => Style::Plain,
                    ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => Style::Quoted,
                    ScalarStyle::Literal | ScalarStyle::Folded => Style::Block,
                };
                let node = Node { pos, value: Value::Scalar { text: text.into_owned(), style } };
                builder.finish(node, anchor, &mut root);
            }
            Event::SequenceStart(anchor, _) => builder.stack.push((pos, anchor, Partial::Seq(Vec::new()))),
            Event::MappingStart(anchor, _) => builder.stack.push((pos, anchor, Partial::Map(Vec::new(), None))),
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((pos, anchor, partial)) = builder.stack.pop() else {
                    continue;
                };
                let value = match partial {
                    Partial::Seq(items) => Value::Seq(items),
                    Partial::Map(pairs, _) => Value::Map(pairs),
                };
                builder.finish(Node { pos, value }, anchor, &mut root);
            }
            Event::Alias(id) => {
                let node = builder
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| SyntaxError { pos, message: "alias to an unknown anchor".to_string() })?;
                // The alias stands where it is written, for diagnostics about its use.
                builder.finish(Node { pos, ..node }, 0, &mut root);
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }
    Ok((root, builder.duplicates))
}

enum Partial {
    Seq(Vec<Node>),
    /// Pairs so far, and a key waiting for its value.
    Map(Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Pos, usize, Partial)>,
    anchors: HashMap<usize, Node>,
    duplicates: Vec<SyntaxError>,
}

impl Builder {
    /// Attach a finished node to its parent (or make it the document root).
    fn finish(&mut self, node: Node, anchor: usize, root: &mut Option<Node>) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => *root = Some(node),
            Some((_, _, Partial::Seq(items))) => items.push(node),
            Some((_, _, Partial::Map(pairs, pending))) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    let key_text = scalar_text(&key);
                    let first = key_text.and_then(|k| pairs.iter().find(|(p, _)| scalar_text(p) == Some(k)));
                    if let (Some(k), Some((first, _))) = (key_text, first) {
                        self.duplicates.push(SyntaxError {
                            pos: key.pos,
                            message: format!(
                                "duplicate key `{k}` (first given at line {}, column {})",
                                first.pos.line, first.pos.col
                            ),
                        });
                    } else {
                        pairs.push((key, node));
                    }
                }
            },
        }
    }
}

fn scalar_text(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(src: &str) -> Node {
        parse(src).unwrap().0.unwrap()
    }

    #[test]
    fn positions_are_one_based() {
        let node = root("a: 1\nb:\n  - x\n  - {c: d}\n");
        let Value::Map(pairs) = &node.value else { panic!("not a map") };
        assert_eq!(pairs[0].0.pos, Pos { line: 1, col: 1 });
        assert_eq!(pairs[0].1.pos, Pos { line: 1, col: 4 });
        let Value::Seq(items) = &pairs[1].1.value else { panic!("not a seq") };
        assert_eq!(items[0].pos, Pos { line: 3, col: 5 });
        assert_eq!(items[1].pos, Pos { line: 4, col: 5 });
    }

    #[test]
    fn core_schema_types() {
        assert_eq!(core_schema("12"), Typed::Int(12));
        assert_eq!(core_schema("-3"), Typed::Int(-3));
        assert_eq!(core_schema("0.5"), Typed::Float(0.5));
        assert_eq!(core_schema("1e3"), Typed::Float(1000.0));
        assert_eq!(core_schema("~"), Typed::Null);
        assert_eq!(core_schema("True"), Typed::Bool(true));
        assert_eq!(core_schema("yes"), Typed::Str("yes"));
        assert_eq!(core_schema("1.2.3"), Typed::Str("1.2.3"));
        assert_eq!(core_schema("e"), Typed::Str("e"));
    }

    #[test]
    fn quoted_numbers_are_strings() {
        let node = root("a: '12'\n");
        let Value::Map(pairs) = &node.value else { panic!("not a map") };
        assert_eq!(pairs[0].1.typed(), Some(Typed::Str("12")));
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let (_, dups) = parse("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(
            dups,
            vec![SyntaxError {
                pos: Pos { line: 3, col: 1 },
                message: "duplicate key `a` (first given at line 1, column 1)".into()
            }]
        );
    }

    #[test]
    fn aliases_resolve() {
        let node = root("a: &x [1, 2]\nb: *x\n");
        let Value::Map(pairs) = &node.value else { panic!("not a map") };
        let Value::Seq(items) = &pairs[1].1.value else { panic!("alias not resolved") };
        assert_eq!(items.len(), 2);
        assert_eq!(pairs[1].1.pos, Pos { line: 2, col: 4 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("invalid YAML: "), "{}", err.message);
        assert!(err.pos.line >= 1);
    }

    #[test]
    fn empty_document() {
        assert!(parse("").unwrap().0.is_none());
        assert!(parse("# only a comment\n").unwrap().0.is_none());
    }
}
