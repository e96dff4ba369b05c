//! Load shapes: closed loop at a concurrency, open loop at a Poisson rate, warm-up, and the sweep over levels
//! and endpoints (interleaved level by level in compare mode, so drift hits both alike).
//!
//! The shapes ([`drive`]) only decide when request `i` starts; what it does is a closure, so soak mode
//! (`crate::soak`) runs the same shapes with its own requests and accounting.
//!
//! Each request's outcome goes into the level's [`LevelStats`]; errors are counted there, never returned.
//! Every request is bounded by the client's timeout, so a level ends at most one timeout after it stops sending.
//! An [`Interrupt`] (Ctrl-C) ends the level at once, drops its in-flight requests uncounted, marks the level
//! `interrupted` and skips the rest, so the report still shows what was measured.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Config, Load, Stop};
use crate::client::{Client, RequestError, Sample};
use crate::stats::{LevelResult, LevelStats};
use crate::workload::Workload;

/// Warm-up requests use indices far from the measured ones, so they do not repeat the measured prompts.
const WARMUP_BASE: u64 = 1 << 62;

/// Becomes `true` once when the run is interrupted.
pub type Interrupt = tokio::sync::watch::Receiver<bool>;

/// Resolves when `interrupt` turns true; never, if its sender is gone without that.
async fn interrupted(mut interrupt: Interrupt) {
    if interrupt.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for every task, or aborts them all on an interrupt; returns whether it was interrupted.
async fn drain(tasks: &mut JoinSet<()>, interrupt: &Interrupt) -> bool {
    let cancelled = tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => false,
        _ = interrupted(interrupt.clone()) => true,
    };
    if cancelled {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    cancelled
}

/// One endpoint under test.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// "A", or "B" for the --compare URL.
    pub label: String,
    pub client: Client,
}

/// The level being measured: its statistics and when the last answer came.
struct Shared {
    stats: Mutex<(LevelStats, Instant)>,
    bar: ProgressBar,
    start: Instant,
}

impl Shared {
    fn new(bar: ProgressBar) -> Arc<Self> {
        let start = Instant::now();
        Arc::new(Shared {
            stats: Mutex::new((LevelStats::default(), start)),
            bar,
            start,
        })
    }

    fn record(&self, outcome: &Result<Sample, RequestError>) {
        let mut g = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        g.0.record(outcome);
        g.1 = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!(
            "{:.2} req/s, {} errors",
            g.0.ok() as f64 / secs,
            g.0.error_count()
        ));
        self.bar.inc(1);
    }

    fn finish(self: Arc<Self>) -> (LevelStats, Duration) {
        self.bar.finish();
        let shared = Arc::try_unwrap(self).unwrap_or_else(|_| unreachable!("every request task has ended"));
        let (stats, last) = shared.stats.into_inner().unwrap_or_else(PoisonError::into_inner);
        (stats, last.duration_since(shared.start))
    }
}

/// Sends warm-up requests to each endpoint, not counted (model load, caches, connections); returns whether the
/// run was interrupted.
pub async fn warm_up(config: &Config, endpoints: &[Endpoint], workload: &Arc<Workload>, interrupt: &Interrupt) -> bool {
    if config.warmup == 0 {
        return false;
    }
    let concurrency = match config.loads.first() {
        Some(Load::Concurrency(c)) => (*c).min(config.warmup as usize),
        _ => 1,
    };
    let stop = Stop {
        requests: Some(config.warmup),
        duration: None,
    };
    for ep in endpoints {
        let bar = progress(config.quiet, &format!("{} warm-up", ep.label), Some(config.warmup));
        let shared = Shared::new(bar);
        let cut = drive(
            Load::Concurrency(concurrency),
            stop,
            config.seed,
            shared.start,
            measure(&ep.client, workload, WARMUP_BASE, &shared),
            interrupt,
        )
        .await;
        shared.finish();
        if cut {
            return true;
        }
    }
    false
}

/// Runs the whole sweep: warm-up per endpoint, then each level against each endpoint in turn.
pub async fn run(
    config: &Config,
    endpoints: &[Endpoint],
    workload: Arc<Workload>,
    interrupt: &Interrupt,
) -> Vec<LevelResult> {
    let mut results = Vec::new();
    if warm_up(config, endpoints, &workload, interrupt).await {
        return results;
    }
    for (index, &load) in config.loads.iter().enumerate() {
        let stop = config.stop(index);
        for ep in endpoints {
            if *interrupt.borrow() {
                return results;
            }
            let bar = progress(config.quiet, &format!("{} {load}", ep.label), stop.requests);
            let shared = Shared::new(bar);
            let fire = measure(&ep.client, &workload, 0, &shared);
            let cut = drive(load, stop, config.seed, shared.start, fire, interrupt).await;
            let (stats, elapsed) = shared.finish();
            let mut result = stats.result(&ep.label, ep.client.url(), load, elapsed);
            result.interrupted = cut;
            results.push(result);
        }
    }
    results
}

/// Sends request `base + i` of `workload` at its scheduled time and records the outcome in `shared`.
fn measure(
    client: &Client,
    workload: &Arc<Workload>,
    base: u64,
    shared: &Arc<Shared>,
) -> impl Fn(u64, Instant) -> BoxFuture + Clone + Send + Sync + 'static {
    let (client, workload, shared) = (client.clone(), workload.clone(), shared.clone());
    move |i, at| {
        let (client, workload, shared) = (client.clone(), workload.clone(), shared.clone());
        Box::pin(async move {
            let outcome = client.send(&workload.request(base + i), at).await;
            shared.record(&outcome);
        })
    }
}

/// A progress bar on stderr (hidden when `quiet`): a bar for `len` requests, or a spinner.
pub fn progress(quiet: bool, prefix: &str, len: Option<u64>) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(n) => (
            ProgressBar::new(n),
            "{prefix:>14} [{bar:30}] {pos}/{len} {elapsed} {msg}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{prefix:>14} {spinner} {pos} done {elapsed} {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// One request in flight: sends it and records its outcome (what a [`drive`] closure returns).
pub type BoxFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Generates `load` from `start` until `stop`, calling `fire(i, scheduled)` for request `i`; returns whether
/// it was interrupted (in-flight requests are then dropped).
pub async fn drive<F>(load: Load, stop: Stop, seed: u64, start: Instant, fire: F, interrupt: &Interrupt) -> bool
where
    F: Fn(u64, Instant) -> BoxFuture + Clone + Send + Sync + 'static,
{
    match load {
        Load::Concurrency(c) => closed(c, stop, start, fire, interrupt).await,
        Load::Rate(r) => open(r, stop, seed, start, fire, interrupt).await,
    }
}

/// Closed loop: `concurrency` workers, each sending its next request as soon as its last one ends.
async fn closed<F>(concurrency: usize, stop: Stop, start: Instant, fire: F, interrupt: &Interrupt) -> bool
where
    F: Fn(u64, Instant) -> BoxFuture + Clone + Send + Sync + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let deadline = stop.duration.map(|d| start + d);
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, fire) = (next.clone(), fire.clone());
        tasks.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if stop.requests.is_some_and(|n| i >= n) {
                    break;
                }
                fire(i, Instant::now()).await;
            }
        });
    }
    drain(&mut tasks, interrupt).await
}

/// Open loop: Poisson arrivals at `rate` per second; each request is timed from its scheduled time, so a
/// sender that falls behind (or a server that stalls it) shows up in the latencies instead of hiding.
async fn open<F>(rate: f64, stop: Stop, seed: u64, start: Instant, fire: F, interrupt: &Interrupt) -> bool
where
    F: Fn(u64, Instant) -> BoxFuture + Clone + Send + Sync + 'static,
{
    // Same seed and rate -> same arrival times, for every endpoint of a comparison.
    let mut rng = StdRng::seed_from_u64(seed ^ rate.to_bits());
    let deadline = stop.duration.map(|d| start + d);
    let mut at = start;
    let mut tasks = JoinSet::new();
    for i in 0u64.. {
        if stop.requests.is_some_and(|n| i >= n) {
            break;
        }
        let u: f64 = rng.random();
        at += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
        if deadline.is_some_and(|d| at >= d) {
            break;
        }
        let cancelled = tokio::select! {
            _ = tokio::time::sleep_until(at) => false,
            _ = interrupted(interrupt.clone()) => true,
        };
        if cancelled {
            break;
        }
        tasks.spawn(fire(i, at));
        while tasks.try_join_next().is_some() {}
    }
    drain(&mut tasks, interrupt).await
}
