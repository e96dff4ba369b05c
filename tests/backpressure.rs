//! Backpressure before work: an overload storm of long chat prompts is refused with 429s from the waiting
//! queue before any prompt is rendered or tokenized, while the admitted stream keeps streaming.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use futures::StreamExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_long_prompts_gets_429s_while_the_running_stream_goes_on() {
    const STORM: usize = 200;
    const PLACES: usize = 2;
    let s = Server::start(&["--max-batch-size", "1", "--max-waiting", &PLACES.to_string()]).await;
    // The one running request: a stream that would go on for thousands of tokens.
    let body = json!({"messages": [{"role": "user", "content": "Count to a million."}], "max_tokens": 4000,
                      "ignore_eos": true, "stream": true});
    let mut stream = Box::pin(s.post_stream("/v1/chat/completions", &body).await);
    stream.next().await.expect("first chunk").expect("bytes");
    let chunks = Arc::new(AtomicUsize::new(0));
    let counter = chunks.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(_)) = stream.next().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });

    // 30 KB prompts: each would cost real tokenizer time (and ~7,000 tokens of prefill) if it were prepared.
    let storm_body = common::chat(&"word ".repeat(6000), 1);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..STORM)
        .map(|_| {
            let (url, client, body, tx) = (
                s.url("/v1/chat/completions"),
                s.client.clone(),
                storm_body.clone(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let started = Instant::now();
                let r = client.post(url).json(&body).send().await.expect("storm request");
                let status = r.status().as_u16();
                let retry_after = r.headers().get("retry-after").cloned();
                let _ = tx.send((status, retry_after, started.elapsed()));
            })
        })
        .collect();
    let chunks_before = chunks.load(Ordering::SeqCst);
    let mut refused = Vec::new();
    while refused.len() < STORM - PLACES {
        let (status, retry_after, latency) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("the refused requests are answered")
            .expect("result");
        assert_eq!(
            status, 429,
            "only {PLACES} requests can hold a place; the rest are refused"
        );
        assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
        refused.push(latency);
    }
    // The two that took the places wait behind the running stream; nothing else came back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "the queued requests are still waiting");
    let scrape = s.metrics().await;
    assert_eq!(common::sample(&scrape, "amlserve_num_requests_waiting"), PLACES as f64);
    assert_eq!(
        common::sample(&scrape, "amlserve_request_finished_total{reason=\"rejected\"}"),
        (STORM - PLACES) as f64
    );
    // The stream went on through the storm and still goes on.
    let during = chunks.load(Ordering::SeqCst) - chunks_before;
    let waited = Instant::now();
    while chunks.load(Ordering::SeqCst) <= chunks_before + during {
        assert!(waited.elapsed() < Duration::from_secs(30), "the stream keeps streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused.sort();
    let pct = |p: f64| refused[((refused.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    eprintln!(
        "storm of {STORM} x 30 KB prompts: {} refused, 429 latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         stream chunks during the storm: {during}",
        refused.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    for t in tasks {
        t.abort();
    }
    reader.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn more_prompts_than_can_ever_wait_is_a_clear_400() {
    let s = Server::start(&["--max-waiting", "2"]).await;
    let (st, v) = s
        .post("/v1/completions", json!({"prompt": ["a", "b", "c"], "max_tokens": 1}))
        .await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("3 prompts") && msg.contains("--max-waiting"), "{msg}");
    let (st, v) = s
        .post("/v1/completions", json!({"prompt": ["a", "b"], "max_tokens": 1}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2));
}
