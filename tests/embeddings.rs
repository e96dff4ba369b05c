//! Embeddings from the real all-MiniLM-L6-v2 model through `/v1/embeddings` and `/embeddings`.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{sample, Server};
use serde_json::{json, Value};

/// Largest per-component difference allowed between an input's embedding computed inside a padded batch and
/// alone (float rounding of different matrix shapes; different sentences differ by ~1e-1).
const BATCH_TOLERANCE: f32 = 1e-5;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A text of about 300 WordPiece tokens: truncated to the model's 256.
fn long_text(i: usize) -> String {
    format!("{i} ") + &"the committee reviewed every budget line before approving the annual plan ".repeat(25)
}

fn outcome(scrape: &str, o: &str) -> f64 {
    sample(
        scrape,
        &format!("amlserve_embedding_requests_finished_total{{outcome=\"{o}\"}}"),
    )
}

/// Waits until no embedding request is queued or running, and returns the scrape.
async fn idle_scrape(s: &Server) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let m = s.metrics().await;
        if sample(&m, "amlserve_embedding_requests_waiting") == 0.0 || Instant::now() > until {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    // One input alone gives the same vector as inside a (padded) list; base64 carries the same floats.
    let (st, one) = s.post("/embeddings", json!({"input": "A kitten rests on a rug"})).await;
    assert_eq!(st, 200, "{one}");
    let one = vectors(&one).remove(0);
    assert!(max_diff(&one, &e[1]) < BATCH_TOLERANCE);
    let (st, b64) = s
        .post(
            "/v1/embeddings",
            json!({"input": "A kitten rests on a rug", "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(st, 200, "{b64}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(floats, one);
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

#[tokio::test(flavor = "multi_thread")]
async fn inputs_batched_across_requests_equal_their_single_results() {
    let s = Server::start(&[]).await;
    let texts: Vec<String> = (0..8)
        .map(|i| match i % 3 {
            0 => format!("short {i}"),
            1 => format!("a sentence of middling length about topic number {i} and a few more words"),
            _ => long_text(i),
        })
        .collect();
    let mut alone = Vec::new();
    for t in &texts {
        let (st, v) = s.post("/v1/embeddings", json!({"input": t})).await;
        assert_eq!(st, 200, "{v}");
        alone.push(vectors(&v).remove(0));
    }
    let before = idle_scrape(&s).await;
    // The same inputs as concurrent single-input requests and as one list.
    let singles = texts.iter().map(|t| s.post("/v1/embeddings", json!({"input": t})));
    let (singles, (st, list)) = tokio::join!(
        futures::future::join_all(singles),
        s.post("/v1/embeddings", json!({"input": texts}))
    );
    assert_eq!(st, 200, "{list}");
    let list = vectors(&list);
    for (i, (st, v)) in singles.into_iter().enumerate() {
        assert_eq!(st, 200, "{v}");
        let d = max_diff(&vectors(&v)[0], &alone[i]);
        assert!(d < BATCH_TOLERANCE, "input {i}, concurrent: {d}");
        let d = max_diff(&list[i], &alone[i]);
        assert!(d < BATCH_TOLERANCE, "input {i}, in a list: {d}");
    }
    assert!(max_diff(&alone[0], &alone[1]) > 1e3 * BATCH_TOLERANCE);
    let after = idle_scrape(&s).await;
    let forwards =
        sample(&after, "amlserve_embedding_batch_size_count") - sample(&before, "amlserve_embedding_batch_size_count");
    let inputs =
        sample(&after, "amlserve_embedding_batch_size_sum") - sample(&before, "amlserve_embedding_batch_size_sum");
    assert_eq!(inputs, 16.0);
    assert!(
        forwards < inputs,
        "inputs shared forwards: {forwards} forwards for {inputs} inputs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_embedding_requests_gets_429s_never_5xx() {
    let s = Server::start(&["--embedding-max-waiting", "2", "--embedding-max-batch-tokens", "512"]).await;
    let body = json!({"input": [long_text(1), long_text(2), long_text(3)]});
    let storm = (0..40).map(|_| s.client.post(s.url("/v1/embeddings")).json(&body).send());
    let answers = futures::future::join_all(storm).await;
    let (mut ok, mut refused) = (0, 0);
    for r in answers {
        let r = r.expect("answered");
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert_eq!(r.headers()["retry-after"], "1");
                let v: Value = r.json().await.expect("json");
                assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
            }
            other => panic!("status {other}: {}", r.text().await.unwrap_or_default()),
        }
    }
    assert!(ok >= 2 && refused > 0, "{ok} ok, {refused} refused");
    let m = idle_scrape(&s).await;
    assert_eq!(outcome(&m, "rejected"), f64::from(refused));
    assert_eq!(outcome(&m, "ok"), f64::from(ok));
    assert_eq!(outcome(&m, "error"), 0.0);
    // Once the storm is over, requests are served again.
    let (st, v) = s.post("/embeddings", json!({"input": "calm"})).await;
    assert_eq!(st, 200, "{v}");
}

/// One input of 256 tokens per forward, so a request of many long inputs takes many forwards.
const ONE_PER_FORWARD: [&str; 2] = ["--embedding-max-batch-tokens", "256"];

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_does_not_get_its_inputs_computed() {
    let s = Server::start(&ONE_PER_FORWARD).await;
    let n = 64;
    let body = json!({"input": (0..n).map(long_text).collect::<Vec<_>>()});
    let req = s.client.post(s.url("/v1/embeddings")).json(&body).send();
    let client = tokio::spawn(req);
    // Wait for its first forward, then go away.
    let until = Instant::now() + Duration::from_secs(30);
    while sample(&s.metrics().await, "amlserve_embedding_input_tokens_total") == 0.0 {
        assert!(Instant::now() < until, "the request started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.abort();
    let m = idle_scrape(&s).await;
    assert_eq!(sample(&m, "amlserve_embedding_requests_waiting"), 0.0);
    assert_eq!(outcome(&m, "cancelled"), 1.0);
    assert_eq!(outcome(&m, "ok"), 0.0);
    let computed = sample(&m, "amlserve_embedding_input_tokens_total");
    assert!(
        computed < (n * 256 / 2) as f64,
        "only {computed} of {} tokens computed",
        n * 256
    );
    let (st, v) = s.post("/v1/embeddings", json!({"input": "next"})).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedding_request_past_its_timeout_gets_504_and_stops_computing() {
    let mut flags = vec!["--request-timeout-ms", "300"];
    flags.extend(ONE_PER_FORWARD);
    let s = Server::start(&flags).await;
    let n = 64;
    let started = Instant::now();
    let (st, v) = s
        .post(
            "/v1/embeddings",
            json!({"input": (0..n).map(long_text).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(st, 504, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "answered at the deadline");
    let m = idle_scrape(&s).await;
    assert_eq!(outcome(&m, "timeout"), 1.0);
    let computed = sample(&m, "amlserve_embedding_input_tokens_total");
    assert!(
        computed < (n * 256 / 2) as f64,
        "only {computed} of {} tokens computed",
        n * 256
    );
}
