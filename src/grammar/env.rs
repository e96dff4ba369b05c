//! llguidance's view of our tokenizer: a [`TokTrie`] of every token's raw bytes plus a [`TokenizerEnv`].
//!
//! Special tokens (`<|im_end|>` and the like) get toktrie's 0xFF prefix, so no grammar text can produce them;
//! every stop id of the model is an end-of-sequence token to llguidance, so a mask allows them all where the
//! grammar may end.

use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::model::TextTokenizer;

/// The tokenizer environment one model's grammars are compiled against.
pub struct TokenEnv {
    trie: TokTrie,
    tokenizer: TextTokenizer,
}

impl TokenEnv {
    /// Builds the trie from the tokenizer's vocabulary.
    pub fn new(tokenizer: &TextTokenizer) -> Result<Self, String> {
        let vocab = tokenizer.vocab_size();
        let words = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer
                    .token_bytes(id)
                    .ok_or_else(|| format!("token {id} has no text"))?;
                Ok(if tokenizer.is_special(id) {
                    let mut w = Vec::with_capacity(bytes.len() + 1);
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    w.extend_from_slice(&bytes);
                    w
                } else {
                    bytes
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let stops: Vec<TokenId> = std::iter::once(tokenizer.eos_id)
            .chain(tokenizer.stop_ids.iter().copied().filter(|&s| s != tokenizer.eos_id))
            .filter(|&s| (s as usize) < vocab)
            .collect();
        if stops.is_empty() {
            return Err(format!("eos id {} is outside the vocabulary", tokenizer.eos_id));
        }
        let mut info = TokRxInfo::new(vocab as u32, stops[0]);
        info.tok_bos = tokenizer.bos_id;
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        Ok(Self {
            trie,
            tokenizer: tokenizer.clone(),
        })
    }
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s).ok().map(|t| self.tokenizer.encode(t)) {
            Some(Ok(ids)) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}
