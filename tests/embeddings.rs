//! Embeddings from the real all-MiniLM-L6-v2 model through `/v1/embeddings` and `/embeddings`.

mod common;

use base64::Engine as _;
use common::Server;
use serde_json::{json, Value};

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("floats")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_are_normalised_ordered_and_meaningful() {
    let s = Server::start(&[]).await;
    let input = json!([
        "A cat sits on the mat",
        "A kitten rests on a rug",
        "Stock markets fell sharply today"
    ]);
    let (st, v) = s.post("/v1/embeddings", json!({"input": input, "model": "any"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "all-minilm-l6-v2");
    let e = vectors(&v);
    assert_eq!(e.len(), 3);
    assert!(e.iter().all(|x| x.len() == 384));
    for x in &e {
        assert!((dot(x, x) - 1.0).abs() < 1e-4, "unit length");
    }
    assert!(
        dot(&e[0], &e[1]) > 0.5 && dot(&e[0], &e[2]) < 0.2,
        "cat~kitten, not stocks"
    );
    assert_eq!(v["data"][2]["index"], 2);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    // One input alone gives the same vector as inside a list; base64 carries the same floats.
    let (_, one) = s.post("/embeddings", json!({"input": "A kitten rests on a rug"})).await;
    assert_eq!(vectors(&one)[0], e[1]);
    let (_, b64) = s
        .post(
            "/v1/embeddings",
            json!({"input": "A kitten rests on a rug", "encoding_format": "base64"}),
        )
        .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(floats, e[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_embedding_requests_get_clear_errors() {
    let s = Server::start(&[]).await;
    for (body, needle) in [
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": [1, 2]}), "input"),
        (json!({}), "invalid request"),
        (json!({"input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"input": "x", "dimensions": 12}), "384"),
    ] {
        let (st, v) = s.post("/v1/embeddings", body).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
    }
    let none = Server::start(&["--embedding-model", "none"]).await;
    let (st, v) = none.post("/v1/embeddings", json!({"input": "x"})).await;
    assert_eq!(st, 404, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--embedding-model"));
}
