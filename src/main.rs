//! The `amlserve` binary: parse the configuration, set up logging (and trace and metrics export), run the server.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use amlserve::app_insights::MetricsExport;
use amlserve::config::LogFormat;
use amlserve::metrics::Metrics;
use amlserve::model::device::DeviceChoice;
use amlserve::telemetry::{ExportLayer, Exporter};
use clap::Parser;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Longest wait at exit for buffered spans to reach the collector.
const TRACE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Longest wait at exit for the last metrics to reach Application Insights.
const METRICS_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Log lines (events only: the request spans are for the trace exporter, and would otherwise prefix every
/// line) at the level of `RUST_LOG`, else `AZUREML_LOG_LEVEL`, else info; and the exporter's layer, if any.
fn init_tracing(format: LogFormat, export: Option<ExportLayer>) {
    let level = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("AZUREML_LOG_LEVEL").map(|l| l.to_lowercase()))
        .unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::stdout().is_terminal()).boxed(),
    };
    let events = filter_fn(|m| m.is_event());
    tracing_subscriber::registry()
        .with(export)
        .with(fmt.with_filter(filter).with_filter(events))
        .init();
}

/// Refuses a setting at start: logged, told on stderr, exit code 2.
fn refuse(e: impl std::fmt::Display) -> ! {
    tracing::error!("{e}");
    eprintln!("amlserve: {e}");
    std::process::exit(2);
}

fn main() -> anyhow::Result<()> {
    amlserve::allocator::configure();
    let args = amlserve::config::Args::parse();
    let format = args.log_format;
    let config = args.validate();
    if let Ok(c) = &config {
        // Before any other thread exists: it sets environment variables candle reads once.
        let gpu =
            amlserve::model::device::cuda_built() && !matches!(c.device, DeviceChoice::Cpu | DeviceChoice::CandleCpu);
        amlserve::set_compute_threads(c.threads, gpu);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let otlp = config.as_ref().ok().and_then(|c| c.otlp.clone());
    let exporter = otlp.as_ref().map(|o| {
        let _in_runtime = runtime.enter();
        Exporter::start(o)
    });
    let (exporter, layer) = match exporter.transpose() {
        Ok(started) => started.unzip(),
        Err(e) => {
            init_tracing(format, None);
            refuse(format!("cannot export traces: {e}"));
        }
    };
    init_tracing(format, layer);
    let config = config.unwrap_or_else(|e| refuse(e));
    tracing::info!(
        threads = config.threads,
        "compute threads set (CANDLE_NUM_THREADS, RAYON_NUM_THREADS)"
    );
    if let Some(o) = &otlp {
        tracing::info!(endpoint = %o.traces_url, from = o.source, "exporting traces over OTLP/HTTP");
    }
    let metrics = Arc::new(Metrics::new());
    let metrics_export = config.app_insights.as_ref().map(|a| {
        let _in_runtime = runtime.enter();
        let export = MetricsExport::start(a, metrics.clone())
            .unwrap_or_else(|e| refuse(format!("cannot export metrics to Application Insights: {e}")));
        tracing::info!(
            ingestion = %a.ingestion,
            from = a.source,
            interval_secs = a.interval.as_secs(),
            "exporting metrics to Application Insights"
        );
        export
    });
    let served = runtime.block_on(amlserve::server::run(config, metrics));
    if let Some(export) = metrics_export {
        export.shutdown(METRICS_FLUSH_LIMIT);
    }
    if let Some(exporter) = exporter {
        exporter.shutdown(TRACE_FLUSH_LIMIT);
    }
    served
}
