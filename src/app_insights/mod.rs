//! amlserve's scaling metrics in Azure Monitor Application Insights, so an Azure ML deployment (whose platform
//! never scrapes `/metrics`) can autoscale on its queue depth.
//!
//! Off unless a connection string is configured ([`AppInsightsConfig::resolve`]: `--app-insights-connection-string`
//! / `APPLICATIONINSIGHTS_CONNECTION_STRING`, else the instrumentation key Azure ML's `app_insights_enabled`
//! provides). [`MetricsExport::start`] then sends, every `--metrics-export-interval-secs`, the current values of a
//! few series of the Prometheus registry ([`EXPORTED`]: queue depth, running batch, KV-cache use, token and request
//! counters), read from the registry itself at each export, so what Application Insights gets is what `/metrics`
//! shows, under the same names and with the same `model` (and `reason`) labels, plus the instance and whatever
//! `OTEL_RESOURCE_ATTRIBUTES` says (`deploy.sh` puts the Azure ML deployment there). [`MetricsExport::shutdown`]
//! sends the last values at graceful shutdown, for a bounded time.
//!
//! The posting is the `opentelemetry-application-insights` exporter's (envelopes to `<ingestion endpoint>/v2/track`,
//! gzip-compressed JSON), over the hyper client of `https`: the ingestion endpoints are HTTPS only.

mod config;
mod export;
mod https;

pub use config::AppInsightsConfig;
pub use export::{Kind, MetricsExport, EXPORTED};
