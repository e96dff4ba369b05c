//! Sends one request and times it: the HTTP side shared by every target.
//!
//! The target modules ([`openai`], [`azureml`]) only build request bodies and read response JSON; this module
//! owns the connection, the timeout, the status check and the SSE loop, and turns every failure into a
//! [`RequestError`] with a stable kind, so a bad server is counted, never fatal. It keeps no statistics.
//! [`Client::send_raw`] sends any body as it is and can hang up mid-stream, for soak mode's hostile clients.

mod azureml;
mod openai;

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::cli::{GenParams, Target};
use crate::sse;
use crate::workload::RequestSpec;

/// Where a request's output token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The server's `usage.completion_tokens`.
    Usage,
    /// Count of streamed chunks that carried text (a chunk can hold several tokens).
    Chunks,
    /// Characters / 4, for APIs that report no count (Azure ML /score).
    Estimate,
}

/// What a successful request measured; times are from its scheduled send time.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Time to the first chunk with text (streaming only).
    pub ttft: Option<Duration>,
    /// Gaps between consecutive chunks with text (streaming only).
    pub itl: Vec<Duration>,
    /// Time to the end of the response.
    pub e2e: Duration,
    pub output_tokens: u64,
    pub token_source: TokenSource,
    /// The server's `usage.prompt_tokens`, when given.
    pub prompt_tokens: Option<u64>,
    /// The client closed the stream on purpose after [`RawRequest::disconnect_after`] text chunks; the
    /// times and the token count (text chunks then) end there.
    pub disconnected: bool,
}

/// One request as sent: its body (any bytes, so a malformed body can be sent too), whether the answer is
/// read as a stream, and whether the client hangs up mid-stream.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub body: String,
    pub stream: bool,
    /// Close the connection once this many text chunks have arrived (a client that goes away mid-stream).
    pub disconnect_after: Option<u64>,
}

/// A failed request. [`RequestError::kind`] is the label reports count by.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no complete answer within the timeout")]
    Timeout,
    #[error("HTTP {code}")]
    Status {
        code: u16,
        /// The answer's `Retry-After` header, when it had one.
        retry_after: Option<String>,
    },
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("stream ended before [DONE]")]
    Incomplete,
    #[error("error event in the stream: {0}")]
    ErrorEvent(String),
    #[error("transport error: {0}")]
    Transport(String),
}

impl RequestError {
    /// Stable label: `connect`, `timeout`, `http_503`, `malformed`, `incomplete_stream`, `error_event`,
    /// `transport`.
    pub fn kind(&self) -> String {
        match self {
            RequestError::Connect(_) => "connect".into(),
            RequestError::Timeout => "timeout".into(),
            RequestError::Status { code, .. } => format!("http_{code}"),
            RequestError::Malformed(_) => "malformed".into(),
            RequestError::Incomplete => "incomplete_stream".into(),
            RequestError::ErrorEvent(_) => "error_event".into(),
            RequestError::Transport(_) => "transport".into(),
        }
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            RequestError::Timeout
        } else if e.is_connect() {
            RequestError::Connect(source_chain(&e))
        } else {
            RequestError::Transport(source_chain(&e))
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Token counts a response carried, in the OpenAI `usage` shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl Usage {
    fn from_json(v: &Value) -> Option<Usage> {
        let u = v.get("usage").filter(|u| u.is_object())?;
        Some(Usage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
            completion_tokens: u.get("completion_tokens").and_then(Value::as_u64),
        })
    }
}

/// What a target reads out of one response body or stream chunk.
#[derive(Debug, Default)]
struct Piece {
    text: String,
    usage: Option<Usage>,
}

/// A request error a misconfigured client cannot recover from (bad header or TLS setup).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("header {0:?} is not a valid HTTP header")]
    Header(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// One endpoint: URL, headers and connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    target: Target,
    params: GenParams,
    timeout: Duration,
}

impl Client {
    pub fn new(
        url: &str,
        target: Target,
        params: GenParams,
        timeout: Duration,
        api_key: Option<&str>,
        headers: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = api_key {
            let v =
                HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| ClientError::Header("api key".into()))?;
            map.insert(AUTHORIZATION, v);
        }
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| ClientError::Header(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| ClientError::Header(k.clone()))?;
            map.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(map)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("amlserve-loadtest/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            url: url.to_string(),
            target,
            params,
            timeout,
        })
    }

    /// The request URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The target's request body for `spec`, streamed or not (`/score` never streams).
    pub fn body(&self, spec: &RequestSpec, stream: bool) -> Value {
        match self.target {
            Target::OpenaiChat | Target::OpenaiCompletions => openai::body(self.target, spec, &self.params, stream),
            Target::AzuremlScore => azureml::body(spec, &self.params),
        }
    }

    /// Sends `spec` as the run's parameters say and times it from `scheduled` (its planned send time, which
    /// may be earlier than now when the sender fell behind: that delay is the server's too). Never panics on a
    /// bad answer.
    pub async fn send(&self, spec: &RequestSpec, scheduled: Instant) -> Result<Sample, RequestError> {
        let request = RawRequest {
            body: self.body(spec, self.params.stream).to_string(),
            stream: self.params.stream,
            disconnect_after: None,
        };
        self.send_raw(&request, scheduled).await
    }

    /// Sends `request` as it is, timed like [`Client::send`].
    pub async fn send_raw(&self, request: &RawRequest, scheduled: Instant) -> Result<Sample, RequestError> {
        let deadline = Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, self.exchange(request, scheduled)).await {
            Ok(r) => r,
            Err(_) => Err(RequestError::Timeout),
        }
    }

    async fn exchange(&self, request: &RawRequest, scheduled: Instant) -> Result<Sample, RequestError> {
        let mut retried = false;
        let resp = loop {
            match self.http.post(&self.url).body(request.body.clone()).send().await {
                Ok(resp) => break resp,
                // A pooled keep-alive connection the server had just closed (llama.cpp's server does this): the
                // request never reached it, so it is sent once more on a fresh connection, as browsers do.
                Err(e) if !retried && source_chain(&e).contains("connection closed before message completed") => {
                    retried = true;
                }
                Err(e) => return Err(RequestError::from_reqwest(e)),
            }
        };
        if !resp.status().is_success() {
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            return Err(RequestError::Status {
                code: resp.status().as_u16(),
                retry_after,
            });
        }
        if request.stream {
            self.read_stream(resp, scheduled, request.disconnect_after).await
        } else {
            self.read_whole(resp, scheduled).await
        }
    }

    async fn read_whole(&self, resp: reqwest::Response, scheduled: Instant) -> Result<Sample, RequestError> {
        let bytes = resp.bytes().await.map_err(RequestError::from_reqwest)?;
        let e2e = scheduled.elapsed();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| RequestError::Malformed(e.to_string()))?;
        let piece = match self.target {
            Target::OpenaiChat | Target::OpenaiCompletions => openai::whole(self.target, &v),
            Target::AzuremlScore => azureml::whole(&v),
        }
        .map_err(RequestError::Malformed)?;
        let (output_tokens, token_source) = match piece.usage.and_then(|u| u.completion_tokens) {
            Some(n) => (n, TokenSource::Usage),
            None => (estimate_tokens(&piece.text), TokenSource::Estimate),
        };
        Ok(Sample {
            ttft: None,
            itl: Vec::new(),
            e2e,
            output_tokens,
            token_source,
            prompt_tokens: piece.usage.and_then(|u| u.prompt_tokens),
            disconnected: false,
        })
    }

    /// Reads an SSE answer to `[DONE]`, or, with `disconnect_after`, until that many text chunks have come and
    /// then drops the response, which closes the connection under the server's feet.
    async fn read_stream(
        &self,
        mut resp: reqwest::Response,
        scheduled: Instant,
        disconnect_after: Option<u64>,
    ) -> Result<Sample, RequestError> {
        let mut parser = sse::Parser::new();
        let mut timing = StreamTiming::default();
        let mut usage = None;
        let mut done = false;
        let malformed = |e: sse::SseError| RequestError::Malformed(e.to_string());
        loop {
            let chunk = resp.chunk().await.map_err(RequestError::from_reqwest)?;
            let ended = chunk.is_none();
            let events = match chunk {
                Some(bytes) => parser.push(&bytes).map_err(malformed)?,
                None => {
                    let parser = std::mem::take(&mut parser);
                    parser.finish().map_err(malformed)?.into_iter().collect()
                }
            };
            let now = Instant::now();
            for ev in events {
                if done {
                    break; // anything after [DONE] is ignored
                }
                if ev.data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&ev.data).map_err(|e| RequestError::Malformed(e.to_string()))?;
                if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                    return Err(RequestError::ErrorEvent(err.to_string()));
                }
                let piece = openai::chunk(self.target, &v).map_err(RequestError::Malformed)?;
                if piece.usage.is_some() {
                    usage = piece.usage;
                }
                if !piece.text.is_empty() {
                    timing.token_chunk(now);
                }
            }
            if !done && disconnect_after.is_some_and(|k| timing.chunks >= k) {
                drop(resp);
                return Ok(timing.sample(scheduled, None, true));
            }
            if ended || done {
                break;
            }
        }
        if !done {
            return Err(RequestError::Incomplete);
        }
        Ok(timing.sample(scheduled, usage, false))
    }
}

/// Arrival times of the text-bearing chunks of one stream.
#[derive(Debug, Default)]
struct StreamTiming {
    first: Option<Instant>,
    last: Option<Instant>,
    gaps: Vec<Duration>,
    chunks: u64,
}

impl StreamTiming {
    fn token_chunk(&mut self, at: Instant) {
        if let Some(last) = self.last {
            self.gaps.push(at.duration_since(last));
        }
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.chunks += 1;
    }

    /// The stream's sample, ending now; token counts from `usage` when the server gave them.
    fn sample(self, scheduled: Instant, usage: Option<Usage>, disconnected: bool) -> Sample {
        let (output_tokens, token_source) = match usage.and_then(|u| u.completion_tokens) {
            Some(n) => (n, TokenSource::Usage),
            None => (self.chunks, TokenSource::Chunks),
        };
        Sample {
            ttft: self.first.map(|t| t.duration_since(scheduled)),
            itl: self.gaps,
            e2e: scheduled.elapsed(),
            output_tokens,
            token_source,
            prompt_tokens: usage.and_then(|u| u.prompt_tokens),
            disconnected,
        }
    }
}

/// About four characters per token for English text; used only when the server gives no count.
fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}
