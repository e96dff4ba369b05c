//! Command line: clap derive arguments, converted once into a validated [`Config`].
//!
//! Everything else reads the `Config`; nothing here sends requests or touches the network.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

/// Which API the endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// OpenAI `/v1/chat/completions`, streamed (SSE), so every token is seen.
    OpenaiChat,
    /// OpenAI `/v1/completions` (text prompts), streamed unless `--no-stream`.
    OpenaiCompletions,
    /// Azure ML `/score` with the model-catalog chat payload; end-to-end latency only.
    AzuremlScore,
}

impl Target {
    /// The route appended to a base URL that does not already end with it.
    pub fn default_path(self) -> &'static str {
        match self {
            Target::OpenaiChat => "/v1/chat/completions",
            Target::OpenaiCompletions => "/v1/completions",
            Target::AzuremlScore => "/score",
        }
    }
}

/// Load generator for LLM endpoints: OpenAI-compatible servers and Azure ML online endpoints.
///
/// Sends the same seeded workload at each load level (closed loop at a concurrency, or open loop at a
/// Poisson request rate) and reports time to first token, inter-token latency, time per output token,
/// end-to-end latency, throughput and errors.
#[derive(Debug, Parser)]
#[command(name = "amlserve-loadtest", version)]
pub struct Cli {
    /// API of the endpoint.
    #[arg(value_enum)]
    pub target: Target,

    /// Base URL, e.g. http://127.0.0.1:5001 or https://NAME.REGION.inference.ml.azure.com. The target's route
    /// (/v1/chat/completions, /v1/completions, /score) is appended unless the URL already ends with it
    /// (a URL ending in /v1 gets only the rest).
    pub base_url: String,

    /// Closed loop: this many requests in flight at all times; a list sweeps (e.g. 1,4,16).
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    pub concurrency: Vec<usize>,

    /// Open loop: requests per second with Poisson arrivals, timed from each scheduled send time so a slow
    /// server cannot slow the sender down (no coordinated omission); a list sweeps (e.g. 2,5,10).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,

    /// Requests measured per load level: one number for every level, or one per level (e.g. 8,16,32 with
    /// --concurrency 1,4,16). Default 64 when --duration is not given.
    #[arg(long, value_delimiter = ',')]
    pub requests: Vec<u64>,

    /// Seconds per load level; no new request starts after it (in-flight ones finish or time out).
    #[arg(long)]
    pub duration: Option<f64>,

    /// Requests sent to each endpoint before the first level and not counted (model load, caches, connections).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// Approximate prompt length of the synthetic prompts, in tokens (one common English word is about one
    /// token; chat templates add their own). The report shows the server's count when it gives one.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,

    /// JSONL file of prompts instead of synthetic ones: each line a JSON string, {"prompt": "..."} or
    /// {"messages": [{"role", "content"}...]}, optionally with "max_tokens". Lines are used in order, cycling.
    #[arg(long)]
    pub prompts: Option<PathBuf>,

    /// Tokens to generate per request (max_tokens / max_new_tokens).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,

    /// Ask the server to ignore end-of-sequence so every request generates --max-tokens tokens (vLLM-style
    /// `ignore_eos`; servers without it may reject or ignore the field).
    #[arg(long)]
    pub ignore_eos: bool,

    /// Sampling temperature; left to the server when absent (/score is sent do_sample=false then).
    #[arg(long)]
    pub temperature: Option<f64>,

    /// `model` field for OpenAI routes (some servers require it).
    #[arg(long)]
    pub model: Option<String>,

    /// A JSON object whose fields are added to every OpenAI request body (e.g. a `response_format` with a JSON
    /// schema, to measure constrained decoding).
    #[arg(long, value_name = "JSON", value_parser = parse_object)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,

    /// Seed of the synthetic prompts and the arrival times: the same seed sends the same requests.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Seconds one request may take in total (connect, queue, whole stream); then it counts as a timeout.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,

    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "AMLSERVE_LOADTEST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Extra header `NAME:VALUE`, repeatable (e.g. azureml-model-deployment:blue).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,

    /// Route to use instead of the target's default (e.g. /v1/chat/completions behind a gateway).
    #[arg(long)]
    pub path: Option<String>,

    /// Use non-streaming requests for the OpenAI targets (no TTFT or ITL then).
    #[arg(long)]
    pub no_stream: bool,

    /// Second base URL: the same workload runs against both, level by level interleaved, and the report
    /// adds the ratios (second / first).
    #[arg(long, value_name = "URL2")]
    pub compare: Option<String>,

    /// Write the full report (config, tool version, every number) as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the result table as Markdown.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,

    /// Write SVG charts (latency and throughput vs load, TTFT distribution) into this folder.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,

    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,

    #[command(flatten)]
    pub soak: SoakArgs,
}

/// Soak mode: one long level of mixed, partly hostile traffic, judged by rules instead of measured.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Soak mode")]
pub struct SoakArgs {
    /// Soak mode (OpenAI targets): one load level (--concurrency N or --rate R) for --duration seconds of mixed
    /// traffic (streamed and not, clients hanging up mid-stream, a few malformed or out-of-range requests),
    /// answers counted by status class, the server's RSS and /metrics gauges sampled; then waits for the
    /// gauges to drain and prints a pass/fail verdict (exit 1 on fail): no 5xx, every 429 with Retry-After,
    /// every bad request its expected 4xx, no transport errors, RSS flat after warm-up, no leaked slot.
    #[arg(long)]
    pub soak: bool,

    /// Fraction of the well-formed requests, not counting the disconnecting ones, that stream (the rest
    /// wait for the whole JSON answer).
    #[arg(long, default_value_t = 0.5, value_name = "F")]
    pub stream_fraction: f64,

    /// Fraction of all requests that stream and hang up after --disconnect-after text chunks.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    pub disconnect_fraction: f64,

    /// Text chunks (about tokens) a disconnecting client reads before it closes the connection.
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub disconnect_after: u64,

    /// Fraction of all requests that are bad on purpose, each one of malformed JSON, an out-of-range
    /// temperature, an unknown field or a max_tokens beyond any context window; each must get a 400 (or a
    /// 429 when the server refuses before reading the body).
    #[arg(long, default_value_t = 0.02, value_name = "F")]
    pub bad_fraction: f64,

    /// Process id of the server, to sample its RSS from /proc/PID/status (same machine). Without it the
    /// server's own `process_resident_memory_bytes` is read from /metrics when it exports one.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Where the server's Prometheus metrics are; default: /metrics at the base URL's scheme, host and port.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,

    /// Seconds between two samples of RSS and gauges.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub sample_every: f64,

    /// Seconds from the start of the soak after which RSS must stay flat (caches fill and the batch reaches
    /// its size before that); default: a quarter of --duration, at most 60.
    #[arg(long, value_name = "SECS")]
    pub rss_warmup: Option<f64>,

    /// Requests that must have ended before the RSS warm-up ends too (the later of the two ends it): RSS rises
    /// until the batch, the waiting queue and the server's caches have filled, which takes a number of
    /// requests, not of seconds. When the load ends first, the RSS rule is skipped.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub rss_warmup_requests: u64,

    /// Most RSS may grow from the end of the warm-up to the end of the load, in percent of its value at the
    /// end of the warm-up.
    #[arg(long, default_value_t = 10.0, value_name = "PCT")]
    pub max_rss_growth: f64,

    /// Seconds to wait after the load for the running and waiting gauges to get back to 0.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub drain_timeout: f64,
}

/// One load level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Load {
    /// Closed loop: requests in flight.
    Concurrency(usize),
    /// Open loop: mean requests per second, Poisson arrivals.
    Rate(f64),
}

impl Load {
    /// The level as a number, for charts.
    pub fn value(self) -> f64 {
        match self {
            Load::Concurrency(c) => c as f64,
            Load::Rate(r) => r,
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "c={c}"),
            Load::Rate(r) => write!(f, "{r} req/s"),
        }
    }
}

/// When one load level stops sending.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    /// Requests in this level.
    pub requests: Option<u64>,
    /// Time of this level.
    pub duration: Option<Duration>,
}

/// Generation parameters sent with every request.
#[derive(Debug, Clone, Serialize)]
pub struct GenParams {
    pub max_tokens: u32,
    pub ignore_eos: bool,
    pub temperature: Option<f64>,
    pub model: Option<String>,
    /// Streaming for the OpenAI targets.
    pub stream: bool,
    /// Fields added to every OpenAI request body.
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("--extra-body must be a JSON object".into()),
        Err(e) => Err(format!("--extra-body is not valid JSON: {e}")),
    }
}

/// Where the prompts come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSource {
    /// Seeded random common words, about this many tokens.
    Synthetic { tokens: usize },
    /// A JSONL file.
    File { path: PathBuf },
}

/// Soak mode's settings (see [`SoakArgs`]).
#[derive(Debug, Clone, Serialize)]
pub struct SoakConfig {
    pub stream_fraction: f64,
    pub disconnect_fraction: f64,
    pub disconnect_after: u64,
    pub bad_fraction: f64,
    pub server_pid: Option<u32>,
    pub metrics_url: String,
    #[serde(serialize_with = "secs_req")]
    pub sample_every: Duration,
    #[serde(serialize_with = "secs_req")]
    pub rss_warmup: Duration,
    pub rss_warmup_requests: u64,
    /// Percent.
    pub max_rss_growth: f64,
    #[serde(serialize_with = "secs_req")]
    pub drain_timeout: Duration,
}

/// The validated run configuration. Serialized into the JSON report (never the API key or header values).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub target: Target,
    /// One URL, or two in compare mode; each the full request URL.
    pub urls: Vec<String>,
    pub loads: Vec<Load>,
    /// Requests per level, one per entry of `loads`; empty when only `duration` limits the levels.
    pub requests: Vec<u64>,
    /// Time per level.
    #[serde(serialize_with = "secs")]
    pub duration: Option<Duration>,
    pub warmup: u64,
    pub prompts: PromptSource,
    pub params: GenParams,
    pub seed: u64,
    #[serde(serialize_with = "secs_req")]
    pub timeout: Duration,
    /// Soak mode, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakConfig>,
    /// Names of the extra headers (values stay out of reports).
    pub header_names: Vec<String>,
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub api_key: Option<String>,
    #[serde(skip)]
    pub json: Option<PathBuf>,
    #[serde(skip)]
    pub markdown: Option<PathBuf>,
    #[serde(skip)]
    pub plot: Option<PathBuf>,
    #[serde(skip)]
    pub quiet: bool,
}

impl Config {
    /// When level `index` (of `loads`) stops sending.
    pub fn stop(&self, index: usize) -> Stop {
        Stop {
            requests: self.requests.get(index).copied(),
            duration: self.duration,
        }
    }
}

fn secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_some(&d.map(|d| d.as_secs_f64()))
}

fn secs_req<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A command line that parses but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--concurrency values must be at least 1")]
    ZeroConcurrency,
    #[error("--rate values must be positive and finite, got {0}")]
    BadRate(f64),
    #[error("--{0} must be positive and finite, got {1}")]
    BadSeconds(&'static str, f64),
    #[error("--requests must be at least 1")]
    ZeroRequests,
    #[error("--requests has {given} values for {levels} load levels (give one, or one per level)")]
    RequestsPerLevel { given: usize, levels: usize },
    #[error("--max-tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    #[error("header {0:?} is not NAME:VALUE")]
    BadHeader(String),
    #[error("--no-stream applies to the OpenAI targets only (azureml-score never streams)")]
    StreamFlag,
    #[error("--soak: {0}")]
    Soak(&'static str),
    #[error("--{0} must be a fraction between 0 and 1, got {1}")]
    BadFraction(&'static str, f64),
}

fn seconds(name: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::BadSeconds(name, v))
    }
}

fn fraction(name: &'static str, v: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::BadFraction(name, v))
    }
}

/// `/metrics` at the scheme, host and port of `base` (an http(s) URL).
pub fn metrics_url(base: &str) -> String {
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    format!("{scheme}://{authority}/metrics")
}

impl SoakArgs {
    /// Checks the soak flags against the rest of the run; `None` when soak mode is off.
    fn config(&self, cli: &Cli, loads: &[Load], duration: Option<Duration>) -> Result<Option<SoakConfig>, ConfigError> {
        if !self.soak {
            return Ok(None);
        }
        if cli.target == Target::AzuremlScore {
            return Err(ConfigError::Soak(
                "needs an OpenAI target (its bad requests and streams are OpenAI's)",
            ));
        }
        if loads.len() != 1 || cli.compare.is_some() {
            return Err(ConfigError::Soak("runs one load level against one endpoint"));
        }
        let Some(duration) = duration else {
            return Err(ConfigError::Soak("needs --duration"));
        };
        if !cli.requests.is_empty() {
            return Err(ConfigError::Soak("runs for --duration; --requests does not apply"));
        }
        if cli.no_stream {
            return Err(ConfigError::Soak(
                "--stream-fraction decides what streams; --no-stream does not apply",
            ));
        }
        let disconnect = fraction("disconnect-fraction", self.disconnect_fraction)?;
        let bad = fraction("bad-fraction", self.bad_fraction)?;
        if disconnect + bad > 1.0 {
            return Err(ConfigError::Soak(
                "--disconnect-fraction plus --bad-fraction is more than 1",
            ));
        }
        if self.disconnect_after == 0 {
            return Err(ConfigError::Soak("--disconnect-after must be at least 1"));
        }
        if !(self.max_rss_growth.is_finite() && self.max_rss_growth >= 0.0) {
            return Err(ConfigError::Soak("--max-rss-growth must be a percentage of 0 or more"));
        }
        let default_warmup = (duration.as_secs_f64() / 4.0).min(60.0);
        let rss_warmup = seconds("rss-warmup", self.rss_warmup.unwrap_or(default_warmup))?;
        if rss_warmup >= duration {
            return Err(ConfigError::Soak("--rss-warmup must end before --duration does"));
        }
        let metrics_url = match &self.metrics_url {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => u.clone(),
            Some(u) => return Err(ConfigError::BadUrl(u.clone())),
            None => metrics_url(&cli.base_url),
        };
        Ok(Some(SoakConfig {
            stream_fraction: fraction("stream-fraction", self.stream_fraction)?,
            disconnect_fraction: disconnect,
            disconnect_after: self.disconnect_after,
            bad_fraction: bad,
            server_pid: self.server_pid,
            metrics_url,
            sample_every: seconds("sample-every", self.sample_every)?,
            rss_warmup,
            rss_warmup_requests: self.rss_warmup_requests,
            max_rss_growth: self.max_rss_growth,
            drain_timeout: seconds("drain-timeout", self.drain_timeout)?,
        }))
    }
}

/// Joins a base URL and the route: keeps a URL that already ends with the route, completes one ending in /v1.
pub fn request_url(base: &str, target: Target, path: Option<&str>) -> Result<String, ConfigError> {
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(ConfigError::BadUrl(base.to_string()));
    }
    let base = base.trim_end_matches('/');
    let route = path.unwrap_or(target.default_path());
    let route = if route.starts_with('/') {
        route.to_string()
    } else {
        format!("/{route}")
    };
    if base.ends_with(&route) {
        return Ok(base.to_string());
    }
    if let Some(rest) = route.strip_prefix("/v1") {
        if base.ends_with("/v1") {
            return Ok(format!("{base}{rest}"));
        }
    }
    Ok(format!("{base}{route}"))
}

impl Cli {
    /// Validates the arguments into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let loads = if !self.rate.is_empty() {
            self.rate
                .iter()
                .map(|&r| {
                    if r.is_finite() && r > 0.0 {
                        Ok(Load::Rate(r))
                    } else {
                        Err(ConfigError::BadRate(r))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if self.concurrency.is_empty() {
            vec![Load::Concurrency(1)]
        } else if self.concurrency.contains(&0) {
            return Err(ConfigError::ZeroConcurrency);
        } else {
            self.concurrency.iter().map(|&c| Load::Concurrency(c)).collect()
        };
        let duration = self.duration.map(|d| seconds("duration", d)).transpose()?;
        let requests = match (self.requests.as_slice(), duration) {
            (r, _) if r.contains(&0) => return Err(ConfigError::ZeroRequests),
            ([], None) => vec![64; loads.len()],
            ([], Some(_)) => vec![],
            ([n], _) => vec![*n; loads.len()],
            (r, _) if r.len() == loads.len() => r.to_vec(),
            (r, _) => {
                return Err(ConfigError::RequestsPerLevel {
                    given: r.len(),
                    levels: loads.len(),
                })
            }
        };
        if self.max_tokens == 0 {
            return Err(ConfigError::ZeroMaxTokens);
        }
        if self.no_stream && self.target == Target::AzuremlScore {
            return Err(ConfigError::StreamFlag);
        }
        let soak = self.soak.config(&self, &loads, duration)?;
        let mut urls = vec![request_url(&self.base_url, self.target, self.path.as_deref())?];
        if let Some(second) = &self.compare {
            urls.push(request_url(second, self.target, self.path.as_deref())?);
        }
        let headers = self
            .headers
            .iter()
            .map(|h| match h.split_once(':') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
                _ => Err(ConfigError::BadHeader(h.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompts = match self.prompts {
            Some(path) => PromptSource::File { path },
            None => PromptSource::Synthetic {
                tokens: self.prompt_tokens.max(1),
            },
        };
        Ok(Config {
            target: self.target,
            urls,
            loads,
            requests,
            duration,
            warmup: self.warmup,
            prompts,
            params: GenParams {
                max_tokens: self.max_tokens,
                ignore_eos: self.ignore_eos,
                temperature: self.temperature,
                model: self.model,
                stream: !self.no_stream && self.target != Target::AzuremlScore,
                extra_body: self.extra_body.unwrap_or_default(),
            },
            seed: self.seed,
            timeout: seconds("timeout", self.timeout)?,
            soak,
            header_names: headers.iter().map(|(k, _)| k.clone()).collect(),
            headers,
            api_key: self.api_key,
            json: self.json,
            markdown: self.markdown,
            plot: self.plot,
            quiet: self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["amlserve-loadtest"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().into_config()
    }

    #[test]
    fn urls_are_completed_once() {
        let u = |b, t| request_url(b, t, None).unwrap();
        assert_eq!(u("http://h:1", Target::OpenaiChat), "http://h:1/v1/chat/completions");
        assert_eq!(
            u("http://h:1/v1/", Target::OpenaiChat),
            "http://h:1/v1/chat/completions"
        );
        assert_eq!(
            u("https://h/v1/completions", Target::OpenaiCompletions),
            "https://h/v1/completions"
        );
        assert_eq!(
            u("https://e.inference.ml.azure.com/score", Target::AzuremlScore),
            "https://e.inference.ml.azure.com/score"
        );
        assert_eq!(u("http://h", Target::AzuremlScore), "http://h/score");
        assert!(request_url("h:1", Target::OpenaiChat, None).is_err());
    }

    #[test]
    fn sweeps_and_defaults() {
        let c = parse(&["openai-chat", "http://h", "--concurrency", "1,4,16"]).unwrap();
        assert_eq!(
            c.loads,
            vec![Load::Concurrency(1), Load::Concurrency(4), Load::Concurrency(16)]
        );
        assert_eq!(c.requests, vec![64, 64, 64]);
        assert_eq!(c.stop(2).requests, Some(64));
        assert!(c.params.stream);
        let c = parse(&["azureml-score", "http://h", "--rate", "2,5", "--duration", "3"]).unwrap();
        assert_eq!(c.loads, vec![Load::Rate(2.0), Load::Rate(5.0)]);
        assert_eq!(c.stop(0).requests, None);
        assert_eq!(c.stop(1).duration, Some(Duration::from_secs(3)));
        assert!(!c.params.stream);
        let c = parse(&["openai-chat", "http://h", "--concurrency", "1,4", "--requests", "2,8"]).unwrap();
        assert_eq!((c.stop(0).requests, c.stop(1).requests), (Some(2), Some(8)));
    }

    #[test]
    fn soak_flags() {
        let c = parse(&[
            "openai-chat",
            "https://h:8/v1",
            "--soak",
            "--rate",
            "9",
            "--duration",
            "600",
        ])
        .unwrap();
        let s = c.soak.unwrap();
        assert_eq!(s.metrics_url, "https://h:8/metrics");
        assert_eq!(s.rss_warmup, Duration::from_secs(60), "a quarter of 600 s, at most 60");
        assert_eq!(
            (s.stream_fraction, s.disconnect_fraction, s.bad_fraction),
            (0.5, 0.1, 0.02)
        );
        let c = parse(&[
            "openai-chat",
            "http://h",
            "--soak",
            "--concurrency",
            "4",
            "--duration",
            "30",
        ])
        .unwrap();
        assert_eq!(c.soak.unwrap().rss_warmup, Duration::from_secs_f64(7.5));
        assert!(parse(&["openai-chat", "http://h", "--rate", "9"])
            .unwrap()
            .soak
            .is_none());
        assert_eq!(metrics_url("http://h:1/v1/chat/completions?x=1"), "http://h:1/metrics");
        let soak = |extra: &[&str]| {
            let mut a = vec!["openai-chat", "http://h", "--soak", "--rate", "9", "--duration", "60"];
            a.extend_from_slice(extra);
            parse(&a)
        };
        assert!(soak(&[]).is_ok());
        for bad in [
            &["--rate", "9,10"][..],
            &["--compare", "http://g"],
            &["--requests", "5"],
            &["--no-stream"],
            &["--bad-fraction", "1.5"],
            &["--disconnect-fraction", "0.6", "--bad-fraction", "0.5"],
            &["--disconnect-after", "0"],
            &["--rss-warmup", "60"],
            &["--sample-every", "0"],
            &["--max-rss-growth=-1"],
            &["--metrics-url", "h/metrics"],
        ] {
            assert!(soak(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse(&["openai-chat", "http://h", "--soak", "--rate", "9"]).is_err(),
            "no --duration"
        );
        assert!(parse(&["azureml-score", "http://h", "--soak", "--rate", "9", "--duration", "9"]).is_err());
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(parse(&["openai-chat", "http://h", "--concurrency", "0"]).is_err());
        assert!(parse(&["openai-chat", "http://h", "--rate", "0"]).is_err());
        assert!(parse(&["openai-chat", "http://h", "--timeout", "0"]).is_err());
        assert!(parse(&["openai-chat", "http://h", "--concurrency", "1,2,3", "--requests", "1,2"]).is_err());
        assert!(parse(&["openai-chat", "http://h", "--header", "novalue"]).is_err());
        assert!(parse(&["azureml-score", "http://h", "--no-stream"]).is_err());
        let c = parse(&["openai-chat", "http://h", "--header", "azureml-model-deployment: blue"]).unwrap();
        assert_eq!(
            c.headers,
            vec![("azureml-model-deployment".to_string(), "blue".to_string())]
        );
    }
}
