//! The error type of the model core (loading, configuration, adapters, generation).

use std::path::Path;

/// Errors of the model core: loading, configuration, adapters, generation.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A required file is absent.
    #[error("{path}: not found; expected {expected}")]
    MissingFile {
        /// The path that was looked for.
        path: std::path::PathBuf,
        /// What should have been there.
        expected: String,
    },
    /// A file exists but its content is not something etpo can use.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A model configuration that this implementation does not support or that is inconsistent.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// No adapter set with this name exists.
    #[error("no adapter named {0:?}")]
    UnknownAdapter(String),
    /// An adapter set with this name exists already.
    #[error("an adapter named {0:?} exists already")]
    AdapterExists(String),
    /// Two adapter sets that must have the same shape do not.
    #[error("adapters {0:?} and {1:?} have different configurations")]
    AdapterMismatch(String, String),
    /// A device string that is not `cpu`, `cuda` or `cuda:N`, or a device that is not available.
    #[error("device: {0}")]
    Device(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Invalid arguments to a call (empty batch, inconsistent shapes, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result type of the model core.
pub type Result<T> = std::result::Result<T, ModelError>;

/// A file whose content etpo cannot use.
pub(crate) fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::BadFile { path: path.to_path_buf(), message: message.into() }
}
