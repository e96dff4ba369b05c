//! Sentence embeddings from a BERT-family model in the sentence-transformers layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `1_Pooling/`), e.g. all-MiniLM-L6-v2: mean pooling over the tokens,
//! then L2 normalisation, inputs truncated to the model's `max_seq_length` (256 for MiniLM).
//!
//! [`EmbeddingModel::tokenize`] cuts a text to [`EmbeddingModel::max_input_bytes`] before the tokenizer sees it,
//! so a megabyte input costs no more than the prefix whose tokens are used; [`EmbeddingModel::embed_batch`] runs
//! many token sequences as one padded forward with an attention mask. Synchronous; knows nothing of threads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{ModelWrapper, Tokenizer, TruncationParams};

use super::ModelError;

/// Longest input when `sentence_bert_config.json` does not say.
const DEFAULT_MAX_TOKENS: usize = 256;

/// Bytes one token may cover when the tokenizer is not WordPiece: a generous bound for BPE / Unigram vocabularies
/// (their longest entries are a few dozen bytes).
const FALLBACK_BYTES_PER_TOKEN: usize = 64;

/// The most text bytes one token can stand for, from the tokenizer's own limits. WordPiece turns a word of at
/// most `max_input_chars_per_word` characters (4 bytes each at most in UTF-8) into tokens, or into one `[UNK]`,
/// plus one separator before it. Runs of whitespace or control characters produce no token at all, so this is
/// a bound for text, not for padding: an input whose first tokens hide behind kilobytes of spaces embeds fewer
/// tokens than it would whole.
fn max_bytes_per_token(tokenizer: &Tokenizer) -> usize {
    match tokenizer.get_model() {
        ModelWrapper::WordPiece(wp) => wp.max_input_chars_per_word.saturating_mul(4).saturating_add(1),
        _ => FALLBACK_BYTES_PER_TOKEN,
    }
}

/// Bytes per token of the first cut tried: English runs at about 4.5 bytes per WordPiece token, so one try
/// covers nearly every real text and costs a few kilobytes of tokenizing.
const FIRST_BYTES_PER_TOKEN: usize = 8;

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a character boundary.
fn prefix(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// [`prefix`], backed off to the last whitespace when there is one, so no word is cut in two: the tokens of
/// the result are then the leading tokens of the whole text.
fn word_prefix(text: &str, max_bytes: usize) -> &str {
    let p = prefix(text, max_bytes);
    if p.len() == text.len() {
        return p;
    }
    match p.rfind(char::is_whitespace) {
        Some(i) if i > 0 => &p[..i],
        _ => p,
    }
}

/// A loaded embedding model.
pub struct EmbeddingModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    /// Name reported to clients (the folder name).
    pub name: String,
    /// Embedding width.
    pub dim: usize,
    /// Most tokens of an input that are used (`max_seq_length`); the rest is truncated.
    pub max_tokens: usize,
    /// Bytes of an input handed to the tokenizer: `max_tokens` times the most bytes one token can stand for.
    pub max_input_bytes: usize,
    /// Id used for padding positions (masked out, so only its validity matters).
    pad_id: u32,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("name", &self.name)
            .field("dim", &self.dim)
            .finish()
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, ModelError> {
    std::fs::read(&path).map_err(|source| ModelError::Io { path, source })
}

impl EmbeddingModel {
    /// Loads the model from a sentence-transformers folder.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let config: Config = serde_json::from_slice(&read(dir.join("config.json"))?)
            .map_err(|e| ModelError::Metadata(format!("{}/config.json: {e}", dir.display())))?;
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| ModelError::Tokenizer(format!("{}/tokenizer.json: {e}", dir.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let vb = VarBuilder::from_buffered_safetensors(read(dir.join("model.safetensors"))?, DType::F32, &Device::Cpu)?;
        let bert = BertModel::load(vb, &config)?;
        let name = dir
            .file_name()
            .map_or_else(|| "embeddings".into(), |n| n.to_string_lossy().into_owned());
        let dim = config.hidden_size;
        let max_input_bytes = max_tokens.saturating_mul(max_bytes_per_token(&tokenizer));
        let pad_id = config.pad_token_id as u32;
        Ok(Self {
            bert,
            tokenizer,
            name,
            dim,
            max_tokens,
            max_input_bytes,
            pad_id,
        })
    }

    /// The token ids of `text` (special tokens included), at most `max_tokens` of them. Tokenizes a prefix of
    /// `max_tokens x 8` bytes cut at a word boundary, and a 4x longer one while that gives fewer than
    /// `max_tokens` tokens, never more than `max_input_bytes`: a megabyte input costs a few kilobytes of work.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut bound = self.max_tokens.saturating_mul(FIRST_BYTES_PER_TOKEN);
        loop {
            let cut = word_prefix(text, bound.min(self.max_input_bytes));
            let ids = self.encode(cut)?;
            if cut.len() == text.len() || ids.len() >= self.max_tokens || bound >= self.max_input_bytes {
                return Ok(ids);
            }
            bound = bound.saturating_mul(4);
        }
    }

    /// The tokenizer's ids for `text` as given (truncated to `max_tokens`).
    fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The normalised embeddings of several token sequences, computed in one forward: sequences are padded to
    /// the longest and padding is masked out of attention and of the mean. A sequence's result differs from
    /// running it alone only by float rounding (the matrix shapes differ).
    pub fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let rows = inputs.len();
        let width = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
        if rows == 0 || width == 0 {
            return Ok(vec![vec![0.0; self.dim]; rows]);
        }
        let mut ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for input in inputs {
            ids.extend_from_slice(input);
            ids.resize(ids.len() + width - input.len(), self.pad_id);
            mask.extend(std::iter::repeat_n(1f32, input.len()));
            mask.resize(mask.len() + width - input.len(), 0.0);
        }
        let ids = Tensor::from_vec(ids, (rows, width), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (rows, width), &Device::Cpu)?;
        let types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?; // [rows, width, dim]
        let counts = mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?; // [rows, 1]
        let mean = hidden
            .broadcast_mul(&mask.unsqueeze(2)?)?
            .sum(1)?
            .broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    /// The normalised embedding of `text` alone and the number of tokens it used (after truncation).
    pub fn embed(&self, text: &str) -> Result<(Vec<f32>, usize), ModelError> {
        let ids = self.tokenize(text)?;
        let mut v = self.embed_batch(&[&ids])?;
        Ok((v.pop().unwrap_or_default(), ids.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> EmbeddingModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(crate::config::DEFAULT_EMBEDDING_MODEL);
        assert!(
            dir.join("config.json").is_file(),
            "{} is missing: run `make models`",
            dir.display()
        );
        EmbeddingModel::load(&dir).expect("load the embedding model")
    }

    /// Largest difference allowed between an input's embedding in a padded batch and alone: float rounding of
    /// different matrix shapes, three orders of magnitude below the differences between sentences.
    pub const BATCH_TOLERANCE: f32 = 1e-5;

    #[test]
    fn a_padded_batch_gives_each_input_its_single_result() {
        let m = model();
        let texts = [
            "A cat sits on the mat",
            "Stock markets fell sharply today after the central bank raised interest rates again",
            "hi",
            &"a much longer sentence about nothing in particular ".repeat(40),
        ];
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| m.tokenize(t).expect("tokenize")).collect();
        assert!(
            ids[3].len() == m.max_tokens && ids[2].len() < 5,
            "lengths differ, so rows are padded"
        );
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batch = m.embed_batch(&refs).expect("batch");
        for (i, text) in texts.iter().enumerate() {
            let (alone, n) = m.embed(text).expect("single");
            assert_eq!(n, ids[i].len());
            let diff = alone
                .iter()
                .zip(&batch[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < BATCH_TOLERANCE, "input {i}: max difference {diff}");
            let norm: f32 = batch[i].iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-4);
        }
        assert!(
            batch[0]
                .iter()
                .zip(&batch[1])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
                > 100.0 * BATCH_TOLERANCE,
            "different sentences differ far more than the tolerance"
        );
    }

    #[test]
    fn a_huge_input_is_cut_before_tokenizing_and_keeps_its_leading_tokens() {
        let m = model();
        assert_eq!(
            m.max_input_bytes,
            256 * 401,
            "WordPiece: 100 chars x 4 bytes + 1, per token"
        );
        let huge = "The quick brown fox jumps over the lazy dog. ".repeat(50_000); // about 2 MB
        let started = std::time::Instant::now();
        let ids = m.tokenize(&huge).expect("tokenize");
        let elapsed = started.elapsed();
        let whole = m.encode(prefix(&huge, 20_000)).expect("encode");
        assert_eq!(
            ids, whole,
            "the same first 256 tokens as tokenizing (much more of) the text"
        );
        assert_eq!(ids.len(), m.max_tokens);
        // Sparse text (30 spaces per word) needs longer cuts, and still gets the tokens the whole text gives.
        let sparse = format!("{}tail", "word                              ".repeat(2000));
        assert_eq!(
            m.tokenize(&sparse).expect("tokenize"),
            m.encode(&sparse).expect("encode")
        );
        // Short text is tokenized whole; a multi-byte character straddling a cut is not split.
        assert_eq!(m.tokenize("a cat").expect("tokenize").len(), 4);
        let wide = "é".repeat(m.max_input_bytes);
        assert!(prefix(&wide, m.max_input_bytes + 1).len() <= m.max_input_bytes + 1);
        assert_eq!(
            m.tokenize(&wide).expect("tokenize").len(),
            3,
            "[CLS] [UNK] [SEP]: one word over 100 chars"
        );
        eprintln!("tokenized a {} byte input in {elapsed:?}", huge.len());
    }

    #[test]
    fn a_word_prefix_never_cuts_a_word() {
        assert_eq!(word_prefix("alpha beta gamma", 12), "alpha beta");
        assert_eq!(word_prefix("alpha beta", 100), "alpha beta");
        assert_eq!(word_prefix("alphabetagamma", 5), "alpha");
        assert_eq!(word_prefix("ééé", 3), "é");
    }
}
