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

pub mod allocator;
pub mod config;
pub mod engine;
pub mod grammar;
pub mod metrics;
pub mod model;
pub mod server;
pub mod telemetry;

/// Sets the thread counts of candle's kernel pools. Must run before any candle call (they read it once).
pub fn set_compute_threads(threads: usize) {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        std::env::set_var(var, threads.to_string());
    }
}
