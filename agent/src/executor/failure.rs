//! Why a command failed: a kind the coordinator acts on and the details
//! for the operator. Every step of a command says which kind its errors
//! are as it returns them ([`Classify::or_fail`]), so the kind is decided
//! where the cause is known, never guessed from the text later.

use baton_common::command::{FailureDetail, FailureKind};

/// A failed command: its kind and what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, for the operator.
    pub message: String,
    /// A failed activation's probe answer and the end of the service's log.
    pub detail: FailureDetail,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: FailureDetail::default(),
        }
    }

    /// The same failure with what the operator needs to see of it.
    pub fn with_detail(mut self, detail: FailureDetail) -> Self {
        self.detail = detail;
        self
    }

    /// The same failure with `note` (what was done about it) appended.
    pub fn noted(mut self, note: &str) -> Self {
        self.message.push_str(note);
        self
    }
}

impl From<crate::installed::Refusal> for Failure {
    fn from(r: crate::installed::Refusal) -> Self {
        Self::new(r.kind(), r.to_string())
    }
}

/// Classifying an error as it is returned.
pub trait Classify<T> {
    /// The error as a failure of `kind`.
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> Classify<T> for Result<T, E> {
    fn or_fail(self, kind: FailureKind) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(kind, e.to_string()))
    }
}
