//! The engine under concurrency: batch invariance, chunked prefill, cancellation freeing a slot, and a full
//! queue answering 429 at once.

mod common;

use std::time::{Duration, Instant};

use common::{sample, sse_data, Server};
use futures::StreamExt;
use serde_json::{json, Value};

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

async fn text_of(s: &Server, body: Value) -> String {
    let (st, v) = s.post("/v1/completions", body).await;
    assert_eq!(st, 200, "{v}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Streams a completion; once its first chunk has arrived (the request is running), scrapes
/// `amlserve_num_requests_running`. Returns the streamed text and that gauge.
async fn streamed_text_and_running(s: &Server, mut body: Value) -> (String, f64) {
    body["stream"] = json!(true);
    let mut stream = Box::pin(s.post_stream("/v1/completions", &body).await);
    let mut raw = String::from_utf8(stream.next().await.expect("first chunk").expect("bytes").to_vec()).expect("utf-8");
    let running = sample(&s.metrics().await, "amlserve_num_requests_running");
    while let Some(chunk) = stream.next().await {
        raw.push_str(std::str::from_utf8(&chunk.expect("bytes")).expect("utf-8"));
    }
    let events = sse_data(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    let text = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).expect("chunk");
            v["choices"][0]["text"].as_str().unwrap_or("").to_string()
        })
        .collect();
    (text, running)
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_output_is_the_same_alone_and_in_a_busy_batch() {
    // Small token budget so prompts are prefilled in chunks while others decode.
    // No prefix cache: the probe is computed from scratch both times.
    let s = Server::start(&["--max-batch-tokens", "24", "--prefix-cache-mb", "0"]).await;
    let probe = completion("The history of the Roman Empire begins with", 32);
    let (alone, running_alone) = streamed_text_and_running(&s, probe.clone()).await;
    assert_eq!(running_alone, 1.0, "the probe ran alone");
    assert_eq!(
        alone,
        text_of(&s, probe.clone()).await,
        "streamed and whole answers agree"
    );
    let others: Vec<Value> = (0..8)
        .map(|i| {
            completion(
                &"Tell me about the weather and the sea. ".repeat(i + 1),
                10 + 7 * i as u32,
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for body in others {
        let s_url = s.url("/v1/completions");
        let client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.post(s_url).json(&body).send().await.expect("req");
            assert_eq!(r.status(), 200);
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (busy, running_busy) = streamed_text_and_running(&s, probe).await;
    // Taken just after the probe's first token, with 31 to go: each decode step runs every running request
    // (9 decode tokens fit the 24-token budget), so the probe shared steps with the others.
    assert!(
        running_busy >= 2.0,
        "the probe shared the batch: {running_busy} running"
    );
    for t in tasks {
        t.await.expect("other request");
    }
    assert_eq!(alone, busy);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_stream_frees_its_slot() {
    let s = Server::start(&["--max-batch-size", "1"]).await;
    let body = json!({"prompt": "Count forever:", "max_tokens": 8000, "ignore_eos": true, "stream": true});
    let mut stream = Box::pin(s.post_stream("/v1/completions", &body).await);
    stream.next().await.expect("first chunk").expect("bytes");
    drop(stream); // the client goes away mid-generation
    let (st, v) = tokio::time::timeout(Duration::from_secs(30), s.post("/v1/completions", completion("Hi", 4)))
        .await
        .expect("next request admitted after cancellation");
    assert_eq!(st, 200, "{v}");
    assert_cancelled_early(&s).await;
    let log = s.drain_log().join("\n");
    assert!(log.contains("request cancelled"), "cancellation is logged");
}

/// The one long request ended as cancelled, long before its 8000 tokens, and "Hi" got its 4: so the slot was
/// freed by the cancellation, not by the long request finishing.
async fn assert_cancelled_early(s: &Server) {
    let m = s.metrics().await;
    assert_eq!(sample(&m, "amlserve_request_finished_total{reason=\"cancelled\"}"), 1.0);
    assert_eq!(sample(&m, "amlserve_request_finished_total{reason=\"length\"}"), 1.0);
    let generated = sample(&m, "amlserve_generation_tokens_total");
    assert!(generated < 4000.0, "{generated} tokens generated");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_non_streaming_request_frees_its_slot() {
    let s = Server::start(&["--max-batch-size", "1"]).await;
    let url = s.url("/v1/completions");
    let client = s.client.clone();
    let long = tokio::spawn(async move { client.post(url).json(&completion("Count forever:", 8000)).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    long.abort(); // drops the connection
    let (st, _) = tokio::time::timeout(Duration::from_secs(30), s.post("/v1/completions", completion("Hi", 4)))
        .await
        .expect("next request admitted after cancellation");
    assert_eq!(st, 200);
    assert_cancelled_early(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_at_once() {
    let s = Server::start(&["--max-batch-size", "1", "--max-waiting", "1"]).await;
    // A runs, B waits, C finds the queue full.
    let body = json!({"prompt": "Count:", "max_tokens": 8000, "ignore_eos": true, "stream": true});
    let mut a = Box::pin(s.post_stream("/v1/completions", &body).await);
    a.next().await.expect("a runs").expect("bytes");
    let (url, client) = (s.url("/v1/completions"), s.client.clone());
    let b = tokio::spawn(async move { client.post(url).json(&completion("B", 8000)).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for path in ["/v1/completions", "/score"] {
        let body = if path == "/score" {
            json!({"inputs": "C"})
        } else {
            completion("C", 4)
        };
        let started = Instant::now();
        let r = s.client.post(s.url(path)).json(&body).send().await.expect("c");
        assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: Value = r.json().await.unwrap();
        let msg = if path == "/score" {
            &v["message"]
        } else {
            &v["error"]["message"]
        };
        assert!(msg.as_str().unwrap().contains("retry later"), "{v}");
    }
    b.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_timeout_is_cancelled_with_a_clear_error() {
    let s = Server::start(&["--request-timeout-ms", "700"]).await;
    let started = Instant::now();
    let (st, v) = s.post("/v1/completions", completion("Count forever:", 8000)).await;
    assert_eq!(st, 504, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 700 ms"),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered soon after the deadline"
    );
    let (st, v) = s
        .post(
            "/score",
            json!({"inputs": "Count forever:", "parameters": {"max_new_tokens": 8000, "ignore_eos": true}}),
        )
        .await;
    assert_eq!(st, 504);
    assert!(v["message"].as_str().unwrap().contains("timed out"), "{v}");
    let mut body = completion("Count forever:", 8000);
    body["stream"] = json!(true);
    let text = s.post_text("/v1/completions", &body).await;
    let events = common::sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("timed out"), "{err}");
    // The slot was freed: a short request still succeeds.
    let (st, v) = s.post("/v1/completions", completion("Hi", 2)).await;
    assert_eq!(st, 200, "{v}");
}
