//! Optional API-key check (`--api-key`) for use outside Azure ML, whose gateway checks keys itself.
//!
//! Every route except liveness, readiness and metrics needs `Authorization: Bearer <key>` or `api-key: <key>`
//! (the Azure AI inference SDK sends both). Keys are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Dialect};
use super::AppState;

/// Routes open without a key: probes and scraping.
const OPEN_PATHS: &[&str] = &["/", "/health", "/metrics"];

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|k| k.trim().as_bytes());
    let api_key = headers.get("api-key").map(|v| v.as_bytes());
    bearer.into_iter().chain(api_key)
}

/// Middleware: refuses requests without the configured key.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.api_key() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) || presented_keys(req.headers()).any(|k| constant_time_eq(k, key.as_bytes())) {
        return next.run(req).await;
    }
    let dialect = Dialect::for_path(path);
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key: send 'Authorization: Bearer <key>' or 'api-key: <key>'",
    )
    .in_dialect(dialect)
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn reads_bearer_and_api_key_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        h.insert("api-key", "def".parse().unwrap());
        let keys: Vec<&[u8]> = presented_keys(&h).collect();
        assert_eq!(keys, vec![b"abc".as_slice(), b"def".as_slice()]);
    }
}
