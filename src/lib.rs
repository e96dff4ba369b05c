//! amlserve: an LLM inference server for Azure Machine Learning managed online endpoints, with the Azure ML
//! scoring contract and OpenAI-compatible routes, on a continuous-batching engine over candle.
//!
//! # Layout
//!
//! Dependencies point one way: `server` -> `engine` -> `model`.
//!
//! - [`allocator`]: glibc malloc settings that give freed large buffers back to the system.
//! - [`config`]: command line and environment, validated into one [`config::Config`].
//! - [`model`]: synchronous candle code: GGUF loading, tokenizer, chat template, batched llama forward, KV cache.
//! - [`engine`]: the engine thread: queue, admission, continuous batching, sampling, stop conditions, cancellation.
//! - [`grammar`]: constrained decoding: JSON schema, regex, choice and Lark grammars compiled with llguidance
//!   into the engine's `Constraint`s.
//! - [`server`]: axum routes (Azure ML and OpenAI), errors, request ids, SSE, readiness, shutdown, the request
//!   spans.
//! - [`telemetry`]: the OpenTelemetry trace exporter (OTLP/HTTP), off unless an endpoint is configured.
//! - [`app_insights`]: the scaling metrics (read from [`metrics`]) sent to Azure Monitor Application Insights, off
//!   unless a connection string is configured.

pub mod allocator;
pub mod app_insights;
pub mod config;
pub mod engine;
pub mod grammar;
pub mod metrics;
pub mod model;
pub mod server;
pub mod telemetry;

/// Idle spins of a pool thread before it sleeps in a CUDA build whose `--device` is not `cpu` (candle's default
/// is 25,000, about a millisecond). It is chosen before the device is opened (the pool reads it once, and
/// environment variables are set only before other threads exist), so `auto` falling back to the CPU keeps the
/// short spin too. There the pool only samples and copies logits between steps, and threads spinning
/// after each use competed with the engine thread launching the next step's kernels: on a 16-core H200 host,
/// single-stream decode fell from 338 to 180 tok/s.
const GPU_POOL_SPIN_LIMIT: &str = "1000";

/// Sets the thread counts of candle's kernel pools (and, for a GPU, how long their threads spin when idle). Must
/// run before any candle call (they read it once). An operator's `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
pub fn set_compute_threads(threads: usize, gpu: bool) {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        std::env::set_var(var, threads.to_string());
    }
    if gpu && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", GPU_POOL_SPIN_LIMIT);
    }
}
