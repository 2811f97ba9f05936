//! CSV files: a header row, then one row per sample (RFC 4180 quoting).
//!
//! Fields are separated by commas; a field may be quoted with `"` (a quoted field may hold commas,
//! newlines and `""` for a quote). Unquoted fields are trimmed of surrounding spaces; blank lines
//! are skipped; a UTF-8 byte-order mark is ignored. Every row must have as many fields as the
//! header. See [`table`](super::table) for how columns become features.

use std::path::Path;

use super::table::{self, ColumnKind, RawColumn};
use super::{file_stem, DataError, Dataset};

pub(super) fn load(path: &Path, target: &str) -> Result<Dataset, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    parse(&text, path, target)
}

/// One parsed record: its fields (with whether each was quoted) and its first line.
struct Record {
    line: usize,
    fields: Vec<(String, bool)>,
}

pub(super) fn parse(text: &str, path: &Path, target: &str) -> Result<Dataset, DataError> {
    let err = |line: usize, message: String| DataError::Parse { path: path.to_path_buf(), line, message };
    let mut records = records(text.strip_prefix('\u{feff}').unwrap_or(text), path)?.into_iter();
    let header = records.next().ok_or_else(|| err(1, "the file is empty; expected a header row".to_string()))?;
    let names: Vec<String> = header.fields.into_iter().map(|(name, _)| name).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(err(header.line, format!("column `{name}` appears twice in the header")));
        }
    }
    let target_index = names.iter().position(|n| n == target).ok_or_else(|| {
        err(header.line, format!("no target column `{target}` in the header; the columns are: {}", names.join(", ")))
    })?;

    let mut columns: Vec<RawColumn> = names
        .iter()
        .map(|name| RawColumn { name: name.clone(), kind: ColumnKind::Infer, values: Vec::new() })
        .collect();
    let mut lines = Vec::new();
    for record in records {
        if record.fields.len() != names.len() {
            return Err(err(
                record.line,
                format!("expected {} fields as in the header, found {}", names.len(), record.fields.len()),
            ));
        }
        for (column, (value, quoted)) in columns.iter_mut().zip(record.fields) {
            // A quoted empty string is still no value; a quoted "NA" is the text NA.
            let missing = if quoted { value.is_empty() } else { table::is_missing_csv(&value) };
            column.values.push(if missing { None } else { Some(value) });
        }
        lines.push(record.line);
    }
    if lines.is_empty() {
        return Err(err(header.line, "no data rows after the header".to_string()));
    }
    table::build(file_stem(path), path, columns, &lines, target_index)
}

/// Split the text into records; blank lines are skipped.
fn records(text: &str, path: &Path) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    loop {
        // Skip blank lines.
        while let Some(&c) = chars.peek() {
            if c == '\n' {
                line += 1;
                chars.next();
            } else if c == '\r' {
                chars.next();
            } else {
                break;
            }
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        loop {
            match chars.next() {
                None => {
                    fields.push(finish(field, quoted));
                    out.push(Record { line: start, fields });
                    return Ok(out);
                }
                Some('\n') => {
                    line += 1;
                    fields.push(finish(field, quoted));
                    break;
                }
                Some('\r') => {}
                Some(',') => {
                    fields.push(finish(std::mem::take(&mut field), quoted));
                    quoted = false;
                }
                Some('"') if field.trim().is_empty() && !quoted => {
                    quoted = true;
                    field.clear();
                    let open_line = line;
                    loop {
                        match chars.next() {
                            None => {
                                return Err(DataError::Parse {
                                    path: path.to_path_buf(),
                                    line: open_line,
                                    message: "a quoted field is never closed (missing `\"`)".to_string(),
                                })
                            }
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                        }
                    }
                    // Only spaces may follow the closing quote before the separator.
                    while let Some(&c) = chars.peek() {
                        if c == ' ' || c == '\t' {
                            chars.next();
                        } else if c == ',' || c == '\n' || c == '\r' {
                            break;
                        } else {
                            return Err(DataError::Parse {
                                path: path.to_path_buf(),
                                line,
                                message: format!(
                                    "unexpected `{c}` after a closing quote; expected `,` or the end of the line"
                                ),
                            });
                        }
                    }
                }
                Some(c) => field.push(c),
            }
        }
        out.push(Record { line: start, fields });
    }
}

fn finish(field: String, quoted: bool) -> (String, bool) {
    if quoted {
        (field, true)
    } else {
        (field.trim().to_string(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str, target: &str) -> Result<Dataset, DataError> {
        parse(text, Path::new("d.csv"), target)
    }

    #[test]
    fn numeric_categorical_and_missing_columns() {
        let text = "age,colour,score,label\n\
                    30,red,1.5,yes\n\
                    NA,blue,?,no\n\
                    50,red,2.5,yes\n\
                    20,,4.0,no\n";
        let d = parse_str(text, "label").unwrap();
        assert_eq!(d.name, "d");
        assert_eq!(d.feature_names, vec!["age", "colour", "score"]);
        assert_eq!(d.class_names, vec!["no", "yes"]);
        assert_eq!(d.y, vec![1, 0, 1, 0]);
        // age median of 30, 50, 20 is 30; colour codes blue=0, red=1, the gap gets red (2 of 3);
        // score median of 1.5, 2.5, 4.0 is 2.5.
        assert_eq!(d.x, vec![vec![30.0, 1.0, 1.5], vec![30.0, 0.0, 2.5], vec![50.0, 1.0, 2.5], vec![20.0, 1.0, 4.0],]);
        assert_eq!(
            d.notes,
            vec![
                "column `age`: 1 missing values imputed with the column median 30",
                "column `colour`: categorical, encoded blue=0, red=1",
                "column `colour`: 1 missing values imputed with the most frequent value `red`",
                "column `score`: 1 missing values imputed with the column median 2.5",
            ]
        );
    }

    #[test]
    fn quoting_crlf_bom_and_blank_lines() {
        let text = "\u{feff}\"a\",\"b, with comma\",t\r\n\r\n\"x \"\"1\"\"\", 2 ,p\r\n\"multi\nline\",3,q\r\n";
        let d = parse_str(text, "t").unwrap();
        assert_eq!(d.feature_names, vec!["a", "b, with comma"]);
        assert_eq!(d.x, vec![vec![1.0, 2.0], vec![0.0, 3.0]]);
        assert_eq!(d.y, vec![0, 1]);
        assert!(d.notes.iter().any(|n| n.contains("multi\nline=0, x \"1\"=1")), "{:?}", d.notes);
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse_str("a,b,t\n1,2,x\n\n3,4\n", "t").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:4: error: expected 3 fields as in the header, found 2");
        let err = parse_str("a,b\n1,2\n", "label").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:1: error: no target column `label` in the header; the columns are: a, b");
        let err = parse_str("a,t\n\"1,x\n", "t").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:2: error: a quoted field is never closed (missing `\"`)");
        let err = parse_str("a,t\n\"1\"2,x\n", "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.csv:2: error: unexpected `2` after a closing quote; expected `,` or the end of the line"
        );
        let err = parse_str("", "t").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:1: error: the file is empty; expected a header row");
        let err = parse_str("a,t\n", "t").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:1: error: no data rows after the header");
        let err = parse_str("a,a,t\n1,2,x\n", "t").unwrap_err();
        assert_eq!(err.to_string(), "d.csv:1: error: column `a` appears twice in the header");
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = load(Path::new("/nonexistent/dir/x.csv"), "t").unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/dir/x.csv: error: cannot read the data file:"), "{err}");
    }
}
