//! Per-level statistics: HDR histograms of the latencies, token and error counts, and their summary.
//!
//! Records outcomes from the runner and turns them into the serializable [`LevelResult`] that every report
//! format reads. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Load;
use crate::client::{RequestError, Sample, TokenSource};

/// Microsecond histograms cover 1 us .. 1 hour with 3 significant digits.
const MAX_MICROS: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_MICROS)
}

/// Outcomes of one load level against one endpoint.
#[derive(Debug)]
pub struct LevelStats {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    tpot: Histogram<u64>,
    e2e: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// The first message seen for each error kind.
    error_examples: BTreeMap<String, String>,
    output_tokens: u64,
    prompt_tokens: u64,
    prompt_reports: u64,
    sources: BTreeSet<TokenSource>,
}

impl Default for LevelStats {
    fn default() -> Self {
        LevelStats {
            ttft: histogram(),
            itl: histogram(),
            tpot: histogram(),
            e2e: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
            error_examples: BTreeMap::new(),
            output_tokens: 0,
            prompt_tokens: 0,
            prompt_reports: 0,
            sources: BTreeSet::new(),
        }
    }
}

impl LevelStats {
    pub fn ok(&self) -> u64 {
        self.ok
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds one request's outcome.
    pub fn record(&mut self, outcome: &Result<Sample, RequestError>) {
        let s = match outcome {
            Ok(s) => s,
            Err(e) => {
                *self.errors.entry(e.kind()).or_default() += 1;
                self.error_examples.entry(e.kind()).or_insert_with(|| e.to_string());
                return;
            }
        };
        self.ok += 1;
        self.e2e.saturating_record(micros(s.e2e));
        if let Some(ttft) = s.ttft {
            self.ttft.saturating_record(micros(ttft));
            // Time per output token after the first: (e2e - ttft) / (tokens - 1), with the server's count.
            if s.output_tokens > 1 {
                let per = s.e2e.saturating_sub(ttft).as_secs_f64() / (s.output_tokens - 1) as f64;
                self.tpot.saturating_record(micros(Duration::from_secs_f64(per)));
            }
        }
        for gap in &s.itl {
            self.itl.saturating_record(micros(*gap));
        }
        self.output_tokens += s.output_tokens;
        self.sources.insert(s.token_source);
        if let Some(p) = s.prompt_tokens {
            self.prompt_tokens += p;
            self.prompt_reports += 1;
        }
    }

    /// The summary of this level, `elapsed` being its wall time (first send to last answer).
    pub fn result(&self, endpoint: &str, url: &str, load: Load, elapsed: Duration) -> LevelResult {
        let secs = elapsed.as_secs_f64().max(1e-9);
        LevelResult {
            endpoint: endpoint.to_string(),
            url: url.to_string(),
            load,
            requests: self.ok + self.error_count(),
            ok: self.ok,
            errors: self.error_count(),
            errors_by_kind: self.errors.clone(),
            error_examples: self.error_examples.clone(),
            duration_s: elapsed.as_secs_f64(),
            requests_per_s: self.ok as f64 / secs,
            output_tokens: self.output_tokens,
            output_tokens_per_s: self.output_tokens as f64 / secs,
            output_token_source: self.sources.iter().copied().collect(),
            prompt_tokens_mean: (self.prompt_reports > 0)
                .then(|| self.prompt_tokens as f64 / self.prompt_reports as f64),
            ttft_ms: Summary::of(&self.ttft),
            itl_ms: Summary::of(&self.itl),
            tpot_ms: Summary::of(&self.tpot),
            e2e_ms: Summary::of(&self.e2e),
            ttft_cdf_ms: cdf(&self.ttft),
            interrupted: false,
        }
    }
}

/// Percentiles of one latency, in milliseconds; all zero when nothing was recorded (`count` 0).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            mean: h.mean() / 1000.0,
            min: ms(h.min()),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// (milliseconds, fraction) points of the distribution at fixed quantiles, for charts.
fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=50)
        .map(|i| {
            let q = i as f64 / 50.0;
            (h.value_at_quantile(q) as f64 / 1000.0, q)
        })
        .collect()
}

/// Everything measured at one level against one endpoint; the unit of every report.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    /// "A" (the base URL) or "B" (the --compare URL).
    pub endpoint: String,
    pub url: String,
    pub load: Load,
    /// Requests finished (ok + errors).
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// One message per error kind (the first seen), to tell what went wrong.
    #[serde(default)]
    pub error_examples: BTreeMap<String, String>,
    pub duration_s: f64,
    /// Successful requests per second of the level's wall time.
    pub requests_per_s: f64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    /// Where the token counts came from (server usage, streamed chunks, or a chars/4 estimate).
    pub output_token_source: Vec<TokenSource>,
    /// Mean prompt length by the server's count, when it gave one.
    pub prompt_tokens_mean: Option<f64>,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub tpot_ms: Summary,
    pub e2e_ms: Summary,
    pub ttft_cdf_ms: Vec<(f64, f64)>,
    /// The run was interrupted during this level: its in-flight requests are not counted.
    pub interrupted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ttft_ms: u64, e2e_ms: u64, tokens: u64) -> Sample {
        Sample {
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: vec![Duration::from_millis(10); tokens.saturating_sub(1) as usize],
            e2e: Duration::from_millis(e2e_ms),
            output_tokens: tokens,
            token_source: TokenSource::Usage,
            prompt_tokens: Some(20),
            disconnected: false,
        }
    }

    #[test]
    fn summaries_and_rates() {
        let mut s = LevelStats::default();
        s.record(&Ok(sample(100, 170, 8)));
        s.record(&Ok(sample(300, 370, 8)));
        s.record(&Err(RequestError::Status {
            code: 500,
            retry_after: None,
        }));
        s.record(&Err(RequestError::Timeout));
        s.record(&Err(RequestError::Status {
            code: 500,
            retry_after: None,
        }));
        let r = s.result("A", "http://x", Load::Concurrency(2), Duration::from_secs(2));
        assert_eq!((r.requests, r.ok, r.errors), (5, 2, 3));
        assert_eq!(r.errors_by_kind.get("http_500"), Some(&2));
        assert_eq!(r.errors_by_kind.get("timeout"), Some(&1));
        assert_eq!(r.output_tokens, 16);
        assert!((r.output_tokens_per_s - 8.0).abs() < 1e-9);
        assert!((r.requests_per_s - 1.0).abs() < 1e-9);
        assert_eq!(r.ttft_ms.count, 2);
        assert!((r.ttft_ms.p50 - 100.0).abs() < 0.2, "{:?}", r.ttft_ms);
        assert!((r.ttft_ms.max - 300.0).abs() < 0.4);
        assert!((r.tpot_ms.p50 - 10.0).abs() < 0.02, "{:?}", r.tpot_ms);
        assert_eq!(r.itl_ms.count, 14);
        assert_eq!(r.prompt_tokens_mean, Some(20.0));
        assert_eq!(r.ttft_cdf_ms.len(), 51);
    }

    #[test]
    fn empty_level_is_zeros() {
        let r = LevelStats::default().result("A", "u", Load::Rate(1.0), Duration::ZERO);
        assert_eq!(r.ttft_ms, Summary::default());
        assert_eq!(r.requests_per_s, 0.0);
        assert!(r.ttft_cdf_ms.is_empty());
    }
}
