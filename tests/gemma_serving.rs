//! Gemma 3 270M (base, Q4_K_M, `make models-gemma`) served over real HTTP: the completion routes work, prompt
//! token counts are llama.cpp's, greedy output does not depend on what else shares the batch, chat is refused
//! with a clear 400 until `--chat-template` gives the model (which has none) a template, and it serves beside
//! SmolLM2 in one process, each request routed by its `model` field.

mod common;

use common::Server;
use serde_json::{json, Value};

async fn start(extra: &[&str]) -> Server {
    let gemma = common::gemma_path();
    let mut args = vec![
        "--model",
        gemma.to_str().expect("utf-8 path"),
        "--embedding-model",
        "none",
    ];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn text(body: &Value) -> String {
    body["choices"][0]["text"].as_str().expect("text").to_string()
}

#[tokio::test]
async fn gemma_completes_greedily_the_same_alone_and_in_a_busy_batch() {
    let s = start(&[]).await;
    // llama.cpp's ids for this text (tests/data/gemma3-tokenizer.json, no BOS); the server adds Gemma's BOS.
    let golden: Value = serde_json::from_str(include_str!("data/gemma3-tokenizer.json")).expect("golden json");
    let case = &golden["cases"][1];
    let prompt = case["text"].as_str().expect("text");
    let ids = case["ids"].as_array().expect("ids").len() as u64;
    let (code, alone) = s.post("/v1/completions", completion(prompt, 16)).await;
    assert_eq!(code, 200, "{alone}");
    assert_eq!(alone["usage"]["prompt_tokens"], ids + 1, "{alone}");
    assert_eq!(alone["usage"]["completion_tokens"], 16, "{alone}");
    assert!(!text(&alone).trim().is_empty(), "{alone}");

    // The same request beside three others, prompts of other lengths, all in flight together.
    let others = [
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colours are red,",
    ];
    let mut requests = vec![s.post("/v1/completions", completion(prompt, 16))];
    requests.extend(others.iter().map(|p| s.post("/v1/completions", completion(p, 24))));
    let results = futures::future::join_all(requests).await;
    for (code, body) in &results {
        assert_eq!(*code, 200, "{body}");
    }
    assert_eq!(
        text(&results[0].1),
        text(&alone),
        "greedy output changed in a busy batch"
    );
}

#[tokio::test]
async fn gemma_refuses_chat_without_a_template_and_serves_it_with_one() {
    let s = start(&[]).await;
    let chat = common::chat("Hello", 4);
    let (code, body) = s.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("no chat template") && message.contains("--chat-template"),
        "{message}"
    );
    drop(s);

    let s = start(&["--chat-template", "chatml"]).await;
    let (code, body) = s.post("/v1/chat/completions", chat).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
}

#[tokio::test]
async fn gemma_and_smollm2_serve_side_by_side_routed_by_model() {
    let prompt = completion("Once upon a time", 12);
    let alone = {
        let s = start(&[]).await;
        let (code, body) = s.post("/v1/completions", prompt.clone()).await;
        assert_eq!(code, 200, "{body}");
        text(&body)
    };
    let (smol, gemma) = (common::model_path(), common::gemma_path());
    let s = Server::start_models(&[("smollm2", &smol), ("gemma", &gemma)], &["--embedding-model", "none"]).await;
    let mut to_gemma = prompt.clone();
    to_gemma["model"] = json!("gemma");
    // SmolLM2 chats (the default model) while Gemma completes.
    let (chat, gemma_out) = tokio::join!(s.post("/v1/chat/completions", common::chat("Say hi", 8)), async {
        s.post("/v1/completions", to_gemma.clone()).await
    });
    assert_eq!(chat.0, 200, "{}", chat.1);
    assert_eq!(chat.1["model"], "smollm2", "{}", chat.1);
    assert_eq!(gemma_out.0, 200, "{}", gemma_out.1);
    assert_eq!(gemma_out.1["model"], "gemma", "{}", gemma_out.1);
    assert_eq!(text(&gemma_out.1), alone, "Gemma's greedy output beside SmolLM2");
    // Gemma has no chat template: a chat request naming it is refused, SmolLM2's chat is not affected.
    let mut chat_gemma = common::chat("Hi", 2);
    chat_gemma["model"] = json!("gemma");
    let (code, body) = s.post("/v1/chat/completions", chat_gemma).await;
    assert_eq!(code, 400, "{body}");
    let models = s.get_json("/v1/models").await;
    assert_eq!(common::listed(&models, "id"), ["smollm2", "gemma"], "{models}");
    let metrics = s.metrics().await;
    let finished = |model: &str| {
        common::sample(
            &metrics,
            &format!("amlserve_request_finished_total{{model=\"{model}\",reason=\"length\"}}"),
        )
    };
    assert_eq!(
        (finished("smollm2"), finished("gemma")),
        (1.0, 1.0),
        "per-model counters"
    );
}

#[test]
fn a_chat_template_that_is_neither_chatml_nor_a_file_stops_the_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amlserve"))
        .args(["--chat-template", "/no/such/template.jinja"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--chat-template /no/such/template.jinja"), "{err}");
}

/// Logits of the last prompt token with the prompt fed whole, and fed as its first token then the rest.
fn chunked_logits(model: &amlserve::model::Model, split: usize) -> (Vec<f32>, Vec<f32>) {
    // The prompt is 11 tokens with Gemma's BOS.
    use amlserve::model::{SeqChunk, SeqKv};
    let llama = model.cpu().expect("cpu forward");
    let prompt = model
        .tokenizer
        .encode_prompt("Hello world! 12345 café")
        .expect("encode");
    let shape = model.config.kv_shape();
    let run = |parts: &[&[u32]]| {
        let mut kv = SeqKv::new(shape, 8, prompt.len());
        let mut last = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let want = i + 1 == parts.len();
            let mut chunks = [SeqChunk {
                kv: &mut kv,
                tokens: part,
                want_logits: want,
            }];
            let out = llama.forward(&mut chunks).expect("forward");
            if want {
                last = out.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("logits");
            }
        }
        last
    };
    let (a, b) = prompt.split_at(split);
    (run(&[&prompt]), run(&[a, b]))
}

/// The default weights (every matrix on the Q8_0 kernel) give the same bits however the prompt is chunked,
/// down to a last chunk of one token: with Gemma's Q6_K matrices left to candle, a one-row step took another
/// kernel than a longer one and the prefix cache changed greedy output.
#[test]
fn chunking_the_prompt_changes_no_logit() {
    let model =
        amlserve::model::Model::load(&common::gemma_path(), amlserve::model::WeightFormat::Q8_0).expect("gemma loads");
    for split in [1, 5, 9, 10] {
        let (whole, chunked) = chunked_logits(&model, split);
        let worst = whole
            .iter()
            .zip(&chunked)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(whole == chunked, "split at {split}: max |diff| {worst}");
    }
}

/// The device forward (what `--device cuda` runs; here on candle's CPU backend) serves Gemma too: the same prompt
/// token count and greedy answer as the CPU forward (the two differ in matmul kernels, so only a confident
/// first word is compared; the logits are compared per family in `family_forward.rs`).
#[tokio::test]
async fn the_device_forward_serves_gemma_as_the_cpu_forward_does() {
    let request = completion("The capital of France is", 3);
    let s = start(&[]).await;
    let (code, want) = s.post("/v1/completions", request.clone()).await;
    assert_eq!(code, 200, "{want}");
    drop(s);
    let s = start(&["--device", "candle-cpu"]).await;
    let info = s.get_json("/info").await;
    assert_eq!(info["device"]["device"], "candle-cpu", "{info}");
    let (code, got) = s.post("/v1/completions", request).await;
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["usage"], want["usage"], "{got} vs {want}");
    let first = |b: &Value| text(b).split_whitespace().next().map(str::to_owned);
    assert_eq!(first(&got), first(&want), "{got} vs {want}");
}
