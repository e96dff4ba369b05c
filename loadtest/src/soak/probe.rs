//! Reads the server's state during a soak: its resident memory (from `/proc/PID/status`, or its own
//! `process_resident_memory_bytes`) and the scheduler gauges and HTTP status counters of its Prometheus
//! `/metrics`. A probe that cannot read something reports it as absent; it never fails the run.

use std::time::Duration;

use serde::Serialize;

/// The gauges a soak watches, named as amlserve exports them (after vLLM's).
pub const RUNNING: &str = "amlserve_num_requests_running";
pub const WAITING: &str = "amlserve_num_requests_waiting";
pub const KV_USAGE: &str = "amlserve_kv_cache_usage_perc";
/// The standard Prometheus process collector's resident memory.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
/// HTTP answers by route, method and status.
pub const HTTP_REQUESTS: &str = "amlserve_http_requests_total";

/// What one `/metrics` text says; `None` for what it does not export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scrape {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    pub rss_bytes: Option<f64>,
    /// Sum of the HTTP request counters with a 5xx status.
    pub http_5xx: Option<f64>,
}

/// Reads the soak's metrics from Prometheus text exposition; labelled series of the gauges are summed.
pub fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((labels, v)) => (labels, v),
                None => continue,
            },
            None => ("", rest),
        };
        let Some(value) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let slot = match series {
            RUNNING => &mut s.running,
            WAITING => &mut s.waiting,
            KV_USAGE => &mut s.kv_usage,
            PROCESS_RSS => &mut s.rss_bytes,
            HTTP_REQUESTS => {
                let five = labels
                    .split(',')
                    .any(|l| l.trim().strip_prefix("status=\"").is_some_and(|v| v.starts_with('5')));
                let total = s.http_5xx.get_or_insert(0.0);
                if five {
                    *total += value;
                }
                continue;
            }
            _ => continue,
        };
        *slot.get_or_insert(0.0) += value;
    }
    s
}

/// `VmRSS` of process `pid`, in bytes (Linux).
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The server's state at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// Seconds since the soak's load began.
    pub t_s: f64,
    pub phase: Phase,
    pub rss_bytes: Option<u64>,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    /// Soak requests that had ended by then.
    pub answered: u64,
}

/// Where in the soak a reading was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Requests still being started.
    Load,
    /// No new requests; the last ones finishing.
    Tail,
    /// Every request ended; waiting for the gauges to get back to 0.
    Drain,
}

/// Reads one server's state.
#[derive(Debug, Clone)]
pub struct Probe {
    http: reqwest::Client,
    metrics_url: String,
    pid: Option<u32>,
}

impl Probe {
    pub fn new(metrics_url: &str, pid: Option<u32>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .user_agent(concat!("amlserve-loadtest/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Probe {
            http,
            metrics_url: metrics_url.to_string(),
            pid,
        })
    }

    /// The server's metrics now; all absent when `/metrics` cannot be read.
    pub async fn scrape(&self) -> Scrape {
        let text = match self.http.get(&self.metrics_url).send().await {
            Ok(resp) if resp.status().is_success() => resp.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        parse(&text)
    }

    /// The server's state now: RSS from /proc when the pid is known, else from its metrics.
    pub async fn reading(&self, t_s: f64, phase: Phase, answered: u64) -> Reading {
        let s = self.scrape().await;
        let rss_bytes = match self.pid {
            Some(pid) => vm_rss(pid),
            None => s.rss_bytes.map(|b| b as u64),
        };
        Reading {
            t_s,
            phase,
            rss_bytes,
            running: s.running,
            waiting: s.waiting,
            kv_usage: s.kv_usage,
            answered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_soak_series() {
        let text = "# HELP amlserve_num_requests_running Requests in the running batch.\n\
            # TYPE amlserve_num_requests_running gauge\n\
            amlserve_num_requests_running 3\n\
            amlserve_num_requests_waiting 0\n\
            amlserve_num_requests_waiting_other 9\n\
            amlserve_kv_cache_usage_perc 0.25\n\
            process_resident_memory_bytes 1.5e8\n\
            amlserve_http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 40\n\
            amlserve_http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"503\"} 2\n\
            amlserve_http_requests_total{route=\"/score\",method=\"POST\",status=\"500\"} 1\n";
        let s = parse(text);
        assert_eq!(s.running, Some(3.0));
        assert_eq!(s.waiting, Some(0.0));
        assert_eq!(s.kv_usage, Some(0.25));
        assert_eq!(s.rss_bytes, Some(1.5e8));
        assert_eq!(s.http_5xx, Some(3.0));
        assert_eq!(parse("garbage\n{}\nx y z"), Scrape::default());
        let none_5xx = parse("amlserve_http_requests_total{status=\"200\"} 4");
        assert_eq!(none_5xx.http_5xx, Some(0.0), "the counter exists: 0, not unknown");
    }

    #[test]
    fn reads_own_rss() {
        let rss = vm_rss(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(vm_rss(u32::MAX), None);
    }
}
