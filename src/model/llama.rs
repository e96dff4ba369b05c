//! Batched decoder forward pass over packed sequences, for every [`super::arch::Family`].
//!
//! One call runs every scheduled token of every sequence together: the tokens are packed into one
//! `[tokens, hidden]` matrix so each weight matrix is multiplied once per step, rotary embeddings use each
//! token's own position, and attention runs per sequence against that sequence's own [`SeqKv`], so no
//! sequence can see another's keys. Only the rows whose logits are wanted reach the (large) output projection.
//! Knows nothing of scheduling, sampling or async code.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::activation;
pub use super::arch::LlamaConfig;
use super::attention::{self, AttnShape, AttnTask};
use super::block::{check_shapes, Block};
use super::embed_table::EmbedTable;
use super::kv_cache::SeqKv;
use super::rope::RopeTable;
use super::source::{GgufSource, TensorSource};
use super::weights::{Linear, WeightFormat};
use super::ModelError;

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
    embed: EmbedTable,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    /// Rotary tables, and which one each layer uses (Gemma 3's sliding and global layers differ).
    ropes: Vec<RopeTable>,
    layer_rope: Vec<usize>,
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
        let interleaved_rope = config.family.interleaved_rope();
        let mut source = GgufSource {
            content,
            reader,
            interleaved_rope,
        };
        Self::load_from(&mut source, config, format)
    }

    /// Loads the weights `config` describes from `src` (a GGUF, a Hugging Face folder), tensors named as in GGUF.
    pub(crate) fn load_from(
        src: &mut dyn TensorSource,
        config: LlamaConfig,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        check_shapes(&*src, &config)?;
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let block = Block::load(src, &config, i, format)?;
            weight_bytes += block.bytes();
            layers.push(block);
        }
        let embed_q = src.tensor("token_embd.weight", format)?;
        let embed = EmbedTable::new(&embed_q)?;
        let lm_head = match src.contains("output.weight") {
            true => Linear::new(src.tensor("output.weight", format)?, format)?,
            false => Linear::new(embed_q, format)?, // tied embeddings
        };
        weight_bytes += lm_head.bytes() + embed.bytes();
        let norm = src.f32("output_norm.weight")?;
        let (ropes, layer_rope) = RopeTable::for_model(src, &config)?;
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            layer_rope,
            weight_bytes,
        })
    }

    /// Runs one step over `chunks` and returns logits `[n, vocab]`, one row per chunk with `want_logits`, in
    /// chunk order.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> candle_core::Result<Tensor> {
        let n = chunks.iter().filter(|c| c.want_logits).count();
        let mut out = vec![0f32; n * self.config.vocab_size];
        self.forward_into(chunks, &mut out)?;
        Tensor::from_vec(out, (n, self.config.vocab_size), &Device::Cpu)
    }

    /// [`Self::forward`] writing the logits rows into `out` (`[n * vocab]`, every value overwritten), so the
    /// caller can keep one buffer for every step. Positions and token ids must have been validated by the
    /// caller (in range of the context and vocabulary), since a panic inside candle's thread pool poisons it.
    pub fn forward_into(&self, chunks: &mut [SeqChunk<'_>], out: &mut [f32]) -> candle_core::Result<()> {
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
        let (q_row, kv_row) = (cfg.q_width(), cfg.kv_width());
        let eps = cfg.rms_eps as f32;

        let mut x = self.embed.rows(&ids)?;
        if let Some(scale) = cfg.embed_scale {
            x = x.affine(f64::from(scale), 0.0)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let rope = &self.ropes[self.layer_rope[li]];
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            // q, k, v side by side per token: biased, head-normed, q scaled, q and k rotated to the token's position.
            let mut qkv = layer.qkv.forward_rows(&h)?;
            let width = q_row + 2 * kv_row;
            let (mut q, mut k, mut v) = (
                Vec::with_capacity(n_tok * q_row),
                Vec::with_capacity(n_tok * kv_row),
                Vec::with_capacity(n_tok * kv_row),
            );
            for (row, &p) in qkv.chunks_exact_mut(width).zip(&positions) {
                if let Some(bias) = &layer.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
                let (qr, rest) = row.split_at_mut(q_row);
                let (kr, vr) = rest.split_at_mut(kv_row);
                if let Some((qn, kn)) = &layer.qk_norm {
                    head_rms_norm(qr, qn, eps);
                    head_rms_norm(kr, kn, eps);
                }
                let (q0, k0) = (q.len(), k.len());
                q.extend(qr.iter().map(|x| x * cfg.attn_scale));
                k.extend_from_slice(kr);
                v.extend_from_slice(vr);
                rope.rotate(&mut q[q0..], p as usize);
                rope.rotate(&mut k[k0..], p as usize);
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
            let shape = AttnShape {
                n_head: cfg.n_head,
                n_kv_head: cfg.n_kv_head,
                head_dim: cfg.head_dim,
                window: cfg.layer_window(li),
            };
            let y = Tensor::from_vec(attention::attend(&tasks, shape), (n_tok, q_row), &dev)?;
            x = (x + post_norm(layer.wo.forward(&y)?, layer.post_attn_norm.as_ref(), eps)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.forward_rows(&h)?;
            let act = activation::gated(&gate_up, layer.ffn_width, cfg.family.activation());
            let act = Tensor::from_vec(act, (n_tok, layer.ffn_width), &dev)?;
            x = (x + post_norm(layer.w_down.forward(&act)?, layer.post_ffn_norm.as_ref(), eps)?)?;
        }
        for c in chunks.iter_mut() {
            c.kv.advance(c.tokens.len());
        }
        if out.len() != logit_rows.len() * cfg.vocab_size {
            candle_core::bail!("{} logits rows do not fit a buffer of {}", logit_rows.len(), out.len())
        }
        if logit_rows.is_empty() {
            return Ok(());
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &dev)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        self.lm_head.forward_into(&last, out)
    }
}

/// `y` through the norm `w` when there is one (Gemma's norms after attention and the MLP).
fn post_norm(y: Tensor, w: Option<&Tensor>, eps: f32) -> candle_core::Result<Tensor> {
    match w {
        Some(w) => candle_nn::ops::rms_norm(&y, w, eps),
        None => Ok(y),
    }
}

/// RMS-normalises each head (`w.len()` values) of `row` in place and scales it by `w`.
fn head_rms_norm(row: &mut [f32], w: &[f32], eps: f32) {
    for head in row.chunks_exact_mut(w.len()) {
        let mean = head.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        head.iter_mut().zip(w).for_each(|(x, w)| *x *= inv * w);
    }
}
