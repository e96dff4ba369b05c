//! A query-string extractor whose rejections are [`ApiError`]s in the route's dialect (axum's `Query` answers
//! plain text), so `?version=3&version=3` or a value of the wrong type gets a JSON 400 like any other error.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::{ApiError, Dialect};

/// `Query<T>` with our error responses.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError::new(r.status(), r.body_text()).in_dialect(Dialect::for_path(parts.uri.path()))),
        }
    }
}
