//! One choice of a request inside the running batch: its tokens, cache, sampler, grammar, text state and
//! [`Phase`].
//!
//! A request waits in the scheduler's queue as a `Job` (nothing allocated but its prompt); admission turns it
//! into a [`Sequence`] with its cache. From there its phase only moves forward:
//! `Prefilling -> Decoding -> Finished(completion)`, or to `Cancelled` from either active phase (a client that
//! left, or a failed grammar, which has sent its error). A request with `n > 1` choices is one sequence until
//! its prompt is read; then [`Sequence::fork_choices`] copies it, cache included, once per further choice.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::backend::Detokenizer;
use super::constraint::{Constraint, ConstraintError, TokenMask};
use super::logprobs;
use super::sampler::Sampler;
use super::text::{IncrementalDecoder, StopMatcher, StopScan};
use super::{Completion, Event, FinishReason, Job};
use crate::metrics::ModelMetrics;
use crate::model::ModelError;

/// Where an admitted sequence is.
#[derive(Debug)]
pub(super) enum Phase {
    /// Reading its prompt, a chunk per step (a cached prefix may have skipped part of it).
    Prefilling,
    /// Generating, one token per step.
    Decoding,
    /// Done; the completion is announced once the sequence has left the batch and the gauges say so.
    Finished(Completion),
    /// The client went away; nothing more is sent.
    Cancelled,
}

/// An admitted request.
pub(super) struct Sequence<K> {
    pub id: String,
    /// Prompt followed by generated tokens; `kv.len()` of them have been through the model.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub kv: K,
    /// Bytes of the KV budget this sequence holds until it leaves.
    pub kv_reserved: usize,
    pub phase: Phase,
    max_tokens: usize,
    ignore_eos: bool,
    deadline: Option<Instant>,
    events: mpsc::UnboundedSender<Event>,
    /// Senders of the further choices of an `n > 1` request, until they are forked off.
    forks: Vec<mpsc::UnboundedSender<Event>>,
    /// The grammar the output follows; taken out while its mask is computed beside the forward.
    pub constraint: Option<Box<dyn Constraint>>,
    /// Alternatives to report with each token's log-probability (None: no logprobs).
    logprobs: Option<usize>,
    queue_time: Duration,
    /// When the request was queued (TTFT and end-to-end latency count from here).
    enqueued: Instant,
    last_token_at: Option<Instant>,
    /// Time from `enqueued` to the first sampled token, once there is one (as the TTFT metric observed it).
    time_to_first_token: Option<Duration>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

impl<K: super::backend::KvCache> Sequence<K> {
    /// A sequence whose first `kv.len()` prompt tokens are already in `kv` (from the prefix cache). The prefix
    /// cache always leaves at least the last prompt token to compute.
    /// `kv_reserved` is one choice's share.
    pub fn new(job: Job, kv: K, kv_reserved: usize) -> Self {
        let p = &job.req.params;
        let mut events = job.events.into_iter();
        let first = events.next();
        let (dead, _) = mpsc::unbounded_channel();
        Self {
            events: first.unwrap_or(dead),
            forks: events.collect(),
            constraint: job.req.constraint,
            logprobs: p.logprobs,
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
            phase: Phase::Prefilling,
            deadline: job.req.deadline,
            queue_time: job.enqueued.elapsed(),
            enqueued: job.enqueued,
            last_token_at: None,
            time_to_first_token: None,
        }
    }

    /// Whether further choices wait to be forked off this one (before its first token).
    pub fn has_forks(&self) -> bool {
        !self.forks.is_empty()
    }

    /// The further choices of an `n > 1` request, forked off this one once its prompt is read: the same
    /// tokens, a copy of the cache and grammar state, and each its own RNG seeded for its choice index.
    pub fn fork_choices(&mut self) -> Vec<Self> {
        let forks = std::mem::take(&mut self.forks);
        forks
            .into_iter()
            .enumerate()
            .map(|(i, events)| Self {
                id: self.id.clone(),
                tokens: self.tokens.clone(),
                prompt_len: self.prompt_len,
                cached_tokens: self.cached_tokens,
                kv: self.kv.fork(),
                kv_reserved: self.kv_reserved,
                phase: Phase::Prefilling,
                max_tokens: self.max_tokens,
                ignore_eos: self.ignore_eos,
                deadline: self.deadline,
                events,
                forks: Vec::new(),
                constraint: self.constraint.as_ref().map(|c| c.fork()),
                logprobs: self.logprobs,
                queue_time: self.queue_time,
                enqueued: self.enqueued,
                last_token_at: None,
                time_to_first_token: None,
                sampler: self.sampler.for_choice(i as u64 + 1),
                decoder: IncrementalDecoder::default(),
                stop: self.stop.fresh(),
            })
            .collect()
    }

    /// Tokens still to feed before the next sample: the rest of the prompt, or the last sampled token.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.kv.len()..]
    }

    /// Whether the sequence still runs (prefilling or decoding).
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Prefilling | Phase::Decoding)
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether the client has dropped its receiver (and those of choices still to fork).
    pub fn client_gone(&self) -> bool {
        self.events.is_closed() && self.forks.iter().all(|f| f.is_closed())
    }

    /// Whether the request's deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// Sends an event; false when the client is gone.
    pub fn send(&self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }

    /// What the scheduler keeps of a sequence that left the batch: its phase, tokens, cache and event sender.
    pub fn into_parts(self) -> (Phase, Vec<u32>, K, mpsc::UnboundedSender<Event>) {
        (self.phase, self.tokens, self.kv, self.events)
    }

    /// Marks the sequence cancelled because its client left.
    pub fn cancel(&mut self, metrics: &ModelMetrics) {
        tracing::info!(request_id = %self.id, generated = self.generated(), "request cancelled: client went away");
        metrics.finish("cancelled");
        self.phase = Phase::Cancelled;
    }

    /// Ends the sequence with an error its client is told about (a grammar that failed): the request's
    /// fault, so a client error.
    pub fn fail(&mut self, metrics: &ModelMetrics, error: &ConstraintError) {
        tracing::warn!(request_id = %self.id, error = %error, "request refused: its grammar failed");
        metrics.finish("error");
        self.send(Event::Refused(format!(
            "the request's grammar cannot be followed: {error}"
        )));
        self.phase = Phase::Cancelled;
    }

    fn send_text(&mut self, text: String, metrics: &ModelMetrics) {
        if !text.is_empty() && !self.send(Event::Text(text)) {
            self.cancel(metrics);
        }
    }

    /// Ends the sequence with `reason`, flushing held-back text unless a stop string ended it. Cannot fail: a
    /// tail that does not decode is logged and dropped, so the request still ends.
    pub fn finish(&mut self, tok: &dyn Detokenizer, metrics: &ModelMetrics, reason: FinishReason, flush: bool) {
        if flush {
            let tail = self
                .decoder
                .flush(tok, &self.tokens[self.prompt_len..])
                .inspect_err(|e| tracing::warn!(request_id = %self.id, error = %e, "final text did not decode"))
                .unwrap_or_default();
            let mut text = match self.stop.push(&tail) {
                StopScan::Emit(t) | StopScan::Stopped(t) => t,
            };
            text.push_str(&self.stop.flush());
            // A client that left now gets nothing more either way; the request still counts as finished.
            if !text.is_empty() {
                self.send(Event::Text(text));
            }
        }
        // Counted now, announced by the scheduler after it has removed the sequence: a client that scrapes
        // /metrics right after its response ends sees this request finished and no longer running.
        let total_time = self.enqueued.elapsed();
        metrics.e2e_latency.observe(total_time.as_secs_f64());
        metrics.finish(reason.as_str());
        self.phase = Phase::Finished(Completion {
            reason,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.generated(),
            queue_time: self.queue_time,
            time_to_first_token: self.time_to_first_token,
            total_time,
        });
    }

    /// Samples the next token from `logits`, among those `mask` allows (the grammar's mask for this step,
    /// computed beside the forward), and emits it; finishes the sequence when a stop condition hits.
    pub fn accept_logits(
        &mut self,
        tok: &dyn Detokenizer,
        metrics: &ModelMetrics,
        logits: &mut [f32],
        mask: Option<Result<TokenMask, ConstraintError>>,
    ) -> Result<(), ModelError> {
        let choice = self.choose(logits, mask);
        self.commit(tok, metrics, choice)
    }

    /// Whether this step's choice is the raw logits row's first largest value, so a backend may return that
    /// index instead of the row ([`super::backend::BatchEntry::argmax_only`]): a plain greedy sampler, no
    /// grammar, no log-probabilities, no choices still to fork off the row.
    pub fn takes_argmax(&self) -> bool {
        self.sampler.is_plain_greedy() && self.constraint.is_none() && self.logprobs.is_none() && !self.has_forks()
    }

    /// [`Self::choose`] for a sequence that [`Self::takes_argmax`], given the row's argmax.
    pub fn choose_argmax(&mut self, id: u32) -> Choice {
        self.sampler.record(id);
        Choice::Token { id, raw: None }
    }

    /// The first half of [`Self::accept_logits`]: what touches only this sequence's sampler and its logits row,
    /// so the scheduler runs it for every row of a step in parallel. Applies the mask and samples.
    pub fn choose(&mut self, logits: &mut [f32], mask: Option<Result<TokenMask, ConstraintError>>) -> Choice {
        let raw = self.logprobs.map(|_| logits.to_vec());
        match mask {
            Some(Ok(mask)) => mask.apply(logits),
            Some(Err(e)) => return Choice::Failed(e),
            None => {}
        }
        Choice::Token {
            id: self.sampler.sample(logits),
            raw,
        }
    }

    /// The second half of [`Self::accept_logits`]: records and emits the chosen token and finishes the
    /// sequence when a stop condition hits.
    pub fn commit(&mut self, tok: &dyn Detokenizer, metrics: &ModelMetrics, choice: Choice) -> Result<(), ModelError> {
        let (id, raw) = match choice {
            Choice::Token { id, raw } => (id, raw),
            Choice::Failed(e) => {
                self.fail(metrics, &e);
                return Ok(());
            }
        };
        self.tokens.push(id);
        self.phase = Phase::Decoding;
        let now = Instant::now();
        match self.last_token_at {
            None => {
                let ttft = now.duration_since(self.enqueued);
                metrics.time_to_first_token.observe(ttft.as_secs_f64());
                self.time_to_first_token = Some(ttft);
            }
            Some(t) => metrics.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        metrics.generation_tokens.inc();
        // A grammar allows a stop token only where the output is complete, and cannot be fed one.
        if tok.is_stop(id) && (!self.ignore_eos || self.constraint.is_some()) {
            self.finish(tok, metrics, FinishReason::Stop, true);
            return Ok(());
        }
        if let (Some(raw), Some(top)) = (raw, self.logprobs) {
            if !self.send(Event::Token(logprobs::sampled(&raw, id, top))) {
                self.cancel(metrics);
                return Ok(());
            }
        }
        let grammar_done = match self.constraint.as_mut().map(|c| c.commit(id).map(|()| c.is_finished())) {
            Some(Err(e)) => {
                self.fail(metrics, &e);
                return Ok(());
            }
            Some(Ok(done)) => done,
            None => false,
        };
        let text = self.decoder.next(tok, &self.tokens[self.prompt_len..])?;
        match self.stop.push(&text) {
            StopScan::Emit(t) => self.send_text(t, metrics),
            StopScan::Stopped(t) => {
                self.send_text(t, metrics);
                if self.is_active() {
                    self.finish(tok, metrics, FinishReason::Stop, false);
                }
                return Ok(());
            }
        }
        if self.is_active() && grammar_done {
            self.finish(tok, metrics, FinishReason::Stop, true);
        } else if self.is_active() && self.generated() >= self.max_tokens {
            self.finish(tok, metrics, FinishReason::Length, true);
        }
        Ok(())
    }
}

/// A sequence's pick from one logits row ([`Sequence::choose`]).
#[derive(Debug)]
pub enum Choice {
    /// The sampled id, and the row before masking when log-probabilities were asked for.
    Token { id: u32, raw: Option<Vec<f32>> },
    /// The grammar's mask could not be computed.
    Failed(ConstraintError),
}
