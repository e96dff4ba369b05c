//! Server-side sampling defaults (`--default-*`): used when a request leaves a field out, shown in `/info`
//! and `/v1/models`, and always overridden by a value in the request.

mod common;

use common::{chat, Server};
use serde_json::{json, Value};

async fn answer(s: &Server, body: Value) -> String {
    let (status, v) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn defaults_keep_temperature_one_coherent_and_requests_override_them() {
    let s = Server::start(&[]).await;
    let expected = json!({"max_tokens": 512, "max_tokens_limit": null, "temperature": 1.0, "top_p": 0.95, "top_k": 40,
        "min_p": 0.05, "repetition_penalty": 1.0});
    let info = s.get_json("/info").await;
    assert_eq!(info["generation_defaults"], expected, "{info}");
    let models = s.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["generation_defaults"], expected, "{models}");

    // No sampling field: temperature 1 with the default filters. A weak check that it is language, not the
    // long tail ("Ar!n!com L&A just launched..." without filters).
    let mut text = String::new();
    for seed in [1, 2, 3] {
        let mut body = chat("Tell me about the city of Paris.", 48);
        body["seed"] = json!(seed);
        text.push_str(&answer(&s, body).await);
    }
    let plain = text.chars().filter(|c| c.is_ascii_alphabetic() || *c == ' ').count();
    let ratio = plain as f64 / text.chars().count().max(1) as f64;
    assert!(ratio > 0.85, "{ratio:.2} letters/spaces in {text:?}");

    // A sent value wins: top_k 1 is greedy whatever the defaults.
    let mut greedy = chat("Name a colour.", 12);
    greedy["temperature"] = json!(0);
    let greedy = answer(&s, greedy).await;
    let mut top1 = chat("Name a colour.", 12);
    top1["top_k"] = json!(1);
    top1["seed"] = json!(7);
    assert_eq!(answer(&s, top1).await, greedy);
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_set_the_defaults() {
    let s = Server::start(&["--default-top-k", "1", "--default-temperature", "0.7"]).await;
    let info = s.get_json("/info").await;
    assert_eq!(info["generation_defaults"]["top_k"], 1, "{info}");
    assert_eq!(info["generation_defaults"]["temperature"], 0.7, "{info}");
    let mut greedy = chat("Name a colour.", 12);
    greedy["temperature"] = json!(0);
    let greedy = answer(&s, greedy).await;
    // No top_k sent: the default top_k 1 makes any seed greedy.
    for seed in [1, 2] {
        let mut body = chat("Name a colour.", 12);
        body["seed"] = json!(seed);
        assert_eq!(answer(&s, body).await, greedy, "seed {seed}");
    }
}

#[test]
fn out_of_range_defaults_are_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args(["--default-top-p", "0", "--port", "0"])
        .arg("--model")
        .arg(common::model_path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--default-top-p"), "{err}");
}
