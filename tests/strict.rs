//! Strict `/v1` bodies: an unknown top-level field is a 400 in OpenAI's words, the documented no-ops are
//! accepted, and the Azure AI route keeps its `extra-parameters` semantics.

mod common;

use common::{chat, Server};
use serde_json::{json, Value};

fn assert_unrecognized(got: &(u16, Value), field: &str) {
    assert_eq!(got.0, 400, "{}", got.1);
    let e = &got.1["error"];
    assert_eq!(
        e["message"],
        format!("Unrecognized request argument supplied: {field}"),
        "{e}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert_eq!(e["param"], field, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_refuses_unknown_fields_and_accepts_the_no_ops() {
    let s = Server::start(&[]).await;
    for field in ["foo", "reasoning_effort", "audio", "web_search_options", "functions"] {
        let mut body = chat("Hi", 2);
        body[field] = json!("x");
        assert_unrecognized(&s.post("/v1/chat/completions", body).await, field);
    }
    for field in ["echo", "suffix", "metadata"] {
        let body = json!({"prompt": "Hi", "max_tokens": 2, field: true});
        assert_unrecognized(&s.post("/v1/completions", body).await, field);
    }
    let mut body = chat("Hi", 2);
    for (k, v) in [
        ("user", json!("u-1")),
        ("metadata", json!({"k": "v"})),
        ("store", json!(false)),
        ("service_tier", json!("auto")),
        ("model", json!("anything")),
        ("modalities", json!(["text"])),
        ("prediction", json!({"type": "content", "content": "Hello"})),
        ("stream_options", json!({"include_usage": true})),
    ] {
        body[k] = v;
    }
    let ok = s.post("/v1/chat/completions", body).await;
    assert_eq!(ok.0, 200, "{}", ok.1);
    let ok = s
        .post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2, "user": "u"}))
        .await;
    assert_eq!(ok.0, 200, "{}", ok.1);

    let mut audio = chat("Hi", 2);
    audio["modalities"] = json!(["text", "audio"]);
    let got = s.post("/v1/chat/completions", audio).await;
    assert_eq!(
        (got.0, got.1["error"]["param"].clone()),
        (400, json!("modalities")),
        "{}",
        got.1
    );
    let mut nested = chat("Hi", 2);
    nested["stream_options"] = json!({"include_usage": true, "foo": 1});
    let got = s.post("/v1/chat/completions", nested).await;
    assert_eq!(got.0, 400, "{}", got.1);
    assert!(got.1["error"]["message"].as_str().unwrap().contains("foo"), "{}", got.1);

    // Messages stay lenient: an unknown key in one is ignored.
    let got = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi", "name": "bob"}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(got.0, 200, "{}", got.1);

    // The Azure AI route is unchanged: its header decides.
    let mut body = chat("Hi", 2);
    body["foo"] = json!(1);
    let url = s.url("/chat/completions?api-version=2024-05-01-preview");
    for (mode, status) in [(None, 400), (Some("drop"), 200), (Some("pass-through"), 200)] {
        let mut r = s.client.post(&url).json(&body);
        if let Some(m) = mode {
            r = r.header("extra-parameters", m);
        }
        assert_eq!(r.send().await.unwrap().status(), status, "{mode:?}");
    }

    let doc = s.get_json("/swagger.json").await;
    for name in ["ChatRequest", "CompletionRequest"] {
        let schema = &doc["components"]["schemas"][name];
        assert_eq!(schema["additionalProperties"], json!(false), "{schema}");
        assert!(schema["properties"]["user"].is_object(), "{schema}");
    }
}
