//! Server-sent-event streaming of engine events, shared by chat and text completions.
//!
//! The route supplies how a chunk looks ([`ChunkShape`]); this module turns the per-prompt event receivers
//! into `data:` events: the shape's opening chunk per choice, a chunk per piece of text, a chunk with the
//! finish reason, then (with `include_usage`) a usage chunk with no choices, then `data: [DONE]`. An error
//! mid-stream is sent as an `{"error": {...}}` event followed by `[DONE]`, never as raw text. Dropping the
//! stream (the client went away) drops the receivers, which cancels the requests in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::SystemTime;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::access::TokenCounts;
use super::error::ApiError;
use super::trace::GenerationTrace;
use super::types::{PromptTokensDetails, UsageBody};
use crate::engine::logprobs::Sampled;
use crate::engine::{Completion, Event, FinishReason};

/// How one dialect's stream chunks look.
pub trait ChunkShape: Send + 'static {
    /// The body of one `data:` event.
    type Chunk: Serialize;
    /// The chunk opening choice `index` (chat sends the role), if any.
    fn opening(&self, index: usize) -> Option<Self::Chunk>;
    /// A chunk carrying `text` for choice `index`, with the tokens it came from when logprobs were asked for;
    /// None while the shape holds text back (a tool call being written).
    fn text(&mut self, index: usize, text: String, tokens: Vec<Sampled>) -> Option<Self::Chunk>;
    /// The chunks closing choice `index` (what was held back, then the finish reason).
    fn finish(&mut self, index: usize, reason: FinishReason) -> Vec<Self::Chunk>;
    /// The final usage chunk.
    fn usage(&self, usage: UsageBody) -> Self::Chunk;
}

/// Token counts of one or more finished choices, in the OpenAI `usage` shape.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub prompt: usize,
    pub completion: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached: usize,
}

impl Usage {
    /// Adds a finished choice's counts; its prompt counts only for the first choice of its prompt (`n > 1`
    /// choices share one read of the prompt).
    pub fn add(&mut self, c: &Completion, first_of_prompt: bool) {
        if first_of_prompt {
            self.prompt += c.prompt_tokens;
            self.cached += c.cached_tokens;
        }
        self.completion += c.completion_tokens;
    }

    /// The counts for the access log line.
    pub fn token_counts(&self) -> TokenCounts {
        TokenCounts {
            prompt: self.prompt,
            completion: self.completion,
        }
    }

    /// The counts as a response body.
    pub fn body(&self) -> UsageBody {
        UsageBody {
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            total_tokens: self.prompt + self.completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.cached,
            },
        }
    }
}

fn data(v: &impl Serialize) -> SseEvent {
    match serde_json::to_string(v) {
        Ok(json) => SseEvent::default().data(json),
        // Our own types always serialize; should one not, the client still gets a JSON error event.
        Err(e) => error_event(ApiError::internal(e)),
    }
}

/// An error mid-stream: the OpenAI error body with type `server_error` (the stream had started with 200).
fn error_event(e: ApiError) -> SseEvent {
    let body = e.stream_body();
    SseEvent::default().data(serde_json::to_string(&body).unwrap_or_default())
}

struct State<S: ChunkShape> {
    events: BoxStream<'static, (usize, Option<Event>)>,
    pending: VecDeque<SseEvent>,
    open_choices: usize,
    finished: Vec<bool>,
    /// Tokens whose text has not been sent yet, per choice.
    tokens: Vec<Vec<Sampled>>,
    choices_per_prompt: usize,
    usage: Usage,
    include_usage: bool,
    shape: S,
    timeout: ApiError,
    done: bool,
    request_id: String,
    trace: GenerationTrace,
}

impl<S: ChunkShape> State<S> {
    fn end_with_error(&mut self, e: ApiError) {
        tracing::warn!(request_id = %self.request_id, error = %e.message, "stream ended with an error");
        self.trace.failed(&e);
        self.pending.push_back(error_event(e));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    fn on_event(&mut self, index: usize, ev: Option<Event>) {
        if self.finished[index] {
            return; // the end marker after a choice's Done
        }
        match ev {
            Some(Event::Token(t)) => self.tokens[index].push(t),
            Some(Event::Text(t)) => {
                let tokens = std::mem::take(&mut self.tokens[index]);
                if let Some(chunk) = self.shape.text(index, t, tokens) {
                    self.pending.push_back(data(&chunk));
                }
            }
            Some(Event::Done(c)) if c.reason == FinishReason::Timeout => self.end_with_error(self.timeout.clone()),
            Some(Event::Done(c)) => {
                for chunk in self.shape.finish(index, c.reason) {
                    self.pending.push_back(data(&chunk));
                }
                self.finished[index] = true;
                self.usage.add(&c, index.is_multiple_of(self.choices_per_prompt));
                self.trace.choice_done(&c, SystemTime::now());
                self.open_choices -= 1;
                if self.open_choices == 0 {
                    tracing::info!(
                        request_id = %self.request_id,
                        prompt_tokens = self.usage.prompt,
                        cached_tokens = self.usage.cached,
                        generated_tokens = self.usage.completion,
                        "stream finished"
                    );
                    self.trace.finish(&self.usage);
                    if self.include_usage {
                        let u = self.shape.usage(self.usage.body());
                        self.pending.push_back(data(&u));
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                    self.done = true;
                }
            }
            Some(Event::Error(m)) => {
                self.end_with_error(ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, m))
            }
            Some(Event::Refused(m)) => self.end_with_error(ApiError::bad_request(m)),
            None => self.end_with_error(ApiError::not_ready(
                "the inference engine stopped before the request finished",
            )),
        }
    }
}

/// How a stream ends and is counted.
pub struct StreamEnd {
    pub include_usage: bool,
    /// Choices per prompt (`n`): a prompt's tokens count once in the usage.
    pub choices_per_prompt: usize,
    /// The error sent when the request times out.
    pub timeout: ApiError,
    pub request_id: String,
    /// The request's span, kept open until the stream ends.
    pub trace: GenerationTrace,
}

/// Streams the events of `receivers` (one per choice, in index order) as SSE.
/// The end of the stream is logged with `request_id` and the token counts (the access line is written when
/// the stream starts).
pub fn stream<S: ChunkShape>(receivers: Vec<UnboundedReceiver<Event>>, shape: S, end: StreamEnd) -> Response {
    let n = receivers.len();
    // Each receiver ends with a `None` marker so a vanished engine is noticed per choice.
    let merged = stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        UnboundedReceiverStream::new(rx)
            .map(move |e| (i, Some(e)))
            .chain(stream::once(async move { (i, None) }))
            .boxed()
    }));
    let mut pending = VecDeque::new();
    for i in 0..n {
        if let Some(v) = shape.opening(i) {
            pending.push_back(data(&v));
        }
    }
    let state = State {
        events: merged.boxed(),
        pending,
        open_choices: n,
        finished: vec![false; n],
        tokens: vec![Vec::new(); n],
        choices_per_prompt: end.choices_per_prompt.max(1),
        usage: Usage::default(),
        include_usage: end.include_usage,
        shape,
        timeout: end.timeout,
        done: false,
        request_id: end.request_id,
        trace: end.trace,
    };
    Sse::new(events(state)).keep_alive(KeepAlive::default()).into_response()
}

fn events<S: ChunkShape>(state: State<S>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.events.next().await {
                Some((i, ev)) => st.on_event(i, ev),
                None => st.done = true,
            }
        }
    })
}
