//! Request and response bodies of every route, as serde types. Their `ToSchema` derives are what
//! `/swagger.json` documents (see `openapi.rs`), so the document and the wire format cannot drift apart.
//!
//! Numeric ranges live once, in the [`Range`] constants below: the schemas of the fields that carry them are
//! built from the constants (`schema_with`), and `generate::SamplingInput::validate` checks requests against
//! the same constants. Request types deserialize leniently where the server answers with a more helpful
//! message than serde would (roles, content parts, prompts); their schemas still say exactly what is accepted.
//! This module holds no handler logic.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ArrayItems, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::error::ApiError;

// ---------------------------------------------------------------------------------------------------------
// Ranges: one source for the document and for validation.

/// The values a numeric request field accepts: `min` (inclusive, or exclusive with `min_exclusive`) up to
/// `max` (inclusive) when there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub field: &'static str,
    pub min: f64,
    pub min_exclusive: bool,
    pub max: Option<f64>,
    /// Whole numbers only.
    pub integer: bool,
}

impl Range {
    const fn closed(field: &'static str, min: f64, max: f64) -> Self {
        Self {
            field,
            min,
            min_exclusive: false,
            max: Some(max),
            integer: false,
        }
    }

    /// Whether `x` is in the range.
    pub fn contains(&self, x: f64) -> bool {
        let above = if self.min_exclusive {
            x > self.min
        } else {
            x >= self.min
        };
        above && self.max.is_none_or(|m| x <= m)
    }

    /// The rule in words, for error messages ("between 0 and 2").
    pub fn rule(&self) -> String {
        match (self.min_exclusive, self.max) {
            (false, Some(max)) => format!("between {} and {max}", self.min),
            (true, Some(max)) => format!("greater than {} and at most {max}", self.min),
            (false, None) => format!("at least {}", self.min),
            (true, None) => format!("greater than {}", self.min),
        }
    }

    /// 400 naming the field unless `v` is unset or in the range.
    pub fn check(&self, v: Option<f64>) -> Result<(), ApiError> {
        self.check_as(self.field, v)
    }

    /// [`Range::check`] for a field of another name with the same range (`max_new_tokens`).
    pub fn check_as(&self, field: &str, v: Option<f64>) -> Result<(), ApiError> {
        match v {
            Some(x) if !x.is_finite() || !self.contains(x) => Err(ApiError::invalid_param(
                field,
                format!("{field} must be {}; got {x}", self.rule()),
            )),
            _ => Ok(()),
        }
    }

    /// The schema of an optional field with this range (`null` means unset).
    pub fn schema(&self) -> Schema {
        let kind = if self.integer { Type::Integer } else { Type::Number };
        let mut b = ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([kind, Type::Null]))
            .maximum(self.max);
        b = if self.min_exclusive {
            b.exclusive_minimum(Some(self.min))
        } else {
            b.minimum(Some(self.min))
        };
        if self.integer {
            b = b.format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )));
        }
        b.build().into()
    }
}

pub const TEMPERATURE: Range = Range::closed("temperature", 0.0, 2.0);
pub const TOP_P: Range = Range {
    min_exclusive: true,
    ..Range::closed("top_p", 0.0, 1.0)
};
pub const MIN_P: Range = Range::closed("min_p", 0.0, 1.0);
pub const PRESENCE_PENALTY: Range = Range::closed("presence_penalty", -2.0, 2.0);
pub const FREQUENCY_PENALTY: Range = Range::closed("frequency_penalty", -2.0, 2.0);
pub const REPETITION_PENALTY: Range = Range {
    min_exclusive: true,
    ..Range::closed("repetition_penalty", 0.0, 10.0)
};
/// `top_k`: 0 turns it off.
pub const TOP_K: Range = Range {
    max: None,
    integer: true,
    ..Range::closed("top_k", 0.0, 0.0)
};
/// Generated-token limits (`max_tokens`, `max_completion_tokens`, `max_new_tokens`); the upper bound is the
/// room the prompt leaves in the context window, checked once the prompt is tokenized.
pub const MAX_TOKENS: Range = Range {
    max: None,
    integer: true,
    ..Range::closed("max_tokens", 1.0, 1.0)
};
/// Most stop strings accepted.
pub const MAX_STOPS: usize = 16;
/// The only `n` served.
pub const N_SUPPORTED: i64 = 1;
/// Most inputs in one embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 256;

fn temperature() -> Schema {
    TEMPERATURE.schema()
}
fn top_p() -> Schema {
    TOP_P.schema()
}
fn min_p() -> Schema {
    MIN_P.schema()
}
fn presence_penalty() -> Schema {
    PRESENCE_PENALTY.schema()
}
fn frequency_penalty() -> Schema {
    FREQUENCY_PENALTY.schema()
}
fn repetition_penalty() -> Schema {
    REPETITION_PENALTY.schema()
}
fn top_k() -> Schema {
    TOP_K.schema()
}
fn max_tokens() -> Schema {
    MAX_TOKENS.schema()
}

fn nullable(kind: Type) -> SchemaType {
    SchemaType::from_iter([kind, Type::Null])
}

/// A non-empty string.
fn text() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1))
}

/// An array of `items`, which may be a reference or an inline schema.
fn array_of(items: RefOr<Schema>) -> ArrayBuilder {
    ArrayBuilder::new().items(ArrayItems::RefOrSchema(Box::new(items)))
}

/// A non-empty string or a non-empty list of non-empty strings, with at most `max_items` items.
fn text_or_list(max_items: Option<usize>) -> Schema {
    OneOfBuilder::new()
        .item(text())
        .item(
            ArrayBuilder::new()
                .items(text())
                .min_items(Some(1))
                .max_items(max_items),
        )
        .build()
        .into()
}

fn text_list() -> Schema {
    text_or_list(None)
}

fn embedding_inputs() -> Schema {
    text_or_list(Some(MAX_EMBEDDING_INPUTS))
}

/// `stop`: a string or at most [`MAX_STOPS`] strings, or null.
fn stop() -> Schema {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    OneOfBuilder::new()
        .item(string())
        .item(ArrayBuilder::new().items(string()).max_items(Some(MAX_STOPS)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build()
        .into()
}

fn n() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Integer))
        .enum_values(Some([Value::from(N_SUPPORTED), Value::Null]))
        .description(Some("Only 1 is supported"))
        .build()
        .into()
}

/// `logprobs`: not supported, so only `false` or null.
fn logprobs_off() -> Schema {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Boolean))
        .enum_values(Some([Value::Bool(false), Value::Null]))
        .description(Some("Log probabilities are not supported"))
        .build()
        .into()
}

/// A field that is always `null` in responses (`logprobs`, `system_fingerprint`).
fn always_null() -> Schema {
    ObjectBuilder::new().schema_type(Type::Null).build().into()
}

fn string_enum(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
}

// ---------------------------------------------------------------------------------------------------------
// Requests.

/// Deserializes an optional integer field, accepting integral floats such as `5.0` too: JSON Schema's
/// `integer` (what the document says) includes them, and clients that compute values in floating point send
/// them.
fn integral<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(i),
        // Both i64 bounds as f64 are out of range or ambiguous: -2^63 - 1 parses to the same f64 as -2^63,
        // and i64::MAX rounds up to 2^63.
        (None, Some(f)) if f.fract() == 0.0 && f > i64::MIN as f64 && f < i64::MAX as f64 => Some(f as i64),
        _ => None,
    };
    whole
        .and_then(|i| T::try_from(i).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("invalid value: {n}, expected an integer in range")))
}

/// Fields shared by chat and text completions.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CommonFields {
    /// Ignored: the server serves one model.
    #[allow(dead_code)]
    pub model: Option<String>,
    /// Most tokens to generate; prompt plus this must fit the context window.
    #[schema(schema_with = max_tokens)]
    #[serde(default, deserialize_with = "integral")]
    pub max_tokens: Option<i64>,
    /// Same as `max_tokens` (wins when both are set).
    #[schema(schema_with = max_tokens)]
    #[serde(default, deserialize_with = "integral")]
    pub max_completion_tokens: Option<i64>,
    #[schema(schema_with = temperature)]
    pub temperature: Option<f64>,
    #[schema(schema_with = top_p)]
    pub top_p: Option<f64>,
    #[schema(schema_with = top_k)]
    #[serde(default, deserialize_with = "integral")]
    pub top_k: Option<i64>,
    #[schema(schema_with = min_p)]
    pub min_p: Option<f64>,
    #[serde(default, deserialize_with = "integral")]
    pub seed: Option<i64>,
    #[schema(schema_with = presence_penalty)]
    pub presence_penalty: Option<f64>,
    #[schema(schema_with = frequency_penalty)]
    pub frequency_penalty: Option<f64>,
    #[schema(schema_with = repetition_penalty)]
    pub repetition_penalty: Option<f64>,
    #[schema(schema_with = stop)]
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    #[schema(schema_with = n)]
    #[serde(default, deserialize_with = "integral")]
    pub n: Option<i64>,
    #[schema(schema_with = logprobs_off)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    pub include_usage: Option<bool>,
}

/// Stop strings: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Message content: a string or a list of content parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ContentIn {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part; only `{"type": "text", "text": ...}` is served (checked with a clear message).
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A chat message as sent.
#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<ContentIn>,
}

/// Roles a prompt message may have (`developer` is read as `system`).
pub const PROMPT_ROLES: &[&str] = &["system", "developer", "user"];
/// The role whose content may be missing or null.
pub const ASSISTANT_ROLE: &str = "assistant";

fn content_schema() -> Schema {
    let part = ObjectBuilder::new()
        .property("type", string_enum(&["text"]))
        .required("type")
        .property("text", ObjectBuilder::new().schema_type(Type::String))
        .required("text");
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ArrayBuilder::new().items(part))
        .build()
        .into()
}

impl PartialSchema for MessageIn {
    fn schema() -> RefOr<Schema> {
        let prompt = ObjectBuilder::new()
            .property("role", string_enum(PROMPT_ROLES))
            .required("role")
            .property("content", content_schema())
            .required("content");
        let assistant = ObjectBuilder::new()
            .property("role", string_enum(&[ASSISTANT_ROLE]))
            .required("role")
            .property(
                "content",
                AnyOfBuilder::new()
                    .item(content_schema())
                    .item(ObjectBuilder::new().schema_type(Type::Null)),
            );
        Schema::OneOf(OneOfBuilder::new().item(prompt).item(assistant).build()).into()
    }
}

impl ToSchema for MessageIn {}

/// A reference to a named component.
fn named<T: ToSchema>() -> RefOr<Schema> {
    utoipa::openapi::Ref::from_schema_name(T::name()).into()
}

fn messages() -> Schema {
    array_of(named::<MessageIn>()).min_items(Some(1)).build().into()
}

/// `POST /v1/chat/completions` and `POST /chat/completions`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[schema(schema_with = messages, required = true)]
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// A prompt or a list of prompts (one choice each).
    #[schema(schema_with = text_list, required = true)]
    pub prompt: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// `/score` generation parameters, in the Hugging Face / model-catalog vocabulary.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ScoreParameters {
    #[schema(schema_with = max_tokens)]
    #[serde(default, deserialize_with = "integral")]
    pub max_new_tokens: Option<i64>,
    /// Same as `max_new_tokens` (which wins when both are set).
    #[schema(schema_with = max_tokens)]
    #[serde(default, deserialize_with = "integral")]
    pub max_tokens: Option<i64>,
    #[schema(schema_with = temperature)]
    pub temperature: Option<f64>,
    #[schema(schema_with = top_p)]
    pub top_p: Option<f64>,
    #[schema(schema_with = top_k)]
    #[serde(default, deserialize_with = "integral")]
    pub top_k: Option<i64>,
    /// false: greedy whatever the temperature; unset with no temperature: greedy.
    pub do_sample: Option<bool>,
    #[schema(schema_with = repetition_penalty)]
    pub repetition_penalty: Option<f64>,
    #[serde(default, deserialize_with = "integral")]
    pub seed: Option<i64>,
    #[schema(schema_with = stop)]
    pub stop: Option<StopInput>,
    pub ignore_eos: Option<bool>,
    /// Hugging Face payloads: prepend the prompt to the generated text.
    pub return_full_text: Option<bool>,
}

fn score_parameters() -> Schema {
    AnyOfBuilder::new()
        .item(named::<ScoreParameters>())
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build()
        .into()
}

/// `POST /score` bodies (read by hand in `azureml.rs` so a malformed one gets the expected formats in its
/// message); this type is their schema.
pub struct ScoreRequest;

impl PartialSchema for ScoreRequest {
    fn schema() -> RefOr<Schema> {
        let input_string = OneOfBuilder::new()
            .item(array_of(named::<MessageIn>()).min_items(Some(1)))
            .item(ArrayBuilder::new().items(text()).min_items(Some(1)));
        let input_data = ObjectBuilder::new()
            .property("input_string", input_string)
            .required("input_string")
            .property("parameters", score_parameters());
        let model_catalog = ObjectBuilder::new()
            .description(Some(
                "Model catalog: chat messages -> {\"output\": text}; prompts -> [{\"0\": text}, ...]",
            ))
            .property("input_data", input_data)
            .required("input_data");
        let hugging_face = ObjectBuilder::new()
            .description(Some("Hugging Face: -> [{\"generated_text\": text}, ...]"))
            .property("inputs", text_list())
            .required("inputs")
            .property("parameters", score_parameters());
        // anyOf: a body with both `input_data` and `inputs` is served (input_data wins).
        Schema::AnyOf(AnyOfBuilder::new().item(model_catalog).item(hugging_face).build()).into()
    }
}

impl ToSchema for ScoreRequest {}

/// `POST /v1/embeddings` and `POST /embeddings`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    #[schema(schema_with = embedding_inputs, required = true)]
    pub input: Value,
    #[schema(value_type = Option<EncodingFormat>)]
    pub encoding_format: Option<String>,
    /// Must equal the model's dimension when set.
    #[serde(default, deserialize_with = "integral")]
    pub dimensions: Option<usize>,
    #[allow(dead_code)]
    pub model: Option<String>,
}

/// How embeddings are encoded (base64: little-endian f32).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// Fields of the Azure AI chat-completions request schema (plus OpenAI's that the SDKs send); others need
/// the `extra-parameters` header.
pub const AZURE_CHAT_FIELDS: &[&str] = &[
    "messages",
    "model",
    "frequency_penalty",
    "presence_penalty",
    "temperature",
    "top_p",
    "max_tokens",
    "response_format",
    "stop",
    "stream",
    "stream_options",
    "seed",
    "tools",
    "tool_choice",
    "n",
    "user",
];

/// The Azure AI chat request (`POST /chat/completions` without `extra-parameters`): the chat fields named in
/// [`AZURE_CHAT_FIELDS`] and no others; `tools` only empty (the model has no tool support: 422).
pub struct AzureChatRequest;

impl PartialSchema for AzureChatRequest {
    fn schema() -> RefOr<Schema> {
        let common = match CommonFields::schema() {
            RefOr::T(Schema::Object(o)) => o.properties,
            _ => Default::default(),
        };
        let mut b = ObjectBuilder::new()
            .property("messages", messages())
            .required("messages")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        for (name, schema) in common {
            if AZURE_CHAT_FIELDS.contains(&name.as_str()) {
                b = b.property(name, schema);
            }
        }
        let any = || ObjectBuilder::new().schema_type(SchemaType::AnyValue);
        let no_tools = OneOfBuilder::new()
            .item(ArrayBuilder::new().max_items(Some(0)).items(any()))
            .item(ObjectBuilder::new().schema_type(Type::Null));
        b.property("tools", no_tools)
            .property("tool_choice", any())
            .property("response_format", any())
            .property("user", any())
            .build()
            .into()
    }
}

impl ToSchema for AzureChatRequest {}

// ---------------------------------------------------------------------------------------------------------
// Responses.

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
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
    pub content: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    #[schema(schema_with = always_null)]
    pub logprobs: Option<()>,
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
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    #[schema(schema_with = always_null)]
    pub logprobs: Option<()>,
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
    #[schema(schema_with = always_null)]
    pub logprobs: Option<()>,
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
    /// The context window, in tokens.
    pub max_model_len: usize,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integer_fields_take_integral_floats_only() {
        let p: ScoreParameters = serde_json::from_value(json!({"seed": 5.0, "top_k": 3})).expect("valid");
        assert_eq!((p.seed, p.top_k), (Some(5), Some(3)));
        for bad in [
            json!({"seed": 1.5}),
            json!({"seed": -9.3e18}),
            json!({"top_k": "3"}),
            json!({"seed": 1e19}),
        ] {
            assert!(serde_json::from_value::<ScoreParameters>(bad.clone()).is_err(), "{bad}");
        }
        let p: ScoreParameters = serde_json::from_value(json!({"seed": null})).expect("null is unset");
        assert_eq!(p.seed, None);
    }

    #[test]
    fn ranges_say_their_rule() {
        assert_eq!(TOP_P.rule(), "greater than 0 and at most 1");
        assert!(!TOP_P.contains(0.0) && TOP_P.contains(1.0));
        let e = MAX_TOKENS.check_as("max_new_tokens", Some(0.0)).expect_err("below 1");
        assert_eq!(e.param.as_deref(), Some("max_new_tokens"));
        assert!(e.message.contains("at least 1"), "{}", e.message);
        assert!(TEMPERATURE.check(Some(f64::NAN)).is_err());
        assert!(TEMPERATURE.check(None).is_ok());
    }

    #[test]
    fn stream_chunks_leave_out_what_they_do_not_carry() {
        let chunk = ChatCompletionChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some(FinishReason::Stop),
            }],
            usage: None,
        };
        let v = serde_json::to_value(chunk).expect("serializes");
        assert!(v.get("usage").is_none(), "{v}");
        assert_eq!(v["system_fingerprint"], Value::Null);
        assert_eq!(v["choices"][0]["delta"], json!({}));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let item =
            serde_json::to_value(ScoreResponse::Text(vec![ScoreTextOutput { text: "t".into() }])).expect("serializes");
        assert_eq!(item, json!([{"0": "t"}]));
    }
}
