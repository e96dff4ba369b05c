//! The run's report: the JSON document, and one table rendered as terminal text or Markdown.
//!
//! Builds rows once from [`LevelResult`]s and renders them two ways; compare mode adds a ratio table
//! (second endpoint / first). Writes nothing itself except through the `write_*` functions. The table
//! renderers are shared with the soak report (`soak/report.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::cli::{Config, Load};
use crate::stats::{LevelResult, Summary};

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub tool: &'static str,
    pub version: &'static str,
    pub config: &'a Config,
    pub results: &'a [LevelResult],
    /// Compare mode: second / first per level.
    pub comparisons: Vec<Comparison>,
}

/// Ratios of the second endpoint to the first at one level (above 1: B is higher, i.e. slower for latencies).
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub load: Load,
    pub ratios: BTreeMap<&'static str, Option<f64>>,
}

impl<'a> Report<'a> {
    pub fn new(config: &'a Config, results: &'a [LevelResult]) -> Self {
        Report {
            tool: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
            config,
            results,
            comparisons: comparisons(results),
        }
    }
}

type Metric = (&'static str, fn(&LevelResult) -> f64);

const RATIO_METRICS: [Metric; 8] = [
    ("requests_per_s", |r| r.requests_per_s),
    ("output_tokens_per_s", |r| r.output_tokens_per_s),
    ("ttft_p50", |r| r.ttft_ms.p50),
    ("ttft_p99", |r| r.ttft_ms.p99),
    ("tpot_p50", |r| r.tpot_ms.p50),
    ("itl_p50", |r| r.itl_ms.p50),
    ("e2e_p50", |r| r.e2e_ms.p50),
    ("e2e_p99", |r| r.e2e_ms.p99),
];

fn comparisons(results: &[LevelResult]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for a in results.iter().filter(|r| r.endpoint == "A") {
        let Some(b) = results.iter().find(|r| r.endpoint == "B" && r.load == a.load) else {
            continue;
        };
        let ratios = RATIO_METRICS
            .iter()
            .map(|(name, get)| {
                let (x, y) = (get(a), get(b));
                (*name, (x > 0.0 && y.is_finite()).then(|| y / x))
            })
            .collect();
        out.push(Comparison { load: a.load, ratios });
    }
    out
}

/// A table as header + rows of cells.
pub(crate) struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Columns whose text is left-aligned (labels, prose); the others are numbers, right-aligned.
    pub left: Vec<usize>,
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn pct(s: &Summary, get: fn(&Summary) -> f64) -> String {
    if s.count == 0 {
        "-".into()
    } else {
        ms(get(s))
    }
}

pub(crate) fn results_table(results: &[LevelResult]) -> Table {
    let compare = results.iter().any(|r| r.endpoint != "A");
    let mut header: Vec<String> = if compare { vec!["endpoint".into()] } else { vec![] };
    header.extend(
        [
            "load",
            "ok",
            "errors",
            "req/s",
            "out tok/s",
            "TTFT p50",
            "TTFT p90",
            "TTFT p99",
            "ITL p50",
            "ITL p99",
            "TPOT p50",
            "E2E p50",
            "E2E p90",
            "E2E p99",
        ]
        .map(String::from),
    );
    let rows = results
        .iter()
        .map(|r| {
            let mut row: Vec<String> = if compare { vec![r.endpoint.clone()] } else { vec![] };
            row.extend([
                r.load.to_string(),
                r.ok.to_string(),
                r.errors.to_string(),
                format!("{:.2}", r.requests_per_s),
                format!("{:.1}", r.output_tokens_per_s),
                pct(&r.ttft_ms, |s| s.p50),
                pct(&r.ttft_ms, |s| s.p90),
                pct(&r.ttft_ms, |s| s.p99),
                pct(&r.itl_ms, |s| s.p50),
                pct(&r.itl_ms, |s| s.p99),
                pct(&r.tpot_ms, |s| s.p50),
                pct(&r.e2e_ms, |s| s.p50),
                pct(&r.e2e_ms, |s| s.p90),
                pct(&r.e2e_ms, |s| s.p99),
            ]);
            row
        })
        .collect();
    Table {
        header,
        rows,
        left: Vec::new(),
    }
}

fn ratio_table(comparisons: &[Comparison]) -> Option<Table> {
    if comparisons.is_empty() {
        return None;
    }
    let mut header = vec!["load (B / A)".to_string()];
    header.extend(RATIO_METRICS.iter().map(|(n, _)| n.to_string()));
    let rows = comparisons
        .iter()
        .map(|c| {
            let mut row = vec![c.load.to_string()];
            row.extend(
                RATIO_METRICS
                    .iter()
                    .map(|(n, _)| match c.ratios.get(n).copied().flatten() {
                        Some(v) => format!("{v:.2}x"),
                        None => "-".into(),
                    }),
            );
            row
        })
        .collect();
    Some(Table {
        header,
        rows,
        left: Vec::new(),
    })
}

/// Terminal rendering: columns right-aligned, except those in `left`.
pub(crate) fn render_text(t: &Table) -> String {
    let mut widths: Vec<usize> = t.header.iter().map(String::len).collect();
    for row in &t.rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| match t.left.contains(&i) {
                true => format!("{c:<w$}"),
                false => format!("{c:>w$}"),
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&t.header) + "\n";
    for row in &t.rows {
        out += &line(row);
        out.push('\n');
    }
    out
}

/// Markdown rendering: the first column and those in `left` left-aligned, the others right-aligned.
pub(crate) fn render_markdown(t: &Table) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut out = line(&t.header);
    let align: Vec<String> = (0..t.header.len())
        .map(|i| match i == 0 || t.left.contains(&i) {
            true => "---".into(),
            false => "---:".into(),
        })
        .collect();
    out += &line(&align);
    for row in &t.rows {
        out += &line(row);
    }
    out
}

/// Errors by kind per level, one line each; empty when there were none.
fn error_lines(results: &[LevelResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| r.errors > 0)
        .map(|r| {
            let kinds: Vec<String> = r
                .errors_by_kind
                .iter()
                .map(|(k, n)| match r.error_examples.get(k) {
                    Some(example) => format!("{k}: {n} (first: {example})"),
                    None => format!("{k}: {n}"),
                })
                .collect();
            format!("{} {}: {}", r.endpoint, r.load, kinds.join(", "))
        })
        .collect()
}

fn token_note(results: &[LevelResult]) -> String {
    let mut sources: Vec<String> = Vec::new();
    for r in results {
        for s in &r.output_token_source {
            let s = serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
    }
    let cut = if results.iter().any(|r| r.interrupted) {
        " Interrupted: the last level is partial."
    } else {
        ""
    };
    let sources = if sources.is_empty() {
        "-".into()
    } else {
        sources.join(", ")
    };
    format!("Latencies in ms. Output tokens counted from: {sources}.{cut}")
}

/// The report for the terminal.
pub fn text(report: &Report) -> String {
    let mut out = render_text(&results_table(report.results));
    out += &token_note(report.results);
    out.push('\n');
    for l in error_lines(report.results) {
        out += &format!("errors {l}\n");
    }
    if let Some(t) = ratio_table(&report.comparisons) {
        out += "\nB / A (A = ";
        out += report.config.urls.first().map(String::as_str).unwrap_or("");
        out += ", B = ";
        out += report.config.urls.get(1).map(String::as_str).unwrap_or("");
        out += ")\n";
        out += &render_text(&t);
    }
    out
}

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut out = render_markdown(&results_table(report.results));
    out += "\n";
    out += &token_note(report.results);
    out += "\n";
    for l in error_lines(report.results) {
        out += &format!("\n- errors {l}");
    }
    if let Some(t) = ratio_table(&report.comparisons) {
        out += "\n\nRatios B / A:\n\n";
        out += &render_markdown(&t);
    }
    out
}

/// A report file that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {0}: {1}")]
    Io(String, std::io::Error),
    #[error("cannot serialize the report: {0}")]
    Json(#[from] serde_json::Error),
}

pub(crate) fn write(path: &Path, text: &str) -> Result<(), WriteError> {
    std::fs::write(path, text).map_err(|e| WriteError::Io(path.display().to_string(), e))
}

pub fn write_json(path: &Path, report: &Report) -> Result<(), WriteError> {
    write(path, &(serde_json::to_string_pretty(report)? + "\n"))
}

pub fn write_markdown(path: &Path, report: &Report) -> Result<(), WriteError> {
    write(path, &markdown(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use crate::stats::LevelStats;
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn compare_tables_and_ratios() {
        let config = Cli::try_parse_from(["t", "openai-chat", "http://a", "--compare", "http://b"])
            .unwrap()
            .into_config()
            .unwrap();
        let mut results = Vec::new();
        for (ep, secs) in [("A", 1), ("B", 2)] {
            let mut s = LevelStats::default();
            s.record(&Err(crate::client::RequestError::Status {
                code: 503,
                retry_after: None,
            }));
            results.push(s.result(ep, "u", Load::Concurrency(1), Duration::from_secs(secs)));
        }
        results[0].requests_per_s = 2.0;
        results[1].requests_per_s = 1.0;
        let report = Report::new(&config, &results);
        assert_eq!(report.comparisons[0].ratios["requests_per_s"], Some(0.5));
        assert_eq!(report.comparisons[0].ratios["ttft_p50"], None);
        let t = text(&report);
        assert!(
            t.contains("0.50x") && t.contains("http_503: 1") && t.contains("endpoint"),
            "{t}"
        );
        let md = markdown(&report);
        assert!(md.starts_with("| endpoint | load |") && md.contains("| ---: |"), "{md}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["config"]["urls"][1], "http://b/v1/chat/completions");
        assert!(json["config"].get("api_key").is_none());
    }
}
