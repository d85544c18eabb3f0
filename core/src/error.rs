//! Errors of the method library. Every variant says which file or field and what was
//! expected, so that a user can act on the message alone.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A data file that is not what it claims to be (wrong magic, truncated, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A model file that cannot be used: unreadable, or of the wrong shape.
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A bad option value (config field or command-line flag).
    #[error("invalid {field}: {msg}")]
    Invalid { field: String, msg: String },
    /// The caller asked to stop (a lost lease, a cancelled job, shutdown).
    #[error("cancelled")]
    Cancelled,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
