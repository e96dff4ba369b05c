//! The tool against a local server that misbehaves on purpose: errors are counted by kind, the run ends on
//! time, and a token split across network writes is still one token.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";

/// A good stream: role chunk, three text chunks (the first split mid-JSON and mid-character across writes),
/// a usage-only chunk, [DONE].
async fn good_stream(sock: &mut TcpStream) -> std::io::Result<()> {
    sock.write_all(SSE_HEAD.as_bytes()).await?;
    sock.write_all(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n")
        .await?;
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"caf\u{e9}\"}}]}\n\n".as_bytes();
    let cut = first.len() - 8; // inside the two bytes of 'é'
    sock.write_all(&first[..cut]).await?;
    sock.flush().await?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    sock.write_all(&first[cut..]).await?;
    for text in [" au", " lait"] {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let ev = format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
        sock.write_all(ev.as_bytes()).await?;
    }
    sock.write_all(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n")
        .await?;
    sock.write_all(b"data: [DONE]\n\n").await
}

/// Behaviours cycled by arrival order on `/mixed`; `/good` is always good, `/slow` always slow.
async fn respond(mut sock: TcpStream, n: usize) -> std::io::Result<()> {
    let Some(common::Request { path, .. }) = common::read_request(&mut sock).await else {
        return Ok(());
    };
    if path == "/keepalive" {
        return keep_alive_then_drop(sock).await;
    }
    let behaviour = match path.as_str() {
        "/good" => 0,
        "/slow" => 4,
        _ => n % 7,
    };
    match behaviour {
        0 => good_stream(&mut sock).await?,
        1 => {
            let body = "{\"error\":{\"message\":\"boom\"}}";
            let r = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(r.as_bytes()).await?;
        }
        2 => {
            sock.write_all(SSE_HEAD.as_bytes()).await?;
            sock.write_all(b"data: {\"choices\": [{\"delta\": \n\ndata: [DONE]\n\n")
                .await?;
        }
        3 => tokio::time::sleep(Duration::from_secs(60)).await, // hangs before any header
        4 => {
            tokio::time::sleep(Duration::from_millis(300)).await; // slow but fine
            good_stream(&mut sock).await?;
        }
        5 => {
            sock.write_all(SSE_HEAD.as_bytes()).await?;
            sock.write_all(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n")
                .await?;
            tokio::time::sleep(Duration::from_secs(60)).await; // stalls mid-stream
        }
        _ => {
            sock.write_all(SSE_HEAD.as_bytes()).await?;
            sock.write_all(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n")
                .await?;
            // closes without [DONE]
        }
    }
    sock.shutdown().await
}

/// Answers one request with a complete stream and keeps the connection open, then closes it without a word
/// when the client reuses it, as a server closing idle keep-alive connections does in a race with the client.
async fn keep_alive_then_drop(mut sock: TcpStream) -> std::io::Result<()> {
    let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n\
                data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    let _ = common::read_request(&mut sock).await;
    Ok(()) // dropped: closed with the second request unanswered
}

/// Starts the misbehaving server on its own runtime thread; returns its base URL.
fn start_server() -> String {
    common::start_fake_server(respond)
}

/// Runs the tool with `args`; returns the JSON report and the wall time.
fn run_tool(args: &[&str]) -> (Value, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_amlserve-loadtest"))
        .args(args)
        .args(["--quiet", "--warmup", "0", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "tool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, took)
}

#[test]
fn misbehaviour_is_counted_by_kind_and_the_run_ends_on_time() {
    let url = start_server();
    let (report, took) = run_tool(&[
        "openai-chat",
        &url,
        "--path",
        "/mixed",
        "--requests",
        "14",
        "--concurrency",
        "7",
        "--timeout",
        "1",
    ]);
    let r = &report["results"][0];
    assert_eq!(r["requests"], 14, "{r:#}");
    assert_eq!(r["ok"], 4, "{r:#}");
    assert_eq!(r["errors"], 10);
    let kinds = &r["errors_by_kind"];
    assert_eq!(kinds["http_500"], 2, "{kinds}");
    assert_eq!(kinds["malformed"], 2, "{kinds}");
    assert_eq!(kinds["timeout"], 4, "{kinds}");
    assert_eq!(kinds["incomplete_stream"], 2, "{kinds}");
    // Usage said 3 tokens per good answer; the role chunk, the split 'é' and the usage chunk do not skew it.
    assert_eq!(r["output_tokens"], 12);
    assert_eq!(r["ttft_ms"]["count"], 4);
    assert_eq!(r["itl_ms"]["count"], 8, "two gaps per good stream of three text chunks");
    assert_eq!(r["prompt_tokens_mean"], 5.0);
    // Two hangs may land on one worker: 2 x 1 s timeouts plus slack, far below the 60 s the server hangs.
    assert!(took < Duration::from_secs(8), "run took {took:?}");
}

#[test]
fn a_reused_connection_closed_by_the_server_is_retried_once_on_a_new_one() {
    let url = start_server();
    let (report, _) = run_tool(&[
        "openai-chat",
        &url,
        "--path",
        "/keepalive",
        "--requests",
        "4",
        "--concurrency",
        "1",
    ]);
    let r = &report["results"][0];
    assert_eq!(r["ok"], 4, "{r:#}");
    assert_eq!(r["errors"], 0, "{r:#}");
}

#[test]
fn unreachable_target_counts_connect_errors() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (report, took) = run_tool(&["openai-completions", &url, "--requests", "3", "--timeout", "2"]);
    let r = &report["results"][0];
    assert_eq!(r["errors_by_kind"]["connect"], 3, "{r:#}");
    assert_eq!(r["ok"], 0);
    assert!(took < Duration::from_secs(5), "run took {took:?}");
}

#[test]
fn duration_and_open_loop_stop_on_time() {
    let url = start_server();
    let (report, took) = run_tool(&[
        "openai-chat",
        &url,
        "--path",
        "/good",
        "--rate",
        "20,40",
        "--duration",
        "1",
        "--compare",
        &url,
    ]);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "two rates x two endpoints");
    for r in results {
        assert_eq!(r["errors"], 0, "{r:#}");
        assert!(r["ok"].as_u64().unwrap() >= 5, "{r:#}");
        assert_eq!(r["output_tokens"], r["ok"].as_u64().unwrap() * 3);
    }
    assert_eq!(report["comparisons"].as_array().unwrap().len(), 2);
    assert!(took < Duration::from_secs(10), "run took {took:?}");
}

#[test]
fn ctrl_c_reports_what_was_measured() {
    let url = start_server();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_amlserve-loadtest"))
        .args([
            "openai-chat",
            &url,
            "--path",
            "/slow",
            "--concurrency",
            "2,4",
            "--requests",
            "100000",
        ])
        .args([
            "--timeout",
            "60",
            "--quiet",
            "--warmup",
            "0",
            "--json",
            json.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "the second level never started");
    assert_eq!(results[0]["interrupted"], true);
    assert!(results[0]["ok"].as_u64().unwrap() >= 2, "{:#}", results[0]);
    assert_eq!(
        results[0]["errors"], 0,
        "in-flight requests are dropped, not counted as errors"
    );
}
