//! The one place where errors become FHIR OperationOutcomes with the right HTTP status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

impl ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Forbidden | ErrorKind::Security => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Gone => StatusCode::GONE,
            ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Internal | ErrorKind::Config => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// http://hl7.org/fhir/issue-type
    fn issue_code(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Security => "security",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Gone => "deleted",
            ErrorKind::Unprocessable => "processing",
            ErrorKind::Throttled { .. } => "throttled",
            ErrorKind::Unavailable | ErrorKind::BadGateway => "transient",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TooLarge => "too-costly",
            ErrorKind::Internal | ErrorKind::Config => "exception",
        }
    }
}

pub fn operation_outcome(
    severity: &str,
    code: &str,
    text: &str,
    expression: Option<&str>,
) -> Value {
    let mut issue = json!({ "severity": severity, "code": code, "diagnostics": text, "details": { "text": text } });
    if let Some(expr) = expression {
        issue["expression"] = json!([expr]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        self.kind.status()
    }

    fn error_response(&self) -> HttpResponse {
        let body = operation_outcome(
            "error",
            self.kind.issue_code(),
            &self.message,
            self.expression.as_deref(),
        );
        let mut response = HttpResponse::build(self.status_code());
        response.content_type(FHIR_JSON);
        if let ErrorKind::Throttled { retry_after_secs } = self.kind {
            response.insert_header(("Retry-After", retry_after_secs.max(1).to_string()));
        }
        response.body(body.to_string())
    }
}

/// A FHIR resource as the response body.
pub fn fhir(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(FHIR_JSON)
        .body(body.to_string())
}
