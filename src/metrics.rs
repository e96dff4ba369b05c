//! Prometheus metrics for HTTP traffic and generation, named after vLLM's with an `amlserve_` prefix.
//!
//! One [`Metrics`] registry is made at start. The server counts HTTP traffic and serves the scrape; each served
//! model gets its own handle, [`ModelMetrics`] (a language model's engine thread: token timings, queue, batch
//! sizes, outcomes) or [`EmbeddingMetrics`] (an embedding thread), whose series all carry a `model` label with
//! the model's served name. HTTP series carry `model` too: the model a request was routed to, empty for
//! requests that name none (probes, `/metrics`, a route that failed before choosing one). Only the connection
//! loop's series and `amlserve_http_requests_in_flight` have no `model` label: they belong to the process, and
//! a request's model is not known when it comes in.
//!
//! Histograms have explicit buckets. Every label takes values from a fixed set, whatever clients send: routes
//! are the matched route template (`unmatched` otherwise, never the raw URI), methods the standard ones
//! (`other` otherwise, `server::access::method_label`), statuses the ones the server answers, models the served
//! names (a request naming another model is refused before it is counted under one), reasons and outcomes the
//! constants below.

use std::sync::Arc;

use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The label every model-specific series carries.
pub const MODEL_LABEL: &str = "model";

/// The registry and every metric family amlserve exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    families: ModelFamilies,
    embedding: EmbeddingFamilies,
    /// The HTTP connection loop's metrics.
    pub connections: ConnectionMetrics,
}

/// The language-model families, each with `model` as its first label.
struct ModelFamilies {
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    e2e_latency: HistogramVec,
    queue_time: HistogramVec,
    prompt_tokens: IntCounterVec,
    prefix_cache_hit_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_cache_usage: GaugeVec,
    batch_size: HistogramVec,
    forward_time: HistogramVec,
    step_time: HistogramVec,
    finished: IntCounterVec,
    constrained_requests: IntCounterVec,
    constraint_mask: HistogramVec,
    grammar_compile: HistogramVec,
    engine_stalled: IntGaugeVec,
}

/// One language model's series (its engine thread's and its grammar compiler's), all labelled with its name.
pub struct ModelMetrics {
    /// The model's served name (the `model` label).
    pub model: String,
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
    /// `amlserve_request_finished_total`, every model's (see [`Self::finish`]).
    finished: IntCounterVec,
    /// Requests admitted with a grammar (structured output or a forced tool call).
    pub constrained_requests: IntCounter,
    /// Time to compute one grammar's token mask (beside the forward).
    pub constraint_mask: Histogram,
    /// Time to compile a grammar (cache misses only).
    pub grammar_compile: Histogram,
    /// 1 while the engine has work but makes no progress (`--engine-stall-secs`; liveness fails), else 0.
    pub engine_stalled: IntGauge,
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

/// A histogram family labelled by model.
fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &[MODEL_LABEL])
        .expect("valid histogram")
}

/// A counter family labelled by model (and `more`).
fn counter(name: &str, help: &str, more: &[&str]) -> IntCounterVec {
    let labels: Vec<&str> = std::iter::once(MODEL_LABEL).chain(more.iter().copied()).collect();
    IntCounterVec::new(Opts::new(name, help), &labels).expect("valid counter")
}

/// A gauge family labelled by model.
fn gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &[MODEL_LABEL]).expect("valid gauge")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelFamilies {
    fn new() -> Self {
        Self {
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
            prompt_tokens: counter("amlserve_prompt_tokens_total", "Prompt tokens of admitted requests.", &[]),
            prefix_cache_hit_tokens: counter(
                "amlserve_prefix_cache_hit_tokens_total",
                "Prompt tokens whose KV was copied from the prefix cache instead of computed.",
                &[],
            ),
            generation_tokens: counter("amlserve_generation_tokens_total", "Generated tokens.", &[]),
            running: gauge("amlserve_num_requests_running", "Requests in the running batch."),
            waiting: gauge("amlserve_num_requests_waiting", "Requests waiting for admission."),
            kv_cache_usage: GaugeVec::new(
                Opts::new(
                    "amlserve_kv_cache_usage_perc",
                    "Fraction of the model's KV cache budget reserved (0-1).",
                ),
                &[MODEL_LABEL],
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
            finished: counter(
                "amlserve_request_finished_total",
                "Generation requests by how they ended.",
                &["reason"],
            ),
            constrained_requests: counter(
                "amlserve_constrained_requests_total",
                "Generation requests admitted with a grammar (structured output or a forced tool call).",
                &[],
            ),
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
            engine_stalled: gauge(
                "amlserve_engine_stalled",
                "1 while the model's engine has work but has made no progress for --engine-stall-secs (liveness fails).",
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.time_to_first_token.clone()),
            Box::new(self.inter_token_latency.clone()),
            Box::new(self.e2e_latency.clone()),
            Box::new(self.queue_time.clone()),
            Box::new(self.prompt_tokens.clone()),
            Box::new(self.prefix_cache_hit_tokens.clone()),
            Box::new(self.generation_tokens.clone()),
            Box::new(self.running.clone()),
            Box::new(self.waiting.clone()),
            Box::new(self.kv_cache_usage.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.forward_time.clone()),
            Box::new(self.step_time.clone()),
            Box::new(self.finished.clone()),
            Box::new(self.constrained_requests.clone()),
            Box::new(self.constraint_mask.clone()),
            Box::new(self.grammar_compile.clone()),
            Box::new(self.engine_stalled.clone()),
        ]
    }
}

impl Metrics {
    /// Creates and registers every metric family (no model's series yet: see [`Self::model`]).
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            http_requests: IntCounterVec::new(
                Opts::new(
                    "amlserve_http_requests_total",
                    "HTTP requests by matched route, method, status and the model served (empty when none).",
                ),
                &["route", "method", "status", MODEL_LABEL],
            )
            .expect("valid counter"),
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "amlserve_http_request_duration_seconds",
                    "Time to the response head, by route, method and the model served (empty when none).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route", "method", MODEL_LABEL],
            )
            .expect("valid histogram"),
            http_in_flight: IntGauge::new("amlserve_http_requests_in_flight", "HTTP requests being handled.")
                .expect("valid gauge"),
            families: ModelFamilies::new(),
            embedding: EmbeddingFamilies::new(),
            connections: ConnectionMetrics::new(),
        };
        let http: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.http_in_flight.clone()),
        ];
        let all = http
            .into_iter()
            .chain(m.families.collectors())
            .chain(m.embedding.collectors())
            .chain(m.connections.collectors());
        for c in all {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// The series of language model `name` (created at zero, so they are scraped before its first request).
    pub fn model(&self, name: &str) -> Arc<ModelMetrics> {
        let f = &self.families;
        let l = [name];
        for reason in OUTCOMES {
            f.finished.with_label_values(&[name, reason]);
        }
        Arc::new(ModelMetrics {
            model: name.to_string(),
            time_to_first_token: f.time_to_first_token.with_label_values(&l),
            inter_token_latency: f.inter_token_latency.with_label_values(&l),
            e2e_latency: f.e2e_latency.with_label_values(&l),
            queue_time: f.queue_time.with_label_values(&l),
            prompt_tokens: f.prompt_tokens.with_label_values(&l),
            prefix_cache_hit_tokens: f.prefix_cache_hit_tokens.with_label_values(&l),
            generation_tokens: f.generation_tokens.with_label_values(&l),
            running: f.running.with_label_values(&l),
            waiting: f.waiting.with_label_values(&l),
            kv_cache_usage: f.kv_cache_usage.with_label_values(&l),
            batch_size: f.batch_size.with_label_values(&l),
            forward_time: f.forward_time.with_label_values(&l),
            step_time: f.step_time.with_label_values(&l),
            finished: f.finished.clone(),
            constrained_requests: f.constrained_requests.with_label_values(&l),
            constraint_mask: f.constraint_mask.with_label_values(&l),
            grammar_compile: f.grammar_compile.with_label_values(&l),
            engine_stalled: f.engine_stalled.with_label_values(&l),
        })
    }

    /// The series of embedding model `name`.
    pub fn embedding_model(&self, name: &str) -> Arc<EmbeddingMetrics> {
        Arc::new(self.embedding.model(name))
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Every series of the counter or gauge family `name` (as in `/metrics`) with its current value; none for a
    /// name not registered, a family without series yet, or a histogram. The Application Insights export reads the
    /// registry through this, so it sends what a scrape shows.
    pub fn samples(&self, name: &str) -> Vec<Sample> {
        let Some(family) = self.registry.gather().into_iter().find(|f| f.name() == name) else {
            return Vec::new();
        };
        let kind = family.get_field_type();
        family
            .get_metric()
            .iter()
            .filter_map(|m| {
                let value = match kind {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => return None,
                };
                let labels = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                Some(Sample { labels, value })
            })
            .collect()
    }
}

/// One series of a counter or gauge, as [`Metrics::samples`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its labels (`model`, and `reason` for `amlserve_request_finished_total`...), names as in `/metrics`.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl ModelMetrics {
    /// Counts a finished request.
    pub fn finish(&self, reason: &str) {
        self.finished.with_label_values(&[&self.model, reason]).inc();
    }

    /// How many of this model's requests ended for `reason`.
    pub fn finished_count(&self, reason: &str) -> u64 {
        self.finished.with_label_values(&[&self.model, reason]).get()
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

/// The embedding families, each with `model` as its first label.
struct EmbeddingFamilies {
    waiting: IntGaugeVec,
    queue_time: HistogramVec,
    batch_size: HistogramVec,
    batch_tokens: HistogramVec,
    input_tokens: IntCounterVec,
    forward_time: HistogramVec,
    finished: IntCounterVec,
}

impl EmbeddingFamilies {
    fn new() -> Self {
        Self {
            waiting: gauge(
                "amlserve_embedding_requests_waiting",
                "Embedding requests queued or being embedded.",
            ),
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
            input_tokens: counter(
                "amlserve_embedding_input_tokens_total",
                "Tokens of embedding inputs computed (after truncation, padding not counted).",
                &[],
            ),
            forward_time: histogram(
                "amlserve_embedding_forward_seconds",
                "Time of each embedding batch forward, pooling included.",
                ITL_BUCKETS,
            ),
            finished: counter(
                "amlserve_embedding_requests_finished_total",
                "Embedding requests by how they ended.",
                &["outcome"],
            ),
        }
    }

    fn model(&self, name: &str) -> EmbeddingMetrics {
        let l = [name];
        for outcome in EMBEDDING_OUTCOMES {
            self.finished.with_label_values(&[name, outcome]);
        }
        EmbeddingMetrics {
            model: name.to_string(),
            waiting: self.waiting.with_label_values(&l),
            queue_time: self.queue_time.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            batch_tokens: self.batch_tokens.with_label_values(&l),
            input_tokens: self.input_tokens.with_label_values(&l),
            forward_time: self.forward_time.with_label_values(&l),
            finished: self.finished.clone(),
        }
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
}

/// One embedding model's series (`/v1/embeddings`, `/embeddings`), all labelled with its name.
pub struct EmbeddingMetrics {
    /// The model's served name (the `model` label).
    pub model: String,
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
    finished: IntCounterVec,
}

impl EmbeddingMetrics {
    /// Counts a finished embedding request.
    pub fn finish(&self, outcome: &str) {
        self.finished.with_label_values(&[&self.model, outcome]).inc();
    }

    /// How many of this model's embedding requests ended with `outcome`.
    pub fn finished_count(&self, outcome: &str) -> u64 {
        self.finished.with_label_values(&[&self.model, outcome]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_series_carries_its_model_label() {
        let m = Metrics::new();
        let (a, b) = (m.model("a"), m.model("b"));
        let e = m.embedding_model("e");
        a.generation_tokens.inc_by(3);
        a.finish("stop");
        e.finish("ok");
        assert_eq!((a.finished_count("stop"), b.finished_count("stop")), (1, 0));
        let text = m.render();
        assert!(
            text.contains("amlserve_generation_tokens_total{model=\"a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("amlserve_generation_tokens_total{model=\"b\"} 0"),
            "{text}"
        );
        assert!(text.contains("amlserve_request_finished_total{model=\"a\",reason=\"stop\"} 1"));
        assert!(text.contains("amlserve_embedding_requests_finished_total{model=\"e\",outcome=\"ok\"} 1"));
        let label = |k: &str, v: &str| (k.to_string(), v.to_string());
        let tokens = m.samples("amlserve_generation_tokens_total");
        assert!(tokens.contains(&Sample {
            labels: vec![label("model", "a")],
            value: 3.0
        }));
        assert_eq!(tokens.len(), 2, "{tokens:?}");
        a.kv_cache_usage.set(0.25);
        let kv = m.samples("amlserve_kv_cache_usage_perc");
        assert!(kv.contains(&Sample {
            labels: vec![label("model", "a")],
            value: 0.25
        }));
        let stop_a = vec![label("model", "a"), label("reason", "stop")];
        assert!(m.samples("amlserve_request_finished_total").contains(&Sample {
            labels: stop_a,
            value: 1.0
        }));
        assert!(
            m.samples("amlserve_batch_size").is_empty(),
            "histograms are not samples"
        );
        assert!(m.samples("amlserve_no_such_metric").is_empty());
        for line in text.lines().filter(|l| l.starts_with("amlserve_")) {
            let process_wide = ["amlserve_http_requests_in_flight", "amlserve_http_connections"];
            if !process_wide.iter().any(|p| line.starts_with(p)) {
                assert!(line.contains("model=\""), "{line}");
            }
        }
    }
}
