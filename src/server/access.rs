//! Per-request bookkeeping: the azmlinfsrv request-id headers, HTTP metrics and one access log line.
//!
//! `x-request-id` is read (or a uuid4 generated) and echoed; `x-ms-client-request-id` is echoed;
//! `x-ms-request-id` carries the client request id if sent, else the request id. An id over 100 characters
//! is refused with 431, as azmlinfsrv does. The ids are logged on the access line so the endpoint's traffic
//! log can be joined with the console log.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::error::{ApiError, Dialect};
use super::AppState;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_MS_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
pub const X_MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
pub const X_MS_SERVER_VERSION: HeaderName = HeaderName::from_static("x-ms-server-version");

/// Longest request id accepted (azmlinfsrv's limit).
const MAX_ID_LEN: usize = 100;

/// Token counts a handler attaches to its response (as an extension) for the access log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenCounts {
    pub prompt: usize,
    pub completion: usize,
}

impl TokenCounts {
    /// Attaches the counts to `resp`.
    pub fn attach(self, mut resp: Response) -> Response {
        resp.extensions_mut().insert(self);
        resp
    }
}

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

/// Keeps `work` (shutdown's count of open requests) alive until a streamed response has been sent or dropped;
/// other responses are whole once the handler returns.
fn hold_until_sent(resp: Response, work: TaskTrackerToken) -> Response {
    let streamed = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streamed {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &work;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Middleware: request ids, server version header, HTTP metrics, access log.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
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

    let metrics = state.metrics();
    let work = state.track_request();
    metrics.http_in_flight.inc();
    let mut resp = next.run(req).await;
    metrics.http_in_flight.dec();
    resp = hold_until_sent(resp, work);
    let elapsed = started.elapsed().as_secs_f64();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(elapsed);
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()])
        .inc();
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
    let tokens = resp.extensions().get::<TokenCounts>().copied();
    tracing::info!(
        request_id = %request_id,
        prompt_tokens = tokens.map(|t| t.prompt),
        generated_tokens = tokens.map(|t| t.completion),
        client_request_id = client_id.as_deref().unwrap_or(""),
        %method,
        route = %route,
        status = resp.status().as_u16(),
        latency_ms = elapsed * 1000.0,
        "request"
    );
    resp
}
