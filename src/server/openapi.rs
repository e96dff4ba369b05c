//! `GET /swagger.json`: the OpenAPI 3 description of every route, as azmlinfsrv serves its swagger.
//!
//! `?version=3` (or none) returns the document; any other version is a 404 with a message, like azmlinfsrv
//! when a swagger version is not available.

use axum::extract::Query;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Dialect};

#[derive(Debug, Deserialize)]
pub struct SwaggerQuery {
    version: Option<String>,
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn error_responses(error_schema: &str) -> Value {
    let e = |d: &str| ok_json(d, schema_ref(error_schema));
    json!({
        "400": e("Invalid request"), "401": e("Missing or wrong API key (only with --api-key)"),
        "413": e("Body too large"), "429": e("Waiting queue full; retry after Retry-After seconds"),
        "503": e("Model not ready or shutting down"), "504": e("Request timed out"),
    })
}

fn responses(ok: Value, error_schema: &str) -> Value {
    let mut r = error_responses(error_schema);
    r["200"] = ok;
    r
}

/// The OpenAPI document.
pub fn document() -> Value {
    let sse = json!({"description": "With stream=true: server-sent events, each `data:` a chunk object, then `data: [DONE]`",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}});
    let mut chat_ok = ok_json("Chat completion", schema_ref("ChatCompletion"));
    chat_ok["content"]["text/event-stream"] = sse["content"]["text/event-stream"].clone();
    let mut completion_ok = ok_json("Text completion", schema_ref("Completion"));
    completion_ok["content"]["text/event-stream"] = sse["content"]["text/event-stream"].clone();
    let api_version = json!({"name": "api-version", "in": "query", "required": false, "schema": {"type": "string"}});
    let extra = json!({"name": "extra-parameters", "in": "header", "required": false,
                       "schema": {"type": "string", "enum": ["error", "drop", "pass-through"]}});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "amlserve", "version": env!("CARGO_PKG_VERSION"),
                 "description": "LLM inference server: Azure ML scoring contract and OpenAI-compatible routes."},
        "paths": {
            "/": {"get": {"summary": "Liveness", "operationId": "liveness",
                "responses": {"200": {"description": "Healthy", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/health": {"get": {"summary": "Readiness", "operationId": "readiness",
                "responses": {"200": ok_json("Model loaded, engine running", schema_ref("Health")),
                              "503": ok_json("Not ready", schema_ref("Health"))}}},
            "/score": {
                "post": {"summary": "Azure ML scoring (chat, text generation or Hugging Face payload)", "operationId": "score",
                    "requestBody": json_body(schema_ref("ScoreRequest")),
                    "responses": responses(ok_json("Generated text", schema_ref("ScoreResponse")), "AzureMlError")},
                "get": {"summary": "Scoring with the query parameters as the JSON input", "operationId": "scoreGet",
                    "responses": responses(ok_json("Generated text", schema_ref("ScoreResponse")), "AzureMlError")},
                "options": {"summary": "CORS preflight", "operationId": "scoreOptions", "responses": {"200": {"description": "OK"}}}},
            "/swagger.json": {"get": {"summary": "This document", "operationId": "swagger",
                "parameters": [{"name": "version", "in": "query", "required": false, "schema": {"type": "string", "enum": ["3"]}}],
                "responses": {"200": ok_json("OpenAPI document", json!({"type": "object"})), "404": ok_json("Unsupported version", schema_ref("AzureMlError"))}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                "responses": {"200": {"description": "Text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/v1/chat/completions": {"post": {"summary": "OpenAI chat completions", "operationId": "createChatCompletion",
                "requestBody": json_body(schema_ref("ChatCompletionRequest")), "responses": responses(chat_ok.clone(), "OpenAiError")}},
            "/v1/completions": {"post": {"summary": "OpenAI text completions", "operationId": "createCompletion",
                "requestBody": json_body(schema_ref("CompletionRequest")), "responses": responses(completion_ok, "OpenAiError")}},
            "/v1/models": {"get": {"summary": "The served model", "operationId": "listModels",
                "responses": responses(ok_json("Model list", schema_ref("ModelList")), "OpenAiError")}},
            "/v1/embeddings": {"post": {"summary": "OpenAI embeddings", "operationId": "createEmbedding",
                "requestBody": json_body(schema_ref("EmbeddingsRequest")),
                "responses": responses(ok_json("Embeddings", schema_ref("Embeddings")), "OpenAiError")}},
            "/embeddings": {"post": {"summary": "Azure AI embeddings", "operationId": "getEmbeddings",
                "requestBody": json_body(schema_ref("EmbeddingsRequest")),
                "responses": responses(ok_json("Embeddings", schema_ref("Embeddings")), "OpenAiError")}},
            "/info": {"get": {"summary": "Azure AI model info", "operationId": "getModelInfo", "parameters": [api_version.clone()],
                "responses": responses(ok_json("Model info", schema_ref("ModelInfo")), "OpenAiError")}},
            "/chat/completions": {"post": {"summary": "Azure AI chat completions", "operationId": "getChatCompletions",
                "parameters": [api_version, extra],
                "requestBody": json_body(schema_ref("ChatCompletionRequest")), "responses": responses(chat_ok, "OpenAiError")}},
        },
        "components": {"schemas": schemas()},
    })
}

fn schemas() -> Value {
    let sampling = json!({
        "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0}, "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer"}, "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2}, "repetition_penalty": {"type": "number"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean"}, "model": {"type": "string"}, "n": {"type": "integer", "enum": [1]},
    });
    let with = |extra: Value, required: &[&str]| {
        let mut props = sampling.clone();
        for (k, v) in extra.as_object().into_iter().flatten() {
            props[k] = v.clone();
        }
        json!({"type": "object", "required": required, "properties": props})
    };
    let usage = json!({"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {"type": "object", "description": "cached_tokens: prompt tokens reused from the prefix cache",
                                  "properties": {"cached_tokens": {"type": "integer"}}}}});
    let finish = json!({"type": "string", "enum": ["stop", "length"]});
    json!({
        "Health": {"type": "object", "properties": {"status": {"type": "string"}, "model": {"type": "string"}, "message": {"type": "string"}}},
        "Message": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}}},
        "ChatCompletionRequest": with(json!({"messages": {"type": "array", "minItems": 1, "items": schema_ref("Message")}}), &["messages"]),
        "CompletionRequest": with(json!({"prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}), &["prompt"]),
        "ChatCompletion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"},
                "message": schema_ref("Message"), "finish_reason": finish.clone()}}},
            "usage": usage.clone()}},
        "Completion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"},
                "text": {"type": "string"}, "finish_reason": finish}}},
            "usage": usage}},
        "ModelList": {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}}}},
        "ModelInfo": {"type": "object", "properties": {"model_name": {"type": "string"}, "model_type": {"type": "string"},
            "model_provider_name": {"type": "string"}}},
        "ScoreParameters": {"type": "object", "properties": {
            "max_new_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
            "top_k": {"type": "integer"}, "do_sample": {"type": "boolean"}, "repetition_penalty": {"type": "number"},
            "seed": {"type": "integer"}, "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "ignore_eos": {"type": "boolean"}, "return_full_text": {"type": "boolean"}}},
        "ScoreRequest": {"oneOf": [
            {"type": "object", "required": ["input_data"], "properties": {"input_data": {"type": "object", "required": ["input_string"],
                "properties": {"input_string": {"oneOf": [
                    {"type": "array", "items": schema_ref("Message")}, {"type": "array", "items": {"type": "string"}}]},
                    "parameters": schema_ref("ScoreParameters")}}}},
            {"type": "object", "required": ["inputs"], "properties": {
                "inputs": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                "parameters": schema_ref("ScoreParameters")}}]},
        "ScoreResponse": {"oneOf": [
            {"type": "object", "properties": {"output": {"type": "string"}}},
            {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "string"}}}]},
        "EmbeddingsRequest": {"type": "object", "required": ["input"], "properties": {
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "model": {"type": "string"}, "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer"}}},
        "Embeddings": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"},
            "model": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object", "properties": {"object": {"type": "string"},
                "index": {"type": "integer"},
                "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
            "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}},
        "AzureMlError": {"type": "object", "properties": {"message": {"type": "string"}}},
        "OpenAiError": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": true},
            "code": {"type": "integer"}}}}},
    })
}

/// `GET /swagger.json[?version=3]`.
pub async fn swagger(Query(q): Query<SwaggerQuery>) -> Result<Json<Value>, ApiError> {
    match q.version.as_deref() {
        None | Some("3") => Ok(Json(document())),
        Some(v) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("swagger version {v} is not available; this server serves version 3 (OpenAPI 3.0)"),
        )
        .in_dialect(Dialect::AzureMl)),
    }
}
