//! From raw text columns (as read from a CSV or ARFF file) to a numeric [`Dataset`].
//!
//! Encoding rules, shared by both file formats:
//! - a missing cell is empty, `?`, `NA`, `N/A`, `NaN` or `nan` (ARFF: only `?` and empty);
//! - a column whose present cells all parse as finite numbers is numeric; its missing cells get
//!   the column median (the mean of the two middle values for an even count);
//! - any other column is categorical: its distinct values are coded 0, 1, ... in sorted (byte)
//!   order, or in declaration order for an ARFF nominal attribute; missing cells get the most
//!   frequent code (the smallest on ties);
//! - the target's classes are sorted numerically when every label is a number, in declaration
//!   order for an ARFF nominal target, else in sorted order; rows without a label are dropped;
//! - a feature column with no value at all is dropped.
//!
//! Every such transformation is written to [`Dataset::notes`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{DataError, Dataset};

/// How a raw column's values are to be read.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ColumnKind {
    /// Numeric if every present value parses, else categorical with sorted codes (CSV columns).
    Infer,
    /// Must be numeric; a value that does not parse is an error (ARFF `numeric`).
    Numeric,
    /// Categorical with codes in this declared order; other values are an error (ARFF nominal).
    Nominal(Vec<String>),
    /// Categorical with sorted codes (ARFF `string`).
    Text,
}

/// One column as read from the file: `None` is a missing cell.
#[derive(Debug, Clone)]
pub(super) struct RawColumn {
    pub name: String,
    pub kind: ColumnKind,
    pub values: Vec<Option<String>>,
}

/// Cells that mean "no value" in CSV files written by R, pandas, Weka and spreadsheets.
pub(super) fn is_missing_csv(cell: &str) -> bool {
    matches!(cell, "" | "?" | "NA" | "N/A" | "NaN" | "nan")
}

/// A finite number, or `None`.
fn parse_number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Median of a non-empty slice (sorted in place), as numpy and pandas compute it.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Show a list of categories compactly in a note.
fn show_codes(categories: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut parts: Vec<String> =
        categories.iter().take(SHOWN).enumerate().map(|(code, name)| format!("{name}={code}")).collect();
    if categories.len() > SHOWN {
        parts.push(format!("... ({} categories)", categories.len()));
    }
    parts.join(", ")
}

/// Build the data set. `lines[i]` is the source line of row `i` (for error messages), and
/// `target` indexes `columns`.
pub(super) fn build(
    name: String,
    path: &Path,
    columns: Vec<RawColumn>,
    lines: &[usize],
    target: usize,
) -> Result<Dataset, DataError> {
    let invalid = |message: String| DataError::Invalid { path: path.to_path_buf(), message };
    let mut notes = Vec::new();
    let target_col = &columns[target];

    // Rows without a label cannot be used for classification.
    let keep: Vec<usize> = (0..lines.len()).filter(|&r| target_col.values[r].is_some()).collect();
    let dropped = lines.len() - keep.len();
    if dropped > 0 {
        notes.push(format!("{dropped} rows without a value for the target `{}` were dropped", target_col.name));
    }
    if keep.is_empty() {
        return Err(invalid(format!("no rows with a value for the target column `{}`", target_col.name)));
    }

    let (class_names, y) = encode_target(path, target_col, &keep, lines)?;
    if class_names.len() < 2 {
        return Err(invalid(format!(
            "the target column `{}` has only one class ({}); classification needs at least two",
            target_col.name,
            class_names.first().map(String::as_str).unwrap_or("")
        )));
    }

    let mut feature_names = Vec::new();
    let mut feature_columns: Vec<Vec<f64>> = Vec::new();
    for (index, column) in columns.iter().enumerate() {
        if index == target {
            continue;
        }
        match encode_feature(path, column, &keep, lines, &mut notes)? {
            Some(values) => {
                feature_names.push(column.name.clone());
                feature_columns.push(values);
            }
            None => notes.push(format!("column `{}` has no values and was dropped", column.name)),
        }
    }
    if feature_columns.is_empty() {
        return Err(invalid(format!("no feature columns besides the target `{}`", target_col.name)));
    }

    let x = (0..keep.len()).map(|r| feature_columns.iter().map(|col| col[r]).collect()).collect();
    Ok(Dataset { name, feature_names, class_names, x, y, notes })
}

/// Class names and per-row class indices for the kept rows (all of which have a label).
fn encode_target(
    path: &Path,
    column: &RawColumn,
    keep: &[usize],
    lines: &[usize],
) -> Result<(Vec<String>, Vec<usize>), DataError> {
    let labels: Vec<&str> = keep.iter().map(|&r| column.values[r].as_deref().unwrap_or_default()).collect();
    let class_names: Vec<String> = match &column.kind {
        ColumnKind::Nominal(declared) => {
            // Declared order, keeping only classes that occur: an absent class would make every
            // metric over the split ill-defined.
            for (i, label) in labels.iter().enumerate() {
                if !declared.iter().any(|d| d == label) {
                    return Err(DataError::Parse {
                        path: path.to_path_buf(),
                        line: lines[keep[i]],
                        message: format!(
                            "value `{label}` of `{}` is not one of its declared values {{{}}}",
                            column.name,
                            declared.join(",")
                        ),
                    });
                }
            }
            declared.iter().filter(|d| labels.contains(&d.as_str())).cloned().collect()
        }
        _ => {
            let numeric: Option<Vec<f64>> = labels.iter().map(|l| parse_number(l)).collect();
            match numeric {
                Some(values) => {
                    // Group equal numbers ("1" and "1.0"; `+ 0.0` folds -0 into 0) and name each
                    // class by its first spelling.
                    let values: Vec<f64> = values.iter().map(|v| v + 0.0).collect();
                    let mut distinct = values.clone();
                    distinct.sort_by(f64::total_cmp);
                    distinct.dedup();
                    let class_of = |v: f64| distinct.binary_search_by(|u| u.total_cmp(&v));
                    let mut names: Vec<Option<&str>> = vec![None; distinct.len()];
                    let mut y = Vec::with_capacity(values.len());
                    for (&v, label) in values.iter().zip(&labels) {
                        let class = class_of(v).unwrap_or_default();
                        names[class].get_or_insert(label);
                        y.push(class);
                    }
                    let names = names.into_iter().map(|n| n.unwrap_or_default().to_string()).collect();
                    return Ok((names, y));
                }
                None => {
                    let mut distinct: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
                    distinct.sort();
                    distinct.dedup();
                    distinct
                }
            }
        }
    };
    let index: HashMap<&str, usize> = class_names.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let y = labels.iter().map(|l| index[l]).collect();
    Ok((class_names, y))
}

/// The numeric values of one feature column over the kept rows, missing cells imputed; `None`
/// when the column has no value at all.
fn encode_feature(
    path: &Path,
    column: &RawColumn,
    keep: &[usize],
    lines: &[usize],
    notes: &mut Vec<String>,
) -> Result<Option<Vec<f64>>, DataError> {
    let cells: Vec<Option<&str>> = keep.iter().map(|&r| column.values[r].as_deref()).collect();
    let n_missing = cells.iter().filter(|c| c.is_none()).count();
    if n_missing == cells.len() {
        return Ok(None);
    }

    let numeric = match &column.kind {
        ColumnKind::Numeric => {
            let mut values = Vec::with_capacity(cells.len());
            for (i, cell) in cells.iter().enumerate() {
                values.push(match cell {
                    None => None,
                    Some(s) => Some(parse_number(s).ok_or_else(|| DataError::Parse {
                        path: path.to_path_buf(),
                        line: lines[keep[i]],
                        message: format!("`{s}` in numeric attribute `{}` is not a finite number", column.name),
                    })?),
                });
            }
            Some(values)
        }
        ColumnKind::Infer => cells
            .iter()
            .map(|cell| match cell {
                None => Some(None),
                Some(s) => parse_number(s).map(Some),
            })
            .collect::<Option<Vec<Option<f64>>>>(),
        ColumnKind::Nominal(_) | ColumnKind::Text => None,
    };

    if let Some(values) = numeric {
        let mut present: Vec<f64> = values.iter().flatten().copied().collect();
        let fill = median(&mut present);
        if n_missing > 0 {
            notes.push(format!(
                "column `{}`: {n_missing} missing values imputed with the column median {fill}",
                column.name
            ));
        }
        return Ok(Some(values.into_iter().map(|v| v.unwrap_or(fill)).collect()));
    }

    // Categorical: codes in declared order (ARFF nominal) or sorted order.
    let categories: Vec<String> = match &column.kind {
        ColumnKind::Nominal(declared) => declared.clone(),
        _ => {
            let mut distinct: Vec<String> = cells.iter().flatten().map(|s| s.to_string()).collect();
            distinct.sort();
            distinct.dedup();
            distinct
        }
    };
    let index: HashMap<&str, usize> = categories.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut codes = Vec::with_capacity(cells.len());
    for (i, cell) in cells.iter().enumerate() {
        codes.push(match cell {
            None => None,
            Some(s) => Some(*index.get(s).ok_or_else(|| DataError::Parse {
                path: path.to_path_buf(),
                line: lines[keep[i]],
                message: format!(
                    "value `{s}` of `{}` is not one of its declared values {{{}}}",
                    column.name,
                    categories.join(",")
                ),
            })?),
        });
    }
    notes.push(format!("column `{}`: categorical, encoded {}", column.name, show_codes(&categories)));
    if n_missing > 0 {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for code in codes.iter().flatten() {
            *counts.entry(*code).or_default() += 1;
        }
        // Most frequent code; BTreeMap order makes the smallest code win ties.
        let mode =
            counts.iter().fold((0, 0), |best, (&code, &count)| if count > best.1 { (code, count) } else { best }).0;
        notes.push(format!(
            "column `{}`: {n_missing} missing values imputed with the most frequent value `{}`",
            column.name, categories[mode]
        ));
        return Ok(Some(codes.into_iter().map(|c| c.unwrap_or(mode) as f64).collect()));
    }
    Ok(Some(codes.into_iter().map(|c| c.unwrap_or(0) as f64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, kind: ColumnKind, values: &[Option<&str>]) -> RawColumn {
        RawColumn { name: name.to_string(), kind, values: values.iter().map(|v| v.map(str::to_string)).collect() }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 10.0]), 3.5);
        assert_eq!(median(&mut [7.0]), 7.0);
    }

    #[test]
    fn numeric_target_classes_sort_numerically_and_merge_spellings() {
        let columns = vec![
            col("a", ColumnKind::Infer, &[Some("1"), Some("2"), Some("3"), Some("4")]),
            col("t", ColumnKind::Infer, &[Some("10"), Some("2"), Some("2.0"), Some("10")]),
        ];
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4, 5], 1).unwrap();
        assert_eq!(d.class_names, vec!["2", "10"]);
        assert_eq!(d.y, vec![1, 0, 0, 1]);
    }

    #[test]
    fn categorical_missing_gets_the_mode_smallest_on_ties() {
        let columns = vec![
            col("c", ColumnKind::Infer, &[Some("z"), Some("y"), None, Some("z"), Some("y")]),
            col("t", ColumnKind::Infer, &[Some("a"), Some("b"), Some("a"), Some("b"), Some("a")]),
        ];
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4, 5, 6], 1).unwrap();
        // y=0, z=1; both occur twice, so the smaller code (y) fills the gap.
        let codes: Vec<f64> = d.x.iter().map(|r| r[0]).collect();
        assert_eq!(codes, vec![1.0, 0.0, 0.0, 1.0, 0.0]);
        assert!(d.notes.iter().any(|n| n.contains("most frequent value `y`")), "{:?}", d.notes);
    }

    #[test]
    fn rows_without_label_are_dropped_and_all_missing_columns_removed() {
        let columns = vec![
            col("empty", ColumnKind::Infer, &[None, None, None]),
            col("v", ColumnKind::Infer, &[Some("1"), Some("2"), Some("3")]),
            col("t", ColumnKind::Infer, &[Some("p"), None, Some("n")]),
        ];
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4], 2).unwrap();
        assert_eq!(d.feature_names, vec!["v"]);
        assert_eq!(d.x, vec![vec![1.0], vec![3.0]]);
        assert_eq!(d.class_names, vec!["n", "p"]);
        assert_eq!(d.y, vec![1, 0]);
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
    }

    #[test]
    fn a_single_class_is_rejected() {
        let columns = vec![
            col("v", ColumnKind::Infer, &[Some("1"), Some("2")]),
            col("t", ColumnKind::Infer, &[Some("p"), Some("p")]),
        ];
        let err = build("t".into(), Path::new("f.csv"), columns, &[2, 3], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.csv: error: the target column `t` has only one class (p); classification needs at least two"
        );
    }
}
