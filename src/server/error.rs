//! The one place where errors become HTTP responses.
//!
//! Every error carries a status and a message written for the client. Routes under `/v1` (and the Azure AI
//! inference routes) answer in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`; the Azure ML
//! routes answer `{"message": ...}` like azmlinfsrv. Internals never reach the body; they go to the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::{AzureMlError, ErrorDetail, OpenAiError};
use crate::engine::SubmitError;

/// Which error body shape a route uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"message": "..."}`
    AzureMl,
}

impl Dialect {
    /// The shape for a request path.
    pub fn for_path(path: &str) -> Self {
        if path.starts_with("/v1")
            || path.starts_with("/chat")
            || path.starts_with("/embeddings")
            || matches!(path, "/info" | "/tokenize" | "/detokenize")
        {
            Self::OpenAi
        } else {
            Self::AzureMl
        }
    }
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub dialect: Dialect,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            dialect: Dialect::OpenAi,
            retry_after: None,
        }
    }

    /// 400 for a request that cannot be served as sent.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 413 for a body over `--max-body-bytes` (declared by its Content-Length, or counted while read).
    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the server accepts (--max-body-bytes)",
        )
    }

    /// 503 while the model is loading or the engine is down.
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// 500 for a failure of ours; the detail goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error; see the server log",
        )
    }

    /// Answers in `dialect`'s shape.
    pub fn in_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// The OpenAI-shaped body.
    pub fn openai_body(&self) -> OpenAiError {
        OpenAiError {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.type_name(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }

    /// The body of an error event inside an SSE stream (always OpenAI-shaped, whatever the route: the
    /// stream's 200 has already been sent, and `type` and `code` say what the status would have been).
    pub fn stream_body(&self) -> OpenAiError {
        self.openai_body()
    }

    fn type_name(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 413 | 415 | 422 | 431 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            408 | 504 => "timeout_error",
            _ => "server_error",
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            },
            SubmitError::TooLarge { .. } => Self::invalid_param("max_tokens", e.to_string()),
            SubmitError::Stopped => Self::not_ready(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = match self.dialect {
            Dialect::OpenAi => (self.status, Json(self.openai_body())).into_response(),
            Dialect::AzureMl => (self.status, Json(AzureMlError { message: self.message })).into_response(),
        };
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
