//! Server-sent-event streaming of engine events, shared by chat and text completions.
//!
//! The route supplies how a chunk looks ([`ChunkShape`]); this module turns the per-prompt event receivers
//! into `data:` events: the shape's opening chunk per choice, a chunk per piece of text, a chunk with the
//! finish reason, then (with `include_usage`) a usage chunk with no choices, then `data: [DONE]`. An error
//! mid-stream is sent as an `{"error": {...}}` event followed by `[DONE]`, never as raw text. Dropping the
//! stream (the client went away) drops the receivers, which cancels the requests in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::access::TokenCounts;
use super::error::ApiError;
use super::types::{PromptTokensDetails, UsageBody};
use crate::engine::{Completion, Event, FinishReason};

/// How one dialect's stream chunks look.
pub trait ChunkShape: Send + 'static {
    /// The body of one `data:` event.
    type Chunk: Serialize;
    /// The chunk opening choice `index` (chat sends the role), if any.
    fn opening(&self, index: usize) -> Option<Self::Chunk>;
    /// A chunk carrying `text` for choice `index`.
    fn text(&self, index: usize, text: String) -> Self::Chunk;
    /// The chunk closing choice `index`.
    fn finish(&self, index: usize, reason: FinishReason) -> Self::Chunk;
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
    /// Adds a finished choice's counts.
    pub fn add(&mut self, c: &Completion) {
        self.prompt += c.prompt_tokens;
        self.completion += c.completion_tokens;
        self.cached += c.cached_tokens;
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
    usage: Usage,
    include_usage: bool,
    shape: S,
    timeout: ApiError,
    done: bool,
    request_id: String,
}

impl<S: ChunkShape> State<S> {
    fn end_with_error(&mut self, e: ApiError) {
        tracing::warn!(request_id = %self.request_id, error = %e.message, "stream ended with an error");
        self.pending.push_back(error_event(e));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    fn on_event(&mut self, index: usize, ev: Option<Event>) {
        if self.finished[index] {
            return; // the end marker after a choice's Done
        }
        match ev {
            Some(Event::Text(t)) => self.pending.push_back(data(&self.shape.text(index, t))),
            Some(Event::Done(c)) if c.reason == FinishReason::Timeout => self.end_with_error(self.timeout.clone()),
            Some(Event::Done(c)) => {
                self.pending.push_back(data(&self.shape.finish(index, c.reason)));
                self.finished[index] = true;
                self.usage.add(&c);
                self.open_choices -= 1;
                if self.open_choices == 0 {
                    tracing::info!(
                        request_id = %self.request_id,
                        prompt_tokens = self.usage.prompt,
                        cached_tokens = self.usage.cached,
                        generated_tokens = self.usage.completion,
                        "stream finished"
                    );
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
            None => self.end_with_error(ApiError::not_ready(
                "the inference engine stopped before the request finished",
            )),
        }
    }
}

/// Streams the events of `receivers` (one per choice, in index order) as SSE.
/// The end of the stream is logged with `request_id` and the token counts (the access line is written when
/// the stream starts).
pub fn stream<S: ChunkShape>(
    receivers: Vec<UnboundedReceiver<Event>>,
    shape: S,
    include_usage: bool,
    timeout: ApiError,
    request_id: String,
) -> Response {
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
        usage: Usage::default(),
        include_usage,
        shape,
        timeout,
        done: false,
        request_id,
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
