//! ARFF files (Weka's format, as OpenML serves data sets).
//!
//! Supported: `@relation`, `@attribute NAME TYPE` with TYPE `numeric`, `real`, `integer`,
//! `string` or a nominal list `{a, b, ...}`, then `@data` with dense rows (comma-separated values)
//! or sparse rows (`{index value, ...}`, absent values are 0 or a nominal's first value). Keywords
//! are case-insensitive; names and values may be quoted with `'` or `"` (backslash escapes);
//! `%` starts a comment line; `?` is a missing value. `date` and `relational` attributes are
//! refused with a clear error, as are row weights (`{...}` after a row).
//! Nominal attributes are coded in declaration order. See [`table`](super::table).

use std::path::Path;

use super::select::ColumnSelection;
use super::table::{self, ColumnKind, RawColumn};
use super::{file_stem, DataError, Dataset};

pub(super) fn load(path: &Path, target: &str, selection: &ColumnSelection) -> Result<Dataset, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    parse(&text, path, target, selection)
}

/// The names of the file's `@attribute`s, read up to `@data` (other header lines are checked
/// when the file is loaded).
pub(super) fn column_names(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut names = Vec::new();
    for (index, raw) in text.strip_prefix('\u{feff}').unwrap_or(&text).lines().enumerate() {
        let (keyword, rest) = split_keyword(raw.trim());
        match keyword.to_ascii_lowercase().as_str() {
            "@attribute" => {
                let (name, _) = take_token(rest.trim()).map_err(|message| DataError::Parse {
                    path: path.to_path_buf(),
                    line: index + 1,
                    message,
                })?;
                names.push(name);
            }
            "@data" => break,
            _ => {}
        }
    }
    Ok(names)
}

pub(super) fn parse(text: &str, path: &Path, target: &str, selection: &ColumnSelection) -> Result<Dataset, DataError> {
    let err = |line: usize, message: String| DataError::Parse { path: path.to_path_buf(), line, message };
    let mut relation: Option<String> = None;
    let mut columns: Vec<RawColumn> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    let mut in_data = false;
    let mut data_line = 0;

    for (index, raw) in text.strip_prefix('\u{feff}').unwrap_or(text).lines().enumerate() {
        let line = index + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('%') {
            continue;
        }
        if in_data {
            let values = if content.starts_with('{') {
                sparse_row(content, &columns).map_err(|m| err(line, m))?
            } else {
                let fields = split_fields(content).map_err(|m| err(line, m))?;
                if fields.len() != columns.len() {
                    return Err(err(
                        line,
                        format!("expected {} values (one per attribute), found {}", columns.len(), fields.len()),
                    ));
                }
                fields
            };
            for (column, value) in columns.iter_mut().zip(values) {
                column.values.push(value);
            }
            lines.push(line);
            continue;
        }

        let (keyword, rest) = split_keyword(content);
        match keyword.to_ascii_lowercase().as_str() {
            "@relation" => relation = Some(unquote(rest.trim()).map_err(|m| err(line, m))?.0),
            "@attribute" => {
                let (name, rest) = take_token(rest.trim()).map_err(|m| err(line, m))?;
                if name.is_empty() {
                    return Err(err(line, "an @attribute needs a name".to_string()));
                }
                if columns.iter().any(|c| c.name == name) {
                    return Err(err(line, format!("attribute `{name}` is declared twice")));
                }
                let kind = attribute_kind(rest.trim()).map_err(|m| err(line, m))?;
                columns.push(RawColumn { name, kind, values: Vec::new() });
            }
            "@data" => {
                in_data = true;
                data_line = line;
            }
            _ => {
                return Err(err(
                    line,
                    format!("expected `@relation`, `@attribute` or `@data`, found `{}`", truncate(content)),
                ))
            }
        }
    }

    if !in_data {
        return Err(DataError::Invalid { path: path.to_path_buf(), message: "no `@data` section".to_string() });
    }
    if lines.is_empty() {
        return Err(err(data_line, "no data rows after `@data`".to_string()));
    }
    let target_index = columns.iter().position(|c| c.name == target).ok_or_else(|| DataError::Invalid {
        path: path.to_path_buf(),
        message: format!(
            "no target attribute `{target}`; the attributes are: {}",
            columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    })?;
    let name = relation.filter(|r| !r.is_empty()).unwrap_or_else(|| file_stem(path));
    table::build(name, path, columns, &lines, target_index, selection)
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The first whitespace-separated word and the rest.
fn split_keyword(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Read one possibly quoted token from the start of `s`; returns it and the remaining text.
fn take_token(s: &str) -> Result<(String, &str), String> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, q @ ('\'' | '"'))) => {
            let mut out = String::new();
            let mut escaped = false;
            for (i, c) in chars {
                if escaped {
                    out.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    return Ok((out, &s[i + c.len_utf8()..]));
                } else {
                    out.push(c);
                }
            }
            Err(format!("a quoted name or value is never closed (missing `{q}`)"))
        }
        Some(_) => {
            let end = s.find(|c: char| c.is_whitespace() || c == '{' || c == ',' || c == '}').unwrap_or(s.len());
            Ok((s[..end].to_string(), &s[end..]))
        }
        None => Ok((String::new(), s)),
    }
}

/// A whole field, unquoted; the bool says whether it was quoted.
fn unquote(s: &str) -> Result<(String, bool), String> {
    if s.starts_with('\'') || s.starts_with('"') {
        let (token, rest) = take_token(s)?;
        if !rest.trim().is_empty() {
            return Err(format!("unexpected `{}` after a quoted value", truncate(rest.trim())));
        }
        Ok((token, true))
    } else {
        Ok((s.to_string(), false))
    }
}

fn attribute_kind(s: &str) -> Result<ColumnKind, String> {
    if let Some(list) = s.strip_prefix('{') {
        let inner = list.trim_end().strip_suffix('}').ok_or("a nominal attribute's value list must end with `}`")?;
        let values: Vec<String> = split_fields(inner)?
            .into_iter()
            .map(|v| v.ok_or("`?` cannot be a declared nominal value"))
            .collect::<Result<_, _>>()?;
        return Ok(ColumnKind::Nominal(values));
    }
    let (word, _) = split_keyword(s);
    match word.to_ascii_lowercase().as_str() {
        "numeric" | "real" | "integer" => Ok(ColumnKind::Numeric),
        "string" => Ok(ColumnKind::Text),
        "date" | "relational" => {
            Err(format!("`{word}` attributes are not supported; convert the column to numeric or nominal"))
        }
        "" => Err("an @attribute needs a type (numeric, string or {values})".to_string()),
        other => {
            Err(format!("unknown attribute type `{other}`; expected numeric, real, integer, string or {{values}}"))
        }
    }
}

/// Split a dense row (or a nominal list) at commas outside quotes; `?` and empty are `None`.
fn split_fields(s: &str) -> Result<Vec<Option<String>>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    loop {
        let (value, after) = if rest.starts_with('\'') || rest.starts_with('"') {
            let (token, after) = take_token(rest)?;
            (Some(token), after.trim_start())
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let raw = rest[..end].trim();
            let value = if raw == "?" || raw.is_empty() { None } else { Some(raw.to_string()) };
            (value, &rest[end..])
        };
        out.push(value);
        if let Some(next) = after.strip_prefix(',') {
            rest = next.trim_start();
        } else if after.is_empty() {
            return Ok(out);
        } else if after.starts_with('{') {
            return Err("instance weights (`{w}` after a row) are not supported".to_string());
        } else {
            return Err(format!("expected `,` before `{}`", truncate(after)));
        }
    }
}

/// A sparse row `{i v, j w}`: absent numeric values are 0, absent nominal values the first one.
fn sparse_row(s: &str, columns: &[RawColumn]) -> Result<Vec<Option<String>>, String> {
    let inner =
        s.strip_prefix('{').and_then(|r| r.trim_end().strip_suffix('}')).ok_or("a sparse row must end with `}`")?;
    let mut values: Vec<Option<String>> = columns
        .iter()
        .map(|c| match &c.kind {
            ColumnKind::Nominal(declared) => declared.first().cloned(),
            _ => Some("0".to_string()),
        })
        .collect();
    if inner.trim().is_empty() {
        return Ok(values);
    }
    for pair in split_sparse_pairs(inner)? {
        let (index, value) = pair;
        let slot = values
            .get_mut(index)
            .ok_or_else(|| format!("sparse index {index} is out of range ({} attributes)", columns.len()))?;
        *slot = value;
    }
    Ok(values)
}

fn split_sparse_pairs(inner: &str) -> Result<Vec<(usize, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut rest = inner.trim_start();
    loop {
        let (index, after) = split_keyword(rest);
        let index: usize =
            index.parse().map_err(|_| format!("expected an attribute index in a sparse row, found `{index}`"))?;
        let after = after.trim_start();
        let (value, after) = if after.starts_with('\'') || after.starts_with('"') {
            let (token, after) = take_token(after)?;
            (Some(token), after.trim_start())
        } else {
            let end = after.find(',').unwrap_or(after.len());
            let raw = after[..end].trim();
            (if raw == "?" || raw.is_empty() { None } else { Some(raw.to_string()) }, &after[end..])
        };
        out.push((index, value));
        match after.strip_prefix(',') {
            Some(next) => rest = next.trim_start(),
            None if after.is_empty() => return Ok(out),
            None => return Err(format!("expected `,` before `{}`", truncate(after))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_of_an_arff_file_and_its_attribute_names() {
        let features = ColumnSelection::Features(vec!["note".into(), "outlook".into()]);
        let d = parse(SMALL, Path::new("d.arff"), "play", &features).unwrap();
        assert_eq!(d.feature_names, vec!["note", "outlook"]);
        assert_eq!(d.x[0], vec![0.0, 0.0]);
        assert_eq!(d.dropped.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["temperature"]);
        let err = parse(SMALL, Path::new("d.arff"), "play", &ColumnSelection::Features(vec!["play".into()]));
        assert!(err.unwrap_err().to_string().contains("`play` in `dataset.features` is the target column"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.arff");
        std::fs::write(&path, SMALL).unwrap();
        assert_eq!(column_names(&path).unwrap(), vec!["outlook", "temperature", "note", "play"]);
    }

    fn parse_str(text: &str, target: &str) -> Result<Dataset, DataError> {
        parse(text, Path::new("d.arff"), target, &ColumnSelection::All)
    }

    const SMALL: &str = "% A test file\n\
        @RELATION 'weather data'\n\
        \n\
        @attribute outlook {sunny, overcast, 'rainy day'}\n\
        @attribute temperature NUMERIC\n\
        @attribute note string\n\
        @attribute play {yes,no}\n\
        @data\n\
        % a comment among the rows\n\
        sunny,85,'a, b',no\n\
        overcast, ?, c, yes\n\
        'rainy day',70,?,yes\n\
        ?,64,c,no\n";

    #[test]
    fn dense_rows_with_nominals_strings_and_missing_values() {
        let d = parse_str(SMALL, "play").unwrap();
        assert_eq!(d.name, "weather data");
        assert_eq!(d.feature_names, vec!["outlook", "temperature", "note"]);
        // Declared order for the nominal target.
        assert_eq!(d.class_names, vec!["yes", "no"]);
        assert_eq!(d.y, vec![1, 0, 0, 1]);
        // outlook: declared codes, the gap takes the most frequent (all tie: the smallest, sunny);
        // temperature: median of 85, 70, 64 = 70; note: sorted codes `a, b`=0, c=1, gap -> c.
        assert_eq!(d.x, vec![vec![0.0, 85.0, 0.0], vec![1.0, 70.0, 1.0], vec![2.0, 70.0, 1.0], vec![0.0, 64.0, 1.0],]);
        let report: Vec<String> = d.columns.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            report,
            vec![
                "`outlook`: categorical, 3 codes (sunny=0, overcast=1, rainy day=2), 1 missing value filled with the most frequent value `sunny`",
                "`temperature`: numeric, 1 missing value filled with the column median 70",
                "`note`: categorical, 2 codes (a, b=0, c=1), 1 missing value filled with the most frequent value `c`",
            ]
        );
    }

    #[test]
    fn an_openml_style_file() {
        // The head of OpenML 37 (diabetes) as OpenML serves it: quoted names, `real`, a nominal
        // class list with spaces, and a comment block.
        let text = "% 1. Title: Pima Indians Diabetes Database\n\
            %\n\
            @relation pima_diabetes\n\
            @attribute 'preg' real\n\
            @attribute 'plas' real\n\
            @attribute 'mass' real\n\
            @attribute 'class' { tested_negative, tested_positive}\n\
            @data\n\
            6,148,33.6,tested_positive\n\
            1,85,26.6,tested_negative\n\
            8,183,23.3,tested_positive\n";
        let d = parse_str(text, "class").unwrap();
        assert_eq!(d.name, "pima_diabetes");
        assert_eq!(d.feature_names, vec!["preg", "plas", "mass"]);
        assert_eq!(d.class_names, vec!["tested_negative", "tested_positive"]);
        assert_eq!(d.y, vec![1, 0, 1]);
        assert_eq!(d.x[2], vec![8.0, 183.0, 23.3]);
        assert!(d.notes.is_empty(), "{:?}", d.notes);
    }

    #[test]
    fn sparse_rows() {
        let text = "@relation s\n@attribute a numeric\n@attribute b numeric\n@attribute c {n,p}\n@data\n{0 3, 2 p}\n{1 2}\n{}\n";
        let d = parse_str(text, "c").unwrap();
        assert_eq!(d.x, vec![vec![3.0, 0.0], vec![0.0, 2.0], vec![0.0, 0.0]]);
        assert_eq!(d.y, vec![1, 0, 0]);
    }

    #[test]
    fn unused_declared_classes_are_dropped() {
        let text = "@relation s\n@attribute a numeric\n@attribute c {x,y,z}\n@data\n1,z\n2,x\n";
        let d = parse_str(text, "c").unwrap();
        assert_eq!(d.class_names, vec!["x", "z"]);
        assert_eq!(d.y, vec![1, 0]);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "@relation r\n@attribute a numeric\n@attribute c {x,y}\n@data\n1,x\n2\n",
                "d.arff:6: error: expected 2 values (one per attribute), found 1",
            ),
            (
                "@relation r\n@attribute a numeric\n@attribute c {x,y}\n@data\nabc,x\n2,y\n",
                "d.arff:5: error: `abc` in numeric attribute `a` is not a finite number",
            ),
            (
                "@relation r\n@attribute a numeric\n@attribute c {x,y}\n@data\n1,x\n2,w\n",
                "d.arff:6: error: value `w` of `c` is not one of its declared values {x,y}",
            ),
            (
                "@relation r\n@attribute d date\n",
                "d.arff:2: error: `date` attributes are not supported; convert the column to numeric or nominal",
            ),
            (
                "@relation r\n@attribute a blob\n",
                "d.arff:2: error: unknown attribute type `blob`; expected numeric, real, integer, string or {values}",
            ),
            ("@relation r\nhello\n", "d.arff:2: error: expected `@relation`, `@attribute` or `@data`, found `hello`"),
            ("@relation r\n@attribute a numeric\n@attribute c {x,y}\n", "d.arff: error: no `@data` section"),
            (
                "@relation r\n@attribute a numeric\n@attribute c {x,y}\n@data\n",
                "d.arff:4: error: no data rows after `@data`",
            ),
            (
                "@relation r\n@attribute a numeric\n@attribute c {x,y}\n@data\n1,x\n",
                "d.arff: error: no target attribute `class`; the attributes are: a, c",
            ),
            (
                "@relation r\n@attribute 'a numeric\n",
                "d.arff:2: error: a quoted name or value is never closed (missing `'`)",
            ),
        ];
        for (text, expected) in cases {
            let target = if expected.contains("`class`") { "class" } else { "c" };
            let err = parse_str(text, target).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }
}
