//! Tabular classification data for etpo environments.
//!
//! A spec names where its data come from ([`DataSource`]): a built-in generator (the UCI Balance
//! Scale and Tic-Tac-Toe Endgame sets, generated exactly as their documentation defines them), a
//! CSV file with a named target column, or an OpenML-style ARFF file. [`load`] turns any of them
//! into a [`Dataset`]: numeric features, integer class labels, a [`ColumnReport`] per feature
//! saying how it was read (numeric or categorical codes, imputed missing values) and `notes` on
//! the rows. [`load_for`] keeps only the feature columns a spec selects (`dataset.drop` or
//! `dataset.features`, a [`ColumnSelection`]). [`Dataset::split`] makes the per-seed
//! train/validation split the paper's protocol evaluates on.
//!
//! Everything here is deterministic and platform independent: the same spec and seed give the
//! same rows, in the same order, on every machine and with every version of the dependencies.

mod arff;
mod builtin;
mod csv;
mod rng;
mod select;
mod split;
mod table;

use std::path::{Path, PathBuf};

pub use builtin::BUILTINS;
pub use rng::SplitMix64;
pub(crate) use select::check as check_selection;
pub use select::{ColumnSelection, DropReason, DroppedColumn};
pub use table::{ColumnEncoding, ColumnReport, FillValue};

/// Where a data set comes from, as written in a spec.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// A generated data set; the name is one of [`BUILTINS`] (`"balance_scale"`, `"tic_tac_toe"`).
    Builtin(String),
    /// A comma-separated file with a header row; `target` names the class column.
    Csv { path: PathBuf, target: String },
    /// An ARFF file (as OpenML serves them); `target` names the class attribute.
    Arff { path: PathBuf, target: String },
}

impl DataSource {
    /// The file this source reads, if any (relative paths are as written in the spec).
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataSource::Builtin(_) => None,
            DataSource::Csv { path, .. } | DataSource::Arff { path, .. } => Some(path),
        }
    }
}

/// The `dataset:` section of a spec: the source and the evaluation protocol over it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSpec {
    pub source: DataSource,
    /// Fraction of the kept rows used for training, in (0, 1); the paper uses 0.5.
    pub train_fraction: f64,
    /// One split per seed (the paper: 5 seeds, 0..5).
    pub seeds: Vec<u64>,
    /// Keep only this many rows after the shuffle (CAAFE's subsampling; `None` keeps all).
    pub max_samples: Option<usize>,
    /// Fraction of the kept rows held out as a test part (0: none, the paper's protocol). The
    /// action with the best validation reward is scored once on it at the end of a run; the
    /// model and the rewards never see it.
    #[serde(default)]
    pub test_fraction: f64,
    /// The feature columns kept (`dataset.drop` / `dataset.features`; default all). Applied by
    /// [`load_for`].
    #[serde(default)]
    pub columns: ColumnSelection,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            source: DataSource::Builtin("balance_scale".to_string()),
            train_fraction: 0.5,
            seeds: (0..5).collect(),
            max_samples: None,
            test_fraction: 0.0,
            columns: ColumnSelection::All,
        }
    }
}

/// A loaded classification data set: a dense numeric feature matrix and class indices.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Dataset {
    /// A short name (the builtin's name or the file stem).
    pub name: String,
    /// One name per feature column, in column order (the file's order, or `dataset.features`').
    pub feature_names: Vec<String>,
    /// Class labels as written in the source; `y` indexes into this list.
    pub class_names: Vec<String>,
    /// One row per sample, `feature_names.len()` values each, all finite.
    pub x: Vec<Vec<f64>>,
    /// Class index per row, `< class_names.len()`; every class occurs at least once.
    pub y: Vec<usize>,
    /// Human-readable remarks on the data set as a whole (rows dropped, how a builtin is
    /// generated); how each column was read is in `columns`.
    pub notes: Vec<String>,
    /// How each feature column was read, one per entry of `feature_names`, in the same order.
    pub columns: Vec<ColumnReport>,
    /// The source's non-target columns that are not features, each with why: those the spec
    /// leaves out (in file order), then those without any value.
    pub dropped: Vec<DroppedColumn>,
}

impl Dataset {
    /// Number of classes (`class_names.len()`).
    pub fn n_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Number of rows per class, indexed like `class_names`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &c in &self.y {
            counts[c] += 1;
        }
        counts
    }

    /// Split into train and validation rows for one seed.
    ///
    /// The paper follows CAAFE, which shuffles the rows and cuts them (scikit-learn's
    /// `train_test_split` without stratification), so the split is plain, not stratified:
    ///
    /// 1. the row indices are shuffled with [`SplitMix64`] seeded by `seed` (Fisher–Yates), so a
    ///    seed names the same split on every machine and with every dependency version;
    /// 2. the first `max_samples` shuffled rows are kept (CAAFE's subsampling), `n` of them;
    /// 3. the first `floor(n * train_fraction)` kept rows train and the rest validate (clamped
    ///    to leave at least one row on each side when `n >= 2`);
    /// 4. repair: a plain cut of a small sample can leave a rare class out of one side, which
    ///    makes it unlearnable (train) or the ROC AUC undefined (validation). For each class in
    ///    index order and each side (train, then validation) that lacks it, the first row of
    ///    that class found elsewhere (on the other side if that side holds two or more of it,
    ///    else among the rows not kept) is swapped with the last row of this side whose class
    ///    this side holds at least twice. A class with a single row stays on one side. A split
    ///    that needs no repair is exactly the plain shuffled cut.
    ///
    /// Both sides keep the shuffled order. Balance Scale with `max_samples = Some(125)` and
    /// `0.5` gives 62 training rows, the paper's `(62, 4)`.
    pub fn split(&self, seed: u64, max_samples: Option<usize>, train_fraction: f64) -> Split {
        split::split(self, seed, max_samples, train_fraction, 0.0)
    }

    /// [`Dataset::split`] with a test part: the last `floor(n * test_fraction)` kept rows are
    /// held out (`x_test`, `y_test`), the validation rows are those between, and the repair of
    /// step 4 covers the test part as a third side. With `test_fraction = 0` it is exactly
    /// [`Dataset::split`].
    pub fn split_with_test(
        &self,
        seed: u64,
        max_samples: Option<usize>,
        train_fraction: f64,
        test_fraction: f64,
    ) -> Split {
        split::split(self, seed, max_samples, train_fraction, test_fraction)
    }

    /// The split a spec's `dataset:` section names for `seed`.
    pub fn split_for(&self, spec: &DatasetSpec, seed: u64) -> Split {
        self.split_with_test(seed, spec.max_samples, spec.train_fraction, spec.test_fraction)
    }
}

/// One train/validation split of a [`Dataset`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Split {
    pub x_train: Vec<Vec<f64>>,
    pub y_train: Vec<usize>,
    pub x_val: Vec<Vec<f64>>,
    pub y_val: Vec<usize>,
    /// The held-out test part (empty unless the spec asks for one).
    pub x_test: Vec<Vec<f64>>,
    pub y_test: Vec<usize>,
    pub feature_names: Vec<String>,
    pub class_names: Vec<String>,
}

impl Split {
    /// Number of classes of the data set (also those absent from this split).
    pub fn n_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// Why a data set could not be loaded. Displays as `file:line: error: ...` where a line is known.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: error: cannot read the data file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: error: {message}", path.display())]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{}: error: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("unknown builtin data set `{name}`; expected one of: {}", BUILTINS.join(", "))]
    UnknownBuiltin { name: String },
    /// A column selection that does not fit a builtin's features.
    #[error("builtin data set `{name}`: error: {message}")]
    InvalidBuiltin { name: String, message: String },
}

/// Load a data set with every column of the source. Relative file paths resolve against
/// `base_dir` (the spec's folder). A spec's data are loaded with [`load_for`], which applies its
/// column selection.
///
/// How files become numbers (each column's encoding is recorded in [`Dataset::columns`], rows
/// dropped in [`Dataset::notes`]):
/// - a missing cell is empty, `?`, `NA`, `N/A`, `NaN` or `nan` in a CSV (quoted `"NA"` is text),
///   `?` or empty in an ARFF file;
/// - a column whose present cells are all finite numbers is numeric; its missing cells get the
///   column median (the mean of the two middle values for an even count);
/// - any other column is categorical, coded 0, 1, ... in sorted (byte) order of its values, or in
///   declaration order for an ARFF nominal attribute; its missing cells get the most frequent
///   code (the smallest on ties); a column without any value is dropped;
/// - the target's classes are sorted numerically when every label is a number, kept in
///   declaration order for an ARFF nominal target (classes that never occur are left out), and
///   sorted otherwise; rows without a label are dropped; at least two classes are required.
///
/// The builtins are described in [`BUILTINS`].
pub fn load(source: &DataSource, base_dir: &Path) -> Result<Dataset, DataError> {
    load_selected(source, &ColumnSelection::All, base_dir)
}

/// Load the data a spec's `dataset:` section names, with only the feature columns it selects
/// (`spec.columns`), in its order; the columns left out are never encoded. A selection that
/// names a column the source lacks, or the target, is an error.
pub fn load_for(spec: &DatasetSpec, base_dir: &Path) -> Result<Dataset, DataError> {
    load_selected(&spec.source, &spec.columns, base_dir)
}

fn load_selected(source: &DataSource, columns: &ColumnSelection, base_dir: &Path) -> Result<Dataset, DataError> {
    match source {
        DataSource::Builtin(name) => builtin::select(builtin::generate(name)?, columns),
        DataSource::Csv { path, target } => csv::load(&base_dir.join(path), target, columns),
        DataSource::Arff { path, target } => arff::load(&base_dir.join(path), target, columns),
    }
}

/// The names of every column of the source, the target's included (a builtin's feature names),
/// read from the file's header without loading the rows.
pub(crate) fn column_names(source: &DataSource, base_dir: &Path) -> Result<Vec<String>, DataError> {
    match source {
        DataSource::Builtin(name) => Ok(builtin::generate(name)?.feature_names),
        DataSource::Csv { path, .. } => csv::column_names(&base_dir.join(path)),
        DataSource::Arff { path, .. } => arff::column_names(&base_dir.join(path)),
    }
}

/// The short name of a data file: its stem.
fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's `envs/` folder (the shipped CSVs live in `envs/data/`).
    fn envs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("envs")
    }

    fn csv(file: &str, target: &str) -> DataSource {
        DataSource::Csv { path: PathBuf::from("data").join(file), target: target.to_string() }
    }

    #[test]
    fn breast_w_has_699_rows_and_its_missing_values_imputed() {
        let d = load(&csv("breast_w.csv", "class"), &envs_dir()).unwrap();
        assert_eq!(d.name, "breast_w");
        assert_eq!((d.x.len(), d.feature_names.len()), (699, 9));
        assert_eq!(d.class_names, vec!["benign", "malignant"]);
        assert_eq!(d.class_counts(), vec![458, 241]);
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        let filled: Vec<String> = d.columns.iter().filter(|c| c.missing_filled > 0).map(|c| c.to_string()).collect();
        assert_eq!(filled, vec!["`Bare_Nuclei`: numeric, 16 missing values filled with the column median 1"]);
        assert!(d.columns.iter().all(|c| c.kind == ColumnEncoding::Numeric));
        assert!(d.x.iter().flatten().all(|v| (1.0..=10.0).contains(v)));
    }

    #[test]
    fn diabetes_is_mass_pima_with_532_complete_rows() {
        let d = load(&csv("diabetes.csv", "type"), &envs_dir()).unwrap();
        assert_eq!(d.feature_names, vec!["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]);
        assert_eq!(d.class_names, vec!["No", "Yes"]);
        assert_eq!(d.class_counts(), vec![355, 177]);
        assert!(d.notes.is_empty() && d.dropped.is_empty(), "{:?}", d.notes);
        // First row of Pima.tr.
        assert_eq!(d.x[0], vec![5.0, 86.0, 68.0, 28.0, 30.2, 0.364, 24.0]);
    }

    #[test]
    fn the_papers_balance_scale_split_has_shape_62_by_4() {
        let d = load(&DataSource::Builtin("balance_scale".into()), Path::new(".")).unwrap();
        for seed in 0..5 {
            let s = d.split(seed, Some(125), 0.5);
            assert_eq!((s.x_train.len(), s.x_train[0].len()), (62, 4));
            assert_eq!(s.x_val.len(), 63);
            for class in 0..3 {
                assert!(s.y_train.contains(&class) && s.y_val.contains(&class));
            }
        }
    }

    #[test]
    fn the_paper_subsample_sizes_for_breast_w_and_tic_tac_toe() {
        let t = load(&DataSource::Builtin("tic_tac_toe".into()), Path::new(".")).unwrap();
        let s = t.split(0, Some(95), 0.5);
        assert_eq!((s.x_train.len(), s.x_val.len(), s.n_classes()), (47, 48, 2));
        let b = load(&csv("breast_w.csv", "class"), &envs_dir()).unwrap();
        let s = b.split(0, Some(69), 0.5);
        assert_eq!((s.x_train.len(), s.x_val.len()), (34, 35));
    }

    #[test]
    fn split_of_a_fixed_seed_never_changes() {
        // Pins the shuffle: a change here changes every recorded split.
        let d = load(&DataSource::Builtin("balance_scale".into()), Path::new(".")).unwrap();
        let s = d.split(0, Some(125), 0.5);
        let first: Vec<Vec<f64>> = s.x_train[..3].to_vec();
        let mut order: Vec<usize> = (0..625).collect();
        SplitMix64::new(0).shuffle(&mut order);
        assert_eq!(first, order[..3].iter().map(|&i| d.x[i].clone()).collect::<Vec<_>>());
        // Computed independently (a Python transcription of SplitMix64 + Fisher–Yates).
        assert_eq!(&order[..5], &[192, 443, 337, 363, 423]);
    }

    #[test]
    fn relative_paths_resolve_against_the_base_dir() {
        let err = load(&csv("nope.csv", "t"), Path::new("/spec/dir")).unwrap_err();
        assert!(err.to_string().starts_with("/spec/dir/data/nope.csv: error:"), "{err}");
    }
}
