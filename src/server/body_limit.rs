//! Refuses a body over `--max-body-bytes` by its declared length, before anything reads it: a client that sends
//! `Expect: 100-continue` gets 413 at once instead of "100 Continue" and an upload that is then refused. Bodies
//! of no declared length (chunked) are counted while read (`DefaultBodyLimit`, answered by the JSON extractor).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Body as _;

use super::error::{ApiError, Dialect};

/// Middleware; the state is the limit in bytes.
pub async fn layer(State(max_body_bytes): State<usize>, req: Request, next: Next) -> Response {
    // The lower bound of the size hint is the Content-Length when there is one (hyper has validated it), else 0.
    let declared = req.body().size_hint().lower();
    if declared > u64::try_from(max_body_bytes).unwrap_or(u64::MAX) {
        return ApiError::body_too_large()
            .in_dialect(Dialect::for_path(req.uri().path()))
            .into_response();
    }
    next.run(req).await
}
