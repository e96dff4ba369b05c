//! Soak mode: one long level of mixed, partly hostile traffic against one endpoint, judged by rules instead
//! of only measured.
//!
//! The load shape (closed or open loop) is the runner's; what each request is comes from [`traffic`], its
//! answer is classed and counted by [`tally`], the server's RSS and gauges are read every few seconds by
//! [`probe`], and once every request has ended and the gauges have drained, [`verdict`] judges the run and
//! [`report`] renders it. This module only wires them together in time.

pub mod probe;
pub mod report;
pub mod tally;
pub mod traffic;
pub mod verdict;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::{Config, Load, SoakConfig, Stop};
use crate::client::{RequestError, Sample};
use crate::runner::{self, BoxFuture, Endpoint, Interrupt};
use crate::stats::{LevelResult, LevelStats};
use crate::workload::Workload;
use probe::{Phase, Probe, Reading};
use tally::{Class, Counts};
use traffic::{Kind, Mix};
use verdict::{Drain, Evidence, RssGrowth, Verdict, Warmup};

/// How often the drain looks at the gauges.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// Everything a soak measured and how it was judged.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub url: String,
    pub metrics_url: String,
    pub load: Load,
    /// Seconds requests were started for.
    pub duration_s: f64,
    /// Seconds from the start to the last answer.
    pub elapsed_s: f64,
    pub counts: Counts,
    /// Latencies of the well-formed requests (not the disconnecting ones that hung up): as a sweep level.
    pub latency: LevelResult,
    /// RSS and gauges over time, every --sample-every seconds, then one reading after the drain.
    pub readings: Vec<Reading>,
    pub rss_growth: Option<RssGrowth>,
    pub drain: Drain,
    /// 5xx the server itself counted during the soak, when it exports its HTTP status counter.
    pub server_5xx: Option<u64>,
    pub verdict: Verdict,
    /// Ctrl-C ended the load early: in-flight requests were dropped uncounted.
    pub interrupted: bool,
}

/// The counts so far, shared by every request task and the sampler.
struct Shared {
    state: Mutex<State>,
    bar: ProgressBar,
}

struct State {
    counts: Counts,
    latency: LevelStats,
    last_answer: Instant,
}

impl Shared {
    fn record(&self, kind: Kind, outcome: &Result<Sample, RequestError>) {
        let mut g = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let class = g.counts.record(kind, outcome);
        if !matches!(kind, Kind::Bad(_)) && class != Class::Disconnected {
            g.latency.record(outcome);
        }
        g.last_answer = Instant::now();
        let c = &g.counts;
        self.bar.set_message(format!(
            "2xx {}, 429 {}, expected 4xx {}, other 4xx {}, 5xx {}, transport {}",
            c.served(),
            c.refused_429,
            c.expected_4xx,
            c.unexpected_4xx + c.bad_wrong_status,
            c.server_5xx,
            c.transport
        ));
        self.bar.inc(1);
    }

    fn answered(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .counts
            .answered
    }
}

/// Runs the soak: warm-up, the load with the sampler beside it, the drain, the verdict.
pub async fn run(
    config: &Config,
    soak: &SoakConfig,
    ep: &Endpoint,
    workload: Arc<Workload>,
    interrupt: &Interrupt,
) -> Result<SoakResult, reqwest::Error> {
    let load = config.loads[0];
    let duration = config.duration.unwrap_or(soak.rss_warmup);
    let probe = Probe::new(&soak.metrics_url, soak.server_pid)?;
    let warm_cut = runner::warm_up(config, std::slice::from_ref(ep), &workload, interrupt).await;
    let before = probe.scrape().await;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            counts: Counts::default(),
            latency: LevelStats::default(),
            last_answer: Instant::now(),
        }),
        bar: runner::progress(config.quiet, &format!("soak {load}"), None),
    });
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler = tokio::spawn(sample(
        probe.clone(),
        shared.clone(),
        start,
        start + duration,
        soak.sample_every,
        stop_rx,
    ));
    let mix = Arc::new(Mix::new(soak, config.seed));
    let fire = {
        let (client, shared) = (ep.client.clone(), shared.clone());
        move |i: u64, at: Instant| -> BoxFuture {
            let (client, workload, shared, mix) = (client.clone(), workload.clone(), shared.clone(), mix.clone());
            Box::pin(async move {
                let kind = mix.kind(i);
                let request = mix.request(&client, &workload.request(i), kind);
                let outcome = client.send_raw(&request, at).await;
                shared.record(kind, &outcome);
            })
        }
    };
    let stop = Stop {
        requests: None,
        duration: Some(duration),
    };
    let cut = warm_cut || runner::drive(load, stop, config.seed, start, fire, interrupt).await;
    let _ = stop_tx.send(true);
    let mut readings = sampler.await.unwrap_or_default();
    let answered_at = Instant::now();
    let last = drain(&probe, start, shared.answered(), soak.drain_timeout).await;
    readings.push(last);
    let drain = Drain {
        drained: Drain::empty(&last),
        waited_s: answered_at.elapsed().as_secs_f64(),
        running: last.running,
        waiting: last.waiting,
        kv_usage: last.kv_usage,
        rss_bytes: last.rss_bytes,
    };
    let after = probe.scrape().await;
    let server_5xx = match (before.http_5xx, after.http_5xx) {
        (Some(b), Some(a)) => Some((a - b).max(0.0) as u64),
        _ => None,
    };
    shared.bar.finish();
    let state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    let elapsed = state.last_answer.saturating_duration_since(start);
    let warmup = Warmup {
        seconds: soak.rss_warmup.as_secs_f64(),
        answered: soak.rss_warmup_requests,
    };
    let rss_growth = verdict::rss_growth(&readings, warmup);
    let verdict = verdict::verdict(Evidence {
        counts: &state.counts,
        server_5xx,
        rss: rss_growth.as_ref(),
        warmup,
        answered_under_load: readings
            .iter()
            .filter(|r| r.phase == Phase::Load)
            .map(|r| r.answered)
            .max()
            .unwrap_or(0),
        rss_measured: readings.iter().any(|r| r.rss_bytes.is_some()),
        max_rss_growth: soak.max_rss_growth,
        drain: &drain,
    });
    Ok(SoakResult {
        url: ep.client.url().to_string(),
        metrics_url: soak.metrics_url.clone(),
        load,
        duration_s: duration.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        counts: state.counts.clone(),
        latency: state.latency.result(&ep.label, ep.client.url(), load, elapsed),
        readings,
        rss_growth,
        drain,
        server_5xx,
        verdict,
        interrupted: cut,
    })
}

/// Reads the server every `every` from `start` until told to stop; readings before `load_end` are
/// [`Phase::Load`], later ones [`Phase::Tail`].
async fn sample(
    probe: Probe,
    shared: Arc<Shared>,
    start: Instant,
    load_end: Instant,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<Reading> {
    let mut readings = Vec::new();
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => break,
        }
        let now = Instant::now();
        let phase = if now < load_end { Phase::Load } else { Phase::Tail };
        let t_s = now.duration_since(start).as_secs_f64();
        readings.push(probe.reading(t_s, phase, shared.answered()).await);
    }
    readings
}

/// Polls the server until its gauges show nothing running, waiting or reserved, or `timeout` passes, or
/// it exports no such gauges; returns the last reading.
async fn drain(probe: &Probe, start: Instant, answered: u64, timeout: Duration) -> Reading {
    let deadline = Instant::now() + timeout;
    loop {
        let r = probe
            .reading(start.elapsed().as_secs_f64(), Phase::Drain, answered)
            .await;
        let blind = r.running.is_none() || r.waiting.is_none();
        if Drain::empty(&r) || blind || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
