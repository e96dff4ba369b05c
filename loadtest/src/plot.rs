//! SVG charts of a run: latency percentiles and throughput against the load level, the TTFT distribution, and
//! a soak's RSS over time.
//!
//! Reads finished [`LevelResult`]s only. Every chart is drawn by one panel routine (load levels evenly spaced
//! on x, or a linear x for the CDF; linear y), so the files differ only in which numbers they plot. Text is
//! laid out with plotters' built-in font metrics (no font files needed); viewers use their own sans-serif font.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cli::Load;
use crate::stats::{LevelResult, Summary};

/// A chart that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot create {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("drawing {0}: {1}")]
    Draw(PathBuf, String),
}

/// How a series' points are marked.
#[derive(Debug, Clone, Copy)]
enum Marker {
    Circle,
    Triangle,
    None,
}

struct Series {
    name: String,
    color: RGBColor,
    marker: Marker,
    points: Vec<(f64, f64)>,
}

struct Panel<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: Vec<Series>,
    /// Load levels: evenly spaced on x, labelled with their values; `None`: a linear x axis from 0.
    levels: Option<&'a [f64]>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Writes `latency_vs_load.svg`, `throughput_vs_load.svg` and (when streamed) `ttft_cdf.svg` into `dir`;
/// returns the files written.
pub fn write_all(dir: &Path, results: &[LevelResult]) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Dir(dir.to_path_buf(), e))?;
    let x_label = match results.first().map(|r| r.load) {
        Some(Load::Rate(_)) => "request rate (req/s)",
        _ => "concurrency",
    };
    let endpoints = endpoints(results);
    let mut levels: Vec<f64> = Vec::new();
    for r in results {
        if !levels.contains(&r.load.value()) {
            levels.push(r.load.value());
        }
    }
    let levels = Some(levels.as_slice());
    let percentiles = |pick: fn(&LevelResult) -> Summary| -> Vec<Series> {
        let mut out = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            for (name, marker, get, color) in [
                ("p50", Marker::Circle, p50 as fn(&Summary) -> f64, color),
                ("p99", Marker::Triangle, p99, lighter(color)),
            ] {
                let points: Vec<_> = results
                    .iter()
                    .filter(|r| &r.endpoint == ep && pick(r).count > 0)
                    .map(|r| (r.load.value(), get(&pick(r))))
                    .collect();
                out.push(Series {
                    name: label(ep, &endpoints, name),
                    color,
                    marker,
                    points,
                });
            }
        }
        out
    };
    let per_endpoint = |get: fn(&LevelResult) -> f64| -> Vec<Series> {
        endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| Series {
                name: label(ep, &endpoints, ""),
                color: COLORS[i % COLORS.len()],
                marker: Marker::Circle,
                points: results
                    .iter()
                    .filter(|r| &r.endpoint == ep)
                    .map(|r| (r.load.value(), get(r)))
                    .collect(),
            })
            .collect()
    };
    let mut written = Vec::new();
    let latency = [
        Panel {
            title: "time to first token",
            x_label,
            y_label: "ms",
            series: percentiles(|r| r.ttft_ms),
            levels,
        },
        Panel {
            title: "time per output token",
            x_label,
            y_label: "ms",
            series: percentiles(|r| r.tpot_ms),
            levels,
        },
        Panel {
            title: "end-to-end latency",
            x_label,
            y_label: "ms",
            series: percentiles(|r| r.e2e_ms),
            levels,
        },
    ];
    written.push(draw(
        &dir.join("latency_vs_load.svg"),
        latency.into_iter().filter(has_points).collect(),
    )?);
    let throughput = vec![
        Panel {
            title: "output tokens/s",
            x_label,
            y_label: "tok/s",
            series: per_endpoint(|r| r.output_tokens_per_s),
            levels,
        },
        Panel {
            title: "requests/s",
            x_label,
            y_label: "req/s",
            series: per_endpoint(|r| r.requests_per_s),
            levels,
        },
    ];
    written.push(draw(&dir.join("throughput_vs_load.svg"), throughput)?);
    let cdf: Vec<Series> = results
        .iter()
        .filter(|r| !r.ttft_cdf_ms.is_empty())
        .enumerate()
        .map(|(i, r)| Series {
            name: label(&r.endpoint, &endpoints, &r.load.to_string()),
            color: COLORS[i % COLORS.len()],
            marker: Marker::None,
            points: r.ttft_cdf_ms.clone(),
        })
        .collect();
    if !cdf.is_empty() {
        let panel = Panel {
            title: "TTFT distribution (CDF)",
            x_label: "time to first token (ms)",
            y_label: "fraction of requests",
            series: cdf,
            levels: None,
        };
        written.push(draw(&dir.join("ttft_cdf.svg"), vec![panel])?);
    }
    Ok(written)
}

/// Writes `rss.svg` into `dir`: resident memory (MiB) against time (s), e.g. over a soak; returns the file.
pub fn write_rss(dir: &Path, points: Vec<(f64, f64)>) -> Result<PathBuf, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Dir(dir.to_path_buf(), e))?;
    let panel = Panel {
        title: "server resident memory",
        x_label: "time (s)",
        y_label: "RSS (MiB)",
        series: vec![Series {
            name: "RSS".into(),
            color: COLORS[0],
            marker: Marker::Circle,
            points,
        }],
        levels: None,
    };
    draw(&dir.join("rss.svg"), vec![panel])
}

/// The same hue, halfway to white: the p99 line next to its p50.
fn lighter(c: RGBColor) -> RGBColor {
    let mix = |v: u8| v + (255 - v) / 2;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Tick labels: whole numbers from 10 up, else up to two decimals without trailing zeros.
fn tick(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn p50(s: &Summary) -> f64 {
    s.p50
}

fn p99(s: &Summary) -> f64 {
    s.p99
}

fn has_points(p: &Panel) -> bool {
    p.series.iter().any(|s| !s.points.is_empty())
}

fn endpoints(results: &[LevelResult]) -> Vec<String> {
    let mut eps: Vec<String> = Vec::new();
    for r in results {
        if !eps.contains(&r.endpoint) {
            eps.push(r.endpoint.clone());
        }
    }
    eps
}

/// Series name: the endpoint label only when there are several endpoints.
fn label(endpoint: &str, all: &[String], what: &str) -> String {
    match (all.len() > 1, what.is_empty()) {
        (true, true) => endpoint.to_string(),
        (true, false) => format!("{endpoint} {what}"),
        (false, true) => "measured".to_string(),
        (false, false) => what.to_string(),
    }
}

fn draw(path: &Path, panels: Vec<Panel>) -> Result<PathBuf, PlotError> {
    let fail = |e: String| PlotError::Draw(path.to_path_buf(), e);
    let n = panels.len().max(1);
    let root = SVGBackend::new(path, (480 * n as u32, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    for (panel, area) in panels.iter().zip(root.split_evenly((1, n))) {
        draw_panel(&area, panel).map_err(fail)?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(path.to_path_buf())
}

fn draw_panel(area: &DrawingArea<SVGBackend, Shift>, p: &Panel) -> Result<(), String> {
    let points = || p.series.iter().flat_map(|s| s.points.iter());
    let (mut x_lo, mut x_hi, mut y_hi) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in points() {
        x_lo = x_lo.min(x);
        x_hi = x_hi.max(x);
        y_hi = y_hi.max(y);
    }
    let (x_lo, x_hi) = match p.levels {
        Some(l) => (-0.5, l.len().max(1) as f64 - 0.5),
        None => (x_lo.min(0.0), if x_hi > 0.0 { x_hi * 1.05 } else { 1.0 }),
    };
    // A level's x is its index, so 1, 4, 16 sit evenly spaced with exactly those labels.
    let at = |x: f64| {
        p.levels
            .and_then(|l| l.iter().position(|&v| v == x))
            .map_or(x, |i| i as f64)
    };
    let x_tick = |v: &f64| match p.levels {
        Some(l) => {
            let i = v.round();
            let near = (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < l.len();
            if near {
                tick(l[i as usize])
            } else {
                String::new()
            }
        }
        None => tick(*v),
    };
    let y_hi = if y_hi > 0.0 { y_hi * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_lo..x_hi, 0f64..y_hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(p.x_label)
        .y_desc(p.y_label)
        .x_labels(p.levels.map_or(10, |l| l.len() + 1))
        .x_label_formatter(&x_tick)
        .max_light_lines(1)
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(|e| e.to_string())?;
    for s in &p.series {
        if s.points.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (at(x), y)).collect();
        let style = ShapeStyle::from(&s.color).stroke_width(2);
        let color = s.color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        match s.marker {
            Marker::Circle => {
                chart
                    .draw_series(PointSeries::of_element(
                        pts.iter().copied(),
                        4,
                        style.filled(),
                        &|c, sz, st| EmptyElement::at(c) + Circle::new((0, 0), sz, st),
                    ))
                    .map_err(|e| e.to_string())?;
            }
            Marker::Triangle => {
                chart
                    .draw_series(PointSeries::of_element(
                        pts.iter().copied(),
                        5,
                        style.filled(),
                        &|c, sz, st| EmptyElement::at(c) + TriangleMarker::new((0, 0), sz, st),
                    ))
                    .map_err(|e| e.to_string())?;
            }
            Marker::None => {}
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Sample, TokenSource};
    use crate::stats::LevelStats;
    use std::time::Duration;

    #[test]
    fn writes_three_svgs() {
        let mut results = Vec::new();
        for (c, ms) in [(1, 50), (4, 120)] {
            let mut s = LevelStats::default();
            s.record(&Ok(Sample {
                ttft: Some(Duration::from_millis(ms)),
                itl: vec![Duration::from_millis(9)],
                e2e: Duration::from_millis(ms * 3),
                output_tokens: 8,
                token_source: TokenSource::Usage,
                prompt_tokens: None,
                disconnected: false,
            }));
            results.push(s.result("A", "u", Load::Concurrency(c), Duration::from_secs(1)));
        }
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(dir.path(), &results).unwrap();
        assert_eq!(files.len(), 3);
        for f in files {
            let svg = std::fs::read_to_string(&f).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{}", f.display());
        }
        let rss = write_rss(dir.path(), vec![(0.0, 400.0), (5.0, 410.0), (10.0, 411.0)]).unwrap();
        assert!(std::fs::read_to_string(rss).unwrap().contains("polyline"));
    }
}
