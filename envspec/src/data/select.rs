//! Which columns of a data source become features: the spec's `dataset.drop` or
//! `dataset.features` ([`ColumnSelection`]), checked against the source's column names.
//!
//! One set of rules serves both the spec loader (which places each problem at the offending list
//! entry) and the data loaders (which refuse a selection that does not fit the file, for a
//! [`DatasetSpec`](super::DatasetSpec) built in code):
//! - every entry names a column of the source (with a did-you-mean suggestion when it does not),
//!   at most once, and never the target;
//! - `drop` keeps the other columns in file order and must keep at least one;
//! - `features` keeps exactly the listed columns, in the listed order, and lists at least one.

use crate::diag::did_you_mean;

/// The feature columns a spec keeps (`dataset.drop` or `dataset.features`; at most one is given).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnSelection {
    /// Every column except the target, in file order (neither key given).
    #[default]
    All,
    /// Every column except the target and these, in file order (`dataset.drop`).
    Drop(Vec<String>),
    /// Exactly these columns, in this order (`dataset.features`).
    Features(Vec<String>),
}

impl ColumnSelection {
    /// The spec key that writes this selection (`None` for [`ColumnSelection::All`]).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ColumnSelection::All => None,
            ColumnSelection::Drop(_) => Some("dataset.drop"),
            ColumnSelection::Features(_) => Some("dataset.features"),
        }
    }
}

/// A feature column of the source that is not in the data set, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DroppedColumn {
    pub name: String,
    pub reason: DropReason,
}

/// Why a column of the source is not a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Listed in `dataset.drop`.
    Dropped,
    /// Not listed in `dataset.features`.
    NotSelected,
    /// The column has no value in any row with a label.
    NoValues,
}

impl DropReason {
    /// A few words for reports: `listed in dataset.drop`, ...
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::Dropped => "listed in dataset.drop",
            DropReason::NotSelected => "not listed in dataset.features",
            DropReason::NoValues => "it has no values",
        }
    }
}

/// One problem with a selection: the offending entry's index in the list (`None`: the list as a
/// whole), what is wrong, and a suggestion.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SelectionProblem {
    pub entry: Option<usize>,
    pub message: String,
    pub help: Option<String>,
}

/// The outcome of a valid selection: indices into the source's columns.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Selected {
    /// The feature columns, in feature order.
    pub features: Vec<usize>,
    /// The other non-target columns, in file order, with why each is left out.
    pub dropped: Vec<DroppedColumn>,
}

/// Apply `selection` to the source's `columns` (all of them, the target included when it is a
/// column; builtins have none). Either the selected columns or every problem found.
pub(super) fn resolve(
    selection: &ColumnSelection,
    columns: &[String],
    target: Option<&str>,
) -> Result<Selected, Vec<SelectionProblem>> {
    let is_feature = |name: &str| Some(name) != target;
    let (entries, key) = match selection {
        ColumnSelection::All => {
            let features = (0..columns.len()).filter(|&i| is_feature(&columns[i])).collect();
            return Ok(Selected { features, dropped: Vec::new() });
        }
        ColumnSelection::Drop(entries) => (entries, "dataset.drop"),
        ColumnSelection::Features(entries) => (entries, "dataset.features"),
    };
    let features_of_source: Vec<&str> = columns.iter().map(String::as_str).filter(|c| is_feature(c)).collect();
    let mut problems = Vec::new();
    let mut listed: Vec<usize> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let problem = |message: String, help: Option<String>| SelectionProblem { entry: Some(i), message, help };
        if Some(entry.as_str()) == target {
            let what = match selection {
                ColumnSelection::Drop(_) => "it cannot be dropped (it is what the model predicts)",
                _ => "it cannot be a feature (it is what the model predicts)",
            };
            problems.push(problem(format!("`{entry}` in `{key}` is the target column; {what}"), None));
        } else if entries[..i].contains(entry) {
            problems.push(problem(format!("column `{entry}` is listed twice in `{key}`"), None));
        } else {
            match columns.iter().position(|c| c == entry) {
                Some(index) => listed.push(index),
                None => problems.push(problem(
                    format!("unknown column `{entry}` in `{key}`; the columns are: {}", features_of_source.join(", ")),
                    did_you_mean(entry, features_of_source.iter().copied()),
                )),
            }
        }
    }
    let (features, dropped): (Vec<usize>, Vec<DroppedColumn>) = match selection {
        ColumnSelection::Drop(_) => {
            let (dropped, kept): (Vec<usize>, Vec<usize>) =
                (0..columns.len()).filter(|&i| is_feature(&columns[i])).partition(|i| listed.contains(i));
            let dropped =
                dropped.into_iter().map(|i| DroppedColumn { name: columns[i].clone(), reason: DropReason::Dropped });
            (kept, dropped.collect())
        }
        _ => {
            let dropped = (0..columns.len())
                .filter(|&i| is_feature(&columns[i]) && !listed.contains(&i))
                .map(|i| DroppedColumn { name: columns[i].clone(), reason: DropReason::NotSelected })
                .collect();
            (listed, dropped)
        }
    };
    if problems.is_empty() && features.is_empty() {
        let message = match selection {
            ColumnSelection::Drop(_) => {
                format!("`{key}` drops every feature column ({}); keep at least one", features_of_source.join(", "))
            }
            _ => format!("`{key}` must list at least one column; the columns are: {}", features_of_source.join(", ")),
        };
        problems.push(SelectionProblem { entry: None, message, help: None });
    }
    if problems.is_empty() {
        Ok(Selected { features, dropped })
    } else {
        Err(problems)
    }
}

/// The problems of `selection` against the source's `columns` (empty when it fits).
pub(crate) fn check(selection: &ColumnSelection, columns: &[String], target: Option<&str>) -> Vec<SelectionProblem> {
    resolve(selection, columns, target).err().unwrap_or_default()
}

/// The problems as one message, for a data loader's error.
pub(super) fn describe(problems: &[SelectionProblem]) -> String {
    problems
        .iter()
        .map(|p| match &p.help {
            Some(help) => format!("{} ({help})", p.message),
            None => p.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const COLUMNS: &[&str] = &["PassengerId", "Survived", "Pclass", "Name", "Age"];

    fn run(selection: ColumnSelection) -> Result<Selected, Vec<SelectionProblem>> {
        resolve(&selection, &names(COLUMNS), Some("Survived"))
    }

    #[test]
    fn all_keeps_every_column_but_the_target() {
        let s = run(ColumnSelection::All).unwrap();
        assert_eq!(s.features, vec![0, 2, 3, 4]);
        assert!(s.dropped.is_empty());
    }

    #[test]
    fn drop_keeps_file_order_and_features_keep_their_order() {
        let s = run(ColumnSelection::Drop(names(&["Name", "PassengerId"]))).unwrap();
        assert_eq!(s.features, vec![2, 4]);
        let dropped: Vec<&str> = s.dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dropped, vec!["PassengerId", "Name"]);
        assert!(s.dropped.iter().all(|d| d.reason == DropReason::Dropped));

        let s = run(ColumnSelection::Features(names(&["Age", "Pclass"]))).unwrap();
        assert_eq!(s.features, vec![4, 2]);
        assert_eq!(
            s.dropped,
            vec![
                DroppedColumn { name: "PassengerId".into(), reason: DropReason::NotSelected },
                DroppedColumn { name: "Name".into(), reason: DropReason::NotSelected },
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_its_entry() {
        let problems = run(ColumnSelection::Drop(names(&["Nmae", "Survived", "Age", "Age"]))).unwrap_err();
        assert_eq!(
            problems,
            vec![
                SelectionProblem {
                    entry: Some(0),
                    message: "unknown column `Nmae` in `dataset.drop`; the columns are: PassengerId, Pclass, Name, Age"
                        .into(),
                    help: Some("did you mean `Name`?".into()),
                },
                SelectionProblem {
                    entry: Some(1),
                    message: "`Survived` in `dataset.drop` is the target column; it cannot be dropped (it is what the model predicts)".into(),
                    help: None,
                },
                SelectionProblem {
                    entry: Some(3),
                    message: "column `Age` is listed twice in `dataset.drop`".into(),
                    help: None,
                },
            ]
        );
        let problems = run(ColumnSelection::Features(names(&["Survived"]))).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.ends_with("it cannot be a feature (it is what the model predicts)"));
    }

    #[test]
    fn dropping_everything_or_selecting_nothing_is_refused() {
        let problems = run(ColumnSelection::Drop(names(&["PassengerId", "Pclass", "Name", "Age"]))).unwrap_err();
        assert_eq!(
            problems,
            vec![SelectionProblem {
                entry: None,
                message:
                    "`dataset.drop` drops every feature column (PassengerId, Pclass, Name, Age); keep at least one"
                        .into(),
                help: None,
            }]
        );
        let problems = run(ColumnSelection::Features(Vec::new())).unwrap_err();
        assert_eq!(problems[0].entry, None);
        assert!(problems[0].message.starts_with("`dataset.features` must list at least one column"));
        // An empty `drop` keeps everything.
        assert_eq!(run(ColumnSelection::Drop(Vec::new())).unwrap(), run(ColumnSelection::All).unwrap());
    }
}
