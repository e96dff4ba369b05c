//! The batched llama forward on a candle `Device`: weights uploaded once, activations on the device, keys and
//! values in the paged pool ([`super::paged`]), attention by [`super::ops::PagedAttention`].
//!
//! One step packs every scheduled token of every sequence into one `[tokens, hidden]` matrix, as the CPU
//! forward does: each projection is one quantized matmul per step, each token is rotated to its own position
//! and attends only to its own sequence's blocks, and only the rows whose logits are wanted reach the output
//! projection. A row's result does not depend on the other rows of the step (the matmul kernels and attention
//! work per row), so batching does not change outputs.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use super::ops::{AddRmsNorm, Heads, PagedAttention, Rope, StepMeta, StoreKv, SwiGlu};
use super::paged::{KvPool, PagedKv};
use super::stages::StageTimes;
use crate::model::arch::{Family, LlamaConfig};
use crate::model::block::check_shapes;
use crate::model::weights::{self, WeightFormat};
use crate::model::ModelError;

/// Projections of the same input multiplied together: one matrix when their weights share a type (rows
/// stacked), else one each, their outputs side by side.
enum Projection {
    Fused(QMatMul),
    Parts(Vec<QMatMul>),
}

impl Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Fused(m) => m.forward(x),
            Self::Parts(ms) => Tensor::cat(
                &ms.iter()
                    .map(|m| m.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?,
                1,
            ),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Projection,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate_up: Projection,
    ffn_width: usize,
    down: QMatMul,
}

/// The tokens one sequence contributes to a step.
pub struct DeviceChunk<'a> {
    /// The sequence's cache; the chunk's tokens are appended to it.
    pub kv: &'a mut PagedKv,
    /// Token ids, at positions `kv.len()..kv.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// Whether to return logits for the chunk's last token.
    pub want_logits: bool,
}

/// A llama model on a device.
pub struct DeviceLlama {
    pub config: LlamaConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    /// `[context, head_dim]`: each position's cosines, then its sines.
    rope: Tensor,
    /// Bytes held by weights on the device.
    pub weight_bytes: usize,
    /// Time per stage of the forward, when switched on (benchmarks).
    pub stages: StageTimes,
    /// Where logits are copied to on the host (CUDA).
    #[cfg(feature = "cuda")]
    pinned: super::cuda::PinnedLogits,
}

impl std::fmt::Debug for DeviceLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLlama")
            .field("device", &self.device.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Loads the projections `names` (q/k rows permuted to the half-split rotary layout where flagged) onto `device`.
fn load_projection<R: std::io::Read + std::io::Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    names: &[(&str, bool)],
    head_dim: usize,
    format: WeightFormat,
    device: &Device,
) -> Result<(Projection, Vec<usize>, usize), ModelError> {
    let mut parts = Vec::with_capacity(names.len());
    for &(name, rope) in names {
        let mut t = content.tensor(reader, name, &Device::Cpu)?;
        if rope {
            t = weights::unpermute_rope_rows(t, head_dim)?;
        }
        parts.push(t);
    }
    let widths = parts
        .iter()
        .map(|p| p.shape().dims2().map(|d| d.0))
        .collect::<Result<Vec<_>, _>>()?;
    let (proj, bytes) = match weights::concat_rows(&parts)? {
        Some(all) => {
            let m = weights::to_device_matmul(all, format, device)?;
            let bytes = weights::matmul_bytes(&m);
            (Projection::Fused(m), bytes)
        }
        None => {
            let ms = parts
                .into_iter()
                .map(|p| weights::to_device_matmul(p, format, device))
                .collect::<Result<Vec<_>, _>>()?;
            let bytes = ms.iter().map(weights::matmul_bytes).sum();
            (Projection::Parts(ms), bytes)
        }
    };
    Ok((proj, widths, bytes))
}

/// The rotary table `[positions, head_dim]` (cosines, then sines), computed as the CPU forward computes it.
fn rope_table(cfg: &LlamaConfig, device: &Device) -> candle_core::Result<Tensor> {
    let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let mut t = Vec::with_capacity(cfg.context_length * hd);
    for p in 0..cfg.context_length {
        t.extend(inv.iter().map(|f| (p as f32 * f).cos()));
        t.extend(inv.iter().map(|f| (p as f32 * f).sin()));
    }
    Tensor::from_vec(t, (cfg.context_length, hd), device)
}

impl DeviceLlama {
    /// Loads the weights from an open GGUF onto `device`.
    pub fn load<R: std::io::Read + std::io::Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(content)?;
        let plain_llama = config.family == Family::Llama
            && config.sliding_window.is_none()
            && config.rope_scale == 1.0
            && !content.tensor_infos.contains_key("rope_freqs.weight")
            && !content.tensor_infos.contains_key("blk.0.attn_q.bias");
        if !plain_llama {
            return Err(ModelError::DeviceUnsupported(format!(
                "the device forward runs llama-architecture models without sliding windows, rope scaling or biases \
                 so far; serve this {:?} model with --device cpu",
                config.family
            )));
        }
        check_shapes(content, &config)?;
        let hd = config.head_dim;
        let f32_on = |name: &str, reader: &mut R| -> Result<Tensor, ModelError> {
            Ok(weights::load_f32(content, reader, name)?.to_device(device)?)
        };
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            let (q, k, v) = (
                format!("{p}.attn_q.weight"),
                format!("{p}.attn_k.weight"),
                format!("{p}.attn_v.weight"),
            );
            let (qkv, _, b1) = load_projection(
                content,
                reader,
                &[(&q, true), (&k, true), (&v, false)],
                hd,
                format,
                device,
            )?;
            let (gate, up) = (format!("{p}.ffn_gate.weight"), format!("{p}.ffn_up.weight"));
            let (gate_up, widths, b2) =
                load_projection(content, reader, &[(&gate, false), (&up, false)], hd, format, device)?;
            let matmul = |name: String, reader: &mut R| -> Result<QMatMul, ModelError> {
                weights::to_device_matmul(content.tensor(reader, &name, &Device::Cpu)?, format, device)
            };
            let wo = matmul(format!("{p}.attn_output.weight"), reader)?;
            let down = matmul(format!("{p}.ffn_down.weight"), reader)?;
            weight_bytes += b1 + b2 + weights::matmul_bytes(&wo) + weights::matmul_bytes(&down);
            layers.push(Layer {
                attn_norm: f32_on(&format!("{p}.attn_norm.weight"), reader)?,
                qkv,
                wo,
                ffn_norm: f32_on(&format!("{p}.ffn_norm.weight"), reader)?,
                gate_up,
                ffn_width: widths[0],
                down,
            });
        }
        let embed_q = content.tensor(reader, "token_embd.weight", &Device::Cpu)?;
        let embed = embed_q.dequantize(&Device::Cpu)?.to_device(device)?;
        let lm_head = match content.tensor(reader, "output.weight", &Device::Cpu) {
            Ok(t) => weights::to_device_matmul(t, format, device)?,
            Err(_) => weights::to_device_matmul(embed_q, format, device)?, // tied embeddings
        };
        weight_bytes += weights::matmul_bytes(&lm_head) + embed.elem_count() * 4;
        let norm = f32_on("output_norm.weight", reader)?;
        let rope = rope_table(&config, device)?;
        // The engine thread computes on its own stream: let every upload finish first.
        device.synchronize()?;
        Ok(Self {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
            weight_bytes,
            stages: StageTimes::default(),
            #[cfg(feature = "cuda")]
            pinned: Default::default(),
        })
    }

    /// Logits `[n, vocab]` from [`Self::forward`] copied into `out` (`[n * vocab]`; through a page-locked
    /// buffer on CUDA).
    pub fn rows_to_host(&self, logits: &Tensor, out: &mut [f32]) -> candle_core::Result<()> {
        if logits.dim(0)? == 0 {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if super::cuda::rows_to_host(logits, &self.pinned, out)? {
            return Ok(());
        }
        crate::model::weights::copy_to_slice(logits, out)
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The type the KV pool stores.
    pub fn kv_dtype(&self) -> DType {
        DType::BF16
    }

    /// A KV pool for this model holding at least `bytes` of cache.
    pub fn new_pool(&self, bytes: usize) -> candle_core::Result<Arc<KvPool>> {
        let shape = self.config.kv_shape();
        let per_block = KvPool::bytes_per_token(shape, self.kv_dtype()) * super::paged::BLOCK;
        let pool = KvPool::new(shape, self.kv_dtype(), bytes.div_ceil(per_block.max(1)), &self.device)?;
        self.device.synchronize()?;
        Ok(pool)
    }

    fn heads(&self) -> Heads {
        Heads {
            n_head: self.config.n_head,
            n_kv_head: self.config.n_kv_head,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step over `chunks` and returns logits `[n, vocab]` (f32, on the device), one row per chunk with
    /// `want_logits`, in chunk order. Every chunk's cache must come from `pool`.
    pub fn forward(&self, chunks: &mut [DeviceChunk<'_>], pool: &KvPool) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut seq_of = Vec::new();
        let mut logit_rows = Vec::new();
        for (s, c) in chunks.iter_mut().enumerate() {
            let start = c.kv.len();
            cfg.check_chunk(start, c.tokens)?;
            slots.extend(c.kv.prepare(c.tokens.len())?);
            ids.extend_from_slice(c.tokens);
            positions.extend((start..start + c.tokens.len()).map(|p| p as u32));
            seq_of.extend(std::iter::repeat_n(s, c.tokens.len()));
            if c.want_logits {
                logit_rows.push((ids.len() - 1) as u32);
            }
        }
        let tables: Vec<&[u32]> = chunks.iter().map(|c| c.kv.blocks()).collect();
        let meta = StepMeta::build(&positions, &slots, &seq_of, &tables);
        let n_tok = ids.len();
        let dev = &self.device;
        let meta_t = Tensor::from_vec(meta, (n_tok * 3 + tables.iter().map(|t| t.len()).sum::<usize>(),), dev)?;
        let step = StepMeta { tokens: n_tok };
        let heads = self.heads();
        let eps = cfg.rms_eps as f32;
        let q_scale = 1.0 / (cfg.head_dim as f32).sqrt();

        let mut clock = self.stages.clock(dev)?;
        let mut x = self.embed.index_select(&Tensor::from_vec(ids, n_tok, dev)?, 0)?;
        clock.mark("embed")?;
        let Some(first) = self.layers.first() else {
            candle_core::bail!("a model without layers")
        };
        let mut h = candle_nn::ops::rms_norm(&x, &first.attn_norm, eps)?;
        clock.mark("attn norm")?;
        let add_norm = AddRmsNorm { eps };
        for (li, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&h)?.contiguous()?;
            clock.mark("qkv matmul")?;
            qkv.inplace_op3(
                &meta_t,
                &self.rope,
                &Rope {
                    meta: step,
                    heads,
                    q_scale,
                },
            )?;
            clock.mark("rope")?;
            let cache = pool.layer(li);
            cache.inplace_op3(&qkv, &meta_t, &StoreKv { meta: step, heads })?;
            clock.mark("kv store")?;
            let y = qkv.apply_op3_no_bwd(cache, &meta_t, &PagedAttention { meta: step, heads })?;
            clock.mark("attention")?;
            let o = layer.wo.forward(&y)?;
            clock.mark("out matmul")?;
            let (residual, normed) = AddRmsNorm::split(&x.apply_op3_no_bwd(&o, &layer.ffn_norm, &add_norm)?)?;
            (x, h) = (residual, normed);
            clock.mark("add + ffn norm")?;
            let gu = layer.gate_up.forward(&h)?;
            clock.mark("gate/up matmul")?;
            let act = gu.contiguous()?.apply_op1_no_bwd(&SwiGlu { width: layer.ffn_width })?;
            clock.mark("swiglu")?;
            let d = layer.down.forward(&act)?;
            clock.mark("down matmul")?;
            // The residual add fused with the next layer's attention norm; after the last layer, a plain add
            // (the output norm reads only the rows whose logits are wanted).
            match self.layers.get(li + 1) {
                Some(next) => {
                    let (residual, normed) = AddRmsNorm::split(&x.apply_op3_no_bwd(&d, &next.attn_norm, &add_norm)?)?;
                    (x, h) = (residual, normed);
                }
                None => x = (x + d)?,
            }
            clock.mark("add + attn norm")?;
        }
        for c in chunks.iter_mut() {
            c.kv.advance(c.tokens.len());
        }
        let n_rows = logit_rows.len();
        if n_rows == 0 {
            return Tensor::zeros((0, cfg.vocab_size), DType::F32, dev);
        }
        let last = x.index_select(&Tensor::from_vec(logit_rows, n_rows, dev)?, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self.lm_head.forward(&last)?.to_dtype(DType::F32)?;
        clock.mark("output")?;
        Ok(logits)
    }
}
