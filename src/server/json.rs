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
}
