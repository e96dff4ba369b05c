//! OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::access::RequestId;
use super::error::ApiError;
use super::generate::{self, PromptInput, SamplingInput, StopInput};
use super::json::{string_list, ApiJson};
use super::sse::{self, ChunkShape};
use super::types::{refuse_unrecognized, Body};
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice,
    Delta, ModelCard, ModelList, UsageBody, MAX_TOKENS, N_SUPPORTED,
};
pub use super::types::{ChatRequest, CommonFields, CompletionRequest, ContentIn, MessageIn};
use super::AppState;
use crate::engine::FinishReason;
use crate::model::ChatMessage;

impl CommonFields {
    /// Rejects what amlserve does not implement, rather than silently ignoring it.
    fn check_supported(&self) -> Result<(), ApiError> {
        // Both limits are checked: only one is used, but a wrong value is refused whichever it is.
        for (name, v) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            MAX_TOKENS.check_as(name, v.map(|m| m as f64))?;
        }
        if self.n.is_some_and(|n| n != N_SUPPORTED) {
            return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
        {
            return Err(ApiError::invalid_param("logprobs", "logprobs are not supported"));
        }
        if let Some((name, only)) = self.unsupported() {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} is not supported yet; omit it or send {only} (a value that changes nothing)"),
            ));
        }
        Ok(())
    }

    fn sampling(&self) -> SamplingInput {
        let (max_tokens, name) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        SamplingInput {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            stop: self.stop.clone().map(StopInput::into_vec).unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            max_tokens_name: name,
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// Turns request messages into template messages, rejecting unknown roles and non-text content.
pub fn convert_messages(messages: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!(
                            "messages[{i}].role '{other}' is not supported; use system, developer, user or assistant"
                        ),
                    ))
                }
            };
            let content = match m.content {
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("messages[{i}].content is missing"),
                    ))
                }
                Some(ContentIn::Text(t)) => t,
                Some(ContentIn::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid_param(
                                    "messages",
                                    format!("messages[{i}] has a '{kind}' content part; only text parts are supported"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct ChatShape {
    id: String,
    model: String,
    created: u64,
}

impl ChatShape {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageBody>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage,
        }
    }

    fn choice(index: usize, delta: Delta, finish_reason: Option<FinishReason>) -> Vec<ChunkChoice> {
        vec![ChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason: finish_reason.map(Into::into),
        }]
    }
}

impl ChunkShape for ChatShape {
    type Chunk = ChatCompletionChunk;
    fn opening(&self, index: usize) -> Option<ChatCompletionChunk> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.chunk(Self::choice(index, delta, None), None))
    }
    fn text(&self, index: usize, text: String) -> ChatCompletionChunk {
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        self.chunk(Self::choice(index, delta, None), None)
    }
    fn finish(&self, index: usize, reason: FinishReason) -> ChatCompletionChunk {
        self.chunk(Self::choice(index, Delta::default(), Some(reason)), None)
    }
    fn usage(&self, usage: UsageBody) -> ChatCompletionChunk {
        self.chunk(Vec::new(), Some(usage))
    }
}

/// `POST /v1/chat/completions` (JSON or SSE).
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    refuse_unrecognized(&req.other, Body::Chat)?;
    chat(&state, &rid.0, req).await
}

/// Serves a parsed chat request (shared with the Azure AI inference route, which checks unknown fields its
/// own way: `req.other` is not looked at here).
pub async fn chat(state: &AppState, rid: &str, req: ChatRequest) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    req.common.check_supported()?;
    let messages = convert_messages(req.messages)?;
    let receivers = generate::start(ready, rid, vec![PromptInput::Chat(messages)], &req.common.sampling()).await?;
    let shape = ChatShape {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: ready.model.name.clone(),
        created: now(),
    };
    if req.common.stream.unwrap_or(false) {
        let timeout = generate::timeout_error(ready);
        return Ok(sse::stream(
            receivers,
            shape,
            req.common.include_usage(),
            timeout,
            rid.to_string(),
        ));
    }
    let (outs, usage) = generate::collect_all(receivers, ready).await?;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(index, out)| ChatChoice {
            index,
            message: AssistantMessage {
                role: "assistant",
                content: out.text,
            },
            logprobs: None,
            finish_reason: out.done.reason.into(),
        })
        .collect();
    Ok(usage.token_counts().attach(
        Json(ChatCompletion {
            id: shape.id,
            object: "chat.completion",
            created: shape.created,
            model: shape.model,
            system_fingerprint: None,
            choices,
            usage: usage.body(),
        })
        .into_response(),
    ))
}

struct CompletionShape {
    id: String,
    model: String,
    created: u64,
}

impl CompletionShape {
    fn body(&self, choices: Vec<CompletionChoice>, usage: Option<UsageBody>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn choice(index: usize, text: String, finish_reason: Option<FinishReason>) -> CompletionChoice {
        CompletionChoice {
            index,
            text,
            logprobs: None,
            finish_reason: finish_reason.map(Into::into),
        }
    }
}

impl ChunkShape for CompletionShape {
    type Chunk = Completion;
    fn opening(&self, _index: usize) -> Option<Completion> {
        None
    }
    fn text(&self, index: usize, text: String) -> Completion {
        self.body(vec![Self::choice(index, text, None)], None)
    }
    fn finish(&self, index: usize, reason: FinishReason) -> Completion {
        self.body(vec![Self::choice(index, String::new(), Some(reason))], None)
    }
    fn usage(&self, usage: UsageBody) -> Completion {
        self.body(Vec::new(), Some(usage))
    }
}

/// The prompts of a completion request: a string or a non-empty list of strings.
fn prompts(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    v.and_then(string_list).ok_or_else(|| {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a non-empty string or a non-empty list of strings",
        )
    })
}

/// `POST /v1/completions` (JSON or SSE); a list of prompts gives one choice each.
pub async fn completions(
    State(state): State<AppState>,
    Extension(rid): Extension<RequestId>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    refuse_unrecognized(&req.other, Body::Completion)?;
    let ready = state.ready()?;
    req.common.check_supported()?;
    let texts = prompts(req.prompt)?;
    let inputs = texts.into_iter().map(PromptInput::Text).collect();
    let receivers = generate::start(ready, &rid.0, inputs, &req.common.sampling()).await?;
    let shape = CompletionShape {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        model: ready.model.name.clone(),
        created: now(),
    };
    if req.common.stream.unwrap_or(false) {
        let timeout = generate::timeout_error(ready);
        return Ok(sse::stream(
            receivers,
            shape,
            req.common.include_usage(),
            timeout,
            rid.0.clone(),
        ));
    }
    let (outs, usage) = generate::collect_all(receivers, ready).await?;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, out)| CompletionShape::choice(i, out.text, Some(out.done.reason)))
        .collect();
    let body = Json(shape.body(choices, Some(usage.body())));
    Ok(usage.token_counts().attach(body.into_response()))
}

/// `GET /v1/models`: the one served model.
pub async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let ready = state.ready()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: ready.model.name.clone(),
            object: "model",
            created: ready.created,
            owned_by: "amlserve".to_string(),
            max_model_len: ready.model.llama.config.context_length,
            generation_defaults: ready.generation,
        }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::types::ContentPart;
    use serde_json::json;

    #[test]
    fn prompts_accept_string_or_list_only() {
        assert_eq!(prompts(Some(json!("a"))).expect("ok"), vec!["a"]);
        assert_eq!(prompts(Some(json!(["a", "b"]))).expect("ok").len(), 2);
        for bad in [json!(""), json!([]), json!([1]), json!(3), json!(null)] {
            assert!(prompts(Some(bad)).is_err());
        }
        assert!(prompts(None).is_err());
    }

    #[test]
    fn unknown_roles_and_images_are_rejected() {
        let m = |role: &str| MessageIn {
            role: role.into(),
            content: Some(ContentIn::Text("x".into())),
        };
        assert!(convert_messages(vec![m("wizard")]).is_err());
        assert!(convert_messages(vec![]).is_err());
        assert_eq!(convert_messages(vec![m("developer")]).expect("ok")[0].role, "system");
        let img = MessageIn {
            role: "user".into(),
            content: Some(ContentIn::Parts(vec![ContentPart {
                kind: "image_url".into(),
                text: None,
            }])),
        };
        assert!(convert_messages(vec![img]).is_err());
    }
}
