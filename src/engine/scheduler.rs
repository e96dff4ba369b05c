//! The engine thread's loop: intake, FCFS admission under batch and KV limits, one packed forward per step.
//!
//! Each step carries one decode token for every running sequence that has finished its prompt, then prefill
//! chunks of the others (oldest first) up to `max_batch_tokens`, so a long new prompt is read over several
//! steps instead of freezing running streams. A sequence leaves the batch the step it finishes, is cancelled,
//! or times out, and its KV reservation returns to the budget at once; its cache goes to the [`PrefixCache`]
//! for later prompts that start the same way.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use super::prefix_cache::PrefixCache;
use super::sequence::Sequence;
use super::{EngineConfig, EngineStats, Event, FinishReason, Job};
use crate::metrics::Metrics;
use crate::model::{Model, SeqChunk, SeqKv};

/// First KV allocation beyond the prompt; the cache doubles from there as tokens come.
const INITIAL_KV_HEADROOM: usize = 64;

pub(super) struct Scheduler {
    model: Arc<Model>,
    config: EngineConfig,
    rx: Receiver<Job>,
    stats: Arc<EngineStats>,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Job>,
    running: Vec<Sequence>,
    kv_reserved: usize,
    kv_bytes_per_token: usize,
    prefix: PrefixCache,
    open: bool,
}

impl Scheduler {
    pub fn new(
        model: Arc<Model>,
        config: EngineConfig,
        rx: Receiver<Job>,
        stats: Arc<EngineStats>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let kv_bytes_per_token = model.llama.config.kv_shape().bytes_per_token();
        let prefix = PrefixCache::new(config.prefix_cache_bytes);
        Self {
            prefix,
            model,
            config,
            rx,
            stats,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_reserved: 0,
            kv_bytes_per_token,
            open: true,
        }
    }

    pub fn run(mut self) {
        while self.intake() {
            self.drop_gone_waiting();
            self.admit();
            self.reap_running();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "forward step failed; failing the running requests");
                self.fail_running();
            }
            self.publish();
        }
    }

    /// Ends every running sequence after a failed step: those that had already finished get their Done, the
    /// others an error. Their caches may be half-written, so none goes to the prefix cache.
    fn fail_running(&mut self) {
        let failed = std::mem::take(&mut self.running);
        self.kv_reserved = 0;
        self.publish();
        for mut seq in failed {
            let event = match seq.done.take() {
                Some(done) => Event::Done(done),
                None => {
                    self.metrics.finish("error");
                    Event::Error("inference failed; see the server log".into())
                }
            };
            let _ = seq.events.send(event);
        }
    }

    /// Moves new jobs into the waiting queue; blocks when there is nothing to do. False once all handles are
    /// gone and no work is left.
    fn intake(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            if !self.open {
                return false;
            }
            match self.rx.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
        true
    }

    fn drop_gone_waiting(&mut self) {
        let now = Instant::now();
        let before = self.waiting.len();
        let metrics = &self.metrics;
        let mut expired = Vec::new();
        self.waiting.retain(|job| {
            if job.events.is_closed() {
                tracing::info!(request_id = %job.req.id, "request cancelled while queued");
                metrics.finish("cancelled");
                return false;
            }
            if job.req.deadline.is_some_and(|d| d <= now) {
                tracing::warn!(request_id = %job.req.id, "request timed out while queued");
                let done = super::Completion {
                    reason: FinishReason::Timeout,
                    prompt_tokens: job.req.prompt.len(),
                    cached_tokens: 0,
                    completion_tokens: 0,
                    queue_time: job.enqueued.elapsed(),
                };
                metrics.finish("timeout");
                expired.push((job.events.clone(), done));
                return false;
            }
            true
        });
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::SeqCst);
            self.publish();
        }
        for (events, done) in expired {
            let _ = events.send(Event::Done(done));
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch_size {
            let Some(job) = self.waiting.front() else { break };
            let max_len = job.req.prompt.len() + job.req.params.max_tokens;
            let bytes = max_len * self.kv_bytes_per_token;
            // Cached prefixes give way to admissions; then FCFS: wait for room rather than letting later
            // requests overtake.
            let fits = |s: &Self| s.kv_reserved + s.prefix.bytes() + bytes <= s.config.kv_cache_bytes;
            while !fits(self) && self.prefix.evict_oldest() > 0 {}
            if !fits(self) {
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let initial = job.req.prompt.len() + job.req.params.max_tokens.min(INITIAL_KV_HEADROOM);
            let mut kv = SeqKv::new(self.model.llama.config.kv_shape(), initial, max_len);
            let cached = self.prefix.reuse(&job.req.prompt, &mut kv);
            self.kv_reserved += bytes;
            self.metrics.queue_time.observe(job.enqueued.elapsed().as_secs_f64());
            self.metrics.prompt_tokens.inc_by(job.req.prompt.len() as u64);
            self.metrics.prefix_cache_hit_tokens.inc_by(cached as u64);
            tracing::debug!(request_id = %job.req.id, prompt_tokens = job.req.prompt.len(), cached_tokens = cached, "admitted");
            self.running.push(Sequence::new(job, kv, bytes));
        }
        self.publish();
    }

    /// Removes finished sequences, and cancels those whose client left or whose deadline passed.
    fn reap_running(&mut self) {
        let now = Instant::now();
        let tok = &self.model.tokenizer;
        for seq in &mut self.running {
            if seq.finished {
                continue;
            }
            if seq.client_gone || seq.events.is_closed() {
                tracing::info!(request_id = %seq.id, generated = seq.generated(), "request cancelled: client went away");
                self.metrics.finish("cancelled");
                seq.finished = true;
            } else if seq.deadline.is_some_and(|d| d <= now) {
                tracing::warn!(request_id = %seq.id, "request timed out");
                seq.finish(tok, &self.metrics, FinishReason::Timeout, true);
            }
        }
        let (done, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition::<Vec<_>, _>(|s| s.finished);
        self.running = running;
        let mut ends = Vec::new();
        for mut seq in done {
            self.kv_reserved -= seq.kv_reserved;
            if let Some(d) = seq.done.take() {
                ends.push((seq.events.clone(), d));
            }
            self.prefix.insert(seq.tokens, seq.kv);
        }
        self.publish();
        for (events, d) in ends {
            let _ = events.send(Event::Done(d));
        }
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
        self.stats.kv_reserved_bytes.store(self.kv_reserved, Ordering::SeqCst);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics
            .waiting
            .set(self.stats.waiting.load(Ordering::SeqCst) as i64);
        self.metrics
            .kv_cache_usage
            .set(self.kv_reserved as f64 / self.config.kv_cache_bytes as f64);
    }

    /// Plans and runs one forward step, then samples for every sequence that reached the end of its input.
    fn step(&mut self) -> Result<(), crate::model::ModelError> {
        let mut budget = self.config.max_batch_tokens;
        // Decode tokens first (one each), then prefill chunks in admission order.
        let mut take = vec![0usize; self.running.len()];
        for (i, seq) in self.running.iter().enumerate() {
            if !seq.in_prefill() && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            if seq.in_prefill() && budget > 0 {
                take[i] = seq.pending().len().min(budget);
                budget -= take[i];
            }
        }
        let mut sampled = Vec::new();
        let mut chunks = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let start = seq.kv.len();
            let want_logits = start + take[i] == seq.tokens.len();
            if want_logits {
                sampled.push(i);
            }
            chunks.push(SeqChunk {
                kv: &mut seq.kv,
                tokens: &seq.tokens[start..start + take[i]],
                want_logits,
            });
        }
        self.metrics.batch_size.observe(chunks.len() as f64);
        let logits = self.model.llama.forward(&mut chunks)?;
        drop(chunks);
        if sampled.is_empty() {
            return Ok(());
        }
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let tok = &self.model.tokenizer;
        for (i, mut row) in sampled.into_iter().zip(rows) {
            self.running[i].accept_logits(tok, &self.metrics, &mut row)?;
        }
        self.reap_running();
        Ok(())
    }
}
