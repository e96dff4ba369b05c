//! The candle side of amlserve, synchronous and free of async code: finding and loading a GGUF model, its
//! tokenizer and chat template, and the batched llama forward pass with per-sequence KV caches.
//! Must not know about HTTP, tokio or scheduling.

pub mod activation;
pub mod attention;
pub mod chat_template;
pub mod embedding;
pub mod files;
pub mod gguf_header;
pub mod gguf_meta;
pub mod kv_cache;
pub mod llama;
pub mod par;
pub mod rope;
pub mod tokenizer;
pub mod vnni_q8;
pub mod weights;

use std::path::{Path, PathBuf};

pub use chat_template::{ChatMessage, ChatTemplate};
pub use kv_cache::{KvShape, SeqKv};
pub use llama::{Llama, LlamaConfig, SeqChunk};
pub use tokenizer::TextTokenizer;
pub use weights::WeightFormat;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid GGUF: {0}")]
    Metadata(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Everything loaded from one GGUF file.
#[derive(Debug)]
pub struct Model {
    /// Name reported to clients (the file stem).
    pub name: String,
    pub path: PathBuf,
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
}

impl Model {
    /// Loads the model, tokenizer and chat template from a GGUF file.
    pub fn load(path: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let content =
            gguf_header::read(&mut file).map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
        let tokenizer = TextTokenizer::from_gguf(&content)?;
        let llama = Llama::load(&content, &mut file, format)?;
        if tokenizer.vocab_size() != llama.config.vocab_size {
            return Err(ModelError::Metadata(
                "vocabulary size disagrees with the tokenizer".into(),
            ));
        }
        let md = gguf_meta::Metadata(&content);
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
        let template = ChatTemplate::new(
            md.opt_string("tokenizer.chat_template").as_deref(),
            &token(tokenizer.bos_id),
            &token(Some(tokenizer.eos_id)),
        )?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            llama,
            tokenizer,
            template,
        })
    }

    /// Renders chat messages with the model's template and tokenizes the result.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>), ModelError> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok((text, ids))
    }
}
