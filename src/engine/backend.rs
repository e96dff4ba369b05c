//! The seam between scheduling and execution.
//!
//! The scheduler decides which tokens of which sequences run in a step; a [`Backend`] runs them: one packed
//! forward over a batch of per-sequence chunks, each appended to that sequence's own cache, returning the logits
//! of the chunks that asked for them. The backend owns its cache type ([`KvCache`]) and says how many bytes a
//! cached token costs, which is all the scheduler needs for its memory budget and the prefix cache. The CPU llama
//! forward ([`LlamaBackend`]) is the first implementation; other architectures and device forwards plug in here,
//! and the scheduler's unit tests run against a deterministic stub.
//!
//! The scheduler also needs to turn generated ids into text and to know which ids end generation; that is
//! [`Detokenizer`], implemented by the model's tokenizer.

use std::sync::Arc;

use super::EngineConfig;
use crate::model::device::forward::DeviceChunk;
use crate::model::device::{budget, KvPool, PagedKv};
use crate::model::{Forward, Model, ModelError, SeqChunk, SeqKv, TextTokenizer};

/// One sequence's cache as the scheduler and the prefix cache see it.
pub trait KvCache: Send + 'static {
    /// Tokens stored (the position of the next token).
    fn len(&self) -> usize;
    /// Whether no token is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the stored tokens occupy.
    fn stored_bytes(&self) -> usize;
    /// Frees the room beyond the stored tokens (for a cache kept only to be read).
    fn shrink_to_len(&mut self);
    /// Starts this empty cache with the first `n` tokens of `from`, as if computed here. False when they do not
    /// fit this cache's reserved length (nothing is copied then).
    fn copy_prefix(&mut self, from: &Self, n: usize) -> bool;
    /// An independent copy with the same stored tokens and reserved length (a choice of an `n > 1` request).
    fn fork(&self) -> Self
    where
        Self: Sized;
}

/// The tokens one sequence contributes to a step.
pub struct BatchEntry<'a, K> {
    /// The sequence's cache; the tokens are appended to it.
    pub kv: &'a mut K,
    /// Token ids, at positions `kv.len()..kv.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// Whether to return logits for the last of these tokens.
    pub want_logits: bool,
    /// Whether the sequence takes that row's first largest logit as it is (greedy, nothing applied to the row
    /// first): when every wanted row is such, a backend may return only their indices
    /// ([`Logits::reset_argmax`]), which saves a GPU copying the rows to the host.
    pub argmax_only: bool,
}

/// A step that could not run. The scheduler fails the batch's unfinished requests and goes on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StepError(pub String);

impl From<candle_core::Error> for StepError {
    fn from(e: candle_core::Error) -> Self {
        Self(crate::model::candle_message(&e))
    }
}

/// Runs packed forward steps for the scheduler.
pub trait Backend: Send + 'static {
    /// The per-sequence cache.
    type Kv: KvCache;
    /// Bytes one cached token costs (keys and values, every layer).
    fn kv_bytes_per_token(&self) -> usize;
    /// An empty cache that will hold at most `max_len` tokens, with room for `initial` now.
    fn new_kv(&self, initial: usize, max_len: usize) -> Self::Kv;
    /// Runs one step over `batch` (no entry empty) and writes one logits row per entry with `want_logits`, in
    /// batch order, into `logits`. On error the caches' contents and `logits` are unspecified.
    fn step(&self, batch: &mut [BatchEntry<'_, Self::Kv>], logits: &mut Logits) -> Result<(), StepError>;
}

/// The logits rows of one step in one buffer that the scheduler keeps from step to step. A row is 0.2 to 1 MiB
/// (49k to 262k vocabularies), which glibc maps and zeroes afresh for every allocation above its 128 KiB mmap
/// threshold ([`crate::allocator`]); a buffer that only ever grows is mapped and faulted in once.
///
/// Or, when every row's sequence takes the row's argmax as it is ([`BatchEntry::argmax_only`]), just those
/// indices ([`Self::reset_argmax`]).
#[derive(Debug, Default)]
pub struct Logits {
    data: Vec<f32>,
    rows: usize,
    vocab: usize,
    /// Each row's argmax instead of its logits (empty when the rows are held).
    argmax: Vec<u32>,
}

/// One row of a step's result, to sample from.
pub enum Row<'a> {
    /// The logits (the sampler may change them in place).
    Logits(&'a mut [f32]),
    /// The index of the row's first largest logit.
    Argmax(u32),
}

impl Logits {
    /// Makes room for `rows` rows of `vocab` logits and returns them to fill (contents unspecified).
    pub fn reset(&mut self, rows: usize, vocab: usize) -> &mut [f32] {
        let n = rows * vocab;
        if self.data.len() < n {
            self.data.resize(n, 0.0);
        }
        (self.rows, self.vocab) = (rows, vocab);
        self.argmax.clear();
        &mut self.data[..n]
    }

    /// Makes room for the argmax of `rows` rows instead of the rows (see [`BatchEntry::argmax_only`]) and
    /// returns them to fill.
    pub fn reset_argmax(&mut self, rows: usize) -> &mut [u32] {
        self.argmax.clear();
        self.argmax.resize(rows, 0);
        (self.rows, self.vocab) = (rows, 0);
        &mut self.argmax
    }

    /// Whether the step returned indices instead of rows.
    pub fn is_argmax(&self) -> bool {
        self.vocab == 0 && self.rows > 0
    }

    /// Each row to sample from, in order.
    pub fn rows_to_sample(&mut self) -> Vec<Row<'_>> {
        if self.is_argmax() {
            self.argmax.iter().map(|&i| Row::Argmax(i)).collect()
        } else {
            self.rows_mut().map(Row::Logits).collect()
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `i` (not after [`Self::reset_argmax`]: the rows were not returned).
    pub fn row(&self, i: usize) -> &[f32] {
        debug_assert!(!self.is_argmax(), "a logits row asked of an argmax step");
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Every row, for writing.
    pub fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        self.data[..self.rows * self.vocab].chunks_exact_mut(self.vocab.max(1))
    }
}

/// Rows wanted from a batch: one per entry with `want_logits`.
fn wanted<K>(batch: &[BatchEntry<'_, K>]) -> usize {
    batch.iter().filter(|e| e.want_logits).count()
}

/// Whether a batch's wanted rows may come back as their argmax alone: some are wanted, and every one is
/// [`BatchEntry::argmax_only`].
pub fn argmax_suffices<K>(batch: &[BatchEntry<'_, K>]) -> bool {
    let mut wanted = batch.iter().filter(|e| e.want_logits).peekable();
    wanted.peek().is_some() && wanted.all(|e| e.argmax_only)
}

/// Text of generated ids and the ids that end generation.
pub trait Detokenizer: Send + Sync {
    /// Decodes ids, leaving special tokens out; a partial character decodes as U+FFFD.
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError>;
    /// Whether this id ends generation.
    fn is_stop(&self, id: u32) -> bool;
}

impl Detokenizer for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        TextTokenizer::decode(self, ids)
    }

    fn is_stop(&self, id: u32) -> bool {
        TextTokenizer::is_stop(self, id)
    }
}

impl KvCache for SeqKv {
    fn len(&self) -> usize {
        SeqKv::len(self)
    }

    fn stored_bytes(&self) -> usize {
        SeqKv::stored_bytes(self)
    }

    fn shrink_to_len(&mut self) {
        SeqKv::shrink_to_len(self);
    }

    fn copy_prefix(&mut self, from: &Self, n: usize) -> bool {
        SeqKv::copy_prefix(self, from, n).is_ok()
    }

    fn fork(&self) -> Self {
        self.clone()
    }
}

/// The batched llama forward on the CPU, over a loaded [`Model`] whose forward is [`Forward::Cpu`].
pub struct LlamaBackend(pub Arc<Model>);

impl Backend for LlamaBackend {
    type Kv = SeqKv;

    fn kv_bytes_per_token(&self) -> usize {
        self.0.config.kv_shape().bytes_per_token()
    }

    fn new_kv(&self, initial: usize, max_len: usize) -> SeqKv {
        SeqKv::new(self.0.config.kv_shape(), initial, max_len)
    }

    fn step(&self, batch: &mut [BatchEntry<'_, SeqKv>], logits: &mut Logits) -> Result<(), StepError> {
        let Some(llama) = self.0.cpu() else {
            return Err(StepError("the model is not on the CPU forward".into()));
        };
        let out = logits.reset(wanted(batch), self.0.config.vocab_size);
        let mut chunks: Vec<SeqChunk<'_>> = batch
            .iter_mut()
            .map(|e| SeqChunk {
                kv: &mut *e.kv,
                tokens: e.tokens,
                want_logits: e.want_logits,
            })
            .collect();
        Ok(llama.forward_into(&mut chunks, out)?)
    }
}

impl KvCache for PagedKv {
    fn len(&self) -> usize {
        PagedKv::len(self)
    }

    fn stored_bytes(&self) -> usize {
        PagedKv::stored_bytes(self)
    }

    fn shrink_to_len(&mut self) {
        PagedKv::shrink_to_len(self);
    }

    fn copy_prefix(&mut self, from: &Self, n: usize) -> bool {
        PagedKv::copy_prefix(self, from, n)
    }

    fn fork(&self) -> Self {
        PagedKv::fork(self)
    }
}

/// The device-generic forward ([`Forward::Device`]) with its paged KV pool.
pub struct DeviceBackend {
    model: Arc<Model>,
    pool: Arc<KvPool>,
}

impl DeviceBackend {
    /// The backend of a device model, with a pool of at least `config.kv_cache_bytes` (plus the margin
    /// [`budget::pool_bytes`] keeps for up to `max_batch_size` sequences). When `config.kv_cache_from_device`
    /// and the device reports its memory (a GPU), the budget is first set from its free memory
    /// ([`budget::budget_from_memory`]). On a GPU, two small steps load every kernel the first requests need
    /// ([`crate::model::device::DeviceLlama::warm_up`]). Decode steps replay as CUDA graphs when
    /// `config.cuda_graphs` asks and the model can.
    pub fn new(model: Arc<Model>, config: &mut EngineConfig) -> Result<Self, StepError> {
        let Forward::Device(llama, info) = &model.forward else {
            return Err(StepError("the model is not on a device forward".into()));
        };
        let per_token = KvPool::bytes_per_token(model.config.kv_shape(), llama.kv_dtype());
        if config.kv_cache_from_device {
            if let Some((free, total)) = llama.memory()? {
                let kv = budget::budget_from_memory(
                    free,
                    total,
                    per_token,
                    model.config.context_length,
                    config.max_batch_size,
                );
                tracing::info!(
                    kv_cache_mb = kv >> 20,
                    free_mb = free >> 20,
                    total_mb = total >> 20,
                    "KV cache sized from the GPU's free memory (--kv-cache-mb sets it)"
                );
                config.kv_cache_bytes = kv;
            }
        }
        let pool = llama.new_pool(budget::pool_bytes(
            config.kv_cache_bytes,
            per_token,
            config.max_batch_size,
        ))?;
        if llama.device().is_cuda() {
            // Loads the kernels (the driver compiles candle's PTX at first use) before the server is ready, so the
            // first requests do not wait for it and a kernel that cannot run fails the load.
            let started = std::time::Instant::now();
            llama.warm_up(&pool)?;
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "warmed up: the kernels the first requests need are loaded"
            );
        }
        let max_rows = config.max_batch_tokens.max(config.max_prefill_tokens_alone);
        if config.cuda_graphs {
            match llama.enable_decode_graphs(config.max_batch_size, max_rows) {
                Ok(()) => tracing::info!(max_batch = config.max_batch_size, "decode steps replay as CUDA graphs"),
                Err(why) => tracing::warn!(device = %info.device, "--cuda-graphs ignored: {why}"),
            }
        }
        Ok(Self { model, pool })
    }

    /// The pool's blocks, free and in all.
    pub fn pool(&self) -> &KvPool {
        &self.pool
    }
}

impl Backend for DeviceBackend {
    type Kv = PagedKv;

    fn kv_bytes_per_token(&self) -> usize {
        match &self.model.forward {
            Forward::Device(l, _) => KvPool::bytes_per_token(self.model.config.kv_shape(), l.kv_dtype()),
            Forward::Cpu(_) => 0,
        }
    }

    fn new_kv(&self, _initial: usize, max_len: usize) -> PagedKv {
        PagedKv::new(self.pool.clone(), max_len)
    }

    fn step(&self, batch: &mut [BatchEntry<'_, PagedKv>], logits: &mut Logits) -> Result<(), StepError> {
        let Forward::Device(llama, _) = &self.model.forward else {
            return Err(StepError("the model is not on a device forward".into()));
        };
        let (n, argmax) = (wanted(batch), argmax_suffices(batch));
        let mut chunks: Vec<DeviceChunk<'_>> = batch
            .iter_mut()
            .map(|e| DeviceChunk {
                kv: &mut *e.kv,
                tokens: e.tokens,
                want_logits: e.want_logits,
            })
            .collect();
        let rows = llama.forward(&mut chunks, &self.pool)?;
        if argmax {
            // Greedy rows only: the indices leave the device, not the rows (64 rows of a 49k vocabulary are
            // 12.6 MB).
            return Ok(llama.argmax_to_host(&rows, logits.reset_argmax(n))?);
        }
        Ok(llama.rows_to_host(&rows, logits.reset(n, self.model.config.vocab_size))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kv: &mut (), want_logits: bool, argmax_only: bool) -> BatchEntry<'_, ()> {
        BatchEntry {
            kv,
            tokens: &[1],
            want_logits,
            argmax_only,
        }
    }

    #[test]
    fn indices_only_when_rows_are_wanted_and_every_one_takes_its_argmax() {
        let (mut a, mut b) = ((), ());
        // A prompt chunk that wants no row does not count either way.
        assert!(argmax_suffices(&[
            entry(&mut a, true, true),
            entry(&mut b, false, false)
        ]));
        assert!(!argmax_suffices(&[
            entry(&mut a, true, true),
            entry(&mut b, true, false)
        ]));
        assert!(!argmax_suffices(&[entry(&mut a, false, true)]), "no row wanted");
        let mut logits = Logits::default();
        logits.reset_argmax(2).copy_from_slice(&[7, 9]);
        assert!(logits.is_argmax());
        let ids: Vec<u32> = logits
            .rows_to_sample()
            .into_iter()
            .map(|r| match r {
                Row::Argmax(i) => i,
                Row::Logits(_) => panic!("a row after reset_argmax"),
            })
            .collect();
        assert_eq!(ids, [7, 9]);
        logits.reset(2, 3).fill(0.5);
        assert!(!logits.is_argmax());
        assert!(logits
            .rows_to_sample()
            .iter()
            .all(|r| matches!(r, Row::Logits(l) if l.len() == 3)));
    }
}
