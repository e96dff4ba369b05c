//! The kernels the device forward needs beyond candle's own ops, as candle custom ops with a CPU and a CUDA
//! implementation each (the CUDA ones in `super::cuda`).
//!
//! Every op reads one step's metadata from a single `u32` tensor ([`StepMeta`]): each token's position, the
//! cache slot its key and value go to, and where its sequence's block table starts, followed by the block
//! tables. It is uploaded once per step, so a step costs one host-to-device copy besides the token ids.
//!
//! Layouts: `qkv` is `[tokens, width]` f32, each row a token's query heads, then key heads, then value heads
//! (the fused projection's output, rotary pairs half-split as the loader permutes them). A layer's cache pool is
//! `[slots, 2 * kv_row]`, a slot holding one token's keys then values, in bf16 (or f32). Slot `s` of a
//! sequence's position `p` is `table[p / BLOCK] * BLOCK + p % BLOCK`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};
use half::bf16;

use super::paged::BLOCK;
use crate::model::arch::Activation;

/// One step's metadata, as the ops read it.
#[derive(Debug, Clone, Copy)]
pub struct StepMeta {
    /// Tokens in the step.
    pub tokens: usize,
    /// Sequences in the step (its tokens in runs, one run per sequence).
    pub seqs: usize,
    /// Leading tokens that are each a sequence's only token in the step (decode rows come first).
    pub singles: usize,
}

impl StepMeta {
    /// Index of token `i`'s position.
    fn pos(&self, meta: &[u32], i: usize) -> usize {
        meta[i] as usize
    }
    /// Token `i`'s write slot.
    fn slot(&self, meta: &[u32], i: usize) -> usize {
        meta[self.tokens + i] as usize
    }
    /// Token `i`'s block table.
    fn table<'m>(&self, meta: &'m [u32], i: usize) -> &'m [u32] {
        &meta[3 * self.tokens + meta[2 * self.tokens + i] as usize..]
    }

    /// Builds the metadata: `positions` and `slots` per token, `seq_of` each token's sequence, and each
    /// sequence's block table.
    pub fn build(positions: &[u32], slots: &[u32], seq_of: &[usize], tables: &[&[u32]]) -> Vec<u32> {
        let mut starts = Vec::with_capacity(tables.len());
        let mut flat = Vec::new();
        for t in tables {
            starts.push(flat.len() as u32);
            flat.extend_from_slice(t);
        }
        let mut meta = Vec::with_capacity(3 * positions.len() + flat.len());
        meta.extend_from_slice(positions);
        meta.extend_from_slice(slots);
        meta.extend(seq_of.iter().map(|&s| starts[s]));
        meta.extend_from_slice(&flat);
        meta
    }
}

/// The head layout of the fused `qkv` rows.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl Heads {
    /// Floats per `qkv` row.
    pub fn width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }
    /// Floats of one token's keys (or values).
    pub fn kv_row(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    /// Column where the keys start.
    pub fn k_col(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// A contiguous slice of a CPU storage, or an error naming the op.
fn cpu_slice<'a, T: candle_core::WithDType>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// The f32 values of a contiguous CPU storage, to change in place.
fn cpu_f32_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: input must be f32")
    };
    Ok(&mut v[a..b])
}

/// The rotary embedding of a layer, applied as keys are stored ([`StoreKv`]) and as queries are read
/// ([`PagedAttention`]), so `qkv` itself is never rotated: the table `[positions, head_dim]` (a position's cosines,
/// then its sines, on the step's device) and the scale of the queries.
#[derive(Clone, Copy)]
pub struct Rotary<'a> {
    pub table: &'a Tensor,
    pub q_scale: f32,
}

/// The rotary table's values from its storage (the CPU implementations; the caller holds the storage's guard
/// from `table.storage_and_layout()`).
fn cpu_table<'a>(op: &str, storage: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(s) = storage else {
        candle_core::bail!("{op}: the rotary table is not on the CPU")
    };
    cpu_slice::<f32>(op, s, l)
}

/// `x` (one head, rotary pairs `(j, j + head_dim / 2)`) scaled by `s` and rotated by the cosines and sines `cs`
/// of a position, into `out`.
fn rotate(x: &[f32], cs: &[f32], s: f32, out: &mut [f32]) {
    let half = x.len() / 2;
    let (lo, hi) = out.split_at_mut(half);
    for j in 0..half {
        let (x1, x2) = (x[j] * s, x[j + half] * s);
        lo[j] = x1 * cs[j] - x2 * cs[half + j];
        hi[j] = x1 * cs[half + j] + x2 * cs[j];
    }
}

/// Writes each token's keys, rotated to its position, and its values from `qkv` to its slot of a layer's pool
/// (an [`InplaceOp3`] on the pool, with `qkv` and the step metadata), rounding to the pool's type.
pub struct StoreKv<'a> {
    pub meta: StepMeta,
    pub heads: Heads,
    pub rotary: Rotary<'a>,
}

impl InplaceOp3 for StoreKv<'_> {
    fn name(&self) -> &'static str {
        "amlserve-store-kv"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        qkv: &CpuStorage,
        ql: &Layout,
        meta: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let meta = cpu_slice::<u32>(self.name(), meta, ml)?;
        let qkv = cpu_slice::<f32>(self.name(), qkv, ql)?;
        let h = self.heads;
        let (row2, hd) = (2 * h.kv_row(), h.head_dim);
        let start = pl.start_offset();
        let (guard, tl) = self.rotary.table.storage_and_layout();
        let table = cpu_table(self.name(), &guard, tl)?;
        let mut src = vec![0f32; row2];
        for (i, row) in qkv.chunks_exact(h.width()).enumerate() {
            let kv = &row[h.k_col()..][..row2];
            let cs = &table[self.meta.pos(meta, i) * hd..][..hd];
            for (x, out) in kv[..h.kv_row()].chunks_exact(hd).zip(src.chunks_exact_mut(hd)) {
                rotate(x, cs, 1.0, out);
            }
            src[h.kv_row()..].copy_from_slice(&kv[h.kv_row()..]);
            let at = start + self.meta.slot(meta, i) * row2;
            match pool {
                CpuStorage::BF16(p) => {
                    for (d, s) in p[at..at + row2].iter_mut().zip(&src) {
                        *d = bf16::from_f32(*s);
                    }
                }
                CpuStorage::F32(p) => p[at..at + row2].copy_from_slice(&src),
                _ => candle_core::bail!("store-kv: the pool must be bf16 or f32"),
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        meta: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::store_kv(self, pool, pl, qkv, ql, meta, ml)
    }
}

/// Causal attention of each token's query heads over its own sequence's cached keys and values, up to and
/// including its own position (a [`CustomOp3`] of `qkv`, a layer's pool and the step metadata), giving
/// `[tokens, n_head * head_dim]` f32. Queries are scaled and rotated to their token's position as they are read
/// (`rotary`); the cached keys were rotated as they were stored. A query head reads the kv head of its group
/// (grouped-query attention). Softmax is computed online over the keys in order, in f32. With a sliding
/// `window`, a token sees only the last `window` keys up to its own (llama.cpp's and Hugging Face's count).
pub struct PagedAttention<'a> {
    pub meta: StepMeta,
    pub heads: Heads,
    pub window: Option<usize>,
    pub rotary: Rotary<'a>,
}

impl PagedAttention<'_> {
    /// The first key a token at `pos` sees.
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.meta.tokens, self.heads.n_head * self.heads.head_dim))
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "amlserve-paged-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        pool: &CpuStorage,
        pl: &Layout,
        meta: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let meta = cpu_slice::<u32>(self.name(), meta, ml)?;
        let qkv = cpu_slice::<f32>(self.name(), qkv, ql)?;
        let h = self.heads;
        let row2 = 2 * h.kv_row();
        let hd = h.head_dim;
        let group = h.n_head / h.n_kv_head;
        let read: Box<dyn Fn(usize) -> f32 + '_> = match candle_core::backend::BackendStorage::dtype(pool) {
            DType::BF16 => {
                let p = cpu_slice::<bf16>(self.name(), pool, pl)?;
                Box::new(move |i| p[i].to_f32())
            }
            DType::F32 => {
                let p = cpu_slice::<f32>(self.name(), pool, pl)?;
                Box::new(move |i| p[i])
            }
            other => candle_core::bail!("paged attention: a {other:?} pool"),
        };
        let (guard, tl) = self.rotary.table.storage_and_layout();
        let rope = cpu_table(self.name(), &guard, tl)?;
        let mut out = vec![0f32; self.meta.tokens * h.n_head * hd];
        let mut scores = Vec::new();
        let mut q = vec![0f32; hd];
        for (i, row) in qkv.chunks_exact(h.width()).enumerate() {
            let pos = self.meta.pos(meta, i);
            let keys = self.first_key(pos)..pos + 1;
            let table = self.meta.table(meta, i);
            let slot = |key: usize| table[key / BLOCK] as usize * BLOCK + key % BLOCK;
            let cs = &rope[pos * hd..][..hd];
            for head in 0..h.n_head {
                rotate(&row[head * hd..][..hd], cs, self.rotary.q_scale, &mut q);
                let (k_at, v_at) = ((head / group) * hd, h.kv_row() + (head / group) * hd);
                scores.clear();
                scores.extend(keys.clone().map(|key| {
                    let base = slot(key) * row2 + k_at;
                    q.iter().enumerate().map(|(d, x)| x * read(base + d)).sum::<f32>()
                }));
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[(i * h.n_head + head) * hd..][..hd];
                for (key, p) in keys.clone().zip(&scores) {
                    let base = slot(key) * row2 + v_at;
                    for (d, x) in o.iter_mut().enumerate() {
                        *x += p * read(base + d);
                    }
                }
                for x in o.iter_mut() {
                    *x /= sum;
                }
            }
        }
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        pool: &candle_core::CudaStorage,
        pl: &Layout,
        meta: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::paged_attention(self, qkv, ql, pool, pl, meta, ml)?;
        Ok((out, self.out_shape()))
    }
}

/// The residual add and the next RMS norm in one pass: of `x` and `y` (`[rows, hidden]` f32) and the norm's
/// weight `w` (`[hidden]`), gives `[2, rows, hidden]`: `rms_norm(x + y) * w` (the next projection's input,
/// first so that it starts at offset 0 for every matmul kernel), then the sum `x + y` (the new residual
/// stream). One kernel and one read of the rows instead of two each.
pub struct AddRmsNorm {
    pub eps: f32,
}

impl AddRmsNorm {
    /// The new residual and the normed rows from the op's output.
    pub fn split(out: &candle_core::Tensor) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
        Ok((out.get(1)?, out.get(0)?))
    }

    fn check(&self, xl: &Layout, yl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
        let (rows, hidden) = xl.shape().dims2()?;
        if yl.shape().dims2()? != (rows, hidden) || wl.shape().elem_count() != hidden {
            candle_core::bail!(
                "add-rms-norm: shapes {:?}, {:?}, {:?}",
                xl.shape(),
                yl.shape(),
                wl.shape()
            )
        }
        Ok((rows, hidden))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "amlserve-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, hidden) = self.check(xl, yl, wl)?;
        let (x, y, w) = (
            cpu_slice::<f32>(self.name(), x, xl)?,
            cpu_slice::<f32>(self.name(), y, yl)?,
            cpu_slice::<f32>(self.name(), w, wl)?,
        );
        let mut out = vec![0f32; 2 * rows * hidden];
        let (normed, sum) = out.split_at_mut(rows * hidden);
        for ((s, n), (xr, yr)) in sum
            .chunks_exact_mut(hidden)
            .zip(normed.chunks_exact_mut(hidden))
            .zip(x.chunks_exact(hidden).zip(y.chunks_exact(hidden)))
        {
            s.iter_mut().zip(xr.iter().zip(yr)).for_each(|(s, (a, b))| *s = a + b);
            let inv = 1.0 / (s.iter().map(|v| v * v).sum::<f32>() / hidden as f32 + self.eps).sqrt();
            n.iter_mut()
                .zip(s.iter().zip(w))
                .for_each(|(n, (v, w))| *n = v * inv * w);
        }
        Ok((CpuStorage::F32(out), Shape::from((2, rows, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, hidden) = self.check(xl, yl, wl)?;
        let out = super::cuda::add_rms_norm(self, (x, xl), (y, yl), (w, wl), rows, hidden)?;
        Ok((out, Shape::from((2, rows, hidden))))
    }
}

/// The gated MLP's activation in one pass: `act(gate) * up` of `[tokens, 2 * width]` rows holding the gate's
/// outputs, then up's, giving `[tokens, width]` f32 (one kernel instead of three); `act` is SiLU or GELU's tanh
/// form (Gemma).
pub struct GatedAct {
    pub width: usize,
    pub act: Activation,
}

impl GatedAct {
    fn apply(&self, g: f32) -> f32 {
        match self.act {
            Activation::Silu => g / (1.0 + (-g).exp()),
            // candle's `gelu`: the tanh approximation.
            Activation::GeluTanh => {
                0.5 * g * (1.0 + ((2.0f32 / std::f32::consts::PI).sqrt() * g * (1.0 + 0.044715 * g * g)).tanh())
            }
        }
    }
}

impl CustomOp1 for GatedAct {
    fn name(&self) -> &'static str {
        "amlserve-gated-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(self.name(), s, l)?;
        let w = self.width;
        let out: Vec<f32> = x
            .chunks_exact(2 * w)
            .flat_map(|row| {
                let (gate, up) = row.split_at(w);
                gate.iter().zip(up).map(|(&g, &u)| self.apply(g) * u)
            })
            .collect();
        let rows = out.len() / w.max(1);
        Ok((CpuStorage::F32(out), Shape::from((rows, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let rows = l.shape().elem_count() / (2 * self.width).max(1);
        Ok((
            super::cuda::gated_act(self, s, l, rows)?,
            Shape::from((rows, self.width)),
        ))
    }
}

/// Adds a bias row `[width]` to every row of `qkv` `[tokens, width]` in place (an [`InplaceOp2`] on `qkv`):
/// qwen2's q/k/v biases, without the broadcast layout candle's own add would copy from the host.
pub struct AddBias;

impl AddBias {
    fn check(ql: &Layout, bl: &Layout) -> candle_core::Result<(usize, usize)> {
        let (rows, width) = ql.shape().dims2()?;
        if bl.shape().elem_count() != width {
            candle_core::bail!("add-bias: qkv {:?}, bias {:?}", ql.shape(), bl.shape())
        }
        Ok((rows, width))
    }
}

impl InplaceOp2 for AddBias {
    fn name(&self) -> &'static str {
        "amlserve-add-bias"
    }

    fn cpu_fwd(&self, x: &mut CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> candle_core::Result<()> {
        let (_, width) = Self::check(xl, bl)?;
        let bias = cpu_slice::<f32>(self.name(), b, bl)?;
        let x = cpu_f32_mut(self.name(), x, xl)?;
        for row in x.chunks_exact_mut(width) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, width) = Self::check(xl, bl)?;
        super::cuda::add_bias(x, xl, b, bl, rows, width)
    }
}

/// RMS-normalises each query head of `qkv` by `qn` and each key head by `kn` (`[head_dim]` each) in place,
/// values unchanged (an [`InplaceOp3`] on `qkv`): qwen3's and Gemma 3's per-head norms in one kernel, where
/// candle's ops would copy the head columns out and back.
pub struct HeadNorms {
    pub heads: Heads,
    pub eps: f32,
}

impl HeadNorms {
    fn check(&self, ql: &Layout, nl: &Layout, kl: &Layout) -> candle_core::Result<usize> {
        let h = self.heads;
        let (rows, width) = ql.shape().dims2()?;
        if width != h.width() || nl.shape().elem_count() != h.head_dim || kl.shape().elem_count() != h.head_dim {
            candle_core::bail!(
                "head-norms: qkv {:?}, norms {:?} and {:?} for {h:?}",
                ql.shape(),
                nl.shape(),
                kl.shape()
            )
        }
        Ok(rows)
    }
}

impl InplaceOp3 for HeadNorms {
    fn name(&self) -> &'static str {
        "amlserve-head-norms"
    }

    fn cpu_fwd(
        &self,
        qkv: &mut CpuStorage,
        ql: &Layout,
        qn: &CpuStorage,
        nl: &Layout,
        kn: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<()> {
        self.check(ql, nl, kl)?;
        let (qn, kn) = (
            cpu_slice::<f32>(self.name(), qn, nl)?,
            cpu_slice::<f32>(self.name(), kn, kl)?,
        );
        let h = self.heads;
        let x = cpu_f32_mut(self.name(), qkv, ql)?;
        for row in x.chunks_exact_mut(h.width()) {
            for (head, x) in row[..(h.n_head + h.n_kv_head) * h.head_dim]
                .chunks_exact_mut(h.head_dim)
                .enumerate()
            {
                let w = if head < h.n_head { qn } else { kn };
                // As candle's rms_norm: divide by the root, then scale.
                let m = (x.iter().map(|v| v * v).sum::<f32>() / h.head_dim as f32 + self.eps).sqrt();
                x.iter_mut().zip(w).for_each(|(v, w)| *v = *v / m * w);
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &mut candle_core::CudaStorage,
        ql: &Layout,
        qn: &candle_core::CudaStorage,
        nl: &Layout,
        kn: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<()> {
        let rows = self.check(ql, nl, kl)?;
        super::cuda::head_norms(self, qkv, ql, (qn, nl), (kn, kl), rows)
    }
}

/// The index of each row's first largest value (`[rows, vocab]` f32 to `[rows]` u32), as
/// [`crate::engine::sampler::argmax`] picks a greedy token: for rows whose sampler takes the raw row's argmax, so
/// that only the indices, not the rows, leave the device.
pub struct RowArgmax;

impl CustomOp1 for RowArgmax {
    fn name(&self) -> &'static str {
        "amlserve-row-argmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        if vocab == 0 {
            candle_core::bail!("row-argmax: rows of no values")
        }
        let x = cpu_slice::<f32>(self.name(), s, l)?;
        let out: Vec<u32> = x
            .chunks_exact(vocab)
            .take(rows)
            .map(crate::engine::sampler::argmax)
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        if vocab == 0 {
            candle_core::bail!("row-argmax: rows of no values")
        }
        Ok((super::cuda::row_argmax(s, l, rows, vocab)?, Shape::from(rows)))
    }
}

/// `x [rows, k]` times the transpose of Q8_0 weights `[n, k]`, for steps of up to [`super::launch::Q8_MAX_ROWS`]
/// rows (a decode step of a few sequences): on CUDA one launch of `amlserve_q8_0_rows_*`, which reads the
/// activations as they are, where candle's kernels quantize them to Q8_1 in a launch of their own first; on the
/// CPU candle's own quantized matmul. With `gate`, `x` is `[rows, 2k]`, each row a gate and an up projection, and
/// the op multiplies [`GatedAct`]'s output (the MLP's activation, in the same launch on CUDA).
pub struct Q8Rows {
    pub weight: std::sync::Arc<candle_core::quantized::QTensor>,
    pub gate: Option<Activation>,
}

impl Q8Rows {
    /// `(rows, n, k)`, or an error unless the weights are Q8_0 and `x` has their width (twice it with a gate).
    fn check(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (rows, cols) = l.shape().dims2()?;
        let (n, k) = self.weight.shape().dims2()?;
        let want = if self.gate.is_some() { 2 * k } else { k };
        if self.weight.dtype() != candle_core::quantized::GgmlDType::Q8_0 || cols != want {
            candle_core::bail!(
                "q8-rows: {:?} weights {:?} against activations {:?} (gate {:?})",
                self.weight.dtype(),
                self.weight.shape(),
                l.shape(),
                self.gate
            )
        }
        Ok((rows, n, k))
    }
}

impl CustomOp1 for Q8Rows {
    fn name(&self) -> &'static str {
        "amlserve-q8-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n, k) = self.check(l)?;
        let gated;
        let x = match self.gate {
            Some(act) => {
                gated = GatedAct { width: k, act }.cpu_fwd(s, l)?.0;
                cpu_slice::<f32>(self.name(), &gated, &Layout::contiguous((rows, k)))?
            }
            None => cpu_slice::<f32>(self.name(), s, l)?,
        };
        let x = Tensor::from_slice(x, (rows, k), &candle_core::Device::Cpu)?;
        let m = candle_core::quantized::QMatMul::from_arc(self.weight.clone())?;
        let y = candle_core::Module::forward(&m, &x)?;
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, n, k) = self.check(l)?;
        Ok((super::cuda::q8_rows(self, s, l, (rows, n, k))?, Shape::from((rows, n))))
    }
}
