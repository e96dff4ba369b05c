//! Sentence embeddings from a BERT-family model in the sentence-transformers layout (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `1_Pooling/`), e.g. all-MiniLM-L6-v2: mean pooling over the tokens,
//! then L2 normalisation, inputs truncated to the model's `max_seq_length` (256 for MiniLM).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use super::ModelError;

/// Longest input when `sentence_bert_config.json` does not say.
const DEFAULT_MAX_TOKENS: usize = 256;

/// A loaded embedding model.
pub struct EmbeddingModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    /// Name reported to clients (the folder name).
    pub name: String,
    /// Embedding width.
    pub dim: usize,
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
        Ok(Self {
            bert,
            tokenizer,
            name,
            dim,
        })
    }

    /// The normalised embedding of `text` and the number of tokens it used (after truncation).
    pub fn embed(&self, text: &str) -> Result<(Vec<f32>, usize), ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids();
        let n = ids.len();
        let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let types = input.zeros_like()?;
        let hidden = self.bert.forward(&input, &types, None)?; // [1, n, dim]
        let mean = (hidden.sum(1)? / n as f64)?.squeeze(0)?;
        let norm = mean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12);
        Ok(((mean / f64::from(norm))?.to_vec1::<f32>()?, n))
    }
}
