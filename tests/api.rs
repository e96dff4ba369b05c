//! The routes against the real server and model: answers, streaming shape, determinism, stop strings,
//! the Azure ML payloads, readiness and request-id headers.

mod common;

use common::{chat, sse_data, Server};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn chat_answers_with_usage_and_is_greedy_deterministic() {
    let s = Server::start(&[]).await;
    let (st, a) = s
        .post(
            "/v1/chat/completions",
            chat("What is the capital of France? Answer in one sentence.", 24),
        )
        .await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    let text = a["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(
        a["usage"]["prompt_tokens"], 42,
        "the default system preamble, the question and the assistant header"
    );
    let u = &a["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    let (_, b) = s
        .post(
            "/v1/chat/completions",
            chat("What is the capital of France? Answer in one sentence.", 24),
        )
        .await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_seed_same_sampled_output() {
    let s = Server::start(&[]).await;
    let body = json!({"messages": [{"role": "user", "content": "Write a poem about rain."}], "max_tokens": 30,
                      "temperature": 1.0, "top_p": 0.95, "seed": 1234});
    let (st, a) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = s.post("/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{b}");
    let text = a["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(!text.is_empty(), "{a}");
    assert_eq!(Some(text), b["choices"][0]["message"]["content"].as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_chat_has_the_openai_shape_and_matches_non_streaming() {
    let s = Server::start(&[]).await;
    let mut body = chat("Name three colors.", 20);
    let (_, whole) = s.post("/v1/chat/completions", body.clone()).await;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(&r.text().await.expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json chunk"))
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "role comes first"
    );
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], whole["usage"][k], "{k}");
    }
    // The same prompt again: all of it but the last token comes from the prefix cache.
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().expect("count");
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1
    );
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], whole["choices"][0]["finish_reason"]);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_end_generation_and_are_never_emitted() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": "The days of the week are Monday, Tuesday,", "max_tokens": 30, "temperature": 0, "ignore_eos": true});
    let (_, free) = s.post("/v1/completions", body.clone()).await;
    let full = free["choices"][0]["text"].as_str().expect("text").to_string();
    // Stop on a two-word span from the middle, likely split across tokens.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() > 4, "{full}");
    let stop = format!("{} {}", words[2], &words[3][..1]);
    let at = full.find(&stop).expect("stop occurs");
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop, "never-appears"]);
        b["stream"] = json!(stream);
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .json(&b)
            .send()
            .await
            .expect("req");
        let raw = r.text().await.expect("body");
        let (text, reason) = if stream {
            let chunks: Vec<Value> = sse_data(&raw)
                .iter()
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let t: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
            (t, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v: Value = serde_json::from_str(&raw).unwrap();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, full[..at], "stream={stream}");
        assert_eq!(reason, "stop");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_accept_a_list_and_respect_max_tokens() {
    let s = Server::start(&[]).await;
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": ["Hello", "One, two,"], "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert!(v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["finish_reason"] == "length"));
    let (_, one) = s
        .post(
            "/v1/completions",
            json!({"prompt": "One, two,", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(
        one["choices"][0]["text"], v["choices"][1]["text"],
        "batched and alone agree"
    );
    let (st, m) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Hi", "max_completion_tokens": 1, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!((st, m["usage"]["completion_tokens"].clone()), (200, json!(1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn models_lists_the_served_model() {
    let s = Server::start(&[]).await;
    let v: Value = s.get_json("/v1/models").await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(v["data"][0]["max_model_len"], 8192);
}

#[tokio::test(flavor = "multi_thread")]
async fn score_accepts_the_three_payloads() {
    let s = Server::start(&[]).await;
    let (st, v) = s
        .post(
            "/score",
            json!({"input_data": {"input_string": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                               "parameters": {"max_new_tokens": 24, "do_sample": false}}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["output"].as_str().unwrap().contains("Paris"), "{v}");
    let (st, v) = s
        .post("/score", json!({"input_data": {"input_string": ["Once upon a time", "The sky is"],
                                               "parameters": {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "do_sample": true, "seed": 3}}}))
        .await;
    assert_eq!(st, 200, "{v}");
    let items = v.as_array().expect("list");
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| !i["0"].as_str().unwrap().is_empty()));
    let (st, v) = s
        .post(
            "/score",
            json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, "do_sample": false}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v[0]["generated_text"].as_str().unwrap().contains("Paris"), "{v}");
    let (_, full) = s
        .post("/score", json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, "do_sample": false, "return_full_text": true}}))
        .await;
    assert_eq!(
        full[0]["generated_text"].as_str().unwrap(),
        format!("The capital of France is{}", v[0]["generated_text"].as_str().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_headers_follow_azmlinfsrv() {
    let s = Server::start(&[]).await;
    let r = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(rid.len(), 36, "a generated uuid");
    assert_eq!(r.headers()["x-ms-request-id"].to_str().unwrap(), rid);
    assert!(r.headers()["x-ms-server-version"]
        .to_str()
        .unwrap()
        .starts_with("amlserve/"));
    assert_eq!(r.text().await.unwrap(), "Healthy");
    let r = s
        .client
        .get(s.url("/"))
        .header("x-request-id", "abc")
        .header("x-ms-client-request-id", "client-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc");
    assert_eq!(r.headers()["x-ms-client-request-id"], "client-1");
    assert_eq!(r.headers()["x-ms-request-id"], "client-1");
    let r = s
        .client
        .post(s.url("/score"))
        .header("x-request-id", "x".repeat(101))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert!(r.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("100"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fails_to_load_fails_liveness_and_readiness() {
    // Only a restart can bring a failed load back (a mount that was not ready, a truncated download): liveness
    // fails too, so the platform's liveness probe restarts the container.
    let dir = std::env::temp_dir().join(format!("amlserve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.gguf");
    std::fs::write(&bad, b"not a gguf file").unwrap();
    let s = Server::spawn(&["--model", bad.to_str().unwrap()]);
    let mut last = (0, Value::Null);
    for _ in 0..100 {
        let r = s.client.get(s.url("/")).send().await.unwrap();
        last = (r.status().as_u16(), r.json().await.unwrap_or(Value::Null));
        if last.0 != 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last.0, 503, "liveness after a failed load: {}", last.1);
    let live = last.1["message"].as_str().unwrap_or_default();
    assert!(live.contains("failed to load"), "{}", last.1);
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let health: Value = r.json().await.unwrap();
    assert!(
        health["message"].as_str().unwrap().contains("failed to load"),
        "{health}"
    );
    let (st, v) = s.post("/v1/chat/completions", chat("hi", 2)).await;
    assert_eq!(st, 503, "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_model_exits_non_zero_listing_what_was_searched() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args(["--model", "/nonexistent/model-dir"])
        .env_remove("AZUREML_MODEL_DIR")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/model-dir") && err.contains("does not exist"),
        "{err}"
    );
}
