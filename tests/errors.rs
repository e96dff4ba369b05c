//! Bad input gets a clear error in the route's shape, never a panic, hang or 500, and the server keeps serving.

mod common;

use common::{chat, Server};
use serde_json::{json, Value};

/// Asserts an OpenAI-shaped error with `status` whose message contains every one of `needles`.
fn assert_openai_error(got: &(u16, Value), status: u16, needles: &[&str]) {
    assert_eq!(got.0, status, "{}", got.1);
    let msg = got.1["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("OpenAI error shape: {}", got.1));
    assert!(got.1["error"]["type"].is_string(), "{}", got.1);
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_routes_reject_bad_input_clearly() {
    let s = Server::start(&["--max-body-bytes", "4096"]).await;
    let chat_url = "/v1/chat/completions";
    assert_openai_error(&s.post_raw(chat_url, "{not json").await, 400, &["not valid JSON"]);
    assert_openai_error(&s.post_raw(chat_url, "").await, 400, &["empty"]);
    assert_openai_error(
        &s.post(chat_url, json!({"messages": "hi"})).await,
        400,
        &["invalid request"],
    );
    assert_openai_error(
        &s.post(chat_url, json!({"messages": [], "max_tokens": 3})).await,
        400,
        &["messages must not be empty"],
    );
    assert_openai_error(
        &s.post(chat_url, json!({"messages": [{"role": "wizard", "content": "x"}]}))
            .await,
        400,
        &["wizard"],
    );
    assert_openai_error(
        &s.post(chat_url, json!({"messages": [{"role": "user"}]})).await,
        400,
        &["content is missing"],
    );
    let mut c = chat("hi", 0);
    assert_openai_error(
        &s.post(chat_url, c.clone()).await,
        400,
        &["max_tokens must be at least 1"],
    );
    c["max_tokens"] = json!(4);
    for (field, value, needle) in [
        ("temperature", json!(-0.5), "temperature"),
        ("temperature", json!(2.5), "temperature"),
        ("top_p", json!(0), "top_p"),
        ("top_p", json!(1.5), "top_p"),
        ("top_k", json!(-3), "top_k"),
        ("max_tokens", json!("ten"), "invalid request"),
        ("n", json!(17), "n must be between 1 and 16"),
    ] {
        let mut b = c.clone();
        b[field] = value;
        assert_openai_error(&s.post(chat_url, b).await, 400, &[needle]);
    }
    // The context window: prompt + max_tokens over 8192 names both numbers.
    let mut long = chat("hello", 8190);
    assert_openai_error(&s.post(chat_url, long.clone()).await, 400, &["8190", "8192", "tokens"]);
    long["max_tokens"] = json!(null);
    long["messages"][0]["content"] = json!("word ".repeat(9000));
    // The server refuses an oversized body without reading it and closes that connection, so send it on a
    // connection of its own rather than one a later request would reuse.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let r = fresh
        .post(s.url(chat_url))
        .json(&long)
        .send()
        .await
        .expect("oversized request answered");
    let big = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_openai_error(&big, 413, &["larger than"]);
    assert_openai_error(
        &s.post("/v1/completions", json!({"prompt": "", "max_tokens": 3})).await,
        400,
        &["prompt"],
    );
    assert_openai_error(
        &s.post("/v1/completions", json!({"max_tokens": 3})).await,
        400,
        &["prompt"],
    );
    assert_openai_error(&s.post("/v1/nope", json!({})).await, 404, &["/v1/nope"]);
    let r = s.client.get(s.url("/v1/chat/completions")).send().await.unwrap();
    assert_openai_error(&(r.status().as_u16(), r.json().await.unwrap()), 405, &["GET"]);
    // Still serving.
    let (st, v) = s.post(chat_url, chat("hi", 3)).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn context_overflow_from_a_long_prompt_names_both_numbers() {
    let s = Server::start(&[]).await;
    // ~12k tokens: over the 8192-token context even with no max_tokens.
    let body = json!({"prompt": "1 2 3 4 ".repeat(1500)});
    let (st, v) = s.post("/v1/completions", body).await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192") && msg.contains("12000"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn score_errors_use_the_azureml_shape_and_show_the_expected_format() {
    let s = Server::start(&[]).await;
    for body in [
        json!({}),
        json!({"input_data": {"input_string": []}}),
        json!({"inputs": 5}),
        json!([1, 2]),
    ] {
        let (st, v) = s.post("/score", body).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["message"].as_str().unwrap().contains("expected one of"), "{v}");
        assert!(v.get("error").is_none());
    }
    let (st, v) = s.post_raw("/score", "{oops").await;
    assert_eq!(st, 400);
    assert!(v["message"].as_str().unwrap().contains("not valid JSON"), "{v}");
    let (st, v) = s
        .post(
            "/score",
            json!({"input_data": {"input_string": ["x"], "parameters": {"temperature": 9}}}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(v["message"].as_str().unwrap().contains("temperature"), "{v}");
    let (st, v) = s
        .post(
            "/score",
            json!({"inputs": "x", "parameters": {"max_new_tokens": "many"}}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let r = s.client.put(s.url("/score")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("PUT"));
    let r = s.client.get(s.url("/nothing/here")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    let (st, _) = s
        .post(
            "/score",
            json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(st, 200);
}
