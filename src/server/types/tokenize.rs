//! Bodies of `POST /tokenize` and `POST /detokenize`, in vLLM's shapes. Unknown fields are refused.

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::requests::{messages, named, MessageIn};

/// `POST /tokenize` with a prompt: tokenized as `/v1/completions` would.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizePromptRequest {
    /// The served language model whose tokenizer to use; unset: the default. Chosen as in
    /// `/v1/chat/completions`.
    pub model: Option<String>,
    pub prompt: String,
    /// Add the model's special tokens (BOS, when the model asks for one). Default true, as `/v1/completions`
    /// tokenizes.
    pub add_special_tokens: Option<bool>,
    /// Also return each token's vocabulary entry (`token_strs`).
    pub return_token_strs: Option<bool>,
}

/// `POST /tokenize` with chat messages: rendered with the model's chat template, then tokenized. The
/// defaults give what `/v1/chat/completions` feeds the model.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeChatRequest {
    /// The served language model whose tokenizer to use; unset: the default. Chosen as in
    /// `/v1/chat/completions`.
    pub model: Option<String>,
    #[schema(schema_with = messages, required = true)]
    pub messages: Vec<MessageIn>,
    /// Open the assistant's turn at the end (default true).
    pub add_generation_prompt: Option<bool>,
    /// Add the model's special tokens (BOS, when the model asks for one) on top of the template's. Default
    /// false: the template writes its own.
    pub add_special_tokens: Option<bool>,
    /// Also return each token's vocabulary entry (`token_strs`).
    pub return_token_strs: Option<bool>,
}

/// `POST /tokenize`: a prompt or chat messages (a body with `messages` is a chat request).
pub struct TokenizeRequest;

impl PartialSchema for TokenizeRequest {
    fn schema() -> RefOr<Schema> {
        Schema::OneOf(
            OneOfBuilder::new()
                .item(named::<TokenizePromptRequest>())
                .item(named::<TokenizeChatRequest>())
                .build(),
        )
        .into()
    }
}

impl ToSchema for TokenizeRequest {}

/// `POST /tokenize` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The model's context window, in tokens.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's vocabulary entry (byte-level BPE text), with `return_token_strs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    /// The served language model whose tokenizer to use; unset: the default. Chosen as in
    /// `/v1/chat/completions`.
    pub model: Option<String>,
    /// Token ids, each inside the vocabulary (the served document gives its last id as `maximum`).
    #[schema(schema_with = token_ids)]
    pub tokens: Vec<serde_json::Number>,
}

/// Token ids: integers from 0 (integral floats such as `5.0` count, as JSON Schema's `integer` says).
fn token_ids() -> Schema {
    ArrayBuilder::new()
        .items(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
        .build()
        .into()
}

/// `POST /detokenize` answer: the text of the ids, special tokens included.
#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}
