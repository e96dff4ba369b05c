//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes: the served model's tokenizer and chat template,
//! for clients that count tokens or build prompts themselves.
//!
//! - `{"prompt": "...", "add_special_tokens": true}` -> `{"count", "max_model_len", "tokens"}`: the ids
//!   `/v1/completions` would generate from (with the defaults).
//! - `{"messages": [...], "add_generation_prompt": true, "add_special_tokens": false}` -> the same shape: the
//!   ids `/v1/chat/completions` would generate from (with the defaults).
//! - `return_token_strs: true` adds `token_strs`, each id's vocabulary entry.
//! - `{"tokens": [...]}` -> `{"prompt": "..."}`, special tokens included; an id outside the vocabulary is a
//!   400 naming it.
//!
//! Rendering and tokenizing run on the blocking pool, like generation's prompts (`generate::tokenize`).

use axum::extract::State;
use axum::Json;
use serde_json::Value;

use super::error::ApiError;
use super::json::ApiJson;
use super::openai::convert_messages;
use super::types::{
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizePromptRequest, TokenizeResponse,
};
use super::AppState;
use crate::model::ChatMessage;

fn parse<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.served()?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON object with `prompt` or `messages`",
        ));
    }
    let (source, special, with_strs, model) = if body.get("messages").is_some() {
        let req: TokenizeChatRequest = parse(body)?;
        let source = Source::Chat(
            convert_messages(req.messages)?,
            req.add_generation_prompt.unwrap_or(true),
        );
        let special = req.add_special_tokens.unwrap_or(false);
        (source, special, req.return_token_strs, req.model)
    } else {
        let req: TokenizePromptRequest = parse(body)?;
        let special = req.add_special_tokens.unwrap_or(true);
        (Source::Prompt(req.prompt), special, req.return_token_strs, req.model)
    };
    let ready = state.language(model.as_deref())?;
    let model = ready.model.clone();
    let content = ready.content_tokens;
    let job = move || {
        let t = &model.tokenizer;
        match source {
            Source::Prompt(text) if special => t.encode_prompt(&text),
            Source::Prompt(text) => t.encode(&text),
            Source::Chat(messages, generation_prompt) => model
                .chat_prompt(&messages, generation_prompt, content)
                .map(|(_, ids)| if special { t.with_bos(ids) } else { ids }),
        }
        .map_err(|e| e.to_string())
    };
    let tokens = tokio::task::spawn_blocking(job)
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e}")))?;
    let tokenizer = &ready.model.tokenizer;
    let token_strs = with_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&t| tokenizer.token_text(t).unwrap_or_default().to_string())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: ready.model.config.context_length,
        tokens,
        token_strs,
    }))
}

/// What `/tokenize` tokenizes.
enum Source {
    Prompt(String),
    /// Messages, and whether to open the assistant's turn.
    Chat(Vec<ChatMessage>, bool),
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let ready = state.language(req.model.as_deref())?;
    let vocab = ready.model.tokenizer.vocab_size();
    let ids = req
        .tokens
        .iter()
        .map(|n| token_id(n, vocab))
        .collect::<Result<Vec<u32>, ApiError>>()?;
    let model = ready.model.clone();
    let prompt = tokio::task::spawn_blocking(move || model.tokenizer.decode_with_special(&ids))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::bad_request(format!("cannot detokenize: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// One id, checked against the vocabulary (integral floats such as `5.0` are integers too).
fn token_id(n: &serde_json::Number, vocab: usize) -> Result<u32, ApiError> {
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(i), _) => Some(i as f64),
        (None, Some(f)) if f.fract() == 0.0 => Some(f),
        _ => None,
    };
    match whole {
        Some(f) if f >= 0.0 && f < vocab as f64 => Ok(f as u32),
        Some(_) => Err(ApiError::invalid_param(
            "tokens",
            format!(
                "token id {n} is outside the vocabulary: ids go from 0 to {}",
                vocab.saturating_sub(1)
            ),
        )),
        None => Err(ApiError::invalid_param(
            "tokens",
            format!("token ids are integers; got {n}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        let n = |v: serde_json::Value| serde_json::from_value::<serde_json::Number>(v).expect("number");
        assert_eq!(token_id(&n(serde_json::json!(3)), 10).expect("in"), 3);
        assert_eq!(token_id(&n(serde_json::json!(3.0)), 10).expect("integral"), 3);
        for (bad, needle) in [
            (serde_json::json!(10), "10"),
            (serde_json::json!(-1), "-1"),
            (serde_json::json!(1.5), "1.5"),
        ] {
            let e = token_id(&n(bad), 10).expect_err("refused");
            assert!(e.message.contains(needle), "{}", e.message);
            assert_eq!(e.param.as_deref(), Some("tokens"));
        }
    }
}
