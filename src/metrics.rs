//! Prometheus metrics for HTTP traffic and generation, named after vLLM's with an `amlserve_` prefix.
//!
//! One [`Metrics`] is made at start and shared by the server (HTTP metrics, scrape) and the engine thread
//! (token timings, queue, batch sizes, outcomes). Histograms have explicit buckets. Every label takes values
//! from a fixed set, whatever clients send: routes are the matched route template (`unmatched` otherwise, never
//! the raw URI), methods the standard ones (`other` otherwise, `server::access::method_label`), statuses the ones the
//! server answers, reasons and outcomes the constants below.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric amlserve exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub prefix_cache_hit_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_cache_usage: Gauge,
    pub batch_size: Histogram,
    /// Time of each forward step (the backend's work, logits back on the host).
    pub forward_time: Histogram,
    /// Time of each whole engine step: the forward, then sampling and sending for every sequence.
    pub step_time: Histogram,
    pub finished: IntCounterVec,
    /// Requests admitted with a grammar (structured output or a forced tool call).
    pub constrained_requests: IntCounter,
    /// Time to compute one grammar's token mask (beside the forward).
    pub constraint_mask: Histogram,
    /// Time to compile a grammar (cache misses only).
    pub grammar_compile: Histogram,
    /// 1 while the engine has work but makes no progress (`--engine-stall-secs`; liveness fails), else 0.
    pub engine_stalled: IntGauge,
    /// The embedding engine's metrics.
    pub embedding: EmbeddingMetrics,
    /// The HTTP connection loop's metrics.
    pub connections: ConnectionMetrics,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
const MASK_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0];

/// Reasons a request ends, as the `reason` label of `amlserve_request_finished_total`.
pub const OUTCOMES: &[&str] = &["stop", "length", "cancelled", "timeout", "rejected", "error"];

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            http_requests: IntCounterVec::new(
                Opts::new(
                    "amlserve_http_requests_total",
                    "HTTP requests by matched route, method and status.",
                ),
                &["route", "method", "status"],
            )
            .expect("valid counter"),
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "amlserve_http_request_duration_seconds",
                    "Time to the response head, by route and method.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "method"],
            )
            .expect("valid histogram"),
            http_in_flight: IntGauge::new("amlserve_http_requests_in_flight", "HTTP requests being handled.")
                .expect("valid gauge"),
            time_to_first_token: histogram(
                "amlserve_time_to_first_token_seconds",
                "Time from queueing a request to its first generated token.",
                LATENCY_BUCKETS,
            ),
            inter_token_latency: histogram(
                "amlserve_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request.",
                ITL_BUCKETS,
            ),
            e2e_latency: histogram(
                "amlserve_e2e_request_latency_seconds",
                "Time from queueing a request to its end.",
                LATENCY_BUCKETS,
            ),
            queue_time: histogram(
                "amlserve_request_queue_time_seconds",
                "Time a request waited before joining the running batch.",
                LATENCY_BUCKETS,
            ),
            prompt_tokens: IntCounter::new("amlserve_prompt_tokens_total", "Prompt tokens of admitted requests.")
                .expect("valid counter"),
            prefix_cache_hit_tokens: IntCounter::new(
                "amlserve_prefix_cache_hit_tokens_total",
                "Prompt tokens whose KV was copied from the prefix cache instead of computed.",
            )
            .expect("valid counter"),
            generation_tokens: IntCounter::new("amlserve_generation_tokens_total", "Generated tokens.")
                .expect("valid counter"),
            running: IntGauge::new("amlserve_num_requests_running", "Requests in the running batch.")
                .expect("valid gauge"),
            waiting: IntGauge::new("amlserve_num_requests_waiting", "Requests waiting for admission.")
                .expect("valid gauge"),
            kv_cache_usage: Gauge::new(
                "amlserve_kv_cache_usage_perc",
                "Fraction of the KV cache budget reserved (0-1).",
            )
            .expect("valid gauge"),
            batch_size: histogram("amlserve_batch_size", "Sequences in each forward step.", BATCH_BUCKETS),
            forward_time: histogram(
                "amlserve_forward_seconds",
                "Time of each forward step, logits back on the host.",
                ITL_BUCKETS,
            ),
            step_time: histogram(
                "amlserve_step_seconds",
                "Time of each engine step: the forward, then sampling and sending for every sequence.",
                ITL_BUCKETS,
            ),
            finished: IntCounterVec::new(
                Opts::new(
                    "amlserve_request_finished_total",
                    "Generation requests by how they ended.",
                ),
                &["reason"],
            )
            .expect("valid counter"),
            constrained_requests: IntCounter::new(
                "amlserve_constrained_requests_total",
                "Generation requests admitted with a grammar (structured output or a forced tool call).",
            )
            .expect("valid counter"),
            constraint_mask: histogram(
                "amlserve_constraint_mask_seconds",
                "Time to compute one sequence's grammar mask for one token (runs beside the forward).",
                MASK_BUCKETS,
            ),
            grammar_compile: histogram(
                "amlserve_grammar_compile_seconds",
                "Time to compile a grammar (cache misses).",
                LATENCY_BUCKETS,
            ),
            engine_stalled: IntGauge::new(
                "amlserve_engine_stalled",
                "1 while the engine has work but has made no progress for --engine-stall-secs (liveness fails).",
            )
            .expect("valid gauge"),
            embedding: EmbeddingMetrics::new(),
            connections: ConnectionMetrics::new(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.http_in_flight.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.inter_token_latency.clone()),
            Box::new(m.e2e_latency.clone()),
            Box::new(m.queue_time.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.prefix_cache_hit_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.running.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.kv_cache_usage.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.forward_time.clone()),
            Box::new(m.step_time.clone()),
            Box::new(m.finished.clone()),
            Box::new(m.constrained_requests.clone()),
            Box::new(m.constraint_mask.clone()),
            Box::new(m.grammar_compile.clone()),
            Box::new(m.engine_stalled.clone()),
        ];
        let more = m.embedding.collectors().into_iter().chain(m.connections.collectors());
        for c in collectors.into_iter().chain(more) {
            m.registry.register(c).expect("unique metric names");
        }
        for reason in OUTCOMES {
            m.finished.with_label_values(&[reason]);
        }
        m
    }

    /// Counts a finished request.
    pub fn finish(&self, reason: &str) {
        self.finished.with_label_values(&[reason]).inc();
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Why the connection loop closed a connection, as the `timeout` label of
/// `amlserve_http_connections_timed_out_total`.
pub const CONNECTION_TIMEOUTS: &[&str] = &["header_read", "idle"];

/// Metrics of the HTTP connection loop (the main listener and `--metrics-port` together).
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections open.
    pub open: IntGauge,
    /// Connections closed because the client sent no complete request head in time, or sat idle.
    pub timed_out: IntCounterVec,
}

impl ConnectionMetrics {
    fn new() -> Self {
        let m = Self {
            open: IntGauge::new(
                "amlserve_http_connections_open",
                "Client connections open (bounded by --max-connections per listener).",
            )
            .expect("valid gauge"),
            timed_out: IntCounterVec::new(
                Opts::new(
                    "amlserve_http_connections_timed_out_total",
                    "Connections closed by the server because the client stalled: no complete request head in time \
                     (header_read) or idle past --idle-timeout-secs (idle).",
                ),
                &["timeout"],
            )
            .expect("valid counter"),
        };
        for t in CONNECTION_TIMEOUTS {
            m.timed_out.with_label_values(&[t]);
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.open.clone()), Box::new(self.timed_out.clone())]
    }
}

/// Reasons an embedding request ends, as the `outcome` label of `amlserve_embedding_requests_finished_total`.
pub const EMBEDDING_OUTCOMES: &[&str] = &["ok", "rejected", "cancelled", "timeout", "error"];

const EMBEDDING_BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const EMBEDDING_TOKEN_BUCKETS: &[f64] = &[
    16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Metrics of the embedding engine (`/v1/embeddings`, `/embeddings`), registered with the others.
pub struct EmbeddingMetrics {
    /// Requests in the embedding engine: queued, or with inputs not all computed yet.
    pub waiting: IntGauge,
    pub queue_time: Histogram,
    /// Inputs per batch forward.
    pub batch_size: Histogram,
    /// Padded tokens (rows x longest row) per batch forward.
    pub batch_tokens: Histogram,
    /// Tokens of inputs computed (after truncation, without padding).
    pub input_tokens: IntCounter,
    /// Time of each batch forward (pooling included).
    pub forward_time: Histogram,
    pub finished: IntCounterVec,
}

impl EmbeddingMetrics {
    fn new() -> Self {
        let m = Self {
            waiting: IntGauge::new(
                "amlserve_embedding_requests_waiting",
                "Embedding requests queued or being embedded.",
            )
            .expect("valid gauge"),
            queue_time: histogram(
                "amlserve_embedding_queue_time_seconds",
                "Time an embedding request waited before its first input ran in a forward.",
                LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "amlserve_embedding_batch_size",
                "Inputs in each embedding forward.",
                EMBEDDING_BATCH_BUCKETS,
            ),
            batch_tokens: histogram(
                "amlserve_embedding_batch_tokens",
                "Padded tokens (rows x longest row) in each embedding forward.",
                EMBEDDING_TOKEN_BUCKETS,
            ),
            input_tokens: IntCounter::new(
                "amlserve_embedding_input_tokens_total",
                "Tokens of embedding inputs computed (after truncation, padding not counted).",
            )
            .expect("valid counter"),
            forward_time: histogram(
                "amlserve_embedding_forward_seconds",
                "Time of each embedding batch forward, pooling included.",
                ITL_BUCKETS,
            ),
            finished: IntCounterVec::new(
                Opts::new(
                    "amlserve_embedding_requests_finished_total",
                    "Embedding requests by how they ended.",
                ),
                &["outcome"],
            )
            .expect("valid counter"),
        };
        for outcome in EMBEDDING_OUTCOMES {
            m.finished.with_label_values(&[outcome]);
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.waiting.clone()),
            Box::new(self.queue_time.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.batch_tokens.clone()),
            Box::new(self.input_tokens.clone()),
            Box::new(self.forward_time.clone()),
            Box::new(self.finished.clone()),
        ]
    }

    /// Counts a finished embedding request.
    pub fn finish(&self, outcome: &str) {
        self.finished.with_label_values(&[outcome]).inc();
    }
}
