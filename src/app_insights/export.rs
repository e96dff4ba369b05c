//! The export pipeline: OpenTelemetry observable instruments whose callbacks read the Prometheus registry, a
//! periodic reader on the tokio runtime, and the Application Insights exporter.
//!
//! Nothing is counted twice: at each export every instrument of [`EXPORTED`] reads its family's series from the
//! registry ([`Metrics::samples`]) and observes each with its labels as attributes. Gauges are sent as single
//! measurements; counters as the increase since the previous export (Application Insights takes deltas), so a
//! metric's sum over a minute is what the minute added. Each envelope also carries the resource: `service.name`
//! (cloud role), `service.instance.id` (cloud role instance: the host name unless `OTEL_RESOURCE_ATTRIBUTES` sets
//! one) and any other `OTEL_RESOURCE_ATTRIBUTES` entry, e.g. the `deployment` that `deploy.sh` sets per slot, which
//! the autoscale rules filter on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceBuilder, SdkProvidedResourceDetector};
use opentelemetry_sdk::{runtime, Resource};

use super::{https, AppInsightsConfig};
use crate::metrics::{Metrics, Sample};
use crate::telemetry;

/// How a family is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Its current value.
    Gauge,
    /// Its increase since the previous export.
    Counter,
}

/// The families exported, by their `/metrics` names: what the autoscale rules read (requests waiting) and what
/// tells why (the running batch, KV-cache use, tokens and requests). Each is a gauge or counter with a `model` label.
pub const EXPORTED: &[(&str, Kind)] = &[
    ("amlserve_num_requests_waiting", Kind::Gauge),
    ("amlserve_num_requests_running", Kind::Gauge),
    ("amlserve_kv_cache_usage_perc", Kind::Gauge),
    ("amlserve_generation_tokens_total", Kind::Counter),
    ("amlserve_prompt_tokens_total", Kind::Counter),
    ("amlserve_request_finished_total", Kind::Counter),
];

/// Longest a single post to the ingestion endpoint may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Least time between two log lines about retried uploads.
const RETRY_LOG_EVERY: Duration = Duration::from_secs(60);

/// The resource attribute Application Insights shows as the cloud role instance.
const INSTANCE: &str = "service.instance.id";

/// The running export.
#[derive(Debug)]
pub struct MetricsExport {
    provider: SdkMeterProvider,
}

impl MetricsExport {
    /// Starts exporting `metrics` as `config` says. Call inside the tokio runtime (the periodic reader is a task on
    /// it) and at most once. Fails when the client cannot be built (`SSL_CERT_FILE`) or the exporter refuses the
    /// connection string.
    pub fn start(config: &AppInsightsConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let client = https::client(REQUEST_TIMEOUT, config.extra_roots.as_deref())?;
        let exporter = opentelemetry_application_insights::Exporter::new_from_connection_string(
            config.connection_string(),
            client,
        )
        .map_err(|e| format!("{}: {e}", config.source))?
        .with_retry_notify(retry_logger());
        let reader = PeriodicReader::builder(exporter, runtime::Tokio)
            .with_interval(config.interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource())
            .build();
        let meter = provider.meter("amlserve");
        for &(name, kind) in EXPORTED {
            observe(&meter, name, kind, metrics.clone());
        }
        Ok(Self { provider })
    }

    /// Exports the current values once more and stops, waiting at most `within` for an endpoint that does not
    /// answer. Call outside the runtime's workers, while the runtime still runs (the export is a task on it).
    pub fn shutdown(self, within: Duration) {
        let provider = self.provider;
        telemetry::flush_within("metrics", within, move || provider.shutdown());
    }
}

/// Registers the instrument that reports family `name` from the registry at each export.
fn observe(meter: &Meter, name: &'static str, kind: Kind, metrics: Arc<Metrics>) {
    match kind {
        Kind::Gauge => {
            meter
                .f64_observable_gauge(name)
                .with_callback(move |o| {
                    for s in metrics.samples(name) {
                        o.observe(s.value, &attributes(&s));
                    }
                })
                .build();
        }
        Kind::Counter => {
            meter
                .u64_observable_counter(name)
                .with_callback(move |o| {
                    for s in metrics.samples(name) {
                        // Counters hold whole numbers (token and request counts).
                        o.observe(s.value as u64, &attributes(&s));
                    }
                })
                .build();
        }
    }
}

/// Logs why an upload is being retried (the endpoint does not answer, or answers 429, 5xx), at most once per
/// [`RETRY_LOG_EVERY`]: the exporter retries every few seconds, for up to 30 s per export, before the periodic
/// reader gives up on it (logged as `PeriodicReader.ExportFailed`) and tries again at the next export.
fn retry_logger() -> impl FnMut(&opentelemetry_application_insights::Error, Duration) + Send + 'static {
    let mut last: Option<Instant> = None;
    move |e, wait| {
        if last.is_some_and(|t| t.elapsed() < RETRY_LOG_EVERY) {
            return;
        }
        last = Some(Instant::now());
        let mut why = e.to_string();
        if let opentelemetry_application_insights::Error::UploadConnection(inner) = e {
            let mut cause = inner.source();
            while let Some(c) = cause {
                why.push_str(&format!(": {c}"));
                cause = c.source();
            }
        }
        tracing::warn!(
            error = %why,
            retry_in_ms = wait.as_millis() as u64,
            "metrics not accepted by Application Insights yet; retrying"
        );
    }
}

/// A series' labels as attributes.
fn attributes(sample: &Sample) -> Vec<KeyValue> {
    sample
        .labels
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect()
}

/// The service's identity and `OTEL_RESOURCE_ATTRIBUTES`, with the host as the instance unless those name one.
/// Lean on purpose (no SDK version attributes): every attribute becomes a dimension of every metric.
fn resource() -> Resource {
    let detected = || -> ResourceBuilder {
        Resource::builder_empty().with_detectors(&[
            Box::new(SdkProvidedResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ])
    };
    let given = detected().build().get(&Key::from_static_str(INSTANCE)).is_some();
    let instance = host_name().filter(|_| !given).map(|h| KeyValue::new(INSTANCE, h));
    telemetry::service_resource(detected, instance)
}

/// The host (container) name: `HOSTNAME` (set by Docker and Kubernetes, read by Azure ML's inference server too),
/// else the kernel's.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exported_family_is_in_the_registry_with_its_kind_and_model_label() {
        let m = Metrics::new();
        let _ = m.model("m");
        let text = m.render();
        for &(name, kind) in EXPORTED {
            let t = match kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            assert!(
                text.contains(&format!("# TYPE {name} {t}")),
                "{name} is not a {t}:\n{text}"
            );
            let samples = m.samples(name);
            assert!(!samples.is_empty(), "{name}");
            for s in samples {
                assert!(s.labels.iter().any(|(k, v)| k == "model" && v == "m"), "{name}: {s:?}");
            }
        }
    }

    #[test]
    fn the_resource_names_the_service_and_an_instance() {
        let r = resource();
        assert!(r.get(&Key::from_static_str("service.name")).is_some());
        assert!(r.get(&Key::from_static_str(INSTANCE)).is_some(), "{r:?}");
        assert!(
            r.get(&Key::from_static_str("telemetry.sdk.name")).is_none(),
            "no SDK attributes: each would be a dimension"
        );
    }
}
