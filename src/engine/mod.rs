//! The inference engine: one dedicated OS thread owns the model and runs continuous batching over it.
//!
//! Async code talks to it only through [`Engine`], a cheap handle holding a channel sender: [`Engine::submit`]
//! queues a [`GenerateRequest`] (or refuses it at once when the waiting queue is full) and returns a per-request
//! receiver of [`Event`]s. Dropping that receiver cancels the request, queued or running, within one step.
//! Knows nothing of HTTP; never runs on a tokio worker.

pub mod embedder;
pub mod params;
mod prefix_cache;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod text;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::model::Model;
pub use params::GenerationParams;

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together in one step.
    pub max_batch_size: usize,
    /// Most tokens (decode tokens plus prefill chunks) in one step.
    pub max_batch_tokens: usize,
    /// Bytes of KV cache the running sequences may reserve in total.
    pub kv_cache_bytes: usize,
    /// Most requests waiting for admission; more are refused.
    pub max_waiting: usize,
    /// Bytes of finished requests' KV kept for reuse by prompts with the same prefix (0: off). Counted within
    /// `kv_cache_bytes`: running requests evict it when they need the room.
    pub prefix_cache_bytes: usize,
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
}

/// What the engine sends back for a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// New output text (whole characters, never part of a stop string).
    Text(String),
    /// Generation finished; nothing follows.
    Done(Completion),
    /// Generation failed; nothing follows.
    Error(String),
}

/// A tokenized, validated request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Request id, for logs.
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// When the request must be answered by; it is cancelled with [`FinishReason::Timeout`] after.
    pub deadline: Option<Instant>,
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

/// Counters shared between the engine thread and its handles.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_reserved_bytes: AtomicUsize,
    alive: AtomicBool,
}

struct Job {
    req: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Job>,
    stats: Arc<EngineStats>,
    config: Arc<EngineConfig>,
    kv_bytes_per_token: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Marks the engine dead when the thread ends, normally or by panic.
struct AliveGuard(Arc<EngineStats>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; readiness now fails");
        }
    }
}

impl Engine {
    /// Starts the engine thread for `model`.
    pub fn start(
        model: Arc<Model>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        stats.alive.store(true, Ordering::SeqCst);
        let kv_bytes_per_token = model.llama.config.kv_shape().bytes_per_token();
        let config = Arc::new(config);
        let thread_stats = stats.clone();
        let thread_config = config.clone();
        let thread_metrics = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("amlserve-engine".into())
            .spawn(move || {
                let _guard = AliveGuard(thread_stats.clone());
                scheduler::Scheduler::new(model, (*thread_config).clone(), rx, thread_stats, thread_metrics).run();
            })?;
        Ok((
            Self {
                tx,
                stats,
                config,
                kv_bytes_per_token,
                metrics,
            },
            handle,
        ))
    }

    /// Queues a request; events arrive on the returned receiver. Refuses at once when the queue is full.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        let result = self.try_submit(req);
        if result.is_err() {
            self.metrics.finish("rejected");
        }
        result
    }

    fn try_submit(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        let needed = (req.prompt.len() + req.params.max_tokens) * self.kv_bytes_per_token;
        if needed > self.config.kv_cache_bytes {
            return Err(SubmitError::TooLarge {
                needed_mb: needed.div_ceil(1 << 20),
                budget_mb: self.config.kv_cache_bytes >> 20,
            });
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job {
            req,
            events,
            enqueued: Instant::now(),
        };
        if self.tx.send(job).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
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
