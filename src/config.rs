//! Command line and environment configuration, validated once into a [`Config`].
//!
//! Every flag can also be set by an environment variable (shown in `--help`), so a container is configured
//! without changing its command. Azure ML's own variables are honoured where they mean the same thing:
//! `AZUREML_MODEL_DIR` for the model and `SCORING_TIMEOUT_MS` for the request timeout.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::app_insights::AppInsightsConfig;
use crate::engine::embedder::EmbedderConfig;
use crate::engine::EngineConfig;
use crate::model::device::{self, DeviceChoice};
use crate::model::files::{self, ModelNotFound};
use crate::model::{ContentTokens, WeightFormat};
use crate::server::transport::Limits;
use crate::server::types::{GenerationDefaults, MIN_P, REPETITION_PENALTY, TEMPERATURE, TOP_P};
use crate::telemetry::OtlpConfig;

/// Where `make models` puts the default model.
pub const DEFAULT_MODEL: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `make models` puts the default embedding model.
pub const DEFAULT_EMBEDDING_MODEL: &str = "models/all-minilm-l6-v2";

/// amlserve: an LLM inference server with the Azure ML scoring contract and OpenAI-compatible routes.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Language model to serve: a .gguf file, a Hugging Face folder (config.json, *.safetensors,
    /// tokenizer.json; llama, mistral, qwen2, qwen3, gemma3, phi3), or a folder searched (4 levels deep) for
    /// either, a GGUF first; served under the GGUF's file name without `.gguf`, or the folder's name. When unset, the folder in AZUREML_MODEL_DIR (set by Azure ML), else the SmolLM2
    /// file that `make models` downloads. Repeat as `--model NAME=PATH` to serve several models in one process:
    /// the first is the default (for requests without a `model` field), and a request's `model` field (a
    /// `model` key in the /score body) picks one by NAME; an unknown name is a 404 listing the served ones.
    /// An embedding model's name is a 400; with a single language model any other name is accepted, as
    /// OpenAI-compatible servers with one model do. Each language model runs on its own engine thread with an equal share of --kv-cache-mb and
    /// --prefix-cache-mb; the compute threads (--threads) are shared, not multiplied. NAME: letters, digits
    /// and `-_.:/@+`, unique among all models (embedding models included). AMLSERVE_MODEL holds one entry.
    #[arg(long = "model", env = "AMLSERVE_MODEL", value_name = "[NAME=]PATH")]
    pub model: Vec<String>,

    /// Embedding model for /v1/embeddings and /embeddings: a sentence-transformers folder (config.json,
    /// model.safetensors, tokenizer.json), e.g. all-MiniLM-L6-v2, served under the folder's name. When unset,
    /// the folder `make models` fills is used if present; `none` disables embeddings. Repeat as
    /// `--embedding-model NAME=DIR` for several; embedding requests pick one by their `model` field (the first
    /// is the default), and embedding models are listed with the language models in /v1/models and /info.
    #[arg(
        long = "embedding-model",
        env = "AMLSERVE_EMBEDDING_MODEL",
        value_name = "[NAME=]DIR"
    )]
    pub embedding_model: Vec<String>,

    /// Chat template for a model whose GGUF (or tokenizer_config.json) carries none (a base model such as Gemma 3 270M): `chatml`, or the
    /// path of a Jinja file (Hugging Face's `chat_template` syntax). Without one, such a model serves the
    /// completion routes and refuses chat requests with a 400. A model with its own template keeps it.
    #[arg(long, env = "AMLSERVE_CHAT_TEMPLATE", value_name = "chatml|PATH")]
    pub chat_template: Option<String>,

    /// Address to listen on. 0.0.0.0 accepts connections from outside the container.
    #[arg(long, env = "AMLSERVE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on; 5001 is the Azure ML inference server's port. 0 picks a free port (printed in the log).
    #[arg(long, env = "AMLSERVE_PORT", default_value_t = 5001)]
    pub port: u16,

    /// How matrix weights are held in memory. q8_0 requantizes 4/5-bit blocks (and a Hugging Face folder's
    /// float weights) to Q8_0: fastest on CPU for single streams, prompts and batches. stored keeps the file's
    /// format (least memory; Q4_1 is slow in candle; a folder's floats are multiplied in f32); f32 / f16
    /// dequantize for gemm (4x / 2x the memory).
    #[arg(long, env = "AMLSERVE_WEIGHTS", value_enum, default_value_t = WeightFormat::Q8_0)]
    pub weights: WeightFormat,

    /// Where the model computes: `auto` (the GPU when this build has CUDA and the machine a GPU, else the CPU),
    /// `cpu`, or `cuda` / `cuda:N` (`candle-cpu` runs the GPU's forward on the CPU, for tests). On a GPU, weights are uploaded once as quantized tensors, the KV cache is a
    /// pool of 16-token blocks in GPU memory (sized by --kv-cache-mb) and attention runs on the GPU. A build
    /// without CUDA refuses `cuda` at start.
    #[arg(long, env = "AMLSERVE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// Experimental, GPU only: replay decode steps as CUDA graphs, one recorded per batch size (up to
    /// --max-batch-size), so a step costs one launch instead of a few hundred. Not yet measured on a GPU; off
    /// by default. One language model per process; ignored (with a warning) when the model is not on CUDA or
    /// with AMLSERVE_CUDA_EVENT_TRACKING=1.
    #[arg(long, env = "AMLSERVE_CUDA_GRAPHS")]
    pub cuda_graphs: bool,

    /// Compute threads for matrix kernels. Defaults to the CPUs available to the process.
    #[arg(long, env = "AMLSERVE_THREADS")]
    pub threads: Option<usize>,

    /// Largest request body accepted, in bytes; larger bodies get 413 (at once, by their Content-Length, when
    /// they declare one: an `Expect: 100-continue` client is not invited to upload).
    #[arg(long, env = "AMLSERVE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a client has to send a complete request head (request line and headers): counted from the
    /// accept for a connection's first request, from the first byte for later ones; then the connection is
    /// closed. Protects against clients that open connections and send their heads slowly or never
    /// (slowloris), each holding a connection slot (--max-connections).
    #[arg(long, env = "AMLSERVE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds a request body has to arrive in full, counted from its head; then the request is answered 408
    /// and its connection closed. Protects against bodies that trickle in, stop short of their Content-Length,
    /// or are chunked and never end: each would hold a request open, and shutdown waits for open requests.
    /// Only request bodies are timed, never responses (a long stream is not cut). At 30 s a body of 16 MiB
    /// (the default --max-body-bytes) needs about 0.6 MB/s.
    #[arg(long, env = "AMLSERVE_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,

    /// Seconds a kept-alive connection may sit with no request in flight before the server closes it.
    /// Protects against clients that hold idle connections, and connection slots, forever. Keep it above the
    /// idle timeout of the proxy in front (Azure ML's gateway and load balancers reuse connections; 60 s is
    /// common), so the proxy closes first and never sends a request down a connection being closed.
    #[arg(long, env = "AMLSERVE_IDLE_TIMEOUT_SECS", default_value_t = 75)]
    pub idle_timeout_secs: u64,

    /// Most client connections open at once (the --metrics-port listener has as many of its own). Further
    /// connections wait in the listen backlog until one closes (a proxy sees latency, not a refused
    /// connection). Protects memory and file descriptors against connection floods; the timeouts above free
    /// slots that stalled clients hold.
    #[arg(long, env = "AMLSERVE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Most requests (streams) at once on one HTTP/2 connection; a client opening more waits. HTTP/2 is served
    /// to clients that open with its preface (h2c, no TLS). Protects against one connection multiplexing
    /// unbounded work onto the server.
    #[arg(long, env = "AMLSERVE_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Most sequences generated together in one batched step. More raises throughput and per-token latency.
    #[arg(long, env = "AMLSERVE_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,

    /// Most tokens processed in one step (decode tokens plus prompt chunks). Long prompts are split into chunks of
    /// at most this size so they do not stall running streams. About one prompt per step beside the running
    /// streams gives the lowest time to first token: measured at 16 streams of 70-token prompts, TTFT p50
    /// 32 -> 134 ms, 64 -> 106 ms, 128 -> 159 ms, 512 -> 408 ms, at the same tokens/s.
    #[arg(long, env = "AMLSERVE_MAX_BATCH_TOKENS", default_value_t = 64)]
    pub max_batch_tokens: usize,

    /// Most prompt tokens in one step while no stream is generating (no running stream's latency to protect):
    /// larger chunks keep the matrix kernels busier on long prompts. Measured on a 4k-token prompt alone: 562
    /// tok/s in chunks of 64, 674 in chunks of 512. A request arriving meanwhile waits at most one such step.
    /// Values below --max-batch-tokens act as --max-batch-tokens.
    #[arg(long, env = "AMLSERVE_MAX_PREFILL_TOKENS_ALONE", default_value_t = 512)]
    pub max_prefill_tokens_alone: usize,

    /// Memory for the KV cache, in MiB. A request reserves room for its prompt plus max_tokens; requests wait
    /// for admission until their reservation fits. The process-wide total: with several language models
    /// (--model repeated), each gets an equal share. Default: 2048; for one language model on a GPU, what the
    /// GPU has free once the weights are in, less a tenth of its memory (at least 1 GiB) for activations, and no
    /// more than --max-batch-size sequences at full context need.
    #[arg(long, env = "AMLSERVE_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,

    /// Memory, in MiB and within --kv-cache-mb, for keeping finished requests' KV cache so a new prompt that
    /// starts with the same tokens (a chat template's system preamble, a conversation's earlier turns) skips
    /// computing them; least recently used first out, and running requests take the room back when they need it.
    /// 0 turns it off; more than --kv-cache-mb is capped to it. Outputs are the same either way.
    #[arg(long, env = "AMLSERVE_PREFIX_CACHE_MB", default_value_t = 256)]
    pub prefix_cache_mb: usize,

    /// Most choices (`n`) one chat or completion request may ask for (at most 16). The prompt is read once and
    /// its cache copied to each choice; each choice holds its own KV reservation.
    #[arg(long, env = "AMLSERVE_MAX_N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub max_n: u16,

    /// Compiled grammars (structured outputs, forced tool calls) kept for reuse, keyed by schema; least recently
    /// used first out. Compiling a JSON schema takes milliseconds; this makes repeated schemas free.
    #[arg(long, env = "AMLSERVE_GRAMMAR_CACHE", default_value_t = 256)]
    pub grammar_cache: usize,

    /// Tokenize special-token text inside chat message content (`<|im_end|>`, `<|im_start|>`...) as control
    /// tokens, as llama.cpp and vLLM do. Off by default: content is text, only the chat template's own markup is
    /// control, so a user cannot close their turn and forge an assistant or system turn. Raw prompts
    /// (`/v1/completions`, `/score` text inputs) are always parsed for special tokens.
    #[arg(long, env = "AMLSERVE_PARSE_SPECIAL_IN_CONTENT")]
    pub parse_special_in_content: bool,

    /// Most requests waiting for a place in the batch, counting those whose prompts are still being prepared; more
    /// are refused at once with 429 and Retry-After, before any template is rendered or prompt tokenized, so an
    /// overload costs the running streams next to nothing. A request with more prompts than this is a 400.
    #[arg(long, env = "AMLSERVE_MAX_WAITING", default_value_t = 128)]
    pub max_waiting: usize,

    /// Longest a request may take, queue time included, in milliseconds; then it is cancelled and answered
    /// with a timeout error. Also read from SCORING_TIMEOUT_MS (the Azure ML inference server's variable).
    /// [default: 3600000]
    #[arg(long, env = "AMLSERVE_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,

    /// Log line format: text for people, json (one object per line) for log pipelines such as Azure Monitor.
    /// The level comes from RUST_LOG, else AZUREML_LOG_LEVEL, else info.
    #[arg(long, env = "AMLSERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve /metrics on this port too (e.g. one not exposed outside the cluster). When set, /metrics is
    /// served only there, on --metrics-host.
    #[arg(long, env = "AMLSERVE_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Address the --metrics-port listener binds. Loopback by default, so a separate metrics port is not
    /// reachable from outside the host (or pod) unless asked for; in Kubernetes, where Prometheus scrapes the
    /// pod IP, set 0.0.0.0 (deploy/kubernetes does).
    #[arg(long, env = "AMLSERVE_METRICS_HOST", default_value = "127.0.0.1")]
    pub metrics_host: IpAddr,

    /// On SIGTERM or Ctrl-C: readiness fails at once and, after --drain-delay-secs, new work is refused;
    /// in-flight requests (streams too) get this many seconds to finish, then the process exits 0. The
    /// platform's termination grace period must cover the drain delay plus this.
    #[arg(long, env = "AMLSERVE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// On SIGTERM, keep serving new requests for this many seconds while readiness (/health) already answers
    /// 503, so the gateway or load balancer in front can take the instance out of rotation before requests are
    /// refused (clients would otherwise see errors until it notices). Then new work is refused and in-flight
    /// requests get --shutdown-grace-secs. Set it above the time the readiness probe takes to fail
    /// (period x failure threshold); 0 (the default) refuses at once, as fits a local run or a platform with a
    /// preStop hook. A second SIGTERM ends the delay early.
    #[arg(long, env = "AMLSERVE_DRAIN_DELAY_SECS", default_value_t = 0)]
    pub drain_delay_secs: u64,

    /// Liveness (GET /) and readiness fail when the engine has had work (sequences running or requests
    /// waiting) but completed no forward step for this many seconds: a wedged engine is restarted by the
    /// platform's liveness probe. Sampled twice a second; an idle engine never counts as stalled. Keep it well
    /// above the longest single step (a step is at most --max-batch-tokens tokens: milliseconds on a small
    /// model, seconds on a large one on CPU).
    #[arg(long, env = "AMLSERVE_ENGINE_STALL_SECS", default_value_t = 60)]
    pub engine_stall_secs: u64,

    /// Test-only fault injection: the engine thread's first forward step this many seconds after it starts
    /// never returns (the engine wedges), to test the --engine-stall-secs watchdog. Never set in production.
    #[arg(long, env = "AMLSERVE_DEBUG_WEDGE_ENGINE_AFTER_SECS", hide = true)]
    pub debug_wedge_engine_after_secs: Option<u64>,

    /// Most tokens one request may generate: a request asking for more (max_tokens, max_completion_tokens,
    /// /score max_new_tokens) is a 400 naming the field and this limit, and a request that sets none gets at
    /// most this (--default-max-tokens is lowered to it). Size it so a generation fits the platform's request
    /// timeout (Azure ML request_timeout_ms, at most 180 s) and the shutdown grace: limit / per-stream decode
    /// speed at a full batch. Shown in GET /info and /v1/models. Unset: only the context window limits it.
    #[arg(long, env = "AMLSERVE_MAX_TOKENS_LIMIT")]
    pub max_tokens_limit: Option<usize>,

    /// Require this key on every route except /, /health and /metrics, as `Authorization: Bearer <key>` or
    /// `api-key: <key>`. For use outside Azure ML, whose gateway checks keys itself. An empty key (or one with
    /// spaces around it, which no header can carry) is refused at start rather than leaving the routes open.
    #[arg(long, env = "AMLSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Export OpenTelemetry traces over OTLP/HTTP (protobuf) to this collector, e.g. http://localhost:4318
    /// (spans go to <url>/v1/traces). Each request (but the probes and /metrics) is a span carrying its
    /// request_id (as logged and sent in x-request-id), route and status; generations add the model, token
    /// counts, finish reasons and the engine's timings (queue, prefill, decode, time to first token), with child
    /// spans for those three phases. A W3C `traceparent` header from the gateway continues its trace.
    /// Spans are sent in batches every few seconds (OTEL_BSP_* variables tune it) and flushed at shutdown (for
    /// up to 5 s). http only, no TLS: run an OpenTelemetry Collector beside the server (a sidecar or agent)
    /// that forwards to Azure Monitor / Application Insights or any other backend. Unset: the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT are used if set, else no traces (and no
    /// cost). OTEL_SERVICE_NAME (default amlserve), OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS,
    /// OTEL_TRACES_SAMPLER and OTEL_SDK_DISABLED are honoured. An endpoint that is not an http://host:port URL
    /// is refused at start.
    #[arg(long, env = "AMLSERVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Send the scaling metrics to this Azure Monitor Application Insights resource (its connection string, from the
    /// resource's Overview page): amlserve_num_requests_waiting, amlserve_num_requests_running,
    /// amlserve_kv_cache_usage_perc and the token and request counters, as on /metrics (same names, `model` label),
    /// every --metrics-export-interval-secs and once more at shutdown, so Azure Monitor autoscale can read them (a
    /// managed online endpoint does not scrape /metrics). Sent over TLS to the ingestion endpoint. Unset: when the
    /// Azure ML deployment has app_insights_enabled: true, the workspace's Application Insights (the
    /// AML_APP_INSIGHTS_KEY it passes), else no export. The key is never logged; a string that cannot work (no
    /// InstrumentationKey, Authorization=AAD, an endpoint that is not a URL) is refused at start.
    #[arg(
        long,
        env = "APPLICATIONINSIGHTS_CONNECTION_STRING",
        hide_env_values = true,
        value_name = "CONNECTION_STRING"
    )]
    pub app_insights_connection_string: Option<String>,

    /// Seconds between two exports of the metrics to Application Insights (1-3600). Azure Monitor aggregates them per
    /// minute and autoscale evaluates at that grain, so more often than 60 s only adds ingestion.
    #[arg(
        long,
        env = "AMLSERVE_METRICS_EXPORT_INTERVAL_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub metrics_export_interval_secs: u64,

    /// Origins allowed by CORS: a comma-separated list, or * for any (azmlinfsrv's AML_CORS_ORIGINS).
    /// Unset: no CORS headers.
    #[arg(long, env = "AML_CORS_ORIGINS")]
    pub cors_origins: Option<String>,

    /// max_tokens used when a request sets none (capped by the room left in the context window and by
    /// --max-tokens-limit).
    #[arg(long, env = "AMLSERVE_DEFAULT_MAX_TOKENS", default_value_t = GenerationDefaults::DEFAULT.max_tokens)]
    pub default_max_tokens: usize,

    /// temperature used when a request sets none (OpenAI's default, 1; 0 = greedy). These --default-* values
    /// are shown in GET /info and /v1/models; a value in the request always wins.
    #[arg(long, env = "AMLSERVE_DEFAULT_TEMPERATURE", default_value_t = GenerationDefaults::DEFAULT.temperature)]
    pub default_temperature: f64,

    /// top_p used when a request sets none (1 = off). With top_k and min_p, llama.cpp's defaults: without any
    /// filter a small model at temperature 1 samples from its long tail and answers garbage.
    #[arg(long, env = "AMLSERVE_DEFAULT_TOP_P", default_value_t = GenerationDefaults::DEFAULT.top_p)]
    pub default_top_p: f64,

    /// top_k used when a request sets none (0 = off).
    #[arg(long, env = "AMLSERVE_DEFAULT_TOP_K", default_value_t = GenerationDefaults::DEFAULT.top_k)]
    pub default_top_k: usize,

    /// min_p used when a request sets none (0 = off): drops tokens less likely than this times the likeliest.
    #[arg(long, env = "AMLSERVE_DEFAULT_MIN_P", default_value_t = GenerationDefaults::DEFAULT.min_p)]
    pub default_min_p: f64,

    /// repetition_penalty used when a request sets none (1 = off).
    #[arg(
        long,
        env = "AMLSERVE_DEFAULT_REPETITION_PENALTY",
        default_value_t = GenerationDefaults::DEFAULT.repetition_penalty
    )]
    pub default_repetition_penalty: f64,

    /// Most padded tokens (inputs x longest input) in one embedding forward. Inputs of concurrent requests are
    /// sorted by length and packed up to this. On 2 cores, 64 concurrent short requests ran 1.6-1.7x the
    /// sequential rate at 512-1024, 1.5x at 2048 and 1.1x at 4096 (bigger padded batches cost more per token),
    /// and every input in a batch waits for the whole forward. An input longer than this runs alone.
    #[arg(long, env = "AMLSERVE_EMBEDDING_MAX_BATCH_TOKENS", default_value_t = 1024)]
    pub embedding_max_batch_tokens: usize,

    /// Most embedding requests queued or being embedded; more are refused at once with 429 and Retry-After,
    /// before their inputs are tokenized. Separate from --max-waiting, so embeddings cannot crowd out chat.
    #[arg(long, env = "AMLSERVE_EMBEDDING_MAX_WAITING", default_value_t = 128)]
    pub embedding_max_waiting: usize,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One model to serve: the name requests select it by, and its file (a .gguf) or folder (a Hugging Face
/// language model, an embedding model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    /// A Hugging Face folder found beside the GGUF that is served instead (logged at load).
    pub passed_over: Option<PathBuf>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The language models, the default first; never empty.
    pub models: Vec<ModelSpec>,
    /// The embedding models (the default first), if embeddings are served.
    pub embedding_models: Vec<ModelSpec>,
    pub host: IpAddr,
    pub port: u16,
    pub weights: WeightFormat,
    /// `--chat-template`: for a model without a template of its own.
    pub chat_template: Option<String>,
    /// Where the model computes (`--device`).
    pub device: DeviceChoice,
    pub threads: usize,
    pub max_body_bytes: usize,
    /// Each language model's engine limits (its share of the KV and prefix cache budgets included).
    pub engine: EngineConfig,
    pub request_timeout: Duration,
    /// What requests get for the sampling fields they leave out.
    pub generation: GenerationDefaults,
    pub metrics_port: Option<u16>,
    pub metrics_host: IpAddr,
    /// Connection limits and timeouts (`--header-read-timeout-secs` ... `--max-concurrent-streams`).
    pub transport: Limits,
    pub shutdown_grace: Duration,
    /// How long new requests are still served after SIGTERM (`--drain-delay-secs`).
    pub drain_delay: Duration,
    /// Busy without progress for this long fails liveness (`--engine-stall-secs`).
    pub engine_stall: Duration,
    /// Test-only: when the engine wedges (`--debug-wedge-engine-after-secs`).
    pub debug_wedge_engine_after: Option<Duration>,
    pub api_key: Option<String>,
    pub cors_origins: Vec<String>,
    pub embedder: EmbedderConfig,
    pub max_n: usize,
    pub grammar_cache: usize,
    pub content_tokens: ContentTokens,
    /// Where traces are exported (`--otlp-endpoint` or the standard variables); None: no traces.
    pub otlp: Option<OtlpConfig>,
    /// Where the metrics are exported (`--app-insights-connection-string`, or Azure ML's key); None: no export.
    pub app_insights: Option<AppInsightsConfig>,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    ModelNotFound(#[from] ModelNotFound),
    #[error("{0}")]
    Invalid(String),
}

/// The API key as given, unless it is set but could never be matched: an empty value (e.g. an unfilled
/// `AMLSERVE_API_KEY=`) would otherwise leave every route open without a word.
fn checked_api_key(key: Option<String>) -> Result<Option<String>, ConfigError> {
    let refuse = |why: &str| Err(ConfigError::Invalid(format!("--api-key / AMLSERVE_API_KEY {why}")));
    match key {
        Some(k) if k.trim().is_empty() => {
            refuse("is set but empty, which would leave every route open: set a key, or unset it to serve without one")
        }
        Some(k) if k.trim() != k => refuse("has spaces around it, which no client can send in a header: remove them"),
        k => Ok(k),
    }
}

/// `--kv-cache-mb` when not given (and what a GPU-sized budget falls back to off the GPU).
pub const DEFAULT_KV_CACHE_MB: usize = 2048;

impl Args {
    /// Checks the settings and resolves the model path.
    pub fn validate(self) -> Result<Config, ConfigError> {
        if matches!(self.device, DeviceChoice::Cuda(_)) && !device::cuda_built() {
            return Err(ConfigError::Invalid(
                device::DeviceError::NoCudaBuild(self.device).to_string(),
            ));
        }
        let positive = [
            ("--max-batch-size", self.max_batch_size),
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--kv-cache-mb", self.kv_cache_mb.unwrap_or(1)),
            ("--max-body-bytes", self.max_body_bytes),
            ("--default-max-tokens", self.default_max_tokens),
            ("--max-waiting", self.max_waiting),
            ("--embedding-max-batch-tokens", self.embedding_max_batch_tokens),
            ("--embedding-max-waiting", self.embedding_max_waiting),
            ("--max-connections", self.max_connections),
            ("--max-tokens-limit", self.max_tokens_limit.unwrap_or(1)),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
        }
        // A zero timeout would close every connection at once; there is no "off".
        let positive_u64 = [
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--body-read-timeout-secs", self.body_read_timeout_secs),
            ("--idle-timeout-secs", self.idle_timeout_secs),
            ("--max-concurrent-streams", u64::from(self.max_concurrent_streams)),
            ("--engine-stall-secs", self.engine_stall_secs),
        ];
        if let Some((name, _)) = positive_u64.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
        }
        let api_key = checked_api_key(self.api_key)?;
        if let Some(spec) = self.chat_template.as_deref().filter(|&s| s != "chatml") {
            if !std::path::Path::new(spec).is_file() {
                return Err(ConfigError::Invalid(format!(
                    "--chat-template {spec}: neither 'chatml' nor a readable file"
                )));
            }
        }
        let otlp = OtlpConfig::resolve(self.otlp_endpoint.as_deref(), |v| std::env::var(v).ok())
            .map_err(ConfigError::Invalid)?;
        let app_insights = AppInsightsConfig::resolve(
            self.app_insights_connection_string.as_deref(),
            Duration::from_secs(self.metrics_export_interval_secs),
            |v| std::env::var(v).ok(),
        )
        .map_err(ConfigError::Invalid)?;
        if self.max_batch_tokens < self.max_batch_size {
            return Err(ConfigError::Invalid(format!(
                "--max-batch-tokens ({}) must be at least --max-batch-size ({}): each running sequence needs a token per step",
                self.max_batch_tokens, self.max_batch_size
            )));
        }
        for (name, range, v) in [
            ("--default-temperature", TEMPERATURE, self.default_temperature),
            ("--default-top-p", TOP_P, self.default_top_p),
            ("--default-min-p", MIN_P, self.default_min_p),
            (
                "--default-repetition-penalty",
                REPETITION_PENALTY,
                self.default_repetition_penalty,
            ),
        ] {
            if !v.is_finite() || !range.contains(v) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be {}; got {v}",
                    range.rule()
                )));
            }
        }
        let scoring_timeout = match std::env::var("SCORING_TIMEOUT_MS") {
            Ok(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                ConfigError::Invalid(format!(
                    "SCORING_TIMEOUT_MS must be a number of milliseconds, not '{v}'"
                ))
            })?),
            Err(_) => None,
        };
        let timeout_ms = self.request_timeout_ms.or(scoring_timeout).unwrap_or(3_600_000);
        let models = language_models(&self.model)?;
        let embedding_models = embedding_models(&self.embedding_model)?;
        if let Some(dup) = models.iter().chain(&embedding_models).enumerate().find_map(|(i, m)| {
            models
                .iter()
                .chain(&embedding_models)
                .skip(i + 1)
                .find(|o| o.name == m.name)
        }) {
            return Err(ConfigError::Invalid(format!(
                "two models are named '{}': give each its own name with --model NAME=PATH (or --embedding-model NAME=DIR)",
                dup.name
            )));
        }
        let shares = models.len();
        if self.cuda_graphs && shares > 1 {
            return Err(ConfigError::Invalid(
                "--cuda-graphs serves one language model per process: a stream recording one model's step would \
                 take in the other engines' work on the same GPU"
                    .into(),
            ));
        }
        let kv_cache_mb = self.kv_cache_mb.unwrap_or(DEFAULT_KV_CACHE_MB);
        if kv_cache_mb < shares {
            return Err(ConfigError::Invalid(format!(
                "--kv-cache-mb ({kv_cache_mb}) is split equally among the {shares} language models: give each at \
                 least 1 MiB"
            )));
        }
        let threads = self
            .threads
            .filter(|&t| t > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Ok(Config {
            models,
            embedding_models,
            host: self.host,
            port: self.port,
            weights: self.weights,
            chat_template: self.chat_template.clone(),
            device: self.device,
            threads,
            max_body_bytes: self.max_body_bytes,
            engine: EngineConfig {
                max_batch_size: self.max_batch_size,
                max_batch_tokens: self.max_batch_tokens,
                max_prefill_tokens_alone: self.max_prefill_tokens_alone,
                cuda_graphs: self.cuda_graphs,
                kv_cache_bytes: (kv_cache_mb << 20) / shares,
                kv_cache_from_device: self.kv_cache_mb.is_none() && shares == 1,
                max_waiting: self.max_waiting,
                // Within the KV budget: capped here, or where a GPU sizes that budget (Engine::start_with).
                prefix_cache_bytes: match self.kv_cache_mb.is_none() && shares == 1 {
                    true => self.prefix_cache_mb << 20,
                    false => (self.prefix_cache_mb.min(kv_cache_mb) << 20) / shares,
                },
            },
            request_timeout: Duration::from_millis(timeout_ms.max(1)),
            generation: GenerationDefaults {
                max_tokens: self
                    .max_tokens_limit
                    .map_or(self.default_max_tokens, |l| self.default_max_tokens.min(l)),
                max_tokens_limit: self.max_tokens_limit,
                temperature: self.default_temperature,
                top_p: self.default_top_p,
                top_k: self.default_top_k,
                min_p: self.default_min_p,
                repetition_penalty: self.default_repetition_penalty,
            },
            metrics_port: self.metrics_port,
            metrics_host: self.metrics_host,
            transport: Limits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
                max_connections: self.max_connections,
                max_concurrent_streams: self.max_concurrent_streams,
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            engine_stall: Duration::from_secs(self.engine_stall_secs),
            debug_wedge_engine_after: self.debug_wedge_engine_after_secs.map(Duration::from_secs),
            api_key,
            cors_origins: self
                .cors_origins
                .map(|o| {
                    o.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            embedder: EmbedderConfig {
                max_batch_tokens: self.embedding_max_batch_tokens,
                max_waiting: self.embedding_max_waiting,
            },
            max_n: usize::from(self.max_n),
            grammar_cache: self.grammar_cache,
            content_tokens: if self.parse_special_in_content {
                ContentTokens::Parsed
            } else {
                ContentTokens::Text
            },
            otlp,
            app_insights,
        })
    }
}

/// Characters a model name may use: what OpenAI-style ids use (`gpt-4o`, `org/model:tag`), nothing that needs
/// quoting in a URL path segment's neighbourhood, a log line or a metric label.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/@+".contains(c))
}

/// Splits `[NAME=]PATH`: a value that exists as a path is a PATH (even with a `=` in it); otherwise the part
/// before the first `=` is a NAME.
fn split_spec<'a>(flag: &str, value: &'a str) -> Result<(Option<&'a str>, &'a str), ConfigError> {
    if Path::new(value).exists() {
        return Ok((None, value));
    }
    match value.split_once('=') {
        None => Ok((None, value)),
        Some((name, path)) if valid_name(name) && !path.is_empty() => Ok((Some(name), path)),
        Some((name, "")) => Err(ConfigError::Invalid(format!(
            "{flag} {value}: no path after '{name}='; expected NAME=PATH"
        ))),
        Some((name, _)) => Err(ConfigError::Invalid(format!(
            "{flag} {value}: '{name}' is not a valid model name (1-128 letters, digits and -_.:/@+)"
        ))),
    }
}

/// The name a file or folder is served under when none is given: a file's name without the extension (the
/// name amlserve has always reported for a single `--model PATH`), a folder's whole name.
fn default_name(path: &Path, stem: bool) -> String {
    let part = if stem { path.file_stem() } else { path.file_name() };
    part.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// `--model` values (the first is the default), or the one model found the single-model way when none is given.
fn language_models(values: &[String]) -> Result<Vec<ModelSpec>, ConfigError> {
    if values.is_empty() {
        let env_dir = std::env::var_os("AZUREML_MODEL_DIR").map(PathBuf::from);
        let found = files::resolve(&[
            ("AZUREML_MODEL_DIR", env_dir),
            ("the default", Some(PathBuf::from(DEFAULT_MODEL))),
        ])?;
        return Ok(vec![ModelSpec {
            name: default_name(&found.path, found.path.is_file()),
            path: found.path,
            passed_over: found.passed_over,
        }]);
    }
    values
        .iter()
        .map(|v| {
            let (name, path) = split_spec("--model", v)?;
            let found = files::resolve(&[("--model / AMLSERVE_MODEL", Some(PathBuf::from(path)))])?;
            Ok(ModelSpec {
                name: name.map_or_else(|| default_name(&found.path, found.path.is_file()), str::to_string),
                path: found.path,
                passed_over: found.passed_over,
            })
        })
        .collect()
}

/// `--embedding-model` values: `none` (or empty) for no embeddings, else folders; unset, the `make models`
/// folder when it exists.
fn embedding_models(values: &[String]) -> Result<Vec<ModelSpec>, ConfigError> {
    if values.is_empty() {
        let dir = PathBuf::from(DEFAULT_EMBEDDING_MODEL);
        return Ok(if dir.join("config.json").is_file() {
            vec![ModelSpec {
                name: default_name(&dir, false),
                path: dir,
                passed_over: None,
            }]
        } else {
            Vec::new()
        });
    }
    if values.iter().any(|v| v == "none" || v.is_empty()) {
        if values.len() > 1 {
            return Err(ConfigError::Invalid(
                "--embedding-model none cannot be combined with embedding models".into(),
            ));
        }
        return Ok(Vec::new());
    }
    values
        .iter()
        .map(|v| {
            let (name, dir) = split_spec("--embedding-model", v)?;
            let path = PathBuf::from(dir);
            if !path.join("config.json").is_file() {
                return Err(ConfigError::Invalid(format!(
                    "--embedding-model {v}: not a sentence-transformers folder (no config.json); use `none` to serve no embeddings"
                )));
            }
            Ok(ModelSpec {
                name: name.map_or_else(|| default_name(&path, false), str::to_string),
                path,
                passed_over: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_values_split_into_name_and_path() {
        assert_eq!(split_spec("--model", "a.gguf").expect("ok"), (None, "a.gguf"));
        assert_eq!(
            split_spec("--model", "chat=dir/a.gguf").expect("ok"),
            (Some("chat"), "dir/a.gguf")
        );
        assert_eq!(
            split_spec("--model", "org/m:1=x=y.gguf").expect("ok"),
            (Some("org/m:1"), "x=y.gguf")
        );
        for bad in ["=a.gguf", "bad name=a.gguf", "chat=", "ü=a"] {
            assert!(split_spec("--model", bad).is_err(), "{bad}");
        }
        // An existing path with a `=` in it stays a path.
        let dir = std::env::temp_dir().join(format!("amlserve-cfg-{}", std::process::id()));
        let odd = dir.join("a=b.gguf");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(&odd, b"").expect("write");
        let v = odd.to_string_lossy().into_owned();
        assert_eq!(split_spec("--model", &v).expect("ok"), (None, v.as_str()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unnamed_models_are_served_under_their_file_stem() {
        assert_eq!(default_name(Path::new("m/SmolLM2.Q4_1.gguf"), true), "SmolLM2.Q4_1");
        assert_eq!(default_name(Path::new("m/all-minilm-l6-v2"), false), "all-minilm-l6-v2");
    }
}
