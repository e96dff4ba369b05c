//! Hostile traffic at the HTTP layer, over raw sockets where an HTTP client cannot express the case: heads that
//! never complete, bodies that never end or stop short of their length, idle and silent sockets,
//! `Expect: 100-continue` with an oversized length, more connections than the cap, HTTP/2's stream cap,
//! SIGTERM with stalled clients; and the request-level defences: JSON content types, JSON query rejections,
//! bounded metric labels, request ids that cannot forge log fields, an empty API key, the metrics port's
//! address. The timeouts are set to a second or a few so each case runs in seconds.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_stream_ran_to_length, chat, model_path, sample, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Header-read 1 s, body-read 2 s, idle 3 s.
const SHORT: &[&str] = &[
    "--header-read-timeout-secs",
    "1",
    "--body-read-timeout-secs",
    "2",
    "--idle-timeout-secs",
    "3",
];

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn connect(s: &Server) -> TcpStream {
    TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads until the server closes the connection or `within` passes: what was read, and when it closed.
async fn read_to_close(sock: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, sock.read(&mut chunk)).await {
            Err(_) => return (buf, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, Some(start.elapsed())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads bytes until `buf` holds a complete head, within 5 s.
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let deadline = Instant::now() + secs(5.0);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return i + 4;
        }
        let n = tokio::time::timeout_at(deadline.into(), sock.read(&mut chunk))
            .await
            .expect("a response head within 5 s")
            .expect("read");
        assert!(n > 0, "closed before a whole head: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one response with a Content-Length body off a kept-alive connection: its status and JSON body.
async fn read_response(sock: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let end = read_head(sock, &mut buf).await;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().expect("length"));
    while buf.len() < end + len {
        let mut chunk = vec![0u8; end + len - buf.len()];
        let n = sock.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    parse(&buf)
}

/// The status and JSON body of a response read off a socket.
fn parse(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into())),
    )
}

/// Log lines until one contains `needle` (within 10 s).
fn log_until(s: &Server, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + secs(10.0);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        lines.extend(s.drain_log());
        if lines.iter().any(|l| l.contains(needle)) {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no log line with {needle:?} in {lines:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_slow_and_silent_heads_are_closed_at_the_header_read_timeout() {
    let s = Server::start(SHORT).await;
    let mut partial = connect(&s).await;
    partial
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: appl")
        .await
        .unwrap();
    let mut silent = connect(&s).await;
    // A head sent a byte every 200 ms (slowloris): the clock runs from the accept, not from the last byte.
    let (mut slow_read, mut slow_write) = connect(&s).await.into_split();
    let trickle = tokio::spawn(async move {
        for b in b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow_write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let slow = async {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(secs(8.0), slow_read.read(&mut buf)).await;
        closed.ok().map(|_| start.elapsed())
    };
    let (a, b, c) = tokio::join!(
        read_to_close(&mut partial, secs(8.0)),
        read_to_close(&mut silent, secs(8.0)),
        slow
    );
    for (what, bytes, closed) in [
        ("a head that stops", a.0, a.1),
        ("a socket that sends nothing", b.0, b.1),
        ("a head sent a byte at a time", vec![], c),
    ] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 8 s"));
        assert!(closed < secs(3.0), "{what}: closed after {closed:?}");
        assert!(bytes.is_empty(), "{what}: {:?}", String::from_utf8_lossy(&bytes));
    }
    trickle.abort();
    let m = s.metrics().await;
    assert!(
        sample(&m, "amlserve_http_connections_timed_out_total{timeout=\"header_read\"}") >= 3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_connection_lasts_the_idle_timeout_not_the_header_timeout() {
    let s = Server::start(SHORT).await;
    let mut sock = connect(&s).await;
    let get = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    sock.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut sock).await.0, 200);
    // Idle for longer than the header-read timeout (1 s): still there for the next request.
    tokio::time::sleep(secs(1.8)).await;
    sock.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut sock).await.0, 200);
    let (rest, closed) = read_to_close(&mut sock, secs(10.0)).await;
    let closed = closed.expect("closed after the idle timeout");
    assert!(closed > secs(2.5) && closed < secs(5.0), "closed after {closed:?}");
    assert!(rest.is_empty());
    let m = s.metrics().await;
    assert!(
        sample(&m, "amlserve_http_connections_timed_out_total{timeout=\"idle\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_completes_is_answered_408_and_its_connection_closed() {
    let s = Server::start(SHORT).await;
    let mut chunked = connect(&s).await;
    chunked
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n",
        )
        .await
        .unwrap();
    let mut short = connect(&s).await;
    short
        .write_all(
            b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n\
              {\"inputs\":",
        )
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        read_to_close(&mut chunked, secs(10.0)),
        read_to_close(&mut short, secs(10.0))
    );
    for (what, closed) in [("chunked", a.1), ("short", b.1)] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 10 s"));
        assert!(
            closed > secs(1.5) && closed < secs(4.0),
            "{what}: closed after {closed:?}"
        );
    }
    let (status, body) = parse(&a.0);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["code"], 408, "OpenAI shape: {body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--body-read-timeout-secs"), "{msg}");
    let (status, body) = parse(&b.0);
    assert_eq!(status, 408, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("did not arrive"),
        "Azure ML shape: {body}"
    );
    let (st, _) = s.post("/tokenize", json!({"prompt": "still serving"})).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_continue_with_an_oversized_length_gets_413_without_100_continue() {
    let s = Server::start(&["--max-body-bytes", "1000"]).await;
    let mut big = connect(&s).await;
    big.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
          Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let end = read_head(&mut big, &mut buf).await;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 413"), "the first answer: {head}");
    let (raw, _) = read_to_close(&mut big, secs(5.0)).await;
    buf.extend(raw);
    let (_, body) = parse(&buf);
    assert_eq!(body["error"]["code"], 413, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--max-body-bytes"));

    // Within the limit, the client is invited to send its body and it is served.
    let payload = json!({"prompt": "hi"}).to_string();
    let mut small = connect(&s).await;
    small
        .write_all(
            format!(
                "POST /tokenize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                payload.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = read_head(&mut small, &mut buf).await;
    assert!(
        buf[..end].starts_with(b"HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    small.write_all(payload.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut small).await.0, 200);
}

async fn post_as(s: &Server, path: &str, content_type: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = s.client.post(s.url(path)).body(body.to_string());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_routes_refuse_bodies_not_declared_json_with_415() {
    let s = Server::start(&[]).await;
    let c = chat("hi", 2);
    let (st, v) = post_as(&s, "/v1/chat/completions", Some("text/plain"), &c).await;
    assert_eq!(st, 415, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("'text/plain'"), "{v}");
    let (st, v) = post_as(&s, "/v1/completions", None, &json!({"prompt": "hi", "max_tokens": 1})).await;
    assert_eq!(st, 415, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("no Content-Type"),
        "{v}"
    );
    let score = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}});
    let form = "application/x-www-form-urlencoded";
    let (st, v) = post_as(&s, "/score", Some(form), &score).await;
    assert_eq!(st, 415, "{v}");
    assert!(v["message"].as_str().unwrap().contains(form), "Azure ML shape: {v}");
    let tok = json!({"prompt": "hi"});
    let (st, _) = post_as(&s, "/tokenize", Some("multipart/form-data; boundary=x"), &tok).await;
    assert_eq!(st, 415);
    // JSON in its spellings is served, and /score as Azure ML clients send it.
    for ct in ["application/json; charset=utf-8", "application/vnd.amlserve+json"] {
        let (st, v) = post_as(&s, "/tokenize", Some(ct), &tok).await;
        assert_eq!(st, 200, "{ct}: {v}");
    }
    let (st, v) = post_as(&s, "/score", Some("application/json"), &score).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_string_rejections_are_json_errors() {
    let s = Server::start(&[]).await;
    let r = s
        .client
        .get(s.url("/swagger.json?version=3&version=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.expect("JSON");
    assert!(v["message"].as_str().unwrap().contains("version"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_and_paths_do_not_grow_the_metrics() {
    let s = Server::start(&[]).await;
    let before = s.metrics().await.len();
    for i in 0..500 {
        let method = reqwest::Method::from_bytes(format!("M{i:04}X").as_bytes()).unwrap();
        let r = s
            .client
            .request(method, s.url(&format!("/nowhere/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let after = s.metrics().await;
    assert!(
        after.len() < before + 16_000,
        "metrics grew from {before} to {} bytes",
        after.len()
    );
    assert!(!after.contains("M0001X"));
    assert_eq!(
        sample(
            &after,
            "amlserve_http_requests_total{method=\"other\",route=\"unmatched\",status=\"404\"}"
        ),
        500.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_request_ids_cannot_forge_log_fields() {
    let s = Server::start(&[]).await;
    let r = s
        .client
        .get(s.url("/v1/models"))
        .header("x-request-id", "qqforged status=999 route=/admin")
        .header("x-ms-client-request-id", "zzforged\" latency_ms=\"0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!rid.contains("qqforged"), "{rid}");
    assert_eq!(rid.len(), 36, "a generated uuid: {rid}");
    assert!(r.headers().get("x-ms-client-request-id").is_none());
    assert_eq!(r.headers()["x-ms-request-id"], rid.as_str());
    // Ids of GUID / trace-id characters are kept as sent.
    let r = s
        .client
        .get(s.url("/v1/models"))
        .header("x-request-id", "req-42_a.b:c/d+e")
        .header("x-ms-client-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-42_a.b:c/d+e");
    assert_eq!(
        r.headers()["x-ms-client-request-id"],
        "0f8fad5b-d9cb-469f-a165-70867728950e"
    );
    let log = log_until(&s, "req-42_a.b:c/d+e");
    let line = log
        .iter()
        .find(|l| l.contains(&rid))
        .unwrap_or_else(|| panic!("access line of {rid} in {log:#?}"));
    assert!(line.contains("status=200"), "{line}");
    for l in &log {
        assert!(!l.contains("forged") && !l.contains("status=999"), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_or_padded_api_key_is_refused_at_start() {
    for key in ["", "  ", " secret "] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_amlserve"))
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(model_path())
            .env("AMLSERVE_API_KEY", key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start amlserve");
        let deadline = Instant::now() + secs(10.0);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("AMLSERVE_API_KEY={key:?}: the server started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{key:?}: {stderr}");
        assert!(stderr.contains("AMLSERVE_API_KEY"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_port_listens_on_loopback_unless_told_otherwise() {
    for (extra, want) in [
        (&[][..], "127.0.0.1:"),
        (&["--metrics-host", "0.0.0.0"][..], "0.0.0.0:"),
    ] {
        let mut args = vec!["--host", "0.0.0.0", "--metrics-port", "0"];
        args.extend(extra);
        let s = Server::spawn(&args);
        let log = log_until(&s, "metrics listening");
        let line = log.iter().find(|l| l.contains("metrics listening")).unwrap();
        let addr = line
            .split("address=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert!(addr.starts_with(want), "{extra:?}: {line}");
        let port = addr.rsplit(':').next().unwrap();
        let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_is_not_held_by_stalled_clients() {
    // Header and idle timeouts far beyond the test: shutdown must close such connections itself.
    let mut s = Server::start(&[
        "--shutdown-grace-secs",
        "60",
        "--header-read-timeout-secs",
        "60",
        "--idle-timeout-secs",
        "60",
        "--body-read-timeout-secs",
        "2",
    ])
    .await;
    let mut body = connect(&s).await;
    body.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    )
    .await
    .unwrap();
    let mut head = connect(&s).await;
    head.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let mut silent = connect(&s).await;
    let mut kept = connect(&s).await;
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut kept).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap()
        .success());
    let exited = tokio::task::spawn_blocking(move || s.wait_exit(secs(20.0)));
    let (stalled, _, _, _) = tokio::join!(
        read_to_close(&mut body, secs(20.0)),
        read_to_close(&mut head, secs(20.0)),
        read_to_close(&mut silent, secs(20.0)),
        read_to_close(&mut kept, secs(20.0)),
    );
    assert_eq!(exited.await.unwrap(), Some(0), "exit code");
    let took = started.elapsed();
    assert!(took < secs(8.0), "exit took {took:?} of the 60 s grace");
    assert_eq!(parse(&stalled.0).0, 408, "the stalled body is answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn long_streams_and_queued_requests_are_not_cut_by_the_timeouts() {
    // One sequence at a time: the second request waits, silent, for the whole first stream.
    let s = Server::start(&[
        "--header-read-timeout-secs",
        "1",
        "--body-read-timeout-secs",
        "1",
        "--idle-timeout-secs",
        "1",
        "--max-batch-size",
        "1",
    ])
    .await;
    // Size the stream to last about 4 s (four times every timeout) on this machine, however busy it is: the
    // faster of two probes (the first is cold), and never fewer than 256 tokens.
    let mut per_second = 0f64;
    for _ in 0..2 {
        let probe = Instant::now();
        let (st, _) = s
            .post(
                "/v1/completions",
                json!({"prompt": "Count:", "max_tokens": 32, "ignore_eos": true, "temperature": 0}),
            )
            .await;
        assert_eq!(st, 200);
        per_second = per_second.max(32.0 / probe.elapsed().as_secs_f64());
    }
    let tokens = (per_second * 4.0).clamp(256.0, 4000.0) as u64;
    let started = Instant::now();
    let body = json!({"prompt": "Count:", "max_tokens": tokens, "ignore_eos": true, "stream": true, "temperature": 0});
    let stream = async {
        let mut chunks = Box::pin(s.post_stream("/v1/completions", &body).await);
        let mut text = String::new();
        while let Some(c) = chunks.next().await {
            text.push_str(std::str::from_utf8(&c.expect("stream chunk")).unwrap());
        }
        (text, started.elapsed())
    };
    let queued = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = chat("hi", 3);
        c["ignore_eos"] = json!(true);
        let (st, v) = s.post("/v1/chat/completions", c).await;
        (st, v, started.elapsed())
    };
    let ((text, stream_took), (st, v, queued_took)) = tokio::join!(stream, queued);
    assert_stream_ran_to_length(&text, "the stream ran to its end");
    // Only meaningful if the stream outlasted every timeout by a margin.
    assert!(
        stream_took > secs(1.5),
        "the stream of {tokens} tokens took only {stream_took:?}"
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        queued_took >= stream_took - secs(0.5),
        "the second request waited for the first"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let s = Server::start(&[
        "--max-connections",
        "2",
        "--header-read-timeout-secs",
        "2",
        "--idle-timeout-secs",
        "1",
    ])
    .await;
    // The kept-alive connection of the readiness poll holds a slot until it idles out.
    tokio::time::sleep(secs(1.5)).await;
    let mut holders = vec![connect(&s).await, connect(&s).await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut third = connect(&s).await;
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_response(&mut third).await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert!(waited > secs(1.0), "served after {waited:?}: the cap did not hold it");
    for h in &mut holders {
        assert!(read_to_close(h, secs(1.0)).await.1.is_some(), "a holder was closed");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_is_served_with_the_stream_cap_in_its_settings() {
    let s = Server::start(&["--max-concurrent-streams", "7"]).await;
    let mut sock = connect(&s).await;
    // The client preface, then an empty SETTINGS frame.
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(secs(5.0), sock.read_exact(&mut frame))
        .await
        .expect("a frame within 5 s")
        .expect("the server's first frame");
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    assert_eq!(frame[3], 4, "SETTINGS first: {frame:?}");
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        settings.contains(&(3, 7)),
        "SETTINGS_MAX_CONCURRENT_STREAMS = 7 in {settings:?}"
    );

    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2
        .post(s.url("/v1/chat/completions"))
        .json(&chat("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}
