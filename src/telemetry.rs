//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf) when an endpoint is configured, and nothing at all
//! when none is.
//!
//! [`OtlpConfig::resolve`] reads the endpoint (`--otlp-endpoint`, else the standard `OTEL_EXPORTER_OTLP_*`
//! variables) once, at start, and refuses one that cannot work with a message. [`Exporter::start`] builds the
//! pipeline: a batch span processor on the tokio runtime that posts to the collector with hyper, and the
//! `tracing` layer that turns the server's request spans (target [`SPAN_TARGET`]) into OpenTelemetry spans.
//! [`Exporter::shutdown`] flushes what is left at graceful shutdown, for a bounded time.
//!
//! The spans themselves are made by the server (`server::trace`): only when [`tracer`] is set, so with no
//! endpoint no span is created and requests cost what they did before. This module knows nothing of HTTP
//! routes or the engine. The metrics export (`crate::app_insights`) shares its resource naming
//! (`service_resource`) and its bounded flush at shutdown (`flush_within`).

use std::sync::OnceLock;
use std::time::Duration;

use http::Uri;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{ExporterBuildError, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::resource::ResourceBuilder;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::{runtime, Resource};
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::{Layer, Registry};

/// The `tracing` target of the spans that are exported; every other span and event stays out of the traces.
pub const SPAN_TARGET: &str = "amlserve::trace";

/// Where OTLP/HTTP traces go, relative to the base endpoint (the OpenTelemetry specification's path).
const TRACES_PATH: &str = "/v1/traces";

/// The service name when `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) sets none.
const SERVICE_NAME: &str = "amlserve";

/// The tracer of the running exporter; unset (and no span is made) when traces are off.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer spans are made with, when traces are exported.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Where traces are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The full URL spans are posted to (`.../v1/traces`).
    pub traces_url: String,
    /// Which setting it came from, for the start-up log line.
    pub source: &'static str,
}

impl OtlpConfig {
    /// The export target from `--otlp-endpoint` (a base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/traces`
    /// is appended unless the path already ends with it), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full
    /// URL), else `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` (traces off) when none is set or
    /// `OTEL_SDK_DISABLED=true`. `env` reads a variable (the process environment in production). An endpoint
    /// that cannot work is refused: not an `http://host[:port]` URL (the exporter has no TLS: send to a
    /// collector beside the server), or an OTLP protocol other than HTTP/protobuf asked for.
    pub fn resolve(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let flag = flag.filter(|v| !v.trim().is_empty()).map(str::to_string);
        let (source, value, base) = match (flag, set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(v), _) => ("--otlp-endpoint / AMLSERVE_OTLP_ENDPOINT", v, true),
            (None, Some(v)) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v, false),
            (None, None) => match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(v) => ("OTEL_EXPORTER_OTLP_ENDPOINT", v, true),
                None => return Ok(None),
            },
        };
        for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(p) = set(var).filter(|p| p.trim() != "http/protobuf") {
                return Err(format!(
                    "{var} is '{p}' but amlserve exports traces over OTLP HTTP/protobuf only: set it to http/protobuf \
                     (or unset it) and point {source} at the collector's HTTP port (4318 by default)"
                ));
            }
        }
        let value = value.trim();
        let uri: Uri = value
            .parse()
            .map_err(|e| format!("{source}: '{value}' is not a URL ({e}); expected http://host:port"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(_)) => {}
            (Some("https"), _) => {
                return Err(format!(
                    "{source}: '{value}' uses https, but amlserve sends OTLP without TLS: export to an OpenTelemetry \
                     Collector next to the server (http://localhost:4318), which forwards over TLS"
                ))
            }
            _ => return Err(format!("{source}: '{value}' is not an http://host:port URL")),
        }
        let traces_url = if base && !uri.path().ends_with(TRACES_PATH) {
            format!("{}{TRACES_PATH}", value.trim_end_matches('/'))
        } else {
            value.to_string()
        };
        Ok(Some(Self { traces_url, source }))
    }
}

/// The `tracing` layer that exports the request spans (put it first on the registry).
pub type ExportLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The running export pipeline.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `config` and returns the layer to add to the subscriber. Call inside the tokio
    /// runtime (the batch processor is a task on it) and at most once.
    pub fn start(config: &OtlpConfig) -> Result<(Self, ExportLayer), ExporterBuildError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.traces_url.clone())
            .build()?;
        let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource())
            .build();
        let tracer = provider.tracer("amlserve");
        let _ = TRACER.set(tracer.clone());
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(
                filter_fn(|m| m.is_span() && m.target() == SPAN_TARGET).with_max_level_hint(LevelFilter::INFO),
            );
        Ok((Self { provider }, Box::new(layer)))
    }

    /// Exports the spans still buffered (requests that finished just before shutdown) and stops, waiting at
    /// most `within` for a collector that does not answer. Call outside the runtime's workers, while the
    /// runtime still runs (the export is a task on it).
    pub fn shutdown(self, within: Duration) {
        let provider = self.provider;
        flush_within("traces", within, move || provider.shutdown());
    }
}

/// Runs `shutdown` (an OpenTelemetry provider's, which blocks until its last export is done) on a thread of its
/// own and waits at most `within` for it, logging `<what> flushed` or why not. The export pipelines' shutdown.
pub(crate) fn flush_within(
    what: &'static str,
    within: Duration,
    shutdown: impl FnOnce() -> OTelSdkResult + Send + 'static,
) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("amlserve-{what}-flush"))
        .spawn(move || {
            let _ = done_tx.send(shutdown());
        });
    let outcome = match spawned {
        Ok(_) => done_rx.recv_timeout(within).map_err(|_| "timed out".to_string()),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(Ok(())) => tracing::info!("{what} flushed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "{what} not flushed at shutdown"),
        Err(e) => tracing::warn!(error = %e, within_secs = within.as_secs(), "{what} not flushed at shutdown"),
    }
}

/// The service's resource for traces: the SDK's detectors (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), with
/// `amlserve` as the name when they set none, and the version.
fn resource() -> Resource {
    let version = KeyValue::new("service.version", env!("CARGO_PKG_VERSION"));
    service_resource(Resource::builder, [version])
}

/// The resource `detected` makes (a builder with the detectors an exporter wants), with `amlserve` as the
/// `service.name` when they find none (the SDK's default is `unknown_service:<executable>`), and `extra`.
pub(crate) fn service_resource(
    detected: impl Fn() -> ResourceBuilder,
    extra: impl IntoIterator<Item = KeyValue>,
) -> Resource {
    let named = detected()
        .build()
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|n| !n.as_str().starts_with("unknown_service"));
    let builder = detected().with_attributes(extra);
    if named {
        builder.build()
    } else {
        builder.with_service_name(SERVICE_NAME).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, String> {
        OtlpConfig::resolve(flag, |name| {
            vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
    }

    fn url(flag: Option<&str>, vars: &[(&str, &str)]) -> String {
        resolve(flag, vars).expect("valid").expect("on").traces_url
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        assert_eq!(resolve(None, &[]), Ok(None));
        assert_eq!(resolve(Some(""), &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), Ok(None));
        let disabled = [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ];
        assert_eq!(resolve(Some("http://c:4318"), &disabled), Ok(None));
    }

    #[test]
    fn base_endpoints_get_the_traces_path_and_full_ones_are_kept() {
        assert_eq!(url(Some("http://c:4318"), &[]), "http://c:4318/v1/traces");
        assert_eq!(url(Some("http://c:4318/"), &[]), "http://c:4318/v1/traces");
        assert_eq!(url(Some("http://c:4318/v1/traces"), &[]), "http://c:4318/v1/traces");
        assert_eq!(url(Some("http://c/otlp"), &[]), "http://c/otlp/v1/traces");
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4318")];
        assert_eq!(url(None, &env), "http://base:4318/v1/traces");
        let both = [env[0], ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/custom")];
        assert_eq!(url(None, &both), "http://t:4318/custom");
        assert_eq!(
            url(Some("http://flag:1"), &both),
            "http://flag:1/v1/traces",
            "the flag wins"
        );
    }

    #[test]
    fn endpoints_that_cannot_work_are_refused_naming_the_setting() {
        for (flag, vars, says) in [
            (Some("not a url"), vec![], "--otlp-endpoint"),
            (Some("localhost:4318"), vec![], "http://host:port"),
            (Some("https://c:4318"), vec![], "without TLS"),
            (
                None,
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                Some("http://c:4317"),
                vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                "HTTP/protobuf only",
            ),
        ] {
            let err = resolve(flag, &vars).expect_err("refused");
            assert!(err.contains(says), "{flag:?} {vars:?}: {err}");
        }
        let http = [("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")];
        assert!(resolve(Some("http://c:4318"), &http).is_ok());
    }
}
