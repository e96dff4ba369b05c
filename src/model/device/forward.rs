//! The batched decoder forward on a candle `Device`, for every [`Family`] the CPU forward runs: weights uploaded
//! once, activations on the device, keys and values in the paged pool ([`super::paged`]), attention by
//! [`super::ops::PagedAttention`].
//!
//! The family's differences: q/k/v biases (qwen2) and per-head q/k norms (qwen3, gemma3) are ops of ours
//! ([`super::ops::AddBias`], [`super::ops::HeadNorms`]) as is the gated activation (SiLU, or Gemma's GELU);
//! norms after attention and the MLP and scaled embeddings (gemma3) and fused projections (phi3) are candle's;
//! sliding windows are the attention op's, and each layer rotates with its own table (Gemma 3's local and
//! global layers; Llama 3's frequency factors and linear scaling included). Every op reads contiguous tensors
//! (what CUDA graphs need, see [`DeviceLlama::enable_decode_graphs`]).
//!
//! One step packs every scheduled token of every sequence into one `[tokens, hidden]` matrix, as the CPU
//! forward does: each projection is one quantized matmul per step, each token is rotated to its own position
//! and attends only to its own sequence's blocks, and only the rows whose logits are wanted reach the output
//! projection. A row's result does not depend on the other rows of the step (the matmul kernels and attention
//! work per row), so batching does not change outputs.

use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::launch;
use super::ops::{
    AddBias, AddRmsNorm, GatedAct, HeadNorms, Heads, PagedAttention, Q8Rows, Rotary, RowArgmax, StepMeta, StoreKv,
};
use super::paged::{KvPool, PagedKv};
use super::stages::StageTimes;
use crate::model::arch::{Activation, LlamaConfig};
use crate::model::block::{check_shapes, BlockTensors};
use crate::model::rope::RopeTable;
use crate::model::source::{GgufSource, TensorSource};
use crate::model::weights::{self, WeightFormat};
use crate::model::ModelError;

/// Projections of the same input multiplied together: one matrix when their weights share a type (rows
/// stacked), else one each, their outputs side by side.
enum Projection {
    Fused(QMatMul),
    Parts(Vec<QMatMul>),
}

impl Projection {
    /// `x` through the projection, each matrix multiplied by `matmul`.
    fn apply(
        &self,
        x: &Tensor,
        matmul: impl Fn(&QMatMul, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Fused(m) => matmul(m, x),
            Self::Parts(ms) => Tensor::cat(
                &ms.iter()
                    .map(|m| matmul(m, x))
                    .collect::<candle_core::Result<Vec<_>>>()?,
                1,
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, project)
    }
}

/// `x` times the weights of `m`: by [`Q8Rows`] where it takes them ([`q8_rows`]), else by candle.
fn project(m: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    match q8_rows(m, x, None) {
        Some(op) => x.apply_op1_no_bwd(&op),
        None => m.forward(x),
    }
}

/// The MLP's down projection `m` of `act(gate) * up`, `gate_up` holding each row's gate then up projection: in one
/// [`Q8Rows`] where it takes them, else [`GatedAct`] then [`project`].
fn gated_down(m: &QMatMul, gate_up: &Tensor, act: Activation, width: usize) -> candle_core::Result<Tensor> {
    match q8_rows(m, gate_up, Some(act)) {
        Some(op) => gate_up.apply_op1_no_bwd(&op),
        None => project(m, &gate_up.contiguous()?.apply_op1_no_bwd(&GatedAct { width, act })?),
    }
}

/// [`Q8Rows`] for `x` times `m` (with `gate`, `act(gate) * up` of `x`'s two halves) where it takes them: Q8_0
/// weights on `x`'s device, f32 activations, a step of a few rows, 16 bytes aligned ([`launch::q8_rows_fit`]),
/// unless switched off ([`launch::kernels`]).
fn q8_rows(m: &QMatMul, x: &Tensor, gate: Option<Activation>) -> Option<Q8Rows> {
    let QMatMul::QTensor(w) = m else { return None };
    let (rows, cols) = x.dims2().ok()?;
    let (offset, _) = x.layout().contiguous_offsets()?;
    let (_, k) = w.shape().dims2().ok()?;
    let width = if gate.is_some() { 2 * k } else { k };
    let fits = w.dtype() == GgmlDType::Q8_0
        && x.dtype() == DType::F32
        && w.device().same_device(x.device())
        && cols == width
        && launch::kernels().q8_rows
        && launch::q8_rows_fit(rows, k, offset, gate.is_some());
    fits.then(|| Q8Rows {
        weight: w.clone(),
        gate,
    })
}

struct Layer {
    attn_norm: Tensor,
    qkv: Projection,
    /// `[q + 2 kv]`, added to every row (qwen2).
    qkv_bias: Option<Tensor>,
    /// Per-head RMS norm weights of queries and keys, `[head_dim]` each (qwen3, gemma3).
    qk_norm: Option<(Tensor, Tensor)>,
    wo: QMatMul,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate_up: Projection,
    ffn_width: usize,
    down: QMatMul,
    post_ffn_norm: Option<Tensor>,
    /// Index of the layer's rotary table.
    rope: usize,
    window: Option<usize>,
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

impl<'a> DeviceChunk<'a> {
    /// A chunk per cache, `tokens[i]` appended to `kvs[i]`, every chunk's logits wanted.
    pub fn each_wanted<T: AsRef<[u32]>>(kvs: &'a mut [PagedKv], tokens: &'a [T]) -> Vec<Self> {
        kvs.iter_mut()
            .zip(tokens)
            .map(|(kv, t)| DeviceChunk {
                kv,
                tokens: t.as_ref(),
                want_logits: true,
            })
            .collect()
    }
}

/// A decoder model on a device.
pub struct DeviceLlama {
    pub config: LlamaConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    /// Rotary tables `[context, head_dim]` (each position's cosines, then its sines), one per distinct
    /// (base, scale) among the layers.
    ropes: Vec<Tensor>,
    /// Bytes held by weights on the device.
    pub weight_bytes: usize,
    /// Time per stage of the forward, when switched on (benchmarks).
    pub stages: StageTimes,
    /// Where logits are copied to on the host (CUDA).
    #[cfg(feature = "cuda")]
    pinned: super::cuda::PinnedLogits,
    /// Decode steps replayed as CUDA graphs, once switched on.
    #[cfg(feature = "cuda")]
    graphs: std::sync::OnceLock<Box<super::graphs::DecodeGraphs>>,
}

impl std::fmt::Debug for DeviceLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLlama")
            .field("device", &self.device.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Uploads projections of the same input as one matrix when their types allow stacking their rows, else one
/// each; gives the projection and the bytes it holds.
fn upload_projection(
    parts: Vec<QTensor>,
    format: WeightFormat,
    device: &Device,
) -> Result<(Projection, usize), ModelError> {
    Ok(match weights::concat_rows(&parts)? {
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
    })
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
        let mut source = GgufSource {
            content,
            reader,
            interleaved_rope: config.family.interleaved_rope(),
        };
        Self::load_from(&mut source, config, format, device)
    }

    /// Loads the weights `config` describes from `src` (a GGUF, a Hugging Face folder) onto `device`.
    pub(crate) fn load_from(
        src: &mut dyn TensorSource,
        config: LlamaConfig,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_shapes(&*src, &config)?;
        let on = |t: Tensor| -> Result<Tensor, ModelError> { Ok(t.to_device(device)?) };
        let vec_on = |v: Vec<f32>| -> Result<Tensor, ModelError> {
            let n = v.len();
            Ok(Tensor::from_vec(v, n, device)?)
        };
        let (tables, layer_rope) = RopeTable::for_model(src, &config)?;
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(config.n_layer);
        for (i, &rope) in layer_rope.iter().enumerate() {
            let t = BlockTensors::read(src, &config, i, format)?;
            let (qkv, b1) = upload_projection(t.qkv, format, device)?;
            let (gate_up, b2) = upload_projection(t.gate_up, format, device)?;
            let wo = weights::to_device_matmul(t.wo, format, device)?;
            let down = weights::to_device_matmul(t.w_down, format, device)?;
            weight_bytes += b1 + b2 + weights::matmul_bytes(&wo) + weights::matmul_bytes(&down);
            layers.push(Layer {
                attn_norm: on(t.attn_norm)?,
                qkv,
                qkv_bias: t.qkv_bias.map(vec_on).transpose()?,
                qk_norm: t
                    .qk_norm
                    .map(|(q, k)| Ok::<_, ModelError>((vec_on(q)?, vec_on(k)?)))
                    .transpose()?,
                wo,
                post_attn_norm: t.post_attn_norm.map(on).transpose()?,
                ffn_norm: on(t.ffn_norm)?,
                gate_up,
                ffn_width: t.ffn_width,
                down,
                post_ffn_norm: t.post_ffn_norm.map(on).transpose()?,
                rope,
                window: config.layer_window(i),
            });
        }
        let embed_q = src.tensor("token_embd.weight", format)?;
        let embed = embed_q.dequantize(&Device::Cpu)?.to_device(device)?;
        let lm_head = match src.contains("output.weight") {
            true => weights::to_device_matmul(src.tensor("output.weight", format)?, format, device)?,
            false => weights::to_device_matmul(embed_q, format, device)?, // tied embeddings
        };
        weight_bytes += weights::matmul_bytes(&lm_head) + embed.elem_count() * 4;
        let norm = on(src.f32("output_norm.weight")?)?;
        let ropes = tables
            .iter()
            .map(|t| Tensor::from_vec(t.cos_sin_rows(), (config.context_length, config.head_dim), device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The engine thread computes on its own stream: let every upload finish first.
        device.synchronize()?;
        Ok(Self {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            weight_bytes,
            stages: StageTimes::default(),
            #[cfg(feature = "cuda")]
            pinned: Default::default(),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
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

    /// The index of each row's first largest logit (of [`Self::forward`]'s `[n, vocab]`) into `out` (`[n]`),
    /// computed where the rows are ([`RowArgmax`]), so that only the indices are copied to the host.
    pub fn argmax_to_host(&self, logits: &Tensor, out: &mut [u32]) -> candle_core::Result<()> {
        if logits.dim(0)? == 0 {
            return Ok(());
        }
        let ids: Vec<u32> = logits.contiguous()?.apply_op1_no_bwd(&RowArgmax)?.to_vec1()?;
        if ids.len() != out.len() {
            candle_core::bail!("{} argmax rows for {} wanted", ids.len(), out.len())
        }
        out.copy_from_slice(&ids);
        Ok(())
    }

    /// Runs two small steps over fresh sequences of `pool`, so every kernel the first requests need is loaded
    /// before the server says it is ready (on a GPU the driver compiles candle's PTX modules at first use, which
    /// takes seconds): a decode row beside a 24-token prompt (the per-token and tiled attention kernels, split-K,
    /// the matmuls above 8 rows), its logits copied to the host; then a decode step of the two (the matmuls'
    /// vector kernels), read through the device's argmax. The sequences' blocks go back to the pool.
    pub fn warm_up(&self, pool: &Arc<KvPool>) -> candle_core::Result<()> {
        let vocab = self.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..24u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut kvs = [PagedKv::new(pool.clone(), 64), PagedKv::new(pool.clone(), 64)];
        let logits = self.forward(&mut DeviceChunk::each_wanted(&mut kvs, &[&prompt[..1], &prompt]), pool)?;
        let mut rows = vec![0f32; 2 * self.config.vocab_size];
        self.rows_to_host(&logits, &mut rows)?;
        let next = [prompt[1]];
        let logits = self.forward(&mut DeviceChunk::each_wanted(&mut kvs, &[next, next]), pool)?;
        let mut ids = [0u32; 2];
        self.argmax_to_host(&logits, &mut ids)
    }

    /// Replays decode steps (one token per sequence, every row's logits wanted) of up to `max_batch`
    /// sequences as CUDA graphs, each recorded the second time its batch size is seen (the first runs op by op,
    /// loading the kernels). `max_rows`: the most tokens any step holds, so the matmuls' scratch buffers are
    /// grown once before the first recording. Not while another model computes on the same device: a recording
    /// stream would take in its work, and its matmuls could grow the scratch buffers the graphs hold (they are
    /// per device). Off CUDA, or with cudarc's event tracking on, nothing changes and the error says why.
    ///
    /// Every op of the step (`compute`) reads contiguous tensors: candle's ops on strided or broadcast ones copy
    /// their shapes from host memory at each call, which a graph cannot replay (hence [`AddBias`],
    /// [`HeadNorms`] and [`GatedAct`] rather than candle's broadcast add, narrowed norms and narrowed GELU).
    /// candle's index_select uploads its shape even for contiguous ids; the recording takes it from candle's
    /// parameter cache (see `graphs`).
    pub fn enable_decode_graphs(&self, max_batch: usize, max_rows: usize) -> Result<(), String> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            if cuda.cuda_stream().context().is_event_tracking() {
                // cudarc would make the recording stream wait on events from before the recording.
                return Err("CUDA graphs cannot record with event tracking on (AMLSERVE_CUDA_EVENT_TRACKING)".into());
            }
            // A second call keeps the first's settings.
            let _ = self
                .graphs
                .set(Box::new(super::graphs::DecodeGraphs::new(max_batch, max_rows)));
            return Ok(());
        }
        let _ = (max_batch, max_rows);
        Err(format!("the model computes on {:?}, not CUDA", self.device.location()))
    }

    /// The device's free and total memory in bytes, where it reports them (CUDA).
    pub fn memory(&self) -> candle_core::Result<Option<(usize, usize)>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            use candle_core::cuda_backend::WrapErr;
            self.device.synchronize()?;
            return Ok(Some(cuda.cuda_stream().context().mem_get_info().w()?));
        }
        Ok(None)
    }

    /// Decode steps replayed from CUDA graphs so far (0 with graphs off).
    pub fn graph_replays(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.graphs.get() {
            return g.replays();
        }
        0
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
    /// `want_logits`, in chunk order. Every chunk's cache must come from `pool`. With decode graphs on
    /// ([`Self::enable_decode_graphs`], CUDA), a decode step's logits live in a buffer the next step of the same
    /// size overwrites: read them before the next step.
    pub fn forward(&self, chunks: &mut [DeviceChunk<'_>], pool: &KvPool) -> candle_core::Result<Tensor> {
        let inputs = StepInputs::build(&self.config, chunks)?;
        let logits = self.run(inputs, pool)?;
        for c in chunks.iter_mut() {
            c.kv.advance(c.tokens.len());
        }
        Ok(logits)
    }

    /// The step's logits, replayed from a decode graph when one applies, else computed op by op.
    fn run(&self, inputs: StepInputs, pool: &KvPool) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = self.graphs.get() {
            // Stage timing needs the ops; the graphs still see the step's size (a larger one drops them).
            if let Some(logits) = graphs.run(self, &inputs, pool, !self.stages.recording())? {
                return Ok(logits);
            }
        }
        let dev = &self.device;
        // No row list when every row is wanted; an empty one still runs the layers (they store the chunks'
        // keys and values).
        let every_row = inputs.every_row_wanted();
        let step = inputs.step();
        let StepInputs {
            ids, meta, logit_rows, ..
        } = inputs;
        let ids = Tensor::from_vec(ids, step.tokens, dev)?;
        let meta_len = meta.len();
        let meta = Tensor::from_vec(meta, meta_len, dev)?;
        let rows = match every_row {
            true => None,
            false => {
                let n = logit_rows.len();
                Some(Tensor::from_vec(logit_rows, n, dev)?)
            }
        };
        self.compute(&ids, &meta, step, rows.as_ref(), pool)
    }

    /// The layers over `step`'s tokens (`ids`, metadata `meta` as [`StepMeta::build`] lays it out), then the
    /// output projection of the rows `rows` names (every row when `None`). Touches the device only: no host
    /// copies, no waits (unless stage timing is on), so a CUDA stream can record it as a graph.
    pub(super) fn compute(
        &self,
        ids: &Tensor,
        meta_t: &Tensor,
        step: StepMeta,
        rows: Option<&Tensor>,
        pool: &KvPool,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let dev = &self.device;
        let heads = self.heads();
        let eps = cfg.rms_eps as f32;

        let mut clock = self.stages.clock(dev)?;
        let mut x = self.embed.index_select(ids, 0)?;
        if let Some(scale) = cfg.embed_scale {
            x = x.affine(f64::from(scale), 0.0)?;
        }
        clock.mark("embed")?;
        let Some(first) = self.layers.first() else {
            candle_core::bail!("a model without layers")
        };
        let mut h = candle_nn::ops::rms_norm(&x, &first.attn_norm, eps)?;
        clock.mark("attn norm")?;
        let add_norm = AddRmsNorm { eps };
        for (li, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&h)?.contiguous()?;
            if let Some(bias) = &layer.qkv_bias {
                qkv.inplace_op2(bias, &AddBias)?;
            }
            if let Some((qn, kn)) = &layer.qk_norm {
                qkv.inplace_op3(qn, kn, &HeadNorms { heads, eps })?;
            }
            clock.mark("qkv matmul")?;
            // The rotary embedding is applied as the keys are stored and as the queries are read.
            let rotary = Rotary {
                table: &self.ropes[layer.rope],
                q_scale: cfg.attn_scale,
            };
            let cache = pool.layer(li);
            cache.inplace_op3(
                &qkv,
                meta_t,
                &StoreKv {
                    meta: step,
                    heads,
                    rotary,
                },
            )?;
            clock.mark("kv store")?;
            let attention = PagedAttention {
                meta: step,
                heads,
                window: layer.window,
                rotary,
            };
            let y = qkv.apply_op3_no_bwd(cache, meta_t, &attention)?;
            clock.mark("attention")?;
            let o = post_norm(project(&layer.wo, &y)?, layer.post_attn_norm.as_ref(), eps)?;
            clock.mark("out matmul")?;
            let (residual, normed) = AddRmsNorm::split(&x.apply_op3_no_bwd(&o, &layer.ffn_norm, &add_norm)?)?;
            (x, h) = (residual, normed);
            clock.mark("add + ffn norm")?;
            let gu = layer.gate_up.forward(&h)?;
            clock.mark("gate/up matmul")?;
            let d = gated_down(&layer.down, &gu, cfg.family.activation(), layer.ffn_width)?;
            let d = post_norm(d, layer.post_ffn_norm.as_ref(), eps)?;
            clock.mark("gated activation + down matmul")?;
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
        let last = match rows {
            Some(r) if r.dim(0)? == 0 => return Tensor::zeros((0, cfg.vocab_size), DType::F32, dev),
            Some(r) => x.index_select(r, 0)?,
            None => x,
        };
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = project(&self.lm_head, &last)?.to_dtype(DType::F32)?;
        clock.mark("output")?;
        Ok(logits)
    }

    /// Multiplies zeros through every projection, so candle's quantized matmuls grow their per-device scratch
    /// buffers (they only grow) to what any step needs: the layers' projections at up to `rows` tokens, the
    /// output projection at up to `max_batch` rows (one per sequence). Every layer, as a model's layers may
    /// hold different quantizations (each with its own kernels).
    #[cfg(feature = "cuda")]
    pub(super) fn reserve_matmul_scratch(&self, rows: usize, max_batch: usize) -> candle_core::Result<()> {
        let cfg = &self.config;
        let q_width = cfg.n_head * cfg.head_dim;
        let zeros = |n: usize, k: usize| Tensor::zeros((n, k), DType::F32, &self.device);
        // candle's kernels alone (a step takes them where ours do not, or with ours switched off): 8 rows, the
        // largest the vector kernels take; then the tiled kernels' largest.
        let candle = |m: &QMatMul, x: &Tensor| m.forward(x);
        for n in [8.min(rows), rows] {
            let (hidden, q) = (zeros(n, cfg.hidden)?, zeros(n, q_width)?);
            for l in &self.layers {
                l.qkv.apply(&hidden, candle)?;
                l.wo.forward(&q)?;
                l.gate_up.apply(&hidden, candle)?;
                l.down.forward(&zeros(n, l.ffn_width)?)?;
            }
        }
        for n in [8.min(max_batch), max_batch] {
            self.lm_head.forward(&zeros(n, cfg.hidden)?)?;
        }
        self.device.synchronize()
    }
}

/// One step's inputs as the host builds them: token ids, the ops' metadata, the rows whose logits are wanted.
pub(super) struct StepInputs {
    pub tokens: usize,
    /// Sequences in the step (one chunk each).
    pub seqs: usize,
    /// Leading chunks of one token each.
    pub singles: usize,
    pub ids: Vec<u32>,
    /// [`StepMeta::build`]'s layout.
    pub meta: Vec<u32>,
    pub logit_rows: Vec<u32>,
}

impl StepInputs {
    /// Checks the chunks, reserves their slots and lays out the step.
    fn build(cfg: &LlamaConfig, chunks: &mut [DeviceChunk<'_>]) -> candle_core::Result<Self> {
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
        Ok(Self {
            tokens: ids.len(),
            seqs: chunks.len(),
            singles: chunks.iter().take_while(|c| c.tokens.len() == 1).count(),
            meta: StepMeta::build(&positions, &slots, &seq_of, &tables),
            ids,
            logit_rows,
        })
    }

    /// What the ops read of the step besides its metadata.
    pub fn step(&self) -> StepMeta {
        StepMeta {
            tokens: self.tokens,
            seqs: self.seqs,
            singles: self.singles,
        }
    }

    /// Whether every token's logits are wanted (a decode step: one token per sequence).
    pub fn every_row_wanted(&self) -> bool {
        self.tokens > 0 && self.logit_rows.len() == self.tokens
    }
}

/// `y` through the norm `w` when there is one (Gemma's norms after attention and the MLP).
fn post_norm(y: Tensor, w: Option<&Tensor>, eps: f32) -> candle_core::Result<Tensor> {
    match w {
        Some(w) => candle_nn::ops::rms_norm(&y.contiguous()?, w, eps),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_weights_take_our_kernel_for_a_few_aligned_rows_only() {
        let dev = &Device::Cpu;
        let w = |dtype| {
            let v: Vec<f32> = (0..16 * 64).map(|i| (i % 17) as f32 - 8.0).collect();
            let t = Tensor::from_vec(v, (16, 64), dev).expect("weights");
            QMatMul::from_qtensor(QTensor::quantize(&t, dtype).expect("quantize")).expect("matmul")
        };
        let q8 = w(GgmlDType::Q8_0);
        let x = |rows: usize| Tensor::zeros((rows + 1, 64), DType::F32, dev).expect("x");
        assert!(q8_rows(&q8, &x(7), None).is_some(), "8 rows");
        assert!(q8_rows(&q8, &x(8), None).is_none(), "9 rows: candle's tiled kernels");
        let gate_up = Tensor::zeros((2, 128), DType::F32, dev).expect("gate and up");
        let three = Tensor::zeros((3, 128), DType::F32, dev).expect("3 rows of gate and up");
        assert!(
            q8_rows(&q8, &three, Some(Activation::Silu)).is_none(),
            "gated: up to 2 rows"
        );
        assert!(
            q8_rows(&q8, &gate_up, Some(Activation::Silu)).is_some(),
            "a gated input, twice as wide"
        );
        assert!(q8_rows(&q8, &gate_up, None).is_none(), "twice as wide without a gate");
        assert!(
            q8_rows(&q8, &x(0).narrow(0, 0, 0).expect("no rows"), None).is_none(),
            "an empty step"
        );
        assert!(
            q8_rows(&q8, &x(1).narrow(0, 1, 1).expect("second row"), None).is_some(),
            "a row at offset 64"
        );
        let odd = Tensor::zeros(4 + 64, DType::F32, dev)
            .and_then(|t| t.narrow(0, 3, 64))
            .and_then(|t| t.reshape((1, 64)))
            .expect("misaligned row");
        assert!(
            q8_rows(&q8, &odd, None).is_none(),
            "a row at offset 3: not 16 bytes aligned"
        );
        assert!(
            q8_rows(&w(GgmlDType::Q4_0), &x(0), None).is_none(),
            "other quantizations"
        );
        launch::set_kernels(launch::Kernels::CANDLE_Q8);
        assert!(q8_rows(&q8, &x(0), None).is_none(), "switched off");
        launch::set_kernels(launch::Kernels::ALL);
        // On the CPU the op is candle's own matmul: the same values either way.
        let x = Tensor::from_vec((0..3 * 64).map(|i| i as f32 / 64.0).collect::<Vec<_>>(), (3, 64), dev).expect("x");
        let ours = project(&q8, &x).and_then(|t| t.to_vec2::<f32>()).expect("ours");
        let candle = q8.forward(&x).and_then(|t| t.to_vec2::<f32>()).expect("candle");
        assert!(ours.iter().flatten().any(|&v| v != 0.0));
        assert_eq!(ours, candle);
        // The MLP's activation read into the down projection (2 rows: the op takes it) and apart (3 rows): what
        // the activation op, then the matmul, give.
        for (rows, act) in [(2, Activation::Silu), (2, Activation::GeluTanh), (3, Activation::Silu)] {
            let gate_up = Tensor::from_vec(
                (0..rows * 128).map(|i| (i % 29) as f32 / 8.0 - 2.0).collect::<Vec<_>>(),
                (rows, 128),
                dev,
            )
            .expect("gate and up");
            assert_eq!(q8_rows(&q8, &gate_up, Some(act)).is_some(), rows <= 2);
            let fused = gated_down(&q8, &gate_up, act, 64)
                .and_then(|t| t.to_vec2::<f32>())
                .expect("fused");
            let apart = gate_up
                .apply_op1_no_bwd(&GatedAct { width: 64, act })
                .and_then(|a| q8.forward(&a))
                .and_then(|t| t.to_vec2::<f32>())
                .expect("apart");
            assert!(fused.iter().flatten().any(|&v| v != 0.0));
            assert_eq!(fused, apart, "{rows} rows, {act:?}");
        }
    }
}
