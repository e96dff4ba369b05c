//! The soak's report: answers by class, the latencies of the well-formed requests, the RSS and gauge curve,
//! the drain and the verdict, as terminal text, Markdown and JSON. Renders with the sweep report's tables.

use std::path::Path;

use serde::Serialize;

use super::probe::{Phase, Reading};
use super::verdict::Check;
use super::SoakResult;
use crate::cli::Config;
use crate::report::{self, render_markdown, render_text, results_table, Table, WriteError};

/// Most rows of the curve table in text and Markdown (the JSON has every reading).
const CURVE_ROWS: usize = 25;

const MIB: f64 = 1024.0 * 1024.0;

/// The JSON report of a soak.
#[derive(Debug, Serialize)]
pub struct SoakReport<'a> {
    pub tool: &'static str,
    pub version: &'static str,
    pub config: &'a Config,
    pub soak: &'a SoakResult,
}

impl<'a> SoakReport<'a> {
    pub fn new(config: &'a Config, soak: &'a SoakResult) -> Self {
        SoakReport {
            tool: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
            config,
            soak,
        }
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>, left: Vec<usize>) -> Table {
    Table {
        header: header.iter().map(|h| h.to_string()).collect(),
        rows,
        left,
    }
}

fn classes(r: &SoakResult) -> Table {
    let c = &r.counts;
    let transport = c
        .transport_by_kind
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: [(&str, u64, String); 12] = [
        ("2xx, streamed to [DONE]", c.completed_stream, String::new()),
        ("2xx, whole JSON", c.completed_plain, String::new()),
        ("2xx, client hung up mid-stream", c.disconnected, "as planned".into()),
        ("bad request, expected 4xx", c.expected_4xx, String::new()),
        (
            "429",
            c.refused_429,
            format!("{} without Retry-After", c.refused_429_without_retry_after),
        ),
        ("4xx to a well-formed request", c.unexpected_4xx, "fails".into()),
        ("bad request accepted (2xx)", c.bad_accepted, "fails".into()),
        ("bad request, another 4xx", c.bad_wrong_status, "fails".into()),
        ("5xx", c.server_5xx, "fails".into()),
        ("1xx / 3xx", c.other_status, "fails".into()),
        ("transport errors", c.transport, transport),
        ("answered", c.answered, String::new()),
    ];
    let rows = rows
        .into_iter()
        .map(|(class, n, note)| vec![class.to_string(), n.to_string(), note])
        .collect();
    table(&["answers", "count", "note"], rows, vec![0, 2])
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Load => "load",
        Phase::Tail => "tail",
        Phase::Drain => "drain",
    }
}

/// At most [`CURVE_ROWS`] readings, evenly spread, always with the first, the last, and the two the RSS
/// growth is measured between.
fn curve_rows(r: &SoakResult) -> Vec<&Reading> {
    let n = r.readings.len();
    let step = n.div_ceil(CURVE_ROWS).max(1);
    let marks: Vec<f64> = r.rss_growth.iter().flat_map(|g| [g.warmup_end_s, g.end_s]).collect();
    r.readings
        .iter()
        .enumerate()
        .filter(|(i, x)| i % step == 0 || *i + 1 == n || marks.contains(&x.t_s))
        .map(|(_, x)| x)
        .collect()
}

fn curve(r: &SoakResult) -> Table {
    let rows = curve_rows(r)
        .into_iter()
        .map(|x| {
            vec![
                format!("{:.0}", x.t_s),
                phase(x.phase).into(),
                x.rss_bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / MIB)),
                opt(x.running, |v| format!("{v}")),
                opt(x.waiting, |v| format!("{v}")),
                opt(x.kv_usage, |v| format!("{:.1}", v * 100.0)),
                x.answered.to_string(),
            ]
        })
        .collect();
    table(
        &["t (s)", "phase", "RSS MiB", "running", "waiting", "KV %", "answered"],
        rows,
        vec![1],
    )
}

fn rules(r: &SoakResult) -> Table {
    let rows = r
        .verdict
        .rules
        .iter()
        .map(|rule| {
            let check = match rule.check {
                Check::Pass => "pass",
                Check::Fail => "FAIL",
                Check::Skipped => "skipped",
            };
            vec![rule.name.to_string(), check.to_string(), rule.detail.clone()]
        })
        .collect();
    table(&["rule", "result", "detail"], rows, vec![0, 1, 2])
}

fn headline(config: &Config, r: &SoakResult) -> String {
    let mix = config.soak.as_ref().map_or(String::new(), |s| {
        format!(
            " ({:.0}% of the well-formed ones streamed, {:.0}% hanging up after {} chunks, {:.0}% bad)",
            s.stream_fraction * 100.0,
            s.disconnect_fraction * 100.0,
            s.disconnect_after,
            s.bad_fraction * 100.0
        )
    });
    let cut = if r.interrupted {
        " Interrupted: the counts are partial."
    } else {
        ""
    };
    format!(
        "Soak: {} for {:.0} s against {}{mix}; last answer at {:.1} s.{cut}",
        r.load, r.duration_s, r.url, r.elapsed_s
    )
}

fn statuses(r: &SoakResult) -> String {
    let s: Vec<String> = r.counts.by_status.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!(
        "HTTP statuses: {}",
        if s.is_empty() { "-".into() } else { s.join(", ") }
    )
}

fn summary_lines(r: &SoakResult) -> Vec<String> {
    let mut out = Vec::new();
    out.push(match &r.rss_growth {
        Some(g) => format!(
            "RSS from the end of the warm-up to the end of the load: {}; peak {:.1} MiB; after the drain {}.",
            g.describe(),
            g.peak_bytes as f64 / MIB,
            r.drain
                .rss_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / MIB)),
        ),
        None => "RSS: no readings on both sides of the warm-up (see rss_flat below).".into(),
    });
    let d = &r.drain;
    out.push(format!(
        "After the drain ({:.1} s after the last answer): running {}, waiting {}, KV usage {}.",
        d.waited_s,
        opt(d.running, |v| format!("{v}")),
        opt(d.waiting, |v| format!("{v}")),
        opt(d.kv_usage, |v| format!("{:.1}%", v * 100.0)),
    ));
    out.push(match r.server_5xx {
        Some(n) => format!("5xx counted by the server itself during the soak: {n}."),
        None => "The server exports no HTTP status counter.".into(),
    });
    out
}

fn examples(r: &SoakResult) -> Vec<String> {
    r.counts
        .examples
        .iter()
        .map(|(class, what)| format!("first {class}: {what}"))
        .collect()
}

fn verdict_line(r: &SoakResult) -> String {
    let failed: Vec<&str> = r
        .verdict
        .rules
        .iter()
        .filter(|x| x.check == Check::Fail)
        .map(|x| x.name)
        .collect();
    let skipped: Vec<&str> = r
        .verdict
        .rules
        .iter()
        .filter(|x| x.check == Check::Skipped)
        .map(|x| x.name)
        .collect();
    let skipped = match skipped.is_empty() {
        true => String::new(),
        false => format!("; not judged: {}", skipped.join(", ")),
    };
    if r.verdict.pass {
        format!("Verdict: PASS{skipped}")
    } else {
        format!("Verdict: FAIL ({}){skipped}", failed.join(", "))
    }
}

/// The soak report for the terminal.
pub fn text(config: &Config, r: &SoakResult) -> String {
    let mut out = headline(config, r) + "\n\n";
    out += &render_text(&classes(r));
    out += &statuses(r);
    out += "\n";
    for e in examples(r) {
        out += &e;
        out.push('\n');
    }
    out += "\nWell-formed requests (the disconnecting ones that hung up and the bad ones left out), latencies in ms:\n";
    out += &render_text(&results_table(std::slice::from_ref(&r.latency)));
    out += "\nRSS and gauges over time:\n";
    out += &render_text(&curve(r));
    for l in summary_lines(r) {
        out += &l;
        out.push('\n');
    }
    out.push('\n');
    out += &render_text(&rules(r));
    out += &verdict_line(r);
    out.push('\n');
    out
}

/// The soak report as Markdown.
pub fn markdown(config: &Config, r: &SoakResult) -> String {
    let mut out = headline(config, r) + "\n\n";
    out += &render_markdown(&classes(r));
    out += "\n";
    out += &statuses(r);
    out += "\n";
    for e in examples(r) {
        out += &format!("\n- {e}");
    }
    out += "\n\nWell-formed requests (the disconnecting ones that hung up and the bad ones left out), latencies in ms:\n\n";
    out += &render_markdown(&results_table(std::slice::from_ref(&r.latency)));
    out += "\nRSS and gauges over time (every reading is in the JSON report):\n\n";
    out += &render_markdown(&curve(r));
    out += "\n";
    for l in summary_lines(r) {
        out += &format!("- {l}\n");
    }
    out += "\n";
    out += &render_markdown(&rules(r));
    out += &format!("\n**{}**\n", verdict_line(r));
    out
}

pub fn write_json(path: &Path, config: &Config, r: &SoakResult) -> Result<(), WriteError> {
    report::write(
        path,
        &(serde_json::to_string_pretty(&SoakReport::new(config, r))? + "\n"),
    )
}

pub fn write_markdown(path: &Path, config: &Config, r: &SoakResult) -> Result<(), WriteError> {
    report::write(path, &markdown(config, r))
}
