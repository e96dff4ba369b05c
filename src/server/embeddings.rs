//! `POST /v1/embeddings` (OpenAI) and `POST /embeddings` (Azure AI Model Inference): sentence embeddings from
//! the configured embedding model, as float lists or base64 (little-endian f32, the openai SDK's default).
//!
//! The handler validates the body, then submits the texts to the embedding engine
//! ([`crate::engine::embedder`]): a full queue answers 429 at once; the reply is awaited until the request
//! timeout (504); a client that goes away drops the reply receiver, which cancels its inputs not yet computed.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde_json::Value;

use super::access::RequestId;
use super::error::ApiError;
use super::generate::timeout_error;
use super::json::{string_list, ApiJson};
use super::types::{
    EmbeddingData, EmbeddingVector, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, MAX_EMBEDDING_INPUTS,
};
use super::AppState;
use crate::engine::embedder::{EmbedError, EmbedRequest};

fn inputs(v: Value) -> Result<Vec<String>, ApiError> {
    let list = string_list(v).ok_or_else(|| {
        ApiError::invalid_param(
            "input",
            "input must be a non-empty string or a list of non-empty strings",
        )
    })?;
    if list.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid_param(
            "input",
            format!("at most {MAX_EMBEDDING_INPUTS} inputs per request; got {}", list.len()),
        ));
    }
    Ok(list)
}

/// Both embeddings routes.
pub async fn embeddings(
    State(state): State<AppState>,
    rid: RequestId,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let served = state.served()?;
    let model = &state.embedding(req.model.as_deref())?.embedder;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("encoding_format must be float or base64; got '{other}'"),
            ))
        }
    };
    if let Some(d) = req.dimensions.filter(|&d| d != model.dim) {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!("this model gives {} dimensions; got {d}", model.dim),
        ));
    }
    let texts = inputs(req.input)?;
    let deadline = Instant::now() + served.request_timeout;
    let reply = model.submit(EmbedRequest {
        id: rid.0,
        inputs: texts,
        deadline: Some(deadline),
    })?;
    // Dropping `reply` (the client went away, or the deadline below) cancels the inputs not computed yet.
    let done = match tokio::time::timeout_at(deadline.into(), reply).await {
        Err(_) | Ok(Ok(Err(EmbedError::Timeout))) => return Err(timeout_error(served.request_timeout)),
        Ok(Err(_)) => {
            return Err(ApiError::not_ready(
                "the embedding engine stopped before the request finished",
            ))
        }
        Ok(Ok(Err(e @ EmbedError::BadInput { .. }))) => return Err(ApiError::invalid_param("input", e.to_string())),
        Ok(Ok(Err(e @ EmbedError::Failed(_)))) => return Err(ApiError::internal(e)),
        Ok(Ok(Ok(done))) => done,
    };
    let name = model.name.clone();
    let tokens = done.tokens;
    let data = done
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            };
            EmbeddingData {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    Ok(Json(EmbeddingsResponse {
        id: format!("emb-{}", uuid::Uuid::new_v4().simple()),
        object: "list",
        data,
        model: name,
        usage: EmbeddingsUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}
