//! The request spans exported as OpenTelemetry traces (see `telemetry`), made only while an exporter runs:
//! with none, [`request_span`] is `Span::none()` and every recording here returns at once.
//!
//! A request's span is opened by the access middleware: named `METHOD route` (a server span), it carries the
//! `request_id` and `client_request_id` of the log lines and response headers, and continues the trace of a
//! W3C `traceparent` header (the gateway's). Generation routes then record what the engine reported when the
//! request finished ([`GenerationTrace`]): model, token counts, finish reasons, and the engine's own timings
//! (the ones its metrics observe; nothing is measured twice) as attributes and as three child spans, `queue`
//! (waiting for admission), `prefill` (admission to the first token) and `decode` (first token to the end).
//! A stream's span stays open until the stream ends. Probes and `/metrics` are not traced: they would be
//! most of the traffic and say nothing.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, Tracer};
use opentelemetry::{Array, StringValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::error::ApiError;
use super::sse::Usage;
use super::Ready;
use crate::engine::Completion;
use crate::telemetry::{self, SPAN_TARGET};

/// Routes never traced.
const UNTRACED_ROUTES: [&str; 3] = ["/", "/health", "/metrics"];

/// The span of one request, child of the caller's trace when it sent a `traceparent`; `Span::none()` when no
/// exporter runs or the route is not traced.
pub fn request_span(headers: &HeaderMap, method: &str, route: &str, request_id: &str, client_id: Option<&str>) -> Span {
    if telemetry::tracer().is_none() || UNTRACED_ROUTES.contains(&route) {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        request_id = %request_id,
        client_request_id = client_id,
        http.request.method = %method,
        http.route = %route,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only for a span that is not exported, which records nothing either way.
    let _ = span.set_parent(parent);
    span
}

/// Records the response status (an error status from 500 on, as the HTTP conventions say for servers).
pub fn record_status(span: &Span, status: StatusCode) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.set_status(Status::error(status.as_str().to_string()));
    }
}

/// When a request's generations went through each phase, merged over its choices and prompts: the earliest
/// submission, admission and first token, the last end.
#[derive(Debug, Clone, Copy)]
struct Phases {
    submitted: SystemTime,
    admitted: SystemTime,
    first_token: Option<SystemTime>,
    ended: SystemTime,
}

impl Phases {
    /// The phases of one finished choice, from the engine's durations and when it ended.
    fn of(c: &Completion, ended: SystemTime) -> Self {
        let submitted = ended.checked_sub(c.total_time).unwrap_or(ended);
        Self {
            submitted,
            admitted: submitted + c.queue_time,
            first_token: c.time_to_first_token.map(|t| submitted + t),
            ended,
        }
    }

    fn merge(self, other: Self) -> Self {
        let first_token = match (self.first_token, other.first_token) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            submitted: self.submitted.min(other.submitted),
            admitted: self.admitted.min(other.admitted),
            first_token,
            ended: self.ended.max(other.ended),
        }
    }
}

fn millis(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).unwrap_or(Duration::ZERO).as_secs_f64() * 1000.0
}

/// What a generation request records on its span as its choices finish.
#[derive(Debug)]
pub struct GenerationTrace {
    span: Span,
    phases: Option<Phases>,
    reasons: Vec<&'static str>,
}

impl GenerationTrace {
    /// The trace of the request being handled (the current span), serving `ready`'s model.
    pub fn current(ready: &Ready) -> Self {
        let span = Span::current();
        if !span.is_disabled() {
            span.set_attribute("gen_ai.response.model", ready.model.name.clone());
        }
        Self {
            span,
            phases: None,
            reasons: Vec::new(),
        }
    }

    /// Adds a choice that finished at `ended` (when its completion was received).
    pub fn choice_done(&mut self, c: &Completion, ended: SystemTime) {
        if self.span.is_disabled() {
            return;
        }
        let p = Phases::of(c, ended);
        self.phases = Some(self.phases.map_or(p, |q| q.merge(p)));
        self.reasons.push(c.reason.as_str());
    }

    /// Records the counts and timings once every choice has finished.
    pub fn finish(&self, usage: &Usage) {
        let Some(p) = self.phases.filter(|_| !self.span.is_disabled()) else {
            return;
        };
        let span = &self.span;
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt as i64);
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion as i64);
        span.set_attribute("amlserve.cached_tokens", usage.cached as i64);
        let reasons: Vec<StringValue> = self.reasons.iter().map(|r| StringValue::from(*r)).collect();
        span.set_attribute("gen_ai.response.finish_reasons", Value::Array(Array::String(reasons)));
        span.set_attribute("amlserve.queue_ms", millis(p.submitted, p.admitted));
        let mut phases = vec![("queue", p.submitted, p.admitted)];
        if let Some(first) = p.first_token {
            span.set_attribute("amlserve.time_to_first_token_ms", millis(p.submitted, first));
            span.set_attribute("amlserve.prefill_ms", millis(p.admitted, first));
            span.set_attribute("amlserve.decode_ms", millis(first, p.ended));
            phases.extend([("prefill", p.admitted, first), ("decode", first, p.ended)]);
        }
        if let Some(tracer) = telemetry::tracer() {
            let parent = span.context();
            for (name, start, end) in phases {
                let mut child = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Internal)
                    .with_start_time(start)
                    .start_with_context(tracer, &parent);
                opentelemetry::trace::Span::end_with_timestamp(&mut child, end);
            }
        }
        self.end_here();
    }

    /// Marks the request failed after its response started (a stream that ended with an error event).
    pub fn failed(&self, e: &ApiError) {
        if e.status.is_server_error() && !self.span.is_disabled() {
            self.span.set_status(Status::error(e.message.clone()));
        }
        self.end_here();
    }

    /// Makes the request span end now at the earliest. An exported span ends when it was last exited, and a
    /// stream's was exited when its response head went out: entering it once more moves its end to the end
    /// of the generation.
    fn end_here(&self) {
        drop(self.span.enter());
    }
}
