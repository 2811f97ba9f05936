//! Cutting an action out of raw model text, and the text helpers that assembly uses.

use serde::Serialize;

/// How the action is cut out of the generated text (`action.extract` in a spec).
///
/// Every mode except `raw` first cuts the text at the earliest occurrence of any stop sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Extract {
    /// The generated text exactly as it is (stop sequences are not applied).
    Raw,
    /// The text up to the first stop sequence.
    Stop,
    /// The first non-blank line (for one expression or statement).
    FirstLine,
    /// From the first non-blank line up to, not including, the next line that starts at column 0
    /// (a function body written after its header, as in the paper).
    UntilUnindented,
    /// The content of the first fenced code block (```` ``` ```` with or without a language tag);
    /// an unterminated fence runs to the end; text without any fence is taken whole.
    Fenced,
}

impl Extract {
    /// All modes with their spec names, for messages and the schema.
    pub const NAMES: [(&'static str, Extract); 5] = [
        ("raw", Extract::Raw),
        ("stop", Extract::Stop),
        ("first_line", Extract::FirstLine),
        ("until_unindented", Extract::UntilUnindented),
        ("fenced", Extract::Fenced),
    ];

    /// The spec name of the mode.
    pub fn name(self) -> &'static str {
        Extract::NAMES.iter().find(|(_, e)| *e == self).map(|(n, _)| *n).unwrap_or("raw")
    }
}

/// Cut the action out of `generation`.
pub fn extract(generation: &str, mode: Extract, stop: &[String]) -> String {
    if mode == Extract::Raw {
        return generation.to_string();
    }
    let text = cut_at_stop(generation, stop);
    match mode {
        Extract::Raw | Extract::Stop => text.to_string(),
        Extract::FirstLine => {
            text.lines().find(|l| !l.trim().is_empty()).map(|l| l.trim_end().to_string()).unwrap_or_default()
        }
        Extract::UntilUnindented => until_unindented(text),
        Extract::Fenced => fenced(text),
    }
}

/// The text before the earliest occurrence of any (non-empty) stop sequence.
pub fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> &'a str {
    let end = stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
    &text[..end.unwrap_or(text.len())]
}

fn until_unindented(text: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    for line in text.lines() {
        if kept.is_empty() {
            if !line.trim().is_empty() {
                kept.push(line);
            }
            continue;
        }
        let unindented = !line.trim().is_empty() && !line.starts_with([' ', '\t']);
        if unindented {
            break;
        }
        kept.push(line);
    }
    trim_trailing_blank(&kept)
}

fn fenced(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(open) = lines.iter().position(|l| l.trim_start().starts_with("```")) else {
        let all: Vec<&str> = text.lines().skip_while(|l| l.trim().is_empty()).collect();
        return trim_trailing_blank(&all);
    };
    let body = &lines[open + 1..];
    let close = body.iter().position(|l| l.trim() == "```").unwrap_or(body.len());
    trim_trailing_blank(&body[..close])
}

fn trim_trailing_blank(lines: &[&str]) -> String {
    let end = lines.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1);
    let mut out = lines[..end].join("\n");
    out.truncate(out.trim_end().len());
    out
}

/// Python's `textwrap.dedent`: remove the whitespace prefix common to all non-blank lines;
/// blank lines become empty.
pub fn dedent(text: &str) -> String {
    let prefix_len = |l: &str| l.len() - l.trim_start_matches([' ', '\t']).len();
    let common: Option<&str> = text.lines().filter(|l| !l.trim().is_empty()).fold(None, |acc, l| {
        let p = &l[..prefix_len(l)];
        Some(match acc {
            None => p,
            Some(a) => {
                let n = a.bytes().zip(p.bytes()).take_while(|(x, y)| x == y).count();
                &a[..n]
            }
        })
    });
    let cut = common.map_or(0, str::len);
    text.lines().map(|l| if l.trim().is_empty() { "" } else { &l[cut..] }).collect::<Vec<_>>().join("\n")
}

/// Indent every line after the first by `indent` (the first line goes where the placeholder is).
pub fn indent_continuation(text: &str, indent: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push('\n');
            if !line.is_empty() {
                out.push_str(indent);
            }
        }
        out.push_str(line);
    }
    out
}

/// The `commented` template filter: prefix each line with `# ` (a blank line becomes `#`).
pub fn commented(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if content.trim().is_empty() {
            out.push('#');
        } else {
            out.push_str("# ");
            out.push_str(content);
        }
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The indentation that continuation lines of `{{ action }}` get in an assembly template: the
/// leading whitespace of the line holding the first `{{ action }}` placeholder.
pub(crate) fn placeholder_indent(template: &str) -> String {
    let mut search = 0;
    while let Some(found) = template[search..].find("{{") {
        let start = search + found;
        let inner = template[start + 2..].trim_start_matches('-').trim_start();
        let is_action = inner
            .strip_prefix("action")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_'));
        if is_action {
            let line_start = template[..start].rfind('\n').map_or(0, |i| i + 1);
            let line = &template[line_start..start];
            return line[..line.len() - line.trim_start_matches([' ', '\t']).len()].to_string();
        }
        search = start + 2;
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn raw_keeps_everything() {
        assert_eq!(extract("a\nb STOP c", Extract::Raw, &stops(&["STOP"])), "a\nb STOP c");
    }

    #[test]
    fn stop_sequences_cut_at_the_earliest() {
        let s = stops(&["\n\n", "def "]);
        assert_eq!(extract("x = 1\ndef f(): pass\n\nmore", Extract::Stop, &s), "x = 1\n");
        assert_eq!(extract("no stop here", Extract::Stop, &s), "no stop here");
        assert_eq!(cut_at_stop("abc", &stops(&[""])), "abc");
    }

    #[test]
    fn first_line() {
        assert_eq!(
            extract(" RandomForestClassifier(n_estimators=50)  \nprint(1)", Extract::FirstLine, &[]),
            " RandomForestClassifier(n_estimators=50)"
        );
        assert_eq!(extract("\n\n  SVC()\nx", Extract::FirstLine, &[]), "  SVC()");
        assert_eq!(extract("", Extract::FirstLine, &[]), "");
        assert_eq!(
            extract("LogisticRegression()<|im_end|>junk", Extract::FirstLine, &stops(&["<|im_end|>"])),
            "LogisticRegression()"
        );
    }

    #[test]
    fn until_unindented_stops_at_column_zero() {
        let generation =
            "    from sklearn.svm import SVC\n\n    model = SVC()\n    return model\ndef other():\n    pass\n";
        assert_eq!(
            extract(generation, Extract::UntilUnindented, &[]),
            "    from sklearn.svm import SVC\n\n    model = SVC()\n    return model"
        );
        // A leading blank line is skipped; trailing blank lines go.
        assert_eq!(extract("\n    a = 1\n\n\n\"\"\"doc\"\"\"", Extract::UntilUnindented, &[]), "    a = 1");
        // An unindented first line is kept with its indented block.
        assert_eq!(extract("if x:\n    y\nz\n", Extract::UntilUnindented, &[]), "if x:\n    y");
    }

    #[test]
    fn fenced_with_and_without_tag() {
        let with_tag = "Here is the code:\n```python\nmodel = SVC()\n```\nIt uses an SVM.";
        assert_eq!(extract(with_tag, Extract::Fenced, &[]), "model = SVC()");
        let without = "```\n  a = 1\n  b = 2\n```";
        assert_eq!(extract(without, Extract::Fenced, &[]), "  a = 1\n  b = 2");
    }

    #[test]
    fn fenced_takes_the_first_of_two_blocks() {
        let two = "```py\nfirst()\n```\ntext\n```py\nsecond()\n```\n";
        assert_eq!(extract(two, Extract::Fenced, &[]), "first()");
    }

    #[test]
    fn fenced_unterminated_runs_to_the_end() {
        assert_eq!(extract("Sure!\n```python\nx = 1\ny = 2\n\n", Extract::Fenced, &[]), "x = 1\ny = 2");
    }

    #[test]
    fn fenced_without_any_fence_takes_the_text() {
        assert_eq!(extract("\n\nmodel = SVC()\n\n", Extract::Fenced, &[]), "model = SVC()");
    }

    #[test]
    fn fenced_respects_stop_sequences() {
        let s = stops(&["<|im_end|>"]);
        assert_eq!(extract("```python\nx = 1\n```<|im_end|>```\ny\n```", Extract::Fenced, &s), "x = 1");
    }

    #[test]
    fn dedent_like_textwrap() {
        assert_eq!(dedent("    a\n\n      b\n    c"), "a\n\n  b\nc");
        assert_eq!(dedent("\ta\n\tb"), "a\nb");
        assert_eq!(dedent("a\n    b"), "a\n    b");
        assert_eq!(dedent("  x  \n   \n  y"), "x  \n\ny");
    }

    #[test]
    fn continuation_indent() {
        assert_eq!(indent_continuation("a\n\nb\n  c", "    "), "a\n\n    b\n      c");
        assert_eq!(indent_continuation("single", "    "), "single");
    }

    #[test]
    fn commented_filter() {
        assert_eq!(commented("def f():\n    return 1\n\nx"), "# def f():\n#     return 1\n#\n# x");
        assert_eq!(commented("a\n"), "# a\n");
    }

    #[test]
    fn placeholder_indentation() {
        assert_eq!(placeholder_indent("def f():\n    {{ action }}\n"), "    ");
        assert_eq!(placeholder_indent("def f():\n    model = {{action}}\n"), "    ");
        assert_eq!(placeholder_indent("{{ actions }}\n  {{- action }}"), "  ");
        assert_eq!(placeholder_indent("{{ action }}"), "");
        assert_eq!(placeholder_indent("no placeholder"), "");
    }
}
