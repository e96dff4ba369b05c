//! One request inside the engine: its tokens, KV cache, sampler and text state.

use std::time::Instant;

use tokio::sync::mpsc;

use super::sampler::Sampler;
use super::text::{IncrementalDecoder, StopMatcher, StopScan};
use super::{Completion, Event, FinishReason, Job};
use crate::metrics::Metrics;
use crate::model::{ModelError, SeqKv, TextTokenizer};

/// A running sequence.
pub(super) struct Sequence {
    pub id: String,
    /// Prompt followed by generated tokens; `kv.len()` of them have been through the model.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub kv: SeqKv,
    pub kv_reserved: usize,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub deadline: Option<Instant>,
    pub events: mpsc::UnboundedSender<Event>,
    pub queue_time: std::time::Duration,
    /// When the request was queued (TTFT and end-to-end latency count from here).
    enqueued: Instant,
    last_token_at: Option<Instant>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    pub finished: bool,
    /// The end event, sent by the scheduler once the sequence has left the batch and the gauges say so.
    pub done: Option<Completion>,
    /// The client dropped its receiver (noticed when sending).
    pub client_gone: bool,
}

impl Sequence {
    /// A sequence whose first `kv.len()` prompt tokens are already in `kv` (from the prefix cache).
    pub fn new(job: Job, kv: SeqKv, kv_reserved: usize) -> Self {
        let now = Instant::now();
        let p = &job.req.params;
        Self {
            sampler: Sampler::new(p, &job.req.prompt),
            stop: StopMatcher::new(&p.stop),
            decoder: IncrementalDecoder::default(),
            max_tokens: p.max_tokens,
            ignore_eos: p.ignore_eos,
            prompt_len: job.req.prompt.len(),
            cached_tokens: kv.len(),
            tokens: job.req.prompt,
            id: job.req.id,
            kv,
            kv_reserved,
            deadline: job.req.deadline,
            events: job.events,
            queue_time: now.duration_since(job.enqueued),
            enqueued: job.enqueued,
            last_token_at: None,
            finished: false,
            done: None,
            client_gone: false,
        }
    }

    /// Tokens still to feed before the next sample: the rest of the prompt, or the last sampled token.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.kv.len()..]
    }

    /// Whether the sequence is still reading its prompt.
    pub fn in_prefill(&self) -> bool {
        self.kv.len() < self.prompt_len
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn send(&mut self, text: String) {
        if !text.is_empty() && self.events.send(Event::Text(text)).is_err() {
            self.client_gone = true;
        }
    }

    /// Ends the sequence with `reason`, flushing held-back text unless a stop string ended it. Cannot fail: a
    /// tail that does not decode is logged and dropped, so the request still ends.
    pub fn finish(&mut self, tok: &TextTokenizer, metrics: &Metrics, reason: FinishReason, flush: bool) {
        let tail = if flush {
            self.decoder
                .flush(tok, &self.tokens[self.prompt_len..])
                .inspect_err(|e| tracing::warn!(request_id = %self.id, error = %e, "final text did not decode"))
                .ok()
        } else {
            None
        };
        if let Some(tail) = tail {
            let mut text = match self.stop.push(&tail) {
                StopScan::Emit(t) | StopScan::Stopped(t) => t,
            };
            text.push_str(&self.stop.flush());
            self.send(text);
        }
        let done = Completion {
            reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated(),
            queue_time: self.queue_time,
        };
        // Counted now, announced by the scheduler after it has removed the sequence: a client that scrapes
        // /metrics right after its response ends sees this request finished and no longer running.
        metrics.e2e_latency.observe(self.enqueued.elapsed().as_secs_f64());
        metrics.finish(reason.as_str());
        self.done = Some(done);
        self.finished = true;
    }

    /// Samples the next token from `logits` and emits its text; finishes the sequence when a stop condition hits.
    pub fn accept_logits(
        &mut self,
        tok: &TextTokenizer,
        metrics: &Metrics,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        let id = self.sampler.sample(logits);
        self.tokens.push(id);
        let now = Instant::now();
        match self.last_token_at {
            None => metrics
                .time_to_first_token
                .observe(now.duration_since(self.enqueued).as_secs_f64()),
            Some(t) => metrics.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        metrics.generation_tokens.inc();
        if !self.ignore_eos && tok.is_stop(id) {
            self.finish(tok, metrics, FinishReason::Stop, true);
            return Ok(());
        }
        let text = self.decoder.next(tok, &self.tokens[self.prompt_len..])?;
        match self.stop.push(&text) {
            StopScan::Emit(t) => self.send(t),
            StopScan::Stopped(t) => {
                self.send(t);
                self.finish(tok, metrics, FinishReason::Stop, false);
                return Ok(());
            }
        }
        if self.generated() >= self.max_tokens {
            self.finish(tok, metrics, FinishReason::Length, true);
        }
        Ok(())
    }
}
