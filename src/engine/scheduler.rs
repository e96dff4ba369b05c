//! The engine thread's loop: intake, FCFS admission under batch and KV limits, one packed backend step per turn.
//!
//! Each step carries one decode token for every sequence in [`Phase::Decoding`], then prefill chunks of the
//! sequences still in [`Phase::Prefilling`] (oldest first) up to `max_batch_tokens`, so a long new prompt is
//! read over several steps instead of freezing running streams. A sequence leaves the batch the step it
//! finishes, is cancelled, or times out, and its KV reservation returns to the budget at once; its cache goes
//! to the [`PrefixCache`] for later prompts that start the same way. Knows nothing of which forward runs: that
//! is the [`Backend`]'s.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{Backend, BatchEntry, Detokenizer, KvCache, Logits, Row, StepError};
use super::constraint::{Constraint, ConstraintError, TokenMask};
use super::prefix_cache::PrefixCache;
use super::sequence::{Choice, Phase, Sequence};
use super::{Completion, EngineConfig, EngineStats, Event, FinishReason, Job};
use crate::metrics::ModelMetrics;
use crate::model::par;

/// Rows from which a step's sampling is shared out on the compute pool.
const PARALLEL_SAMPLING_ROWS: usize = 16;

/// First KV allocation beyond the prompt; the cache doubles from there as tokens come.
const INITIAL_KV_HEADROOM: usize = 64;

pub(super) struct Scheduler<B: Backend> {
    backend: B,
    text: Arc<dyn Detokenizer>,
    config: EngineConfig,
    rx: Receiver<Job>,
    stats: Arc<EngineStats>,
    metrics: Arc<ModelMetrics>,
    pub(super) waiting: VecDeque<Job>,
    pub(super) running: Vec<Sequence<B::Kv>>,
    pub(super) kv_reserved: usize,
    kv_bytes_per_token: usize,
    pub(super) prefix: PrefixCache<B::Kv>,
    open: bool,
    /// The last step's logits rows (the buffer is kept for the next step).
    logits: Logits,
}

impl<B: Backend> Scheduler<B> {
    pub fn new(
        backend: B,
        text: Arc<dyn Detokenizer>,
        config: EngineConfig,
        rx: Receiver<Job>,
        stats: Arc<EngineStats>,
        metrics: Arc<ModelMetrics>,
    ) -> Self {
        Self {
            kv_bytes_per_token: backend.kv_bytes_per_token(),
            prefix: PrefixCache::new(config.prefix_cache_bytes),
            backend,
            text,
            config,
            rx,
            stats,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_reserved: 0,
            open: true,
            logits: Logits::default(),
        }
    }

    /// Runs until every handle is gone and no work is left.
    pub fn run(mut self) {
        while self.intake(true) {
            self.turn();
        }
    }

    /// One turn of the loop: drop what left the queue, admit, reap, step.
    pub(super) fn turn(&mut self) {
        self.drop_gone_waiting();
        self.admit();
        self.reap_running();
        if !self.running.is_empty() {
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "forward step failed; failing the running requests");
                self.fail_running();
            }
        }
        self.publish();
    }

    /// Ends every running sequence after a failed step: those that had already finished get their Done, the
    /// others an error. Their caches may be half-written, so none goes to the prefix cache.
    fn fail_running(&mut self) {
        let failed = std::mem::take(&mut self.running);
        self.kv_reserved = 0;
        self.publish();
        for seq in failed {
            let event = match &seq.phase {
                Phase::Finished(done) => Event::Done(done.clone()),
                Phase::Cancelled => continue,
                Phase::Prefilling | Phase::Decoding => {
                    self.metrics.finish("error");
                    Event::Error("inference failed; see the server log".into())
                }
            };
            seq.send(event);
        }
    }

    /// Moves new jobs into the waiting queue; with `block`, waits for one when there is nothing to do. False
    /// once all handles are gone and no work is left.
    pub(super) fn intake(&mut self, block: bool) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            if !self.open {
                return false;
            }
            if block {
                match self.rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return false,
                }
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
            if job.abandoned() {
                tracing::info!(request_id = %job.req.id, "request cancelled while queued");
                metrics.finish("cancelled");
                return false;
            }
            if job.req.deadline.is_some_and(|d| d <= now) {
                tracing::warn!(request_id = %job.req.id, "request timed out while queued");
                let done = Completion {
                    reason: FinishReason::Timeout,
                    prompt_tokens: job.req.prompt.len(),
                    cached_tokens: 0,
                    completion_tokens: 0,
                    queue_time: job.enqueued.elapsed(),
                    time_to_first_token: None,
                    total_time: job.enqueued.elapsed(),
                };
                for events in &job.events {
                    metrics.finish("timeout");
                    expired.push((events.clone(), done.clone()));
                }
                return false;
            }
            true
        });
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.release_waiting(gone);
        }
        for (events, done) in expired {
            let _ = events.send(Event::Done(done));
        }
    }

    /// Whether `bytes` more of reservations fit the KV budget beside the running ones and the prefix cache.
    fn fits(&self, bytes: usize) -> bool {
        self.kv_reserved + self.prefix.bytes() + bytes <= self.config.kv_cache_bytes
    }

    pub(super) fn admit(&mut self) {
        let mut admitted = false;
        while let Some(job) = self.waiting.front() {
            // All of a request's choices run together (one is admitted even into a smaller batch limit).
            let n = job.req.n.max(1);
            if !self.running.is_empty() && self.running.len() + n > self.config.max_batch_size {
                break;
            }
            let bytes = job.req.kv_bytes(self.kv_bytes_per_token);
            // Cached prefixes give way to admissions; then FCFS: wait for room rather than letting later
            // requests overtake.
            while !self.fits(bytes) && self.prefix.evict_oldest() > 0 {}
            if !self.fits(bytes) {
                break;
            }
            let Some(job) = self.waiting.pop_front() else { break };
            self.stats.release_waiting(1);
            let prompt = job.req.prompt.len();
            let initial = prompt + job.req.params.max_tokens.min(INITIAL_KV_HEADROOM);
            let mut kv = self.backend.new_kv(initial, job.req.max_len());
            let cached = self.prefix.reuse(&job.req.prompt, &mut kv);
            self.kv_reserved += bytes;
            self.metrics.queue_time.observe(job.enqueued.elapsed().as_secs_f64());
            self.metrics.prompt_tokens.inc_by(prompt as u64);
            self.metrics.prefix_cache_hit_tokens.inc_by(cached as u64);
            if job.req.constraint.is_some() {
                self.metrics.constrained_requests.inc();
            }
            tracing::debug!(request_id = %job.req.id, prompt_tokens = prompt, cached_tokens = cached, "admitted");
            self.running.push(Sequence::new(job, kv, bytes / n));
            admitted = true;
        }
        // Before the step that may emit their first tokens: a client that scrapes right after its first token
        // sees itself running.
        if admitted {
            self.publish();
        }
    }

    /// Removes sequences that are no longer active, after cancelling those whose client left and ending those
    /// whose deadline passed. Their completions are announced once the gauges say they left.
    fn reap_running(&mut self) {
        let now = Instant::now();
        for seq in self.running.iter_mut().filter(|s| s.is_active()) {
            if seq.client_gone() {
                seq.cancel(&self.metrics);
            } else if seq.expired(now) {
                tracing::warn!(request_id = %seq.id, "request timed out");
                seq.finish(&*self.text, &self.metrics, FinishReason::Timeout, true);
            }
        }
        let (left, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition::<Vec<_>, _>(|s| !s.is_active());
        self.running = running;
        if left.is_empty() {
            return;
        }
        let mut ends = Vec::new();
        for seq in left {
            self.kv_reserved -= seq.kv_reserved;
            let (phase, tokens, kv, events) = seq.into_parts();
            self.prefix.insert(tokens, kv);
            if let Phase::Finished(done) = phase {
                ends.push((events, done));
            }
        }
        self.publish();
        for (events, done) in ends {
            let _ = events.send(Event::Done(done));
        }
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
        self.stats.kv_reserved_bytes.store(self.kv_reserved, Ordering::SeqCst);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics
            .kv_cache_usage
            .set(self.kv_reserved as f64 / self.config.kv_cache_bytes as f64);
    }

    /// Plans and runs one step, then samples for every sequence that reached the end of its input.
    fn step(&mut self) -> Result<(), StepError> {
        let alone = !self.running.iter().any(|s| matches!(s.phase, Phase::Decoding));
        let mut budget = if alone {
            self.config.max_batch_tokens.max(self.config.max_prefill_tokens_alone)
        } else {
            self.config.max_batch_tokens
        };
        // Decode tokens first (one each), then prefill chunks in admission order.
        let mut take = vec![0usize; self.running.len()];
        for (i, seq) in self.running.iter().enumerate() {
            if matches!(seq.phase, Phase::Decoding) && budget > 0 {
                take[i] = 1;
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            if matches!(seq.phase, Phase::Prefilling) && budget > 0 {
                take[i] = seq.pending().len().min(budget);
                budget -= take[i];
            }
        }
        let mut sampled = Vec::new();
        // The grammars of the sequences about to sample compute their masks on a second thread while the
        // forward runs, so the batch does not wait for them.
        let mut grammars: Vec<(usize, Box<dyn Constraint>)> = Vec::new();
        let mut batch = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let start = seq.kv.len();
            let want_logits = start + take[i] == seq.tokens.len();
            // Before its grammar is taken out for the mask.
            let argmax_only = want_logits && seq.takes_argmax();
            if want_logits {
                sampled.push(i);
                if let Some(c) = seq.constraint.take() {
                    grammars.push((i, c));
                }
            }
            batch.push(BatchEntry {
                kv: &mut seq.kv,
                tokens: &seq.tokens[start..start + take[i]],
                want_logits,
                argmax_only,
            });
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let backend = &self.backend;
        let logits = &mut self.logits;
        let started = Instant::now();
        let (stepped, masks) = std::thread::scope(|s| {
            let masking = (!grammars.is_empty()).then(|| s.spawn(|| compute_masks(&mut grammars)));
            let stepped = backend.step(&mut batch, logits);
            self.metrics.forward_time.observe(started.elapsed().as_secs_f64());
            (stepped, masking.map(|h| h.join()))
        });
        drop(batch);
        let masks = match masks {
            None => Vec::new(),
            Some(Ok(masks)) => masks,
            Some(Err(_)) => {
                let failed = || Err(ConstraintError("the grammar's mask computation panicked".into()));
                grammars.iter().map(|_| (failed(), Duration::ZERO)).collect()
            }
        };
        let mut mask_of: Vec<Option<MaskResult>> = (0..self.running.len()).map(|_| None).collect();
        for ((i, c), (mask, elapsed)) in grammars.into_iter().zip(masks) {
            self.metrics.constraint_mask.observe(elapsed.as_secs_f64());
            self.running[i].constraint = Some(c);
            mask_of[i] = Some(mask);
        }
        stepped?;
        if self.logits.rows() != sampled.len() {
            return Err(StepError(format!(
                "the backend returned {} logits rows for {} sequences",
                self.logits.rows(),
                sampled.len()
            )));
        }
        // Further choices of an `n > 1` request fork off before its first token, each sampling from the same
        // logits and mask (rare: one step per such request, so done here, one at a time).
        for (r, &i) in sampled.iter().enumerate() {
            if !self.running[i].has_forks() {
                continue;
            }
            for mut fork in self.running[i].fork_choices() {
                let same_mask = mask_of[i].as_ref().map(|m| m.as_ref().map_err(|e| e.clone()).cloned());
                fork.accept_logits(&*self.text, &self.metrics, &mut self.logits.row(r).to_vec(), same_mask)
                    .map_err(|e| StepError(e.to_string()))?;
                self.running.push(fork);
            }
        }
        // Sampling touches only each sequence's own sampler and row: from PARALLEL_SAMPLING_ROWS rows on, it is
        // shared out on the compute pool (a row of a 49k vocabulary takes tens of microseconds; a step of 64 took
        // milliseconds on one thread). Fewer rows are not worth waking the pool for.
        let mut choices: Vec<Option<Choice>> = (0..sampled.len()).map(|_| None).collect();
        {
            let mut wanted = sampled.iter().copied().peekable();
            let picks = self
                .running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| wanted.next_if_eq(i).is_some())
                .zip(self.logits.rows_to_sample())
                .map(|((i, seq), row)| (seq, row, mask_of[i].take()))
                .zip(choices.iter_mut());
            if sampled.len() >= PARALLEL_SAMPLING_ROWS {
                par::for_each_disjoint(picks.collect::<Vec<_>>().into_iter(), |_, p| choose(p));
            } else {
                picks.for_each(choose);
            }
        }
        for (&i, choice) in sampled.iter().zip(choices) {
            let choice = choice.ok_or_else(|| StepError("a row was not sampled".into()))?;
            self.running[i]
                .commit(&*self.text, &self.metrics, choice)
                .map_err(|e| StepError(e.to_string()))?;
        }
        self.reap_running();
        self.metrics.step_time.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

type MaskResult = Result<TokenMask, ConstraintError>;

/// One row to sample: the sequence, its logits row (or argmax) and grammar mask, and where its choice goes.
type Pick<'a, K> = (
    (&'a mut Sequence<K>, Row<'a>, Option<MaskResult>),
    &'a mut Option<Choice>,
);

fn choose<K: KvCache>(((seq, row, mask), out): Pick<'_, K>) {
    *out = Some(match row {
        Row::Logits(row) => seq.choose(row, mask),
        Row::Argmax(id) => seq.choose_argmax(id),
    });
}

/// Each grammar's mask for the next token, with the time it took.
fn compute_masks(grammars: &mut [(usize, Box<dyn Constraint>)]) -> Vec<(MaskResult, Duration)> {
    grammars
        .iter_mut()
        .map(|(_, c)| {
            let t = Instant::now();
            let mask = c.mask();
            (mask, t.elapsed())
        })
        .collect()
}
