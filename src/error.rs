//! One error type for the whole broker. The API layer turns it into a FHIR OperationOutcome;
//! the kind decides the HTTP status and the OperationOutcome issue code.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or fails validation (400, `invalid`).
    Invalid,
    /// The caller is known but not allowed to do this (403, `forbidden`).
    Forbidden,
    /// The caller could not be identified as an active member (403, `security`).
    Security,
    NotFound,
    /// Conflicts with the current state, e.g. a duplicate (409, `conflict`).
    Conflict,
    /// Well-formed, but breaks a rule of the exchange, e.g. an unknown patient (422, `processing`).
    Unprocessable,
    /// Existed once, no longer current (410, `deleted`).
    Gone,
    /// Over the caller's rate limit (429, `throttled`); carries the seconds to wait.
    Throttled {
        retry_after_secs: u64,
    },
    /// A dependency (database, audit writer) is unavailable right now (503, `transient`).
    Unavailable,
    /// An upstream member answered badly or not at all (502, `transient`).
    BadGateway,
    /// An upstream member or the broker itself ran out of time (504, `timeout`).
    Timeout,
    /// The request body is larger than allowed (413, `too-costly`).
    TooLarge,
    /// A bug or an unexpected condition on our side (500, `exception`). Never for client input.
    Internal,
    /// Configuration is wrong (only at start-up and in the CLI).
    Config,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// FHIRPath of the offending element, when there is one (OperationOutcome.issue.expression).
    pub expression: Option<String>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            expression: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }
    pub fn security(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Security, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.expression {
            Some(expr) => write!(f, "{} (at {expr})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match e {
            D::NotFound => Error::not_found("not found"),
            D::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                Error::conflict(format!("already exists: {}", info.message()))
            }
            D::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => {
                Error::unavailable("the database connection was lost; retry shortly")
            }
            // PostgreSQL: another transaction wrote the same rows at the same moment (SQLSTATE
            // 40001, or 40P01 "deadlock detected", which diesel reports as unknown). Nothing was
            // written; the same request again goes through.
            D::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => Error::unavailable(
                "a concurrent update of the same records got in the way; nothing was written, retry",
            ),
            D::DatabaseError(_, info) if info.message().contains("deadlock detected") => {
                tracing::warn!(error = %info.message(), "database deadlock");
                Error::unavailable(
                    "a concurrent update of the same records got in the way; nothing was written, retry",
                )
            }
            other => {
                let text = other.to_string();
                if text.contains("database is locked") || text.contains("busy") {
                    Error::unavailable("the database is busy; retry shortly")
                } else {
                    tracing::error!(error = %text, "database error");
                    Error::internal("database error")
                }
            }
        }
    }
}

impl From<diesel::r2d2::PoolError> for Error {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        tracing::warn!(error = %e, "no database connection available");
        Error::unavailable("the database is not reachable right now; retry shortly")
    }
}

impl From<openssl::error::ErrorStack> for Error {
    fn from(e: openssl::error::ErrorStack) -> Self {
        Error::internal(format!("cryptography error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error as D};

    #[test]
    fn a_deadlock_is_a_retry_not_a_server_error() {
        for kind in [
            DatabaseErrorKind::Unknown,
            DatabaseErrorKind::SerializationFailure,
        ] {
            let e = Error::from(D::DatabaseError(
                kind,
                Box::new("deadlock detected".to_string()),
            ));
            assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
        }
        let other = Error::from(D::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("relation does not exist".to_string()),
        ));
        assert_eq!(other.kind, ErrorKind::Internal);
    }
}
