//! The inference engine: one dedicated OS thread owns the model and runs continuous batching over it.
//!
//! Async code talks to it only through [`Engine`], a cheap handle holding a channel sender. A request first
//! takes places in the waiting queue ([`Engine::reserve`], refused at once when the queue is full), before any
//! work is spent on it; [`Slot::submit`] then queues the tokenized [`GenerateRequest`] and returns a per-request
//! receiver of [`Event`]s. Dropping that receiver cancels the request, queued or running, within one step.
//! The scheduler drives a [`backend::Backend`], so it can run any forward, and a stub in its unit tests.
//! Knows nothing of HTTP; never runs on a tokio worker.

pub mod backend;
pub mod constraint;
pub mod embedder;
pub mod logprobs;
pub mod params;
mod places;
mod prefix_cache;
pub mod sampler;
mod scheduler;
#[cfg(test)]
mod scheduler_tests;
mod sequence;
#[cfg(test)]
mod stub;
pub mod text;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::ModelMetrics;
use crate::model::{Forward, Model};
use backend::{Backend, Detokenizer, DeviceBackend, LlamaBackend};
use constraint::Constraint;
use logprobs::Sampled;
pub use params::GenerationParams;
pub(crate) use places::{AliveGuard, Places};

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together in one step.
    pub max_batch_size: usize,
    /// Most tokens (decode tokens plus prefill chunks) in one step.
    pub max_batch_tokens: usize,
    /// Most prompt tokens in one step when no sequence is decoding (no stream's latency to protect); at least
    /// `max_batch_tokens`.
    pub max_prefill_tokens_alone: usize,
    /// Bytes of KV cache the running sequences may reserve in total.
    pub kv_cache_bytes: usize,
    /// `kv_cache_bytes` is a default that a model on a GPU replaces by what the GPU's free memory holds
    /// ([`backend::DeviceBackend::new`]).
    pub kv_cache_from_device: bool,
    /// Most requests waiting for admission; more are refused.
    pub max_waiting: usize,
    /// Bytes of finished requests' KV kept for reuse by prompts with the same prefix (0: off). Counted within
    /// `kv_cache_bytes`: running requests evict it when they need the room.
    pub prefix_cache_bytes: usize,
    /// Replay decode steps as CUDA graphs (`--cuda-graphs`; a model on a CUDA device only).
    pub cuda_graphs: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The request's deadline passed.
    Timeout,
}

impl FinishReason {
    /// The metric label / wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Timeout => "timeout",
        }
    }
}

/// The end of a request, with its counts and timings.
#[derive(Debug, Clone)]
pub struct Completion {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were copied from the prefix cache instead of computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Time from submission to admission into the running batch.
    pub queue_time: Duration,
    /// Time from submission to the first generated token (None when none was generated: the request timed
    /// out while queued).
    pub time_to_first_token: Option<Duration>,
    /// Time from submission to the end of generation.
    pub total_time: Duration,
}

/// What the engine sends back for a request (for each choice of an `n > 1` request, on its own receiver).
#[derive(Debug, Clone)]
pub enum Event {
    /// A sampled token with its log-probabilities, sent before the text it releases; only when the request
    /// asked for `logprobs`. Stop tokens are not reported.
    Token(Sampled),
    /// New output text (whole characters, never part of a stop string).
    Text(String),
    /// Generation finished; nothing follows.
    Done(Completion),
    /// Generation failed on the server's side; nothing follows.
    Error(String),
    /// The request cannot be carried on as asked (its grammar failed mid-generation: a lexer or parser limit,
    /// a token it refuses); a client error. Nothing follows.
    Refused(String),
}

/// A tokenized, validated request.
pub struct GenerateRequest {
    /// Request id, for logs.
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// When the request must be answered by; it is cancelled with [`FinishReason::Timeout`] after.
    pub deadline: Option<Instant>,
    /// Choices to generate (at least 1): the prompt is read once and its cache forked to each.
    pub n: usize,
    /// The grammar every choice's output must follow, in its start state.
    pub constraint: Option<Box<dyn Constraint>>,
}

impl std::fmt::Debug for GenerateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateRequest")
            .field("id", &self.id)
            .field("prompt_tokens", &self.prompt.len())
            .field("params", &self.params)
            .field("n", &self.n)
            .field("constrained", &self.constraint.is_some())
            .finish()
    }
}

impl Clone for GenerateRequest {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            prompt: self.prompt.clone(),
            params: self.params.clone(),
            deadline: self.deadline,
            n: self.n,
            constraint: self.constraint.as_ref().map(|c| c.fork()),
        }
    }
}

impl GenerateRequest {
    /// An unconstrained single-choice request.
    pub fn new(id: impl Into<String>, prompt: Vec<u32>, params: GenerationParams, deadline: Option<Instant>) -> Self {
        Self {
            id: id.into(),
            prompt,
            params,
            deadline,
            n: 1,
            constraint: None,
        }
    }

    /// Most tokens one choice's sequence can hold: its prompt plus `max_tokens`.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.params.max_tokens
    }

    /// KV bytes the request reserves for its whole life (every choice), at `per_token` bytes a token.
    pub fn kv_bytes(&self, per_token: usize) -> usize {
        self.max_len() * per_token * self.n.max(1)
    }
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is at capacity: {waiting} requests are already waiting; retry later")]
    QueueFull { waiting: usize },
    #[error("the request needs {needed_mb} MiB of KV cache but the whole cache is {budget_mb} MiB (--kv-cache-mb)")]
    TooLarge { needed_mb: usize, budget_mb: usize },
    #[error("the inference engine is not running")]
    Stopped,
}

/// Counters shared between the engine thread and its handles. The engine thread writes `running` and
/// `kv_reserved_bytes`; the waiting queue's places are taken by handles and given back by the thread.
#[derive(Debug)]
pub struct EngineStats {
    places: Places,
    pub running: AtomicUsize,
    pub kv_reserved_bytes: AtomicUsize,
    alive: AtomicBool,
}

impl EngineStats {
    /// Requests holding a place in the waiting queue (being prepared or queued).
    pub fn waiting(&self) -> usize {
        self.places.taken()
    }

    /// Gives `n` places back (a request was admitted, dropped, or never submitted).
    fn release_waiting(&self, n: usize) {
        self.places.release(n);
    }
}

struct Job {
    req: GenerateRequest,
    /// One sender per choice; the first choice's sequence forks the others after reading the prompt.
    events: Vec<mpsc::UnboundedSender<Event>>,
    enqueued: Instant,
}

impl Job {
    /// Whether every choice's client has gone.
    fn abandoned(&self) -> bool {
        self.events.iter().all(|e| e.is_closed())
    }
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Job>,
    stats: Arc<EngineStats>,
    config: Arc<EngineConfig>,
    kv_bytes_per_token: usize,
    metrics: Arc<ModelMetrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A place in the waiting queue, held while a request is prepared (template, tokenization, validation).
/// Dropped unused, it goes back to the queue.
#[derive(Debug)]
pub struct Slot {
    engine: Engine,
    used: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.used {
            self.engine.stats.release_waiting(1);
        }
    }
}

impl Slot {
    /// Queues a single-choice request in this place; see [`Slot::submit_choices`].
    pub fn submit(self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        debug_assert_eq!(req.n, 1, "submit_choices serves n > 1");
        let mut rx = self.submit_choices(req)?;
        Ok(rx.swap_remove(0))
    }

    /// Queues the prepared request in this place; each choice's events arrive on its receiver, in choice
    /// order. Refused when its prompt and `max_tokens` (times `n`) could never fit the KV cache, or when the
    /// engine has stopped.
    pub fn submit_choices(mut self, req: GenerateRequest) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, SubmitError> {
        let engine = &self.engine;
        let needed = req.kv_bytes(engine.kv_bytes_per_token);
        if needed > engine.config.kv_cache_bytes {
            engine.metrics.finish("rejected");
            return Err(SubmitError::TooLarge {
                needed_mb: needed.div_ceil(1 << 20),
                budget_mb: engine.config.kv_cache_bytes >> 20,
            });
        }
        let (events, rx): (Vec<_>, Vec<_>) = (0..req.n.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        let job = Job {
            req,
            events,
            enqueued: Instant::now(),
        };
        engine.tx.send(job).map_err(|_| SubmitError::Stopped)?;
        // The queued job now holds the place; the scheduler gives it back at admission or drop.
        self.used = true;
        Ok(rx)
    }
}

impl Engine {
    /// Starts the engine thread over `model`'s forward (the CPU one, or the device one with its KV pool).
    pub fn start(
        model: Arc<Model>,
        config: EngineConfig,
        metrics: Arc<ModelMetrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let text: Arc<dyn Detokenizer> = Arc::new(model.tokenizer.clone());
        match &model.forward {
            Forward::Cpu(_) => Self::start_with(LlamaBackend(model), text, config, metrics),
            Forward::Device(..) => {
                let mut config = config;
                let backend = DeviceBackend::new(model, &mut config).map_err(std::io::Error::other)?;
                Self::start_with(backend, text, config, metrics)
            }
        }
    }

    /// Starts the engine thread over any backend.
    pub fn start_with<B: Backend>(
        backend: B,
        text: Arc<dyn Detokenizer>,
        config: EngineConfig,
        metrics: Arc<ModelMetrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        // The prefix cache lives within the KV budget, which a GPU may have sized only now.
        let config = EngineConfig {
            prefix_cache_bytes: config.prefix_cache_bytes.min(config.kv_cache_bytes),
            ..config
        };
        let (engine, rx) = Self::channel(config, metrics.clone(), backend.kv_bytes_per_token());
        let stats = engine.stats.clone();
        let config = (*engine.config).clone();
        let handle = std::thread::Builder::new()
            .name("amlserve-engine".into())
            .spawn(move || {
                let guard_stats = stats.clone();
                let _guard = AliveGuard {
                    alive: &guard_stats.alive,
                    thread: "engine",
                };
                scheduler::Scheduler::new(backend, text, config, rx, stats, metrics).run();
            })?;
        Ok((engine, handle))
    }

    /// A handle and the receiving end its jobs go to (the scheduler's).
    fn channel(
        config: EngineConfig,
        metrics: Arc<ModelMetrics>,
        kv_bytes_per_token: usize,
    ) -> (Self, std::sync::mpsc::Receiver<Job>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = Self {
            tx,
            stats: Arc::new(EngineStats {
                places: Places::new(config.max_waiting, metrics.waiting.clone()),
                running: AtomicUsize::new(0),
                kv_reserved_bytes: AtomicUsize::new(0),
                alive: AtomicBool::new(true),
            }),
            config: Arc::new(config),
            kv_bytes_per_token,
            metrics,
        };
        (engine, rx)
    }

    /// Takes `n` places in the waiting queue, all or none: refused at once (counted as rejected) when the
    /// queue is full or the engine has stopped. Call before spending work on a request.
    pub fn reserve(&self, n: usize) -> Result<Vec<Slot>, SubmitError> {
        self.take_places(n)?;
        Ok((0..n).map(|_| self.slot()).collect())
    }

    /// Takes a place and queues `req` in it.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        self.take_places(1)?;
        self.slot().submit(req)
    }

    fn take_places(&self, n: usize) -> Result<(), SubmitError> {
        let taken = if self.is_alive() {
            self.stats.places.take(n)
        } else {
            Err(SubmitError::Stopped)
        };
        if taken.is_err() {
            self.metrics.finish("rejected");
        }
        taken
    }

    /// The handle of a place already taken.
    fn slot(&self) -> Slot {
        Slot {
            engine: self.clone(),
            used: false,
        }
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.stats.alive.load(Ordering::SeqCst)
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The limits the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}
