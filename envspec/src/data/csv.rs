//! CSV files: a header row, then one row per sample (RFC 4180 quoting).
//!
//! Fields are separated by commas; a field may be quoted with `"` (a quoted field may hold commas,
//! newlines and `""` for a quote). Unquoted fields are trimmed of surrounding spaces; blank lines
//! are skipped; a UTF-8 byte-order mark is ignored. Every row must have as many fields as the
//! header. See [`table`](super::table) for how columns become features.

use std::path::Path;

use super::select::ColumnSelection;
use super::table::{self, ColumnKind, RawColumn};
use super::{file_stem, DataError, Dataset};

pub(super) fn load(path: &Path, target: &str, selection: &ColumnSelection) -> Result<Dataset, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    parse(&text, path, target, selection)
}

/// The names in the file's header row.
pub(super) fn column_names(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let header = records(text.strip_prefix('\u{feff}').unwrap_or(&text), path, 1)?.into_iter().next();
    let header = header.ok_or_else(|| DataError::Parse {
        path: path.to_path_buf(),
        line: 1,
        message: "the file is empty; expected a header row".to_string(),
    })?;
    Ok(header.fields.into_iter().map(|(name, _)| name).collect())
}

/// One parsed record: its fields (with whether each was quoted) and its first line.
struct Record {
    line: usize,
    fields: Vec<(String, bool)>,
}

pub(super) fn parse(text: &str, path: &Path, target: &str, selection: &ColumnSelection) -> Result<Dataset, DataError> {
    let err = |line: usize, message: String| DataError::Parse { path: path.to_path_buf(), line, message };
    let mut records = records(text.strip_prefix('\u{feff}').unwrap_or(text), path, usize::MAX)?.into_iter();
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
    table::build(file_stem(path), path, columns, &lines, target_index, selection)
}

/// Split the text into records, at most `max` of them; blank lines are skipped.
fn records(text: &str, path: &Path, max: usize) -> Result<Vec<Record>, DataError> {
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
        if chars.peek().is_none() || out.len() >= max {
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
    use crate::data::{ColumnEncoding, DropReason, DroppedColumn};

    fn parse_str(text: &str, target: &str) -> Result<Dataset, DataError> {
        parse(text, Path::new("d.csv"), target, &ColumnSelection::All)
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
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        let report: Vec<String> = d.columns.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            report,
            vec![
                "`age`: numeric, 1 missing value filled with the column median 30",
                "`colour`: categorical, 2 codes (blue=0, red=1), 1 missing value filled with the most frequent value `red`",
                "`score`: numeric, 1 missing value filled with the column median 2.5",
            ]
        );
        assert!(d.dropped.is_empty());
    }

    #[test]
    fn quoting_crlf_bom_and_blank_lines() {
        let text = "\u{feff}\"a\",\"b, with comma\",t\r\n\r\n\"x \"\"1\"\"\", 2 ,p\r\n\"multi\nline\",3,q\r\n";
        let d = parse_str(text, "t").unwrap();
        assert_eq!(d.feature_names, vec!["a", "b, with comma"]);
        assert_eq!(d.x, vec![vec![1.0, 2.0], vec![0.0, 3.0]]);
        assert_eq!(d.y, vec![0, 1]);
        assert_eq!(
            d.columns[0].kind,
            ColumnEncoding::Categorical { categories: vec!["multi\nline".into(), "x \"1\"".into()] }
        );
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

    /// A small passenger list: an id, the label, a class, a name (text), an age with a gap.
    const PASSENGERS: &str = "PassengerId,Survived,Pclass,Name,Age\n\
                              1,0,3,\"Braund, Mr. Owen\",22\n\
                              2,1,1,\"Cumings, Mrs. John\",38\n\
                              3,1,3,\"Heikkinen, Miss. Laina\",\n\
                              4,0,1,\"Futrelle, Mr. Jacques\",35\n";

    fn select(selection: ColumnSelection) -> Result<Dataset, DataError> {
        parse(PASSENGERS, Path::new("d.csv"), "Survived", &selection)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn drop_leaves_columns_out_in_file_order() {
        let d = select(ColumnSelection::Drop(names(&["Name", "PassengerId"]))).unwrap();
        assert_eq!(d.feature_names, vec!["Pclass", "Age"]);
        assert_eq!(d.x, vec![vec![3.0, 22.0], vec![1.0, 38.0], vec![3.0, 35.0], vec![1.0, 35.0]]);
        assert_eq!(
            d.dropped,
            vec![
                DroppedColumn { name: "PassengerId".into(), reason: DropReason::Dropped },
                DroppedColumn { name: "Name".into(), reason: DropReason::Dropped },
            ]
        );
        let report: Vec<String> = d.columns.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            report,
            vec!["`Pclass`: numeric", "`Age`: numeric, 1 missing value filled with the column median 35"]
        );
        // The same file with every column: the name is a categorical feature.
        let all = select(ColumnSelection::All).unwrap();
        assert_eq!(all.feature_names, vec!["PassengerId", "Pclass", "Name", "Age"]);
        assert_eq!(
            all.columns[2].kind,
            ColumnEncoding::Categorical {
                categories: names(&[
                    "Braund, Mr. Owen",
                    "Cumings, Mrs. John",
                    "Futrelle, Mr. Jacques",
                    "Heikkinen, Miss. Laina"
                ])
            }
        );
    }

    #[test]
    fn features_keep_the_listed_columns_in_their_order() {
        let d = select(ColumnSelection::Features(names(&["Age", "Pclass"]))).unwrap();
        assert_eq!(d.feature_names, vec!["Age", "Pclass"]);
        assert_eq!(d.x[0], vec![22.0, 3.0]);
        assert_eq!(d.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["Age", "Pclass"]);
        let dropped: Vec<(&str, DropReason)> = d.dropped.iter().map(|c| (c.name.as_str(), c.reason)).collect();
        assert_eq!(dropped, vec![("PassengerId", DropReason::NotSelected), ("Name", DropReason::NotSelected)]);
        // The split's matrices hold the selected columns only.
        let split = d.split(0, None, 0.5);
        assert_eq!(split.feature_names, vec!["Age", "Pclass"]);
        assert!(split.x_train.iter().chain(&split.x_val).all(|row| row.len() == 2));
    }

    #[test]
    fn a_selection_that_does_not_fit_the_file_is_an_error() {
        let err = select(ColumnSelection::Drop(names(&["Nmae", "Survived"]))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.csv: error: unknown column `Nmae` in `dataset.drop`; the columns are: PassengerId, Pclass, Name, Age \
             (did you mean `Name`?); `Survived` in `dataset.drop` is the target column; it cannot be dropped \
             (it is what the model predicts)"
        );
        let err = select(ColumnSelection::Drop(names(&["PassengerId", "Pclass", "Name", "Age"]))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.csv: error: `dataset.drop` drops every feature column (PassengerId, Pclass, Name, Age); keep at least one"
        );
        // A selected column without any value is left out; nothing left is an error.
        let text = "a,b,t\n1,,x\n2,,y\n";
        let d = parse(text, Path::new("d.csv"), "t", &ColumnSelection::Features(names(&["b", "a"]))).unwrap();
        assert_eq!(d.feature_names, vec!["a"]);
        assert_eq!(d.dropped, vec![DroppedColumn { name: "b".into(), reason: DropReason::NoValues }]);
        let err = parse(text, Path::new("d.csv"), "t", &ColumnSelection::Features(names(&["b"]))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.csv: error: no feature columns with values among the selected columns besides the target `t`"
        );
    }

    #[test]
    fn column_names_reads_only_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        std::fs::write(&path, "\u{feff}\"a, quoted\", b ,t\n1,2\n\"never closed\n").unwrap();
        assert_eq!(column_names(&path).unwrap(), vec!["a, quoted", "b", "t"]);
        std::fs::write(&path, "").unwrap();
        assert_eq!(
            column_names(&path).unwrap_err().to_string(),
            format!("{}:1: error: the file is empty; expected a header row", path.display())
        );
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = load(Path::new("/nonexistent/dir/x.csv"), "t", &ColumnSelection::All).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/dir/x.csv: error: cannot read the data file:"), "{err}");
    }
}
