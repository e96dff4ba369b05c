//! CUDA side of the device forward: opening a GPU, and launching the kernels of `kernels.cu` for the custom ops
//! in [`super::ops`]. The kernels are compiled once per process by NVRTC for the device's own architecture
//! (the CUDA runtime images carry NVRTC), so the build needs nothing beyond candle's own CUDA step.
// Launching a kernel is unsafe: each launch below passes buffers whose sizes the op checked first.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Device, Layout};

use super::launch::{self, Dims};
use super::ops::{AddRmsNorm, GatedAct, HeadNorms, PagedAttention, Q8Rows, Rotary, StoreKv};
use super::DeviceInfo;
use crate::model::arch::Activation;

const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "amlserve_kernels";
/// The GPU's multiprocessor count, read once (one GPU per process: the server opens one device for all its
/// models).
fn multiprocessors(dev: &CudaDevice) -> candle_core::Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static SMS: OnceLock<usize> = OnceLock::new();
    if let Some(&n) = SMS.get() {
        return Ok(n);
    }
    let ctx = dev.cuda_stream().context().clone();
    let n = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(*SMS.get_or_init(|| usize::try_from(n).unwrap_or(1).max(1)))
}

/// cudarc's launch configuration for a kernel's geometry.
fn config(d: Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: d.grid,
        block_dim: (d.block, 1, 1),
        shared_mem_bytes: d.shared,
    }
}

/// Opens CUDA device `ordinal` and describes it.
pub(super) fn open(ordinal: usize) -> Result<(Device, DeviceInfo), String> {
    // One stream of our own for every thread (candle's default is each thread's own default stream): the
    // loader uploads and the engine thread computes on the same stream, in order.
    let cuda = CudaDevice::new_with_stream(ordinal).map_err(|e| {
        format!(
            "cannot open CUDA device {ordinal}: {}",
            crate::model::candle_message(&e)
        )
    })?;
    if std::env::var_os("AMLSERVE_CUDA_EVENT_TRACKING").is_none_or(|v| v != "1") {
        // SAFETY: every buffer is used on the one stream above, so the events cudarc would record to order
        // uses across streams are never needed (they cost driver calls on every launch).
        unsafe { cuda.disable_event_tracking() };
    }
    let device = Device::Cuda(cuda.clone());
    let stream = cuda.cuda_stream();
    let ctx = stream.context();
    let name = ctx.name().map_err(|e| e.to_string())?;
    let memory = ctx.total_mem().map_err(|e| e.to_string())?;
    let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
    // Compile the kernels now, so a broken toolchain fails at start and not at the first request.
    ptx(major, minor)?;
    Ok((
        device,
        DeviceInfo {
            device: format!("cuda:{ordinal}"),
            name: Some(name),
            memory_mb: Some(memory >> 20),
            compute_capability: Some(format!("{major}.{minor}")),
        },
    ))
}

/// The kernels' PTX, compiled on first use for compute capability `major.minor`.
fn ptx(major: i32, minor: i32) -> Result<&'static str, String> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let opts = nvrtc::CompileOptions {
            arch: Some(arch),
            use_fast_math: Some(false),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile amlserve's kernels: {e}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(Clone::clone)
}

/// The kernels' PTX for `dev` (compiled on first use).
fn ptx_for(dev: &CudaDevice) -> candle_core::Result<&'static str> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    ptx(major, minor).map_err(candle_core::Error::Msg)
}

/// Runs `f` on the rotary table's device values (an op holds the table, so candle does not hand it over).
fn with_table<R>(
    rotary: &Rotary<'_>,
    f: impl FnOnce(candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = rotary.table.storage_and_layout();
    let candle_core::Storage::Cuda(t) = &*storage else {
        candle_core::bail!("the rotary table is not on the GPU")
    };
    f(t.as_cuda_slice::<f32>()?.slice(start(layout, "rotary table")?..))
}

/// Start offset of a contiguous layout, or an error.
fn start(l: &Layout, what: &str) -> candle_core::Result<usize> {
    l.contiguous_offsets()
        .map(|(a, _)| a)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} is not contiguous")))
}

pub(super) fn store_kv(
    op: &StoreKv,
    pool: &mut CudaStorage,
    pl: &Layout,
    qkv: &CudaStorage,
    ql: &Layout,
    meta: &CudaStorage,
    ml: &Layout,
) -> candle_core::Result<()> {
    let h = op.heads;
    if ql.shape().elem_count() != op.meta.tokens * h.width() {
        candle_core::bail!(
            "store-kv: qkv has {} values for {} tokens",
            ql.shape().elem_count(),
            op.meta.tokens
        )
    }
    let dev = pool.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_store_kv_bf16", MODULE, ptx_for(&dev)?)?;
    let (ps, qs, ms) = (start(pl, "pool")?, start(ql, "qkv")?, start(ml, "meta")?);
    let mut p = pool.as_cuda_slice_mut::<half::bf16>()?.slice_mut(ps..);
    let x = qkv.as_cuda_slice::<f32>()?.slice(qs..);
    let m = meta.as_cuda_slice::<u32>()?.slice(ms..);
    let (tokens, width, k_col, row2, hd) = (
        op.meta.tokens as i32,
        h.width() as i32,
        h.k_col() as i32,
        2 * h.kv_row() as i32,
        h.head_dim as i32,
    );
    let cfg = config(launch::store_kv(op.meta.tokens));
    with_table(&op.rotary, |t| {
        let mut b = f.builder();
        b.arg(&mut p)
            .arg(&x)
            .arg(&m)
            .arg(&t)
            .arg(&tokens)
            .arg(&width)
            .arg(&k_col)
            .arg(&row2)
            .arg(&hd);
        // SAFETY: slots come from blocks of this pool (PagedKv::prepare), so every write is inside it;
        // positions index the rotary table, built for the context, and the engine validated them against it.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })
}

pub(super) fn paged_attention(
    op: &PagedAttention,
    qkv: &CudaStorage,
    ql: &Layout,
    pool: &CudaStorage,
    pl: &Layout,
    meta: &CudaStorage,
    ml: &Layout,
) -> candle_core::Result<CudaStorage> {
    let h = op.heads;
    if !launch::attention_supports(h) {
        candle_core::bail!("paged attention: unsupported heads {h:?}")
    }
    if ql.shape().elem_count() != op.meta.tokens * h.width() {
        candle_core::bail!(
            "paged attention: qkv has {} values for {} tokens",
            ql.shape().elem_count(),
            op.meta.tokens
        )
    }
    let dev = qkv.device.clone();
    let (qs, ps, ms) = (start(ql, "qkv")?, start(pl, "pool")?, start(ml, "meta")?);
    let x = qkv.as_cuda_slice::<f32>()?.slice(qs..);
    let p = pool.as_cuda_slice::<half::bf16>()?.slice(ps..);
    let m = meta.as_cuda_slice::<u32>()?.slice(ms..);
    let plan = launch::attention_plan(op.meta, h, multiprocessors(&dev)?);
    if plan.per_row > 0 && plan.grouped && ps % 8 != 0 {
        // The grouped kernel reads keys 16 bytes at a time; the pool is a whole allocation, so this never happens.
        candle_core::bail!("paged attention: the KV pool does not start on a 16-byte boundary")
    }
    // SAFETY: the kernels write every element: tokens 0..plan.per_row the per-row or grouped kernel (without
    // splits each block its heads' head_dim outputs; with them each split its maximum, sum and outputs, and the
    // combining kernel every output), the rest the tiled kernel (each token in one run of one tile).
    let mut out = unsafe { dev.alloc::<f32>(op.meta.tokens * h.n_head * h.head_dim) }?;
    // 0: no window (a window beyond i32 is none in practice).
    let window = op.window.map_or(0, |w| i32::try_from(w).unwrap_or(i32::MAX));
    // The kernels' arguments after the buffers: the scale of the queries, the step's tokens (the metadata's
    // layout), the heads.
    let (tokens, width, nh, nkv, hd) = (
        op.meta.tokens as i32,
        h.width() as i32,
        h.n_head as i32,
        h.n_kv_head as i32,
        h.head_dim as i32,
    );
    if plan.per_row > 0 {
        let (name, dims) = plan.row_kernel(h);
        let f = dev.get_or_load_custom_func(name, MODULE, ptx_for(&dev)?)?;
        let splits = plan.splits;
        let mut partial = unsafe { dev.alloc::<f32>(launch::attention_partial_len(plan.per_row, h, splits)) }?;
        let cfg = config(dims);
        let n_splits = splits as i32;
        with_table(&op.rotary, |t| {
            let mut b = f.builder();
            b.arg(&mut out)
                .arg(&mut partial)
                .arg(&x)
                .arg(&p)
                .arg(&m)
                .arg(&t)
                .arg(&op.rotary.q_scale)
                .arg(&tokens)
                .arg(&width)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&window)
                .arg(&n_splits);
            // SAFETY: positions, table offsets and block ids come from this step's metadata, built from the
            // caches; positions index the rotary table, built for the context.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })?;
        if splits > 1 {
            let combine = dev.get_or_load_custom_func("amlserve_attention_combine", MODULE, ptx_for(&dev)?)?;
            let cfg = config(launch::attention_combine(plan.per_row, h));
            let mut b = combine.builder();
            b.arg(&mut out).arg(&partial).arg(&nh).arg(&hd).arg(&n_splits);
            // SAFETY: `partial` holds per_row x heads x splits records of 2 + head_dim floats, all written above.
            unsafe { b.launch(cfg) }.w()?;
        }
    }
    if let Some(t) = plan.tiled {
        let f = dev.get_or_load_custom_func("amlserve_prefill_attention_bf16", MODULE, ptx_for(&dev)?)?;
        let (first, qt, kt) = (t.first as i32, t.qt as i32, t.kt as i32);
        with_table(&op.rotary, |table| {
            let mut b = f.builder();
            b.arg(&mut out)
                .arg(&x)
                .arg(&p)
                .arg(&m)
                .arg(&table)
                .arg(&op.rotary.q_scale)
                .arg(&tokens)
                .arg(&first)
                .arg(&width)
                .arg(&nh)
                .arg(&nkv)
                .arg(&hd)
                .arg(&window)
                .arg(&qt)
                .arg(&kt);
            // SAFETY: as the per-row kernel above; shared memory as launch::tiled_shape sized it.
            unsafe { b.launch(config(t.dims)) }.w()?;
            Ok(())
        })?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// A page-locked host buffer the logits are copied into: a copy from the device into pageable memory goes
/// through a staging buffer at a fraction of the bus's speed (measured on an H200: 64 rows of SmolLM2's
/// logits, 12.6 MB, took 3.4 ms).
pub(super) type PinnedLogits =
    std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>>;

/// Copies `t` (`[n, v]` f32 on a CUDA device) into `out` through a page-locked buffer kept for the next call;
/// false when `t` is not on CUDA.
pub(super) fn rows_to_host(
    t: &candle_core::Tensor,
    pinned: &PinnedLogits,
    out: &mut [f32],
) -> candle_core::Result<bool> {
    let (n, v) = t.dims2()?;
    if out.len() != n * v {
        candle_core::bail!("{n} logits rows do not fit a buffer of {}", out.len())
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        return Ok(false);
    };
    let start = layout.start_offset();
    let src = cs.as_cuda_slice::<f32>()?.slice(start..start + n * v);
    let stream = cs.device.cuda_stream();
    let mut guard = pinned.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|p| p.len() < n * v) {
        // SAFETY: the buffer is written by the copy below before any of it is read. Flags 0: cached memory
        // (the default write-combined kind is slow for the host to read).
        *guard = Some(unsafe { stream.context().alloc_pinned_with_flags::<f32>(n * v, 0) }.w()?);
    }
    let Some(buf) = guard.as_mut() else {
        candle_core::bail!("no pinned logits buffer")
    };
    let host = &mut buf.as_mut_slice().w()?[..n * v];
    {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtr};
        let (ptr, _sync) = src.device_ptr(&stream);
        // SAFETY: `host` holds exactly the n * v floats `src` holds (cudarc's own copy would copy the whole
        // buffer, which may be longer); the stream is synchronized before `host` is read.
        unsafe { result::memcpy_dtoh_async(host, ptr, stream.cu_stream()) }.w()?;
    }
    stream.synchronize().w()?;
    // On this thread: waking the compute pool for it cost more than the copy (H200 host: 0.8 ms for one row).
    out.copy_from_slice(host);
    Ok(true)
}

pub(super) fn gated_act(op: &GatedAct, x: &CudaStorage, l: &Layout, rows: usize) -> candle_core::Result<CudaStorage> {
    let dev = x.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_gated", MODULE, ptx_for(&dev)?)?;
    let src = x.as_cuda_slice::<f32>()?.slice(start(l, "gate/up")?..);
    let n = rows * op.width;
    // SAFETY: the kernel writes all rows * width outputs.
    let mut out = unsafe { dev.alloc::<f32>(n.max(1)) }?;
    let (r, w, gelu) = (rows as i32, op.width as i32, i32::from(op.act == Activation::GeluTanh));
    let mut b = f.builder();
    b.arg(&mut out).arg(&src).arg(&r).arg(&w).arg(&gelu);
    // SAFETY: the input holds rows * 2 * width floats (its layout's element count).
    unsafe { b.launch(config(launch::grid_stride(n))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn add_bias(
    x: &mut CudaStorage,
    xl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
    rows: usize,
    width: usize,
) -> candle_core::Result<()> {
    let dev = x.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_add_bias", MODULE, ptx_for(&dev)?)?;
    let xs = start(xl, "qkv")?;
    let mut x = x.as_cuda_slice_mut::<f32>()?.slice_mut(xs..);
    let b = bias.as_cuda_slice::<f32>()?.slice(start(bl, "bias")?..);
    let (r, w) = (rows as i32, width as i32);
    let mut builder = f.builder();
    builder.arg(&mut x).arg(&b).arg(&r).arg(&w);
    // SAFETY: x holds rows * width floats and the bias width (checked by the op).
    unsafe { builder.launch(config(launch::grid_stride(rows * width))) }.w()?;
    Ok(())
}

pub(super) fn head_norms(
    op: &HeadNorms,
    qkv: &mut CudaStorage,
    ql: &Layout,
    (qn, nl): (&CudaStorage, &Layout),
    (kn, kl): (&CudaStorage, &Layout),
    rows: usize,
) -> candle_core::Result<()> {
    let h = op.heads;
    let dev = qkv.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_head_norms", MODULE, ptx_for(&dev)?)?;
    let qs = start(ql, "qkv")?;
    let mut x = qkv.as_cuda_slice_mut::<f32>()?.slice_mut(qs..);
    let q = qn.as_cuda_slice::<f32>()?.slice(start(nl, "query norm")?..);
    let k = kn.as_cuda_slice::<f32>()?.slice(start(kl, "key norm")?..);
    let (width, n_q, hd) = (h.width() as i32, h.n_head as i32, h.head_dim as i32);
    let cfg = config(launch::head_norms(rows, h));
    let mut b = f.builder();
    b.arg(&mut x)
        .arg(&q)
        .arg(&k)
        .arg(&width)
        .arg(&n_q)
        .arg(&hd)
        .arg(&op.eps);
    // SAFETY: qkv holds rows * width floats and each norm head_dim (checked by the op).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

pub(super) fn add_rms_norm(
    op: &AddRmsNorm,
    (x, xl): (&CudaStorage, &Layout),
    (y, yl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    rows: usize,
    hidden: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = x.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_add_rms_norm", MODULE, ptx_for(&dev)?)?;
    let xs = x.as_cuda_slice::<f32>()?.slice(start(xl, "x")?..);
    let ys = y.as_cuda_slice::<f32>()?.slice(start(yl, "y")?..);
    let ws = w.as_cuda_slice::<f32>()?.slice(start(wl, "norm weight")?..);
    // SAFETY: the kernel writes both halves of every row.
    let mut out = unsafe { dev.alloc::<f32>((2 * rows * hidden).max(1)) }?;
    let (r, h) = (rows as i32, hidden as i32);
    let cfg = config(launch::add_rms_norm(rows));
    let mut b = f.builder();
    b.arg(&mut out).arg(&xs).arg(&ys).arg(&ws).arg(&r).arg(&h).arg(&op.eps);
    // SAFETY: x and y hold rows * hidden floats and w hidden (checked by the op).
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn row_argmax(x: &CudaStorage, l: &Layout, rows: usize, vocab: usize) -> candle_core::Result<CudaStorage> {
    let dev = x.device.clone();
    let f = dev.get_or_load_custom_func("amlserve_row_argmax", MODULE, ptx_for(&dev)?)?;
    let src = x.as_cuda_slice::<f32>()?.slice(start(l, "logits")?..);
    // SAFETY: the kernel writes one index per row.
    let mut out = unsafe { dev.alloc::<u32>(rows.max(1)) }?;
    let (r, v) = (rows as i32, vocab as i32);
    let mut b = f.builder();
    b.arg(&mut out).arg(&src).arg(&r).arg(&v);
    // SAFETY: the input holds rows * vocab floats (its layout's shape).
    unsafe { b.launch(config(launch::row_argmax(rows))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

pub(super) fn q8_rows(
    op: &Q8Rows,
    x: &CudaStorage,
    l: &Layout,
    (rows, n, k): (usize, usize, usize),
) -> candle_core::Result<CudaStorage> {
    let xs = start(l, "activations")?;
    if !launch::q8_rows_fit(rows, k, xs, op.gate.is_some()) {
        candle_core::bail!("q8-rows: {rows} rows of {k} at offset {xs}")
    }
    let dev = x.device.clone();
    let f = dev.get_or_load_custom_func(launch::q8_rows_kernel(rows).0, MODULE, ptx_for(&dev)?)?;
    let src = x.as_cuda_slice::<f32>()?.slice(xs..);
    let stream = dev.cuda_stream();
    let (w, _guard) = op.weight.device_ptr_with_guard(&stream)?;
    let w = w as u64;
    // SAFETY: the kernel writes every output: each warp its columns, lane 0 each (column, row) sum.
    let mut out = unsafe { dev.alloc::<f32>(rows * n) }?;
    let (r, n32, k32, gate) = (rows as i32, n as i32, k as i32, launch::q8_gate(op.gate));
    let mut b = f.builder();
    b.arg(&mut out).arg(&w).arg(&src).arg(&r).arg(&n32).arg(&k32).arg(&gate);
    // SAFETY: the weights are n x k Q8_0 values (their shape, checked against the activations' width), read in
    // whole 34-byte blocks; the activations hold rows x k floats (2k with a gate), 16 bytes aligned (checked
    // above; k is a multiple of 32, so the up projections are too).
    unsafe { b.launch(config(launch::q8_rows(rows, n))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
