//! Azure AI Model Inference API routes (the `azure-ai-inference` SDK): `GET /info` and
//! `POST /chat/completions`, with the `extra-parameters` header.
//!
//! `extra-parameters: error` (the default) refuses fields outside the API's chat schema with 400;
//! `drop` removes them; `pass-through` hands them to the model (amlserve honours `top_k`, `min_p`,
//! `repetition_penalty` and `ignore_eos`). `api-version` is accepted and not checked.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde_json::Value;

use super::access::RequestId;
use super::error::ApiError;
use super::json::ApiJson;
use super::types::{ModelInfo, AZURE_CHAT_FIELDS};
use super::{openai, AppState};

/// `GET /info`: the default language model, and every served model in `models`.
pub async fn info(State(state): State<AppState>) -> Result<Json<ModelInfo>, ApiError> {
    let served = state.served()?;
    let ready = &served.language[0];
    Ok(Json(ModelInfo {
        model_name: ready.model.name.clone(),
        model_type: "chat-completions",
        model_provider_name: "amlserve".to_string(),
        generation_defaults: ready.generation,
        device: ready.model.device_info(),
        models: openai::model_cards(served),
    }))
}

/// How to treat fields outside the schema.
#[derive(Debug, PartialEq, Eq)]
enum ExtraParameters {
    Error,
    Drop,
    PassThrough,
}

fn extra_parameters(headers: &HeaderMap) -> Result<ExtraParameters, ApiError> {
    match headers
        .get("extra-parameters")
        .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase())
    {
        None => Ok(ExtraParameters::Error),
        Some(v) => match v.as_str() {
            "error" => Ok(ExtraParameters::Error),
            "drop" => Ok(ExtraParameters::Drop),
            "pass-through" | "pass_through" => Ok(ExtraParameters::PassThrough),
            other => Err(ApiError::invalid_param(
                "extra-parameters",
                format!("header extra-parameters must be error, drop or pass-through; got '{other}'"),
            )),
        },
    }
}

/// `POST /chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    rid: RequestId,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let mode = extra_parameters(&headers)?;
    let Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let extras: Vec<String> = fields
        .keys()
        .filter(|k| !AZURE_CHAT_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    match mode {
        ExtraParameters::Error if !extras.is_empty() => {
            return Err(ApiError::invalid_param(
                &extras[0],
                format!(
                    "unknown parameter(s) {}; send header 'extra-parameters: pass-through' to pass them to the model, or 'drop' to ignore them",
                    extras.join(", ")
                ),
            ));
        }
        ExtraParameters::Drop => extras.iter().for_each(|k| {
            fields.remove(k);
        }),
        _ => {}
    }
    let req = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))?;
    openai::chat(&state, &rid.0, req).await
}
