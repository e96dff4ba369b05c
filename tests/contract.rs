//! The production contract: metrics after known traffic, azmlinfsrv headers, CORS, API keys, the Azure AI
//! `extra-parameters` header and graceful shutdown.

mod common;

use std::time::Duration;

use common::{assert_stream_ran_to_length, chat, sample, sse_data, Server};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_exactly_what_was_sent() {
    let s = Server::start(&[]).await;
    let mut prompt_tokens = 0;
    for _ in 0..2 {
        let mut body = chat("Hello there", 5);
        body["ignore_eos"] = json!(true);
        let (st, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!(st, 200);
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let body = json!({"prompt": "One two", "max_tokens": 3, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}, "temperature": 0});
    let text = s.post_text("/v1/completions", &body).await;
    let events = sse_data(&text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    prompt_tokens += usage["usage"]["prompt_tokens"].as_u64().unwrap();
    let (st, _) = s.post("/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(st, 400);

    let r = s.client.get(s.url("/metrics")).send().await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = r.text().await.unwrap();
    assert_eq!(sample(&m, "amlserve_generation_tokens_total"), 13.0);
    assert_eq!(sample(&m, "amlserve_prompt_tokens_total"), prompt_tokens as f64);
    assert_eq!(sample(&m, "amlserve_request_finished_total{reason=\"length\"}"), 3.0);
    assert_eq!(sample(&m, "amlserve_request_finished_total{reason=\"cancelled\"}"), 0.0);
    assert_eq!(sample(&m, "amlserve_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(
        sample(&m, "amlserve_inter_token_latency_seconds_count"),
        10.0,
        "4 + 4 + 2 gaps"
    );
    assert_eq!(sample(&m, "amlserve_e2e_request_latency_seconds_count"), 3.0);
    assert_eq!(sample(&m, "amlserve_request_queue_time_seconds_count"), 3.0);
    assert!(sample(&m, "amlserve_batch_size_count") >= 3.0);
    assert_eq!(
        sample(
            &m,
            "amlserve_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "amlserve_http_requests_total{method=\"POST\",route=\"/v1/chat/completions\",status=\"400\"}"
        ),
        1.0
    );
    assert_eq!(sample(&m, "amlserve_num_requests_running"), 0.0);
    assert_eq!(sample(&m, "amlserve_kv_cache_usage_perc"), 0.0);
    assert_eq!(sample(&m, "amlserve_http_requests_in_flight"), 1.0, "the scrape itself");
}

#[tokio::test(flavor = "multi_thread")]
async fn score_headers_options_get_and_cors() {
    let s = Server::start(&["--cors-origins", "https://app.example"]).await;
    let r = s
        .client
        .post(s.url("/score"))
        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ms-run-function-failed"], "False");
    assert!(r.headers()["x-ms-run-fn-exec-ms"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    let r = s.client.post(s.url("/score")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers()["x-ms-run-function-failed"],
        "False",
        "bad input is not a run failure"
    );
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/score"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url("/score?inputs=The%20capital%20of%20France%20is"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v[0]["generated_text"].is_string(), "{v}");
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/score"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    let r = s
        .client
        .get(s.url("/"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let plain = Server::start(&[]).await;
    let r = plain
        .client
        .get(plain.url("/"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers().get("access-control-allow-origin").is_none(),
        "no CORS unless configured"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn swagger_versions_follow_azmlinfsrv() {
    let s = Server::start(&[]).await;
    let v: Value = s.get_json("/swagger.json?version=3").await;
    assert_eq!(v["openapi"], "3.1.0");
    let r = s.client.get(s.url("/swagger.json?version=2")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("version 2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_protects_everything_but_probes_and_metrics() {
    let s = Server::start(&["--api-key", "k-123"]).await;
    for open in ["/", "/health", "/metrics"] {
        assert_eq!(s.client.get(s.url(open)).send().await.unwrap().status(), 200, "{open}");
    }
    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("API key"));
    let r = s
        .client
        .post(s.url("/score"))
        .json(&json!({"inputs": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    let r = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("k-124")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.client
            .get(s.url("/v1/models"))
            .bearer_auth("k-123")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.client
            .get(s.url("/info"))
            .header("api-key", "k-123")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_ai_extra_parameters_are_honoured() {
    let s = Server::start(&[]).await;
    let v: Value = s.get_json("/info?api-version=2024-05-01-preview").await;
    assert_eq!(v["model_type"], "chat-completions");
    let mut body = chat("Hi", 4);
    body["top_k"] = json!(5);
    let url = s.url("/chat/completions?api-version=2024-05-01-preview");
    let r = s.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("top_k"));
    for mode in ["drop", "pass-through"] {
        let r = s
            .client
            .post(&url)
            .header("extra-parameters", mode)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{mode}");
    }
    let r = s
        .client
        .post(&url)
        .header("extra-parameters", "sometimes")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Tools are served on this route too (a forced call here; the SDK test checks more).
    let mut tools = chat("Hi", 80);
    tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    tools["tool_choice"] = json!("required");
    let r: serde_json::Value = s
        .client
        .post(&url)
        .json(&tools)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "f",
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_stream_finish_while_readiness_fails_then_exits_zero() {
    let mut s = Server::start(&["--shutdown-grace-secs", "60"]).await;
    let body = json!({"prompt": "Count:", "max_tokens": 150, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut stream = Box::pin(s.post_stream("/v1/completions", &body).await);
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    s.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = reqwest::Client::new();
    let health = fresh
        .get(s.url("/health"))
        .send()
        .await
        .expect("still accepting connections while draining");
    assert_eq!(health.status(), 503);
    let (st, _) = s.post("/v1/chat/completions", chat("hi", 2)).await;
    assert_eq!(st, 503, "new work refused");
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_stream_ran_to_length(&text, "the stream completed");
    // Well inside the 60 s grace: it exits once the stream is done, not when the grace runs out.
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_ids_and_token_counts_but_no_bodies() {
    let s = Server::start(&[]).await;
    let mut body = chat("my secret prompt text", 5);
    body["ignore_eos"] = json!(true);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "log-check-1")
        .header("x-ms-client-request-id", "client-log-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    body["stream"] = json!(true);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "log-check-2")
        .json(&body)
        .send()
        .await
        .unwrap();
    let _ = r.text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = s.drain_log();
    let line = log
        .iter()
        .find(|l| l.contains("log-check-1") && l.contains("request"))
        .expect("access line");
    for field in [
        "client_request_id=\"client-log-1\"",
        "route=/v1/chat/completions",
        "status=200",
        "generated_tokens=5",
        "prompt_tokens=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(
        log.iter()
            .any(|l| l.contains("log-check-2") && l.contains("stream finished") && l.contains("generated_tokens=5")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("secret prompt")),
        "request bodies are never logged"
    );
}
