//! The embedding engine: one dedicated OS thread owns the embedding model and packs the inputs of many
//! concurrent requests into padded batch forwards.
//!
//! Async code talks to it only through [`Embedder`], a cheap handle holding a channel sender.
//! [`Embedder::submit`] refuses a request at once ([`SubmitError::QueueFull`]) when `max_waiting` requests are
//! already in the engine, before any of its inputs is tokenized, and otherwise returns a per-request reply
//! receiver. The thread tokenizes what it admits (the model cuts each text to the bytes its first tokens can
//! span), then repeatedly picks a batch under a padded-token budget and runs it; results go back once all of a
//! request's inputs are done.
//!
//! Batching policy: all pending inputs, from every request, are sorted by length and split greedily into groups
//! whose padded size (rows x longest row) fits `max_batch_tokens`; the group holding the oldest pending input
//! runs next, so similar lengths share a forward (little padding) and nothing starves. One input longer than the
//! budget runs alone.
//!
//! Cancellation and timeouts: before each batch, requests whose reply receiver is gone (the HTTP handler was
//! dropped because the client went away) or whose deadline has passed are removed with their pending inputs,
//! which are never computed. A forward already running is not interrupted.
//!
//! Knows nothing of HTTP; never runs on a tokio worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{AliveGuard, Places, SubmitError};
use crate::metrics::EmbeddingMetrics;
use crate::model::embedding::EmbeddingModel;

/// Limits of the embedding engine.
#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    /// Most padded tokens (rows x longest row) in one forward.
    pub max_batch_tokens: usize,
    /// Most requests in the engine (queued or being embedded); more are refused.
    pub max_waiting: usize,
}

/// The model side the engine drives: tokenization and one batched forward. [`EmbeddingModel`] in production;
/// a stub in unit tests.
pub trait EmbedBackend: Send + 'static {
    /// Token ids of one input, truncated to the model's maximum.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String>;
    /// One normalised vector per token sequence, computed together.
    fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String>;
}

impl EmbedBackend for Arc<EmbeddingModel> {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        EmbeddingModel::tokenize(self, text).map_err(|e| e.to_string())
    }

    fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
        EmbeddingModel::embed_batch(self, inputs).map_err(|e| e.to_string())
    }
}

/// Texts to embed.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    /// Request id, for logs.
    pub id: String,
    pub inputs: Vec<String>,
    /// When the request must be answered by; its pending inputs are dropped after.
    pub deadline: Option<Instant>,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens used, over all inputs (after truncation).
    pub tokens: usize,
    /// Time from submission to the first forward holding one of its inputs.
    pub queue_time: Duration,
}

/// Why a request got no embeddings.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EmbedError {
    /// The deadline passed first.
    #[error("the request's deadline passed")]
    Timeout,
    /// An input could not be tokenized (the client's to fix).
    #[error("input {index}: {message}")]
    BadInput { index: usize, message: String },
    /// The forward failed (ours).
    #[error("embedding failed: {0}")]
    Failed(String),
}

/// What a request receives.
pub type EmbedReply = Result<Embedded, EmbedError>;

struct Job {
    req: EmbedRequest,
    reply: oneshot::Sender<EmbedReply>,
    enqueued: Instant,
}

#[derive(Debug)]
struct Shared {
    places: Places,
    alive: AtomicBool,
}

/// Handle to the embedding thread.
#[derive(Clone)]
pub struct Embedder {
    tx: std::sync::mpsc::Sender<Job>,
    shared: Arc<Shared>,
    config: Arc<EmbedderConfig>,
    metrics: Arc<EmbeddingMetrics>,
    /// Model name reported to clients.
    pub name: String,
    /// Embedding width.
    pub dim: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Starts the embedding thread for `model`.
    pub fn start(
        model: Arc<EmbeddingModel>,
        config: EmbedderConfig,
        metrics: Arc<EmbeddingMetrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (name, dim) = (model.name.clone(), model.dim);
        Self::start_with(model, name, dim, config, metrics)
    }

    /// Starts the thread over any backend.
    pub fn start_with<B: EmbedBackend>(
        backend: B,
        name: String,
        dim: usize,
        config: EmbedderConfig,
        metrics: Arc<EmbeddingMetrics>,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            places: Places::new(config.max_waiting, metrics.waiting.clone()),
            alive: AtomicBool::new(true),
        });
        let config = Arc::new(config);
        let worker = Worker {
            backend,
            rx,
            shared: shared.clone(),
            max_batch_tokens: config.max_batch_tokens.max(1),
            metrics: metrics.clone(),
            jobs: BTreeMap::new(),
            items: Vec::new(),
            next_seq: 0,
        };
        let handle = std::thread::Builder::new()
            .name("amlserve-embedder".into())
            .spawn(move || {
                let shared = worker.shared.clone();
                let _guard = AliveGuard {
                    alive: &shared.alive,
                    thread: "embedder",
                };
                worker.run();
            })?;
        Ok((
            Self {
                tx,
                shared,
                config,
                metrics,
                name,
                dim,
            },
            handle,
        ))
    }

    /// Queues a request; its reply arrives on the returned receiver, and dropping that receiver cancels what
    /// is not computed yet. Refuses at once when the queue is full.
    pub fn submit(&self, req: EmbedRequest) -> Result<oneshot::Receiver<EmbedReply>, SubmitError> {
        let result = self.try_submit(req);
        if result.is_err() {
            self.metrics.finish("rejected");
        }
        result
    }

    fn try_submit(&self, req: EmbedRequest) -> Result<oneshot::Receiver<EmbedReply>, SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Stopped);
        }
        self.shared.places.take(1)?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            req,
            reply,
            enqueued: Instant::now(),
        };
        if self.tx.send(job).is_err() {
            self.shared.places.release(1);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    /// Whether the embedding thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Requests in the engine (queued or being embedded).
    pub fn waiting(&self) -> usize {
        self.shared.places.taken()
    }

    /// The limits the engine runs with.
    pub fn config(&self) -> &EmbedderConfig {
        &self.config
    }
}

/// A request inside the thread.
struct Active {
    job: Job,
    vectors: Vec<Vec<f32>>,
    /// Inputs not computed yet.
    left: usize,
    tokens: usize,
    queue_time: Option<Duration>,
}

/// One input waiting for a forward.
struct Item {
    /// Arrival number of its request (the key in `Worker::jobs`).
    seq: u64,
    index: usize,
    ids: Vec<u32>,
}

struct Worker<B> {
    backend: B,
    rx: std::sync::mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    max_batch_tokens: usize,
    metrics: Arc<EmbeddingMetrics>,
    /// Requests by arrival.
    jobs: BTreeMap<u64, Active>,
    /// Pending inputs in arrival order (request, then input index).
    items: Vec<Item>,
    next_seq: u64,
}

impl<B: EmbedBackend> Worker<B> {
    fn run(mut self) {
        loop {
            if self.jobs.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return, // every handle is gone
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.admit(job);
            }
            self.prune(Instant::now());
            if !self.items.is_empty() {
                self.step();
            }
        }
    }

    /// Ends a request: counts it and frees its queue place.
    /// Counted before the reply is sent, so a client that has its reply also sees it counted.
    fn end(&self, job: Job, outcome: &str, reply: EmbedReply) {
        // A result nobody waits for any more was cancelled; a timeout or an error stays what it is.
        let outcome = if outcome == "ok" && job.reply.is_closed() {
            "cancelled"
        } else {
            outcome
        };
        self.metrics.finish(outcome);
        self.shared.places.release(1);
        let _ = job.reply.send(reply);
    }

    /// Tokenizes a new request's inputs and queues them.
    fn admit(&mut self, job: Job) {
        if job.reply.is_closed() {
            return self.end(job, "cancelled", Err(EmbedError::Timeout));
        }
        if job.req.deadline.is_some_and(|d| d <= Instant::now()) {
            return self.end(job, "timeout", Err(EmbedError::Timeout));
        }
        let mut ids = Vec::with_capacity(job.req.inputs.len());
        for (index, text) in job.req.inputs.iter().enumerate() {
            match self.backend.tokenize(text) {
                Ok(t) => ids.push(t),
                Err(message) => return self.end(job, "error", Err(EmbedError::BadInput { index, message })),
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let n = ids.len();
        if n == 0 {
            let reply = Ok(Embedded {
                vectors: Vec::new(),
                tokens: 0,
                queue_time: job.enqueued.elapsed(),
            });
            return self.end(job, "ok", reply);
        }
        let tokens = ids.iter().map(Vec::len).sum();
        self.items
            .extend(ids.into_iter().enumerate().map(|(index, ids)| Item { seq, index, ids }));
        self.jobs.insert(
            seq,
            Active {
                job,
                vectors: vec![Vec::new(); n],
                left: n,
                tokens,
                queue_time: None,
            },
        );
    }

    /// Drops requests whose client is gone or whose deadline passed, with their pending inputs.
    fn prune(&mut self, now: Instant) {
        let gone: Vec<(u64, &'static str)> = self
            .jobs
            .iter()
            .filter_map(|(&seq, a)| {
                if a.job.req.deadline.is_some_and(|d| d <= now) {
                    Some((seq, "timeout"))
                } else if a.job.reply.is_closed() {
                    Some((seq, "cancelled"))
                } else {
                    None
                }
            })
            .collect();
        for (seq, outcome) in gone {
            self.remove(seq, outcome, Err(EmbedError::Timeout));
        }
    }

    /// Ends request `seq` with `reply`, dropping its pending inputs.
    fn remove(&mut self, seq: u64, outcome: &str, reply: EmbedReply) {
        if let Some(a) = self.jobs.remove(&seq) {
            self.items.retain(|i| i.seq != seq);
            if outcome != "ok" {
                tracing::debug!(request_id = %a.job.req.id, outcome, "embedding request ended early");
            }
            self.end(a.job, outcome, reply);
        }
    }

    /// Runs one batch and answers the requests it completes.
    fn step(&mut self) {
        let lens: Vec<usize> = self.items.iter().map(|i| i.ids.len()).collect();
        let mut chosen = plan_batch(&lens, self.max_batch_tokens);
        chosen.sort_unstable();
        let mut batch = Vec::with_capacity(chosen.len());
        let mut rest = Vec::with_capacity(self.items.len() - chosen.len());
        let mut next = chosen.iter().peekable();
        for (i, item) in std::mem::take(&mut self.items).into_iter().enumerate() {
            if next.peek() == Some(&&i) {
                next.next();
                batch.push(item);
            } else {
                rest.push(item);
            }
        }
        self.items = rest;
        let now = Instant::now();
        for item in &batch {
            if let Some(a) = self.jobs.get_mut(&item.seq) {
                if a.queue_time.is_none() {
                    let q = now.saturating_duration_since(a.job.enqueued);
                    a.queue_time = Some(q);
                    self.metrics.queue_time.observe(q.as_secs_f64());
                }
            }
        }
        let width = batch.iter().map(|i| i.ids.len()).max().unwrap_or(0);
        let m = &self.metrics;
        m.batch_size.observe(batch.len() as f64);
        m.batch_tokens.observe((batch.len() * width) as f64);
        m.input_tokens.inc_by(batch.iter().map(|i| i.ids.len() as u64).sum());
        let refs: Vec<&[u32]> = batch.iter().map(|i| i.ids.as_slice()).collect();
        let started = Instant::now();
        let result = self.backend.embed_batch(&refs);
        self.metrics.forward_time.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(vectors) if vectors.len() == batch.len() => {
                for (item, v) in batch.into_iter().zip(vectors) {
                    let Some(a) = self.jobs.get_mut(&item.seq) else {
                        continue;
                    };
                    a.vectors[item.index] = v;
                    a.left -= 1;
                    if a.left == 0 {
                        self.finish(item.seq);
                    }
                }
            }
            other => {
                let msg = match other {
                    Err(e) => e,
                    Ok(v) => format!("{} vectors for {} inputs", v.len(), batch.len()),
                };
                tracing::error!(error = %msg, inputs = batch.len(), "embedding forward failed");
                let mut seqs: Vec<u64> = batch.iter().map(|i| i.seq).collect();
                seqs.dedup();
                for seq in seqs {
                    self.remove(seq, "error", Err(EmbedError::Failed(msg.clone())));
                }
            }
        }
    }

    /// Answers a request whose inputs are all computed.
    fn finish(&mut self, seq: u64) {
        if let Some(a) = self.jobs.remove(&seq) {
            let reply = Ok(Embedded {
                vectors: a.vectors,
                tokens: a.tokens,
                queue_time: a.queue_time.unwrap_or_default(),
            });
            self.end(a.job, "ok", reply);
        }
    }
}

/// Which pending inputs run next, as indices into `lens` (the inputs' token counts in arrival order, the
/// oldest first). Sorts by length, splits greedily into groups whose padded size (rows x longest) fits
/// `budget`, and returns the group that holds the oldest input (index 0). Never empty when `lens` is not.
pub fn plan_batch(lens: &[usize], budget: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let mut group: Vec<usize> = Vec::new();
    let mut holds_oldest = false;
    for i in order {
        // Sorted ascending, so the newcomer is the longest row of the group.
        if !group.is_empty() && (group.len() + 1) * lens[i].max(1) > budget {
            if holds_oldest {
                return group;
            }
            group.clear();
        }
        holds_oldest |= i == 0;
        group.push(i);
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_plan_fits_the_budget_holds_the_oldest_and_groups_similar_lengths() {
        // The oldest is long; the short ones go together without it.
        let lens = [200, 5, 6, 7, 190, 8];
        let b = plan_batch(&lens, 400);
        assert_eq!(
            b.iter().copied().collect::<std::collections::BTreeSet<_>>(),
            [0, 4].into()
        );
        // The oldest is short: it runs with the other short ones, not with a long row that would pad them all.
        let b = plan_batch(&[5, 200, 6, 7], 400);
        assert_eq!(b.len(), 3);
        assert!(!b.contains(&1));
        for (lens, budget) in [
            (vec![3usize; 100], 64),
            (vec![10, 300, 50, 7, 7, 9], 256),
            (vec![1000], 16),
        ] {
            let b = plan_batch(&lens, budget);
            assert!(b.contains(&0), "{lens:?}");
            let width = b.iter().map(|&i| lens[i]).max().unwrap_or(0);
            assert!(b.len() == 1 || b.len() * width <= budget, "{lens:?}: {b:?}");
        }
        assert_eq!(plan_batch(&[3; 100], 64).len(), 21);
        assert_eq!(plan_batch(&[1000], 16), vec![0], "one input over the budget runs alone");
        assert!(plan_batch(&[], 16).is_empty());
    }

    /// A backend whose vector is the input's length, that records every batch and can be held mid-forward.
    #[derive(Clone, Default)]
    struct Stub {
        batches: Arc<Mutex<Vec<Vec<usize>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl EmbedBackend for Stub {
        fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
            if text == "bad" {
                return Err("cannot tokenize".into());
            }
            Ok(vec![1; text.len()])
        }

        fn embed_batch(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>, String> {
            let _held = self.gate.lock().map_err(|e| e.to_string())?;
            self.batches
                .lock()
                .map_err(|e| e.to_string())?
                .push(inputs.iter().map(|i| i.len()).collect());
            Ok(inputs.iter().map(|i| vec![i.len() as f32]).collect())
        }
    }

    fn start(stub: &Stub, max_batch_tokens: usize, max_waiting: usize) -> (Embedder, Arc<EmbeddingMetrics>) {
        let metrics = crate::metrics::Metrics::new().embedding_model("stub");
        let config = EmbedderConfig {
            max_batch_tokens,
            max_waiting,
        };
        let (e, _thread) =
            Embedder::start_with(stub.clone(), "stub".into(), 1, config, metrics.clone()).expect("start");
        (e, metrics)
    }

    fn req(inputs: &[&str]) -> EmbedRequest {
        EmbedRequest {
            id: "t".into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            deadline: None,
        }
    }

    fn outcome(m: &EmbeddingMetrics, o: &str) -> u64 {
        m.finished_count(o)
    }

    fn wait_idle(e: &Embedder) {
        let until = Instant::now() + Duration::from_secs(10);
        while e.waiting() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(e.waiting(), 0, "the engine drained");
    }

    #[tokio::test]
    async fn concurrent_requests_share_forwards_and_get_their_own_results_in_order() {
        let stub = Stub::default();
        let (e, m) = start(&stub, 1024, 16);
        // Hold the first forward so the others queue up behind it and are packed together.
        let held = stub.gate.lock().expect("gate");
        let first = e.submit(req(&["aaaa"])).expect("queued");
        std::thread::sleep(Duration::from_millis(50));
        let rxs: Vec<_> = (1..=5)
            .map(|n| e.submit(req(&[&"x".repeat(n), &"y".repeat(10 + n)])).expect("queued"))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        assert_eq!(first.await.expect("reply").expect("ok").vectors, vec![vec![4.0]]);
        for (n, rx) in (1..=5).zip(rxs) {
            let r = rx.await.expect("reply").expect("ok");
            assert_eq!(r.vectors, vec![vec![n as f32], vec![(10 + n) as f32]]);
            assert_eq!(r.tokens, 10 + 2 * n);
        }
        let batches = stub.batches.lock().expect("batches").clone();
        assert_eq!(
            batches.len(),
            2,
            "one forward for the held input, one for the ten queued: {batches:?}"
        );
        assert_eq!(batches[1].len(), 10);
        assert_eq!(outcome(&m, "ok"), 6);
        assert_eq!(m.input_tokens.get(), 4 + (1..=5).map(|n| 10 + 2 * n).sum::<u64>());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_dropped_or_late_requests_are_not_computed() {
        let stub = Stub::default();
        let (e, m) = start(&stub, 4, 2);
        let held = stub.gate.lock().expect("gate");
        let running = e.submit(req(&["aaaa"])).expect("queued");
        std::thread::sleep(Duration::from_millis(50)); // its forward is now held
        let cancelled = e.submit(req(&["bbbb", "cccc", "dddd"])).expect("queued");
        assert_eq!(
            e.submit(req(&["full"])).err(),
            Some(SubmitError::QueueFull { waiting: 2 })
        );
        assert_eq!(outcome(&m, "rejected"), 1);
        drop(cancelled); // the client went away
        drop(held);
        running.await.expect("reply").expect("ok");
        wait_idle(&e);
        let late = EmbedRequest {
            deadline: Some(Instant::now()),
            ..req(&["eeee"])
        };
        let late = e.submit(late).expect("queued").await.expect("reply");
        assert_eq!(late.err(), Some(EmbedError::Timeout));
        let bad = e.submit(req(&["ok", "bad"])).expect("queued").await.expect("reply");
        assert!(matches!(bad, Err(EmbedError::BadInput { index: 1, .. })), "{bad:?}");
        let batches = stub.batches.lock().expect("batches").clone();
        assert_eq!(batches, vec![vec![4]], "only the first request was computed");
        for (o, n) in [
            ("ok", 1),
            ("cancelled", 1),
            ("timeout", 1),
            ("error", 1),
            ("rejected", 1),
        ] {
            assert_eq!(outcome(&m, o), n, "{o}");
        }
        assert_eq!(m.waiting.get(), 0);
    }
}
