//! `GET /swagger.json`: the OpenAPI description of every route, as azmlinfsrv serves its swagger.
//!
//! The schemas are the request and response types of `types.rs` (their `ToSchema` derives, ranges included);
//! this module only lists the operations: which body each route takes, which it answers, with which error
//! shape and statuses. The document is OpenAPI 3.1 (what utoipa 5 writes: `null` is a type, exclusive bounds
//! are numbers), which both openapi-spec-validator and schemathesis read natively.
//!
//! `?version=3` (or none) returns the document; any other version is a 404 with a message, like azmlinfsrv
//! when a swagger version is not available.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{Content, OpenApi as Document, Paths, Ref, RefOr, Required, ResponseBuilder, Responses};
use utoipa::{OpenApi, ToSchema};

use super::error::{ApiError, Dialect};
use super::query::ApiQuery;
use super::types::{
    AzureChatRequest, AzureMlError, ChatCompletion, ChatCompletionChunk, ChatRequest, Completion, CompletionRequest,
    DetokenizeRequest, DetokenizeResponse, EmbeddingsRequest, EmbeddingsResponse, Health, MessageIn, ModelInfo,
    ModelList, OpenAiError, ScoreParameters, ScoreRequest, ScoreResponse, StreamOptions, TokenizeChatRequest,
    TokenizePromptRequest, TokenizeRequest, TokenizeResponse,
};
use super::AppState;

#[derive(Debug, Deserialize)]
pub struct SwaggerQuery {
    version: Option<String>,
}

/// The schemas (every type reachable from these is collected too).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "amlserve",
        description = "LLM inference server: Azure ML scoring contract and OpenAI-compatible routes."
    ),
    components(schemas(
        ChatRequest,
        MessageIn,
        StreamOptions,
        CompletionRequest,
        AzureChatRequest,
        ChatCompletion,
        ChatCompletionChunk,
        Completion,
        ModelList,
        ModelInfo,
        Health,
        ScoreRequest,
        ScoreParameters,
        ScoreResponse,
        EmbeddingsRequest,
        EmbeddingsResponse,
        OpenAiError,
        AzureMlError,
        TokenizeRequest,
        TokenizePromptRequest,
        TokenizeChatRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
    ))
)]
struct Schemas;

/// Statuses every body-taking route can answer besides 200, with what causes them.
const REQUEST_ERRORS: &[(u16, &str)] = &[
    (
        400,
        "The request is malformed or a field is out of range (the message says which)",
    ),
    (401, "An API key is required (--api-key) and was not sent"),
    (413, "The body is larger than --max-body-bytes"),
    (429, "The queue is full; retry after Retry-After seconds"),
    (500, "An internal failure (details in the server log)"),
    (503, "The model is loading, failed, or the server is shutting down"),
    (504, "The request ran past --request-timeout-ms"),
];

/// Statuses of `/tokenize` and `/detokenize` besides 200 (no queue, no generation).
const TOKENIZER_ERRORS: &[(u16, &str)] = &[
    (
        400,
        "The request is malformed, or a token id is outside the vocabulary (the message says which)",
    ),
    (401, "An API key is required (--api-key) and was not sent"),
    (413, "The body is larger than --max-body-bytes"),
    (500, "An internal failure (details in the server log)"),
    (503, "The model is loading, failed, or the server is shutting down"),
];

/// Statuses of the read-only model routes besides 200.
const READ_ERRORS: &[(u16, &str)] = &[
    (401, "An API key is required (--api-key) and was not sent"),
    (503, "The model is loading, failed, or the server is shutting down"),
];

fn schema_ref<T: ToSchema>() -> RefOr<Schema> {
    Ref::from_schema_name(T::name()).into()
}

fn json(schema: impl Into<RefOr<Schema>>) -> Content {
    Content::new(Some(schema))
}

fn plain_text() -> Content {
    json(ObjectBuilder::new().schema_type(Type::String))
}

/// A server-sent event whose `data` is one JSON chunk (or `[DONE]`); in OpenAPI 3.1 an event stream's
/// `schema` describes each event.
fn sse_event() -> Content {
    json(
        ObjectBuilder::new()
            .property("data", ObjectBuilder::new().schema_type(Type::String))
            .required("data"),
    )
}

fn responses(ok: ResponseBuilder, errors: &[(u16, &str)], error_body: RefOr<Schema>) -> Responses {
    let mut r = Responses::new();
    r.responses.insert("200".into(), ok.build().into());
    for (status, why) in errors {
        let resp = ResponseBuilder::new()
            .description(*why)
            .content("application/json", json(error_body.clone()));
        r.responses.insert(status.to_string(), resp.build().into());
    }
    r
}

fn ok_json(description: &str, body: RefOr<Schema>) -> ResponseBuilder {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", json(body))
}

/// Statuses every JSON-body operation may answer besides its own (see `json.rs` and the transport).
const BODY_ERRORS: &[(u16, &str)] = &[
    (408, "The body did not arrive within --body-read-timeout-secs"),
    (415, "The body is not declared as JSON (Content-Type: application/json)"),
];

/// An operation taking a JSON body, answering in `error_body`'s shape.
fn post(
    id: &str,
    summary: &str,
    body: RefOr<Schema>,
    ok: ResponseBuilder,
    errors: &[(u16, &str)],
    error_body: RefOr<Schema>,
) -> OperationBuilder {
    OperationBuilder::new()
        .operation_id(Some(id))
        .summary(Some(summary))
        .request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json(body))
                .build(),
        ))
        .responses(responses(ok, &[errors, BODY_ERRORS].concat(), error_body))
}

fn get(id: &str, summary: &str, responses: Responses) -> OperationBuilder {
    OperationBuilder::new()
        .operation_id(Some(id))
        .summary(Some(summary))
        .responses(responses)
}

fn query(name: &str, required: bool, schema: impl Into<RefOr<Schema>>) -> ParameterBuilder {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(if required { Required::True } else { Required::False })
        .schema(Some(schema))
}

fn paths() -> Paths {
    let openai_error = schema_ref::<OpenAiError>;
    let azureml_error = schema_ref::<AzureMlError>;
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let chat_ok = || {
        ok_json(
            "Chat completion (JSON), or with stream=true a chat.completion.chunk event stream",
            schema_ref::<ChatCompletion>(),
        )
        .content("text/event-stream", sse_event())
    };
    let completion_ok = ok_json(
        "Text completion (JSON), or with stream=true a text_completion event stream",
        schema_ref::<Completion>(),
    )
    .content("text/event-stream", sse_event());
    let score_ok = || ok_json("Generated text", schema_ref::<ScoreResponse>());
    let embeddings_ok = || ok_json("Embeddings", schema_ref::<EmbeddingsResponse>());
    let mut embedding_errors = REQUEST_ERRORS.to_vec();
    embedding_errors.push((404, "The server has no embedding model (--embedding-model)"));
    let azure_errors = REQUEST_ERRORS.to_vec();
    let api_version = || query("api-version", false, string());
    let extra_parameters = ParameterBuilder::new()
        .name("extra-parameters")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "error (default): fields outside the schema are refused; drop: ignored; pass-through: given to the model",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["error", "drop", "pass-through"])),
        ));

    let mut health = Responses::new();
    health.responses.insert(
        "200".into(),
        ok_json("Model loaded, engine running", schema_ref::<Health>())
            .build()
            .into(),
    );
    health.responses.insert(
        "503".into(),
        ok_json("Not ready (the message says why)", schema_ref::<Health>())
            .build()
            .into(),
    );
    let mut liveness = Responses::new();
    liveness.responses.insert(
        "200".into(),
        ResponseBuilder::new()
            .description("Healthy")
            .content("text/plain", plain_text())
            .build()
            .into(),
    );
    liveness.responses.insert(
        "503".into(),
        ok_json(
            "Only a restart helps: the model failed to load, or the engine stopped or stalled (the message says which)",
            azureml_error(),
        )
        .build()
        .into(),
    );
    let mut metrics = Responses::new();
    metrics.responses.insert(
        "200".into(),
        ResponseBuilder::new()
            .description("Prometheus text exposition format")
            .content("text/plain", plain_text())
            .build()
            .into(),
    );
    let mut swagger = Responses::new();
    swagger.responses.insert(
        "200".into(),
        ok_json("This OpenAPI document", ObjectBuilder::new().into())
            .build()
            .into(),
    );
    for (status, why) in [
        (400, "The query string is malformed (e.g. version given twice)"),
        (404, "That swagger version is not served"),
        (401, "An API key is required (--api-key) and was not sent"),
    ] {
        swagger
            .responses
            .insert(status.to_string(), ok_json(why, azureml_error()).build().into());
    }
    let mut options = Responses::new();
    options
        .responses
        .insert("200".into(), ResponseBuilder::new().description("OK").build().into());

    let item = |method: HttpMethod, op: OperationBuilder| PathItem::new(method, op.build());
    let mut score = item(
        HttpMethod::Post,
        post(
            "score",
            "Azure ML scoring (chat, text generation or Hugging Face payload)",
            schema_ref::<ScoreRequest>(),
            score_ok(),
            REQUEST_ERRORS,
            azureml_error(),
        ),
    );
    score.merge_operations(item(
        HttpMethod::Get,
        get(
            "scoreGet",
            "Scoring with the query parameters as the JSON input ({\"inputs\": prompt})",
            responses(score_ok(), REQUEST_ERRORS, azureml_error()),
        )
        .parameter(query(
            "inputs",
            true,
            ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)),
        )),
    ));
    score.merge_operations(item(
        HttpMethod::Options,
        get("scoreOptions", "CORS preflight", options),
    ));

    Paths::builder()
        .path("/", item(HttpMethod::Get, get("liveness", "Liveness", liveness)))
        .path("/health", item(HttpMethod::Get, get("readiness", "Readiness", health)))
        .path("/score", score)
        .path(
            "/swagger.json",
            item(
                HttpMethod::Get,
                get("swagger", "This document", swagger).parameter(query(
                    "version",
                    false,
                    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["3"])),
                )),
            ),
        )
        .path(
            "/metrics",
            item(HttpMethod::Get, get("metrics", "Prometheus metrics", metrics)),
        )
        .path(
            "/v1/chat/completions",
            item(
                HttpMethod::Post,
                post(
                    "createChatCompletion",
                    "OpenAI chat completions",
                    schema_ref::<ChatRequest>(),
                    chat_ok(),
                    REQUEST_ERRORS,
                    openai_error(),
                ),
            ),
        )
        .path(
            "/v1/completions",
            item(
                HttpMethod::Post,
                post(
                    "createCompletion",
                    "OpenAI text completions",
                    schema_ref::<CompletionRequest>(),
                    completion_ok,
                    REQUEST_ERRORS,
                    openai_error(),
                ),
            ),
        )
        .path(
            "/v1/models",
            item(
                HttpMethod::Get,
                get(
                    "listModels",
                    "The served model",
                    responses(
                        ok_json("Model list", schema_ref::<ModelList>()),
                        READ_ERRORS,
                        openai_error(),
                    ),
                ),
            ),
        )
        .path(
            "/v1/embeddings",
            item(
                HttpMethod::Post,
                post(
                    "createEmbedding",
                    "OpenAI embeddings",
                    schema_ref::<EmbeddingsRequest>(),
                    embeddings_ok(),
                    &embedding_errors,
                    openai_error(),
                ),
            ),
        )
        .path(
            "/embeddings",
            item(
                HttpMethod::Post,
                post(
                    "getEmbeddings",
                    "Azure AI embeddings",
                    schema_ref::<EmbeddingsRequest>(),
                    embeddings_ok(),
                    &embedding_errors,
                    openai_error(),
                )
                .parameter(api_version()),
            ),
        )
        .path(
            "/info",
            item(
                HttpMethod::Get,
                get(
                    "getModelInfo",
                    "Azure AI model info",
                    responses(
                        ok_json("Model info", schema_ref::<ModelInfo>()),
                        READ_ERRORS,
                        openai_error(),
                    ),
                )
                .parameter(api_version()),
            ),
        )
        .path(
            "/tokenize",
            item(
                HttpMethod::Post,
                post(
                    "tokenize",
                    "Token ids of a prompt or of chat messages rendered with the chat template (vLLM's shape)",
                    schema_ref::<TokenizeRequest>(),
                    ok_json("Token ids", schema_ref::<TokenizeResponse>()),
                    TOKENIZER_ERRORS,
                    openai_error(),
                ),
            ),
        )
        .path(
            "/detokenize",
            item(
                HttpMethod::Post,
                post(
                    "detokenize",
                    "The text of token ids, special tokens included (vLLM's shape)",
                    schema_ref::<DetokenizeRequest>(),
                    ok_json("Text", schema_ref::<DetokenizeResponse>()),
                    TOKENIZER_ERRORS,
                    openai_error(),
                ),
            ),
        )
        .path(
            "/chat/completions",
            item(
                HttpMethod::Post,
                post(
                    "getChatCompletions",
                    "Azure AI chat completions",
                    schema_ref::<AzureChatRequest>(),
                    chat_ok(),
                    &azure_errors,
                    openai_error(),
                )
                .parameter(api_version())
                .parameter(extra_parameters),
            ),
        )
        .build()
}

/// The whole document.
pub fn document() -> Document {
    let mut doc = Schemas::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.paths = paths();
    doc
}

/// The document as derived from the types (built once).
fn derived() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(document()).unwrap_or_default())
}

/// Adds `not: {enum: refused}` to every `model` property under `schema` (the names of the other kind, a 400).
fn refuse_models(schema: &mut serde_json::Value, refused: &[String]) {
    match schema {
        serde_json::Value::Object(map) => {
            if let Some(model) = map.get_mut("properties").and_then(|p| p.get_mut("model")) {
                if model.is_object() {
                    model["not"] = serde_json::json!({ "enum": refused });
                }
            }
            map.values_mut().for_each(|v| refuse_models(v, refused));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| refuse_models(v, refused)),
        _ => {}
    }
}

/// The served model names, by kind.
#[derive(Debug, Default)]
pub struct ServedNames {
    pub language: Vec<String>,
    pub embedding: Vec<String>,
}

/// The document with what only the loaded models tell: the one `dimensions` the embedding models give, the
/// last token id `/detokenize` takes, and the model names each request's `model` may not be (the other kind's).
#[cfg(test)]
pub fn served(embedding_dim: Option<usize>, vocab_size: Option<usize>) -> serde_json::Value {
    served_with(embedding_dim, vocab_size, &ServedNames::default())
}

/// [`served`], with the served names.
pub fn served_with(embedding_dim: Option<usize>, vocab_size: Option<usize>, names: &ServedNames) -> serde_json::Value {
    let mut doc = derived().clone();
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            let refused = match name.as_str() {
                "EmbeddingsRequest" => &names.language,
                n if n.ends_with("Request") || n == "CommonFields" => &names.embedding,
                _ => continue,
            };
            if !refused.is_empty() {
                refuse_models(schema, refused);
            }
        }
    }
    if let Some(vocab) = vocab_size {
        let items = &mut doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"];
        if items.is_object() {
            items["maximum"] = serde_json::json!(vocab.saturating_sub(1));
        }
    }
    if let Some(dim) = embedding_dim {
        let d = &mut doc["components"]["schemas"]["EmbeddingsRequest"]["properties"]["dimensions"];
        if d.is_object() {
            d["enum"] = serde_json::json!([dim, null]);
        }
    }
    doc
}

/// `GET /swagger.json[?version=3]`.
pub async fn swagger(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<SwaggerQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match q.version.as_deref() {
        None | Some("3") => {
            // With several models: one `dimensions` only when every embedding model gives the same, and the
            // largest vocabulary's last id (a looser bound for the others, which their requests still check).
            let models = state.served().ok();
            let dims = models.map(|s| s.embedding.iter().map(|e| e.embedder.dim).collect::<Vec<_>>());
            let dim = dims.and_then(|d| d.first().copied().filter(|f| d.iter().all(|x| x == f)));
            let vocab = models.and_then(|s| s.language.iter().map(|r| r.model.tokenizer.vocab_size()).max());
            let names = models.map_or_else(ServedNames::default, |s| ServedNames {
                language: s.language.iter().map(|r| r.model.name.clone()).collect(),
                embedding: s.embedding.iter().map(|e| e.embedder.name.clone()).collect(),
            });
            Ok(Json(served_with(dim, vocab, &names)))
        }
        Some(v) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("swagger version {v} is not available; this server serves version 3 (OpenAPI 3.1)"),
        )
        .in_dialect(Dialect::AzureMl)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::types::{TEMPERATURE, TOP_P};

    /// The property schema of `field` in component `component` (following one level of `allOf`).
    fn property(doc: &serde_json::Value, component: &str, field: &str) -> serde_json::Value {
        let c = &doc["components"]["schemas"][component];
        if let Some(p) = c["properties"].get(field) {
            return p.clone();
        }
        for part in c["allOf"].as_array().into_iter().flatten() {
            let part = match part["$ref"].as_str() {
                Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap_or_default()],
                None => part,
            };
            if let Some(p) = part["properties"].get(field) {
                return p.clone();
            }
        }
        panic!("{component}.{field} not documented");
    }

    #[test]
    fn documented_ranges_are_the_validated_ones() {
        let doc = serde_json::to_value(document()).expect("serializes");
        let t = property(&doc, "ChatRequest", "temperature");
        assert_eq!(t["minimum"], TEMPERATURE.min);
        assert_eq!(t["maximum"], TEMPERATURE.max.expect("max"));
        let p = property(&doc, "ScoreParameters", "top_p");
        assert_eq!(p["exclusiveMinimum"], TOP_P.min);
        assert!(p.get("minimum").is_none(), "{p}");
        let r = property(&doc, "CompletionRequest", "repetition_penalty");
        assert_eq!(r["exclusiveMinimum"], 0.0);
        assert_eq!(r["maximum"], 10.0);
        assert_eq!(doc["openapi"], "3.1.0");
    }

    #[test]
    fn the_served_document_names_the_embedding_dimension() {
        let names = ServedNames {
            language: vec!["chat".into()],
            embedding: vec!["emb".into()],
        };
        let named = served_with(None, None, &names);
        let emb_model = &named["components"]["schemas"]["EmbeddingsRequest"]["properties"]["model"];
        assert_eq!(emb_model["not"]["enum"], serde_json::json!(["chat"]), "{emb_model}");
        assert!(
            named.to_string().contains(r#"{"enum":["emb"]}"#),
            "generation requests refuse emb"
        );
        let doc = served(Some(384), Some(100));
        let t = &doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"];
        assert_eq!(
            (t["minimum"].clone(), t["maximum"].clone()),
            (serde_json::json!(0), serde_json::json!(99))
        );
        let d = &doc["components"]["schemas"]["EmbeddingsRequest"]["properties"]["dimensions"];
        assert_eq!(d["enum"], serde_json::json!([384, null]));
        assert!(
            served(None, None)["components"]["schemas"]["EmbeddingsRequest"]["properties"]["dimensions"]
                .get("enum")
                .is_none()
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc = serde_json::to_value(document()).expect("serializes");
        for route in [
            "/",
            "/health",
            "/score",
            "/swagger.json",
            "/metrics",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/v1/embeddings",
            "/embeddings",
            "/info",
            "/chat/completions",
            "/tokenize",
            "/detokenize",
        ] {
            assert!(doc["paths"].get(route).is_some(), "{route}");
        }
    }
}
