//! Faults of the runtime itself.

use std::path::PathBuf;

/// A fault of the runtime itself (never the evaluated program's fault).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The Python interpreter could not be started or lacks numpy / scikit-learn.
    #[error("cannot start the Python worker `{python}`: {reason}")]
    Python { python: PathBuf, reason: String },
    /// The sandbox could not be built (namespaces, mounts, cgroups).
    #[error("cannot build the sandbox: {0}")]
    Sandbox(String),
    /// The job itself is inconsistent (row lengths, labels out of range...).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Workers kept dying or answering garbage, also after being replaced.
    #[error("the sandbox worker failed: {0}")]
    Worker(String),
    #[error("I/O error in the runtime: {0}")]
    Io(#[from] std::io::Error),
}
