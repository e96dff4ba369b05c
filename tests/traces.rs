//! OpenTelemetry traces against the real server and a real OTLP/HTTP receiver: a collector stand-in on
//! 127.0.0.1:0 inside the test decodes what `--otlp-endpoint` sends (protobuf, `POST /v1/traces`) with the
//! OpenTelemetry protocol's own types. A request's span continues the caller's `traceparent`, carries the request
//! id, the route, the model, the token counts, the finish reason and the engine's timings, with `queue`,
//! `prefill` and `decode` child spans, for JSON answers and streams alike; the spans of requests that finished
//! just before SIGTERM reach the collector before the process exits; an endpoint that cannot work stops the
//! start with a message.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::routing::post;
use common::{chat, model_path, Server};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

/// A span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    service: Option<String>,
}

/// An OTLP/HTTP trace receiver: keeps every span posted to `/v1/traces`.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

async fn receive(
    State(spans): State<Spans>,
    headers: HeaderMap,
    body: Bytes,
) -> ([(header::HeaderName, &'static str); 1], Vec<u8>) {
    assert_eq!(
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/x-protobuf"),
        "OTLP/HTTP protobuf"
    );
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export request");
    let mut got = spans.lock().expect("spans");
    for rs in req.resource_spans {
        let service = rs.resource.as_ref().and_then(|r| string(&r.attributes, "service.name"));
        for ss in rs.scope_spans {
            got.extend(ss.spans.into_iter().map(|span| Received {
                span,
                service: service.clone(),
            }));
        }
    }
    let ok = ExportTraceServiceResponse::default().encode_to_vec();
    ([(header::CONTENT_TYPE, "application/x-protobuf")], ok)
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let spans = Spans::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, spans }
    }

    /// The base endpoint, as `--otlp-endpoint` takes it.
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }

    /// The span of the request with this id and its `queue`, `prefill` and `decode` children, once all have
    /// arrived.
    async fn request(&self, request_id: &str) -> (Received, Vec<Span>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.received();
            if let Some(req) = all
                .iter()
                .find(|r| string(&r.span.attributes, "request_id").as_deref() == Some(request_id))
            {
                let children: Vec<Span> = all
                    .iter()
                    .filter(|r| r.span.parent_span_id == req.span.span_id)
                    .map(|r| r.span.clone())
                    .collect();
                if children.len() == 3 {
                    return (req.clone(), children);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no span (with 3 children) for request {request_id}; received {:#?}",
                all.iter().map(|r| &r.span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn string(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(Any::IntValue(i)) => *i,
        other => panic!("{key}: not an integer: {other:?}"),
    }
}

fn float(attrs: &[KeyValue], key: &str) -> f64 {
    match attr(attrs, key) {
        Some(Any::DoubleValue(f)) => *f,
        other => panic!("{key}: not a number: {other:?}"),
    }
}

fn strings(attrs: &[KeyValue], key: &str) -> Vec<String> {
    match attr(attrs, key) {
        Some(Any::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| match &v.value {
                Some(Any::StringValue(s)) => s.clone(),
                other => panic!("{key}: not a string: {other:?}"),
            })
            .collect(),
        other => panic!("{key}: not an array: {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The caller's trace: `traceparent` of a sampled span `parent` in trace `trace`.
fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

/// Sends a greedy chat request of exactly `tokens` generated tokens as part of the caller's trace.
async fn traced_chat(s: &Server, request_id: &str, parent: &str, stream: bool, tokens: u32) -> String {
    let mut body = chat("Name three colors.", tokens);
    body["ignore_eos"] = json!(true);
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("traceparent", parent)
        .header("x-request-id", request_id)
        .header("x-ms-client-request-id", format!("client-{request_id}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], request_id);
    r.text().await.expect("body")
}

/// Asserts what the span of a chat request of `tokens` tokens with id `request_id` in trace `trace` (child
/// of `parent`) says, and that its phases are its children, in order, within it.
fn assert_request_span(req: &Received, children: &[Span], request_id: &str, trace: &str, parent: &str, tokens: i64) {
    let span = &req.span;
    let a = &span.attributes;
    assert_eq!(hex(&span.trace_id), trace, "the caller's trace continues");
    assert_eq!(hex(&span.parent_span_id), parent, "child of the caller's span");
    assert_eq!(span.name, "POST /v1/chat/completions");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(req.service.as_deref(), Some("amlserve"));
    assert_eq!(string(a, "client_request_id"), Some(format!("client-{request_id}")));
    assert_eq!(string(a, "http.route").as_deref(), Some("/v1/chat/completions"));
    assert_eq!(string(a, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(int(a, "http.response.status_code"), 200);
    let model = string(a, "gen_ai.response.model").expect("model");
    assert!(model.contains("SmolLM2"), "{model}");
    assert!(
        int(a, "gen_ai.usage.input_tokens") > 5,
        "the chat template's tokens at least"
    );
    assert_eq!(int(a, "gen_ai.usage.output_tokens"), tokens);
    assert_eq!(strings(a, "gen_ai.response.finish_reasons"), ["length"]);
    let (queue, prefill, decode, ttft) = (
        float(a, "amlserve.queue_ms"),
        float(a, "amlserve.prefill_ms"),
        float(a, "amlserve.decode_ms"),
        float(a, "amlserve.time_to_first_token_ms"),
    );
    assert!(
        queue >= 0.0 && prefill > 0.0 && decode > 0.0,
        "{queue} {prefill} {decode}"
    );
    assert!(
        (ttft - (queue + prefill)).abs() < 0.01,
        "ttft {ttft} = queue {queue} + prefill {prefill}"
    );

    let phase = |name: &str| {
        children
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no {name} span"))
    };
    let (q, p, d) = (phase("queue"), phase("prefill"), phase("decode"));
    let ms = |c: &Span| (c.end_time_unix_nano - c.start_time_unix_nano) as f64 / 1e6;
    for (c, want) in [(q, queue), (p, prefill), (d, decode)] {
        assert_eq!(c.trace_id, span.trace_id);
        assert!(
            (ms(c) - want).abs() < 0.01,
            "{}: {} ms, attribute {want}",
            c.name,
            ms(c)
        );
    }
    assert!(q.end_time_unix_nano == p.start_time_unix_nano && p.end_time_unix_nano == d.start_time_unix_nano);
    // The request span opens before the prompt is tokenized and closes after the last byte is sent.
    assert!(
        q.start_time_unix_nano >= span.start_time_unix_nano,
        "queue starts inside the request"
    );
    assert!(
        d.end_time_unix_nano <= span.end_time_unix_nano,
        "decode ends inside the request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_spans_continue_the_callers_trace_with_the_engine_timings() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    // Export every 100 ms instead of every 5 s.
    let s = Server::start_with_env(&["--otlp-endpoint", &endpoint], &[("OTEL_BSP_SCHEDULE_DELAY", "100")]).await;

    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    traced_chat(&s, "otel-json-1", &traceparent(trace, parent), false, 8).await;
    let (req, children) = collector.request("otel-json-1").await;
    assert_request_span(&req, &children, "otel-json-1", trace, parent, 8);

    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let body = traced_chat(&s, "otel-stream-1", &traceparent(trace, parent), true, 12).await;
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let (req, children) = collector.request("otel-stream-1").await;
    assert_request_span(&req, &children, "otel-stream-1", trace, parent, 12);

    // Without a traceparent a request starts its own trace; probes are not traced at all.
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .header("x-request-id", "otel-root-1");
    let r = r
        .json(&json!({"prompt": "Once", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (req, _) = collector.request("otel-root-1").await;
    assert!(req.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(req.span.name, "POST /v1/completions");
    let routes: Vec<Option<String>> = collector
        .received()
        .iter()
        .map(|r| string(&r.span.attributes, "http.route"))
        .collect();
    assert!(
        !routes.iter().flatten().any(|r| r == "/health" || r == "/"),
        "probes are not traced: {routes:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_of_requests_finished_before_shutdown_are_flushed_at_exit() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    // No periodic export within the test: only the flush at shutdown can deliver the span.
    let mut s = Server::start_with_env(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "3600000")],
    )
    .await;
    let (trace, parent) = ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174");
    traced_chat(&s, "otel-flush-1", &traceparent(trace, parent), false, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.received().is_empty(), "nothing exported before shutdown");
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let (req, children) = collector.request("otel-flush-1").await;
    assert_request_span(&req, &children, "otel-flush-1", trace, parent, 4);
    assert!(
        s.drain_log().iter().any(|l| l.contains("traces flushed")),
        "the flush is logged"
    );
}

#[test]
fn an_endpoint_that_cannot_work_stops_the_start_with_a_message() {
    for (endpoint, says) in [
        ("https://collector:4318", "without TLS"),
        ("collector:4318", "http://host:port"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"))
            .args(["--host", "127.0.0.1", "--port", "0", "--otlp-endpoint", endpoint])
            .arg("--model")
            .arg(model_path())
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{endpoint}: {err}");
        assert!(
            err.contains("--otlp-endpoint") && err.contains(says),
            "{endpoint}: {err}"
        );
    }
}
