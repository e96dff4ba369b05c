//! Log-probabilities in the OpenAI shapes: chat's `logprobs.content` and completions' legacy lists.
//!
//! The engine reports token ids and numbers ([`Sampled`]); this module gives each token its text and bytes.
//! The values are the model's raw distribution (see `engine::logprobs`).

use std::collections::BTreeMap;

use super::types::{ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob};
use crate::engine::logprobs::Sampled;
use crate::model::TextTokenizer;

fn token(tok: &TextTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat `logprobs` for these tokens.
pub fn chat(tok: &TextTokenizer, tokens: &[Sampled]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .map(|s| {
            let (text, bytes) = token(tok, s.id);
            let top_logprobs = s
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = token(tok, id);
                    TopLogprob { token, logprob, bytes }
                })
                .collect();
            TokenLogprob {
                token: text,
                logprob: s.logprob,
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// Completions' `logprobs` for these tokens, the first starting at byte `offset` of the choice's text.
pub fn completion(tok: &TextTokenizer, tokens: &[Sampled], mut offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs {
        tokens: Vec::with_capacity(tokens.len()),
        token_logprobs: Vec::with_capacity(tokens.len()),
        top_logprobs: Vec::with_capacity(tokens.len()),
        text_offset: Vec::with_capacity(tokens.len()),
    };
    for s in tokens {
        let (text, bytes) = token(tok, s.id);
        out.text_offset.push(offset);
        offset += bytes.len();
        out.tokens.push(text);
        out.token_logprobs.push(s.logprob);
        let top: BTreeMap<String, f32> = s.top.iter().map(|&(id, lp)| (token(tok, id).0, lp)).collect();
        out.top_logprobs.push(top);
    }
    out
}

/// Bytes of text these tokens stand for (to continue completions' `text_offset` across stream chunks).
pub fn byte_len(tok: &TextTokenizer, tokens: &[Sampled]) -> usize {
    tokens
        .iter()
        .map(|s| tok.token_bytes(s.id).map_or(0, |b| b.len()))
        .sum()
}
