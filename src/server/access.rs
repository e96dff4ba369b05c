//! Per-request bookkeeping: the azmlinfsrv request-id headers, HTTP metrics and one access log line.
//!
//! `x-request-id` is read (or a uuid4 generated) and echoed; `x-ms-client-request-id` is echoed;
//! `x-ms-request-id` carries the client request id if sent, else the request id. An id over 100 characters
//! is refused with 431, as azmlinfsrv does. The ids are logged on the access line so the endpoint's traffic
//! log can be joined with the console log; since they come from clients, only ids of letters, digits and
//! `-_.:/+` are taken (GUIDs, trace ids): any other character (a space, `=`, a quote) could forge `key=value`
//! fields in the text log, so such an id counts as not sent (a fresh `x-request-id` is generated).
//!
//! Metric labels are bounded whatever clients send: the matched route template (`unmatched` for no route)
//! and [`method_label`].

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use super::error::{ApiError, Dialect};
use super::{trace, AppState};

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

/// The id of the request being served; handlers take it as an extractor (the middleware below sets it).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<RequestId>().cloned().ok_or_else(|| {
            ApiError::internal("the request has no id: the access middleware is not installed")
                .in_dialect(Dialect::for_path(parts.uri.path()))
        })
    }
}

/// The `method` label of a request: the standard methods by name, any other (a client may send any token) as
/// `other`, so traffic cannot grow the label set.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Whether a client-sent id can be logged and echoed as it is.
fn is_safe_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+".contains(b))
}

/// A client-sent id header: 431 when too long, `None` when absent or not [`is_safe_id`].
fn sent_id(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    if v.len() > MAX_ID_LEN {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("header {name} is longer than {MAX_ID_LEN} characters"),
        ));
    }
    Ok(is_safe_id(v.as_bytes()).then(|| String::from_utf8_lossy(v.as_bytes()).into_owned()))
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

tokio::task_local! {
    /// The model the request being handled was routed to (set by [`note_model`], read by [`layer`]).
    static SERVED_MODEL: Arc<OnceLock<String>>;
}

/// Records that the request being handled is served by model `name` (its HTTP metrics' and access log's
/// `model`). The first call counts; outside a request (unit tests) it does nothing. A task-local rather than a
/// response extension, so every route's error paths after the model is chosen are counted under it too.
pub fn note_model(name: &str) {
    let _ = SERVED_MODEL.try_with(|m| m.get_or_init(|| name.to_string()).len());
}

/// Middleware: request ids, server version header, HTTP metrics, access log, the request's trace span.
pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let dialect = Dialect::for_path(req.uri().path());
    let headers = req.headers();
    let (request_id, client_id) = match (
        sent_id(headers, &X_REQUEST_ID),
        sent_id(headers, &X_MS_CLIENT_REQUEST_ID),
    ) {
        (Ok(r), Ok(c)) => (r, c),
        (Err(e), _) | (_, Err(e)) => return e.in_dialect(dialect).into_response(),
    };
    let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = trace::request_span(headers, method, &route, &request_id, client_id.as_deref());
    req.extensions_mut().insert(RequestId(request_id.clone()));

    let metrics = state.metrics();
    let work = state.track_request();
    metrics.http_in_flight.inc();
    let served = Arc::new(OnceLock::new());
    let mut resp = SERVED_MODEL
        .scope(served.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    metrics.http_in_flight.dec();
    let model = served.get().map_or("", String::as_str);
    trace::record_status(&span, resp.status());
    resp = hold_until_sent(resp, work);
    let elapsed = started.elapsed().as_secs_f64();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method, model])
        .observe(elapsed);
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method, resp.status().as_str(), model])
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
        method = %method,
        route = %route,
        model = %model,
        status = resp.status().as_u16(),
        latency_ms = elapsed * 1000.0,
        "request"
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_forge_log_fields_are_not_taken() {
        for ok in ["abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace:1/2+x_y.z"] {
            assert!(is_safe_id(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "a b", "x status=200", "a\"b", "k=v", "tab\there", "ünï"] {
            assert!(!is_safe_id(bad.as_bytes()), "{bad}");
        }
        assert!(!is_safe_id("x".repeat(MAX_ID_LEN + 1).as_bytes()));
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"XYZZY").unwrap()), "other");
    }
}
