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
    let common = [
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--prompt-tokens",
        "16",
        "--warmup",
        "1",
        "--timeout",
        "120",
    ];

    // Streaming chat, closed loop: every token counted from the usage chunk, TTFT for every request.
    let mut args = vec!["openai-chat", base, "--requests", "8", "--concurrency", "2"];
    args.extend(common);
    let report = run_tool(&args);
    let r = &report["results"][0];
    assert_eq!(report["tool"], "amlserve-loadtest");
    assert_eq!(
        (r["requests"].as_u64(), r["ok"].as_u64(), r["errors"].as_u64()),
        (Some(8), Some(8), Some(0)),
        "{r:#}"
    );
    assert_eq!(r["output_tokens"], 8 * 8);
    assert_eq!(r["output_token_source"], serde_json::json!(["usage"]));
    assert_eq!(r["ttft_ms"]["count"], 8);
    assert_eq!(r["tpot_ms"]["count"], 8);
    assert!(r["itl_ms"]["count"].as_u64().unwrap() > 0);
    assert!(
        r["prompt_tokens_mean"].as_f64().unwrap() >= 16.0,
        "chat template + ~16 words: {r:#}"
    );
    let e2e = &r["e2e_ms"];
    assert!(
        r["ttft_ms"]["p50"].as_f64().unwrap() <= e2e["p50"].as_f64().unwrap(),
        "{r:#}"
    );

    // Streaming text completions, open loop.
    let mut args = vec!["openai-completions", base, "--requests", "4", "--rate", "4"];
    args.extend(common);
    let r = &run_tool(&args)["results"][0];
    assert_eq!((r["ok"].as_u64(), r["errors"].as_u64()), (Some(4), Some(0)), "{r:#}");
    assert_eq!(r["output_tokens"], 4 * 8);

    // Azure ML /score: end-to-end only, no errors.
    let mut args = vec!["azureml-score", base, "--requests", "2"];
    args.extend(common);
    let r = &run_tool(&args)["results"][0];
    assert_eq!((r["ok"].as_u64(), r["errors"].as_u64()), (Some(2), Some(0)), "{r:#}");
    assert_eq!(r["ttft_ms"]["count"], 0);
    assert_eq!(r["e2e_ms"]["count"], 2);
}
