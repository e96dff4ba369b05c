//! Batched llama-family forward pass over packed sequences.
//!
//! One call runs every scheduled token of every sequence together: the tokens are packed into one
//! `[tokens, hidden]` matrix so each weight matrix is multiplied once per step, rotary embeddings use each
//! token's own position, and attention runs per sequence against that sequence's own [`SeqKv`], so no
//! sequence can see another's keys. Only the rows whose logits are wanted reach the (large) output projection.
//! Knows nothing of scheduling, sampling or async code.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::activation;
use super::attention::{self, AttnShape, AttnTask};
use super::gguf_meta::Metadata;
use super::kv_cache::{KvShape, SeqKv};
use super::rope::RopeTable;
use super::weights::{self, FusedLinear, Linear, WeightFormat};
use super::ModelError;

/// Longest context accepted from a GGUF: the rotary table built at load holds `context_length x head_dim`
/// f32s (512 MiB at head_dim 128), so a corrupt length must not size it. Million-token models fit.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 20;

/// Tensors each transformer block needs (norms, q, k, v, output, gate, up, down).
const TENSORS_PER_LAYER: usize = 9;

/// Hyper-parameters read from the GGUF.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads the `llama.*` keys (or `<arch>.*` for llama-compatible architectures).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ModelError> {
        let md = Metadata(content);
        let arch = md.string("general.architecture")?;
        if !matches!(arch.as_str(), "llama" | "mistral" | "granite") {
            return Err(ModelError::Metadata(format!(
                "unsupported architecture '{arch}': amlserve serves llama-family GGUF models"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_head = md.u32(&key("attention.head_count"))? as usize;
        let hidden = md.u32(&key("embedding_length"))? as usize;
        let head_dim = hidden / n_head.max(1);
        let config = Self {
            n_layer: md.u32(&key("block_count"))? as usize,
            n_head,
            n_kv_head: md
                .opt_u32(&key("attention.head_count_kv"))
                .map_or(n_head, |v| v as usize),
            head_dim,
            hidden,
            context_length: md.u32(&key("context_length"))? as usize,
            rope_base: md.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: f64::from(md.f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5)),
            vocab_size: md.string_array("tokenizer.ggml.tokens")?.len(),
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
        Ok(config)
    }

    /// What makes these hyper-parameters unusable, if anything: the forward pass and the tables built at
    /// load rely on every one of these.
    fn check(&self) -> Result<(), String> {
        let (heads, kv_heads, hidden) = (self.n_head, self.n_kv_head, self.hidden);
        if heads == 0 || hidden == 0 || !hidden.is_multiple_of(heads) {
            return Err(format!(
                "embedding_length {hidden} does not split into {heads} attention heads"
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

    /// Shape of the per-token KV entries.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layer: self.n_layer,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Query, key and value projections.
    qkv: FusedLinear,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections (fused: the gate's rows, then up's).
    gate_up: FusedLinear,
    /// Width of each of gate and up.
    ffn_width: usize,
    w_down: Linear,
}

/// Fails unless tensor `name` is in the file with shape `dims` (candle's order: rows, then columns).
fn expect_shape(content: &gguf_file::Content, name: &str, dims: &[usize]) -> Result<(), ModelError> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| ModelError::Metadata(format!("the GGUF has no tensor '{name}'")))?;
    if info.shape.dims() != dims {
        return Err(ModelError::Metadata(format!(
            "tensor '{name}' has shape {:?}, the hyper-parameters need {dims:?}",
            info.shape.dims()
        )));
    }
    Ok(())
}

/// Checks every weight's shape against the hyper-parameters before any is read, so a file whose tensors
/// disagree with its metadata fails at load with the tensor named, not inside a matmul at the first request.
pub(crate) fn check_shapes(content: &gguf_file::Content, cfg: &LlamaConfig) -> Result<(), ModelError> {
    let tensors = content.tensor_infos.len();
    if cfg.n_layer > tensors / TENSORS_PER_LAYER {
        return Err(ModelError::Metadata(format!(
            "block_count {} needs {TENSORS_PER_LAYER} tensors per block; the file has {tensors} tensors",
            cfg.n_layer
        )));
    }
    let (hidden, vocab) = (cfg.hidden, cfg.vocab_size);
    let (q_rows, kv_rows) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
    expect_shape(content, "token_embd.weight", &[vocab, hidden])?;
    if content.tensor_infos.contains_key("output.weight") {
        expect_shape(content, "output.weight", &[vocab, hidden])?;
    }
    expect_shape(content, "output_norm.weight", &[hidden])?;
    for i in 0..cfg.n_layer {
        let t = |name: &str| format!("blk.{i}.{name}.weight");
        for norm in ["attn_norm", "ffn_norm"] {
            expect_shape(content, &t(norm), &[hidden])?;
        }
        expect_shape(content, &t("attn_q"), &[q_rows, hidden])?;
        expect_shape(content, &t("attn_k"), &[kv_rows, hidden])?;
        expect_shape(content, &t("attn_v"), &[kv_rows, hidden])?;
        expect_shape(content, &t("attn_output"), &[hidden, q_rows])?;
        let ffn = content
            .tensor_infos
            .get(&t("ffn_gate"))
            .and_then(|info| info.shape.dims().first().copied())
            .filter(|&w| w > 0)
            .ok_or_else(|| ModelError::Metadata(format!("tensor '{}' is missing or empty", t("ffn_gate"))))?;
        expect_shape(content, &t("ffn_gate"), &[ffn, hidden])?;
        expect_shape(content, &t("ffn_up"), &[ffn, hidden])?;
        expect_shape(content, &t("ffn_down"), &[hidden, ffn])?;
    }
    Ok(())
}

/// The tokens one sequence contributes to a step.
pub struct SeqChunk<'a> {
    /// The sequence's cache; the chunk's tokens are appended to it.
    pub kv: &'a mut SeqKv,
    /// Token ids, at positions `kv.len()..kv.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// Whether to return logits for the chunk's last token.
    pub want_logits: bool,
}

/// A loaded llama model.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
    /// Bytes held by weights.
    pub weight_bytes: usize,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Loads the weights from an open GGUF.
    pub fn load<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(content)?;
        check_shapes(content, &config)?;
        let hd = config.head_dim;
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            let (q, k, v) = (
                format!("{p}.attn_q.weight"),
                format!("{p}.attn_k.weight"),
                format!("{p}.attn_v.weight"),
            );
            let qkv = FusedLinear::load(content, reader, &[(&q, true), (&k, true), (&v, false)], hd, format)?;
            let (gate, up) = (format!("{p}.ffn_gate.weight"), format!("{p}.ffn_up.weight"));
            let gate_up = FusedLinear::load(content, reader, &[(&gate, false), (&up, false)], hd, format)?;
            let ffn_width = gate_up.widths()[0];
            let wo = weights::load_linear(content, reader, &format!("{p}.attn_output.weight"), format)?;
            let w_down = weights::load_linear(content, reader, &format!("{p}.ffn_down.weight"), format)?;
            weight_bytes += qkv.bytes() + gate_up.bytes() + wo.bytes() + w_down.bytes();
            layers.push(Layer {
                qkv,
                wo,
                gate_up,
                ffn_width,
                w_down,
                attn_norm: weights::load_f32(content, reader, &format!("{p}.attn_norm.weight"))?,
                ffn_norm: weights::load_f32(content, reader, &format!("{p}.ffn_norm.weight"))?,
            });
        }
        let embed_q = content.tensor(reader, "token_embd.weight", &Device::Cpu)?;
        let embed = embed_q.dequantize(&Device::Cpu)?;
        let lm_head = match content.tensor(reader, "output.weight", &Device::Cpu) {
            Ok(t) => Linear::new(t, format)?,
            Err(_) => Linear::new(embed_q, format)?, // tied embeddings
        };
        weight_bytes += lm_head.bytes() + embed.elem_count() * 4;
        let norm = weights::load_f32(content, reader, "output_norm.weight")?;
        let rope = RopeTable::new(config.head_dim, config.context_length, config.rope_base);
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            weight_bytes,
        })
    }

    /// Runs one step over `chunks` and returns logits `[n, vocab]`, one row per chunk with `want_logits`, in
    /// chunk order. Positions and token ids must have been validated by the caller (in range of the context
    /// and vocabulary), since a panic inside candle's thread pool poisons it.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut starts = Vec::with_capacity(chunks.len());
        let mut logit_rows = Vec::new();
        for c in chunks.iter_mut() {
            let start = c.kv.len();
            cfg.check_chunk(start, c.tokens)?;
            c.kv.reserve(c.tokens.len()).map_err(candle_core::Error::wrap)?;
            starts.push(start);
            ids.extend_from_slice(c.tokens);
            positions.extend((start..start + c.tokens.len()).map(|p| p as u32));
            if c.want_logits {
                logit_rows.push((ids.len() - 1) as u32);
            }
        }
        let n_tok = ids.len();
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, n_tok, &dev)?;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let shape = AttnShape {
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        };
        let q_row = cfg.n_head * cfg.head_dim;
        let kv_row = cfg.n_kv_head * cfg.head_dim;

        let mut x = self.embed.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            // q, k, v side by side per token; rotate q and k to each token's position, scale q.
            let qkv = layer.qkv.forward_rows(&h)?;
            let width = q_row + 2 * kv_row;
            let (mut q, mut k, mut v) = (
                Vec::with_capacity(n_tok * q_row),
                Vec::with_capacity(n_tok * kv_row),
                Vec::with_capacity(n_tok * kv_row),
            );
            for (row, &p) in qkv.chunks_exact(width).zip(&positions) {
                let (qr, rest) = row.split_at(q_row);
                let (kr, vr) = rest.split_at(kv_row);
                let (q0, k0) = (q.len(), k.len());
                q.extend(qr.iter().map(|x| x * scale));
                k.extend_from_slice(kr);
                v.extend_from_slice(vr);
                self.rope.rotate(&mut q[q0..], p as usize);
                self.rope.rotate(&mut k[k0..], p as usize);
            }
            let mut off = 0;
            for c in chunks.iter_mut() {
                let t = c.tokens.len();
                c.kv.append(
                    li,
                    &k[off * kv_row..(off + t) * kv_row],
                    &v[off * kv_row..(off + t) * kv_row],
                );
                off += t;
            }
            let mut off = 0;
            let tasks: Vec<AttnTask<'_>> = chunks
                .iter()
                .zip(&starts)
                .map(|(c, &start)| {
                    let t = c.tokens.len();
                    let task = AttnTask {
                        q: &q[off * q_row..(off + t) * q_row],
                        t,
                        start,
                        kv: c.kv.layer(li, start + t),
                    };
                    off += t;
                    task
                })
                .collect();
            let y = Tensor::from_vec(attention::attend(&tasks, shape), (n_tok, q_row), &dev)?;
            x = (x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let act = activation::swiglu(&layer.gate_up.forward_rows(&h)?, layer.ffn_width);
            let act = Tensor::from_vec(act, (n_tok, layer.ffn_width), &dev)?;
            x = (x + layer.w_down.forward(&act)?)?;
        }
        for c in chunks.iter_mut() {
            c.kv.advance(c.tokens.len());
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &dev)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_eps as f32)?;
        self.lm_head.forward(&last)?.to_dtype(DType::F32)
    }
}
