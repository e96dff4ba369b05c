//! Where a device step's time goes, for `benches/device.rs`: when switched on, the forward waits for the
//! device after each stage and adds the stage's wall time to a running total. Waiting serialises host and
//! device, so a profiled step is slower than a real one; the split between stages is what it is for.
//! Switched off (the default) a mark costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

/// Totals per stage name, in first-seen order.
#[derive(Debug, Default)]
pub struct StageTimes {
    on: AtomicBool,
    totals: Mutex<Vec<(&'static str, Duration, usize)>>,
}

impl StageTimes {
    /// Starts (or stops) recording.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether recording is on.
    pub fn recording(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// The totals so far (name, milliseconds, times seen), reset to none.
    pub fn take(&self) -> Vec<(&'static str, f64, usize)> {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.drain(..).map(|(n, d, c)| (n, d.as_secs_f64() * 1e3, c)).collect()
    }

    /// A clock for one step on `device` (idle unless recording is on).
    pub fn clock<'a>(&'a self, device: &'a Device) -> candle_core::Result<Clock<'a>> {
        let last = if self.on.load(Ordering::Relaxed) {
            device.synchronize()?;
            Some(Instant::now())
        } else {
            None
        };
        Ok(Clock {
            times: self,
            device,
            last,
        })
    }

    fn add(&self, name: &'static str, d: Duration) {
        let mut t = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        match t.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += d;
                e.2 += 1;
            }
            None => t.push((name, d, 1)),
        }
    }
}

/// Marks the end of each stage of one step.
pub struct Clock<'a> {
    times: &'a StageTimes,
    device: &'a Device,
    last: Option<Instant>,
}

impl Clock<'_> {
    /// Ends stage `name`: waits for the device and records the time since the previous mark.
    pub fn mark(&mut self, name: &'static str) -> candle_core::Result<()> {
        if let Some(t) = self.last {
            self.device.synchronize()?;
            let now = Instant::now();
            self.times.add(name, now - t);
            self.last = Some(now);
        }
        Ok(())
    }
}
