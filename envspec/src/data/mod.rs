//! Tabular classification data for etpo environments.
//!
//! A spec names where its data come from ([`DataSource`]): a built-in generator (the UCI Balance
//! Scale and Tic-Tac-Toe Endgame sets, generated exactly as their documentation defines them), a
//! CSV file with a named target column, or an OpenML-style ARFF file. [`load`] turns any of them
//! into a [`Dataset`]: numeric features, integer class labels, and `notes` saying how the raw data
//! were transformed (categorical codes, imputed missing values). [`Dataset::split`] makes the
//! per-seed train/validation split the paper's protocol evaluates on.
//!
//! Everything here is deterministic and platform independent: the same spec and seed give the
//! same rows, in the same order, on every machine and with every version of the dependencies.

mod arff;
mod builtin;
mod csv;
mod rng;
mod split;
mod table;

use std::path::{Path, PathBuf};

pub use builtin::BUILTINS;
pub use rng::SplitMix64;

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
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            source: DataSource::Builtin("balance_scale".to_string()),
            train_fraction: 0.5,
            seeds: (0..5).collect(),
            max_samples: None,
        }
    }
}

/// A loaded classification data set: a dense numeric feature matrix and class indices.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Dataset {
    /// A short name (the builtin's name or the file stem).
    pub name: String,
    /// One name per feature column, in column order.
    pub feature_names: Vec<String>,
    /// Class labels as written in the source; `y` indexes into this list.
    pub class_names: Vec<String>,
    /// One row per sample, `feature_names.len()` values each, all finite.
    pub x: Vec<Vec<f64>>,
    /// Class index per row, `< class_names.len()`; every class occurs at least once.
    pub y: Vec<usize>,
    /// Human-readable remarks on how the raw data were encoded (categorical codes, imputation).
    pub notes: Vec<String>,
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

    /// Split into train and validation rows for one seed; see [`split`](mod@split) for the
    /// exact procedure (a plain shuffled split, as CAAFE and the paper use, with a minimal
    /// deterministic repair so that every kept class appears on both sides when it can).
    ///
    /// `max_samples` keeps only the first rows of the shuffle; `train_fraction` gives
    /// `floor(n * train_fraction)` training rows (at least one row on each side when `n >= 2`).
    /// Balance Scale with `max_samples = Some(125)` and `0.5` gives 62 training rows, the
    /// paper's `(62, 4)`.
    pub fn split(&self, seed: u64, max_samples: Option<usize>, train_fraction: f64) -> Split {
        split::split(self, seed, max_samples, train_fraction)
    }
}

/// One train/validation split of a [`Dataset`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Split {
    pub x_train: Vec<Vec<f64>>,
    pub y_train: Vec<usize>,
    pub x_val: Vec<Vec<f64>>,
    pub y_val: Vec<usize>,
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
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: error: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("unknown builtin data set `{name}`; expected one of: {}", BUILTINS.join(", "))]
    UnknownBuiltin { name: String },
}

/// Load a data set. Relative file paths resolve against `base_dir` (the spec's folder).
pub fn load(source: &DataSource, base_dir: &Path) -> Result<Dataset, DataError> {
    match source {
        DataSource::Builtin(name) => builtin::generate(name),
        DataSource::Csv { path, target } => csv::load(&base_dir.join(path), target),
        DataSource::Arff { path, target } => arff::load(&base_dir.join(path), target),
    }
}

/// The short name of a data file: its stem.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
