//! The HTTP side: the Azure ML scoring contract and OpenAI-compatible routes in front of the engine.
//!
//! [`router`] builds the axum app from an [`AppState`]; [`serve`] runs it on a listener until a shutdown
//! future resolves (the connection loop, its limits and timeouts are in `transport`); [`run`] is the whole
//! server (bind first, load the models in the background, then serve).
//! The server listens while the models load: liveness (`/`) answers at once, readiness (`/health`) only once
//! every model is loaded and every engine thread is alive.
//!
//! Several models ([`Served`]): each language model has its own engine thread, KV budget (an equal share of
//! `--kv-cache-mb`), grammar cache, watchdog and metric series; embedding models have their own threads.
//! Requests pick one by their `model` field ([`Served::language`], [`Served::embedding`]); the first of each
//! kind is the default. The compute threads are not multiplied by the models: every engine computes on
//! candle's one process-wide barrier pool (`--threads` workers, `crate::model::par`), whose `execute` holds a
//! call lock for the whole parallel call, so two engines' kernels take turns on the same threads instead of
//! oversubscribing the cores (checked against candle-core 0.11.1 `utils::BarrierPool::execute`); rayon's pool
//! (softmax, gemm) is process-wide too. Only the engines' own serial work (sampling, scheduling) runs beside
//! another engine's kernels. Liveness fails only when a restart is the way back: the
//! model failed to load, the engine thread ended, or it has work and makes no progress (`watchdog`).
//!
//! Shutdown ([`run`]): at SIGTERM readiness fails at once, but new requests are still served for
//! `--drain-delay-secs` (the platform's gateway or load balancer needs a few probe periods to take the
//! instance out of rotation); then new work is refused with 503 and in-flight requests, streams included, get
//! `--shutdown-grace-secs` to finish before the process exits 0.

pub mod access;
mod auth;
mod azure_ai;
mod azureml;
mod body_limit;
mod embeddings;
pub mod error;
mod generate;
mod json;
mod logprobs;
mod openai;
mod openapi;
mod output;
mod query;
mod sse;
mod tokenize;
mod tools;
mod trace;
pub mod transport;
pub mod types;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::config::Config;
use crate::config::ModelSpec;
use crate::engine::backend::{Detokenizer, DeviceBackend, LlamaBackend};
use crate::engine::embedder::Embedder;
use crate::engine::Engine;
use crate::grammar::Grammars;
use crate::metrics::{Metrics, ModelMetrics};
use crate::model::embedding::EmbeddingModel;
use crate::model::{device, ContentTokens, Forward, Model};
use error::{ApiError, Dialect};
pub use transport::{serve, Limits};
use types::{Health, HealthStatus};

/// One language model, loaded and served by its engine thread.
pub struct Ready {
    /// The model; `model.name` is the name requests select it by.
    pub model: Arc<Model>,
    pub engine: Engine,
    pub request_timeout: Duration,
    /// What requests get for the sampling fields they leave out (`--default-*`).
    pub generation: types::GenerationDefaults,
    /// Unix time the model finished loading (the OpenAI `created` of the model).
    pub created: u64,
    /// Compiled grammars of this model's vocabulary (structured outputs, forced tool calls).
    pub grammars: Arc<Grammars>,
    /// Most choices per request (`--max-n`).
    pub max_n: usize,
    /// How special-token text in chat content is tokenized (`--parse-special-in-content`).
    pub content_tokens: ContentTokens,
    /// This model's metric series.
    pub engine_metrics: Arc<ModelMetrics>,
    /// Whether the engine thread still makes progress (liveness fails when it does not).
    pub watchdog: Arc<watchdog::Watchdog>,
}

/// One embedding model, loaded and served by its thread.
pub struct EmbeddingReady {
    /// The engine; `embedder.name` is the name requests select it by.
    pub embedder: Embedder,
    /// Most tokens of an input the model reads (the rest is truncated).
    pub max_tokens: usize,
    /// Unix time the model finished loading.
    pub created: u64,
}

/// Every served model, once all are loaded: what the routes serve from.
pub struct Served {
    /// Language models, the default first; never empty.
    pub language: Vec<Ready>,
    /// Embedding models, the default first.
    pub embedding: Vec<EmbeddingReady>,
    pub request_timeout: Duration,
}

/// Which kind of model a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Language,
    Embedding,
}

impl Served {
    /// The language model a request's `model` field selects: none (or an empty one) is the default; a
    /// served name is that model; an embedding model's name is a 400. Any other name is a 404 listing the
    /// served ones, except with a single language model, which serves every name as before several models
    /// could be served (clients send whatever their SDK or configuration says).
    pub fn language(&self, requested: Option<&str>) -> Result<&Ready, ApiError> {
        self.pick(&self.language, requested, Kind::Language)
    }

    /// The embedding model a request's `model` field selects, by the same rules as [`Self::language`]; a 404
    /// when the server has no embedding model.
    pub fn embedding(&self, requested: Option<&str>) -> Result<&EmbeddingReady, ApiError> {
        if self.embedding.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "this server has no embedding model; start it with --embedding-model (a sentence-transformers folder)",
            ));
        }
        self.pick(&self.embedding, requested, Kind::Embedding)
    }

    /// The model of `kind` (`served`, non-empty, in the order of [`Self::names`]) that `requested` selects.
    fn pick<'a, T>(&self, served: &'a [T], requested: Option<&str>, kind: Kind) -> Result<&'a T, ApiError> {
        let Some(n) = requested.filter(|n| !n.is_empty()) else {
            return Ok(&served[0]);
        };
        let other = match kind {
            Kind::Language => Kind::Embedding,
            Kind::Embedding => Kind::Language,
        };
        match self.names(kind).iter().position(|&m| m == n) {
            Some(i) => Ok(&served[i]),
            None if self.names(other).contains(&n) => Err(self.wrong_kind(n, kind)),
            None if served.len() == 1 => Ok(&served[0]),
            None => Err(self.unknown(n, kind)),
        }
    }

    /// The served names of one kind, the default first.
    fn names(&self, kind: Kind) -> Vec<&str> {
        match kind {
            Kind::Language => self.language.iter().map(|r| r.model.name.as_str()).collect(),
            Kind::Embedding => self.embedding.iter().map(|e| e.embedder.name.as_str()).collect(),
        }
    }

    /// The served names of one kind, the default marked: `a (default), b`.
    fn listing(&self, kind: Kind) -> String {
        self.names(kind)
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i == 0 {
                    format!("{n} (default)")
                } else {
                    n.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What the server serves, for error messages.
    fn served_models(&self) -> String {
        let mut s = format!("language models: {}", self.listing(Kind::Language));
        if !self.embedding.is_empty() {
            s.push_str(&format!("; embedding models: {}", self.listing(Kind::Embedding)));
        }
        s
    }

    fn unknown(&self, name: &str, kind: Kind) -> ApiError {
        let what = match kind {
            Kind::Language => "language",
            Kind::Embedding => "embedding",
        };
        ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model '{name}' is not served here (model_not_found); served {what} models: {}",
                    self.listing(kind)
                ),
            )
        }
    }

    fn wrong_kind(&self, name: &str, wanted: Kind) -> ApiError {
        let why = match wanted {
            Kind::Language => "an embedding model: it serves /v1/embeddings and /embeddings, not generation",
            Kind::Embedding => "a language model: it serves generation, not embeddings",
        };
        ApiError::invalid_param(
            "model",
            format!("model '{name}' is {why}; this server has {}", self.served_models()),
        )
    }
}

/// Where the server stands with shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Serving = 0,
    /// SIGTERM arrived: readiness fails, requests are still served (`--drain-delay-secs`).
    Draining = 1,
    /// New work is refused; in-flight requests finish.
    Refusing = 2,
}

/// Shared server state.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    ready: OnceLock<Served>,
    load_error: OnceLock<String>,
    phase: AtomicU8,
    /// Every request being handled or streamed holds a token of this until its response has ended.
    work: TaskTracker,
    metrics: Arc<Metrics>,
    api_key: Option<String>,
}

impl AppState {
    /// State with no model yet: readiness fails until [`AppState::set_ready`].
    pub fn new(metrics: Arc<Metrics>, api_key: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                ready: OnceLock::new(),
                load_error: OnceLock::new(),
                phase: AtomicU8::new(Phase::Serving as u8),
                work: TaskTracker::new(),
                metrics,
                api_key,
            }),
        }
    }

    /// The metrics registry (every model's series too).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The key every protected route requires, if one is configured.
    pub fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }

    /// Makes the server ready with every model loaded and its engine running.
    pub fn set_ready(&self, ready: Served) {
        let _ = self.inner.ready.set(ready);
    }

    /// Records why the model could not be loaded (readiness reports it).
    pub fn set_load_error(&self, msg: String) {
        let _ = self.inner.load_error.set(msg);
    }

    /// Starts draining: readiness fails, requests are still served.
    pub fn begin_drain(&self) {
        self.inner.phase.fetch_max(Phase::Draining as u8, Ordering::SeqCst);
    }

    /// Starts refusing: new work gets 503, in-flight requests go on.
    pub fn begin_shutdown(&self) {
        self.inner.phase.store(Phase::Refusing as u8, Ordering::SeqCst);
    }

    fn phase(&self) -> Phase {
        match self.inner.phase.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Refusing,
        }
    }

    /// A token that keeps shutdown waiting until it is dropped (at the end of a request's response).
    pub fn track_request(&self) -> TaskTrackerToken {
        self.inner.work.token()
    }

    /// Resolves once no request is being handled or streamed (call after [`Self::begin_shutdown`]).
    async fn drained(&self) {
        self.inner.work.close();
        self.inner.work.wait().await;
    }

    /// The default language model (see [`Self::language`]).
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.language(None)
    }

    /// The language model a request's `model` field selects ([`Served::language`]), noted as the model the
    /// request is served by (its HTTP metrics' `model` label).
    pub fn language(&self, requested: Option<&str>) -> Result<&Ready, ApiError> {
        let ready = self.served()?.language(requested)?;
        access::note_model(&ready.model.name);
        Ok(ready)
    }

    /// The embedding model a request's `model` field selects ([`Served::embedding`]), noted like
    /// [`Self::language`].
    pub fn embedding(&self, requested: Option<&str>) -> Result<&EmbeddingReady, ApiError> {
        let ready = self.served()?.embedding(requested)?;
        access::note_model(&ready.embedder.name);
        Ok(ready)
    }

    /// Every loaded model, or a 503 saying why they are not all there. Still served while draining.
    pub fn served(&self) -> Result<&Served, ApiError> {
        if self.phase() == Phase::Refusing {
            return Err(ApiError::not_ready("the server is shutting down"));
        }
        match self.inner.ready.get() {
            Some(r) => match self.broken() {
                Some(why) => Err(ApiError::not_ready(why)),
                None => Ok(r),
            },
            None => match self.inner.load_error.get() {
                Some(e) => Err(ApiError::not_ready(format!("the model failed to load: {e}"))),
                None => Err(ApiError::not_ready("the model is still loading")),
            },
        }
    }

    /// What readiness (`/health`) answers: [`Self::served`], and 503 from SIGTERM on.
    fn readiness(&self) -> Result<&Served, ApiError> {
        if self.phase() != Phase::Serving {
            return Err(ApiError::not_ready("the server is shutting down"));
        }
        self.served()
    }

    /// Why the process should be restarted, if it should: the model failed to load, or the engine thread
    /// stopped or is stalled. Loading and shutting down are not reasons (liveness stays 200).
    pub fn broken(&self) -> Option<String> {
        match self.inner.ready.get() {
            Some(served) => served.language.iter().find_map(|r| {
                let why = if r.engine.is_alive() {
                    r.watchdog.stall()?
                } else {
                    "the inference engine has stopped".to_string()
                };
                Some(if served.language.len() > 1 {
                    format!("model {}: {why}", r.model.name)
                } else {
                    why
                })
            }),
            None => self
                .inner
                .load_error
                .get()
                .map(|e| format!("the model failed to load: {e}")),
        }
    }
}

/// `GET /health`: 200 once every model serves, 503 before, after failures and from SIGTERM on.
async fn health(State(state): State<AppState>) -> Response {
    match state.readiness() {
        Ok(served) => Json(Health {
            status: HealthStatus::Ready,
            model: Some(served.language[0].model.name.clone()),
            message: None,
        })
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: HealthStatus::Unavailable,
                model: None,
                message: Some(e.message),
            }),
        )
            .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(StatusCode::NOT_FOUND, format!("no route for {} {path}", req.method()))
        .in_dialect(Dialect::for_path(&path))
}

async fn method_not_allowed(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} is not allowed on {path}", req.method()),
    )
    .in_dialect(Dialect::for_path(&path))
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics().render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Router options beyond the state.
#[derive(Debug, Clone, Default)]
pub struct RouterOptions {
    pub max_body_bytes: usize,
    /// Serve `/metrics` on this router (false when a separate metrics port serves it).
    pub metrics_route: bool,
    /// CORS origins (`*` for any); empty for no CORS headers.
    pub cors_origins: Vec<String>,
}

fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any),
    )
}

/// The application with every route.
pub fn router(state: AppState, options: &RouterOptions) -> Router {
    let mut app = Router::new()
        .route("/", get(azureml::liveness))
        .route("/health", get(health))
        .route(
            "/score",
            post(azureml::score)
                .get(azureml::score_get)
                .options(azureml::score_options),
        )
        .route("/swagger.json", get(openapi::swagger))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/info", get(azure_ai::info))
        .route("/chat/completions", post(azure_ai::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/embeddings", post(embeddings::embeddings))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize));
    if options.metrics_route {
        app = app.route("/metrics", get(metrics));
    }
    let mut app = app
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            options.max_body_bytes,
            body_limit::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::layer));
    if let Some(cors) = cors_layer(&options.cors_origins) {
        app = app.layer(cors);
    }
    app.layer(axum::middleware::from_fn_with_state(state.clone(), access::layer))
        .with_state(state)
}

/// A router serving only `/metrics` (for `--metrics-port`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs the server: binds, loads the model in the background, serves until SIGTERM / Ctrl-C, then gives
/// in-flight requests `shutdown_grace` to finish. Every series goes to `metrics` (which exporters may read too).
pub async fn run(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    let state = AppState::new(metrics.clone(), config.api_key.clone());
    let connections = metrics.connections.clone();
    if let Some(port) = config.metrics_port {
        let maddr = SocketAddr::new(config.metrics_host, port);
        let ml = TcpListener::bind(maddr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {maddr} (--metrics-host, --metrics-port): {e}"))?;
        tracing::info!(address = %ml.local_addr()?, "metrics listening");
        let app = metrics_router(state.clone());
        // Its own connection slots, so traffic on the main port cannot keep scrapes out; it stops with the process.
        let serving = serve(ml, app, config.transport, connections.clone(), std::future::pending());
        tokio::spawn(serving);
    }
    let loader_state = state.clone();
    let loader_config = config.clone();
    tokio::task::spawn_blocking(move || load(loader_state, &loader_config, metrics));
    let options = RouterOptions {
        max_body_bytes: config.max_body_bytes,
        metrics_route: config.metrics_port.is_none(),
        cors_origins: config.cors_origins.clone(),
    };
    let app = router(state.clone(), &options);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, config.transport, connections, async move {
        let _ = stop_rx.await;
    }));
    shutdown_signal().await;
    let grace = config.shutdown_grace;
    let delay = config.drain_delay;
    tracing::info!(
        drain_delay_secs = delay.as_secs(),
        grace_secs = grace.as_secs(),
        "shutdown requested: readiness fails; new requests are served for the drain delay, then refused"
    );
    state.begin_drain();
    if !delay.is_zero() {
        // A second SIGTERM / Ctrl-C cuts the delay short.
        tokio::select! { () = tokio::time::sleep(delay) => {}, () = shutdown_signal() => {} }
        tracing::info!("drain delay over: new work is refused, in-flight requests finish");
    }
    state.begin_shutdown();
    // Keep accepting connections while draining, so probes see 503 rather than a refused connection. Every
    // generation belongs to a request (a dropped one cancels its generation), so no request open means no
    // engine work left that anyone waits for.
    let deadline = tokio::time::Instant::now() + grace;
    let _ = tokio::time::timeout_at(deadline, state.drained()).await;
    let _ = stop_tx.send(());
    let rest = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_secs(1));
    match tokio::time::timeout(rest, server).await {
        Ok(Ok(Ok(()))) => tracing::info!("all requests finished; exiting"),
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Err(e)) => return Err(anyhow::anyhow!("server task failed: {e}")),
        Err(_) => tracing::warn!("shutdown grace period over; exiting with requests still open"),
    }
    Ok(())
}

/// Exits the process (code 70) if the engine thread panics: a panic inside candle's kernel pool leaves it
/// poisoned, so the only way back to service is a restart, which the platform does on exit.
fn watch_engine(thread: std::thread::JoinHandle<()>) {
    let spawned = std::thread::Builder::new()
        .name("amlserve-engine-watch".into())
        .spawn(move || {
            if thread.join().is_err() {
                tracing::error!("an engine thread panicked; exiting so the platform restarts the server");
                std::process::exit(70);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the engine thread");
    }
}

/// Starts the engine thread over `model`'s forward, watched for progress.
fn start_engine(
    model: &Arc<Model>,
    config: &Config,
    metrics: &Arc<ModelMetrics>,
    progress: &Arc<watchdog::Progress>,
) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
    let text: Arc<dyn Detokenizer> = Arc::new(model.tokenizer.clone());
    let wedge_at = config.debug_wedge_engine_after.map(|d| std::time::Instant::now() + d);
    let (engine, metrics) = (config.engine.clone(), metrics.clone());
    let progress = progress.clone();
    match &model.forward {
        Forward::Cpu(_) => {
            let inner = LlamaBackend(model.clone());
            Engine::start_with(
                watchdog::Watched {
                    inner,
                    progress,
                    wedge_at,
                },
                text,
                engine,
                metrics,
            )
        }
        Forward::Device(..) => {
            let mut engine = engine;
            let inner = DeviceBackend::new(model.clone(), &mut engine).map_err(std::io::Error::other)?;
            Engine::start_with(
                watchdog::Watched {
                    inner,
                    progress,
                    wedge_at,
                },
                text,
                engine,
                metrics,
            )
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads one language model under its served name and starts its engine, grammar vocabulary and watchdog.
fn load_language(
    spec: &ModelSpec,
    on: Option<(&candle_core::Device, device::DeviceInfo)>,
    config: &Config,
    metrics: &Metrics,
) -> Result<Ready, String> {
    let started = std::time::Instant::now();
    if let Some(folder) = &spec.passed_over {
        tracing::warn!(
            model = %spec.name,
            gguf = %spec.path.display(),
            hugging_face_folder = %folder.display(),
            "found both a GGUF and a Hugging Face folder: serving the GGUF (name the folder with --model to serve it)"
        );
    }
    tracing::info!(model = %spec.name, path = %spec.path.display(), weights = ?config.weights, "loading model");
    let mut model = Model::load_on(&spec.path, config.weights, on).map_err(|e| e.to_string())?;
    model.name = spec.name.clone();
    if let Some(template) = &config.chat_template {
        model.use_chat_template_if_none(template).map_err(|e| e.to_string())?;
    }
    let model = Arc::new(model);
    let c = &model.config;
    tracing::info!(
        model = %model.name,
        layers = c.n_layer,
        hidden = c.hidden,
        context = c.context_length,
        weight_mb = model.weight_bytes() >> 20,
        device = %model.device_info().device,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let grammars = Grammars::new(&model.tokenizer, config.grammar_cache)
        .map_err(|e| format!("cannot build the grammar vocabulary: {e}"))?;
    let engine_metrics = metrics.model(&model.name);
    let progress = Arc::new(watchdog::Progress::default());
    let (engine, thread) = start_engine(&model, config, &engine_metrics, &progress)
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    // The engine's own budget: on a GPU it may come from the device's free memory.
    tracing::info!(model = %model.name, kv_cache_mb = engine.config().kv_cache_bytes >> 20, "engine started");
    watch_engine(thread);
    let gauge = engine_metrics.engine_stalled.clone();
    let watchdog = watchdog::Watchdog::start(engine.clone(), progress, config.engine_stall, gauge)
        .map_err(|e| format!("cannot start the engine watchdog thread: {e}"))?;
    Ok(Ready {
        model,
        engine,
        request_timeout: config.request_timeout,
        generation: config.generation,
        created: unix_now(),
        grammars: Arc::new(grammars),
        max_n: config.max_n,
        content_tokens: config.content_tokens,
        engine_metrics,
        watchdog,
    })
}

/// Loads one embedding model under its served name and starts its thread.
fn load_embedding(spec: &ModelSpec, config: &Config, metrics: &Metrics) -> Result<EmbeddingReady, String> {
    let mut m = EmbeddingModel::load(&spec.path).map_err(|e| e.to_string())?;
    m.name = spec.name.clone();
    tracing::info!(model = %m.name, dim = m.dim, "embedding model loaded");
    let max_tokens = m.max_tokens;
    let (embedder, thread) = Embedder::start(
        Arc::new(m),
        config.embedder.clone(),
        metrics.embedding_model(&spec.name),
    )
    .map_err(|e| format!("cannot start the embedding thread: {e}"))?;
    watch_engine(thread);
    Ok(EmbeddingReady {
        embedder,
        max_tokens,
        created: unix_now(),
    })
}

/// Loads every model and starts their engines, marking the state ready once all are (or recording the first
/// failure: the server never serves a partial set, so a client is never routed to the default by accident).
fn load(state: AppState, config: &Config, metrics: Arc<Metrics>) {
    let fail = |what: String| {
        tracing::error!(error = %what, "model failed to load");
        state.set_load_error(what);
    };
    let on = match device::open(config.device) {
        Ok(on) => on,
        Err(e) => return fail(e.to_string()),
    };
    // A model on a device forward says itself whether it takes graphs (DeviceBackend::new).
    if config.engine.cuda_graphs && on.is_none() {
        tracing::warn!(device = %config.device, "--cuda-graphs ignored: the models run on the CPU forward");
    }
    let several = config.models.len() > 1;
    let mut language = Vec::with_capacity(config.models.len());
    for spec in &config.models {
        let on = on.as_ref().map(|(dev, info)| (dev, info.clone()));
        match load_language(spec, on, config, &metrics) {
            Ok(r) => language.push(r),
            // One model keeps the message it always had; with several, say which failed.
            Err(e) if several => return fail(format!("model {}: {e}", spec.name)),
            Err(e) => return fail(e),
        }
    }
    let mut embedding = Vec::with_capacity(config.embedding_models.len());
    for spec in &config.embedding_models {
        match load_embedding(spec, config, &metrics) {
            Ok(e) => embedding.push(e),
            Err(e) => return fail(format!("embedding model {}: {e}", spec.path.display())),
        }
    }
    state.set_ready(Served {
        language,
        embedding,
        request_timeout: config.request_timeout,
    });
    tracing::info!(models = config.models.len() + config.embedding_models.len(), "ready");
}
