//! CUDA graphs for decode steps: a decode step launches a few hundred small kernels (SmolLM2: ~14 a layer, 30
//! layers), and on an H200 launching them took 3.5 ms of a 4.4 ms single-stream step while the GPU idled. A
//! graph records the step's launches once and replays them with one call.
//!
//! A graph replays the same kernels with the same arguments, so everything a step's kernels read is given a
//! fixed place: device buffers for the token ids and the metadata (sized for every sequence's longest block
//! table) and one for the logits, each sized for the largest batch and shared by every batch size's graph (a
//! graph uses their first rows; replays are one at a time and the logits are read before the next step).
//! Before a replay the host writes this step's ids and metadata into them; the kernels already take every
//! per-step value (positions, slots, block tables) from the metadata, and the row count is fixed per batch size.
//! Tensors the recorded step allocates come from graph memory and are freed inside the graph.
//!
//! What else a recording needs:
//! - A batch size is recorded the second time it is seen (one that comes once is not worth it), per set of
//!   kernels (`launch::kernels`: a graph replays the kernels it recorded). The recording
//!   runs the step once for real first: that loads every module the step uses (loading one while recording is
//!   not allowed) and, with candle's parameter cache on, puts the shape parameters candle uploads for some
//!   kernels (index_select's) on the device once, where the recording reads them.
//! - candle's quantized matmuls keep per-device scratch buffers that grow on demand; a graph holds their
//!   addresses. They are grown before the first recording, through every projection, to the largest step
//!   (`max_rows`) and the largest batch (the output projection's rows), and a step larger than `max_rows`
//!   drops every graph before it runs (also while stages are timed).
//! - Nothing else may launch on the stream while it records, nor grow those scratch buffers: one model per
//!   device.
//! - cudarc's event tracking (`AMLSERVE_CUDA_EVENT_TRACKING=1`) makes the recording stream wait on events
//!   recorded before the capture, which CUDA refuses: graphs are refused with it.
//! - No op may copy from host memory while recording (the copy would be replayed from a buffer long gone):
//!   candle does so for ops on strided or broadcast tensors, so the forward's step uses contiguous ones only
//!   ([`DeviceLlama::enable_decode_graphs`]), and index_select's parameters come from the cache above.
//!
//! Any failure while recording or replaying turns graphs off for the process (logged) and the step runs op by op
//! (an error that leaves the GPU unusable fails that step instead).
// One unsafe item: `Graph` is declared Send (its SAFETY comment says why).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};

use super::forward::{DeviceLlama, StepInputs};
use super::launch::{self, Kernels};
use super::paged::{KvPool, BLOCK};

/// Decode graphs of one model, by batch size and kernel set.
pub struct DecodeGraphs {
    max_batch: usize,
    max_rows: usize,
    state: Mutex<State>,
    /// Steps replayed from a graph (recordings included).
    replays: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Whether the matmuls' scratch buffers have been grown to `max_rows`.
    reserved: bool,
    /// Recording failed once: op by op from then on.
    off: bool,
    /// The KV pool the graphs write into (its first layer's tensor id).
    pool: Option<candle_core::TensorId>,
    /// The fixed buffers every graph reads and writes, made at the first recording.
    buffers: Option<Buffers>,
    by_batch: HashMap<(usize, Kernels), Slot>,
}

/// Token ids `[max_batch]`, metadata `[meta_len(max_batch)]` and logits `[max_batch, vocab]`: a graph of batch
/// `b` uses their first `b`, `meta_len(b)` and `b` rows.
struct Buffers {
    ids: Tensor,
    meta: Tensor,
    logits: Tensor,
}

enum Slot {
    /// Seen once, ran op by op.
    Seen,
    Ready(Recorded),
}

struct Recorded {
    /// The views of the shared buffers this batch size's graph uses.
    ids: Tensor,
    meta: Tensor,
    logits: Tensor,
    graph: Graph,
}

/// A recorded graph.
struct Graph(CudaGraph);

// SAFETY: a graph is only launched with the state's mutex held, by one thread at a time; cudarc leaves
// `CudaGraph` !Send only because it holds raw driver handles, which the driver lets any thread use.
unsafe impl Send for Graph {}

impl DecodeGraphs {
    /// Graphs for decode steps of up to `max_batch` sequences, in a model whose steps hold at most `max_rows`
    /// tokens.
    pub fn new(max_batch: usize, max_rows: usize) -> Self {
        Self {
            max_batch,
            max_rows: max_rows.max(max_batch),
            state: Mutex::default(),
            replays: AtomicUsize::new(0),
        }
    }

    /// Steps replayed from a graph so far (recordings included).
    pub fn replays(&self) -> usize {
        self.replays.load(Ordering::Relaxed)
    }

    /// The step's logits from a graph, or `None` when the step is to run op by op (not a decode step, a batch
    /// size seen for the first time, graphs off, or `may_replay` false: stage timing, which needs the ops).
    pub(super) fn run(
        &self,
        model: &DeviceLlama,
        inputs: &StepInputs,
        pool: &KvPool,
        may_replay: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if inputs.tokens > self.max_rows {
            // This step grows the matmuls' scratch buffers: no graph may keep the old addresses.
            st.by_batch.clear();
            st.reserved = false;
            return Ok(None);
        }
        let batch = inputs.tokens;
        if !may_replay || st.off || !inputs.every_row_wanted() || batch > self.max_batch {
            return Ok(None);
        }
        let pool_id = pool.layer(0).id();
        if st.pool != Some(pool_id) {
            st.by_batch.clear();
            st.pool = Some(pool_id);
        }
        let key = (batch, launch::kernels());
        match st.by_batch.get(&key) {
            None => {
                st.by_batch.insert(key, Slot::Seen);
                Ok(None)
            }
            Some(Slot::Ready(r)) => {
                if inputs.meta.len() > r.meta.dim(0)? {
                    return Ok(None);
                }
                let replayed = r
                    .ids
                    .inplace_op1(&Upload(&inputs.ids))
                    .and_then(|()| r.meta.inplace_op1(&Upload(&inputs.meta)))
                    .and_then(|()| r.graph.0.launch().w());
                match replayed {
                    Ok(()) => {
                        self.replays.fetch_add(1, Ordering::Relaxed);
                        Ok(Some(r.logits.clone()))
                    }
                    Err(e) => {
                        // Op by op from now on; if the GPU itself is broken, the step fails there.
                        st.turn_off(batch, "replaying a CUDA graph failed", &e);
                        Ok(None)
                    }
                }
            }
            Some(Slot::Seen) => {
                let ready = match st.reserved {
                    true => Ok(()),
                    false => model.reserve_matmul_scratch(self.max_rows, self.max_batch),
                };
                st.reserved |= ready.is_ok();
                let recorded = ready
                    .and_then(|()| st.buffers(model, self.max_batch))
                    .and_then(|b| record(model, inputs, pool, b));
                match recorded {
                    Ok(r) => {
                        let logits = r.logits.clone();
                        st.by_batch.insert(key, Slot::Ready(r));
                        self.replays.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(batch, "decode step recorded as a CUDA graph");
                        Ok(Some(logits))
                    }
                    Err(e) => {
                        st.turn_off(batch, "recording a CUDA graph failed", &e);
                        Ok(None)
                    }
                }
            }
        }
    }
}

impl State {
    fn turn_off(&mut self, batch: usize, what: &str, e: &candle_core::Error) {
        self.off = true;
        self.by_batch.clear();
        tracing::warn!(
            batch,
            error = %crate::model::candle_message(e),
            "{what}: decode steps run op by op from now on"
        );
    }

    /// The shared buffers, made the first time.
    fn buffers(&mut self, model: &DeviceLlama, max_batch: usize) -> candle_core::Result<&Buffers> {
        if self.buffers.is_none() {
            let dev = model.device();
            self.buffers = Some(Buffers {
                ids: Tensor::zeros(max_batch, DType::U32, dev)?,
                meta: Tensor::zeros(meta_len(model, max_batch), DType::U32, dev)?,
                logits: Tensor::zeros((max_batch, model.config.vocab_size), DType::F32, dev)?,
            });
        }
        Ok(self.buffers.as_ref().expect("made above"))
    }
}

/// Metadata room for `batch` sequences: positions, slots, table starts, then every sequence's table at its
/// longest.
fn meta_len(model: &DeviceLlama, batch: usize) -> usize {
    3 * batch + batch * model.config.context_length.div_ceil(BLOCK)
}

/// Records the step `inputs` describes as a graph over the first rows of `buffers`. The step runs once op by op
/// first (into the same buffers), then is recorded, then the graph is launched once: the step's keys and
/// values are written three times to the same slots, and its logits are the graph's.
fn record(model: &DeviceLlama, inputs: &StepInputs, pool: &KvPool, buffers: &Buffers) -> candle_core::Result<Recorded> {
    let dev = model.device();
    let Device::Cuda(cuda) = dev else {
        candle_core::bail!("CUDA graphs need a CUDA device")
    };
    let batch = inputs.tokens;
    let meta_len = meta_len(model, batch);
    if inputs.meta.len() > meta_len {
        candle_core::bail!(
            "a step's metadata ({}) is past its room ({meta_len})",
            inputs.meta.len()
        )
    }
    // Views at offset 0 of the shared buffers: contiguous, so the kernels read them as they would their own.
    let ids = buffers.ids.narrow(0, 0, batch)?;
    let meta = buffers.meta.narrow(0, 0, meta_len)?;
    let logits = buffers.logits.narrow(0, 0, batch)?;
    ids.inplace_op1(&Upload(&inputs.ids))?;
    meta.inplace_op1(&Upload(&inputs.meta))?;
    // The step, logits into the fixed buffer. Every tensor it makes is dropped inside, so while recording its
    // free is recorded too.
    let step = || {
        model
            .compute(&ids, &meta, inputs.step(), None, pool)
            .and_then(|out| buffers.logits.slice_set(&out, 0, 0))
    };
    // candle uploads some kernels' shape parameters from host memory at each call (index_select's, for one);
    // with this guard on it keeps each distinct vector on the device, so a recording reads a fixed copy (and a
    // miss while recording is an error, not a copy).
    let _params = cuda.enable_cuda_graph_htod_cache();
    // Once for real first: loads every module the step uses (slice_set's copy kernel too) and fills that cache;
    // the recorded step writes the same keys and values to the same slots again.
    step()?;
    let stream = cuda.cuda_stream();
    stream.synchronize().w()?;
    stream.context().check_err().w()?;
    // Thread-local: a call on this thread that cannot be recorded (a synchronous allocation, a copy to the
    // host) fails the recording instead of running outside it.
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let recorded = step();
    // Frees that failed inside a broken recording are kept by cudarc, which would return them from
    // `end_capture` before ending the capture: take them first.
    let pending = stream.context().check_err().w();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    if stream.capture_status().w()? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        // Every later launch on this stream would fail too: say why once.
        candle_core::bail!("the stream is still recording after a failed CUDA graph recording")
    }
    recorded?;
    pending?;
    let Some(graph) = graph? else {
        candle_core::bail!("the stream recorded no graph")
    };
    graph.upload().w()?;
    graph.launch().w()?;
    Ok(Recorded {
        ids,
        meta,
        logits,
        graph: Graph(graph),
    })
}

/// Writes host values into the start of a `u32` tensor (on CUDA, a copy on the tensor's stream).
struct Upload<'a>(&'a [u32]);

impl InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "amlserve-upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::U32(v) = s else {
            candle_core::bail!("upload: the target is not u32")
        };
        let start = l.start_offset();
        match v.get_mut(start..start + self.0.len()) {
            Some(dst) => dst.copy_from_slice(self.0),
            None => candle_core::bail!("upload: {} values do not fit", self.0.len()),
        }
        Ok(())
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let stream = s.device.cuda_stream();
        let start = l.start_offset();
        let slice = s.as_cuda_slice_mut::<u32>()?;
        if start + self.0.len() > slice.len() {
            candle_core::bail!("upload: {} values do not fit", self.0.len())
        }
        let mut dst = slice.slice_mut(start..start + self.0.len());
        // The copy is ordered on the stream before the graph launched after it; cudarc stages pageable host
        // memory, so the host slice may change once this returns.
        stream.memcpy_htod(self.0, &mut dst).w()?;
        Ok(())
    }
}
