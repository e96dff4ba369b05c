//! A JSON body extractor whose rejections are [`ApiError`]s in the route's dialect, so malformed JSON, wrong
//! field types and oversized bodies get a clear 400 / 413 in the same shape as every other error, a body that
//! does not arrive in time a 408, and a body not declared as JSON a 415.
//!
//! The content type is required so that a browser cannot post to a generation route cross-site without a
//! CORS preflight: a form or a `no-cors` fetch can only send `text/plain`, `multipart/form-data`,
//! `application/x-www-form-urlencoded` or no content type at all.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::{ApiError, Dialect};
use super::transport::body::timed_out;

/// Longest content type quoted back in a 415.
const MAX_QUOTED: usize = 100;

/// `Json<T>` with our error responses.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let dialect = Dialect::for_path(req.uri().path());
        require_json(req.headers()).map_err(|e| e.in_dialect(dialect))?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| unread(&r).in_dialect(dialect))?;
        parse(&bytes).map(ApiJson).map_err(|e| e.in_dialect(dialect))
    }
}

/// 415 unless the request says its body is JSON: `application/json` or `application/<anything>+json`, with
/// any parameters (`; charset=utf-8`).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let unsupported = |msg: String| Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return unsupported(
            "the request has no Content-Type; send the JSON body with Content-Type: application/json".into(),
        );
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .strip_prefix("application/")
            .and_then(|sub| sub.strip_suffix("+json"))
            .is_some_and(|s| !s.is_empty() && !s.contains('/'));
    if json {
        return Ok(());
    }
    let quoted: String = text.chars().take(MAX_QUOTED).collect();
    let more = if text.chars().count() > MAX_QUOTED { "..." } else { "" };
    unsupported(format!(
        "Content-Type '{quoted}{more}' is not JSON; send the JSON body with Content-Type: application/json"
    ))
}

/// The error for a body that could not be read whole.
fn unread(r: &BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::body_too_large();
    }
    if let Some(t) = timed_out(r) {
        return ApiError::new(StatusCode::REQUEST_TIMEOUT, t.to_string());
    }
    ApiError::new(r.status(), r.body_text())
}

/// Most JSON objects one body may hold. Parsed into a tree, a small object costs a few hundred bytes however
/// few bytes it was sent in; real bodies (messages, content parts, tool schemas) hold hundreds.
pub const MAX_JSON_OBJECTS: usize = 50_000;
/// Most JSON values (numbers, strings, containers...) one body may hold: enough for 128 prompts of 8k token ids.
pub const MAX_JSON_VALUES: usize = 1_200_000;

/// Counts the objects and values in a JSON text in one pass without parsing it (an upper bound for invalid
/// JSON, which the parser then refuses anyway).
fn count_values(bytes: &[u8]) -> (usize, usize) {
    let (mut objects, mut values) = (0usize, 1usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => objects += 1,
            b',' | b'[' => values += 1,
            _ => {}
        }
    }
    (objects, values)
}

/// Parses a JSON body, telling malformed JSON apart from a well-formed body with wrong fields. A body with
/// more than [`MAX_JSON_OBJECTS`] objects or [`MAX_JSON_VALUES`] values is refused before it is parsed, so
/// no body costs much more memory than its size.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    let (objects, values) = count_values(bytes);
    if objects > MAX_JSON_OBJECTS || values > MAX_JSON_VALUES {
        return Err(ApiError::bad_request(format!(
            "the request body holds too many JSON values ({objects} objects, about {values} values; at most \
             {MAX_JSON_OBJECTS} objects and {MAX_JSON_VALUES} values are accepted)"
        )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_inside_strings_are_not_counted() {
        assert_eq!(count_values(br#"{"a": [1, 2, {"b": "x,{[\"}"}]}"#), (2, 4));
        assert_eq!(
            count_values(b"\"\\\\\" , {"),
            (1, 2),
            "an escaped backslash ends before the quote"
        );
    }

    #[test]
    fn too_many_objects_are_refused_before_parsing() {
        let body = format!("[{}]", vec!["{}"; MAX_JSON_OBJECTS + 1].join(","));
        let err = parse::<serde_json::Value>(body.as_bytes()).expect_err("refused");
        assert!(err.message.contains("too many JSON values"), "{}", err.message);
        let ok = format!("[{}]", vec!["{}"; 100].join(","));
        assert!(parse::<serde_json::Value>(ok.as_bytes()).is_ok());
    }

    fn with_type(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    #[test]
    fn json_content_types_are_accepted() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;charset=UTF-8",
            "application/vnd.api+json",
            "application/merge-patch+json ; q=1",
        ] {
            assert!(require_json(&with_type(ct)).is_ok(), "{ct}");
        }
    }

    #[test]
    fn other_content_types_are_415_naming_what_was_sent() {
        for ct in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/+json",
            "text/json",
            "application/jsonp",
        ] {
            let e = require_json(&with_type(ct)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert!(e.message.contains(ct), "{}", e.message);
        }
        let e = require_json(&HeaderMap::new()).unwrap_err();
        assert!(e.message.contains("no Content-Type"), "{}", e.message);
        let long = format!("text/{}", "x".repeat(500));
        let e = require_json(&with_type(&long)).unwrap_err();
        assert!(e.message.len() < 250, "{}", e.message);
    }
}
