//! Soak mode against a fake OpenAI server in this process: answers are counted by class, clients that hang
//! up are seen hanging up by the server, 5xx, a 429 without Retry-After and an accepted bad request each fail
//! the verdict, and RSS growth and a leaked slot are read from the fake's /metrics.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Text chunks in every fake stream (a disconnecting client reads 2 of them).
const CHUNKS: u64 = 6;
/// RSS the fake reports before its first scrape, and how much each /metrics scrape adds on `/metrics/leaky`.
const RSS_BASE: u64 = 200 << 20;
const RSS_STEP: u64 = 10 << 20;

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    /// Good requests answered so far, to pick every n-th for a refusal.
    good: AtomicU64,
    /// Streams whose client closed the connection before [DONE].
    hangups: AtomicU64,
    /// /metrics/leaky scrapes.
    scrapes: AtomicU64,
}

/// Why the fake refuses a body, as amlserve would: not JSON, an unknown field, temperature out of range,
/// max_tokens beyond its context window.
fn invalid(body: &[u8]) -> bool {
    let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    let known = [
        "messages",
        "max_tokens",
        "stream",
        "stream_options",
        "ignore_eos",
        "temperature",
    ];
    b.keys().any(|k| !known.contains(&k.as_str()))
        || b.get("temperature").and_then(Value::as_f64).is_some_and(|t| t > 2.0)
        || b.get("max_tokens").and_then(Value::as_u64).is_some_and(|m| m > 8192)
}

async fn answer(sock: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    let r = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(r.as_bytes()).await
}

/// A stream of [`CHUNKS`] text chunks 20 ms apart, usage, [DONE]; counts a hang-up when a write fails.
async fn stream(sock: &mut TcpStream, seen: &Seen) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let mut events: Vec<String> = (0..CHUNKS)
        .map(|_| "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" x\"}}]}\n\n".to_string())
        .collect();
    events.push(format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{CHUNKS}}}}}\n\n"
    ));
    events.push("data: [DONE]\n\n".into());
    sock.write_all(head.as_bytes()).await?;
    for ev in events {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if sock.write_all(ev.as_bytes()).await.is_err() {
            seen.hangups.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
    }
    Ok(())
}

fn metrics(running: u64, rss: u64) -> String {
    format!(
        "# TYPE amlserve_num_requests_running gauge\namlserve_num_requests_running {running}\n\
         amlserve_num_requests_waiting 0\namlserve_kv_cache_usage_perc 0\nprocess_resident_memory_bytes {rss}\n\
         amlserve_http_requests_total{{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"}} 1\n"
    )
}

/// `/clean/...`: validates like amlserve and refuses every third good request with 429 and Retry-After.
/// `/hostile/...`: validates nothing, and answers every fourth good request 500 and the next one 429 without
/// Retry-After. `/metrics/clean`: flat RSS, drained gauges; `/metrics/leaky`: RSS grows by [`RSS_STEP`] each
/// scrape and one request never leaves the batch.
async fn respond(mut sock: TcpStream, seen: Arc<Seen>) -> std::io::Result<()> {
    let Some(req) = common::read_request(&mut sock).await else {
        return Ok(());
    };
    if req.method == "GET" {
        let text = match req.path.as_str() {
            "/metrics/leaky" => {
                let n = seen.scrapes.fetch_add(1, Ordering::SeqCst) + 1;
                metrics(1, RSS_BASE + n * RSS_STEP)
            }
            _ => metrics(0, RSS_BASE),
        };
        return answer(&mut sock, "200 OK", "", &text).await;
    }
    let hostile = req.path.starts_with("/hostile");
    if !hostile && invalid(&req.body) {
        return answer(&mut sock, "400 Bad Request", "", "{\"error\":{\"message\":\"bad\"}}").await;
    }
    let n = seen.good.fetch_add(1, Ordering::SeqCst);
    match (hostile, n % 4, n % 3) {
        (false, _, 2) => {
            return answer(&mut sock, "429 Too Many Requests", "retry-after: 1\r\n", "{}").await;
        }
        (true, 0, _) => return answer(&mut sock, "500 Internal Server Error", "", "{}").await,
        (true, 1, _) => return answer(&mut sock, "429 Too Many Requests", "", "{}").await,
        _ => {}
    }
    let streamed = serde_json::from_slice::<Value>(&req.body)
        .ok()
        .and_then(|b| b["stream"].as_bool())
        .unwrap_or(false);
    if streamed {
        stream(&mut sock, &seen).await
    } else {
        let body = "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"x y\"}}],\
                    \"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}";
        answer(&mut sock, "200 OK", "", body).await
    }
}

/// Starts the fake server on its own runtime thread; returns its base URL and what it sees.
fn start_server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    let url = common::start_fake_server(move |sock, _| respond(sock, shared.clone()));
    (url, seen)
}

/// Runs a 2-second soak at 40 req/s against `route` with metrics from `metrics`; returns the exit code and
/// the JSON report's `soak`.
fn soak(url: &str, route: &str, metrics: &str, extra: &[&str]) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let out = Command::new(env!("CARGO_BIN_EXE_amlserve-loadtest"))
        .args([
            "openai-chat",
            url,
            "--path",
            route,
            "--soak",
            "--rate",
            "40",
            "--duration",
            "2",
        ])
        .args(["--metrics-url", &format!("{url}{metrics}")])
        .args([
            "--disconnect-fraction",
            "0.2",
            "--disconnect-after",
            "2",
            "--bad-fraction",
            "0.2",
        ])
        .args([
            "--sample-every",
            "0.25",
            "--rss-warmup",
            "0.5",
            "--drain-timeout",
            "1",
            "--timeout",
            "10",
        ])
        .args(["--quiet", "--warmup", "0", "--json", json.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Verdict: "),
        "no verdict printed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out.status.code().unwrap(), report["soak"].clone())
}

fn failed_rules(soak: &Value) -> Vec<String> {
    soak["verdict"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["check"] == "fail")
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

fn count(soak: &Value, name: &str) -> u64 {
    soak["counts"][name].as_u64().unwrap()
}

#[test]
fn a_well_behaved_server_passes_and_every_answer_is_in_one_class() {
    let (url, seen) = start_server();
    let (code, s) = soak(&url, "/clean/v1/chat/completions", "/metrics/clean", &[]);
    assert_eq!(code, 0, "{s:#}");
    assert_eq!(s["verdict"]["pass"], true, "{:#}", s["verdict"]);
    let classes = [
        "completed_stream",
        "completed_plain",
        "disconnected",
        "expected_4xx",
        "refused_429",
        "unexpected_4xx",
        "bad_accepted",
        "bad_wrong_status",
        "server_5xx",
        "other_status",
        "transport",
    ];
    let answered = count(&s, "answered");
    assert!(answered >= 40, "{s:#}");
    assert_eq!(classes.iter().map(|c| count(&s, c)).sum::<u64>(), answered);
    for c in [
        "completed_stream",
        "completed_plain",
        "disconnected",
        "expected_4xx",
        "refused_429",
    ] {
        assert!(count(&s, c) > 0, "no {c}: {:#}", s["counts"]);
    }
    assert_eq!(count(&s, "refused_429_without_retry_after"), 0);
    assert_eq!(s["counts"]["by_status"]["400"], count(&s, "expected_4xx"));
    // The server saw each planned hang-up as one, and no other stream ended early.
    assert_eq!(seen.hangups.load(Ordering::SeqCst), count(&s, "disconnected"));
    // Only well-formed requests that were read to the end or refused are in the latency level.
    let latency = &s["latency"];
    assert_eq!(
        latency["ok"],
        count(&s, "completed_stream") + count(&s, "completed_plain")
    );
    assert_eq!(latency["errors_by_kind"]["http_429"], count(&s, "refused_429"));
    assert_eq!(s["rss_growth"]["growth_bytes"], 0);
    assert_eq!(s["drain"]["drained"], true);
    assert_eq!(s["server_5xx"], 0);
    let readings = s["readings"].as_array().unwrap();
    assert!(readings.len() >= 6, "{readings:?}");
    assert_eq!(readings.last().unwrap()["phase"], "drain");
}

#[test]
fn server_errors_refusals_without_retry_after_and_accepted_bad_requests_fail() {
    let (url, _) = start_server();
    let (code, s) = soak(&url, "/hostile/v1/chat/completions", "/metrics/clean", &[]);
    assert_eq!(code, 1, "{s:#}");
    assert_eq!(
        failed_rules(&s),
        [
            "no_5xx",
            "refusals_are_429_with_retry_after",
            "bad_requests_get_their_4xx"
        ]
    );
    assert!(count(&s, "server_5xx") > 0);
    assert_eq!(s["counts"]["by_status"]["500"], count(&s, "server_5xx"));
    assert!(count(&s, "refused_429_without_retry_after") > 0);
    assert_eq!(count(&s, "refused_429"), count(&s, "refused_429_without_retry_after"));
    assert!(count(&s, "bad_accepted") > 0);
    assert_eq!(count(&s, "expected_4xx"), 0);
    let examples = &s["counts"]["examples"];
    assert!(
        examples["server_5xx"].as_str().unwrap().starts_with("HTTP 500 to a "),
        "{examples}"
    );
}

#[test]
fn growing_rss_and_a_request_that_never_leaves_the_batch_fail() {
    let (url, seen) = start_server();
    let (code, s) = soak(
        &url,
        "/clean/v1/chat/completions",
        "/metrics/leaky",
        &["--max-rss-growth", "5"],
    );
    assert_eq!(code, 1, "{s:#}");
    assert_eq!(failed_rules(&s), ["rss_flat", "no_leaked_slot"]);
    assert_eq!(s["drain"]["drained"], false);
    assert_eq!(s["drain"]["running"], 1.0);
    assert!(
        s["drain"]["waited_s"].as_f64().unwrap() >= 1.0,
        "waited for the drain timeout"
    );
    // Each sampler reading is one scrape, the first after the soak's baseline scrape: RSS = base + (index + 2)
    // steps. (The drain polls several times and keeps its last reading.)
    let readings = s["readings"].as_array().unwrap();
    for (i, r) in readings.iter().enumerate().filter(|(_, r)| r["phase"] != "drain") {
        assert_eq!(r["rss_bytes"], RSS_BASE + (i as u64 + 2) * RSS_STEP, "reading {i}");
    }
    let g = &s["rss_growth"];
    let at = |t: &Value| readings.iter().position(|r| r["t_s"] == *t).unwrap() as u64;
    let steps = at(&g["end_s"]) - at(&g["warmup_end_s"]);
    assert!(steps >= 3, "{g}");
    assert_eq!(g["growth_bytes"], steps * RSS_STEP);
    let warm = g["warmup_end_bytes"].as_f64().unwrap();
    assert!((g["growth_pct"].as_f64().unwrap() - 100.0 * (steps * RSS_STEP) as f64 / warm).abs() < 1e-6);
    assert!(g["warmup_end_s"].as_f64().unwrap() >= 0.5);
    assert!(seen.scrapes.load(Ordering::SeqCst) as usize >= readings.len());
}

#[test]
fn rss_is_not_judged_before_enough_requests_have_ended() {
    let (url, _) = start_server();
    let (code, s) = soak(
        &url,
        "/clean/v1/chat/completions",
        "/metrics/leaky",
        &["--rss-warmup-requests", "100000"],
    );
    assert_eq!(code, 1, "the leaked slot still fails: {s:#}");
    assert_eq!(failed_rules(&s), ["no_leaked_slot"]);
    let rss = &s["verdict"]["rules"][5];
    assert_eq!(
        (rss["name"].as_str(), rss["check"].as_str()),
        (Some("rss_flat"), Some("skipped"))
    );
    assert!(rss["detail"].as_str().unwrap().contains("100000 answered"), "{rss}");
    assert!(s["rss_growth"].is_null());
}
