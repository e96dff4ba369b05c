//! The engine-progress watchdog: liveness fails when the engine thread has work but makes no progress.
//!
//! A wedged engine (a kernel that never returns, a deadlock) leaves the process listening and the engine thread
//! alive, so neither the thread-exit watch nor readiness alone would restart it. [`Watched`] wraps the backend
//! and counts every forward step the engine thread completes; a small thread samples that count once a second.
//! While there is work (sequences running or requests waiting) and the count has not moved for
//! `--engine-stall-secs`, [`Watchdog::stall`] reports the stall: `GET /` and `GET /health` answer 503, the
//! `amlserve_engine_stalled` gauge is 1 and an error is logged, so the platform's liveness probe restarts the
//! container. A step that completes again clears it. An idle engine (no work) is never stalled.
//!
//! Fault injection for tests: `--debug-wedge-engine-after-secs N` (hidden from `--help`) makes the engine
//! thread's first forward step after N seconds sleep forever.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;

use crate::engine::backend::{Backend, BatchEntry, Logits, StepError};
use crate::engine::Engine;

/// How often the watchdog thread samples the engine.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Forward steps the engine thread has completed.
#[derive(Debug, Default)]
pub struct Progress {
    steps: AtomicU64,
}

impl Progress {
    fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }
}

/// A backend that counts completed steps into a [`Progress`] (and can be told to wedge, for tests).
pub struct Watched<B> {
    pub inner: B,
    pub progress: Arc<Progress>,
    /// Fault injection: the first step at or after this instant never returns.
    pub wedge_at: Option<Instant>,
}

impl<B: Backend> Backend for Watched<B> {
    type Kv = B::Kv;

    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }

    fn new_kv(&self, initial: usize, max_len: usize) -> Self::Kv {
        self.inner.new_kv(initial, max_len)
    }

    fn step(&self, batch: &mut [BatchEntry<'_, Self::Kv>], logits: &mut Logits) -> Result<(), StepError> {
        if self.wedge_at.is_some_and(|t| Instant::now() >= t) {
            tracing::warn!("--debug-wedge-engine-after-secs: the engine thread now sleeps forever");
            loop {
                std::thread::park();
            }
        }
        let out = self.inner.step(batch, logits);
        self.progress.steps.fetch_add(1, Ordering::Relaxed);
        out
    }
}

/// Whether the engine is stalled, as the watchdog thread last saw it.
#[derive(Debug)]
pub struct Watchdog {
    stall_after: Duration,
    /// Seconds without progress while busy, when that reached `stall_after`; 0 when not stalled.
    stalled_secs: AtomicU64,
    stalled: AtomicBool,
    gauge: IntGauge,
}

impl Watchdog {
    /// Starts the watchdog thread over `engine`'s counters and `progress`.
    pub fn start(
        engine: Engine,
        progress: Arc<Progress>,
        stall_after: Duration,
        gauge: IntGauge,
    ) -> std::io::Result<Arc<Self>> {
        let dog = Arc::new(Self {
            stall_after,
            stalled_secs: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            gauge,
        });
        let watcher = dog.clone();
        std::thread::Builder::new()
            .name("amlserve-watchdog".into())
            .spawn(move || watcher.watch(&engine, &progress))?;
        Ok(dog)
    }

    fn watch(&self, engine: &Engine, progress: &Progress) {
        let mut last_steps = progress.steps();
        let mut moved_at = Instant::now();
        let mut was_busy = false;
        loop {
            std::thread::sleep(SAMPLE_EVERY);
            let stats = engine.stats();
            let busy = stats.running.load(Ordering::SeqCst) > 0 || stats.waiting() > 0;
            let steps = progress.steps();
            let now = Instant::now();
            // Counted from the first sample that sees work, not the last idle one before it: work that arrived
            // just after an idle sample would otherwise be called stalled up to one sample period early.
            if !busy || !was_busy || steps != last_steps {
                last_steps = steps;
                moved_at = now;
            }
            was_busy = busy;
            self.observe(now.duration_since(moved_at));
        }
    }

    /// Records `idle` (time busy without a completed step) and updates the stall state, logging changes.
    fn observe(&self, idle: Duration) {
        let stalled = idle >= self.stall_after;
        let was = self.stalled.swap(stalled, Ordering::SeqCst);
        self.stalled_secs
            .store(if stalled { idle.as_secs() } else { 0 }, Ordering::SeqCst);
        self.gauge.set(i64::from(stalled));
        if stalled && !was {
            tracing::error!(
                stalled_secs = idle.as_secs(),
                engine_stall_secs = self.stall_after.as_secs(),
                "the engine has work but has made no progress; liveness now fails so the platform restarts the server"
            );
        } else if was && !stalled {
            tracing::warn!("the engine made progress again; liveness recovers");
        }
    }

    /// Why liveness should fail, if the engine is stalled.
    pub fn stall(&self) -> Option<String> {
        self.stalled.load(Ordering::SeqCst).then(|| {
            format!(
                "the inference engine has had work but made no progress for {} s (--engine-stall-secs {})",
                self.stalled_secs.load(Ordering::SeqCst),
                self.stall_after.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dog(secs: u64) -> Watchdog {
        Watchdog {
            stall_after: Duration::from_secs(secs),
            stalled_secs: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            gauge: IntGauge::new("test_stalled", "test").expect("gauge"),
        }
    }

    #[test]
    fn stalls_at_the_threshold_and_recovers_on_progress() {
        let d = dog(10);
        d.observe(Duration::from_secs(9));
        assert_eq!(d.stall(), None);
        assert_eq!(d.gauge.get(), 0);
        d.observe(Duration::from_secs(12));
        let why = d.stall().expect("stalled");
        assert!(why.contains("12 s") && why.contains("--engine-stall-secs 10"), "{why}");
        assert_eq!(d.gauge.get(), 1);
        d.observe(Duration::ZERO);
        assert_eq!(d.stall(), None);
        assert_eq!(d.gauge.get(), 0);
    }
}
