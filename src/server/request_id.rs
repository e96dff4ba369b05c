//! The azmlinfsrv request-id headers, and one access log line per request.
//!
//! `x-request-id` is read (or a uuid4 generated) and echoed; `x-ms-client-request-id` is echoed;
//! `x-ms-request-id` carries the client request id if sent, else the request id. An id over 100 characters
//! is refused with 431, as azmlinfsrv does. The ids are logged on the access line so the endpoint's traffic
//! log can be joined with the console log.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Dialect};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
pub const X_MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
pub const X_MS_SERVER_VERSION: HeaderName = HeaderName::from_static("x-ms-server-version");

/// Longest request id accepted (azmlinfsrv's limit).
const MAX_ID_LEN: usize = 100;

/// The ids of the request being served; handlers read it from the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// Middleware: request ids, server version header, access log.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let dialect = Dialect::for_path(req.uri().path());
    let headers = req.headers();
    for name in [&X_REQUEST_ID, &X_MS_CLIENT_REQUEST_ID] {
        if headers.get(name).is_some_and(|v| v.len() > MAX_ID_LEN) {
            let err = ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("header {name} is longer than {MAX_ID_LEN} characters"),
            );
            return err.in_dialect(dialect).into_response();
        }
    }
    let request_id = header_str(headers, &X_REQUEST_ID).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let client_id = header_str(headers, &X_MS_CLIENT_REQUEST_ID);
    req.extensions_mut().insert(RequestId(request_id.clone()));

    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let value = |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    h.insert(X_REQUEST_ID, value(&request_id));
    if let Some(c) = &client_id {
        h.insert(X_MS_CLIENT_REQUEST_ID, value(c));
    }
    h.insert(X_MS_REQUEST_ID, value(client_id.as_deref().unwrap_or(&request_id)));
    h.insert(
        X_MS_SERVER_VERSION,
        HeaderValue::from_static(concat!("amlserve/", env!("CARGO_PKG_VERSION"))),
    );
    tracing::info!(
        request_id = %request_id,
        client_request_id = client_id.as_deref().unwrap_or(""),
        %method,
        route = %route,
        status = resp.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}
