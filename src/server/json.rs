//! A JSON body extractor whose rejections are [`ApiError`]s in the route's dialect, so malformed JSON, wrong
//! field types and oversized bodies get a clear 400 / 413 in the same shape as every other error.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{ApiError, Dialect};

/// `Json<T>` with our error responses.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let dialect = Dialect::for_path(req.uri().path());
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let msg = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "request body is larger than the server accepts (--max-body-bytes)".to_string()
            } else {
                r.body_text()
            };
            ApiError::new(r.status(), msg).in_dialect(dialect)
        })?;
        parse(&bytes).map(ApiJson).map_err(|e| e.in_dialect(dialect))
    }
}

/// Parses a JSON body, telling malformed JSON apart from a well-formed body with wrong fields.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(format!("invalid request: {e}")),
        _ => ApiError::bad_request(format!("the request body is not valid JSON: {e}")),
    })
}

/// A JSON string or list of strings as a list, `None` unless it is a non-empty list of non-empty strings
/// (prompts, embedding inputs, scoring inputs all take this shape).
pub fn string_list(v: serde_json::Value) -> Option<Vec<String>> {
    use serde_json::Value;
    let list = match v {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    (!list.is_empty() && list.iter().all(|s| !s.is_empty())).then_some(list)
}
