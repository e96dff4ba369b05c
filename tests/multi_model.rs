//! Several models in one process: the SmolLM2 GGUF served twice, as `chat` (the default) and `other`, beside
//! the embedding model as `emb`. Requests are routed by their `model` field on every route (the answer names
//! the model, and only that model's metric series count it), an unknown name is a 404 listing the served
//! ones in each route's error dialect, a model of the wrong kind is a 400, every model is listed, and bad
//! `--model` values stop the server at start with exit code 2.
//!
//! [`common::Server::start_models`] starts such a server from any `(name, path)` list: a second real model
//! (Gemma) only needs another entry.

mod common;

use std::process::Command;

use common::{embedding_model_path, model_path, run_python, sample, Server};
use serde_json::{json, Value};

/// `chat` and `other` (the same file twice) and the embedding model `emb`.
async fn two_models() -> Server {
    let (smol, emb) = (model_path(), embedding_model_path());
    let emb = format!("emb={}", emb.display());
    Server::start_models(
        &[("chat", &smol), ("other", &smol)],
        &["--embedding-model", &emb, "--kv-cache-mb", "256"],
    )
    .await
}

/// A short greedy chat body for `model` (none: the field left out).
fn chat_body(model: Option<&str>) -> Value {
    let mut body = common::chat("Say hi", 2);
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    body
}

fn finished(m: &str, model: &str) -> f64 {
    sample(
        m,
        &format!("amlserve_request_finished_total{{model=\"{model}\",reason=\"length\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_go_to_the_model_they_name_and_count_under_it() {
    let s = two_models().await;
    let before = s.metrics().await;
    assert_eq!(finished(&before, "chat"), 0.0);
    assert_eq!(finished(&before, "other"), 0.0);

    // The default, then `chat` by name: only chat's counters move.
    for model in [None, Some("chat")] {
        let (st, v) = s.post("/v1/chat/completions", chat_body(model)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["model"], "chat", "{model:?}: {v}");
    }
    let m = s.metrics().await;
    assert_eq!(finished(&m, "chat"), 2.0);
    assert_eq!(finished(&m, "other"), 0.0, "other served nothing");
    assert_eq!(sample(&m, "amlserve_generation_tokens_total{model=\"chat\"}"), 4.0);
    assert_eq!(sample(&m, "amlserve_generation_tokens_total{model=\"other\"}"), 0.0);
    let http =
        "amlserve_http_requests_total{method=\"POST\",model=\"chat\",route=\"/v1/chat/completions\",status=\"200\"}";
    assert_eq!(sample(&m, http), 2.0);

    // `other` on every generation route.
    let (st, v) = s.post("/v1/chat/completions", chat_body(Some("other"))).await;
    assert_eq!((st, v["model"].as_str()), (200, Some("other")), "{v}");
    let completion = json!({"model": "other", "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let (st, v) = s.post("/v1/completions", completion).await;
    assert_eq!((st, v["model"].as_str()), (200, Some("other")), "{v}");
    let (st, v) = s
        .post(
            "/chat/completions?api-version=2024-05-01-preview",
            chat_body(Some("other")),
        )
        .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("other")), "{v}");
    let score =
        json!({"model": "other", "input_data": {"input_string": ["Hello"], "parameters": {"max_new_tokens": 2}}});
    let (st, v) = s.post("/score", score).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.post("/tokenize", json!({"model": "other", "prompt": "Hello"})).await;
    assert_eq!(st, 200, "{v}");

    let m = s.metrics().await;
    assert_eq!(finished(&m, "other"), 4.0, "chat, completion, Azure AI chat, /score");
    assert_eq!(finished(&m, "chat"), 2.0, "chat served nothing more");
    let scored = "amlserve_http_requests_total{method=\"POST\",model=\"other\",route=\"/score\",status=\"200\"}";
    assert_eq!(sample(&m, scored), 1.0);
    let probes = "amlserve_http_requests_total{method=\"GET\",model=\"\",route=\"/health\",status=\"200\"}";
    assert!(
        sample(&m, probes) >= 1.0,
        "requests naming no model count under an empty model"
    );

    // Embeddings route by model too, and are counted under theirs.
    let (st, v) = s
        .post("/v1/embeddings", json!({"model": "emb", "input": "a cat"}))
        .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("emb")), "{v}");
    let (st, v) = s.post("/v1/embeddings", json!({"input": "a cat"})).await;
    assert_eq!(
        (st, v["model"].as_str()),
        (200, Some("emb")),
        "the default embedding model: {v}"
    );
    let m = s.metrics().await;
    assert_eq!(
        sample(
            &m,
            "amlserve_embedding_requests_finished_total{model=\"emb\",outcome=\"ok\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_models_are_404_listing_the_served_ones_and_wrong_kinds_400() {
    let s = two_models().await;
    let listed = |msg: &str| msg.contains("chat (default)") && msg.contains("other") && msg.contains("nope");
    for (path, body) in [
        ("/v1/chat/completions", chat_body(Some("nope"))),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "Hi", "max_tokens": 2}),
        ),
        ("/chat/completions", chat_body(Some("nope"))),
        ("/tokenize", json!({"model": "nope", "prompt": "Hi"})),
    ] {
        let (st, v) = s.post(path, body).await;
        assert_eq!(st, 404, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(listed(msg), "{path}: {v}");
        assert_eq!(v["error"]["param"], "model", "{path}: {v}");
    }
    // /score answers in azmlinfsrv's dialect.
    let score = json!({"model": "nope", "inputs": "Hi", "parameters": {"max_new_tokens": 2}});
    let (st, v) = s.post("/score", score).await;
    assert_eq!(st, 404, "{v}");
    assert!(listed(v["message"].as_str().unwrap_or_default()), "{v}");
    // A single model of a kind serves any name (as a single language model does): here the embedding model.
    let (st, v) = s
        .post(
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "x"}),
        )
        .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("emb")), "{v}");

    // A model of the other kind is a 400 that says so.
    let (st, v) = s.post("/v1/chat/completions", chat_body(Some("emb"))).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("embedding model"),
        "{v}"
    );
    let (st, v) = s.post("/v1/embeddings", json!({"model": "other", "input": "x"})).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("language model"),
        "{v}"
    );

    // Refused requests never count under a model.
    let m = s.metrics().await;
    let refused =
        "amlserve_http_requests_total{method=\"POST\",model=\"\",route=\"/v1/chat/completions\",status=\"404\"}";
    assert_eq!(sample(&m, refused), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_model_is_listed_and_selectable_through_the_openai_sdk() {
    let s = two_models().await;
    let health = s.get_json("/health").await;
    assert_eq!(health["model"], "chat", "{health}");
    let models = s.get_json("/v1/models").await;
    assert_eq!(common::listed(&models, "id"), ["chat", "other", "emb"], "{models}");
    let kinds = common::listed(&models, "model_type");
    assert_eq!(kinds, ["chat-completions", "chat-completions", "embeddings"]);
    assert!(models["data"][2].get("generation_defaults").is_none(), "{models}");
    let info = s.get_json("/info").await;
    assert_eq!(info["model_name"], "chat", "the default: {info}");
    assert_eq!(info["models"], models["data"], "{info}");
    run_python("multi_model_sdk.py", &[&s.base], "multi-model SDK checks passed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_model_still_serves_any_name() {
    let s = Server::start(&[]).await;
    let (st, v) = s.post("/v1/chat/completions", chat_body(Some("gpt-4o"))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1", "{v}");
    // ...but not the embedding model's name.
    let (st, v) = s
        .post("/v1/chat/completions", chat_body(Some("all-minilm-l6-v2")))
        .await;
    assert_eq!(st, 400, "{v}");
    let m = s.metrics().await;
    let counted = "amlserve_request_finished_total{model=\"SmolLM2-135M-Instruct.Q4_1\",reason=\"length\"}";
    assert_eq!(sample(&m, counted), 1.0);
}

#[test]
fn bad_model_values_stop_the_server_with_exit_code_2() {
    let smol = model_path();
    let p = smol.display().to_string();
    for (args, says) in [
        (vec![format!("bad name={p}")], "not a valid model name"),
        (vec![format!("a={p}"), format!("a={p}")], "two models are named 'a'"),
        (vec![p.clone(), p.clone()], "two models are named"),
        (vec![format!("a={p}"), "b=/nonexistent.gguf".into()], "nonexistent"),
        (vec![format!("a={p}"), "b=".into()], "no path"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amlserve"));
        cmd.args(["--port", "0", "--host", "127.0.0.1"]);
        for a in &args {
            cmd.arg("--model").arg(a);
        }
        let out = cmd.output().expect("run amlserve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args(["--embedding-model", "e=/nonexistent", "--model", &p])
        .output()
        .expect("run amlserve");
    assert_eq!(out.status.code(), Some(2));
    // A stream recording one engine's step would take in another's launches on the same GPU.
    let out = Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args([
            "--cuda-graphs",
            "--model",
            &format!("a={p}"),
            "--model",
            &format!("b={p}"),
        ])
        .output()
        .expect("run amlserve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cuda-graphs serves one language model"), "{stderr}");
}
