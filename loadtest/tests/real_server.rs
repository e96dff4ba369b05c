//! The tool against the real amlserve (release build, real model, port 0): the report's request count and
//! token totals must match what the server says it generated, with no errors.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The running server; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn health(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nhost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

fn start_amlserve() -> Server {
    let root = workspace();
    let bin = root.join("target/release/amlserve");
    assert!(
        bin.exists(),
        "{} is missing: build the server first with `cargo build --release` at the workspace root",
        bin.display()
    );
    let model = root.join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} is missing: run `make models` at the workspace root",
        model.display()
    );
    let mut child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", "0", "--model"])
        .arg(&model)
        .env("RUST_LOG", "info")
        .env("AMLSERVE_LOG_FORMAT", "text")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The log line with `address=127.0.0.1:PORT` comes as soon as it listens.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent {
                if let Some(rest) = line.split("address=").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    let mut server = Server {
        child,
        base: String::new(),
    };
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("amlserve printed no address= line within 60 s");
    let start = Instant::now();
    while !health(&addr) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "amlserve at {addr} not ready after 120 s"
        );
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("amlserve exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    server.base = format!("http://{addr}");
    server
}

/// The sum of a Prometheus metric's samples (all label sets) on the server's `/metrics`.
fn metric(addr: &str, name: &str) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn run_tool(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_amlserve-loadtest"))
        .args(args)
        .args(["--quiet", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn reports_match_the_servers_usage() {
    let server = start_amlserve();
    let base = server.base.as_str();
    let addr = base.trim_start_matches("http://");
    let common = [
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--prompt-tokens",
        "16",
        "--timeout",
        "120",
    ];
    let ttft_metric = |what: &str| metric(addr, &format!("amlserve_time_to_first_token_seconds_{what}"));

    // Streaming chat, closed loop, no warm-up (so the server's own metrics see exactly these requests): every
    // token counted from the usage chunk, TTFT for every request.
    let tokens_before = metric(addr, "amlserve_generation_tokens_total");
    let (ttft_sum_before, ttft_count_before) = (ttft_metric("sum"), ttft_metric("count"));
    let mut args = vec![
        "openai-chat",
        base,
        "--requests",
        "8",
        "--concurrency",
        "2",
        "--warmup",
        "0",
    ];
    args.extend(common);
    let report = run_tool(&args);
    let r = &report["results"][0];
    assert_eq!(report["tool"], "amlserve-loadtest");
    let counts = (r["requests"].as_u64(), r["ok"].as_u64(), r["errors"].as_u64());
    assert_eq!(counts, (Some(8), Some(8), Some(0)), "{r:#}");
    assert_eq!(r["output_tokens"], 8 * 8);
    assert_eq!(r["output_token_source"], serde_json::json!(["usage"]));
    assert_eq!(r["ttft_ms"]["count"], 8);
    assert_eq!(r["tpot_ms"]["count"], 8);
    assert!(r["itl_ms"]["count"].as_u64().unwrap() > 0);
    assert!(
        r["prompt_tokens_mean"].as_f64().unwrap() >= 16.0,
        "chat template + ~16 words: {r:#}"
    );
    assert!(
        r["ttft_ms"]["p50"].as_f64().unwrap() <= r["e2e_ms"]["p50"].as_f64().unwrap(),
        "{r:#}"
    );

    // Agreement with amlserve's /metrics: the same token total; the client's mean TTFT is the server's (queue
    // to first token) plus HTTP, chat template and tokenization, so not below it, and above it by at most
    // 250 ms or 25%, whichever is larger (this machine is shared and noisy).
    assert_eq!(metric(addr, "amlserve_generation_tokens_total") - tokens_before, 64.0);
    let ttft_count = ttft_metric("count") - ttft_count_before;
    assert_eq!(ttft_count, 8.0);
    let server_ms = (ttft_metric("sum") - ttft_sum_before) / ttft_count * 1000.0;
    let client_ms = r["ttft_ms"]["mean"].as_f64().unwrap();
    assert!(
        client_ms >= server_ms - 1.0 && client_ms - server_ms <= (server_ms * 0.25).max(250.0),
        "client mean TTFT {client_ms:.1} ms vs server {server_ms:.1} ms"
    );
    eprintln!("mean TTFT: client {client_ms:.1} ms, amlserve /metrics {server_ms:.1} ms");

    // Streaming text completions, open loop.
    let mut args = vec![
        "openai-completions",
        base,
        "--requests",
        "4",
        "--rate",
        "4",
        "--warmup",
        "1",
    ];
    args.extend(common);
    let r = &run_tool(&args)["results"][0];
    assert_eq!((r["ok"].as_u64(), r["errors"].as_u64()), (Some(4), Some(0)), "{r:#}");
    assert_eq!(r["output_tokens"], 4 * 8);

    // Azure ML /score: end-to-end only, no errors.
    let mut args = vec!["azureml-score", base, "--requests", "2", "--warmup", "1"];
    args.extend(common);
    let r = &run_tool(&args)["results"][0];
    assert_eq!((r["ok"].as_u64(), r["errors"].as_u64()), (Some(2), Some(0)), "{r:#}");
    assert_eq!(r["ttft_ms"]["count"], 0);
    assert_eq!(r["e2e_ms"]["count"], 2);
}
