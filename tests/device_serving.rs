//! The server on the device forward (`--device candle-cpu`: the GPU's forward on candle's CPU backend), end to
//! end: `/info` names the device; greedy answers are the same alone (from the rows' argmax, or from whole rows
//! when log-probabilities are asked for), in a busy batch with chunked prefill, and from the prefix cache's
//! shared blocks; seeded `n > 1` choices (forked caches) repeat.

mod common;

use common::Server;
use serde_json::{json, Value};

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

async fn texts(s: &Server, body: Value) -> Vec<String> {
    let (st, v) = s.post("/v1/completions", body).await;
    assert_eq!(st, 200, "{v}");
    v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_forward_serves_batched_forked_and_cached_requests() {
    // --cuda-graphs is CUDA's alone: off CUDA it is ignored (with a warning) and serving is unchanged.
    let s = Server::start(&[
        "--device",
        "candle-cpu",
        "--cuda-graphs",
        "--max-batch-tokens",
        "24",
        "--kv-cache-mb",
        "64",
    ])
    .await;
    let info = s.get_json("/info").await;
    assert_eq!(info["device"]["device"], "candle-cpu", "{info}");

    let probe = completion("The history of the Roman Empire begins with", 24);
    let alone = texts(&s, probe.clone()).await.remove(0);
    assert!(!alone.trim().is_empty());

    // Alone, a plain greedy row comes back as its argmax (computed where the logits are); asking for
    // log-probabilities brings the whole row back for the host to pick from: the same text.
    let mut whole = probe.clone();
    whole["logprobs"] = json!(1);
    assert_eq!(
        texts(&s, whole).await.remove(0),
        alone,
        "the argmax of whole rows and the device's argmax differ"
    );

    // The same request among 6 others with longer prompts (prefilled in chunks of the 24-token budget).
    let mut tasks = Vec::new();
    for i in 0..6 {
        let body = completion(&"Tell me about the weather and the sea. ".repeat(i + 1), 16);
        let url = s.url("/v1/completions");
        let client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("send");
            assert_eq!(r.status(), 200);
        }));
    }
    let busy = texts(&s, probe.clone()).await.remove(0);
    for t in tasks {
        t.await.expect("neighbour");
    }
    assert_eq!(busy, alone, "greedy output changed inside a busy batch");

    // Again: its prompt now comes from the prefix cache (shared blocks).
    let hits_before = common::sample(&s.metrics().await, "amlserve_prefix_cache_hit_tokens_total");
    assert_eq!(
        texts(&s, probe).await.remove(0),
        alone,
        "greedy output changed on a prefix-cache hit"
    );
    let hits_after = common::sample(&s.metrics().await, "amlserve_prefix_cache_hit_tokens_total");
    assert!(
        hits_after > hits_before,
        "the repeat hit the prefix cache ({hits_before} -> {hits_after})"
    );

    // Seeded choices share the prompt's blocks (forks) and repeat exactly.
    let seeded = json!({"prompt": "Once upon a time", "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 7});
    let first = texts(&s, seeded.clone()).await;
    assert_eq!(first.len(), 3);
    assert_eq!(texts(&s, seeded).await, first, "seeded choices did not repeat");
}
