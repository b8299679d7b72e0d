//! Why a plan was refused: shared by the plan's reader and the checks it
//! reads ([`crate::analysis`]), which the plan's reader calls.

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);
