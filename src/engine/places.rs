//! What both engine threads (generation and embeddings) share with their handles: a bounded count of places
//! in the waiting queue that keeps its exported gauge in step, and the alive flag a guard clears when the
//! thread ends, normally or by panic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus::IntGauge;

use super::SubmitError;

/// Places in a waiting queue, at most `max` taken at once; `gauge` always shows how many are taken.
#[derive(Debug)]
pub(crate) struct Places {
    taken: AtomicUsize,
    max: usize,
    gauge: IntGauge,
}

impl Places {
    pub fn new(max: usize, gauge: IntGauge) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max,
            gauge,
        }
    }

    /// Takes `n` places if that keeps the queue within its bound; else [`SubmitError::QueueFull`].
    pub fn take(&self, n: usize) -> Result<(), SubmitError> {
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (w + n <= self.max).then_some(w + n)
            })
            .map_err(|waiting| SubmitError::QueueFull { waiting })?;
        self.gauge.add(n as i64);
        Ok(())
    }

    /// Gives `n` places back.
    pub fn release(&self, n: usize) {
        self.taken.fetch_sub(n, Ordering::SeqCst);
        self.gauge.sub(n as i64);
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

/// Clears `alive` when dropped at the end of an engine thread (readiness then fails), logging a panic.
pub(crate) struct AliveGuard<'a> {
    pub alive: &'a AtomicBool,
    /// The thread, for the log line.
    pub thread: &'static str,
}

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!(thread = self.thread, "an engine thread panicked; readiness now fails");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_stay_within_the_bound_and_the_gauge_follows() {
        let gauge = IntGauge::new("test_waiting", "test").expect("gauge");
        let places = Places::new(3, gauge.clone());
        places.take(2).expect("room for two");
        assert_eq!(
            places.take(2),
            Err(SubmitError::QueueFull { waiting: 2 }),
            "all or none"
        );
        places.take(1).expect("room for one");
        assert_eq!((places.taken(), gauge.get()), (3, 3));
        places.release(2);
        assert_eq!((places.taken(), gauge.get()), (1, 1));
    }
}
