//! amlserve-loadtest: measures what users of an LLM endpoint feel as load grows.
//!
//! Sends a seeded workload to an OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`,
//! streamed) or an Azure ML online endpoint (`/score`), closed loop at a concurrency or open loop at a Poisson
//! rate, and reports time to first token, inter-token latency, time per output token, end-to-end latency,
//! throughput and errors as a table, JSON, Markdown and SVG charts. Soak mode holds one level for long,
//! with hostile clients mixed in, and judges the server instead (no 5xx, 429s with Retry-After, flat RSS,
//! no leaked slot).
//!
//! # Layout
//!
//! - [`cli`]: arguments -> one validated [`cli::Config`].
//! - [`workload`]: the requests (synthetic or JSONL), deterministic per seed and index.
//! - [`client`]: one HTTP exchange per request, timed; per-target JSON in `client/openai.rs`, `client/azureml.rs`.
//! - [`sse`]: incremental server-sent-events parser.
//! - [`runner`]: closed and open loop, warm-up, sweep, compare interleaving, progress bar.
//! - [`stats`]: HDR histograms per level -> [`stats::LevelResult`].
//! - [`report`]: terminal table, Markdown, JSON; [`plot`]: SVG charts.
//! - [`soak`]: soak mode (`--soak`): one long level of mixed, partly bad traffic, answers counted by status
//!   class, the server's RSS and gauges sampled, a pass/fail verdict.

pub mod cli;
pub mod client;
pub mod plot;
pub mod report;
pub mod runner;
pub mod soak;
pub mod sse;
pub mod stats;
pub mod workload;
