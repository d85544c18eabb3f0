//! The coordinator's errors: what the job API answers ([`CoordinatorError`], mapped to
//! gRPC by one `From` and to HTTP by [`CoordinatorError::http_status`]), and why a
//! central step did not finish ([`StepError`]).
use defuse_core::artifacts::ArtifactError;

use crate::store::StoreError;

/// `Retryable`: the artifact or state store could not be reached; the driver tries
/// the step again with backoff and the job keeps its phase. `Fatal`: trying again
/// cannot help (bad data, a bad model, a bug); the job fails with the message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error("{0}")]
    Retryable(String),
    #[error("{0}")]
    Fatal(String),
    /// Fatal, and the job's own input is at fault (its config, data, models or
    /// labels): the job fails with [`crate::lifecycle::ErrorKind::Input`].
    #[error("{0}")]
    Input(String),
}

impl StepError {
    pub fn fatal(msg: impl std::fmt::Display) -> Self {
        StepError::Fatal(msg.to_string())
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            StepError::Retryable(m) => StepError::Retryable(format!("{what}: {m}")),
            StepError::Fatal(m) => StepError::Fatal(format!("{what}: {m}")),
            StepError::Input(m) => StepError::Input(format!("{what}: {m}")),
        }
    }

    /// The kind a job failed by this error records.
    pub fn kind(&self) -> crate::lifecycle::ErrorKind {
        match self {
            StepError::Input(_) => crate::lifecycle::ErrorKind::Input,
            _ => crate::lifecycle::ErrorKind::Runtime,
        }
    }
}

impl From<String> for StepError {
    fn from(m: String) -> Self {
        StepError::Fatal(m)
    }
}

/// The method library's errors: a bad model, data file or option is the job's input
/// at fault; I/O, libtorch and cancellation are not.
impl From<defuse_core::Error> for StepError {
    fn from(e: defuse_core::Error) -> Self {
        use defuse_core::Error as E;
        match e {
            E::Model { .. } | E::Format { .. } | E::Invalid { .. } => {
                StepError::Input(e.to_string())
            }
            E::Io { .. } | E::Torch(_) | E::Cancelled => StepError::Fatal(e.to_string()),
        }
    }
}

impl From<ArtifactError> for StepError {
    fn from(e: ArtifactError) -> Self {
        if e.retryable() {
            StepError::Retryable(e.to_string())
        } else {
            StepError::Fatal(e.to_string())
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        match e {
            // a fenced write: another coordinator leads now and will run the step
            StoreError::Backend(_) | StoreError::Fenced(_) => StepError::Retryable(e.to_string()),
            _ => StepError::Fatal(e.to_string()),
        }
    }
}

/// Why the job API (submit, label, delete, status, files) refused or failed a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    /// The request is wrong (a bad config, a bad label): fix it and send it again.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// Not now, in the job's state (labels for a job that does not wait for them, a
    /// second labelling, deleting a running job).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exists(String),
    /// A store cannot be reached: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt state.
    #[error("{0}")]
    Internal(String),
}

impl CoordinatorError {
    pub fn invalid(m: impl Into<String>) -> Self {
        CoordinatorError::Invalid(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        CoordinatorError::NotFound(m.into())
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        CoordinatorError::Conflict(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        CoordinatorError::Unavailable(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        CoordinatorError::Internal(m.into())
    }

    /// The gRPC code this error travels as.
    pub fn code(&self) -> tonic::Code {
        match self {
            CoordinatorError::Invalid(_) => tonic::Code::InvalidArgument,
            CoordinatorError::NotFound(_) => tonic::Code::NotFound,
            CoordinatorError::Conflict(_) => tonic::Code::FailedPrecondition,
            CoordinatorError::Exists(_) => tonic::Code::AlreadyExists,
            CoordinatorError::Unavailable(_) => tonic::Code::Unavailable,
            CoordinatorError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn http_status(&self) -> u16 {
        match self {
            CoordinatorError::Invalid(_) => 400,
            CoordinatorError::NotFound(_) => 404,
            CoordinatorError::Conflict(_) | CoordinatorError::Exists(_) => 409,
            CoordinatorError::Unavailable(_) => 503,
            CoordinatorError::Internal(_) => 500,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<StoreError> for CoordinatorError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Lost(_) => CoordinatorError::Conflict(e.to_string()),
            StoreError::Exists(_) => CoordinatorError::Exists(e.to_string()),
            StoreError::Backend(_) | StoreError::Fenced(_) => {
                CoordinatorError::Unavailable(e.to_string())
            }
        }
    }
}
