//! OpenAI-compatible routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::access::RequestId;
use super::error::ApiError;
use super::generate::{self, PromptInput, SamplingInput, StopInput, StopStrings};
use super::json::{string_list, ApiJson};
use super::logprobs;
use super::output::OutputFields;
use super::sse::{self, ChunkShape, StreamEnd};
use super::tools::{self, Tools};
use super::trace::GenerationTrace;
use super::types::{refuse_unrecognized, Body};
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, ChunkChoice, Completion,
    CompletionChoice, CompletionLogprobs, Delta, FinishReason as ApiFinish, FunctionCall, ModelCard, ModelList,
    ToolCall, ToolCallDelta, UsageBody, COMPLETION_LOGPROBS, MAX_TOKENS, TOP_LOGPROBS,
};
pub use super::types::{ChatRequest, CommonFields, CompletionRequest, ContentIn, MessageIn};
use super::{AppState, Served};
use crate::engine::logprobs::Sampled;
use crate::engine::FinishReason;
use crate::model::{ChatMessage, Model};
use std::sync::Arc;

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
        if let Some((name, only)) = self.unsupported() {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} is not supported yet; omit it or send {only} (a value that changes nothing)"),
            ));
        }
        Ok(())
    }

    fn sampling(&self, output: &mut OutputFields) -> SamplingInput {
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
            stop: StopStrings::new(self.stop.clone().map(StopInput::into_vec).unwrap_or_default()),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logit_bias: std::mem::take(&mut output.logit_bias),
            logprobs: output.logprobs,
            max_tokens_name: name,
        }
    }

    fn stream_end(&self, ready: &super::Ready, n: usize, rid: &str) -> StreamEnd {
        StreamEnd {
            include_usage: self.include_usage(),
            choices_per_prompt: n,
            timeout: generate::timeout_error(ready.request_timeout),
            request_id: rid.to_string(),
            trace: GenerationTrace::current(ready),
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// Offers the tools in a system message (first in the conversation, after any system text already there).
fn offer_tools(messages: &mut Vec<ChatMessage>, tools: &Tools) {
    let offer = tools.system_prompt();
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{offer}", m.content),
        _ => messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: offer,
            },
        ),
    }
}

/// An assistant turn's `tool_calls`, written back in the call format.
fn history_calls(i: usize, calls: &Value) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "messages",
            format!("messages[{i}].tool_calls must be a list of {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"),
        )
    };
    let list = calls.as_array().ok_or_else(bad)?;
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        if c.get("type").is_some_and(|t| t != "function") || c.get("id").is_some_and(|id| !id.is_string()) {
            return Err(bad());
        }
        let f = c.get("function").ok_or_else(bad)?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(bad)?;
        let args = f.get("arguments").and_then(Value::as_str).ok_or_else(bad)?;
        out.push(tools::render_call(name, args));
    }
    Ok(out.join("\n"))
}

/// Turns request messages into template messages, rejecting unknown roles and non-text content. Assistant
/// calls and tool results are written in the call format (see `tools`).
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
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!(
                        "messages[{i}].role '{other}' is not supported; use system, developer, user, assistant or tool"
                    ),
                    ))
                }
            };
            let calls = match (&m.tool_calls, role) {
                (None | Some(Value::Null), _) => None,
                (Some(c), "assistant") => Some(history_calls(i, c)?),
                (Some(_), _) => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("messages[{i}] has tool_calls but only assistant messages may"),
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
                            ("text", None) => {
                                return Err(ApiError::invalid_param(
                                    "messages",
                                    format!("messages[{i}] has a text content part without a 'text' string"),
                                ))
                            }
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
            let (role, content) = match (role, calls) {
                ("tool", _) => ("user", tools::render_result(&content)),
                (_, Some(calls)) if content.is_empty() => (role, calls),
                (_, Some(calls)) => (role, format!("{content}\n{calls}")),
                (_, None) => (role, content),
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
    tokenizer: Arc<Model>,
    /// With tools: what each choice is writing, text or calls.
    tool_streams: Option<Vec<ToolStream>>,
}

/// A streamed choice of a request with tools: text streams as it comes, a call is held back and sent whole.
#[derive(Debug, Clone)]
enum ToolStream {
    /// Nothing seen yet (`auto`: a first `<` starts calls, anything else is text).
    Undecided,
    Text,
    Calls(String),
}

/// A whole answer's message: calls parsed out of the text when tools were offered.
fn answer(text: String, tools: bool) -> (AssistantMessage, bool) {
    if !tools {
        return (
            AssistantMessage {
                role: "assistant",
                content: Some(text),
                tool_calls: None,
            },
            false,
        );
    }
    let (content, calls) = tools::parse_calls(&text);
    let has_calls = !calls.is_empty();
    let message = AssistantMessage {
        role: "assistant",
        content,
        tool_calls: has_calls.then(|| calls.into_iter().map(tool_call).collect()),
    };
    (message, has_calls)
}

fn tool_call(c: tools::Call) -> ToolCall {
    ToolCall {
        id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
        kind: "function",
        function: FunctionCall {
            name: c.name,
            arguments: c.arguments,
        },
    }
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

    fn choice(
        index: usize,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<ApiFinish>,
    ) -> Vec<ChunkChoice> {
        vec![ChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        }]
    }
}

impl ChunkShape for ChatShape {
    type Chunk = ChatCompletionChunk;
    fn opening(&self, index: usize) -> Option<ChatCompletionChunk> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        };
        Some(self.chunk(Self::choice(index, delta, None, None), None))
    }
    fn text(&mut self, index: usize, text: String, tokens: Vec<Sampled>) -> Option<ChatCompletionChunk> {
        if let Some(stream) = self.tool_streams.as_mut().and_then(|s| s.get_mut(index)) {
            match stream {
                ToolStream::Undecided if text.is_empty() => return None,
                ToolStream::Undecided if text.starts_with('<') => {
                    *stream = ToolStream::Calls(text);
                    return None;
                }
                ToolStream::Undecided => *stream = ToolStream::Text,
                ToolStream::Calls(buf) => {
                    buf.push_str(&text);
                    return None;
                }
                ToolStream::Text => {}
            }
        }
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        let lp = (!tokens.is_empty()).then(|| logprobs::chat(&self.tokenizer.tokenizer, &tokens));
        Some(self.chunk(Self::choice(index, delta, lp, None), None))
    }
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<ChatCompletionChunk> {
        let held = match self.tool_streams.as_mut().and_then(|s| s.get_mut(index)) {
            Some(ToolStream::Calls(buf)) => std::mem::take(buf),
            _ => String::new(),
        };
        let mut chunks = Vec::new();
        let (content, calls) = tools::parse_calls(&held);
        if calls.is_empty() {
            if !held.is_empty() {
                let delta = Delta {
                    content: Some(held),
                    ..Delta::default()
                };
                chunks.push(self.chunk(Self::choice(index, delta, None, None), None));
            }
            chunks.push(self.chunk(Self::choice(index, Delta::default(), None, Some(reason.into())), None));
            return chunks;
        }
        let deltas = calls
            .into_iter()
            .enumerate()
            .map(|(index, c)| ToolCallDelta {
                index,
                call: tool_call(c),
            })
            .collect();
        let delta = Delta {
            content,
            tool_calls: Some(deltas),
            ..Delta::default()
        };
        chunks.push(self.chunk(Self::choice(index, delta, None, None), None));
        chunks.push(self.chunk(
            Self::choice(index, Delta::default(), None, Some(ApiFinish::ToolCalls)),
            None,
        ));
        chunks
    }
    fn usage(&self, usage: UsageBody) -> ChatCompletionChunk {
        self.chunk(Vec::new(), Some(usage))
    }
}

/// `POST /v1/chat/completions` (JSON or SSE).
pub async fn chat_completions(
    State(state): State<AppState>,
    rid: RequestId,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    refuse_unrecognized(&req.other, Body::Chat)?;
    chat(&state, &rid.0, req).await
}

/// Serves a parsed chat request (shared with the Azure AI inference route, which checks unknown fields its
/// own way: `req.other` is not looked at here).
pub async fn chat(state: &AppState, rid: &str, req: ChatRequest) -> Result<Response, ApiError> {
    let ready = state.language(req.common.model.as_deref())?;
    req.common.check_supported()?;
    TOP_LOGPROBS.check(req.top_logprobs.map(|k| k as f64))?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0).max(0) as usize),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        _ => None,
    };
    let mut output = req.common.output(ready, logprobs)?;
    let tools = Tools::parse(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls.as_ref(),
    )?;
    let mut messages = convert_messages(req.messages)?;
    if let Some(t) = &tools {
        if output.grammar.is_some() {
            return Err(ApiError::invalid_param(
                "tools",
                "tools cannot be combined with response_format json_object / json_schema or structured_outputs",
            ));
        }
        output.grammar = Some((t.grammar(), "tools"));
        offer_tools(&mut messages, t);
    }
    let sampling = req.common.sampling(&mut output);
    let control = output.control(ready).await?;
    let n = control.n;
    let receivers = generate::start(ready, rid, vec![PromptInput::Chat(messages)], &sampling, control).await?;
    let shape = ChatShape {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: ready.model.name.clone(),
        created: now(),
        tokenizer: ready.model.clone(),
        tool_streams: tools.as_ref().map(|t| {
            let first = match t.choice {
                tools::Choice::Auto => ToolStream::Undecided,
                _ => ToolStream::Calls(String::new()),
            };
            vec![first; n]
        }),
    };
    if req.common.stream.unwrap_or(false) {
        let end = req.common.stream_end(ready, n, rid);
        return Ok(sse::stream(receivers, shape, end));
    }
    let (outs, usage) = generate::collect_all(receivers, ready, n).await?;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(index, out)| {
            let (message, called) = answer(out.text, tools.is_some());
            ChatChoice {
                index,
                message,
                logprobs: logprobs.map(|_| logprobs::chat(&ready.model.tokenizer, &out.tokens)),
                finish_reason: if called {
                    ApiFinish::ToolCalls
                } else {
                    out.done.reason.into()
                },
            }
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
    tokenizer: Arc<Model>,
    /// Bytes of text sent so far per choice (each chunk's `text_offset` continues from there).
    offsets: Vec<usize>,
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

    fn choice(
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> CompletionChoice {
        CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: finish_reason.map(Into::into),
        }
    }
}

impl ChunkShape for CompletionShape {
    type Chunk = Completion;
    fn opening(&self, _index: usize) -> Option<Completion> {
        None
    }
    fn text(&mut self, index: usize, text: String, tokens: Vec<Sampled>) -> Option<Completion> {
        let lp = (!tokens.is_empty()).then(|| {
            let tok = &self.tokenizer.tokenizer;
            let at = self.offsets.get(index).copied().unwrap_or(0);
            if let Some(o) = self.offsets.get_mut(index) {
                *o += logprobs::byte_len(tok, &tokens);
            }
            logprobs::completion(tok, &tokens, at)
        });
        Some(self.body(vec![Self::choice(index, text, lp, None)], None))
    }
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Completion> {
        vec![self.body(vec![Self::choice(index, String::new(), None, Some(reason))], None)]
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
    rid: RequestId,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    refuse_unrecognized(&req.other, Body::Completion)?;
    let ready = state.language(req.common.model.as_deref())?;
    req.common.check_supported()?;
    COMPLETION_LOGPROBS.check(req.logprobs.map(|k| k as f64))?;
    let logprobs = req.logprobs.map(|k| k.max(0) as usize);
    let mut output = req.common.output(ready, logprobs)?;
    let texts = prompts(req.prompt)?;
    let n_prompts = texts.len();
    let inputs = texts.into_iter().map(PromptInput::Text).collect();
    let sampling = req.common.sampling(&mut output);
    let control = output.control(ready).await?;
    let n = control.n;
    let receivers = generate::start(ready, &rid.0, inputs, &sampling, control).await?;
    let shape = CompletionShape {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        model: ready.model.name.clone(),
        created: now(),
        tokenizer: ready.model.clone(),
        offsets: vec![0; n_prompts * n],
    };
    if req.common.stream.unwrap_or(false) {
        let end = req.common.stream_end(ready, n, &rid.0);
        return Ok(sse::stream(receivers, shape, end));
    }
    let (outs, usage) = generate::collect_all(receivers, ready, n).await?;
    let tok = &ready.model.tokenizer;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, out)| {
            let lp = logprobs.map(|_| logprobs::completion(tok, &out.tokens, 0));
            CompletionShape::choice(i, out.text, lp, Some(out.done.reason))
        })
        .collect();
    let body = Json(shape.body(choices, Some(usage.body())));
    Ok(usage.token_counts().attach(body.into_response()))
}

/// Every served model, as `GET /v1/models` and `GET /info` list them: the language models (the default first),
/// then the embedding models.
pub fn model_cards(served: &Served) -> Vec<ModelCard> {
    let language = served.language.iter().map(|r| ModelCard {
        id: r.model.name.clone(),
        object: "model",
        created: r.created,
        owned_by: "amlserve".to_string(),
        model_type: "chat-completions",
        max_model_len: r.model.config.context_length,
        generation_defaults: Some(r.generation),
    });
    let embedding = served.embedding.iter().map(|e| ModelCard {
        id: e.embedder.name.clone(),
        object: "model",
        created: e.created,
        owned_by: "amlserve".to_string(),
        model_type: "embeddings",
        max_model_len: e.max_tokens,
        generation_defaults: None,
    });
    language.chain(embedding).collect()
}

/// `GET /v1/models`: every served model.
pub async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList {
        object: "list",
        data: model_cards(state.served()?),
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
            tool_calls: None,
            tool_call_id: None,
        };
        assert!(convert_messages(vec![m("wizard")]).is_err());
        let tool = convert_messages(vec![m("tool")]).expect("ok");
        assert_eq!(
            (tool[0].role.as_str(), tool[0].content.as_str()),
            ("user", "<tool_response>\nx\n</tool_response>")
        );
        let call = MessageIn {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(
                json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
            ),
            tool_call_id: None,
        };
        let out = convert_messages(vec![call]).expect("ok");
        assert_eq!(
            out[0].content,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\":1}}</tool_call>"
        );
        assert!(convert_messages(vec![]).is_err());
        assert_eq!(convert_messages(vec![m("developer")]).expect("ok")[0].role, "system");
        let img = MessageIn {
            role: "user".into(),
            content: Some(ContentIn::Parts(vec![ContentPart {
                kind: "image_url".into(),
                text: None,
            }])),
            tool_calls: None,
            tool_call_id: None,
        };
        assert!(convert_messages(vec![img]).is_err());
    }
}
