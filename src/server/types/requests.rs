//! Request bodies of every route, as sent (lenient where the server's own message helps more than serde's).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::ranges::*;
use super::strict::{strict_schema, Body};

/// Deserializes an optional integer field, accepting integral floats such as `5.0` too: JSON Schema's
/// `integer` (what the document says) includes them, and clients that compute values in floating point send
/// them.
pub(super) fn integral<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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
    /// The served language model to use (`GET /v1/models` lists them); unset: the default, the first `--model`.
    /// A name the server does not serve is a 404 listing the served ones, and an embedding model's name a 400;
    /// a server with a single language model accepts any name.
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
    /// Choices to generate: the prompt is read once and its cache forked to each; with a seed, choice `i`
    /// samples with seed + i.
    #[schema(schema_with = n)]
    #[serde(default, deserialize_with = "integral")]
    pub n: Option<i64>,
    /// Refused unless 1: amlserve does not rank candidates server-side.
    #[schema(schema_with = best_of_one)]
    pub best_of: Option<Value>,
    #[schema(schema_with = response_format)]
    pub response_format: Option<Value>,
    #[schema(schema_with = structured_outputs)]
    pub structured_outputs: Option<Value>,
    #[schema(schema_with = logit_bias)]
    pub logit_bias: Option<Value>,
}

impl CommonFields {
    /// The first field that asks for something amlserve does not implement yet, with its only accepted value.
    pub fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        let asks = |v: &Option<Value>, default: Value| v.as_ref().is_some_and(|v| !v.is_null() && *v != default);
        [(&self.best_of, serde_json::json!(1), "best_of", "1")]
            .into_iter()
            .find(|(v, default, _, _)| asks(v, default.clone()))
            .map(|(_, _, name, only)| (name, only))
    }
}

/// Unknown keys are refused (on every route: the `extra-parameters` header is about top-level fields).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
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
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers.
    #[allow(dead_code)]
    pub tool_call_id: Option<String>,
}

/// Roles a prompt message may have (`developer` is read as `system`; `tool` carries a call's result).
pub const PROMPT_ROLES: &[&str] = &["system", "developer", "user", "tool"];
/// The role whose content may be missing or null.
pub const ASSISTANT_ROLE: &str = "assistant";

pub(super) fn content_schema() -> Schema {
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
                "tool_calls",
                AnyOfBuilder::new()
                    .item(array_of(RefOr::T(tool_call_schema())))
                    .item(ObjectBuilder::new().schema_type(Type::Null)),
            )
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
pub(super) fn named<T: ToSchema>() -> RefOr<Schema> {
    utoipa::openapi::Ref::from_schema_name(T::name()).into()
}

pub(super) fn messages() -> Schema {
    array_of(named::<MessageIn>()).min_items(Some(1)).build().into()
}

/// `POST /v1/chat/completions` and `POST /chat/completions`. Strict on `/v1` (see `strict.rs`): a field
/// outside the schema is refused, except the ignored no-ops in [`IGNORED_FIELDS`](super::IGNORED_FIELDS) (`user`, `metadata`,
/// `store`, `service_tier`, ...); the Azure AI route decides by its `extra-parameters` header.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<MessageIn>,
    pub logprobs: Option<bool>,
    /// With `logprobs`: how many most likely alternatives to report per token.
    #[serde(default, deserialize_with = "integral")]
    pub top_logprobs: Option<i64>,
    /// Functions the model may call.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// Whether one answer may hold several calls (default true).
    pub parallel_tool_calls: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
    /// Every top-level field that no named field took (declared last: serde hands it the leftovers).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl PartialSchema for ChatRequest {
    fn schema() -> RefOr<Schema> {
        let own = ObjectBuilder::new()
            .property("messages", messages())
            .required("messages")
            .property("logprobs", chat_logprobs())
            .property("top_logprobs", top_logprobs())
            .property("tools", tools())
            .property("tool_choice", tool_choice())
            .property("parallel_tool_calls", nullable_bool());
        strict_schema(own, Body::Chat)
    }
}

impl ToSchema for ChatRequest {}

/// `POST /v1/completions`. Strict like [`ChatRequest`] (only `user` is an ignored no-op here, as on OpenAI's
/// legacy completions).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A prompt or a list of prompts (one choice each).
    pub prompt: Option<Value>,
    /// Report each token's log-probability and this many most likely alternatives (legacy shape).
    #[serde(default, deserialize_with = "integral")]
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: CommonFields,
    /// Every top-level field that no named field took.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl PartialSchema for CompletionRequest {
    fn schema() -> RefOr<Schema> {
        let prompt = text_list();
        let prompt = match prompt {
            Schema::OneOf(mut o) => {
                o.description = Some("A prompt or a list of prompts (one choice each).".into());
                Schema::OneOf(o)
            }
            other => other,
        };
        let own = ObjectBuilder::new()
            .property("prompt", prompt)
            .required("prompt")
            .property("logprobs", completion_logprobs());
        strict_schema(own, Body::Completion)
    }
}

impl ToSchema for CompletionRequest {}

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

pub(super) fn score_parameters() -> Schema {
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
        // A field that would be ignored in a shape is refused (400): its schema there matches no value but
        // null (which, as everywhere in these bodies, is the same as leaving the field out).
        let refused = |why: &str| -> Schema {
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .min_length(Some(1))
                .max_length(Some(0))
                .description(Some(why.to_string()))
                .build()
                .into()
        };
        let model = || -> Schema {
            ObjectBuilder::new()
                .schema_type(nullable(Type::String))
                .description(Some(
                    "The served language model to use (GET /v1/models lists them); unset: the default, the first \
                     --model. A name the server does not serve is a 404 listing the served ones; a server with a \
                     single language model accepts any name.",
                ))
                .build()
                .into()
        };
        let model_catalog = ObjectBuilder::new()
            .description(Some(
                "Model catalog: chat messages -> {\"output\": text}; prompts -> [{\"0\": text}, ...]",
            ))
            .property("input_data", input_data)
            .required("input_data")
            .property("model", model())
            .property("parameters", refused("refused here: parameters go inside input_data"))
            .property("inputs", refused("refused beside input_data: send one of the two"));
        let hugging_face = ObjectBuilder::new()
            .description(Some("Hugging Face: -> [{\"generated_text\": text}, ...]"))
            .property("inputs", text_list())
            .required("inputs")
            .property("model", model())
            .property("parameters", score_parameters())
            .property("input_data", refused("refused beside inputs: send one of the two"));
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
    /// The served embedding model to use (`GET /v1/models` lists them); unset: the default, the first
    /// `--embedding-model`. A name the server does not serve is a 404 listing the served ones, and a language
    /// model's name a 400; a server with a single embedding model accepts any name.
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
/// [`AZURE_CHAT_FIELDS`] and no others.
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
        b.property("user", any())
            .property("tools", tools())
            .property("tool_choice", tool_choice())
            .build()
            .into()
    }
}

impl ToSchema for AzureChatRequest {}
