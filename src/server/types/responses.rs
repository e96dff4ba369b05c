//! Response bodies of every route, as serialized.

use serde::Serialize;
use utoipa::ToSchema;

use super::ranges::*;

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    /// The answer is one or more tool calls.
    #[serde(rename = "tool_calls")]
    ToolCalls,
}

impl From<crate::engine::FinishReason> for FinishReason {
    fn from(r: crate::engine::FinishReason) -> Self {
        match r {
            crate::engine::FinishReason::Stop => Self::Stop,
            crate::engine::FinishReason::Length | crate::engine::FinishReason::Timeout => Self::Length,
        }
    }
}

/// Token counts in the OpenAI shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens reused from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    #[schema(value_type = String, pattern = "^assistant$")]
    pub role: &'static str,
    /// The text; null when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A function the model called.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object, as a JSON string (it validates against the function's parameters schema).
    pub arguments: String,
}

/// One tool call of an answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    #[schema(value_type = String, pattern = "^function$")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// A tool call in a stream chunk (whole: a call is sent once it is complete): the call and its index.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(flatten)]
    pub call: ToolCall,
}

/// One alternative token and its log-probability.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    /// The token's text (a partial character decodes as U+FFFD; `bytes` has the exact bytes).
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One output token, its log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat log-probabilities of a choice (or of a stream chunk's tokens).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// Completions' legacy log-probabilities.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token: alternative text -> log-probability.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// With `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

/// A whole chat answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    #[schema(value_type = String, pattern = "^chat\\.completion$")]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    #[schema(schema_with = always_null)]
    pub system_fingerprint: Option<()>,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageBody,
}

/// What a stream chunk adds to a choice: the role first, then pieces of content; empty at the end.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^assistant$")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    /// With `logprobs: true`: the tokens this chunk's content came from.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on a choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// One `data:` event of a chat stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[schema(value_type = String, pattern = "^chat\\.completion\\.chunk$")]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    #[schema(schema_with = always_null)]
    pub system_fingerprint: Option<()>,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk, with `stream_options.include_usage` (then `choices` is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// With `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    /// Always set in a whole answer; in a stream, only on a choice's last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// A whole text completion, and (without `usage` but the last) each `data:` event of its stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    #[schema(value_type = String, pattern = "^text_completion$")]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    #[schema(value_type = String, pattern = "^model$")]
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// An amlserve extra: `chat-completions` for a language model (chat, completions, /score), `embeddings`
    /// for an embedding model.
    #[schema(value_type = String, pattern = "^(chat-completions|embeddings)$")]
    pub model_type: &'static str,
    /// The context window, in tokens (an embedding model: the most tokens of an input it reads).
    pub max_model_len: usize,
    /// What generation requests get for the fields they leave out (language models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_defaults: Option<GenerationDefaults>,
}

/// What a generation request gets for a field it leaves out (the `--default-*` flags); a value in the request
/// always wins. `top_k` 0, `top_p` 1 and `min_p` 0 turn their filter off. On `/score`, `do_sample: false` (or
/// neither `do_sample` nor `temperature`) stays greedy whatever these say. `max_tokens_limit` is the one
/// ceiling: a request asking for more tokens is a 400 (`--max-tokens-limit`; null: the context window only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct GenerationDefaults {
    pub max_tokens: usize,
    pub max_tokens_limit: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub min_p: f64,
    pub repetition_penalty: f64,
}

impl GenerationDefaults {
    /// The flags' defaults: llama.cpp's sampler defaults (top_k 40, top_p 0.95, min_p 0.05) at OpenAI's default
    /// temperature, 1. With no filter at all a small model such as SmolLM2-135M samples from its long tail and
    /// answers garbage at temperature 1; these keep it coherent while still sampling.
    pub const DEFAULT: Self = Self {
        max_tokens: 512,
        max_tokens_limit: None,
        temperature: 1.0,
        top_p: 0.95,
        top_k: 40,
        min_p: 0.05,
        repetition_penalty: 1.0,
    };
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// `GET /info` (Azure AI Model Inference).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInfo {
    pub model_name: String,
    #[schema(value_type = String, pattern = "^chat-completions$")]
    pub model_type: &'static str,
    pub model_provider_name: String,
    /// An amlserve extra: what requests get for the sampling fields they leave out.
    pub generation_defaults: GenerationDefaults,
    /// An amlserve extra: where the model computes (`--device`).
    pub device: crate::model::device::DeviceInfo,
    /// An amlserve extra: every served model, as `GET /v1/models` lists them. The fields above describe the
    /// default language model; a request's `model` field picks another.
    pub models: Vec<ModelCard>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ready,
    Unavailable,
}

/// `GET /health`: `{"status": "ready", "model"}` or `{"status": "unavailable", "message"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `/score` chat answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreChatOutput {
    pub output: String,
}

/// `/score` text-generation answer item.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreTextOutput {
    #[serde(rename = "0")]
    #[schema(rename = "0")]
    pub text: String,
}

/// `/score` Hugging Face answer item.
#[derive(Debug, Serialize, ToSchema)]
pub struct GeneratedText {
    pub generated_text: String,
}

/// A `/score` answer, one of the three payload kinds'.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ScoreResponse {
    Chat(ScoreChatOutput),
    Text(Vec<ScoreTextOutput>),
    HuggingFace(Vec<GeneratedText>),
}

/// An embedding: floats, or base64 of little-endian f32.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    #[schema(value_type = String, pattern = "^embedding$")]
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// Embeddings answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub id: String,
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingsUsage,
}

/// The OpenAI error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiError {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// The HTTP status.
    pub code: u16,
}

/// The Azure ML (azmlinfsrv) error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct AzureMlError {
    pub message: String,
}
