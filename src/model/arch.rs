//! The model families our forward runs, and their hyper-parameters as read from a GGUF (here) or from a Hugging
//! Face `config.json` (`hf_config`): one description for all of them ([`LlamaConfig`] plus the [`Family`]'s
//! traits), not a copy of the forward per family.
//!
//! What differs between the families, as llama.cpp's converter writes their files and its graphs compute them:
//! - **llama** (and mistral): query and key rows permuted to the interleaved rotary layout (undone at load);
//!   optional sliding window on every layer; optional `rope_freqs` (Llama 3's per-frequency factors).
//! - **qwen2**: query, key and value biases; half-split ("NEOX") rotary layout, as in every family below.
//! - **qwen3**: an RMS norm over each query and key head before the rotation; the head size may differ from
//!   `hidden / heads` (`attention.key_length`).
//! - **gemma3**: q/k norms; norms after attention and after the MLP as well as before (the file's norm weights
//!   already hold Gemma's `1 + w`); a GELU-tanh gated MLP; embeddings scaled by `sqrt(hidden)`; five sliding
//!   window layers (RoPE base 10,000) to each global one (the file's `rope.freq_base`, linear scaling).
//! - **phi3**: one fused `attn_qkv` tensor and one fused `ffn_up` holding the gate's rows, then up's.

use candle_core::quantized::gguf_file;

use super::gguf_meta::Metadata;
use super::kv_cache::KvShape;
use super::ModelError;

/// Longest context accepted from a GGUF: the rotary table built at load holds `context_length x head_dim`
/// f32s (512 MiB at head_dim 128), so a corrupt length must not size it. Million-token models fit.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 20;

/// RoPE base of Gemma 3's sliding-window layers (not in its GGUF; llama.cpp and Hugging Face use this).
pub(crate) const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Gemma 3 interleaves one global layer after every five sliding-window ones.
pub(crate) const GEMMA3_GLOBAL_EVERY: usize = 6;

/// A family of decoder architectures our forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU, Gemma).
    GeluTanh,
}

impl Family {
    /// The family of a GGUF's `general.architecture`.
    pub fn from_arch(arch: &str) -> Option<Self> {
        Some(match arch {
            "llama" | "mistral" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    /// Whether the file's query and key rows are in the interleaved rotary layout (llama.cpp's converter
    /// permutes llama-architecture weights so; the others keep Hugging Face's half-split layout).
    pub fn interleaved_rope(self) -> bool {
        self == Self::Llama
    }

    /// Whether attention and the MLP are followed by norms of their own before the residual add.
    pub fn post_norms(self) -> bool {
        self == Self::Gemma3
    }

    /// Whether query and key come from one fused tensor, and gate and up from another.
    pub fn fused_projections(self) -> bool {
        self == Self::Phi3
    }

    /// Whether each query and key head has an RMS norm before the rotation.
    pub fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }

    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }
}

/// Hyper-parameters read from the GGUF or `config.json`, for every [`Family`].
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub family: Family,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    /// RoPE base of the global layers.
    pub rope_base: f32,
    /// Linear RoPE scaling of the global layers: positions are divided by it (1: none).
    pub rope_scale: f32,
    pub rms_eps: f64,
    pub vocab_size: usize,
    /// Keys a query sees in a sliding-window layer, itself included; `None`: no layer slides.
    pub sliding_window: Option<usize>,
    /// With a window: every `n`th layer is global (Gemma 3: 6); `None`: every layer slides.
    pub global_every: Option<usize>,
    /// Factor on queries before their dot products with keys (`1 / sqrt(head_dim)` but for Gemma 3 27B).
    pub attn_scale: f32,
    /// Factor on the token embeddings (Gemma: `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
}

impl LlamaConfig {
    /// Reads the `<arch>.*` keys of a supported architecture.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ModelError> {
        let md = Metadata(content);
        let arch = md.string("general.architecture")?;
        let family = Family::from_arch(&arch).ok_or_else(|| {
            ModelError::Metadata(format!(
                "unsupported architecture '{arch}': amlserve serves llama, mistral, qwen2, qwen3, gemma3 and \
                 phi3 GGUF models"
            ))
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = md.u32(&key("attention.head_count"))? as usize;
        let hidden = md.u32(&key("embedding_length"))? as usize;
        let head_dim = match md.opt_u32(&key("attention.key_length")) {
            Some(d) => d as usize,
            None if n_head > 0 && hidden.is_multiple_of(n_head) => hidden / n_head,
            None => {
                return Err(ModelError::Metadata(format!(
                    "{arch}.*: embedding_length {hidden} does not split into {n_head} attention heads"
                )))
            }
        };
        if md
            .opt_u32(&key("attention.value_length"))
            .is_some_and(|v| v as usize != head_dim)
        {
            return Err(ModelError::Metadata(format!(
                "{arch}: value heads of another size than key heads are not supported"
            )));
        }
        let n_layer = md.u32(&key("block_count"))? as usize;
        let rope_scale = match md.opt_string(&key("rope.scaling.type")).as_deref() {
            None | Some("none") => 1.0,
            Some("linear") => md.f32(&key("rope.scaling.factor")).unwrap_or(1.0),
            Some(other) => {
                return Err(ModelError::Metadata(format!(
                    "{arch}: rope scaling '{other}' is not supported (linear is)"
                )))
            }
        };
        let sliding_window = md
            .opt_u32(&key("attention.sliding_window"))
            .filter(|&w| w > 0)
            .map(|w| w as usize);
        // Gemma 3 27B scales queries by its hidden size per head, not its head size (as llama.cpp does).
        let query_scale_dim = if family == Family::Gemma3 && n_layer == 62 {
            hidden / n_head.max(1)
        } else {
            head_dim
        };
        let config = Self {
            family,
            n_layer,
            n_head,
            n_kv_head: md
                .opt_u32(&key("attention.head_count_kv"))
                .map_or(n_head, |v| v as usize),
            head_dim,
            hidden,
            context_length: md.u32(&key("context_length"))? as usize,
            rope_base: md.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scale,
            rms_eps: f64::from(md.f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5)),
            vocab_size: md.string_array("tokenizer.ggml.tokens")?.len(),
            sliding_window,
            global_every: (family == Family::Gemma3).then_some(GEMMA3_GLOBAL_EVERY),
            attn_scale: 1.0 / (query_scale_dim.max(1) as f32).sqrt(),
            embed_scale: (family == Family::Gemma3).then(|| (hidden as f32).sqrt()),
        };
        config
            .check()
            .map_err(|m| ModelError::Metadata(format!("{arch}.*: {m}")))?;
        let rope_dim = md.opt_u32(&key("rope.dimension_count")).map(|d| d as usize);
        if rope_dim.is_some_and(|d| d != head_dim) {
            return Err(ModelError::Metadata(
                "partial rotary embeddings are not supported".into(),
            ));
        }
        if content.tensor_infos.contains_key("rope_factors_long.weight") {
            return Err(ModelError::Metadata(format!(
                "{arch}: long-context rotary factors (LongRoPE) are not supported"
            )));
        }
        Ok(config)
    }

    /// What makes these hyper-parameters unusable, if anything: the forward pass and the tables built at
    /// load rely on every one of these.
    pub(crate) fn check(&self) -> Result<(), String> {
        let (heads, kv_heads, hidden) = (self.n_head, self.n_kv_head, self.hidden);
        if heads == 0 || hidden == 0 || self.head_dim == 0 {
            return Err(format!(
                "embedding_length {hidden}, {heads} attention heads of {} values: none may be 0",
                self.head_dim
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "the head size {} is odd: rotary embeddings rotate pairs",
                self.head_dim
            ));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "{heads} attention heads do not share {kv_heads} key/value heads evenly"
            ));
        }
        if self.n_layer == 0 {
            return Err("block_count is 0".into());
        }
        if self.context_length == 0 || self.context_length > MAX_CONTEXT_LENGTH {
            return Err(format!(
                "context_length {} is outside 1..={MAX_CONTEXT_LENGTH}",
                self.context_length
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return Err(format!("rope.freq_base {} is not a positive number", self.rope_base));
        }
        if !(self.rope_scale.is_finite() && self.rope_scale > 0.0) {
            return Err(format!(
                "rope.scaling.factor {} is not a positive number",
                self.rope_scale
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(format!(
                "attention.layer_norm_rms_epsilon {} is not a non-negative number",
                self.rms_eps
            ));
        }
        if self.vocab_size == 0 {
            return Err("the vocabulary is empty".into());
        }
        Ok(())
    }

    /// Fails unless `tokens` (appended at `start`) are a non-empty chunk inside the context, every id inside the
    /// vocabulary: the forwards check this before any kernel runs, since a panic inside candle's thread pool
    /// poisons it.
    pub(crate) fn check_chunk(&self, start: usize, tokens: &[u32]) -> candle_core::Result<()> {
        if tokens.is_empty() || start + tokens.len() > self.context_length {
            candle_core::bail!(
                "chunk of {} tokens at position {start} is empty or past the context",
                tokens.len()
            )
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            candle_core::bail!("token id {bad} is outside the vocabulary")
        }
        Ok(())
    }

    /// The sliding window of layer `layer`, if it slides.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match self.global_every {
            Some(n) if (layer + 1).is_multiple_of(n) => None,
            _ => Some(window),
        }
    }

    /// RoPE base and linear scale of layer `layer` (Gemma 3's sliding layers have their own, unscaled).
    pub fn layer_rope(&self, layer: usize) -> (f32, f32) {
        if self.family == Family::Gemma3 && self.layer_window(layer).is_some() {
            (GEMMA3_LOCAL_ROPE_BASE, 1.0)
        } else {
            (self.rope_base, self.rope_scale)
        }
    }

    /// Shape of the per-token KV entries.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layer: self.n_layer,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }

    /// Width of the query projection.
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the key (and of the value) projection.
    pub fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}
