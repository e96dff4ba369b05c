//! The candle side of amlserve, synchronous and free of async code: finding and loading a model (a GGUF file or
//! a Hugging Face folder), its tokenizer and chat template, and the batched forward pass of each supported
//! family with per-sequence KV caches.
//! Must not know about HTTP, tokio or scheduling.

pub mod activation;
pub mod arch;
pub mod attention;
mod block;
pub mod chat_template;
pub mod content_text;
pub mod device;
mod embed_table;
pub mod embedding;
pub mod files;
pub mod gguf_header;
pub mod gguf_meta;
mod hf_config;
mod hf_folder;
mod hf_tokenizer;
pub mod kv_cache;
pub mod llama;
pub mod par;
pub mod rope;
mod safetensors_files;
mod source;
pub mod spm;
pub mod tokenizer;
pub mod vnni_q8;
pub mod weights;

use std::borrow::Cow;
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
    /// A Hugging Face folder that cannot be served: the file and the field are named.
    #[error("{0}")]
    Folder(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set: error messages
/// reach response bodies (a failed load's 503, say), which never carry internals.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

/// The weights and forward pass a model runs on.
#[derive(Debug)]
pub enum Forward {
    /// The fast CPU forward ([`Llama`]).
    Cpu(Llama),
    /// The device-generic forward on a candle device ([`device::DeviceLlama`]), with the device's description.
    Device(device::DeviceLlama, device::DeviceInfo),
}

/// Everything loaded from one GGUF file or Hugging Face folder.
#[derive(Debug)]
pub struct Model {
    /// Name reported to clients (the file stem, or the folder's name).
    pub name: String,
    pub path: PathBuf,
    /// Hyper-parameters.
    pub config: LlamaConfig,
    pub forward: Forward,
    pub tokenizer: TextTokenizer,
    /// The chat template: the model's own, or `--chat-template`'s for a model without one; `None`: chat
    /// requests are refused.
    pub template: Option<ChatTemplate>,
}

impl Model {
    /// Loads the model, tokenizer and chat template from a GGUF file or a Hugging Face folder, for the fast CPU
    /// forward.
    pub fn load(path: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        Self::load_on(path, format, None)
    }

    /// The fast CPU forward, when this model runs on it.
    pub fn cpu(&self) -> Option<&Llama> {
        match &self.forward {
            Forward::Cpu(l) => Some(l),
            Forward::Device(..) => None,
        }
    }

    /// Where the model computes.
    pub fn device_info(&self) -> device::DeviceInfo {
        match &self.forward {
            Forward::Cpu(_) => device::DeviceInfo::cpu(),
            Forward::Device(_, info) => info.clone(),
        }
    }

    /// Bytes the weights take.
    pub fn weight_bytes(&self) -> usize {
        match &self.forward {
            Forward::Cpu(l) => l.weight_bytes,
            Forward::Device(d, _) => d.weight_bytes,
        }
    }

    /// Loads the model as [`Self::load`] does; with a device, onto the device-generic forward there.
    pub fn load_on(
        path: &Path,
        format: WeightFormat,
        on: Option<(&candle_core::Device, device::DeviceInfo)>,
    ) -> Result<Self, ModelError> {
        if path.is_dir() {
            return Self::load_folder(path, format, on);
        }
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let content =
            gguf_header::read(&mut file).map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
        let tokenizer = TextTokenizer::from_gguf(&content)?;
        let config = LlamaConfig::from_gguf(&content)?;
        let mut source = source::GgufSource {
            content: &content,
            reader: &mut file,
            interleaved_rope: config.family.interleaved_rope(),
        };
        let forward = load_forward(&mut source, config.clone(), format, on)?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::Metadata(
                "vocabulary size disagrees with the tokenizer".into(),
            ));
        }
        let template = file_template(
            &tokenizer,
            gguf_meta::Metadata(&content).opt_string("tokenizer.chat_template"),
        )?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            config,
            forward,
            tokenizer,
            template,
        })
    }

    /// Loads a Hugging Face folder (`config.json`, safetensors, `tokenizer.json`) onto the CPU forward, or with a
    /// device onto the device-generic forward there.
    fn load_folder(
        dir: &Path,
        format: WeightFormat,
        on: Option<(&candle_core::Device, device::DeviceInfo)>,
    ) -> Result<Self, ModelError> {
        let hf = hf_config::HfConfig::read(dir)?;
        // Tokenizer and template first: they fail fast, the weights take a while.
        let (tokenizer, template) = hf_tokenizer::load(dir, &hf, hf.config.vocab_size)?;
        let template = file_template(&tokenizer, template)?;
        let mut source = hf_folder::HfSource::open(dir, &hf)?;
        let forward = load_forward(&mut source, hf.config.clone(), format, on).map_err(|e| match e {
            // The shared loader's words for a bad file are a GGUF's.
            ModelError::Metadata(m) => ModelError::Folder(format!("{}: {m}", dir.display())),
            other => other,
        })?;
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            name,
            path: dir.to_path_buf(),
            config: hf.config,
            forward,
            tokenizer,
            template,
        })
    }

    /// Gives a model whose file has no chat template the one `spec` names (see [`ChatTemplate::from_spec`]);
    /// a model with its own keeps it.
    pub fn use_chat_template_if_none(&mut self, spec: &str) -> Result<(), ModelError> {
        if self.template.is_none() {
            let (bos, eos) = special_texts(&self.tokenizer);
            self.template = Some(ChatTemplate::from_spec(spec, &bos, &eos)?);
        }
        Ok(())
    }

    /// The chat template, or why chat requests cannot be served.
    fn chat_template(&self) -> Result<&ChatTemplate, ModelError> {
        self.template.as_ref().ok_or_else(|| {
            ModelError::Template(format!(
                "model '{}' has no chat template (a base model?): use the completions route, or start the server \
                 with --chat-template chatml (or the path of a Jinja template)",
                self.name
            ))
        })
    }

    /// Renders chat messages with the model's template. With [`ContentTokens::Text`], special-token text inside
    /// the messages' content is masked first (see [`content_text`]), so the result is for [`Self::encode_chat`].
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        content: ContentTokens,
    ) -> Result<String, ModelError> {
        let masked: Vec<Cow<str>> = match content {
            ContentTokens::Parsed => Vec::new(),
            ContentTokens::Text => messages
                .iter()
                .map(|m| self.tokenizer.mask_content(&m.content))
                .collect(),
        };
        // Content without special-token text (nearly all) is rendered as it is, without a copy.
        if !masked.iter().any(|c| matches!(c, Cow::Owned(_))) {
            return self.chat_template()?.render(messages, add_generation_prompt);
        }
        let masked: Vec<ChatMessage> = messages
            .iter()
            .zip(masked)
            .map(|(m, c)| ChatMessage {
                role: m.role.clone(),
                content: c.into_owned(),
            })
            .collect();
        self.chat_template()?.render(&masked, add_generation_prompt)
    }

    /// Tokenizes what [`Self::render_chat`] rendered: with [`ContentTokens::Text`], only the template's markup
    /// becomes control tokens; with [`ContentTokens::Parsed`], every special-token text does.
    pub fn encode_chat(&self, rendered: &str, content: ContentTokens) -> Result<Vec<u32>, ModelError> {
        match content {
            ContentTokens::Text => self.tokenizer.encode_rendered(rendered),
            ContentTokens::Parsed => self.tokenizer.encode(rendered),
        }
    }

    /// Renders and tokenizes a chat prompt; the text is the prompt as the model reads it.
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        content: ContentTokens,
    ) -> Result<(String, Vec<u32>), ModelError> {
        let rendered = self.render_chat(messages, add_generation_prompt, content)?;
        let ids = self.encode_chat(&rendered, content)?;
        Ok((self.tokenizer.unmask(&rendered).into_owned(), ids))
    }
}

/// The forward for `config`'s weights from `src`: the CPU one, or with a device the device-generic one there.
fn load_forward(
    src: &mut dyn source::TensorSource,
    config: LlamaConfig,
    format: WeightFormat,
    on: Option<(&candle_core::Device, device::DeviceInfo)>,
) -> Result<Forward, ModelError> {
    match on {
        None => Llama::load_from(src, config, format).map(Forward::Cpu),
        Some((dev, info)) => device::DeviceLlama::load_from(src, config, format, dev).map(|l| Forward::Device(l, info)),
    }
}

/// The chat template a model's own files give (`source`), if any.
fn file_template(tokenizer: &TextTokenizer, source: Option<String>) -> Result<Option<ChatTemplate>, ModelError> {
    let (bos, eos) = special_texts(tokenizer);
    source.map(|s| ChatTemplate::new(&s, &bos, &eos)).transpose()
}

/// The BOS and EOS token texts a chat template may use.
fn special_texts(tokenizer: &TextTokenizer) -> (String, String) {
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
    (token(tokenizer.bos_id), token(Some(tokenizer.eos_id)))
}

/// How special-token text inside chat message content is tokenized (`--parse-special-in-content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentTokens {
    /// As text: a user cannot close their turn or forge another role's (the default).
    #[default]
    Text,
    /// As control tokens, like the template's own markup (llama.cpp's and vLLM's behaviour).
    Parsed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_read_without_their_backtrace() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("no such device".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(ModelError::Candle(e).to_string(), "no such device");
    }
}
