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
//! Only the columns the spec selects ([`ColumnSelection`]) are encoded. How each feature column
//! was read is reported in [`Dataset::columns`], the columns left out in [`Dataset::dropped`],
//! and rows dropped in [`Dataset::notes`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use super::select::{self, ColumnSelection, DropReason, DroppedColumn};
use super::{DataError, Dataset};

/// How one feature column of a data set was read from its source.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ColumnReport {
    /// The column's name, as in [`Dataset::feature_names`].
    pub name: String,
    /// Numeric, or categorical with its codes.
    pub kind: ColumnEncoding,
    /// How many missing cells (among the rows kept) were filled with `fill_value`.
    pub missing_filled: usize,
    /// What the missing cells got; `Some` exactly when `missing_filled > 0`.
    pub fill_value: Option<FillValue>,
}

/// How a column's values became numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnEncoding {
    /// The values are the numbers written.
    Numeric,
    /// Each value is replaced by its code: its index in `categories`.
    Categorical { categories: Vec<String> },
}

/// What a column's missing cells were filled with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FillValue {
    /// The median of the column's present values (numeric columns).
    Median(f64),
    /// The most frequent category, the smallest code on ties (categorical columns).
    MostFrequent(String),
}

impl ColumnReport {
    /// A numeric column without missing values.
    pub(super) fn numeric(name: &str) -> ColumnReport {
        ColumnReport { name: name.to_string(), kind: ColumnEncoding::Numeric, missing_filled: 0, fill_value: None }
    }
}

impl fmt::Display for ColumnReport {
    /// For example `` `age`: numeric, 1 missing value filled with the column median 30 `` or
    /// `` `colour`: categorical, 2 codes (blue=0, red=1) ``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ColumnEncoding::Numeric => write!(f, "`{}`: numeric", self.name)?,
            ColumnEncoding::Categorical { categories } => {
                write!(f, "`{}`: categorical, {} codes ({})", self.name, categories.len(), show_codes(categories))?
            }
        }
        if let Some(fill) = &self.fill_value {
            let n = self.missing_filled;
            let s = if n == 1 { "" } else { "s" };
            match fill {
                FillValue::Median(v) => write!(f, ", {n} missing value{s} filled with the column median {v}")?,
                FillValue::MostFrequent(c) => {
                    write!(f, ", {n} missing value{s} filled with the most frequent value `{c}`")?
                }
            }
        }
        Ok(())
    }
}

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

/// Build the data set from the columns `selection` keeps. `lines[i]` is the source line of row
/// `i` (for error messages), and `target` indexes `columns`.
pub(super) fn build(
    name: String,
    path: &Path,
    columns: Vec<RawColumn>,
    lines: &[usize],
    target: usize,
    selection: &ColumnSelection,
) -> Result<Dataset, DataError> {
    let invalid = |message: String| DataError::Invalid { path: path.to_path_buf(), message };
    let mut notes = Vec::new();
    let target_col = &columns[target];
    let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let selected =
        select::resolve(selection, &names, Some(&target_col.name)).map_err(|p| invalid(select::describe(&p)))?;

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
    let mut reports = Vec::new();
    let mut dropped = selected.dropped;
    for &index in &selected.features {
        let column = &columns[index];
        match encode_feature(path, column, &keep, lines)? {
            Some((values, report)) => {
                feature_names.push(column.name.clone());
                feature_columns.push(values);
                reports.push(report);
            }
            None => dropped.push(DroppedColumn { name: column.name.clone(), reason: DropReason::NoValues }),
        }
    }
    if feature_columns.is_empty() {
        let kept = if *selection == ColumnSelection::All { "" } else { " among the selected columns" };
        return Err(invalid(format!("no feature columns with values{kept} besides the target `{}`", target_col.name)));
    }

    let x = (0..keep.len()).map(|r| feature_columns.iter().map(|col| col[r]).collect()).collect();
    Ok(Dataset { name, feature_names, class_names, x, y, notes, columns: reports, dropped })
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

/// The numeric values of one feature column over the kept rows, missing cells imputed, and how
/// they were read; `None` when the column has no value at all.
fn encode_feature(
    path: &Path,
    column: &RawColumn,
    keep: &[usize],
    lines: &[usize],
) -> Result<Option<(Vec<f64>, ColumnReport)>, DataError> {
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
        let report = ColumnReport {
            missing_filled: n_missing,
            fill_value: (n_missing > 0).then_some(FillValue::Median(fill)),
            ..ColumnReport::numeric(&column.name)
        };
        return Ok(Some((values.into_iter().map(|v| v.unwrap_or(fill)).collect(), report)));
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
    // Missing cells get the most frequent code; BTreeMap order makes the smallest code win ties.
    let (fill_code, fill_value) = if n_missing > 0 {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for code in codes.iter().flatten() {
            *counts.entry(*code).or_default() += 1;
        }
        let mode =
            counts.iter().fold((0, 0), |best, (&code, &count)| if count > best.1 { (code, count) } else { best }).0;
        (mode, Some(FillValue::MostFrequent(categories[mode].clone())))
    } else {
        (0, None)
    };
    let values = codes.into_iter().map(|c| c.unwrap_or(fill_code) as f64).collect();
    let report = ColumnReport {
        name: column.name.clone(),
        kind: ColumnEncoding::Categorical { categories },
        missing_filled: n_missing,
        fill_value,
    };
    Ok(Some((values, report)))
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
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4, 5], 1, &ColumnSelection::All).unwrap();
        assert_eq!(d.class_names, vec!["2", "10"]);
        assert_eq!(d.y, vec![1, 0, 0, 1]);
    }

    #[test]
    fn categorical_missing_gets_the_mode_smallest_on_ties() {
        let columns = vec![
            col("c", ColumnKind::Infer, &[Some("z"), Some("y"), None, Some("z"), Some("y")]),
            col("t", ColumnKind::Infer, &[Some("a"), Some("b"), Some("a"), Some("b"), Some("a")]),
        ];
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4, 5, 6], 1, &ColumnSelection::All).unwrap();
        // y=0, z=1; both occur twice, so the smaller code (y) fills the gap.
        let codes: Vec<f64> = d.x.iter().map(|r| r[0]).collect();
        assert_eq!(codes, vec![1.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(
            d.columns,
            vec![ColumnReport {
                name: "c".into(),
                kind: ColumnEncoding::Categorical { categories: vec!["y".into(), "z".into()] },
                missing_filled: 1,
                fill_value: Some(FillValue::MostFrequent("y".into())),
            }]
        );
        assert_eq!(
            d.columns[0].to_string(),
            "`c`: categorical, 2 codes (y=0, z=1), 1 missing value filled with the most frequent value `y`"
        );
    }

    #[test]
    fn rows_without_label_are_dropped_and_all_missing_columns_removed() {
        let columns = vec![
            col("empty", ColumnKind::Infer, &[None, None, None]),
            col("v", ColumnKind::Infer, &[Some("1"), Some("2"), Some("3")]),
            col("t", ColumnKind::Infer, &[Some("p"), None, Some("n")]),
        ];
        let d = build("t".into(), Path::new("f.csv"), columns, &[2, 3, 4], 2, &ColumnSelection::All).unwrap();
        assert_eq!(d.feature_names, vec!["v"]);
        assert_eq!(d.x, vec![vec![1.0], vec![3.0]]);
        assert_eq!(d.class_names, vec!["n", "p"]);
        assert_eq!(d.y, vec![1, 0]);
        assert_eq!(d.notes, vec!["1 rows without a value for the target `t` were dropped"]);
        assert_eq!(d.dropped, vec![DroppedColumn { name: "empty".into(), reason: DropReason::NoValues }]);
        assert_eq!(d.columns, vec![ColumnReport::numeric("v")]);
    }

    #[test]
    fn a_single_class_is_rejected() {
        let columns = vec![
            col("v", ColumnKind::Infer, &[Some("1"), Some("2")]),
            col("t", ColumnKind::Infer, &[Some("p"), Some("p")]),
        ];
        let err = build("t".into(), Path::new("f.csv"), columns, &[2, 3], 1, &ColumnSelection::All).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f.csv: error: the target column `t` has only one class (p); classification needs at least two"
        );
    }
}
