//! Metrics to Azure Monitor Application Insights against the real server and a real ingestion stand-in: an HTTPS
//! server on 127.0.0.1:0 inside the test, with a certificate from a CA made for the run (the server trusts it through
//! `SSL_CERT_FILE`, beside its bundled roots), decodes what `--app-insights-connection-string` sends (gzip-compressed
//! JSON envelopes posted to `/v2/track`). The envelopes carry the `/metrics` names with the `model` label, the
//! instance and the `deployment` that `OTEL_RESOURCE_ATTRIBUTES` names; gauges show a generation in progress; the
//! counters' exported increases add up to the scrape's totals; the last values reach the endpoint at SIGTERM; a
//! connection string that cannot work stops the start (exit 2) with a message that does not hold the key.

mod common;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{chat, model_path, sample, Server};
use futures::StreamExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The instrumentation key of the test's connection strings.
const KEY: &str = "6a4d0e2c-31f5-4a84-9d3e-7b1e5c0fa93d";

/// The names `amlserve` exports (`amlserve::app_insights::EXPORTED`).
const EXPORTED: [&str; 6] = [
    "amlserve_num_requests_waiting",
    "amlserve_num_requests_running",
    "amlserve_kv_cache_usage_perc",
    "amlserve_generation_tokens_total",
    "amlserve_prompt_tokens_total",
    "amlserve_request_finished_total",
];

/// One POST the stand-in received.
#[derive(Debug, Clone)]
struct Post {
    path: String,
    gzip: bool,
    envelopes: Vec<Value>,
}

type Posts = Arc<Mutex<Vec<Post>>>;

/// An Application Insights ingestion endpoint: HTTPS, answering every track request as fully accepted.
struct Ingestion {
    addr: SocketAddr,
    posts: Posts,
    dir: PathBuf,
}

impl Ingestion {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "amlserve-app-insights-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (acceptor, ca_pem) = tls();
        std::fs::write(dir.join("ca.pem"), ca_pem).expect("write the CA");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let posts = Posts::default();
        let kept = posts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, posts) = (acceptor.clone(), kept.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = service_fn(move |req| receive(req, posts.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, posts, dir }
    }

    /// The connection string pointing at this endpoint.
    fn connection_string(&self) -> String {
        format!(
            "InstrumentationKey={KEY};IngestionEndpoint=https://{}/;ApplicationId=x",
            self.addr
        )
    }

    /// The PEM file of the CA its certificate comes from (for `SSL_CERT_FILE`).
    fn ca_file(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().expect("posts").clone()
    }

    /// Every envelope received so far.
    fn envelopes(&self) -> Vec<Value> {
        self.posts().into_iter().flat_map(|p| p.envelopes).collect()
    }

    /// Polls until `done` holds for the envelopes received, or panics after `within`.
    async fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.envelopes();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not received within {within:?}; got {got:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Ingestion {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// A CA made for this run and a certificate it signs for 127.0.0.1: the acceptor, and the CA in PEM.
fn tls() -> (TlsAcceptor, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "amlserve test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("server certificate");
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], private)
        .expect("server TLS config");
    (TlsAcceptor::from(Arc::new(config)), ca_cert.pem())
}

/// Keeps a track request's envelopes and answers as the service does when it accepts them all.
async fn receive(req: hyper::Request<Incoming>, posts: Posts) -> Result<hyper::Response<String>, Infallible> {
    let path = req.uri().path().to_string();
    let gzip = req.headers().get("content-encoding").is_some_and(|v| v == "gzip");
    let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 64 << 20)
        .await
        .expect("the body");
    let mut json = String::new();
    if gzip {
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut json)
            .expect("gzip");
    } else {
        json = String::from_utf8(body.to_vec()).expect("UTF-8");
    }
    let envelopes: Vec<Value> = serde_json::from_str(&json).expect("a JSON array of envelopes");
    let n = envelopes.len();
    posts.lock().expect("posts").push(Post { path, gzip, envelopes });
    Ok(hyper::Response::new(
        json!({"itemsReceived": n, "itemsAccepted": n, "errors": []}).to_string(),
    ))
}

/// The metric an envelope carries: its name, value and `kind`, and its properties (custom dimensions).
struct Point<'a> {
    name: &'a str,
    value: f64,
    kind: &'a str,
    properties: &'a Value,
}

fn point(e: &Value) -> Point<'_> {
    let data = &e["data"]["baseData"];
    let m = &data["metrics"][0];
    Point {
        name: m["name"].as_str().expect("a metric name"),
        value: m["value"].as_f64().expect("a value"),
        kind: m["kind"].as_str().expect("a kind"),
        properties: &data["properties"],
    }
}

/// The points of metric `name` whose `model` (and `reason`, if given) are these.
fn points<'a>(envelopes: &'a [Value], name: &str, model: &str, reason: Option<&str>) -> Vec<Point<'a>> {
    envelopes
        .iter()
        .map(point)
        .filter(|p| p.name == name && p.properties["model"] == model)
        .filter(|p| reason.is_none_or(|r| p.properties["reason"] == r))
        .collect()
}

/// The sum of the exported increases of counter `name` (of `model`, `reason`).
fn exported_total(envelopes: &[Value], name: &str, model: &str, reason: Option<&str>) -> f64 {
    points(envelopes, name, model, reason).iter().map(|p| p.value).sum()
}

async fn served_model(s: &Server) -> String {
    s.get_json("/v1/models").await["data"][0]["id"]
        .as_str()
        .expect("a model id")
        .to_string()
}

/// Starts the server exporting to `ingestion` every `interval` seconds, as deployment `blue`.
async fn start(ingestion: &Ingestion, interval: &str) -> Server {
    let cs = ingestion.connection_string();
    let ca = ingestion.ca_file();
    Server::start_with_env(
        &[
            "--app-insights-connection-string",
            &cs,
            "--metrics-export-interval-secs",
            interval,
        ],
        &[("SSL_CERT_FILE", &ca), ("OTEL_RESOURCE_ATTRIBUTES", "deployment=blue")],
    )
    .await
}

async fn generate(s: &Server, tokens: u32) {
    let mut body = chat("Name three colors.", tokens);
    body["ignore_eos"] = json!(true);
    let (status, answer) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scaling_metrics_reach_application_insights_with_their_model() {
    let ingestion = Ingestion::start().await;
    let s = start(&ingestion, "1").await;
    let model = served_model(&s).await;

    // A long stream in flight: an export meanwhile shows it running and its KV reservation.
    let mut body = chat("Count to a thousand.", 4000);
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    let mut stream = Box::pin(s.post_stream("/v1/chat/completions", &body).await);
    stream.next().await.expect("a first chunk").expect("chunk");
    let busy = |e: &[Value]| {
        points(e, "amlserve_num_requests_running", &model, None)
            .iter()
            .any(|p| p.value >= 1.0)
            && points(e, "amlserve_kv_cache_usage_perc", &model, None)
                .iter()
                .any(|p| p.value > 0.0 && p.value <= 1.0)
    };
    ingestion
        .wait_for(Duration::from_secs(30), "a running request and its KV-cache use", busy)
        .await;
    drop(stream); // cancels the generation

    generate(&s, 4).await;
    generate(&s, 4).await;
    // The exported increases add up to what a scrape shows once the server is idle.
    let deadline = Instant::now() + Duration::from_secs(30);
    let envelopes = loop {
        let scrape = s.metrics().await;
        let series = |name: &str| format!("{name}{{model=\"{model}\"}}");
        let want = [
            (
                "amlserve_generation_tokens_total",
                None,
                sample(&scrape, &series("amlserve_generation_tokens_total")),
            ),
            (
                "amlserve_prompt_tokens_total",
                None,
                sample(&scrape, &series("amlserve_prompt_tokens_total")),
            ),
            ("amlserve_request_finished_total", Some("length"), 2.0),
            ("amlserve_request_finished_total", Some("cancelled"), 1.0),
        ];
        let got = ingestion.envelopes();
        let matched = want
            .iter()
            .all(|&(name, reason, v)| exported_total(&got, name, &model, reason) == v);
        if matched && sample(&scrape, "amlserve_num_requests_running") == 0.0 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the exported counters never added up to the scrape's {want:?}:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        exported_total(&envelopes, "amlserve_generation_tokens_total", &model, None) > 8.0,
        "the cancelled stream's tokens count too"
    );

    // Every post is a gzip-compressed track request of metric envelopes carrying the key, the exported names with
    // their model, the instance and the deployment.
    let posts = ingestion.posts();
    assert!(posts.len() >= 2, "one post per export: {}", posts.len());
    for p in &posts {
        assert_eq!((p.path.as_str(), p.gzip), ("/v2/track", true));
    }
    let mut seen = std::collections::BTreeSet::new();
    for e in &envelopes {
        assert_eq!(e["name"], "Microsoft.ApplicationInsights.Metric", "{e}");
        assert_eq!(e["iKey"], KEY);
        assert_eq!(e["data"]["baseType"], "MetricData", "{e}");
        let p = point(e);
        assert!(EXPORTED.contains(&p.name), "{e}");
        seen.insert(p.name);
        assert_eq!(p.properties["model"], model.as_str(), "{e}");
        assert_eq!(p.properties["deployment"], "blue", "{e}");
        let instance = e["tags"]["ai.cloud.roleInstance"].as_str().unwrap_or_default();
        assert!(!instance.is_empty(), "the instance: {e}");
        assert_eq!(p.properties["service.instance.id"], instance, "{e}");
        assert_eq!(e["tags"]["ai.cloud.role"], "amlserve", "{e}");
        let gauge = ["waiting", "running", "kv_cache"].iter().any(|g| p.name.contains(g));
        assert_eq!(p.kind, if gauge { "Measurement" } else { "Aggregation" }, "{e}");
        assert!(p.value >= 0.0, "{e}");
    }
    assert_eq!(seen.len(), EXPORTED.len(), "{seen:?}");
    let waiting = points(&envelopes, "amlserve_num_requests_waiting", &model, None);
    assert!(
        waiting.iter().all(|p| p.value <= 1.0),
        "one request at a time never waits long"
    );
    let log = s.drain_log();
    assert!(
        log.iter()
            .any(|l| l.contains("exporting metrics to Application Insights")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains(KEY)),
        "the key is never logged: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_values_are_sent_at_shutdown() {
    let ingestion = Ingestion::start().await;
    // No periodic export within the test: only the flush at shutdown can deliver them.
    let mut s = start(&ingestion, "3600").await;
    let model = served_model(&s).await;
    generate(&s, 6).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ingestion.posts().is_empty(), "nothing exported before shutdown");
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0));
    let envelopes = ingestion
        .wait_for(Duration::from_secs(5), "the export at shutdown", |e| {
            !points(e, "amlserve_generation_tokens_total", &model, None).is_empty()
        })
        .await;
    assert_eq!(
        exported_total(&envelopes, "amlserve_generation_tokens_total", &model, None),
        6.0
    );
    assert_eq!(
        exported_total(&envelopes, "amlserve_request_finished_total", &model, Some("length")),
        1.0
    );
    assert!(
        s.drain_log().iter().any(|l| l.contains("metrics flushed")),
        "the flush is logged"
    );
}

#[test]
fn a_connection_string_that_cannot_work_stops_the_start_with_a_message() {
    for (value, env, says) in [
        ("garbage", None, "not a connection string"),
        ("IngestionEndpoint=https://e/", None, "no InstrumentationKey"),
        (
            &*format!("InstrumentationKey={KEY};Authorization=AAD"),
            None,
            "Authorization=AAD",
        ),
        (
            &*format!("InstrumentationKey={KEY};IngestionEndpoint=ftp://e"),
            None,
            "not an https://host URL",
        ),
        (
            &*format!("InstrumentationKey={KEY}"),
            Some("/nonexistent/ca.pem"),
            "SSL_CERT_FILE=/nonexistent/ca.pem",
        ),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"));
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--app-insights-connection-string",
            value,
        ])
        .arg("--model")
        .arg(model_path());
        if let Some(ca) = env {
            cmd.env("SSL_CERT_FILE", ca);
        }
        let out = cmd.output().expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(err.contains(says), "{value}: {err}");
        assert!(!err.contains(KEY), "{value}: the key leaked: {err}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains(KEY), "{value}: the key leaked: {stdout}");
    }
    // The export interval is range-checked like every other flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args(["--metrics-export-interval-secs", "0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-export-interval-secs"));
}
