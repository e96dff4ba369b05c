//! The prefix cache: prompts that start like an earlier request's reuse its KV, the outputs are exactly those
//! of a server without the cache, and the reuse is reported in `usage` and `/metrics`.

mod common;

use common::{sample, sse_data, Server};
use serde_json::{json, Value};

const SYSTEM: &str = "You are a terse assistant for a shipping company. Answer in one sentence.";

fn turn(history: &[(&str, &str)], max_tokens: u32) -> Value {
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    for (role, content) in history {
        messages.push(json!({"role": role, "content": content}));
    }
    json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// Reply text and `usage` of a chat request (streamed when `stream`, with the usage chunk).
async fn ask(s: &Server, mut body: Value, stream: bool) -> (String, Value) {
    if !stream {
        let (st, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!(st, 200, "{v}");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string();
        return (text, v["usage"].clone());
    }
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_data(&s.post_text("/v1/chat/completions", &body).await);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks.last().expect("usage chunk")["usage"].clone())
}

fn cached(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens")
}

#[tokio::test(flavor = "multi_thread")]
async fn reused_prefixes_give_the_same_outputs_as_no_cache() {
    let with = Server::start(&[]).await;
    let without = Server::start(&["--prefix-cache-mb", "0"]).await;

    // Turn 1 on both servers; nothing to reuse yet.
    let question = "Where is my parcel 1234?";
    let (reply, u1) = ask(&with, turn(&[("user", question)], 12), false).await;
    assert_eq!(cached(&u1), 0);
    let (reply_again, _) = ask(&without, turn(&[("user", question)], 12), false).await;
    assert_eq!(reply, reply_again);

    // Turn 2 resends the conversation: all of turn 1's prompt is cached, answers are identical.
    let second = turn(
        &[
            ("user", question),
            ("assistant", &reply),
            ("user", "And when will it arrive?"),
        ],
        16,
    );
    let (a, u2) = ask(&with, second.clone(), true).await;
    let (b, u2_without) = ask(&without, second, true).await;
    assert_eq!(a, b, "prefix reuse changed the output");
    let prompt1 = u1["prompt_tokens"].as_u64().expect("prompt tokens");
    assert!(
        cached(&u2) >= prompt1 - 1,
        "turn 2 reused {} of turn 1's {prompt1} tokens",
        cached(&u2)
    );
    assert!(cached(&u2) < u2["prompt_tokens"].as_u64().expect("prompt tokens"));
    assert_eq!(cached(&u2_without), 0);

    // Concurrent requests sharing only the system preamble: same outputs, the preamble reused.
    let questions = [
        "Do you ship to Norway?",
        "What does express cost?",
        "Can I change the address?",
    ];
    let bodies: Vec<Value> = questions.iter().map(|q| turn(&[("user", q)], 10)).collect();
    let (got, want) = tokio::join!(
        futures::future::join_all(bodies.iter().map(|b| ask(&with, b.clone(), false))),
        futures::future::join_all(bodies.iter().map(|b| ask(&without, b.clone(), false))),
    );
    let mut reused = cached(&u2);
    for ((text, usage), (expected, _)) in got.iter().zip(&want) {
        assert_eq!(text, expected);
        assert!(cached(usage) > 10, "the system preamble is cached: {usage}");
        reused += cached(usage);
    }

    let m = with.metrics().await;
    assert_eq!(sample(&m, "amlserve_prefix_cache_hit_tokens_total"), reused as f64);
}
