//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes) over real HTTP against the real model.

mod common;

use common::{chat, Server};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn tokenize_and_detokenize_round_trip() {
    let s = Server::start(&[]).await;
    let (status, t) = s.post("/tokenize", json!({"prompt": "Hello world, 123"})).await;
    assert_eq!(status, 200, "{t}");
    let tokens = t["tokens"].as_array().expect("tokens").clone();
    assert_eq!(t["count"], tokens.len(), "{t}");
    assert_eq!(t["max_model_len"], 8192, "{t}");
    assert!(t.get("token_strs").is_none(), "{t}");
    // The same ids /v1/completions generates from.
    let (_, c) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Hello world, 123", "max_tokens": 1}),
        )
        .await;
    assert_eq!(c["usage"]["prompt_tokens"], tokens.len(), "{c}");
    let (status, d) = s.post("/detokenize", json!({"tokens": tokens})).await;
    assert_eq!((status, d["prompt"].as_str()), (200, Some("Hello world, 123")), "{d}");

    let (_, with_strs) = s
        .post(
            "/tokenize",
            json!({"prompt": "Hello world", "add_special_tokens": false, "return_token_strs": true}),
        )
        .await;
    assert_eq!(with_strs["token_strs"], json!(["Hello", "Ġworld"]), "{with_strs}");

    // Chat: rendered with the template, the ids /v1/chat/completions generates from.
    let messages = json!([{"role": "user", "content": "What is 2+2?"}]);
    let (status, t) = s.post("/tokenize", json!({"messages": messages})).await;
    assert_eq!(status, 200, "{t}");
    let (_, c) = s.post("/v1/chat/completions", chat("What is 2+2?", 1)).await;
    assert_eq!(t["count"], c["usage"]["prompt_tokens"], "{t} {c}");
    let (_, d) = s.post("/detokenize", json!({"tokens": t["tokens"]})).await;
    let text = d["prompt"].as_str().expect("prompt");
    assert!(text.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    let (_, open) = s
        .post(
            "/tokenize",
            json!({"messages": messages, "add_generation_prompt": false}),
        )
        .await;
    assert!(open["count"].as_u64() < t["count"].as_u64(), "{open} {t}");

    // Errors name what is wrong, in the OpenAI shape.
    let (status, e) = s.post("/detokenize", json!({"tokens": [1, 999999]})).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("999999"), "{e}");
    assert_eq!(e["error"]["param"], "tokens", "{e}");
    for bad in [
        json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        json!({"prompt": "x", "foo": 1}),
        json!({"messages": []}),
        json!({}),
        json!(["x"]),
    ] {
        let (status, e) = s.post("/tokenize", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"]["message"].is_string(), "{e}");
    }
    let doc: Value = s.get_json("/swagger.json").await;
    assert!(doc["paths"]["/tokenize"]["post"].is_object());
    assert_eq!(
        doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"],
        49151
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenizer_routes_need_the_api_key() {
    let s = Server::start(&["--api-key", "k"]).await;
    for (path, body) in [
        ("/tokenize", json!({"prompt": "x"})),
        ("/detokenize", json!({"tokens": [1]})),
    ] {
        let r = s.client.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = s
            .client
            .post(s.url(path))
            .bearer_auth("k")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}
