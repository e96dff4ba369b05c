//! Output control against the real model over HTTP: logprobs (chat and legacy completions), `n` choices,
//! `logit_bias`, and the refusals of values that cannot be honoured. Structured outputs and tool calls are
//! checked with the official SDK in `tests/python/output_control.py` (run from tests/sdk.rs).

mod common;

use common::Server;
use serde_json::{json, Value};

fn greedy_chat(content: &str, max_tokens: u32) -> Value {
    let mut b = common::chat(content, max_tokens);
    b["temperature"] = json!(0);
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_tokens_are_the_most_likely_and_logprobs_do_not_depend_on_the_batch() {
    let s = Server::start(&[]).await;
    let mut body = greedy_chat("Name three colours.", 12);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (st, alone) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{alone}");
    let content = alone["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .clone();
    assert!(!content.is_empty());
    let mut text = Vec::new();
    for t in &content {
        let top = t["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(top[0]["token"], t["token"], "greedy picks the most likely token: {t}");
        assert_eq!(top[0]["logprob"], t["logprob"]);
        assert!(t["logprob"].as_f64().expect("number") <= 0.0);
        text.extend(
            t["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8),
        );
    }
    assert_eq!(
        String::from_utf8(text).expect("utf-8"),
        alone["choices"][0]["message"]["content"].as_str().expect("content"),
        "the tokens' bytes spell the answer"
    );
    // The same request inside a batch of 8 different ones: the same tokens and log-probabilities.
    let others = (0..7).map(|i| {
        let s = &s;
        async move {
            s.post(
                "/v1/chat/completions",
                greedy_chat(&format!("Tell me about the number {i}."), 40),
            )
            .await
        }
    });
    let (batched, rest) = tokio::join!(s.post("/v1/chat/completions", body), futures::future::join_all(others));
    assert!(rest.iter().all(|(st, _)| *st == 200));
    assert_eq!(batched.1["choices"][0]["logprobs"], alone["choices"][0]["logprobs"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn constrained_greedy_output_does_not_depend_on_the_batch() {
    let s = Server::start(&[]).await;
    let mut body = greedy_chat("Describe a book as JSON.", 48);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "book", "strict": true,
        "schema": {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
                   "required": ["title", "year"], "additionalProperties": false}}});
    body["logprobs"] = json!(true);
    let (st, alone) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{alone}");
    // Inside a batch of 7 others, some constrained by other grammars, some free.
    let others = (0..7).map(|i| {
        let s = &s;
        async move {
            let mut b = greedy_chat(&format!("Give me the number {i} and a word."), 40);
            if i % 2 == 0 {
                b["structured_outputs"] = json!({"regex": "[0-9]+ [a-z]+"});
            }
            s.post("/v1/chat/completions", b).await
        }
    });
    let (batched, rest) = tokio::join!(s.post("/v1/chat/completions", body), futures::future::join_all(others));
    assert!(rest.iter().all(|(st, _)| *st == 200), "{rest:?}");
    assert_eq!(batched.1["choices"][0]["message"], alone["choices"][0]["message"]);
    assert_eq!(batched.1["choices"][0]["logprobs"], alone["choices"][0]["logprobs"]);
    let text = alone["choices"][0]["message"]["content"].as_str().expect("content");
    if alone["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(text).expect("the grammar's output parses");
        assert!(v["title"].is_string() && v["year"].is_i64(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_logprobs_have_the_legacy_shape() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2});
    let (st, v) = s.post("/v1/completions", body).await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("s"))
        .collect();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().expect("lps").len());
    assert_eq!(tokens.concat(), v["choices"][0]["text"].as_str().expect("text"));
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("n"))
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert!(lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .all(|m| m.as_object().is_some_and(|m| !m.is_empty() && m.len() <= 2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_are_reproducible_with_a_seed_and_the_prompt_counts_once() {
    let s = Server::start(&[]).await;
    let mut body = common::chat("Write a short line about the sea.", 12);
    body["n"] = json!(3);
    body["seed"] = json!(42);
    body["temperature"] = json!(1.0);
    let (st, a) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{a}");
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| c["message"]["content"].as_str().expect("t").to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    let (_, b) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(texts(&a), texts(&b), "the same three choices on a repeat");
    let mut one = body.clone();
    one["n"] = json!(1);
    let (_, single) = s.post("/v1/chat/completions", one).await;
    assert_eq!(
        a["usage"]["prompt_tokens"], single["usage"]["prompt_tokens"],
        "the prompt counts once"
    );
    assert_eq!(
        texts(&single)[0],
        texts(&a)[0],
        "choice 0 samples with the request's seed"
    );
    // Streamed: three choices, each ends once.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let raw = s.post_text("/v1/chat/completions", &streamed).await;
    let finishes = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|e| e["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 3);
    // Completions: a list of prompts times n.
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 3}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().expect("choices").len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_bans_and_forces_tokens() {
    let s = Server::start(&[]).await;
    let mut body = greedy_chat("Say hello.", 4);
    body["logprobs"] = json!(true);
    let (_, plain) = s.post("/v1/chat/completions", body.clone()).await;
    let first = plain["choices"][0]["logprobs"]["content"][0]["token"]
        .as_str()
        .expect("token")
        .to_string();
    // +100 on one id forces it at every step.
    body["logit_bias"] = json!({"28": 100});
    let (st, forced) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{forced}");
    let toks: Vec<&str> = forced["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("lp")
        .iter()
        .map(|t| t["token"].as_str().expect("t"))
        .collect();
    assert!(
        toks.len() == 4 && toks.iter().all(|t| *t == toks[0]) && toks[0] != first,
        "+100 forces the token: {toks:?}"
    );
    body["logit_bias"] = json!({"28": -100});
    let (_, banned) = s.post("/v1/chat/completions", body).await;
    assert_eq!(
        banned["choices"][0]["logprobs"]["content"][0]["token"].as_str(),
        Some(first.as_str()),
        "banning an unlikely token changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn values_that_cannot_be_honoured_are_refused_by_name() {
    let s = Server::start(&[]).await;
    for (field, value) in [
        ("best_of", json!(3)),
        ("logit_bias", json!({"999999": 5})),
        ("logit_bias", json!({"5": 101})),
        ("n", json!(17)),
        ("response_format", json!({"type": "yaml"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}),
        ),
        ("structured_outputs", json!({"regex": "a", "choice": ["b"]})),
        ("tool_choice", json!("sometimes")),
        ("tools", json!([{"type": "function", "function": {"name": "bad name"}}])),
        ("top_logprobs", json!(2)),
    ] {
        let mut body = common::chat("Hi", 2);
        body[field] = value.clone();
        let (st, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!(st, 400, "{field}={value}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    let mut body = common::chat("Hi", 2);
    body["ignore_eos"] = json!(true);
    body["response_format"] = json!({"type": "json_object"});
    let (st, v) = s.post("/v1/chat/completions", body).await;
    assert_eq!((st, &v["error"]["param"]), (400, &json!("ignore_eos")), "{v}");
}
